"""The toy world's shipped models (pipelines/toy/{vae,clip,teacher,teacher_flow}) and their build script."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipelines.toy import TOY_CLIP, TOY_DIR, TOY_FLOW_TEACHER, TOY_TEACHER, TOY_VAE, toy_prompts, vocabulary
from pipelines.toy.tokenizer import SUFFIX, build_tokenizer, word_merges

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = (TOY_VAE, TOY_CLIP, TOY_TEACHER, TOY_FLOW_TEACHER)


def shipped_stamps() -> dict:
    """Modification time of every shipped weight file: a build that must not touch them leaves these equal."""
    return {p: p.stat().st_mtime_ns for folder in SHIPPED for p in folder.rglob("*.safetensors")}


def _run(code: str, timeout: int = 120) -> str:
    """Run python code in a fresh, offline process (nothing imported from this one)."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("folder", [TOY_TEACHER, TOY_FLOW_TEACHER], ids=["teacher", "teacher_flow"])
def test_shipped_teacher_generates_with_plain_diffusers(folder):
    """No diffstill import: DiffusionPipeline.from_pretrained(folder) and a 2-step call make 2 images."""
    out = _run(f"""
        import torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r})
        pipe.set_progress_bar_config(disable=True)
        images = pipe(["a small red circle at the top left on a blue background"] * 2, num_inference_steps=2,
                      guidance_scale=3.0, output_type="pt", generator=torch.Generator().manual_seed(0)).images
        print(type(pipe).__name__, tuple(images.shape), bool(torch.isfinite(images).all()))
    """)
    name = "StableDiffusionPipeline" if folder == TOY_TEACHER else "StableDiffusion3Pipeline"
    assert out.split() == [name, "(2,", "3,", "32,", "32)", "True"]


@pytest.mark.parametrize("alias,family,prediction", [("toy", "sd", "epsilon"), ("toy-flow", "sd3", "flow")])
def test_aliases_load_as_bundles(alias, family, prediction):
    from pipelines.backbones import load_bundle

    bundle = load_bundle(alias)
    assert (bundle.family, bundle.prediction_type, bundle.default_image_size) == (family, prediction, (32, 32))
    cond = bundle.encode_prompt(["a large blue square at the center on a white background"])
    x_t = torch.randn(bundle.latent_shape(1), generator=torch.Generator().manual_seed(0))
    out = bundle.predict(bundle.denoiser, x_t, torch.tensor([500.0]), cond)
    assert out.shape == x_t.shape == (1, 4, 16, 16)  # factor-2 VAE: 32x32 images, 16x16x4 latents


def test_flow_teacher_t5_slot_outputs_zeros():
    """The T5 slot is a stand-in for a dropped T5: SD3 would feed zeros there, and so does it."""
    from transformers import T5EncoderModel, T5Tokenizer

    encoder = T5EncoderModel.from_pretrained(TOY_FLOW_TEACHER / "text_encoder_3")
    ids = T5Tokenizer.from_pretrained(TOY_FLOW_TEACHER / "tokenizer_3")(["a large red square at the top"]).input_ids
    assert torch.count_nonzero(encoder(torch.tensor(ids))[0]) == 0


def test_word_merges_by_hand():
    """"ab" = [a, b</w>] needs (a, b</w>). "abc" = [a, b, c</w>]: no existing merge applies, so (a, b) is added,
    giving [ab, c</w>], then (ab, c</w>). Appending never changes how "ab" tokenizes."""
    assert word_merges(["ab", "abc"]) == [("a", "b" + SUFFIX), ("a", "b"), ("ab", "c" + SUFFIX)]


@pytest.mark.parametrize("source", ["built", "shipped"])
def test_tokenizer_one_token_per_word_and_round_trip(source):
    from transformers import CLIPTokenizer

    tokenizer = build_tokenizer() if source == "built" else CLIPTokenizer.from_pretrained(TOY_CLIP)
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    captions = toy_prompts("heldin", 20) + toy_prompts("heldout", 20)
    for text in captions:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2 <= tokenizer.model_max_length
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(tokenizer("a zebra", add_special_tokens=False).input_ids) == 1 + len("zebra")  # spelt out, no <unk>


def test_shipped_tokenizers_match_the_clip():
    from transformers import CLIPModel, CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(TOY_CLIP)
    positions = CLIPModel.from_pretrained(TOY_CLIP).config.text_config.max_position_embeddings
    assert positions == reference.model_max_length
    for folder in (TOY_TEACHER / "tokenizer", TOY_FLOW_TEACHER / "tokenizer", TOY_FLOW_TEACHER / "tokenizer_2"):
        assert CLIPTokenizer.from_pretrained(folder).get_vocab() == reference.get_vocab()


def test_vae_scaling_factor_is_inverse_latent_std_on_fresh_renders():
    from diffusers import AutoencoderKL

    from pipelines.toy.vae_training import latent_std, render_pool

    vae = AutoencoderKL.from_pretrained(TOY_VAE)
    images, _ = render_pool("heldout", 256, seed=12345)
    ratio = vae.config.scaling_factor * latent_std(vae, images)
    assert abs(ratio - 1) < 0.10, ratio


def test_shipped_safetensors_under_30_mb_and_no_pickles():
    """Everything the package carries under pipelines/toy: the shipped models and the candidate teacher."""
    files = {p.resolve() for p in Path(TOY_DIR).rglob("*") if p.is_file()}
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    total = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    assert 0 < total < 30 * 2**20, total / 2**20


