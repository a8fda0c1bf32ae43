"""Training and measuring the toy attribute net (pipelines/toy/attribute_net.py): fresh train-split renders
with VAE-like degradations, a share decoded by the toy VAE itself, and the per-split reports the build writes
into the net's config.json (scripts/build_toy_world.py, stage "attributes").
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .attribute_net import (HEADS, OBJECT_HEADS, RESOLUTION, AttributeLogits, AttributeNet, SceneTargets,
                            caption_log_likelihood, decode, scene_targets)
from .clip_training import one_off
from .world import SceneSpec, caption, parse_caption, render, sample_scene

CHANGES = ("colour", "shape", "size", "position", "background")  # one-attribute-off captions of `ranking_report`


# ------------------------------------------------------------------ data and training


def render_batch(rng: np.random.Generator, n: int, split: str = "train") -> tuple[Tensor, list[SceneSpec]]:
    """n fresh scenes of `split`: images [n, 3, 32, 32] in [-1, 1] and their specs."""
    scenes = [sample_scene(rng, split) for _ in range(n)]
    pixels = torch.from_numpy(np.stack([render(s, RESOLUTION) for s in scenes])).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0, [s.spec for s in scenes]


def _gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per image (replicate padding, as the checker's blur)."""
    b, c, h, w = images.shape
    x = torch.arange(-2, 3, dtype=images.dtype)
    kernel = torch.exp(-x**2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B * C, 5]
    flat = images.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def _down_up(images: Tensor) -> Tensor:
    """2x average pool, bilinear back up: what a factor-2 VAE's lost detail looks like, roughly."""
    return F.interpolate(F.avg_pool2d(images, 2), scale_factor=2, mode="bilinear", align_corners=False)


def augment(images: Tensor, generator: torch.Generator, p: float = 0.75, p_down_up: float = 0.3,
            max_sigma: float = 1.2, max_shift: float = 0.1, max_noise: float = 0.04) -> Tensor:
    """VAE-like degradations on a random `p` of the batch: a 2x down-up (on `p_down_up` of those) or a Gaussian
    blur (sigma up to `max_sigma` px), then a global per-channel colour shift and pixel noise (both in [-1, 1]
    units; 0.1 is ~13 of 255), clamped to [-1, 1]."""
    b = len(images)
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    on, down_up = (u(b) < p).float(), (u(b) < p_down_up).float()[:, None, None, None]
    out = torch.lerp(_gaussian_blur(images, u(b) * max_sigma), _down_up(images), down_up)
    noise = torch.randn(out.shape, generator=generator) * u(b, 1, 1, 1) * max_noise
    out = out + (u(b, 3, 1, 1) * 2 - 1) * max_shift + noise
    return torch.lerp(images, out.clamp(-1, 1), on[:, None, None, None])


def attribute_loss(net: AttributeNet, images: Tensor, targets: SceneTargets) -> Tensor:
    """Per-image negative log-likelihood of the caption: cross-entropy summed over every head."""
    return -caption_log_likelihood(net(images), targets)


def decoded_pool(reconstruct: Callable[[Tensor], Tensor], n: int, seed: int = 0,
                 batch_size: int = 256) -> tuple[Tensor, list[SceneSpec]]:
    """n fresh train-split renders passed through `reconstruct` (e.g. the toy VAE's decode(encode(x))), and
    their specs: the decoder's own artefacts, which every generated image carries."""
    images, specs = render_batch(np.random.default_rng([seed, 19]), n, "train")
    with torch.no_grad():
        decoded = torch.cat([reconstruct(images[i:i + batch_size]) for i in range(0, n, batch_size)])
    return decoded.clamp(-1, 1), specs


