"""A weighted sum of rewards: R(x, c) = sum_k w_k R_k(x, c).

RG-LCD's "weighted_hpsv2_img_reward" is ``{"hpsv2.1": 1.0, "image_reward": 0.1}``.
Terms keep their own scales (see docs/rewards.md), so the weights carry the
unit conversion. The sum is differentiable only if every term is.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import check_inputs


class WeightedReward(nn.Module):
    name = "weighted"

    def __init__(self, terms: Sequence[tuple[float, nn.Module]]):
        super().__init__()
        if not terms:
            raise ValueError("weighted: needs at least one term, e.g. terms={'hpsv2.1': 1.0, 'image_reward': 0.1}")
        self.weights = [float(w) for w, _ in terms]
        self.terms = nn.ModuleList([r for _, r in terms])
        self.differentiable = all(r.differentiable for r in self.terms)
        self.scale = " + ".join(f"{w:g} * {r.name}" for w, r in zip(self.weights, self.terms))

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(self.name, images, prompts)
        total = torch.zeros(images.shape[0], device=images.device, dtype=torch.float32)
        for weight, reward in zip(self.weights, self.terms):
            total = total + weight * reward(images, prompts)
        return total
