"""Reward models: every real reward built from tiny random weights in its published format.

Nothing here downloads: open_clip models come from a tiny registered config,
transformers CLIPs from ``save_pretrained`` folders with hand-made tokenizers,
ImageReward from a checkpoint written with the *original* BLIP key names, the
aesthetic MLP from a ``.pth`` with the original ``layers.N`` keys.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

import rewards
from rewards import build_reward
from rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from rewards.weights import WeightsNotFoundError

WORDS = ["a", "red", "cat", "blue", "dog", "on", "the", "grass"]
PROMPTS = ["a red cat", "a blue dog on the grass"]


# ---------------------------------------------------------------- fixtures


def _photo(width: int = 640, height: int = 512) -> Image.Image:
    """A real-looking RGB image: smooth gradients, hard edges and fine stripes (aliasing bait)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([255 * x / width, 255 * y / height, 127 + 127 * np.sin(x / 17.0) * np.cos(y / 23.0)], -1)
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 40, 300, 260), fill=(230, 40, 30))
    draw.polygon([(400, 400), (600, 120), (620, 480)], fill=(20, 200, 60))
    for i in range(0, width, 6):  # 3 px stripes: without antialiasing a 2.3x shrink aliases badly
        draw.line((i, 300, i, 500), fill=(255, 255, 255), width=3)
    return image


def _to_model_input(image: Image.Image) -> torch.Tensor:
    """uint8 PIL -> 1 x 3 x H x W in [-1, 1], exactly the values a generator would hand us."""
    return T.functional.to_tensor(image).unsqueeze(0) * 2 - 1


