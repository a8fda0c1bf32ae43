"""Frechet distance between Gaussian fits of features (FID, arXiv:1706.08500), in pure torch float64.

    FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^{1/2})

Numerical choice: S_1 S_2 is not symmetric, so a general ``sqrtm`` returns complex round-off (the
"tiny imaginary part" of the scipy route). Instead, S_1 S_2 is similar to the symmetric PSD matrix
M = S_1^{1/2} S_2 S_1^{1/2}, and M = A A^T with A = S_1^{1/2} S_2^{1/2}, so

    tr((S_1 S_2)^{1/2}) = sum_i sqrt(lambda_i(M)) = sum_i sigma_i(A)   (nuclear norm of A).

The symmetric roots come from ``torch.linalg.eigh`` (round-off eigenvalues below zero clamped to 0) and
the singular values from ``svdvals``. Everything stays real, and summing singular values avoids taking
square roots of M's round-off eigenvalues: with singular covariances (n < D) that sqrt turns 1e-15
errors into ~1e-7 per null direction; here FD(x, x) stays ~1e-12.
Covariances are unbiased (divide by n - 1), as in pytorch-fid and torch-fidelity.

Statistics carry a protocol header (extractor name, feature resolution, resize policy, sample count)
saved with them as .npz, so cached reference statistics are only reused under the same protocol.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class FeatureStats:
    """Gaussian fit of n feature vectors: mean [D], covariance [D, D] (float64) and the protocol header."""
    mu: Tensor
    sigma: Tensor
    n: int
    protocol: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        header = json.dumps({**self.protocol, "n": self.n}, sort_keys=True)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object keeps numpy from appending ".npz" to the name
            np.savez(f, mu=self.mu.cpu().numpy(), sigma=self.sigma.cpu().numpy(), protocol=np.array(header))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["protocol"]))
            return cls(torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double(),
                       int(header.pop("n")), header)


def protocol_of(extractor, **extra) -> dict:
    """The header that must match for two statistics to be comparable."""
    return {"extractor": extractor.name, "resolution": extractor.resolution,
            "resize": getattr(extractor, "resize", "unspecified"), **extra}


def stats_from_features(features: Tensor, protocol: dict | None = None) -> FeatureStats:
    """Mean and unbiased covariance of features [N, D] in float64 (two-pass, no E[xx^T] - mu mu^T cancellation)."""
    x = features.detach().double().flatten(1)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
    mu = x.mean(0)
    d = x - mu
    return FeatureStats(mu, d.T @ d / (n - 1), n, dict(protocol or {}))


def sqrt_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix via eigh (negative round-off eigenvalues clamped to 0)."""
    lam, q = torch.linalg.eigh((a + a.T) / 2)
    return (q * lam.clamp(min=0).sqrt()) @ q.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """FD between N(mu1, sigma1) and N(mu2, sigma2) in float64 (nuclear-norm formulation, module docstring)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}")
    tr_covmean = torch.linalg.svdvals(sqrt_psd(sigma1) @ sqrt_psd(sigma2.to(sigma1.device))).sum()
    diff = mu1 - mu2.to(mu1.device)
    return diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FD of two statistics; refuses to compare statistics made under different protocols."""
    pa = {k: v for k, v in a.protocol.items() if k in ("extractor", "resolution", "resize")}
    pb = {k: v for k, v in b.protocol.items() if k in ("extractor", "resolution", "resize")}
    if pa and pb and pa != pb:
        raise ValueError(f"statistics come from different protocols: {pa} vs {pb}; recompute one of them")
    return float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def _batches(images_iter: Iterable, batch_size: int):
    """Re-batch an iterable of [3,H,W] / [B,3,H,W] tensors or dataset dicts ("pixel_values") into [b,3,H,W]."""
    buf, count = [], 0
    for item in images_iter:
        x = item["pixel_values"] if isinstance(item, dict) else item
        x = x[None] if x.ndim == 3 else x
        if buf and x.shape[1:] != buf[0].shape[1:]:
            raise ValueError(f"images differ in size ({tuple(buf[0].shape[1:])} vs {tuple(x.shape[1:])}); "
                             "resize them first, e.g. reference_stats(..., image_size=512)")
        buf.append(x)
        count += x.shape[0]
        while count >= batch_size:
            cat = torch.cat(buf)
            yield cat[:batch_size]
            buf, count = [cat[batch_size:]], count - batch_size
    if count:
        yield torch.cat(buf)


def gather_features(features: Tensor, accelerator) -> Tensor:
    """All processes' features, concatenated in rank order; shards may have different lengths."""
    counts = accelerator.gather(torch.tensor([features.shape[0]], device=accelerator.device)).tolist()
    padded = accelerator.pad_across_processes(features.to(accelerator.device), dim=0)
    gathered = accelerator.gather(padded).cpu()
    m = padded.shape[0]
    return torch.cat([gathered[r * m:r * m + c] for r, c in enumerate(counts)])


