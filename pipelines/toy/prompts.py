"""Held-in and held-out prompt lists of the toy world, and their deterministic sampler.

Held-in prompts use only the (colour, shape) combinations the training sampler
draws; every held-out prompt contains at least one of
`world.HELDOUT_COMBINATIONS`, which no training image shows, so the gap between
the two measures compositional generalisation. Lists are distinct prompts and
depend only on (split, n, seed); a longer list extends a shorter one.
"""
from __future__ import annotations

import numpy as np

from .world import SPLITS, split_index, caption, sample_spec

EVAL_PROMPT_COUNT = 64


def toy_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """n distinct prompts of split "heldin" (alias "train") or "heldout"."""
    key = split_index(split)
    rng = np.random.default_rng([seed, key, 1])
    prompts: dict[str, None] = {}
    for _ in range(100 * n):
        if len(prompts) == n:
            break
        prompts[caption(sample_spec(rng, SPLITS[key]))] = None
    if len(prompts) < n:
        raise ValueError(f"could not draw {n} distinct {split} prompts; ask for fewer")
    return list(prompts)


# The fixed evaluation lists: what the README's toy results are measured on.
HELDIN_PROMPTS: tuple[str, ...] = tuple(toy_prompts("heldin", EVAL_PROMPT_COUNT, seed=0))
HELDOUT_PROMPTS: tuple[str, ...] = tuple(toy_prompts("heldout", EVAL_PROMPT_COUNT, seed=0))