def _images(batch: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def _clip_vocab() -> dict[str, int]:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in list("abcdefghijklmnopqrstuvwxyz") + [w + "</w>" for w in WORDS] + [c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz"]:
        vocab.setdefault(piece, len(vocab))
    return vocab


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel folder with tokenizer and CLIPImageProcessor config (PickScore format)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = _clip_vocab()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16,
        logit_scale_init_value=math.log(50.0),
    )
    folder = tmp_path_factory.mktemp("hf_clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # defaults: shortest edge 224, crop 224, OpenAI mean/std, bicubic
    return folder


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """Register a tiny open_clip architecture (real vocab size so the bundled tokenizer fits)."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "diffstill-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "diffstill-tiny-clip.json")
    return "diffstill-tiny-clip"


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory, tiny_open_clip):
    """HPS checkpoint format: a .pt holding {'state_dict': open_clip state dict}."""
    import open_clip

    torch.manual_seed(1)
    model = open_clip.create_model(tiny_open_clip, pretrained=None)
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": model.state_dict()}, folder / "HPS_v2.1_compressed.pt")
    torch.manual_seed(4)  # v2.0: same format, other weights
    torch.save({"state_dict": open_clip.create_model(tiny_open_clip, pretrained=None).state_dict()},
               folder / "HPS_v2_compressed.pt")
    return folder


@pytest.fixture(scope="module")
def open_clip_file(tmp_path_factory, tiny_open_clip):
    """An open_clip checkpoint as the hub stores it: a bare state dict in open_clip_pytorch_model.bin."""
    import open_clip

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("open_clip") / "open_clip_pytorch_model.bin"
    torch.save(open_clip.create_model(tiny_open_clip, pretrained=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def pickscore_split_dirs(tmp_path_factory, hf_clip_dir):
    """PickScore as published: the model folder holds no processor; the CLIP-H processor lives elsewhere."""
    import shutil

    model_only = tmp_path_factory.mktemp("pickscore_model")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_clip_dir / name, model_only)
    return model_only, hf_clip_dir


def _original_image_reward_state(width=32, depth=2, patch=32, image=224, hidden=32, layers=2, vocab=16, inter=64):
    """Random tensors under the ImageReward.pt key names (BLIP vit.py / med.py / the reward MLP)."""
    g = torch.Generator().manual_seed(2)
    s, v, t = {}, "blip.visual_encoder.", "blip.text_encoder."

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    s[v + "cls_token"], s[v + "pos_embed"] = r(1, 1, width), r(1, (image // patch) ** 2 + 1, width)
    s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"] = r(width, 3, patch, patch), r(width)
    for i in range(depth):
        b = f"{v}blocks.{i}."
        for name, shape in (("norm1", (width,)), ("norm2", (width,)), ("attn.qkv", (3 * width, width)),
                            ("attn.proj", (width, width)), ("mlp.fc1", (4 * width, width)), ("mlp.fc2", (width, 4 * width))):
            s[b + name + ".weight"], s[b + name + ".bias"] = r(*shape) + (1 if name.startswith("norm") else 0), r(shape[0])
    s[v + "norm.weight"], s[v + "norm.bias"] = 1 + r(width), r(width)
    s[t + "embeddings.word_embeddings.weight"], s[t + "embeddings.position_embeddings.weight"] = r(vocab, hidden), r(40, hidden)
    s[t + "embeddings.LayerNorm.weight"], s[t + "embeddings.LayerNorm.bias"] = 1 + r(hidden), r(hidden)
    s[t + "embeddings.position_ids"] = torch.arange(40).unsqueeze(0)
    for i in range(layers):
        b = f"{t}encoder.layer.{i}."
        for name, shape in (("attention.self.query", (hidden, hidden)), ("attention.self.key", (hidden, hidden)),
                            ("attention.self.value", (hidden, hidden)), ("attention.output.dense", (hidden, hidden)),
                            ("crossattention.self.query", (hidden, hidden)), ("crossattention.self.key", (hidden, width)),
                            ("crossattention.self.value", (hidden, width)), ("crossattention.output.dense", (hidden, hidden)),
                            ("intermediate.dense", (inter, hidden)), ("output.dense", (hidden, inter))):
            s[b + name + ".weight"], s[b + name + ".bias"] = r(*shape), r(shape[0])
        for ln in ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm"):
            s[b + ln + ".weight"], s[b + ln + ".bias"] = 1 + r(hidden), r(hidden)
    s["blip.vision_proj.weight"], s["blip.vision_proj.bias"] = r(256, width), r(256)
    s["blip.text_proj.weight"], s["blip.text_proj.bias"] = r(256, hidden), r(256)
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((1024, hidden), (128, 1024), (64, 128), (16, 64), (1, 16))):
        s[f"mlp.layers.{i}.weight"], s[f"mlp.layers.{i}.bias"] = r(o, n), r(o)
    return s


@pytest.fixture(scope="module")
def image_reward_dirs(tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("image_reward")
    torch.save(_original_image_reward_state(), folder / "ImageReward.pt")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS  # 13 + [DEC], [ENC] = 15 < vocab 16
    BertTokenizer(vocab={w: i for i, w in enumerate(tokens)}).save_pretrained(folder / "bert")
    return folder, folder / "bert"


@pytest.fixture(scope="module")
def aesthetic_file(tmp_path_factory):
    """The aesthetic MLP's own .pth format: a plain state dict with keys layers.{0,2,4,6,7}."""
    from rewards.clip_rewards import AestheticMLP

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(in_features=16).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def built(hf_clip_dir, tiny_open_clip, hps_dir, image_reward_dirs, aesthetic_file, open_clip_file,
          pickscore_split_dirs):
    ir_dir, bert_dir = image_reward_dirs
    pick_model, pick_processor = pickscore_split_dirs
    return {
        "clip_score/open_clip": build_reward("clip_score", backend="open_clip", arch=tiny_open_clip,
                                             path=hps_dir / "HPS_v2.1_compressed.pt"),
        "clip_score/transformers": build_reward("clip_score", backend="transformers", path=hf_clip_dir),
        "pickscore": build_reward("pickscore", path=hf_clip_dir),
        "pickscore/processor_path": build_reward("pickscore", path=pick_model, processor_path=pick_processor),
        "hpsv2": build_reward("hpsv2", path=hps_dir, arch=tiny_open_clip),
        "hpsv2.1": build_reward("hpsv2.1", path=hps_dir, arch=tiny_open_clip),
        "image_reward": build_reward("image_reward", path=ir_dir, tokenizer_path=bert_dir),
        "laion_aesthetic": build_reward("laion_aesthetic", path=aesthetic_file, clip_path=hf_clip_dir),
        "laion_aesthetic/open_clip": build_reward("laion_aesthetic", path=aesthetic_file, clip_backend="open_clip",
                                                  clip_path=open_clip_file, clip_arch=tiny_open_clip),
        "toy_clip": build_reward("toy_clip", path=hf_clip_dir),
    }


# ---------------------------------------------------------------- preprocessing vs PIL
# Tolerance: the PIL paths round to uint8 twice (after the horizontal pass and at
# the end) while we stay in float, so per-pixel differences up to ~1/255 come
# from rounding alone (measured: 1.03/255 max, 0.21/255 mean). 1.5/255 max and
# 0.4/255 mean leave slack for other PIL builds yet catch any wrong size,
# offset, kernel or a missing antialias (that one is 120/255 max on the stripes).
MAX_ERR, MEAN_ERR = 1.5 / 255, 0.4 / 255


def _pixel_error(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    diff = (ours - reference).abs() * std  # back to [0, 1] pixel units
    return diff.max().item(), diff.mean().item()


def test_shortest_side_transform_matches_torchvision_pil_path():
    """OpenAI CLIP / open_clip / ImageReward / aesthetic: Resize(224, bicubic) + CenterCrop + Normalize on PIL."""
    image = _photo()
    reference = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])(image).unsqueeze(0)
    ours = ImageTransform(224, "shortest")(_to_model_input(image))
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    worst, mean = _pixel_error(ours, reference)
    assert worst < MAX_ERR and mean < MEAN_ERR, (worst * 255, mean * 255)
    aliased = torch.nn.functional.interpolate((_to_model_input(image) + 1) / 2, size=(224, 280), mode="bicubic")
    assert (aliased[..., 28:252] - (reference * torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
                                    + torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1))).abs().max() > 20 / 255


