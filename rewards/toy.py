"""Rewards for the toy world (pipelines/toy): its small CLIP and its exact attribute checker.

* toy_clip: 100 * cos(image, caption) under the toy world's transformers
  CLIPModel (default folder ``pipelines/toy/clip``); differentiable, so it can
  stand in for HPS/PickScore in smoke tests of reward-guided methods.
* toy_attributes: 1.0 when ``pipelines.toy.checker.check_batch`` says the
  image shows exactly what the caption asks for, else 0.0; a ground-truth
  judge, not differentiable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import check_inputs
from .clip_rewards import CosineReward
from .clip_towers import hf_clip_towers


def build_toy_clip(path=None) -> CosineReward:
    """The toy world's CLIP from a save_pretrained folder (model, tokenizer, processor config)."""
    from pipelines.toy import TOY_CLIP  # imported here so the rewards package loads without the toy world

    folder = Path(path) if path is not None else TOY_CLIP
    towers = hf_clip_towers(what="toy_clip", repo_id=None, path=folder)
    return CosineReward("toy_clip", towers, "100 * cos(image, caption) under the toy CLIP")


class ToyAttributes(nn.Module):
    """Pass/fail of the toy world's exact checker as a float reward."""

    name = "toy_attributes"
    differentiable = False
    scale = "1.0 if the image shows exactly what the caption asks for (toy checker), else 0.0"

    def __init__(self):
        super().__init__()
        # Imported here so the rewards package does not need the toy world (or scipy) to load.
        from pipelines.toy.checker import check_batch

        self._check_batch = check_batch

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(self.name, images, prompts)
        passed = self._check_batch(images.detach(), list(prompts))
        return passed.to(device=images.device, dtype=torch.float32)


def build_toy_attributes() -> ToyAttributes:
    return ToyAttributes()
