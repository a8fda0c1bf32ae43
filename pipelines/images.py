"""Image tensors <-> files: grids and PNGs (images are float [-1, 1], B x 3 x H x W)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] B x 3 x H x W -> uint8 B x H x W x 3, rounding as PNG saving would."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(images: torch.Tensor, nrow: int, pad: int = 2) -> Image.Image:
    """One PIL image with the batch laid out `nrow` per row."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    rows = (b + nrow - 1) // nrow
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y:y + h, x:x + w] = arr[i]
    return Image.fromarray(canvas)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, scale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = grid(images, max(1, nrow))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return path