def test_longest_side_pad_transform_matches_open_clip_hps_path():
    """HPS eval transform: long side to 224, black pad, centred (open_clip resize_mode='longest', fill 0)."""
    import open_clip

    image = _photo()
    reference = open_clip.image_transform(224, is_train=False, resize_mode="longest", fill_color=0)(image).unsqueeze(0)
    ours = ImageTransform(224, "longest")(_to_model_input(image))
    worst, mean = _pixel_error(ours, reference)
    assert worst < MAX_ERR and mean < MEAN_ERR, (worst * 255, mean * 255)


def test_processor_transform_matches_clip_image_processor(hf_clip_dir):
    """PickScore path: the folder's CLIPImageProcessor config drives our torch transform."""
    import transformers
    from rewards.clip_towers import transform_from_processor_config

    processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    processor = processor_class.from_pretrained(hf_clip_dir)
    image = _photo()
    reference = processor(images=image, return_tensors="pt")["pixel_values"]
    ours = transform_from_processor_config(hf_clip_dir)(_to_model_input(image))
    worst, mean = _pixel_error(ours, reference)
    assert worst < MAX_ERR and mean < MEAN_ERR, (worst * 255, mean * 255)


# ---------------------------------------------------------------- scores against reference computations


def test_hps_equals_100_cos_of_reference_path(built, hps_dir, tiny_open_clip):
    """HPS = 100 * cos(open_clip image emb of the PIL-preprocessed image, text emb)."""
    import open_clip

    model = open_clip.create_model(tiny_open_clip, pretrained=None)
    model.load_state_dict(torch.load(hps_dir / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"])
    model.eval()
    image = _photo()
    pixels = open_clip.image_transform(224, is_train=False, resize_mode="longest", fill_color=0)(image).unsqueeze(0)
    with torch.no_grad():
        i = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        t = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer(tiny_open_clip)(["a red cat"])), dim=-1)
        expected = 100 * (i * t).sum(-1)
        got = built["hpsv2.1"](_to_model_input(image), ["a red cat"])
    assert torch.allclose(got, expected, atol=0.05), (got, expected)


