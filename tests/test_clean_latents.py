"""Cached latents (`data.kind: latent_cache`, scripts/cache_latents.py) train exactly as the images they encode.

For each method that reads images, two steps on a cache must give the same weights, bit for bit, as two
steps on the image folder itself with the encoder returning the cached latents: the
methods take x_0 from one place (`Method.clean_latents`), and the cached path draws nothing extra from the
step's generator. The encoder is made to fail in the cached run, so a method that still encodes is caught.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from image_folders import write_image_folder

TINY_RECIPES = {
    "sft": {},
    "lcd": {"lcd": {"num_ddim_timesteps": 10, "sample_steps": 2}},
    "scm": {"model": {"attention": "math"}, "scm": {"tangent_warmup_steps": 2}},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("clean_latents"))


def build_world(root: Path) -> tuple[Path, Path, Path]:
    """A tiny SD pipeline, four 16 px images with captions, and a cache of their encodings (posterior means)."""
    from pipelines.backbones import load_bundle
    from pipelines.tiny import save_tiny_pipeline
    from trainers.config import DataConfig
    from trainers.data import build_dataset
    from trainers.data_cache import cache_latents

    source = save_tiny_pipeline("sd", root / "pipe")
    images = write_image_folder(root / "images", caption="shape {i}")
    bundle = load_bundle(str(source))
    folder = build_dataset(DataConfig(kind="imagefolder", path=str(images), resolution=16))
    cache_latents(folder, lambda pixels: bundle.encode_images(pixels), str(root / "cache"), batch_size=2)
    return source, images, root / "cache"


def train_two_steps(tmp_path: Path, method: str, source: Path, data: dict,
                    extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Two steps through `trainers.run.run`; the tensors of the step-2 checkpoint."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from trainers.config import resolve
    from trainers.run import run

    tree = {"method": method, "output_dir": str(tmp_path), "model": {"source": str(source)},
            "data": {"resolution": 16, **data},
            "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1, "log_with": "none"},
            "optim": {"lr": 1.0e-3}, "export": {"enabled": False}}
    for key, value in (extra or {}).items():
        tree[key] = {**tree.get(key, {}), **value}
    cfg = resolve(tree, "<test>")
    AcceleratorState._reset_state(reset_partial_state=True)
    assert run(cfg, Accelerator(cpu=True)) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    step = tmp_path / "checkpoints" / "step-0000002"
    return {f"{f.stem}.{k}": v for f in sorted(step.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_cache_trains_like_images(tmp_path, monkeypatch, world, method: str, extra: dict) -> None:
    from pipelines.backbones import Bundle

    from trainers.config import DataConfig
    from trainers.data import build_dataset
    from trainers.data_cache import TensorCacheDataset

    source, images, cache = world
    # The image run's encoder returns the cached latent of each image (looked up by its pixels), so both runs
    # see the same x_0 bits: a batch encoded at another size may differ in the last bit, which Adam's first
    # step (about lr * sign(g)) would turn into visible weight differences.
    folder = build_dataset(DataConfig(kind="imagefolder", path=str(images), resolution=16))
    cached = TensorCacheDataset(str(cache))
    by_pixels = {folder[i]["pixel_values"].numpy().tobytes(): cached[i]["latents"] for i in range(len(folder))}
    monkeypatch.setattr(Bundle, "encode_images", lambda self, pixels, generator=None: torch.stack(
        [by_pixels[p.numpy().tobytes()] for p in pixels.cpu()]))
    from_images = train_two_steps(tmp_path / "images", method, source, {"kind": "imagefolder", "path": str(images)},
                                  extra)

    def no_encoder(*_, **__):
        raise AssertionError(f"{method} ran the VAE encoder although its latents were cached")

    monkeypatch.setattr(Bundle, "encode_images", no_encoder)
    from_cache = train_two_steps(tmp_path / "cache", method, source, {"kind": "latent_cache", "path": str(cache)},
                                 extra)
    assert from_images.keys() == from_cache.keys()
    trained = [k for k in from_images if k.startswith("model.")]
    assert trained, "no trained weights in the checkpoint"
    differ = [k for k in from_images if not torch.equal(from_images[k], from_cache[k])]
    assert not differ, f"{len(differ)} tensors differ between image and cache runs, e.g. {differ[:3]}"


@pytest.mark.parametrize("method", list(TINY_RECIPES))
def test_cached_latents_train_exactly_like_their_images(method, tmp_path, monkeypatch, world):
    assert_cache_trains_like_images(tmp_path, monkeypatch, world, method, TINY_RECIPES[method])


def test_a_cache_for_another_resolution_is_one_error_before_training(tmp_path, world):
    """Checked once for every method (in `Method.__init__`), not by each trainer: here LCD."""
    source, _, cache = world
    with pytest.raises(ValueError, match=r"cached latents are \[4, 4, 4\].*needs \[4, 8, 8\]"):
        train_two_steps(tmp_path, "lcd", source, {"kind": "latent_cache", "path": str(cache), "resolution": 32},
                        TINY_RECIPES["lcd"])
