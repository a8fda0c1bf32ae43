"""Differentiable image preprocessing for reward models, written in torch.

Every reward model was trained on images that went through a PIL pipeline
(uint8 image -> bicubic resize -> crop or pad -> ToTensor -> normalise). To
let gradients reach generated images we redo that pipeline on float tensors:

* bicubic resize with ``antialias=True``: torch's antialiased kernel is the
  same separable Keys kernel (a = -0.5) with the same support widening that
  PIL uses when it shrinks an image, so the two agree up to PIL's uint8
  rounding (checked in tests/test_rewards.py);
* output sizes follow torchvision exactly (``int`` truncation for the long
  side of a shortest-side resize, ``round`` for HPS's longest-side resize);
* centre crop uses torchvision's ``round((H - h) / 2)`` offset;
* longest-side mode pads with black *before* normalisation, as HPS does.

Values are clamped to [0, 1] where the PIL path would clip to uint8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_unit_range(images: Tensor) -> Tensor:
    """Map images from [-1, 1] to [0, 1] in float32, clipping as a uint8 save would."""
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def bicubic_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """PIL-style antialiased bicubic resize of a B x C x H x W float tensor in [0, 1]."""
    height, width = x.shape[-2:]
    # PIL resamples horizontally, stores uint8 (clipping the cubic overshoot), then vertically;
    # doing the same two passes with a clamp between them follows it closely at hard edges.
    if width != size[1]:
        x = F.interpolate(x, size=(height, size[1]), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    if height != size[0]:
        x = F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
    return x


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output (h, w) of torchvision ``Resize(size)``: short side -> size, long side truncated."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def resize_shortest(x: Tensor, size: int) -> Tensor:
    """Resize so the shorter side equals ``size`` (torchvision ``Resize(int)``)."""
    return bicubic_resize(x, shortest_side_size(x.shape[-2], x.shape[-1], size))


def center_crop(x: Tensor, size: int) -> Tensor:
    """Centre crop to size x size with torchvision's rounding of the offset."""
    height, width = x.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"center_crop: image {height}x{width} is smaller than the crop {size}; resize first")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def resize_longest_and_pad(x: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Resize the longer side to ``size`` and pad to a square, image centred (HPS eval transform).

    HPS's own transform skips the pad when the long side already equals
    ``size``; we always return a square because the model needs one.
    """
    height, width = x.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    x = bicubic_resize(x, (new_h, new_w))
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Channel-wise (x - mean) / std."""
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


@dataclass(frozen=True)
class ImageTransform:
    """Images in [-1, 1] -> normalised model input, all in float32 torch.

    mode "shortest": resize the short side to ``size`` then centre crop (OpenAI
    CLIP, open_clip default, CLIPImageProcessor, ImageReward, aesthetic).
    mode "longest": resize the long side to ``size`` then zero-pad (HPSv2).
    """

    size: int = 224
    mode: str = "shortest"
    crop: int | None = None  # centre-crop size when it differs from the resize size (shortest mode)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if self.mode not in ("shortest", "longest"):
            raise ValueError(f"ImageTransform.mode must be 'shortest' or 'longest', got {self.mode!r}")

    def __call__(self, images: Tensor) -> Tensor:
        x = to_unit_range(images)
        if self.mode == "shortest":
            x = center_crop(resize_shortest(x, self.size), self.crop or self.size)
        else:
            x = resize_longest_and_pad(x, self.size)
        return normalize(x, self.mean, self.std)
