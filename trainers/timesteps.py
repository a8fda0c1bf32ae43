"""Training-time distributions over the denoiser's native timesteps."""
from __future__ import annotations

import torch


def sample_timesteps(schedule, n: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """n timesteps for training, as floats in the schedule's native units.

    "uniform": VP -> integers U{0..T-1} (DDPM training); flow -> 1000 * U(0, 1).
    "logit_normal": s = sigmoid(N(0, 1)) mapped to the same range (SD3, arXiv 2403.03206, Sec. 3.1).
    """
    device = generator.device
    if kind == "uniform":
        if schedule.kind == "vp":
            return torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator, device=device).float()
        return 1000.0 * torch.rand(n, generator=generator, device=device)
    if kind == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
        top = schedule.num_train_timesteps - 1 if schedule.kind == "vp" else 1000.0
        return s * top
    raise ValueError(f"unknown timestep distribution {kind!r} (use uniform or logit_normal)")
