"""f-divergences and the density-ratio weighting of f-distill (Xu, Nie, Vahdat, arXiv 2502.15681).

For D_f(p || q) = E_q[f(p / q)] between the teacher's noisy marginal p_t and the student's q_t,
the generator gradient is the DMD score difference weighted per sample by (paper Thm. 1)

    h(r) = f''(r) r^2,        r = p_t(x_t) / q_t(x_t).

`DIVERGENCES` is the table: each row holds f (to check h against by autograd) and h in closed
form. Constant factors of h are irrelevant because the weights are mean-normalised.

The ratio comes from a discriminator logit l trained with the non-saturating GAN loss (real =
teacher/data side): at the optimum sigmoid(l) = p / (p + q), so exp(l) = p / q. The weighting
pipeline (paper Sec. 4 and its released configs) is

    r = clip(exp(clip(l, -c, c)), r_min, r_max)       (ratio clamping)
    r <- r / m_b,  m_b = EMA over steps of mean(r) within the time bin b of each sample (optional)
    w = h(r) / mean_batch h(r)                          (mean normalisation)

Batch statistics (per-bin means and the mean of h) are summed across processes through an
`all_sum` callable so every rank applies the same normalisation and the functions stay pure
(the default is the single-process identity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

AllSum = Callable[[Tensor], Tensor]


def local_sum(x: Tensor) -> Tensor:
    """The all-reduce of a single process: nothing to add."""
    return x


def distributed_sum(x: Tensor) -> Tensor:
    """Sum `x` over every process of the default process group (identity when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@dataclass(frozen=True)
class Divergence:
    f: Callable[[Tensor, float], Tensor]   # f(r), convex with f(1) = 0
    h: Callable[[Tensor, float], Tensor]   # f''(r) r^2 in closed form
    mode_seeking: str


def _alpha_f(r: Tensor, a: float) -> Tensor:
    return (r ** a - a * r - (1.0 - a)) / (a * (a - 1.0))


DIVERGENCES: dict[str, Divergence] = {
    "rkl": Divergence(lambda r, a: -torch.log(r), lambda r, a: torch.ones_like(r), "yes (DMD / DMD2)"),
    "srkl": Divergence(lambda r, a: (r + 1.0) * torch.log(0.5 + 0.5 / r), lambda r, a: 1.0 / (r + 1.0), "yes"),
    "js": Divergence(lambda r, a: r * torch.log(r) - (r + 1.0) * torch.log((r + 1.0) / 2.0),
                     lambda r, a: r / (r + 1.0), "medium"),
    "hellinger": Divergence(lambda r, a: 1.0 - torch.sqrt(r), lambda r, a: torch.sqrt(r) / 4.0, "medium"),
    "fkl": Divergence(lambda r, a: r * torch.log(r), lambda r, a: r, "no"),
    "jeffreys": Divergence(lambda r, a: (r - 1.0) * torch.log(r), lambda r, a: r + 1.0, "no"),
    "alpha": Divergence(_alpha_f, lambda r, a: r ** a, "alpha < 1: more"),
    "neyman": Divergence(lambda r, a: (1.0 - r) ** 2 / r, lambda r, a: 2.0 / r, "no"),
}


def h_weight(name: str, r: Tensor, alpha: float = 0.5) -> Tensor:
    """h(r) = f''(r) r^2 of divergence `name` (a key of DIVERGENCES); `alpha` only for "alpha"."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown f-divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    if name == "alpha" and alpha in (0.0, 1.0):
        raise ValueError("the alpha-divergence needs alpha not in {0, 1} (those limits are the KLs: use fkl or rkl)")
    return DIVERGENCES[name].h(r, alpha)


def density_ratio(logits: Tensor, logit_clamp: float = 10.0, r_min: float = 0.1, r_max: float = 20.0) -> Tensor:
    """r = clip(exp(clip(l, -c, c)), r_min, r_max) from discriminator logits (real = teacher side)."""
    return torch.exp(logits.float().clamp(-logit_clamp, logit_clamp)).clamp(r_min, r_max)


def time_bins(t: Tensor, t_end: float, num_bins: int) -> Tensor:
    """Index of the equal-width bin of [0, t_end] holding each t (t = t_end falls in the last bin)."""
    return (t.float() / t_end * num_bins).floor().long().clamp(0, num_bins - 1)


def bin_means(r: Tensor, bins: Tensor, num_bins: int, all_sum: AllSum = local_sum) -> tuple[Tensor, Tensor]:
    """(mean of r within each bin over all processes, whether the bin had any sample)."""
    stats = torch.zeros(2, num_bins, dtype=torch.float64, device=r.device)
    stats[0].index_add_(0, bins, r.detach().double())
    stats[1].index_add_(0, bins, torch.ones_like(r, dtype=torch.float64))
    stats = all_sum(stats)
    present = stats[1] > 0
    return torch.where(present, stats[0] / stats[1].clamp(min=1.0), torch.ones_like(stats[0])), present


def update_ratio_ema(ema: Tensor, means: Tensor, present: Tensor, rate: float) -> Tensor:
    """m_b <- rate m_b + (1 - rate) mean_b for bins seen this step; other bins keep their value."""
    new = rate * ema.double() + (1.0 - rate) * means
    return torch.where(present, new, ema.double()).to(ema.dtype)


def mean_normalise(h: Tensor, all_sum: AllSum = local_sum) -> Tensor:
    """w = h / mean(h), the mean taken over every sample of every process."""
    stats = all_sum(torch.stack([h.detach().double().sum(), torch.tensor(float(h.numel()), dtype=torch.float64,
                                                                        device=h.device)]))
    return h / (stats[0] / stats[1]).to(h.dtype)


@dataclass(frozen=True)
class RatioOptions:
    divergence: str = "js"
    alpha: float = 0.5
    logit_clamp: float = 10.0
    r_min: float = 0.1
    r_max: float = 20.0
    num_bins: int = 10
    ema_rate: float = 0.0
    normalise_bins: bool = True


def fdivergence_weights(logits: Tensor, t: Tensor, t_end: float, ema: Tensor, opts: RatioOptions,
                        all_sum: AllSum = local_sum) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Per-sample weights h(r) / mean h(r) (detached), the updated per-bin ratio EMA, and logs."""
    r = density_ratio(logits.detach(), opts.logit_clamp, opts.r_min, opts.r_max)
    bins = time_bins(t, t_end, opts.num_bins)
    new_ema, r_norm = ema, r
    if opts.normalise_bins:
        means, present = bin_means(r, bins, opts.num_bins, all_sum)
        new_ema = update_ratio_ema(ema, means, present, opts.ema_rate)
        r_norm = r / new_ema.to(r)[bins]
    w = mean_normalise(h_weight(opts.divergence, r_norm, opts.alpha), all_sum)
    logs = {"ratio": r.mean(), "ratio_normalised": r_norm.mean(), "weight_max": w.max(), "weight_min": w.min()}
    return w, new_ema, logs

