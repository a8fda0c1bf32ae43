"""The reward add-on term, L_reward = -beta R(x, c), and the ceiling transform R <- -relu(ceiling - R).

Minimising -beta R raises the reward of whatever the method feeds it: RG-LCD passes the decoded one-step
estimate of its student (or, through the latent proxy reward model, the latent itself), so dL/dR = -beta
for every sample. `CeilingReward` wraps any reward with the ceiling transform, the reference RG-LCD code's
ImageReward clip (ceiling 2): 0 at or above the ceiling, so the term stops pushing there, and R - ceiling
below it. Per-sample and unreduced, as every loss in trainers/.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def reward_term(reward: Tensor, beta: float) -> Tensor:
    """-beta R per sample: added to a method's loss, a descent step raises R."""
    return -beta * reward.float()


def clip_reward(reward: Tensor, ceiling: float) -> Tensor:
    """-relu(ceiling - R): 0 at or above the ceiling, R - ceiling below it (no push past the ceiling)."""
    return -torch.relu(ceiling - reward)


class CeilingReward(nn.Module):
    """A reward clipped as -relu(ceiling - R)."""

    def __init__(self, reward: nn.Module, ceiling: float):
        super().__init__()
        self.reward, self.ceiling = reward, float(ceiling)
        self.name, self.differentiable = f"{reward.name}<={ceiling:g}", reward.differentiable
        self.scale = f"-relu({ceiling:g} - {reward.name})"

    def forward(self, images: Tensor, prompts) -> Tensor:
        return clip_reward(self.reward(images, prompts), self.ceiling)
