"""Preference datasets: paired (winner, loser) images for DPO-style losses, labelled images for KTO.

Importing this module registers its `data.kind`s in `trainers.data.BUILDERS`:

* `preference_folder`: a folder with `preferences.jsonl` (or `data.path` naming the .jsonl
  itself), one line per pair {"prompt", "chosen", "rejected"}, image paths relative to the
  file's folder. `scripts/make_preferences.py` writes this layout.
* `pickapic`: the Pick-a-Pic layout (Kirstain et al., arXiv 2305.01569): parquet files (a file,
  a folder or a glob) or a `save_to_disk` dataset with columns jpg_0, jpg_1 (encoded images),
  label_0 (1: jpg_0 won, 0: jpg_1 won, 0.5: tie) and caption. Ties are dropped, as in the
  official Diffusion-DPO code (851,293 pairs of Pick-a-Pic v2); swapped pairs (label_0 = 0) are
  turned around so the winner always comes first.
* `pickapic_with_ties`: the same, keeping ties with jpg_0 as the winner (the diffusers scripts).
* `labelled_folder` (KTO): a .jsonl (or folder with `labelled.jsonl`, else `preferences.jsonl`)
  whose lines are {"prompt", "image", "label"} (label +1/-1, 1/0 or true/false) or preference
  lines, which give two items: chosen +1, rejected -1.
* `pickapic_labelled` (KTO): every Pick-a-Pic image once, desirable if it won at least one of
  its comparisons (the Diffusion-KTO split; images are matched by image_0_uid / image_1_uid when
  those columns exist, else each pair slot is its own image).

Items: paired {"pixel_values_w", "pixel_values_l", "prompt", "skipped", "index"}; labelled
{"pixel_values", "label" (float +1/-1), "prompt", "skipped", "index"}. Both images of a pair get
the same crop and flip. Unreadable records are skipped and counted, as in `trainers.data`.
`data.flip_labels` swaps a fixed, seeded share of the pairs (negates KTO labels) to simulate
annotator noise; its items then carry `flipped` (bool), which the DPO trainer's logs split by.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from trainers.data import (BUILDERS, LABELLED_DATA_KINDS, READ_ERRORS, DataConfig, _image_kwargs, _open_image,
                           _require_column, image_to_tensor, mix_seed, read_jsonl)

PAIRED_KINDS = ("preference_folder", "pickapic", "pickapic_with_ties")
LABELLED_KINDS = ("labelled_folder", "pickapic_labelled")


class _SkippingDataset(torch.utils.data.Dataset):
    """Shared retry loop: `read(j)` returns (images, prompt, extra); unreadable records are skipped."""

    source = "dataset"

    def __init__(self, resolution: int = 512, center_crop: bool = True, random_flip: bool = False,
                 seed: int = 0, max_consecutive_failures: int = 100, flip_labels: float = 0.0):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.max_consecutive_failures, self.flip_labels = seed, max_consecutive_failures, flip_labels
        self._flipped: frozenset[int] | None = None

    def flipped(self) -> frozenset[int]:
        """Records whose label is corrupted: the first round(flip_labels * n) of a permutation seeded by
        data.seed, so the noisy set is exact in size and the same in every process and run."""
        if self._flipped is None:
            n = len(self)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(self.seed, 0x51F7)))
            self._flipped = frozenset(order[:round(self.flip_labels * n)].tolist())
        return self._flipped

    @staticmethod
    def _flip(item: dict) -> dict:
        if "label" in item:
            return {**item, "label": -item["label"]}
        return {**item, "pixel_values_w": item["pixel_values_l"], "pixel_values_l": item["pixel_values_w"]}

    def _tensor(self, image: Image.Image, j: int) -> torch.Tensor:
        # Same (seed, index) generator for every image of record j: a pair shares its crop and flip.
        g = torch.Generator().manual_seed(mix_seed(self.seed, j))
        return image_to_tensor(image, self.resolution, self.center_crop, self.random_flip, g)

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} records in {self.source}")
        for skipped in range(min(self.max_consecutive_failures + 1, n)):
            j = (index + skipped) % n
            try:
                item = self.item(j)
            except READ_ERRORS:
                continue
            if self.flip_labels:
                # Carried so that training logs can split by corrupted vs clean records.
                flipped = j in self.flipped()
                item = {**(self._flip(item) if flipped else item), "flipped": flipped}
            return {**item, "skipped": skipped, "index": j}
        raise RuntimeError(f"{min(self.max_consecutive_failures + 1, n)} consecutive unreadable records from "
                           f"index {index} in {self.source}; check the data or raise data.max_consecutive_failures")

    def item(self, j: int) -> dict:
        raise NotImplementedError


def _jsonl_in(path: str, names: tuple[str, ...]) -> str:
    if os.path.isfile(path):
        return path
    for name in names:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no {' or '.join(names)} in {path!r}; set data.path to the folder or the .jsonl file")


class PreferenceFolder(_SkippingDataset):
    """Pairs from a jsonl of {"prompt", "chosen", "rejected"} (paths relative to the jsonl's folder)."""

    def __init__(self, path: str, prompt_column: str = "prompt", **kwargs):
        super().__init__(**kwargs)
        self.source = _jsonl_in(path, ("preferences.jsonl",))
        self.root, self.rows, self.prompt_column = os.path.dirname(self.source), read_jsonl(self.source), prompt_column
        for column, option in ((prompt_column, "data.prompt_column"), ("chosen", "chosen (winner image path)"),
                               ("rejected", "rejected (loser image path)")):
            _require_column(self.rows, column, self.source, option)

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, j: int) -> dict:
        row = self.rows[j]
        w, l = (_open_image(os.path.join(self.root, row[k])) for k in ("chosen", "rejected"))
        return {"pixel_values_w": self._tensor(w, j), "pixel_values_l": self._tensor(l, j),
                "prompt": str(row[self.prompt_column])}