def test_pickscore_uses_exp_logit_scale(built, hf_clip_dir):
    """PickScore = exp(logit_scale) * cos with logit_scale = log 50 in the tiny model, so 50 * cos."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model, tok = CLIPModel.from_pretrained(hf_clip_dir).eval(), CLIPTokenizer.from_pretrained(hf_clip_dir)
    image = _photo()
    pixels = CLIPImageProcessor.from_pretrained(hf_clip_dir)(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        i = model.get_image_features(pixel_values=pixels).pooler_output
        t = model.get_text_features(**tok(["a red cat"], return_tensors="pt")).pooler_output
        cos = torch.nn.functional.cosine_similarity(i, t)
        got = built["pickscore"](_to_model_input(image), ["a red cat"])
        clip = built["clip_score/transformers"](_to_model_input(image), ["a red cat"])
    assert torch.allclose(got, 50 * cos, atol=0.03), (got, 50 * cos)
    assert torch.allclose(clip, 100 * cos, atol=0.06)


def test_image_reward_is_standardised_raw_score(built):
    """image_reward = (raw - 0.16717362830052426) / 1.0333394966054072, raw from the inner model."""
    reward = built["image_reward"]
    images = _images(size=224)
    with torch.no_grad():
        tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        raw = reward.model(reward.transform(images), tokens["input_ids"], tokens["attention_mask"])
        got = reward(images, PROMPTS)
    assert torch.allclose(got, (raw - 0.16717362830052426) / 1.0333394966054072, atol=1e-5)
    assert tokens["input_ids"].shape[1] == 35


def test_image_reward_checkpoint_keys_all_used(image_reward_dirs):
    """Every original key maps (strict load) and nothing but the contrastive heads/position ids is dropped."""
    from rewards.image_reward import convert_state_dict

    original = _original_image_reward_state()
    converted = convert_state_dict(original)
    dropped = set(original) - {k for k in original if not any(s in k for s in ("vision_proj", "text_proj", "position_ids"))}
    assert len(converted) == len(original) - len(dropped) and len(dropped) == 5
    assert "vision.encoder.layers.1.self_attn.projection.weight" in converted
    with pytest.raises(ValueError, match="unexpected checkpoint key"):
        convert_state_dict({"blip.visual_encoder.unknown": torch.zeros(1)})


# ---------------------------------------------------------------- interface: shapes, gradients, dtypes


@pytest.mark.parametrize("key", ["clip_score/open_clip", "clip_score/transformers", "pickscore",
                                 "pickscore/processor_path", "hpsv2", "hpsv2.1", "image_reward", "laion_aesthetic",
                                 "laion_aesthetic/open_clip", "toy_clip"])
def test_shape_and_gradient_reach_images(built, key):
    reward = built[key]
    assert reward.differentiable and isinstance(reward, rewards.Reward) and reward.scale
    images = _images(size=72).requires_grad_(True)  # not 224: the resize is part of the graph
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(p.grad is None for p in reward.parameters())  # frozen


def test_builds_read_the_files_they_are_given(built):
    """Each variant scores with its own weights: HPS v2.0 and v2.1 are different files (different scores on
    the same input); PickScore with a separate processor folder equals PickScore whose folder holds one."""
    images = _images()
    with torch.no_grad():
        assert not torch.allclose(built["hpsv2"](images, PROMPTS), built["hpsv2.1"](images, PROMPTS))
        assert torch.equal(built["pickscore/processor_path"](images, PROMPTS), built["pickscore"](images, PROMPTS))


def test_clip_folder_without_processor_is_a_named_error(pickscore_split_dirs):
    model_only, _ = pickscore_split_dirs
    with pytest.raises(rewards.WeightsNotFoundError, match="no preprocessor_config.json or processor_config.json"):
        build_reward("toy_clip", path=model_only)


def test_scores_depend_on_image_and_prompt(built):
    reward = built["hpsv2.1"]
    with torch.no_grad():
        a = reward(_images(seed=0), PROMPTS)
        b = reward(_images(seed=1), PROMPTS)
        c = reward(_images(seed=0), PROMPTS[::-1])
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_any_input_dtype_and_reward_dtype(built, hf_clip_dir):
    images = _images()
    with torch.no_grad():
        full = built["toy_clip"](images, PROMPTS)
        half_input = built["toy_clip"](images.to(torch.bfloat16), PROMPTS)
        bf16 = build_reward("toy_clip", path=hf_clip_dir, dtype=torch.bfloat16)(images.double(), PROMPTS)
    assert half_input.dtype == bf16.dtype == torch.float32
    assert torch.allclose(full, half_input, atol=1.0) and torch.allclose(full, bf16, atol=3.0)


def test_bad_inputs_raise_one_line_errors(built):
    reward = built["toy_clip"]
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        reward(torch.zeros(2, 64, 64), PROMPTS)
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(_images(), PROMPTS[:1])


# ---------------------------------------------------------------- weighted, toy, registry, weights


def test_weighted_equals_weighted_sum(built, hf_clip_dir, hps_dir, tiny_open_clip):
    """R = 2 * toy_clip - 0.5 * hpsv2.1, term by term."""
    weighted = build_reward("weighted", terms=[
        {"name": "toy_clip", "weight": 2.0, "path": hf_clip_dir},
        {"name": "hpsv2.1", "weight": -0.5, "path": hps_dir, "arch": tiny_open_clip},
    ])
    images = _images()
    with torch.no_grad():
        expected = 2.0 * built["toy_clip"](images, PROMPTS) - 0.5 * built["hpsv2.1"](images, PROMPTS)
        got = weighted(images, PROMPTS)
    assert weighted.differentiable and torch.allclose(got, expected, atol=1e-4)
    mixed = build_reward("weighted", terms=[{"reward": built["toy_clip"], "weight": 1.0},
                                            {"name": "toy_attributes", "weight": 3.0}])
    assert not mixed.differentiable


def test_toy_attributes_passes_its_own_caption_only():
    from pipelines.toy import world

    scene = world.sample_scene(np.random.default_rng(0))
    other = next(s for s in (world.sample_scene(np.random.default_rng(i)) for i in range(1, 50))
                 if world.caption(s) != world.caption(scene))
    image = torch.from_numpy(world.render(scene)).permute(2, 0, 1).float().unsqueeze(0) / 127.5 - 1
    reward = build_reward("toy_attributes")
    scores = reward(image.repeat(2, 1, 1, 1), [world.caption(scene), world.caption(other)])
    assert not reward.differentiable and scores.tolist() == [1.0, 0.0]
    graded = build_reward("toy_attribute_score")(image.repeat(2, 1, 1, 1), [world.caption(scene), world.caption(other)])
    assert graded[0] == 1.0 and 0.0 <= graded[1] < 1.0


def test_shipped_toy_clip_loads_by_default_and_prefers_true_captions():
    """The shipped folder keeps its image settings in a whole-processor processor_config.json (what
    transformers 5 writes), not preprocessor_config.json: the default build must still read them."""
    from pipelines.toy import TOY_CLIP, ToyDataset

    assert (TOY_CLIP / "processor_config.json").is_file()
    data = ToyDataset(split="train", size=8, seed=0, resolution=32)
    images = torch.stack([data[i]["pixel_values"] for i in range(8)])
    prompts = [data[i]["prompt"] for i in range(8)]
    reward = build_reward("toy_clip")
    true, shifted = reward(images, prompts), reward(images, prompts[1:] + prompts[:1])
    assert reward.differentiable and (true > shifted).float().mean() >= 0.75


def test_registry_names_and_option_errors():
    assert set(rewards.REWARDS) == {"clip_score", "pickscore", "hpsv2", "hpsv2.1", "image_reward",
                                    "laion_aesthetic", "toy_clip", "toy_attributes", "toy_attribute_score",
                                    "toy_attribute_net", "weighted"}
    with pytest.raises(KeyError, match="unknown reward 'hps'"):
        build_reward("hps")
    with pytest.raises(TypeError, match="unknown option"):
        build_reward("hpsv2", checkpoint="x")


def test_missing_weights_error_names_repo_file_and_place(monkeypatch, tmp_path):
    import rewards.weights as weights

    monkeypatch.setattr(weights, "_hf_cached_file", lambda repo_id, filename: None)
    monkeypatch.setattr(weights, "_hf_cached_folder", lambda repo_id: None)
    monkeypatch.delenv(weights.ENV_DIR, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=r"HPS_v2\.1_compressed\.pt.*xswu/HPSv2.*DIFFSTILL_REWARD_WEIGHTS"):
        build_reward("hpsv2.1")
    with pytest.raises(WeightsNotFoundError, match="yuvalkirstain/PickScore_v1"):
        build_reward("pickscore")
    with pytest.raises(WeightsNotFoundError, match="no file at"):
        build_reward("image_reward", path=tmp_path / "nowhere")


def test_weights_found_through_env_folder(monkeypatch, hps_dir, tiny_open_clip):
    import rewards.weights as weights

    monkeypatch.setattr(weights, "_hf_cached_file", lambda repo_id, filename: None)
    monkeypatch.setenv(weights.ENV_DIR, str(hps_dir))
    assert build_reward("hpsv2.1", arch=tiny_open_clip).name == "hpsv2.1"
