"""Tiny image folders in the `imagefolder` layout (PNGs plus metadata.jsonl), shared by the trainer tests."""
import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(folder: Path, n: int = 4, size: int = 16, caption: str = "picture {i}", seed: int = 0) -> Path:
    """n random RGB images of size x size, image i captioned caption.format(i=i), pixels from `seed`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "text": caption.format(i=i)}) + "\n")
    return folder
