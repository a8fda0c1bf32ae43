"""Datasets for training: image+caption, prompt-only, and cached latents/embeddings.

Sources: an image folder with `metadata.jsonl` (the HF imagefolder layout), a
`datasets` dataset saved with `save_to_disk`, or webdataset tar shards. All are
map-style, so a run resumes at the exact batch it stopped at
(`trainers/index_stream.py` decides which indices each rank reads).

Bad data never ends a long run: an unreadable or missing image is skipped (the
next index is tried) and counted in the item's "skipped" field; only a long run
of consecutive failures is an error. Structural problems (no records, missing
caption column, no `file_name`) are caught when the dataset is built, before
any model loads.

Webdataset shards are indexed once (member offsets per shard, the same
key-grouping rule as the `webdataset` package) and read by seek, without that
package: its readers are iterable-only, which would make resume approximate.
Crop and flip depend on (seed, index) only, so an image gets the same
augmentation every epoch; that is the price of worker- and resume-independence.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from trainers.data_cache import TensorCacheDataset

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# What a broken record can raise while being read or decoded.
READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, KeyError, Image.DecompressionBombError)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes (unlike hash())."""
    digest = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                    generator: torch.Generator) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square, maybe flip; float32 [3,H,W] in [-1,1]."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left = int(torch.randint(new_w - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(new_h - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.float() / 127.5 - 1.0
    if random_flip and float(torch.rand((), generator=generator)) < 0.5:
        x = x.flip(-1)
    return x


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Base class: subclasses give `__len__`, `source` and `read(i) -> (PIL image, caption)`."""

    source: str = "dataset"

    def __init__(self, resolution: int = 512, center_crop: bool = True, random_flip: bool = False,
                 seed: int = 0, max_consecutive_failures: int = 100):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.max_consecutive_failures = seed, max_consecutive_failures

    def read(self, i: int) -> tuple[Image.Image, str]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} records in {self.source}")
        for skipped in range(min(self.max_consecutive_failures + 1, n)):
            j = (index + skipped) % n
            try:
                image, caption = self.read(j)
                # Augmentation depends only on (seed, index): resumable and worker-independent.
                g = torch.Generator().manual_seed(mix_seed(self.seed, j))
                x = image_to_tensor(image, self.resolution, self.center_crop, self.random_flip, g)
            except READ_ERRORS:
                continue
            return {"pixel_values": x, "prompt": caption, "skipped": skipped, "index": j}
        raise RuntimeError(f"{min(self.max_consecutive_failures + 1, n)} consecutive unreadable records from "
                           f"index {index} in {self.source}; check the data or raise data.max_consecutive_failures")


def _open_image(data: bytes | str) -> Image.Image:
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()  # decode now so a truncated file fails here, inside the skip guard
    return image


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no} is not valid JSON ({e.msg}); fix or remove that line") from None
    if not rows:
        raise ValueError(f"{path} has no records; add one JSON object per line")
    return rows


def _require_column(rows: list[dict], column: str, path: str, option: str) -> None:
    for line_no, row in enumerate(rows, 1):
        if column not in row:
            raise ValueError(f"{path} record {line_no} has no column '{column}' (has {sorted(row)}); "
                             f"add it or set {option}")


class ImageFolderDataset(ImageCaptionDataset):
    """A folder holding images and `metadata.jsonl` lines {"file_name": ..., "<caption_column>": ...}."""

    def __init__(self, root: str, caption_column: str = "text", **kwargs):
        super().__init__(**kwargs)
        meta = os.path.join(root, "metadata.jsonl")
        if not os.path.isfile(meta):
            raise FileNotFoundError(f"{meta} not found; an image folder needs one line per image like "
                                    '{"file_name": "0001.png", "text": "a caption"}')
        self.rows, self.root, self.caption_column, self.source = read_jsonl(meta), root, caption_column, meta
        _require_column(self.rows, "file_name", meta, "file_name (the image path relative to the folder)")
        _require_column(self.rows, caption_column, meta, "data.caption_column")

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> tuple[Image.Image, str]:
        row = self.rows[i]
        return _open_image(os.path.join(self.root, row["file_name"])), str(row[self.caption_column])


class HFDiskDataset(ImageCaptionDataset):
    """A `datasets.Dataset` written by `save_to_disk` (a DatasetDict needs `split`)."""

    def __init__(self, path: str, image_column: str = "image", caption_column: str = "text",
                 split: str = "train", **kwargs):
        super().__init__(**kwargs)
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {sorted(ds)}, not '{split}'; set data.split")
            ds = ds[split]
        for column, option in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
            if column not in ds.column_names:
                raise ValueError(f"{path} has no column '{column}' (has {ds.column_names}); set {option}")
        if len(ds) == 0:
            raise ValueError(f"{path} has no records; point data.path at a non-empty dataset")
        if isinstance(ds.features[image_column], datasets.Image):
            # Decode ourselves so a corrupt image is skipped instead of raising inside `datasets`.
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.image_column, self.caption_column, self.source = ds, image_column, caption_column, path

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, i: int) -> tuple[Image.Image, str]:
        row = self.ds[i]
        image = row[self.image_column]
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if not isinstance(image, Image.Image):
            image = _open_image(image)
        return image, str(row[self.caption_column])


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> three names; `{x,y}` lists too; nested groups expand left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        options = [str(k).zfill(len(lo)) for k in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [name for opt in options for name in expand_braces(head + opt + tail)]


def _tar_index(shard: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {extension: (data offset, size)} for one shard (webdataset key = path up to the first dot)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        tar = tarfile.open(shard, "r:")
    except tarfile.ReadError:
        raise ValueError(f"{shard} is not an uncompressed tar; records are read by offset, "
                         "so re-pack compressed shards as plain .tar") from None
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, base = os.path.split(member.name)
            if "." not in base:
                continue
            key, ext = base.split(".", 1)
            samples.setdefault(os.path.join(directory, key), {})[ext.lower()] = (member.offset_data, member.size)
    return samples


class WebDatasetShards(ImageCaptionDataset):
    """Tar shards in webdataset layout, read by offset so any record is one seek away (exact resume)."""

    def __init__(self, pattern: str, caption_column: str = "text", **kwargs):
        super().__init__(**kwargs)
        self.shards = sorted({p for name in expand_braces(pattern) for p in glob.glob(name)})
        if not self.shards:
            raise FileNotFoundError(f"no tar shards match '{pattern}'; set data.path to a glob or brace pattern")
        self.records: list[tuple[int, tuple[str, int, int], tuple[str, int, int]]] = []
        for s, shard in enumerate(self.shards):
            for members in _tar_index(shard).values():
                image_ext = next((e for e in IMAGE_EXTS if e in members), None)
                text_ext = next((e for e in ("txt", "json") if e in members), None)
                if image_ext and text_ext:
                    self.records.append((s, (image_ext, *members[image_ext]), (text_ext, *members[text_ext])))
        if not self.records:
            raise ValueError(f"no record in {len(self.shards)} shard(s) matching '{pattern}' has both an image "
                             f"({'/'.join(IMAGE_EXTS)}) and a caption (txt/json)")
        self.caption_column, self.source = caption_column, pattern
        first_json = next((r for r in self.records if r[2][0] == "json"), None)
        if first_json and caption_column not in json.loads(self._bytes(first_json[0], *first_json[2][1:])):
            raise ValueError(f"the .json captions in '{pattern}' have no key '{caption_column}'; "
                             "set data.caption_column")

    def __len__(self) -> int:
        return len(self.records)

    def _bytes(self, shard: int, offset: int, size: int) -> bytes:
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def read(self, i: int) -> tuple[Image.Image, str]:
        s, (_, *image_at), (text_ext, *text_at) = self.records[i]
        text = self._bytes(s, *text_at).decode("utf-8")
        caption = text.strip() if text_ext == "txt" else json.loads(text)[self.caption_column]
        return _open_image(self._bytes(s, *image_at)), str(caption)


class PromptDataset(torch.utils.data.Dataset):
    """Prompts only: a .txt file (one per line, blanks ignored) or a .jsonl with a prompt column."""

    def __init__(self, path: str, prompt_column: str = "prompt"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"prompt file {path} not found; set data.path to a .txt or .jsonl file")
        if path.endswith(".jsonl"):
            rows = read_jsonl(path)
            _require_column(rows, prompt_column, path, "data.prompt_column")
            self.prompts = [str(r[prompt_column]) for r in rows]
        else:
            with open(path, encoding="utf-8") as f:
                self.prompts = [line.strip() for line in f if line.strip()]
            if not self.prompts:
                raise ValueError(f"{path} has no prompts; write one prompt per line")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict:
        return {"prompt": self.prompts[index], "skipped": 0, "index": index}


@dataclass
class DataConfig:
    kind: str = field(default="imagefolder", metadata={"help": "imagefolder | hf_disk | webdataset | prompts | "
                                                       "latent_cache | text_cache | toy"})
    path: str = field(default="", metadata={"help": "folder, saved dataset, shard pattern ({000..009}/glob) or "
                                             "prompt file (.txt/.jsonl)"})
    image_column: str = field(default="image", metadata={"help": "image column of a hf_disk dataset"})
    caption_column: str = field(default="text", metadata={"help": "caption column (metadata.jsonl, hf_disk, "
                                                            "webdataset .json)"})
    prompt_column: str = field(default="prompt", metadata={"help": "prompt column of a .jsonl prompt file"})
    split: str = field(default="train", metadata={"help": "split to use when hf_disk holds a DatasetDict"})
    resolution: int = field(default=512, metadata={"help": "square training size in pixels"})
    center_crop: bool = field(default=True, metadata={"help": "center crop (else a random crop seeded by index)"})
    random_flip: bool = field(default=False, metadata={"help": "horizontal flip with p=0.5, seeded by index"})
    seed: int = field(default=0, metadata={"help": "seed of crops, flips and the sample order"})
    max_consecutive_failures: int = field(default=100, metadata={"help": "unreadable records skipped in a row "
                                                                 "before the run stops"})
    flip_labels: float = field(default=0.0, metadata={"help": "preference kinds: fraction of pairs swapped (KTO: "
                                                       "labels negated), a fixed draw seeded by data.seed; for "
                                                       "label-noise studies"})
    toy_split: str = field(default="train", metadata={"help": "kind toy: 'train' (held-out colour-shape "
                                                      "combinations never appear) or 'heldout'"})
    toy_size: int = field(default=100_000, metadata={"help": "kind toy: number of distinct procedural scenes "
                                                     "(item i depends only on seed, split and i)"})

    def __post_init__(self):
        if self.kind not in BUILDERS:
            raise ValueError(f"data.kind '{self.kind}' is unknown; choose one of {sorted(BUILDERS)}")
        if self.toy_split not in ("train", "heldout") or self.toy_size < 1:
            raise ValueError(f"data.toy_split must be 'train' or 'heldout' and data.toy_size >= 1; got "
                             f"'{self.toy_split}' and {self.toy_size}")
        if not 0.0 <= self.flip_labels <= 1.0:
            raise ValueError(f"data.flip_labels must be a fraction in [0, 1]; got {self.flip_labels}")
        if self.flip_labels and self.kind not in LABELLED_DATA_KINDS:
            raise ValueError(f"data.flip_labels applies to preference data ({', '.join(sorted(LABELLED_DATA_KINDS))}),"
                             f" not data.kind '{self.kind}'; remove it")
        if self.resolution <= 0 or self.max_consecutive_failures < 0:
            raise ValueError(f"data.resolution must be > 0 and data.max_consecutive_failures >= 0; got "
                             f"{self.resolution} and {self.max_consecutive_failures}")


def _image_kwargs(cfg: DataConfig) -> dict:
    return dict(resolution=cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                seed=cfg.seed, max_consecutive_failures=cfg.max_consecutive_failures)



def _toy(cfg: DataConfig) -> torch.utils.data.Dataset:
    from pipelines.toy.world import ToyDataset  # the toy world is only imported when a recipe asks for it

    return ToyDataset(cfg.toy_split, cfg.toy_size, cfg.seed, cfg.resolution)


# Kinds whose items carry a preference or a label that data.flip_labels may corrupt (filled by the modules
# that register them, as BUILDERS is).
LABELLED_DATA_KINDS: set[str] = set()

# Registry keyed by `data.kind`.
BUILDERS: dict[str, Callable[[DataConfig], torch.utils.data.Dataset]] = {
    "imagefolder": lambda c: ImageFolderDataset(c.path, c.caption_column, **_image_kwargs(c)),
    "hf_disk": lambda c: HFDiskDataset(c.path, c.image_column, c.caption_column, c.split, **_image_kwargs(c)),
    "webdataset": lambda c: WebDatasetShards(c.path, c.caption_column, **_image_kwargs(c)),
    "prompts": lambda c: PromptDataset(c.path, c.prompt_column),
    "latent_cache": lambda c: TensorCacheDataset(c.path),
    "text_cache": lambda c: TensorCacheDataset(c.path),
    "toy": _toy,
}


def build_dataset(cfg: DataConfig) -> torch.utils.data.Dataset:
    return BUILDERS[cfg.kind](cfg)
