"""Reward models behind one call: ``reward(images, prompts) -> Tensor[B]``.

``build_reward(name, **options)`` builds a frozen reward from the plain-dict
registry ``REWARDS`` (keys are the names used in YAML). Images are float
tensors in [-1, 1], B x 3 x H x W, any device and dtype; preprocessing runs in
torch so gradients reach the images when ``reward.differentiable``. Each
reward's ``scale`` says what its numbers mean; docs/rewards.md lists
backbones, weight files and how to provide them offline. Nothing downloads:
missing weights raise ``WeightsNotFoundError`` naming the file and where to
put it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import torch

from .base import Reward, RewardModule
from .clip_rewards import build_clip_score, build_hpsv2, build_hpsv2_1, build_laion_aesthetic, build_pickscore
from .image_reward import build_image_reward
from .toy import build_toy_attribute_net, build_toy_attribute_score, build_toy_attributes, build_toy_clip
from .weighted import WeightedReward
from .weights import WeightsNotFoundError


def build_weighted(terms: Mapping[str, float] | Sequence[Mapping[str, Any]]) -> WeightedReward:
    """Sum of rewards. ``terms`` is ``{name: weight}`` or a list of ``{name, weight, **options}``
    (or ``{reward: <built reward>, weight}``), e.g. RG-LCD's ``{"hpsv2.1": 1.0, "image_reward": 0.1}``."""
    if isinstance(terms, Mapping):
        terms = [{"name": name, "weight": weight} for name, weight in terms.items()]
    built = []
    for term in terms:
        term = dict(term)
        if "weight" not in term:
            raise ValueError(f"weighted: term {term} has no 'weight'")
        weight = term.pop("weight")
        if "reward" in term:
            built.append((weight, term.pop("reward")))
            continue
        name = term.pop("name", None)
        if name is None or name == "weighted":
            raise ValueError(f"weighted: each term needs a 'name' of another reward, got {name!r}")
        built.append((weight, build_reward(name, **term)))
    return WeightedReward(built)


REWARDS: dict[str, Callable[..., Reward]] = {
    "clip_score": build_clip_score,
    "pickscore": build_pickscore,
    "hpsv2": build_hpsv2,
    "hpsv2.1": build_hpsv2_1,
    "image_reward": build_image_reward,
    "laion_aesthetic": build_laion_aesthetic,
    "toy_clip": build_toy_clip,
    "toy_attributes": build_toy_attributes,
    "toy_attribute_score": build_toy_attribute_score,
    "toy_attribute_net": build_toy_attribute_net,
    "weighted": build_weighted,
}


def accepted_options(name: str) -> set[str]:
    """The keyword options the builder of registered reward `name` takes (build_reward adds device and dtype)."""
    return set(inspect.signature(REWARDS[name]).parameters)


def build_reward(
    name: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **options: Any
) -> Reward:
    """Build reward ``name`` with its builder's ``options``, frozen, on ``device`` in ``dtype``."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    builder = REWARDS[name]
    accepted = accepted_options(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"reward {name!r}: unknown option(s) {unknown}; it accepts {sorted(accepted)}")
    reward = builder(**options)
    if device is not None or dtype is not None:
        reward = reward.to(device=device, dtype=dtype)
    return reward.requires_grad_(False).eval()


__all__ = ["REWARDS", "Reward", "accepted_options", "RewardModule", "WeightedReward", "WeightsNotFoundError", "build_reward"]
