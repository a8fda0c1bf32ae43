"""Feature extractors for FID, diversity and CLIP-based metrics.

One signature: ``extractor(images) -> Tensor[B, D]`` with ``images`` float in [-1, 1], Bx3xHxW, plus
``.name``, ``.resolution`` and ``.resize`` (the resize policy, written into cached FID statistics so that
statistics made under another protocol are never mixed with ours).

- Inception-v3 pool features (2048-d) from torch-fidelity's port of the TF 2015-12-05 graph. Images are
  first quantised to uint8 exactly as saving a PNG would (``round(clamp((x + 1) / 2, 0, 1) * 255)``), then
  handed to the network, which resizes to 299x299 *inside* the network with torch-fidelity's
  TF1.x-compatible bilinear interpolation (align_corners=False, no antialiasing). This is torch-fidelity's
  own FID protocol, and torchmetrics' ``FrechetInceptionDistance(antialias=False)``; it is NOT clean-fid
  (PIL bicubic) nor torchmetrics' default (antialiased bilinear). Weights are never downloaded.
- Any CLIP image tower (transformers ``CLIPModel`` / ``CLIPVisionModelWithProjection``, or an open_clip
  model): [-1, 1] -> [0, 1], bicubic (antialiased) resize of the short side to the model's image size,
  centre crop, CLIP mean/std, projected image embedding. This is what runs offline on toy models.
- ``module_extractor`` wraps any callable module.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity v0.2.0 release asset name
INCEPTION_RESIZE = "uint8-png-quantise;torch-fidelity-tf1-bilinear-299-in-network"


class Extractor:
    """A named feature function: ``extractor(images[-1,1] Bx3xHxW) -> Tensor[B, D]`` (float32, no grad)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str, resolution: int, resize: str,
                 device: torch.device | str = "cpu"):
        self.fn, self.name, self.resolution, self.resize = fn, name, resolution, resize
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images Bx3xHxW in [-1, 1], got shape {tuple(images.shape)}")
        return self.fn(images.to(self.device)).float().flatten(1)

    def __repr__(self) -> str:
        return f"Extractor(name={self.name!r}, resolution={self.resolution}, resize={self.resize!r})"


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 [0, 255], the same rounding as diffusers' PIL/PNG export."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def clip_preprocess(images: Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> Tensor:
    """[-1, 1] -> CLIP pixel values: bicubic short-side resize to ``size``, centre crop, mean/std."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        hs, ws = max(size, round(h * s)), max(size, round(w * s))
        # antialias: PIL's bicubic (used by CLIP's own preprocessing) filters when downsampling
        x = F.interpolate(x, size=(hs, ws), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (hs - size) // 2, (ws - size) // 2
        x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s_ = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s_


def embedding(out) -> Tensor:
    """Projected embedding from a tensor or a transformers output (v5 returns ``BaseModelOutputWithPooling``)."""
    if isinstance(out, Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"cannot find an embedding in {type(out).__name__}; expected a tensor or pooler_output")


def is_open_clip(model) -> bool:
    return hasattr(model, "encode_image") and hasattr(model, "encode_text")


def clip_image_spec(model) -> tuple[int, tuple, tuple]:
    """(image_size, mean, std) of a transformers or open_clip CLIP model."""
    if is_open_clip(model):
        import open_clip
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", model.visual.image_size)
        size = size if isinstance(size, int) else size[0]
        return size, tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    config = getattr(model.config, "vision_config", model.config)
    return config.image_size, CLIP_MEAN, CLIP_STD


def clip_image_embeds(model, images: Tensor) -> Tensor:
    """Unnormalised projected image embeddings of ``images`` in [-1, 1] for any supported CLIP model."""
    size, mean, std = clip_image_spec(model)
    pixels = clip_preprocess(images, size, mean, std).to(next(model.parameters()).dtype)
    if is_open_clip(model):
        return model.encode_image(pixels)
    if hasattr(model, "get_image_features"):
        return embedding(model.get_image_features(pixel_values=pixels))
    return embedding(model(pixel_values=pixels))  # CLIPVisionModelWithProjection -> image_embeds


def clip_extractor(model, name: str | None = None) -> Extractor:
    """Extractor on a CLIP image tower; features are the projected (unnormalised) image embeddings."""
    model.requires_grad_(False).eval()
    size, _, _ = clip_image_spec(model)
    name = name or f"clip:{getattr(model, 'name_or_path', '') or type(model).__name__}"
    device = next(model.parameters()).device
    return Extractor(lambda x: clip_image_embeds(model, x), name, size,
                     f"clip-bicubic-antialias-shortside-{size}-centercrop", device)


def module_extractor(module: Callable[[Tensor], Tensor], name: str, resolution: int,
                     preprocess: Callable[[Tensor], Tensor] | None = None, resize: str = "module-defined",
                     device: torch.device | str = "cpu") -> Extractor:
    """Wrap any callable (e.g. a DINO backbone) with an optional preprocessing of [-1, 1] images."""
    fn = module if preprocess is None else (lambda x: module(preprocess(x)))
    return Extractor(fn, name, resolution, resize, device)


def inception_weights_path(weights: str | os.PathLike | None = None) -> Path:
    """Resolve the torch-fidelity Inception weights: a file, a folder holding it, or the torch hub cache."""
    folder = Path(torch.hub.get_dir()) / "checkpoints" if weights is None else Path(weights)
    path = folder / INCEPTION_FILE if folder.is_dir() or weights is None else folder
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception-v3 FID weights not found: put '{INCEPTION_FILE}' (torch-fidelity release v0.2.0) "
            f"in '{path.parent}' or pass weights=<path to it>; nothing is downloaded")
    return path


@contextlib.contextmanager
def weights_only_load():
    """Force ``torch.load`` to the tensor-only unpickler while third-party constructors read .pth files."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def inception_extractor(weights: str | os.PathLike | None = None,
                        device: torch.device | str = "cpu") -> Extractor:
    """2048-d Inception-v3 pool features (torch-fidelity weights, TF1.x bilinear resize to 299 in-network)."""
    path = inception_weights_path(weights)  # checked first: with an explicit path the constructor never downloads
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    with weights_only_load():
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    net = net.to(device).requires_grad_(False).eval()
    return Extractor(lambda x: net(to_uint8(x))[0], "inception-v3-compat-2048", 299, INCEPTION_RESIZE, device)
