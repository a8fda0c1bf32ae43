"""The one reward signature: ``reward(images, prompts) -> Tensor[B]``.

Images are float tensors in [-1, 1], shape B x 3 x H x W, on any device and in
any dtype; the reward moves them to its own device and dtype after the
float32 preprocessing, and returns float32 scores on the images' device.
Rewards are frozen (``requires_grad_(False).eval()``): gradients flow to the
images only, and only for rewards with ``differentiable = True``.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Reward(Protocol):
    """What trainers and evaluators rely on."""

    name: str
    differentiable: bool
    scale: str  # one line: what the numbers mean (range, units, convention)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


def check_inputs(name: str, images: Tensor, prompts: Sequence[str]) -> None:
    """One-line errors for the two common misuses: wrong layout and a prompt count mismatch."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward {name}: images must be B x 3 x H x W in [-1, 1], got shape {tuple(images.shape)}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a str" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"reward {name}: need one prompt per image ({images.shape[0]}), got {got}")


class RewardModule(nn.Module):
    """Base for model-backed rewards: input checks, freezing, device/dtype plumbing."""

    name: str = ""
    differentiable: bool = True
    scale: str = ""

    def freeze(self) -> "RewardModule":
        self.requires_grad_(False)
        return self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Subclasses: per-sample scores for checked inputs."""
        raise NotImplementedError

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(self.name, images, prompts)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.differentiable):
            scores = self.score(images, list(prompts))
        return scores.float().to(images.device)