def test_toy_data_kind_builds():
    from trainers.data import DataConfig, build_dataset

    data = build_dataset(DataConfig(kind="toy", resolution=32, toy_split="heldout", toy_size=5, seed=3))
    item = data[4]
    assert len(data) == 5 and item["pixel_values"].shape == (3, 32, 32) and item["skipped"] == 0
    from pipelines.toy import HELDOUT_COMBINATIONS, parse_caption

    assert any((o.colour, o.shape) in HELDOUT_COMBINATIONS for o in parse_caption(item["prompt"]).objects)


def test_one_off_negatives_differ_in_exactly_one_attribute():
    import dataclasses

    from pipelines.toy.clip_training import ATTRIBUTES, one_off
    from pipelines.toy.world import is_heldout, sample_spec

    rng = np.random.default_rng(0)
    for _ in range(40):
        spec = sample_spec(rng)
        for kind in ATTRIBUTES:
            new = one_off(spec, rng, kind)
            if new is None:
                assert (kind, len(spec.objects)) in {("add", 2), ("drop", 1)} or kind == "add"
                continue
            assert not any(is_heldout(o) for o in new.objects)
            old_objects, new_objects = set(spec.objects), set(new.objects)
            if kind == "background":
                assert new.background != spec.background and old_objects == new_objects
            elif kind in ("add", "drop"):
                assert new.background == spec.background and len(old_objects ^ new_objects) == 1
            else:
                (a,), (b,) = old_objects - new_objects, new_objects - old_objects
                field = {"colour": "colour", "shape": "shape", "size": "size", "position": "position"}[kind]
                assert getattr(a, field) != getattr(b, field)
                assert dataclasses.replace(a, **{field: getattr(b, field)}) == b and new.background == spec.background


def test_psnr_by_hand():
    """x = 0, y = 0.2 everywhere: MSE 0.04, peak-to-peak 2, so PSNR = 10 log10(4 / 0.04) = 20 dB."""
    from pipelines.toy.vae_training import psnr

    assert psnr(torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.2)) == pytest.approx(20.0)


def test_build_script_smoke_end_to_end(tmp_path):
    """Every stage with tiny sizes into tmp_path; the shipped folders are left as they were."""
    stamps = shipped_stamps()
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_toy_world.py"), "--smoke",
                           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("vae", "clip", "teacher", "teacher_flow"):
        assert any((tmp_path / "out" / name).rglob("*.safetensors")), name
    report = json.loads((tmp_path / "work" / "build_report.json").read_text())
    assert {"vae", "clip", "teacher", "teacher_flow", "fid_floors", "total_seconds"} <= set(report)
    # the UNet teacher's stages chain: stage 2 starts from stage 1's export, under its own seed, and only the
    # last stage runs the recipe's decay
    stage1, stage2 = (yaml.safe_load((tmp_path / "work" / f"teacher_stage{k}_run" / "config.yaml").read_text())
                      for k in (1, 2))
    assert stage1["model"]["source"] == str(tmp_path / "work" / "teacher_init")
    assert stage2["model"]["source"] == str(tmp_path / "work" / "teacher_stage1_export")
    assert [(c["data"]["seed"], c["optim"]["schedule"], c["optim"]["decay_steps"]) for c in (stage1, stage2)] == \
        [(0, "constant", 0), (1, "linear", 4800)]
    flow2 = yaml.safe_load((tmp_path / "work" / "teacher_flow_stage2_run" / "config.yaml").read_text())
    assert flow2["model"]["source"] == str(tmp_path / "work" / "teacher_flow_stage1_export")
    assert stamps == shipped_stamps()


def test_unet_teacher_stages_replay_its_recipe():
    """The build's stages of the UNet teacher add up to its recipe's train.max_steps (6,489 + 8,009 + 6,268 +
    5,363 + 1,924 + 11,147 + 8,800 = 48,000), and the last stage holds the recipe's whole decay (8,800 > 4,800),
    so a rebuild trains what the recipe says, restarts included."""
    import build_toy_world

    recipe = yaml.safe_load((ROOT / "configs" / "toy" / "teacher_sft.yaml").read_text())
    stages = build_toy_world.FULL.unet_stages
    assert sum(s.steps for s in stages) == recipe["train"]["max_steps"] == 48000
    assert stages[-1].steps > recipe["optim"]["decay_steps"] == 4800
    assert all(s.overrides == build_toy_world.CONSTANT_RATE for s in stages[:-1]) and stages[-1].overrides == ()


def test_flow_teacher_stages_start_with_its_recipe():
    """The flow teacher's first stage is its recipe as written (4,000 steps, the recipe's cosine rate: no
    override), so the first shipped flow teacher is a stage of the current one; later stages hold the rate."""
    import build_toy_world

    recipe = yaml.safe_load((ROOT / "configs" / "toy" / "teacher_flow_sft.yaml").read_text())
    first, *rest = build_toy_world.FULL.flow_stages
    assert (first.steps, first.seed_offset, first.overrides) == (recipe["train"]["max_steps"], 0, ())
    assert rest and all(set(build_toy_world.CONSTANT_RATE) <= set(s.overrides) for s in rest)


def test_build_script_refuses_smoke_into_shipped_folders(capsys):
    import build_toy_world

    stamps = shipped_stamps()
    assert build_toy_world.main(["--smoke", "--out", str(TOY_DIR), "--stages", "vae"]) == 2
    assert "--smoke must not overwrite" in capsys.readouterr().err
    assert stamps == shipped_stamps()
