"""The toy attribute net: a small CNN that reads a scene's attributes off a render, a differentiable checker.

The exact checker (checker.py) judges an image against its caption but has no
gradient. This net predicts, as logits, everything the checker checks: the
background colour, and for each cell of the 3x3 grid whether an object is
there and, if so, its colour, shape and size. The log-likelihood of a
caption's attributes under these predictions,

    log p(background) + sum over the 9 cells of log p(occupied or empty)
                      + sum over the caption's objects of log p(colour) + log p(shape) + log p(size)

(at the object's cell; nats, 0 = certain) is differentiable in the pixels, so
it serves as the reward `toy_attribute_net`. Training minimises exactly its
negative (cross-entropy on every head, the object heads only on occupied
cells), so the reward is the quantity the net was fitted to.

The net trains on the "train" split only: held-out (colour, shape) pairs are
never seen, so its accuracy on held-out renders measures whether it reads
colour and shape separately (it does by construction: see `AttributeNet`).
Generated images come out of the toy VAE, so a share of every batch is
train-split renders passed through it (`decoded_pool`), and the rest are
augmented with the degradations a decoder brings (blur, a global colour
shift, noise). docs/toy_world.md ("Attribute net") has the measurements.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .world import (BACKGROUND_COLOURS, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, ObjectSpec, SceneSpec,
                    canonical_order, caption, parse_caption, render, sample_scene)

RESOLUTION = 32
CELLS = len(POSITIONS)
COLOURS, SIZE_NAMES = tuple(OBJECT_COLOURS), tuple(SIZES)
HEADS = {"occupied": 2, "colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZE_NAMES)}
OBJECT_HEADS = ("colour", "shape", "size")  # read only where the caption puts an object
# The closest two palette colours are 92 of 255 apart (orange, yellow), 0.72 in [-1, 1] units, so every object
# pixel reads at least tanh(0.72 / 0.4) = 0.95 on the foreground map: the map shows where objects are, not how
# much they contrast (which would hint at their colour). tanh rather than a clamp keeps a gradient inside.
CONTRAST = 0.4
CHANGES = ("colour", "shape", "size", "position", "background")  # one-attribute-off captions of `ranking_report`


@dataclass(frozen=True)
class AttributeNetSpec:
    """Widths of the colour-blind trunk at 32x32, 16x16 and 8x8; of the per-pixel colour embedding; of the heads."""

    channels: tuple[int, ...] = (16, 32, 48)
    colour_width: int = 32
    hidden: int = 64
    norm_groups: int = 8


@dataclass
class AttributeLogits:
    """Unnormalised log-probabilities: background [B, 9]; per cell [B, 9, classes] for the other heads."""

    background: Tensor
    occupied: Tensor
    colour: Tensor
    shape: Tensor
    size: Tensor


@dataclass
class SceneTargets:
    """Class indices of what a caption says: background [B]; per cell [B, 9], -1 where no object is asked."""

    background: Tensor
    occupied: Tensor
    colour: Tensor
    shape: Tensor
    size: Tensor


# ------------------------------------------------------------------ the net


def _conv(c_in: int, c_out: int, groups: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(min(groups, c_out), c_out), nn.SiLU())


def _mlp(c_in: int, hidden: int, c_out: int, pixelwise: bool = False) -> nn.Sequential:
    layer = (lambda a, b: nn.Conv2d(a, b, 1)) if pixelwise else nn.Linear
    return nn.Sequential(layer(c_in, hidden), nn.SiLU(), layer(hidden, c_out))


def background_rgb(images: Tensor) -> Tensor:
    """[B, 3]: the per-channel median pixel, which is the background's colour: the background covers more
    than half of every scene (two large objects take at most ~45% of the frame)."""
    return images.flatten(2).median(-1).values


def foreground(images: Tensor, background: Tensor) -> Tensor:
    """[B, 1, H, W] in [0, 1): tanh(|x - background| / CONTRAST), colour-blind on purpose (see AttributeNet)."""
    d2 = (images - background[:, :, None, None]).pow(2).sum(1, keepdim=True)
    return torch.tanh((d2 + 1e-6).sqrt() / CONTRAST)  # the epsilon keeps the gradient finite on the background


class AttributeNet(nn.Module):
    """Reads colour and shape in separate branches, so that a (colour, shape) pair never seen in training is
    read as well as the pairs that were.

    A plain CNN on RGB (0.1M parameters, 1,200 steps) decoded 100% of held-in scenes but 45% of held-out
    ones (colour 84%, shape 72%): it had learned "orange blob, so not a circle". Here
    * background: an MLP on the image's median colour;
    * occupied, shape, size: a CNN on the colour-blind foreground map (how far each pixel is from the
      background, saturated): 32x32 -> 8x8 (receptive field 21 px, more than the 14 px of a large object),
      average-pooled to the 3x3 grid. The pooled cells overlap (8 / 3 is not whole), which a cell needs: a
      large object spills into the next cell, and telling "centred here" from "spilling in" takes both;
    * colour: a per-pixel (1x1) embedding of the RGB values (and the background's), averaged over each
      cell's third of the image with the foreground map times a learned per-pixel gate as weights. It sees
      no shape, and the cell windows of two objects never overlap (a scene's two objects sit in
      non-adjacent cells).
    """

    def __init__(self, spec: AttributeNetSpec = AttributeNetSpec()):
        super().__init__()
        self.spec = spec
        c1, c2, c3 = spec.channels
        g = spec.norm_groups
        self.trunk = nn.Sequential(_conv(1, c1, g), _conv(c1, c2, g, 2), _conv(c2, c2, g), _conv(c2, c3, g, 2),
                                   _conv(c3, c3, g))
        self.layout = _mlp(c3, spec.hidden, HEADS["occupied"] + HEADS["shape"] + HEADS["size"], pixelwise=True)
        self.pixel_colour = _mlp(6, spec.colour_width, spec.colour_width + 1, pixelwise=True)  # embedding, gate
        self.colour = _mlp(spec.colour_width, spec.hidden, HEADS["colour"])
        self.background = _mlp(3, spec.hidden, len(BACKGROUND_COLOURS))

    def forward(self, images: Tensor) -> AttributeLogits:
        """images: B x 3 x H x W in [-1, 1]; other sizes are resized to 32x32 (differentiably)."""
        if images.shape[-2:] != (RESOLUTION, RESOLUTION):
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False,
                                   antialias=True)
        bg = background_rgb(images)
        a = foreground(images, bg)
        layout = self.layout(F.adaptive_avg_pool2d(self.trunk(a), 3)).flatten(2).transpose(1, 2)  # [B, 9, 7]
        occupied, shape, size = layout.split([HEADS["occupied"], HEADS["shape"], HEADS["size"]], dim=-1)
        colour = self.colour(self._cell_colours(images, bg, a))
        return AttributeLogits(self.background(bg), occupied, colour, shape, size)

    def _cell_colours(self, images: Tensor, bg: Tensor, a: Tensor) -> Tensor:
        """[B, 9, colour_width]: per-pixel colour embeddings averaged over each cell's window, weighted by the
        foreground map times a learned per-pixel gate (blends of object and background, which a blur or a
        VAE leaves around every edge and which read as a third colour, can be given less weight)."""
        bg_map = bg[:, :, None, None].expand_as(images)
        e, gate = self.pixel_colour(torch.cat([images, bg_map], 1)).split([self.spec.colour_width, 1], dim=1)
        w = a * torch.sigmoid(gate)
        pooled = F.adaptive_avg_pool2d(e * w, 3) / F.adaptive_avg_pool2d(w, 3).clamp(min=1e-4)
        return pooled.flatten(2).transpose(1, 2)


def build_attribute_net(spec: AttributeNetSpec = AttributeNetSpec(), seed: int = 0) -> AttributeNet:
    """An untrained net (init seeded without touching the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AttributeNet(spec)


def save_attribute_net(net: AttributeNet, folder, report: dict | None = None) -> None:
    """config.json (the spec, plus measured numbers if given) and model.safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": "AttributeNet", "resolution": RESOLUTION, **asdict(net.spec)}
    if report:
        config["measured"] = report
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))


def load_attribute_net(folder) -> AttributeNet:
    """The net saved in `folder`, in eval mode."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    spec = AttributeNetSpec(tuple(config["channels"]), config["colour_width"], config["hidden"], config["norm_groups"])
    net = AttributeNet(spec)
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net.eval()


# ------------------------------------------------------------------ captions <-> targets, the log-likelihood


def scene_targets(specs: list[SceneSpec], device: torch.device | str = "cpu") -> SceneTargets:
    """What the checker would check, as class indices per head."""
    t = {k: torch.full((len(specs), CELLS), -1, dtype=torch.long) for k in HEADS}
    t["occupied"].zero_()
    for i, spec in enumerate(specs):
        for o in spec.objects:
            cell = POSITIONS.index(o.position)
            t["occupied"][i, cell] = 1
            t["colour"][i, cell] = COLOURS.index(o.colour)
            t["shape"][i, cell] = SHAPES.index(o.shape)
            t["size"][i, cell] = SIZE_NAMES.index(o.size)
    background = torch.tensor([BACKGROUND_COLOURS.index(s.background) for s in specs], dtype=torch.long)
    return SceneTargets(background.to(device), **{k: v.to(device) for k, v in t.items()})


def _log_prob(logits: Tensor, target: Tensor) -> Tensor:
    """log softmax(logits)[target] along the last axis; 0 where target is -1 (nothing asked)."""
    picked = logits.float().log_softmax(-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(target >= 0, picked, torch.zeros_like(picked))


def caption_log_likelihood(logits: AttributeLogits, targets: SceneTargets) -> Tensor:
    """float32 [B]: sum of the log-probabilities (nats) of the caption's checks; 0 = certain.

    One term for the background, one per cell for occupied-or-empty (which also fixes the object count),
    and colour, shape and size at each asked object's cell: 1 + 9 + 3 x objects terms in all.
    """
    ll = _log_prob(logits.background, targets.background)
    ll = ll + _log_prob(logits.occupied, targets.occupied).sum(1)
    for head in OBJECT_HEADS:
        ll = ll + _log_prob(getattr(logits, head), getattr(targets, head)).sum(1)
    return ll


def decode(logits: AttributeLogits) -> list[SceneSpec]:
    """The most likely scene, head by head: the argmax background, the cells whose argmax says occupied,
    and the argmax colour, shape and size there."""
    background = logits.background.argmax(-1).tolist()
    heads = {k: getattr(logits, k).argmax(-1).tolist() for k in HEADS}
    specs = []
    for i, bg in enumerate(background):
        objects = [ObjectSpec(SIZE_NAMES[heads["size"][i][c]], COLOURS[heads["colour"][i][c]],
                              SHAPES[heads["shape"][i][c]], POSITIONS[c])
                   for c in range(CELLS) if heads["occupied"][i][c]]
        specs.append(SceneSpec(canonical_order(objects), BACKGROUND_COLOURS[bg]))
    return specs


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


def one_attribute_off(spec: SceneSpec, kind: str, rng: np.random.Generator) -> SceneSpec | None:
    """The spec with one object's colour, shape, size or position, or the background, changed to another value
    drawn at random (the result may name a held-out pair); None when no feasible change of that kind exists."""
    from .clip_training import one_off  # imports transformers, which the net itself does not need

    return one_off(spec, rng, kind, allow_heldout=True)


def ranking_report(reward: Callable[[Tensor, list[str]], Tensor], images: Tensor, specs: list[SceneSpec],
                   seed: int = 0) -> dict[str, float]:
    """Per kind of change: the share of images whose reward with the true caption beats the reward with a
    caption that differs in exactly that one attribute."""
    rng = np.random.default_rng([seed, 17])
    true = reward(images, [caption(s) for s in specs])
    report = {}
    for kind in CHANGES:
        rows, captions = [], []
        for i, spec in enumerate(specs):
            other = one_attribute_off(spec, kind, rng)
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
