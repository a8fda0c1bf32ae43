"""Backbone loading on tiny random pipelines of every family (pipelines/backbones.py, families.py, tiny.py)."""
import json

import pytest
import torch

from pipelines import backbones
from pipelines.backbones import LoraSpec, load_bundle
from pipelines.tiny import save_tiny_pipeline, tiny_bundle

FAMILIES = ["sd", "sd2", "sdxl", "sd3", "sd3-no-t5", "sana", "pixart"]
FAMILY_NAME = {"sd3-no-t5": "sd3", "sd2": "sd"}
PROMPTS = ["a red circle", "two small blue squares at the top left"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny_pipeline(family, root / family) for family in FAMILIES}


def _inputs(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(bundle.latent_shape(len(PROMPTS)), generator=g)
    t = torch.tensor([999.0, 250.5])
    return x_t, t


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_same_weights_and_predictions(family, folders):
    """save_pretrained -> load_bundle gives the in-memory pipeline's weights and outputs exactly."""
    fresh = tiny_bundle(family)
    loaded = load_bundle(str(folders[family]))
    assert loaded.family == FAMILY_NAME.get(family, family)
    assert loaded.pipeline_class == type(fresh.pipeline).__name__
    assert loaded.source == str(folders[family])
    state, loaded_state = fresh.denoiser.state_dict(), loaded.denoiser.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    x_t, t = _inputs(fresh)
    cond, loaded_cond = fresh.encode_prompt(PROMPTS), loaded.encode_prompt(PROMPTS)
    for k, v in cond.state().items():
        assert torch.equal(v, loaded_cond.state()[k]), k
    with torch.no_grad():
        out = fresh.predict(fresh.denoiser, x_t, t, cond)
        loaded_out = loaded.predict(loaded.denoiser, x_t, t, loaded_cond)
    assert out.shape == x_t.shape
    assert torch.equal(out, loaded_out)
    # A different seed gives different weights: the equality above is not vacuous.
    other = tiny_bundle(family, seed=1).denoiser.state_dict()
    assert any(not torch.equal(state[k], other[k]) for k in state if state[k].is_floating_point())


def test_prediction_types_and_schedules():
    expected = {"sd": ("epsilon", "vp"), "sd2": ("v_prediction", "vp"), "sdxl": ("epsilon", "vp"), "sd3": ("flow", "flow"),
                "sana": ("flow", "flow"), "pixart": ("epsilon", "vp")}
    for family, (prediction_type, kind) in expected.items():
        bundle = tiny_bundle(family)
        assert (bundle.prediction_type, bundle.schedule.kind) == (prediction_type, kind), family


@pytest.mark.parametrize("family,shapes", [
    # CLIP pads to 77 tokens; SD3 appends 256 T5 tokens (zeros when T5 is absent) and pads CLIP's 2x32
    # to T5's width 64; Sana/PixArt pad to their pipelines' max_sequence_length 300.
    ("sd", {"encoder_hidden_states": (2, 77, 32)}),
    ("sdxl", {"encoder_hidden_states": (2, 77, 64), "added_cond_kwargs.text_embeds": (2, 32),
              "added_cond_kwargs.time_ids": (2, 6)}),
    ("sd3", {"encoder_hidden_states": (2, 77 + 256, 64), "pooled_projections": (2, 64)}),
    ("sd3-no-t5", {"encoder_hidden_states": (2, 77 + 256, 64), "pooled_projections": (2, 64)}),
    ("sana", {"encoder_hidden_states": (2, 300, 16), "encoder_attention_mask": (2, 300)}),
    ("pixart", {"encoder_hidden_states": (2, 300, 32), "encoder_attention_mask": (2, 300)}),
])
def test_encode_prompt_shapes(family, shapes):
    bundle = tiny_bundle(family)
    state = bundle.encode_prompt(PROMPTS).state()
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert not any(v.requires_grad for v in state.values())
    uncond = bundle.encode_unconditional(3).state()
    assert {k: tuple(v.shape)[1:] for k, v in uncond.items()} == {k: s[1:] for k, s in shapes.items()}
    assert all(v.shape[0] == 3 for v in uncond.values())


def test_attention_masks_count_prompt_tokens():
    """PixArt's T5 mask covers the prompt's tokens plus </s>; the char tokenizer makes that countable."""
    bundle = tiny_bundle("pixart")
    mask = bundle.encode_prompt(["ab", "abc d"]).kwargs["encoder_attention_mask"]
    # "ab" -> [▁a, b, </s>] = 3; "abc d" -> [▁a, b, c, ▁d, </s>] = 5
    assert mask.sum(1).tolist() == [3, 5]
    assert mask[0, :3].tolist() == [1, 1, 1] and mask[0, 3:].sum() == 0


def test_sdxl_time_ids():
    """add_time_ids = (orig h, orig w, crop top, crop left, target h, target w); native size 8 latents * 4."""
    bundle = tiny_bundle("sdxl")
    default = bundle.encode_prompt(PROMPTS).kwargs["added_cond_kwargs"]["time_ids"]
    assert default.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    sized = bundle.encode_prompt(PROMPTS, image_size=(64, 48)).kwargs["added_cond_kwargs"]["time_ids"]
    assert sized.tolist() == [[64, 48, 0, 0, 64, 48]] * 2


def test_unconditional_follows_diffusers_defaults():
    sdxl = tiny_bundle("sdxl").encode_unconditional(2)
    assert sdxl.kwargs["encoder_hidden_states"].abs().sum() == 0  # force_zeros_for_empty_prompt
    assert sdxl.kwargs["added_cond_kwargs"]["text_embeds"].abs().sum() == 0
    sd = tiny_bundle("sd")
    assert torch.equal(sd.encode_unconditional(1).kwargs["encoder_hidden_states"],
                       sd.encode_prompt([""]).kwargs["encoder_hidden_states"])
    # Sana prefixes prompts with its instruction but not the negative: the two empty encodings differ.
    sana = tiny_bundle("sana")
    assert not torch.equal(sana.encode_unconditional(1).kwargs["encoder_hidden_states"],
                           sana.encode_prompt([""]).kwargs["encoder_hidden_states"])


def test_pixart_learned_sigma_returns_eps_half():
    bundle = tiny_bundle("pixart")
    x_t, t = _inputs(bundle)
    cond = bundle.encode_prompt(PROMPTS)
    with torch.no_grad():
        raw = bundle.denoiser(x_t, timestep=t, return_dict=False,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}, **cond.kwargs)[0]
        out = bundle.predict(bundle.denoiser, x_t, t, cond)
    assert raw.shape[1] == 2 * x_t.shape[1]
    assert torch.equal(out, raw[:, : x_t.shape[1]])