def _parse_label(value: Any, where: str) -> float:
    if isinstance(value, bool):
        return 1.0 if value else -1.0
    if value in (1, 1.0, "1", "+1", "true", "desirable"):
        return 1.0
    if value in (-1, -1.0, 0, 0.0, "-1", "0", "false", "undesirable"):
        return -1.0
    raise ValueError(f"{where}: label {value!r} is not +1/-1, 1/0 or true/false")


class LabelledFolder(_SkippingDataset):
    """KTO items: {"prompt", "image", "label"} lines, or preference lines unpaired into (+1, -1)."""

    def __init__(self, path: str, prompt_column: str = "prompt", **kwargs):
        super().__init__(**kwargs)
        self.source = _jsonl_in(path, ("labelled.jsonl", "preferences.jsonl"))
        self.root = os.path.dirname(self.source)
        self.records: list[tuple[str, str, float]] = []
        for n, row in enumerate(read_jsonl(self.source), 1):
            where = f"{self.source} record {n}"
            if prompt_column not in row:
                raise ValueError(f"{where} has no column '{prompt_column}' (has {sorted(row)}); set data.prompt_column")
            if "image" in row and "label" in row:
                self.records.append((row["image"], str(row[prompt_column]), _parse_label(row["label"], where)))
            elif "chosen" in row and "rejected" in row:
                self.records += [(row["chosen"], str(row[prompt_column]), 1.0),
                                 (row["rejected"], str(row[prompt_column]), -1.0)]
            else:
                raise ValueError(f"{where} needs 'image' and 'label', or 'chosen' and 'rejected' (has {sorted(row)})")

    def __len__(self) -> int:
        return len(self.records)

    def item(self, j: int) -> dict:
        image, prompt, label = self.records[j]
        x = self._tensor(_open_image(os.path.join(self.root, image)), j)
        return {"pixel_values": x, "label": torch.tensor(label), "prompt": prompt}


# ------------------------------------------------------------------ Pick-a-Pic


def load_pickapic_table(path: str, split: str = "train"):
    """A `datasets.Dataset` from parquet (file, folder or glob) or a `save_to_disk` folder."""
    import datasets

    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{path} has splits {sorted(ds)}, not '{split}'; set data.split")
            ds = ds[split]
    else:
        pattern = os.path.join(path, "**", "*.parquet") if os.path.isdir(path) else path
        files = sorted(glob.glob(pattern, recursive=True))
        if not files:
            raise FileNotFoundError(f"no parquet files match {path!r}; set data.path to Pick-a-Pic parquet "
                                    "file(s) or a save_to_disk folder")
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    missing = [c for c in ("jpg_0", "jpg_1", "label_0", "caption") if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path} lacks Pick-a-Pic column(s) {missing} (has {ds.column_names})")
    return ds


