"""Rewards for the toy world (pipelines/toy): its small CLIP, its exact attribute checker and its attribute net.

* toy_clip: 100 * cos(image, caption) under the toy world's transformers
  CLIPModel (default folder ``pipelines/toy/clip``); differentiable, so it can
  stand in for HPS/PickScore in smoke tests of reward-guided methods.
* toy_attributes: 1.0 when ``pipelines.toy.checker.check_batch`` says the
  image shows exactly what the caption asks for, else 0.0; a ground-truth
  judge, not differentiable.
* toy_attribute_score: the fraction of the checker's checks an image meets
  (``pipelines.toy.checker.score_batch``: background, count, and per object
  colour, shape, size and cell), 1.0 exactly when it passes; ranks two failing
  images, so it labels preference pairs where pass/fail would tie.
* toy_attribute_net: the log-likelihood (nats, 0 = certain) of every check the
  checker makes, under a small CNN that predicts background, and per grid
  cell occupancy, colour, shape and size (``pipelines.toy.attribute_net``,
  default folder ``pipelines/toy/attributes``); a differentiable stand-in for
  the checker, trained on the train split only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from .base import RewardModule, check_inputs
from .clip_rewards import CosineReward
from .clip_towers import hf_clip_towers
from .weights import WeightsNotFoundError


def build_toy_clip(path=None) -> CosineReward:
    """The toy world's CLIP from a save_pretrained folder (model, tokenizer, processor config)."""
    from pipelines.toy import TOY_CLIP  # imported here so the rewards package loads without the toy world

    folder = Path(path) if path is not None else TOY_CLIP
    towers = hf_clip_towers(what="toy_clip", repo_id=None, path=folder)
    return CosineReward("toy_clip", towers, "100 * cos(image, caption) under the toy CLIP")


class ToyChecker(nn.Module):
    """A verdict of the toy world's exact checker as a float reward (not differentiable)."""

    differentiable = False

    def __init__(self, name: str, judge, scale: str):
        super().__init__()
        self.name, self.scale, self._judge = name, scale, judge

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(self.name, images, prompts)
        verdict = self._judge(images.detach(), list(prompts))
        return verdict.to(device=images.device, dtype=torch.float32)


# The checker is imported inside the builders so the rewards package loads without the toy world (or scipy).
def build_toy_attributes() -> ToyChecker:
    from pipelines.toy.checker import check_batch
    return ToyChecker("toy_attributes", check_batch,
                      "1.0 if the image shows exactly what the caption asks for (toy checker), else 0.0")


def build_toy_attribute_score() -> ToyChecker:
    from pipelines.toy.checker import score_batch
    return ToyChecker("toy_attribute_score", score_batch,
                      "fraction of the toy checker's checks met (2 + 4 per object), 1.0 exactly when it passes")


class ToyAttributeNet(RewardModule):
    """Sum of the log-probabilities of a caption's checks under the toy attribute net (differentiable)."""

    name = "toy_attribute_net"
    differentiable = True
    scale = "sum of log-probabilities (nats) of the caption's checks under the toy attribute net; 0 = certain"

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        from pipelines.toy.attribute_net import caption_log_likelihood, scene_targets

        targets = scene_targets([self._parse(p) for p in prompts], self.device)  # before any pixel is read
        return caption_log_likelihood(self.net(images.float().to(self.device, self.dtype)), targets)

    def _parse(self, prompt: str):
        from pipelines.toy.world import parse_caption

        try:
            return parse_caption(prompt)
        except ValueError as err:
            raise ValueError(f"reward {self.name}: not a toy-world caption: {prompt!r} ({err})") from None


def build_toy_attribute_net(path=None) -> ToyAttributeNet:
    """The toy attribute net from a folder (config.json + model.safetensors), frozen."""
    from pipelines.toy import TOY_ATTRIBUTES
    from pipelines.toy.attribute_net import load_attribute_net

    folder = Path(path) if path is not None else TOY_ATTRIBUTES
    missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
    if missing:
        raise WeightsNotFoundError(f"toy_attribute_net: {folder} has no {' or '.join(missing)}; rebuild it with "
                                   "scripts/build_toy_world.py --stages attributes")
    return ToyAttributeNet(load_attribute_net(folder)).freeze()