def train_attribute_net(net: AttributeNet, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                        decoded: tuple[Tensor, list[SceneSpec]] | None = None, decoded_share: float = 0.25,
                        log: Callable[[str], None] = print, log_every: int = 100) -> AttributeNet:
    """AdamW with warm-up and cosine decay on fresh, augmented renders of the train split (never held out);
    with `decoded` (a `decoded_pool`), that share of every batch is drawn from the pool instead."""
    rng = np.random.default_rng([seed, 13])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    k = round(batch_size * decoded_share) if decoded is not None else 0
    net.train()
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        images, specs = render_batch(rng, batch_size - k, "train")
        if k:
            index = rng.choice(len(decoded[1]), size=k, replace=False)
            images = torch.cat([images, decoded[0][index]])
            specs = specs + [decoded[1][i] for i in index]
        loss = attribute_loss(net, augment(images, generator), scene_targets(specs)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log(f"  attribute net step {step + 1}/{steps}  nll {float(loss.detach()):.4f}  "
                f"({(step + 1) / (time.perf_counter() - start):.1f} steps/s)")
    return net.eval()


# ------------------------------------------------------------------ measurements


@torch.no_grad()
def _logits(net: AttributeNet, images: Tensor, batch_size: int = 500) -> AttributeLogits:
    parts = [net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return AttributeLogits(*(torch.cat([getattr(p, k) for p in parts]) for k in ("background", *HEADS)))


def accuracy_report(net: AttributeNet, images: Tensor, specs: list[SceneSpec]) -> dict[str, float]:
    """Per-head accuracy (background per image, occupied per cell, the object heads per asked object) and the
    share of images whose whole decoded scene equals the caption's."""
    logits, t = _logits(net, images), scene_targets(specs)
    asked = t.occupied == 1
    report = {"exact": float(np.mean([a == b for a, b in zip(decode(logits), specs)])),
              "background": float((logits.background.argmax(-1) == t.background).float().mean()),
              "occupied": float((logits.occupied.argmax(-1) == t.occupied).float().mean())}
    for head in OBJECT_HEADS:
        report[head] = float((getattr(logits, head).argmax(-1) == getattr(t, head))[asked].float().mean())
    return report


def ranking_report(reward: Callable[[Tensor, list[str]], Tensor], images: Tensor, specs: list[SceneSpec],
                   seed: int = 0) -> dict[str, float]:
    """Per kind of change: the share of images whose reward with the true caption beats the reward with a
    caption that differs in exactly that one attribute (None from `one_off`: no feasible change of that kind)."""
    rng = np.random.default_rng([seed, 17])
    true = reward(images, [caption(s) for s in specs])
    report = {}
    for kind in CHANGES:
        rows, captions = [], []
        for i, spec in enumerate(specs):
            other = one_off(spec, rng, kind, allow_heldout=True)  # may name a held-out pair
            if other is not None:
                rows.append(i)
                captions.append(caption(other))
        if rows:  # a tiny sample may hold no scene with a feasible change of this kind
            report[kind] = float((true[rows] > reward(images[rows], captions)).float().mean())
    return report


def net_reward(net: AttributeNet) -> Callable[[Tensor, list[str]], Tensor]:
    """`caption_log_likelihood` as a plain function of (images, captions), for `ranking_report`."""

    @torch.no_grad()
    def reward(images: Tensor, captions: list[str]) -> Tensor:
        return caption_log_likelihood(_logits(net, images), scene_targets([parse_caption(c) for c in captions]))

    return reward


def measure(net: AttributeNet, n: int, seed: int = 1,
            reconstruct: Callable[[Tensor], Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Accuracy and one-attribute-off ranking on n fresh renders of each split (rng seeded by (seed, split)),
    and, given `reconstruct`, the same on their reconstructions ("heldin_decoded", "heldout_decoded")."""
    report = {}
    for k, split in enumerate(("train", "heldout")):
        name = "heldin" if split == "train" else split
        images, specs = render_batch(np.random.default_rng([seed, k]), n, split)
        versions = {name: images}
        if reconstruct is not None:
            with torch.no_grad():
                versions[f"{name}_decoded"] = reconstruct(images).clamp(-1, 1)
        for key, x in versions.items():
            ranking = ranking_report(net_reward(net), x, specs, seed)
            report[key] = {**accuracy_report(net, x, specs), **{f"beats_{c}": v for c, v in ranking.items()}}
    return report
