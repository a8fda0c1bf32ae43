"""Exponential moving averages of trained networks (EMA weights, target nets).

One mechanism serves both roles: an EMA for export (decay ~0.999) and the
consistency target network of LCM (decay 0.95). The copy is a full module a
method can call; it never requires grad and never enters an optimizer.
"""
from __future__ import annotations

import copy

import torch


def make_average(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `module` to hold its running average."""
    average = copy.deepcopy(module)
    average.requires_grad_(False)
    average.eval()
    return average


@torch.no_grad()
def update_average(average: torch.nn.Module, module: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * module, for trained parameters.

    Frozen parameters are equal in both copies already (they never change), so
    only the ones with requires_grad are blended; buffers are copied.
    """
    for p_avg, p in zip(average.parameters(), module.parameters()):
        if p.requires_grad:
            p_avg.lerp_(p.detach().to(p_avg.dtype), 1.0 - decay)
    for b_avg, b in zip(average.buffers(), module.buffers()):
        b_avg.copy_(b)
