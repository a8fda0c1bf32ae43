"""Sample diversity among images of the same prompt.

- Mean pairwise cosine distance of L2-normalised features: mean_{i<j} (1 - <f_i, f_j>).
- Mean pairwise LPIPS (Zhang et al., arXiv:1801.03924), when the lpips package and its backbone weights
  are on disk; never downloads.
- Vendi score (Friedman & Dieng, arXiv:2210.02410): exp(-sum_i lambda_i log lambda_i) with lambda the
  eigenvalues of K / n, K_ij = <f_i, f_j> for L2-normalised f (cosine-similarity kernel, K_ii = 1 so
  tr(K / n) = 1). It is the "effective number of distinct samples": 1 for identical, n for orthogonal.
Group helpers apply any of these per prompt id and report the per-group values and their mean.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from evaluation.features import weights_only_load

LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                   "squeeze": "squeezenet1_1-b8a52dc0.pth"}  # torchvision file names in the hub cache


def _check_group(features: Tensor) -> Tensor:
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [n >= 2, D], got shape {tuple(features.shape)}")
    return features


def pairwise_cosine_distance(features: Tensor) -> Tensor:
    """Mean over pairs i < j of 1 - cos(f_i, f_j), in float64."""
    f = F.normalize(_check_group(features).double(), dim=-1)
    n = f.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return (1 - (f[i] * f[j]).sum(-1)).mean()


def vendi_score(features: Tensor) -> Tensor:
    """exp(entropy of eigenvalues of K/n), K the cosine-similarity kernel; float64, 0 log 0 = 0."""
    f = F.normalize(_check_group(features).double(), dim=-1)
    # eigenvalues of f f^T / n equal the nonzero ones of f^T f / n: use the smaller matrix
    gram = f @ f.T if f.shape[0] <= f.shape[1] else f.T @ f
    lam = torch.linalg.eigvalsh(gram / f.shape[0]).clamp(min=0)
    return torch.exp(-torch.special.xlogy(lam, lam).sum())


def group_by_prompt(values: Tensor, prompt_ids: Sequence[Hashable]) -> dict[Hashable, Tensor]:
    """Split rows of ``values`` by prompt id (order of first appearance)."""
    if len(prompt_ids) != values.shape[0]:
        raise ValueError(f"got {values.shape[0]} samples but {len(prompt_ids)} prompt ids")
    groups: dict[Hashable, list[int]] = {}
    for k, pid in enumerate(prompt_ids):
        groups.setdefault(pid, []).append(k)
    return {pid: values[idx] for pid, idx in groups.items()}


def grouped(metric: Callable[[Tensor], Tensor], values: Tensor,
            prompt_ids: Sequence[Hashable]) -> tuple[float, dict[Hashable, float]]:
    """(mean over prompts, per-prompt value) of ``metric`` applied to each prompt's samples."""
    per = {pid: float(metric(v)) for pid, v in group_by_prompt(values, prompt_ids).items()}
    return sum(per.values()) / len(per), per


def lpips_model(net: str = "alex", device: torch.device | str = "cpu"):
    """LPIPS v0.1 from local files only: the lpips package's linear heads + torchvision's backbone in the hub cache."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"unknown LPIPS net {net!r}; choose one of {sorted(LPIPS_BACKBONES)}")
    try:
        import lpips
    except ImportError as e:
        raise ImportError("LPIPS diversity needs the 'lpips' package; install it or use pairwise_cosine_distance") from e
    backbone = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
    if not backbone.is_file():
        raise FileNotFoundError(f"LPIPS backbone weights not found: put '{backbone.name}' (torchvision) in "
                                f"'{backbone.parent}'; nothing is downloaded")
    with weights_only_load():
        return lpips.LPIPS(net=net, verbose=False).to(device).requires_grad_(False).eval()


@torch.no_grad()
def pairwise_lpips(images: Tensor, model) -> Tensor:
    """Mean LPIPS over pairs i < j of images in [-1, 1] (the range LPIPS expects)."""
    n = images.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images, got {n}")
    i, j = torch.triu_indices(n, n, offset=1)
    device = next(model.parameters()).device
    x = images.to(device)
    return model(x[i], x[j]).flatten().double().mean()