def _column(ds, name: str) -> np.ndarray:
    return ds.data.column(name).to_numpy(zero_copy_only=False)


def _decode(value: Any) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    return _open_image(value)


def pickapic_pairs(label_0: np.ndarray, keep_ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row index, winner slot 0/1) of usable pairs: label 1 -> slot 0, label 0 -> slot 1 (swapped),
    tie 0.5 -> slot 0 if kept; unlabelled (NaN) rows are dropped."""
    label = np.asarray(label_0, dtype=np.float64)
    keep = (label == 1.0) | (label == 0.0) | ((label == 0.5) & keep_ties)
    rows = np.nonzero(keep)[0]
    return rows, (label[rows] == 0.0).astype(np.int64)


def pickapic_desirable(label_0: np.ndarray, uid_0: np.ndarray | None = None,
                       uid_1: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, slot, label +1/-1) for every distinct image: +1 if it won at least one comparison.

    Without uids each (row, slot) is its own image. Ties and unlabelled rows make no winner.
    """
    label = np.asarray(label_0, dtype=np.float64)
    n = len(label)
    rows, slots = np.repeat(np.arange(n), 2), np.tile(np.arange(2), n)
    won = np.stack([label == 1.0, label == 0.0], axis=1).reshape(-1)
    if uid_0 is None or uid_1 is None:
        return rows, slots, np.where(won, 1.0, -1.0)
    uids = np.stack([np.asarray(uid_0, dtype=object), np.asarray(uid_1, dtype=object)], axis=1).reshape(-1)
    winners = set(uids[won].tolist())
    _, first = np.unique(uids.astype(str), return_index=True)
    first = np.sort(first)
    return rows[first], slots[first], np.array([1.0 if uids[i] in winners else -1.0 for i in first])


class PickAPicPairs(_SkippingDataset):
    def __init__(self, path: str, keep_ties: bool, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        self.ds, self.source = load_pickapic_table(path, split), path
        self.rows, self.winner_slot = pickapic_pairs(_column(self.ds, "label_0"), keep_ties)
        if len(self.rows) == 0:
            raise ValueError(f"{path} has no labelled pairs{'' if keep_ties else ' that are not ties'}")

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, j: int) -> dict:
        row = self.ds[int(self.rows[j])]
        images = [_decode(row["jpg_0"]), _decode(row["jpg_1"])]
        w = int(self.winner_slot[j])
        return {"pixel_values_w": self._tensor(images[w], j), "pixel_values_l": self._tensor(images[1 - w], j),
                "prompt": str(row["caption"])}


class PickAPicLabelled(_SkippingDataset):
    def __init__(self, path: str, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        self.ds, self.source = load_pickapic_table(path, split), path
        uids = [(_column(self.ds, c) if c in self.ds.column_names else None) for c in ("image_0_uid", "image_1_uid")]
        self.rows, self.slots, self.labels = pickapic_desirable(_column(self.ds, "label_0"), *uids)

    def __len__(self) -> int:
        return len(self.rows)

    def item(self, j: int) -> dict:
        row = self.ds[int(self.rows[j])]
        x = self._tensor(_decode(row[f"jpg_{int(self.slots[j])}"]), j)
        return {"pixel_values": x, "label": torch.tensor(float(self.labels[j])), "prompt": str(row["caption"])}


def _preference_kwargs(cfg: DataConfig) -> dict:
    return dict(_image_kwargs(cfg), flip_labels=cfg.flip_labels)


NEW_BUILDERS: dict[str, Callable[[DataConfig], torch.utils.data.Dataset]] = {
    "preference_folder": lambda c: PreferenceFolder(c.path, c.prompt_column, **_preference_kwargs(c)),
    "pickapic": lambda c: PickAPicPairs(c.path, keep_ties=False, split=c.split, **_preference_kwargs(c)),
    "pickapic_with_ties": lambda c: PickAPicPairs(c.path, keep_ties=True, split=c.split, **_preference_kwargs(c)),
    "labelled_folder": lambda c: LabelledFolder(c.path, c.prompt_column, **_preference_kwargs(c)),
    "pickapic_labelled": lambda c: PickAPicLabelled(c.path, split=c.split, **_preference_kwargs(c)),
}
for _kind, _builder in NEW_BUILDERS.items():
    BUILDERS.setdefault(_kind, _builder)
LABELLED_DATA_KINDS.update(NEW_BUILDERS)
