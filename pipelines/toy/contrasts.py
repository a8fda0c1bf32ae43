"""Contrast sets: a scene and variants of it that differ in one attribute, rendered with the true caption.

A reward that is to tell a prompt's image from near misses (the asked shape drawn as another, the right
object in the wrong cell, one of two objects missing) learns that ranking best from sets that differ in
exactly that. For a caption's scene, each variant changes one thing:

    shape       one object's shape             colour      one object's colour
    position    one object's cell              size        one object's size
    background  the background colour          drop        one of two objects removed

Variants stay drawable (`is_feasible`) and use only the (colour, shape) pairs of `allowed` (by default the
training split's, so a contrast set built from the train split never shows a held-out combination). Every
candidate of a set is captioned with the *original* scene's caption: candidate 0 matches it, the others
miss by one attribute. scripts/pretrain_lrm.py (`--renders`) fits RG-LCD's latent reward model on such sets.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .world import (BACKGROUND_COLOURS, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, TRAIN_COMBINATIONS, SceneSpec,
                    canonical_order, caption, is_feasible, place, render, sample_spec)

CHANGES = ("shape", "colour", "position", "size", "background", "drop")


def _replace(spec: SceneSpec, index: int, **change) -> SceneSpec:
    objects = list(spec.objects)
    objects[index] = dataclasses.replace(objects[index], **change)
    return SceneSpec(canonical_order(objects), spec.background)


def variants(spec: SceneSpec, kind: str, allowed=TRAIN_COMBINATIONS) -> list[SceneSpec]:
    """Every drawable scene that differs from `spec` by one change of `kind`, objects within `allowed`."""
    if kind not in CHANGES:
        raise ValueError(f"change must be one of {CHANGES}, got {kind!r}")
    out = []
    if kind == "background":
        out = [SceneSpec(spec.objects, c) for c in BACKGROUND_COLOURS if c != spec.background]
    elif kind == "drop":
        out = [SceneSpec(spec.objects[:i] + spec.objects[i + 1:], spec.background)
               for i in range(len(spec.objects))] if len(spec.objects) == 2 else []
    else:
        values = {"shape": SHAPES, "colour": tuple(OBJECT_COLOURS), "position": POSITIONS, "size": tuple(SIZES)}[kind]
        for i, obj in enumerate(spec.objects):
            out += [_replace(spec, i, **{kind: v}) for v in values if v != getattr(obj, kind)]
    allowed = set(allowed)
    return [s for s in out if is_feasible(s) and all((o.colour, o.shape) in allowed for o in s.objects)]


def contrast_set(spec: SceneSpec, k: int, rng: np.random.Generator, allowed=TRAIN_COMBINATIONS) -> list[SceneSpec]:
    """[spec, then k - 1 distinct one-change variants]: each variant's kind is drawn uniformly among the kinds
    that still have one (so the 8 other cells do not crowd out the 2 other shapes), then the variant within it."""
    if k < 2:
        raise ValueError(f"a contrast set needs k >= 2 candidates, got {k}")
    pools = {kind: variants(spec, kind, allowed) for kind in CHANGES}
    chosen = [spec]
    while len(chosen) < k:
        kinds = [kind for kind, pool in pools.items() if pool]
        if not kinds:
            raise ValueError(f"only {len(chosen) - 1} one-change variants of {caption(spec)!r}; ask for fewer")
        pool = pools[kinds[int(rng.integers(len(kinds)))]]
        chosen.append(pool.pop(int(rng.integers(len(pool)))))
    return chosen


def render_contrast_sets(n: int, k: int, seed: int = 0, resolution: int = 32) -> tuple[torch.Tensor, list[str]]:
    """n sets of k renders [n, k, 3, H, W] in [-1, 1] and the n captions they are judged against (candidate 0
    of each set is its caption's scene). Scenes and variants keep to the training split's combinations."""
    rng = np.random.default_rng([seed, 7])
    images, prompts = [], []
    for _ in range(n):
        specs = contrast_set(sample_spec(rng, "train"), k, rng)
        pixels = np.stack([render(place(s, rng), resolution) for s in specs])
        images.append(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
        prompts.append(caption(specs[0]))
    return torch.stack(images), prompts
