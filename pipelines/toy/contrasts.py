"""Contrast sets: a scene and variants of it that differ in one attribute, rendered with the true caption.

A reward that is to tell a prompt's image from near misses (the asked shape drawn as another, the right
object in the wrong cell, one of two objects missing) learns that ranking best from sets that differ in
exactly that. For a caption's scene, each variant changes one thing:

    shape       one object's shape             colour      one object's colour
    position    one object's cell              size        one object's size
    background  the background colour          drop        one of two objects removed
    drift       one object moved a third to a half of a cell off its place, toward a neighbouring cell

The last is the miss a sampler makes most (an object between two cells, which the checker reads as the wrong
cell or not); the caption still names the cell the object came from.

Variants stay drawable (`is_feasible`) and use only the (colour, shape) pairs of `allowed` (by default the
training split's, so a contrast set built from the train split never shows a held-out combination). Every
candidate of a set is captioned with the *original* scene's caption: candidate 0 matches it, the others
miss by one attribute. scripts/pretrain_lrm.py (`--renders`) fits RG-LCD's latent reward model on such sets.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .world import (BACKGROUND_COLOURS, MARGIN, MIN_GAP, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, TRAIN_COMBINATIONS,
                    Scene, SceneSpec, _gap, canonical_order, caption, is_feasible, place, render, sample_spec)

SPEC_CHANGES = ("shape", "colour", "position", "size", "background", "drop")  # changes of what a caption says
CHANGES = SPEC_CHANGES + ("drift",)
DRIFT = (11 / 96, 16 / 96)  # how far a drifted centre moves, in image sides: a third to a half of a cell (1/3)


def _replace(spec: SceneSpec, index: int, **change) -> SceneSpec:
    objects = list(spec.objects)
    objects[index] = dataclasses.replace(objects[index], **change)
    return SceneSpec(canonical_order(objects), spec.background)


def variants(spec: SceneSpec, kind: str, allowed=TRAIN_COMBINATIONS) -> list[SceneSpec]:
    """Every drawable scene that differs from `spec` by one change of `kind`, objects within `allowed`."""
    if kind not in SPEC_CHANGES:
        raise ValueError(f"change must be one of {SPEC_CHANGES}, got {kind!r}")
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


def drifted(scene: Scene, rng: np.random.Generator, tries: int = 16) -> Scene | None:
    """`scene` with one object's centre moved by a distance in DRIFT along one of the 8 compass directions,
    still MARGIN inside the frame and MIN_GAP from the other object; None when no try fits."""
    objects = scene.spec.objects
    for _ in range(tries):
        i = int(rng.integers(len(objects)))
        angle = np.pi / 4 * int(rng.integers(8))
        step = rng.uniform(*DRIFT) / max(abs(np.cos(angle)), abs(np.sin(angle)))  # diagonals move DRIFT per axis
        r = SIZES[objects[i].size]
        x, y = (c + step * f(angle) for c, f in zip(scene.centres[i], (np.cos, np.sin)))
        if not (r + MARGIN <= x <= 1 - r - MARGIN and r + MARGIN <= y <= 1 - r - MARGIN):
            continue
        centres = list(scene.centres)
        centres[i] = (float(x), float(y))
        if len(objects) < 2 or _gap(objects[0], centres[0], objects[1], centres[1]) >= MIN_GAP:
            return Scene(scene.spec, tuple(centres))
    return None


def contrast_set(spec: SceneSpec, k: int, rng: np.random.Generator, allowed=TRAIN_COMBINATIONS,
                 changes: tuple[str, ...] = CHANGES) -> list[Scene]:
    """[spec placed, then k - 1 distinct variants of it, each one change in `changes`]: each variant's kind is
    drawn uniformly among the kinds that still have one (so the 8 other cells do not crowd out the 2 other
    shapes), then the variant within it."""
    if k < 2:
        raise ValueError(f"a contrast set needs k >= 2 candidates, got {k}")
    unknown = set(changes) - set(CHANGES)
    if unknown:
        raise ValueError(f"changes must be among {CHANGES}, got {sorted(unknown)}")
    scene = place(spec, rng)
    pools = {kind: variants(spec, kind, allowed) for kind in changes if kind != "drift"}
    can_drift = "drift" in changes
    chosen = [scene]
    while len(chosen) < k:
        kinds = [kind for kind, pool in pools.items() if pool] + ["drift"] * can_drift
        if not kinds:
            raise ValueError(f"only {len(chosen) - 1} one-change variants of {caption(spec)!r}; ask for fewer")
        kind = kinds[int(rng.integers(len(kinds)))]
        if kind == "drift":
            moved = drifted(scene, rng)
            can_drift = moved is not None
            chosen += [moved] if can_drift else []
        else:
            pool = pools[kind]
            chosen.append(place(pool.pop(int(rng.integers(len(pool)))), rng))
    return chosen


def render_contrast_sets(n: int, k: int, seed: int = 0, resolution: int = 32,
                         changes: tuple[str, ...] = CHANGES) -> tuple[torch.Tensor, list[str]]:
    """n sets of k renders [n, k, 3, H, W] in [-1, 1] and the n captions they are judged against (candidate 0
    of each set is its caption's scene). Scenes and variants keep to the training split's combinations."""
    rng = np.random.default_rng([seed, 7])
    images, prompts = [], []
    for _ in range(n):
        scenes = contrast_set(sample_spec(rng, "train"), k, rng, changes=changes)
        pixels = np.stack([render(s, resolution) for s in scenes])
        images.append(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
        prompts.append(caption(scenes[0]))
    return torch.stack(images), prompts