def test_pixart_resolution_conditioning():
    """A PixArt-alpha 1024-style transformer gets (height, width) = latent size x VAE factor 4 = 32, aspect 1."""
    from diffusers import PixArtTransformer2DModel

    bundle = tiny_bundle("pixart")
    # The size embedding splits the width in thirds, so this variant needs an inner dim divisible by 3.
    config = {**bundle.denoiser.config, "use_additional_conditions": True, "num_attention_heads": 3,
              "cross_attention_dim": 24}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        denoiser = PixArtTransformer2DModel.from_config(config)
    x_t, t = _inputs(bundle)
    cond = bundle.encode_prompt(PROMPTS)
    sizes = {"resolution": torch.tensor([[32.0, 32.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    with torch.no_grad():
        raw = denoiser(x_t, timestep=t, added_cond_kwargs=sizes, return_dict=False, **cond.kwargs)[0]
        out = bundle.predict(denoiser, x_t, t, cond)
        sizes["resolution"] = torch.tensor([[64.0, 64.0]] * 2)
        other = denoiser(x_t, timestep=t, added_cond_kwargs=sizes, return_dict=False, **cond.kwargs)[0]
    assert torch.equal(out, raw[:, :4])
    assert not torch.allclose(out, other[:, :4])  # the size really enters the output


def test_predict_scalar_t_and_dtype_cast():
    bundle = tiny_bundle("sd3")
    x_t, _ = _inputs(bundle)
    cond = bundle.encode_prompt(PROMPTS)
    with torch.no_grad():
        scalar = bundle.predict(bundle.denoiser, x_t, torch.tensor(500.0), cond)
        batched = bundle.predict(bundle.denoiser, x_t, torch.tensor([500.0, 500.0]), cond)
        bundle.denoiser.to(torch.bfloat16)
        half = bundle.predict(bundle.denoiser, x_t, torch.tensor(500.0), cond)
    assert torch.equal(scalar, batched)
    assert half.dtype == torch.bfloat16 and half.shape == x_t.shape


@pytest.mark.parametrize("family", ["sd3", "sana"])
def test_vae_round_trip_applies_scale_and_shift(family):
    bundle = tiny_bundle(family)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = bundle.encode_images(images)
    assert latents.shape == bundle.latent_shape(1)
    config = bundle.vae.config
    encoded = bundle.vae.encode(images)
    raw = encoded.latent_dist.mean if family == "sd3" else encoded.latent
    shift = config.get("shift_factor") or 0.0
    torch.testing.assert_close(latents, (raw - shift) * config.scaling_factor)
    decoded = bundle.decode_latents(latents)
    torch.testing.assert_close(decoded, bundle.vae.decode(raw, return_dict=False)[0])
    sampled = bundle.encode_images(images, generator=torch.Generator().manual_seed(1))
    assert sampled.shape == latents.shape


@pytest.mark.parametrize("family", ["sd", "pixart", "sana"])
def test_lora_trains_only_adapters(family, folders):
    """Only lora_ parameters are trainable, and zero-initialised B leaves the output unchanged."""
    plain = load_bundle(str(folders[family]))
    bundle = load_bundle(str(folders[family]), lora=LoraSpec(rank=4, alpha=8))
    trainable = [n for n, p in bundle.denoiser.named_parameters() if p.requires_grad]
    frozen = [n for n, p in bundle.denoiser.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert frozen and not any("lora_" in n for n in frozen)
    assert any(".to_q.lora_A" in n for n in trainable) and any(".to_out.0.lora_B" in n for n in trainable)
    x_t, t = _inputs(plain)
    cond = plain.encode_prompt(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(bundle.predict(bundle.denoiser, x_t, t, cond),
                                   plain.predict(plain.denoiser, x_t, t, cond))
    out = bundle.predict(bundle.denoiser, x_t, t, cond)
    out.square().mean().backward()
    assert all(p.grad is None for n, p in bundle.denoiser.named_parameters() if "lora_" not in n)


def test_lora_is_seeded_and_validated(folders):
    a = load_bundle(str(folders["sd"]), lora=LoraSpec(rank=2, seed=3)).denoiser.state_dict()
    b = load_bundle(str(folders["sd"]), lora=LoraSpec(rank=2, seed=3)).denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0)
    with pytest.raises(ValueError, match=r"\['no_such_layer'\] match no layer"):
        backbones.add_lora(tiny_bundle("sd").denoiser, LoraSpec(target_modules=("no_such_layer",)))


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_math_attention_supports_forward_mode_ad(family, folders):
    """jvp through the denoiser works with attention='math' and matches a central finite difference."""
    bundle = load_bundle(str(folders[family]), attention="math")
    reference = load_bundle(str(folders[family]))
    x_t, t = _inputs(bundle)
    x_t, t = x_t.double(), t.double()
    bundle.denoiser.double()
    reference.denoiser.double()
    cond = bundle.encode_prompt(PROMPTS).to(dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(bundle.predict(bundle.denoiser, x_t, t, cond),
                                   reference.predict(reference.denoiser, x_t, t, cond))
    tangent = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = lambda x: bundle.predict(bundle.denoiser, x, t, cond)  # noqa: E731
    _, jvp = torch.func.jvp(f, (x_t,), (tangent,))
    h = 1e-5
    with torch.no_grad():
        finite = (f(x_t + h * tangent) - f(x_t - h * tangent)) / (2 * h)
    torch.testing.assert_close(jvp, finite, rtol=1e-5, atol=1e-6)


def test_options_dtype_and_gradient_checkpointing(folders):
    bundle = load_bundle(str(folders["sdxl"]), dtype=torch.bfloat16, gradient_checkpointing=True)
    assert bundle.denoiser.dtype == torch.bfloat16
    assert bundle.text_encoders[1].dtype == torch.bfloat16
    assert bundle.denoiser.is_gradient_checkpointing
    assert not any(p.requires_grad for m in [bundle.vae, *bundle.text_encoders] for p in m.parameters())
    x_t, t = _inputs(bundle)
    with torch.no_grad():
        out = bundle.predict(bundle.denoiser, x_t, t, bundle.encode_prompt(PROMPTS))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Adapters on a half-precision base train in float32; the output keeps the base dtype.
    lora = load_bundle(str(folders["sd"]), dtype=torch.bfloat16, lora=LoraSpec(rank=2))
    dtypes = {p.dtype for n, p in lora.denoiser.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32} and lora.denoiser.conv_in.weight.dtype == torch.bfloat16
    x_t, t = _inputs(lora)
    out = lora.predict(lora.denoiser, x_t, t, lora.encode_prompt(PROMPTS))
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None for n, p in lora.denoiser.named_parameters() if "lora_A" in n)


def test_aliases_resolve_before_loading(folders, monkeypatch):
    monkeypatch.setitem(backbones.ALIASES, "tiny-sd", str(folders["sd"]))
    assert load_bundle("tiny-sd").family == "sd"


def test_clear_errors(folders, tmp_path):
    def one_line_error(error, match, source, **options):
        with pytest.raises(error, match=match) as info:
            load_bundle(source, **options)
        assert "\n" not in str(info.value)

    one_line_error(FileNotFoundError, "no such pipeline folder", str(tmp_path / "missing"))
    one_line_error(FileNotFoundError, "no model_index.json", str(tmp_path))
    one_line_error(FileNotFoundError, "neither a local folder nor a hub pipeline", "diffstill-test/not-cached")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    one_line_error(ValueError, "unsupported pipeline class 'FluxPipeline'; supported: .*SanaPipeline", str(tmp_path))
    one_line_error(ValueError, "attention='flash'", str(folders["sd"]), attention="flash")


def test_xformers_missing_is_a_clear_error(folders):
    from diffusers.utils import is_xformers_available

    if is_xformers_available():
        pytest.skip("xformers is installed")
    with pytest.raises(ImportError, match="needs the xformers package"):
        load_bundle(str(folders["sd"]), attention="xformers")


def test_encode_prompt_rejects_a_bare_string():
    with pytest.raises(TypeError, match="list of prompts"):
        tiny_bundle("sd").encode_prompt("a red circle")
