"""Synthetic training inputs for scripts/bench.py: what each trainer's data contract asks for, built in code.

Every registered method gets the batch layout its real data would give it, at the run's
resolution, with nothing read from disk or downloaded:

    images       {pixel_values [3,H,W] in [-1,1], prompt}          sft, lcd, rg_lcd, fdistill, reflow phased
    labelled     {pixel_values, label +1/-1, prompt}              dpo with loss kto
    prompts      {prompt}                                          tbcm, distill_dpo
    preferences  {pixel_values_w, pixel_values_l, prompt}          dpo (paired losses)
    noise pairs  {x_T, x_0 [C,h,w] latents, prompt}                reflow (plain; scripts/make_pairs.py's items)

`method_overrides(method)` gives the data kind a method trains on by default and, for the
reward-driven methods (rg_lcd, distill_dpo), a reward that needs no downloaded weights: the
`toy_clip` reward on the toy CLIP shipped in pipelines/toy. `synthetic_dataset` then builds the stand-in for the resolved config's `data.kind`.
Item i depends on i only, so every run sees the same data.
"""
from __future__ import annotations

from typing import Callable

import torch

Dataset = torch.utils.data.Dataset


def _prompt(i: int) -> str:
    return f"a photo of object {i}"


def _image(resolution: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, resolution, resolution, generator=g) * 2 - 1


class _Synthetic(Dataset):
    def __init__(self, n: int = 64):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {**self.item(i), "prompt": _prompt(i), "skipped": 0, "index": i}

    def item(self, i: int) -> dict:
        return {}


class RandomImages(_Synthetic):
    def __init__(self, resolution: int, n: int = 64):
        super().__init__(n)
        self.resolution = resolution

    def item(self, i: int) -> dict:
        return {"pixel_values": _image(self.resolution, i)}


class RandomPrompts(_Synthetic):
    """Prompt-only items, as trainers.data.PromptDataset gives them."""


class RandomPreferencePairs(_Synthetic):
    """Winner / loser images, as trainers.preference_data's paired kinds give them."""

    def __init__(self, resolution: int, n: int = 64):
        super().__init__(n)
        self.resolution = resolution

    def item(self, i: int) -> dict:
        return {"pixel_values_w": _image(self.resolution, 2 * i), "pixel_values_l": _image(self.resolution, 2 * i + 1)}


class RandomNoisePairs(_Synthetic):
    """(x_T, x_0) latents, as trainers.pairs.PairsDataset gives them (without a text cache)."""

    def __init__(self, latent_shape: tuple[int, ...], n: int = 64):
        super().__init__(n)
        self.latent_shape = tuple(latent_shape)

    def item(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        x_T = torch.randn(self.latent_shape, generator=g)
        return {"x_T": x_T, "x_0": 0.5 * torch.randn(self.latent_shape, generator=g)}


class RandomLabelledImages(RandomImages):
    """Images labelled +1 / -1 in turn, as the KTO kinds (labelled_folder) give them."""

    def item(self, i: int) -> dict:
        return {**super().item(i), "label": torch.tensor(1.0 if i % 2 == 0 else -1.0)}


# Registry keyed by `data.kind`: the synthetic stand-in for each layout a trainer reads.
SYNTHETIC: dict[str, Callable[[int, object], Dataset]] = {
    "imagefolder": lambda resolution, bundle: RandomImages(resolution),
    "prompts": lambda resolution, bundle: RandomPrompts(),
    "preference_folder": lambda resolution, bundle: RandomPreferencePairs(resolution),
    "labelled_folder": lambda resolution, bundle: RandomLabelledImages(resolution),
    "pairs": lambda resolution, bundle: RandomNoisePairs(bundle.latent_shape(1, (resolution, resolution))[1:]),
}

_IMAGES = ("data.kind=imagefolder", "data.path=unused")
_PROMPTS = ("data.kind=prompts", "data.path=unused")

# Per method (keys of trainers.METHODS): the data kind it trains on by default. Later overrides on the
# command line win (e.g. reflow.variant=phased data.kind=imagefolder, or dpo.loss=kto data.kind=labelled_folder).
METHOD_DATA: dict[str, tuple[str, ...]] = {
    "sft": _IMAGES,
    "lcd": _IMAGES,
    "rg_lcd": _IMAGES,
    "fdistill": _IMAGES,
    "tbcm": _PROMPTS,
    "scm": _IMAGES,
    "distill_dpo": _PROMPTS,
    "dpo": ("data.kind=preference_folder", "data.path=unused"),
    "reflow": ("data.kind=pairs", "data.path=unused"),
}

# The config key through which a method names its reward.
REWARD_KEYS: dict[str, str] = {"rg_lcd": "rg_lcd.reward.name", "distill_dpo": "distill_dpo.reward"}


def method_overrides(method: str) -> list[str]:
    """Config overrides that give `method` its synthetic data (and, if it takes a reward, the shipped toy CLIP)."""
    if method not in METHOD_DATA:
        raise ValueError(f"no synthetic input for method {method!r}; known: {', '.join(METHOD_DATA)}")
    overrides = list(METHOD_DATA[method])
    if method in REWARD_KEYS:
        overrides.append(f"{REWARD_KEYS[method]}=toy_clip")
    return overrides


def synthetic_dataset(kind: str, resolution: int, bundle) -> Dataset:
    """The synthetic dataset for `data.kind` `kind` (the resolved config's, after every override)."""
    if kind not in SYNTHETIC:
        raise ValueError(f"no synthetic stand-in for data.kind {kind!r}; the benchmark has {', '.join(SYNTHETIC)}")
    return SYNTHETIC[kind](resolution, bundle)
