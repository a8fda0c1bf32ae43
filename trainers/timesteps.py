"""Training-time distributions over the denoiser's native timesteps."""
from __future__ import annotations

import torch

from pipelines.schedules import shift_sigma


def sample_timesteps(schedule, n: int, kind: str, generator: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """n timesteps for training, as floats in the schedule's native units.

    "uniform": VP -> integers U{0..T-1} (DDPM training); flow -> 1000 * U(0, 1).
    "logit_normal": s = sigmoid(N(0, 1)) mapped to the same range (SD3, arXiv 2403.03206, Sec. 3.1).
    `shift` > 1 moves flow timesteps toward noise by SD3's map s -> shift s / (1 + (shift - 1) s), the one
    FlowMatchEulerDiscreteScheduler applies to its sampling grid; VP schedules have no such knob here.
    """
    device = generator.device
    if shift != 1.0 and schedule.kind == "vp":
        raise ValueError("a timestep shift applies to flow schedules; a VP model gets more high-noise weight from "
                         "truncated_snr")
    if kind == "uniform":
        if schedule.kind == "vp":
            return torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator, device=device).float()
        s = torch.rand(n, generator=generator, device=device)
    elif kind == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
        if schedule.kind == "vp":
            return s * (schedule.num_train_timesteps - 1)
    else:
        raise ValueError(f"unknown timestep distribution {kind!r} (use uniform or logit_normal)")
    return 1000.0 * shift_sigma(s, shift)
