"""Caches of VAE latents and text embeddings: safetensors shards plus a JSON index.

Written once (`cache_latents`, `cache_text_embeddings`) so training can skip the VAE
encoder and the text encoders; read back as a map-style dataset (`TensorCacheDataset`,
`data.kind: latent_cache` / `text_cache`). Cached latents freeze the image augmentation
at the dataset's seed.
"""
from __future__ import annotations

import bisect
import json
import os
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipelines.conditioning import Conditioning
from trainers.atomic_files import write_json_atomic


def _flat_tensors(encoded, kind: str) -> dict[str, torch.Tensor]:
    if isinstance(encoded, torch.Tensor):
        return {"latents" if kind == "latents" else "encoder_hidden_states": encoded}
    return (encoded if isinstance(encoded, Conditioning) else Conditioning(dict(encoded))).state()


def _write_cache(path: str, kind: str, batches: Iterator[tuple[list[str], list[int], object]],
                 shard_size: int, extra: dict) -> dict:
    os.makedirs(path, exist_ok=True)
    shards, prompts, indices, pending, pending_n = [], [], [], [], 0

    def flush():
        nonlocal pending, pending_n
        if pending_n:
            name = f"{kind}-{len(shards):05d}.safetensors"
            tensors = {k: torch.cat([p[k] for p in pending]).contiguous() for k in pending[0]}
            save_file(tensors, os.path.join(path, name))
            shards.append({"file": name, "count": pending_n})
            pending, pending_n = [], 0

    for batch_prompts, batch_indices, encoded in batches:
        pending.append({k: v.detach().cpu() for k, v in _flat_tensors(encoded, kind).items()})
        pending_n += len(batch_prompts)
        prompts += batch_prompts
        indices += batch_indices
        if pending_n >= shard_size:
            flush()
    flush()
    index = {"kind": kind, "shards": shards, "prompts": prompts, "source_indices": indices, **extra}
    # The index marks the cache complete (make_pairs skips a text cache that has one): write it whole or not at all.
    write_json_atomic(os.path.join(path, "index.json"), index)
    return index


@torch.no_grad()
def cache_latents(dataset: torch.utils.data.Dataset, encode_fn: Callable[[torch.Tensor], object], path: str,
                  batch_size: int = 8, shard_size: int = 1024) -> dict:
    """Encode every readable image once (augmentation frozen at the dataset's seed); returns the index.

    `encode_fn(pixel_values [B,3,H,W]) -> latents` (e.g. `bundle.encode_images`).
    """
    stats = {"skipped": 0}  # filled while the generator runs, read when the index is written

    def batches():
        buf: list[dict] = []
        for i in range(len(dataset) + 1):
            item = dataset[i] if i < len(dataset) else None
            if item is not None and item["index"] != i:  # i was unreadable; its stand-in gets its own turn
                stats["skipped"] += 1
                continue
            if item is not None:
                buf.append(item)
            if buf and (len(buf) == batch_size or item is None):
                pixels = torch.stack([b["pixel_values"] for b in buf])
                yield [b["prompt"] for b in buf], [b["index"] for b in buf], encode_fn(pixels)
                buf = []

    return _write_cache(path, "latents", batches(), shard_size, stats)


@torch.no_grad()
def cache_text_embeddings(prompts: list[str], encode_fn: Callable[[list[str]], object], path: str,
                          batch_size: int = 32, shard_size: int = 4096) -> dict:
    """`encode_fn(prompts) -> Tensor | dict | Conditioning` (e.g. `bundle.encode_prompt`); returns the index."""
    batches = ((prompts[i: i + batch_size], list(range(i, min(i + batch_size, len(prompts)))),
                encode_fn(prompts[i: i + batch_size])) for i in range(0, len(prompts), batch_size))
    return _write_cache(path, "text", batches, shard_size, {})


class TensorCacheDataset(torch.utils.data.Dataset):
    """Reads a cache back: items carry "latents" [C,h,w] (from `cache_latents`) or "cond", the nested
    denoiser kwargs (from `cache_text_embeddings`; a bare tensor is stored as encoder_hidden_states)."""

    def __init__(self, path: str):
        index_path = os.path.join(path, "index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{index_path} not found; write the cache with cache_latents/cache_text_embeddings")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if not self.index["prompts"]:
            raise ValueError(f"{index_path} lists no items; rebuild the cache from a non-empty dataset")
        self.path = path
        self.ends = list(np.cumsum([s["count"] for s in self.index["shards"]]))

    def __len__(self) -> int:
        return len(self.index["prompts"])

    def __getitem__(self, index: int) -> dict:
        s = bisect.bisect_right(self.ends, index)
        row = index - (self.ends[s - 1] if s else 0)
        with safe_open(os.path.join(self.path, self.index["shards"][s]["file"]), framework="pt") as f:
            flat = {k: f.get_slice(k)[row: row + 1][0] for k in f.keys()}
        item = {"prompt": self.index["prompts"][index], "skipped": 0, "index": index}
        if self.index["kind"] == "latents" and list(flat) == ["latents"]:
            item["latents"] = flat["latents"]
        else:
            item["cond"] = Conditioning.from_state(flat).kwargs
        return item