@torch.no_grad()
def extract_features(images_iter: Iterable, extractor, batch_size: int = 64, accelerator=None,
                     total: int | None = None) -> Tensor:
    """Features [N, D] of every image; with an Accelerator each process passes its own disjoint shard.

    ``total`` (images in this process's shard, when known) sizes the progress bar shown on rank 0.
    """
    quiet = accelerator is not None and not accelerator.is_main_process
    bar = tqdm(total=total, desc=f"features ({extractor.name})", unit="img", disable=quiet, leave=False)
    feats = []
    for x in _batches(images_iter, batch_size):
        feats.append(extractor(x).float().cpu())
        bar.update(x.shape[0])
    bar.close()
    dim = feats[0].shape[1] if feats else 0
    out = torch.cat(feats) if feats else torch.zeros(0, dim)
    return gather_features(out, accelerator) if accelerator is not None else out


def compute_stats(images_iter: Iterable, extractor, batch_size: int = 64, accelerator=None, total: int | None = None,
                  **protocol_extra) -> FeatureStats:
    """FeatureStats of images in [-1, 1] (gathered over processes when ``accelerator`` is given)."""
    features = extract_features(images_iter, extractor, batch_size, accelerator, total)
    return stats_from_features(features, protocol_of(extractor, **protocol_extra))


def _to_tensor(img, image_size: int | None) -> Tensor:
    """A PIL image as RGB [3,H,W] in [-1, 1]; centre-cropped and PIL-bicubic resized when ``image_size`` is set."""
    from PIL import Image
    img = img.convert("RGB")
    if image_size is not None:
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((image_size, image_size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1


def _load_image(path: Path, image_size: int | None) -> Tensor:
    from PIL import Image
    with Image.open(path) as img:
        return _to_tensor(img, image_size)


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return any((Path(path) / name).is_file() for name in ("state.json", "dataset_dict.json"))


def _saved_dataset_images(path: Path, image_column: str = "image"):
    """The image column of a saved ``datasets`` dataset (split ``train`` of a DatasetDict), decoded to PIL."""
    import datasets
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"FID reference {path} has splits {sorted(ds)}; save the reference split alone, "
                             "or as 'train'")
        ds = ds["train"]
    if image_column not in ds.column_names:
        raise ValueError(f"FID reference {path} has no '{image_column}' column (has {ds.column_names}); "
                         f"rename the image column to '{image_column}'")
    if len(ds) == 0:
        raise ValueError(f"FID reference {path} has no records")
    return ds.cast_column(image_column, datasets.Image()), image_column


def _source(folder_or_dataset, image_size, rank: int, world: int):
    """(number of images in this process's shard, iterator over it) of a folder of images, a saved
    ``datasets`` dataset (column ``image``), or an indexable dataset of tensors / {"pixel_values": ...}."""
    if isinstance(folder_or_dataset, (str, os.PathLike)):
        path = Path(folder_or_dataset)
        if is_saved_dataset(path):
            ds, column = _saved_dataset_images(path)
            mine = range(rank, len(ds), world)
            return len(ds), len(mine), (_to_tensor(ds[i][column], image_size) for i in mine)
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images ({sorted(IMAGE_SUFFIXES)}) under '{folder_or_dataset}'")
        mine = files[rank::world]
        return len(files), len(mine), (_load_image(p, image_size) for p in mine)
    ds = folder_or_dataset
    mine = range(rank, len(ds), world)
    return len(ds), len(mine), (ds[i] for i in mine)


def reference_stats(folder_or_dataset, extractor, cache_path: str | os.PathLike, batch_size: int = 64,
                    image_size: int | None = None, accelerator=None) -> FeatureStats:
    """Reference statistics of real images, computed once and cached in ``cache_path`` (.npz).

    ``folder_or_dataset``: a folder of image files, a ``save_to_disk`` dataset folder, or an indexable
    dataset (tensors or {"pixel_values": ...} in [-1, 1], e.g. trainers.data's datasets).

    The cache is reused only if its header (extractor, resolution, resize, image_size, sample count)
    matches; otherwise it is recomputed and overwritten, with a message saying why.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    n, mine, shard = _source(folder_or_dataset, image_size, rank, world)
    expected = {**protocol_of(extractor, image_size=image_size), "n": n}
    cache_path = Path(cache_path)
    if cache_path.is_file():
        cached = FeatureStats.load(cache_path)
        found = {**cached.protocol, "n": cached.n}
        if found == expected:
            return cached
        print(f"reference stats {cache_path}: protocol {found} != expected {expected}; recomputing")
    stats = compute_stats(shard, extractor, batch_size, accelerator, total=mine, image_size=image_size)
    if accelerator is None or accelerator.is_main_process:
        stats.save(cache_path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return stats
