"""Optimizers and learning-rate schedules, built from `OptimConfig`.

The schedule is a pure function of the optimizer step, so a resumed run needs
no scheduler state: the loop sets each group's LR from the step it is on.
"""
from __future__ import annotations

import math

import torch

from trainers.config import OptimConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check model.lora and the method's trained modules")
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps,
                                 fused=use_fused(params, cfg.fused))
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False, relative_step=False)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def use_fused(params: list[torch.Tensor], fused: bool | None) -> bool:
    """The fused AdamW kernel updates all parameters in a few launches instead of a dozen per tensor, which is
    most of the optimizer's time on a GPU at 0.9B+ parameters. By default only on CUDA: the CPU kernel exists but
    the multi-tensor path is the one every CPU result here was measured with."""
    if fused is None:
        return all(p.device.type == "cuda" for p in params)
    return fused


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then decay, which starts after warm-up
    or, with `decay_steps`, that many steps before the end (the peak held in between). A run that ends its
    decay early is what lifts a model trained at a constant rate: the weights settle out of the rate's noise."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    start = max(cfg.warmup_steps, max_steps - cfg.decay_steps) if cfg.decay_steps else cfg.warmup_steps
    progress = (step - start) / max(1, max_steps - start)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
