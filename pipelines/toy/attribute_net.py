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
train-split renders passed through it, and the rest are augmented with the
degradations a decoder brings (blur, a global colour shift, noise): training
and the measurements live in pipelines/toy/attribute_training.py, the numbers
in docs/toy_world.md ("Attribute net").
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .world import (BACKGROUND_COLOURS, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES, ObjectSpec, SceneSpec,
                    canonical_order)

RESOLUTION = 32
CELLS = len(POSITIONS)
COLOURS, SIZE_NAMES = tuple(OBJECT_COLOURS), tuple(SIZES)
HEADS = {"occupied": 2, "colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZE_NAMES)}
OBJECT_HEADS = ("colour", "shape", "size")  # read only where the caption puts an object
# The closest two palette colours are 92 of 255 apart (orange, yellow), 0.72 in [-1, 1] units, so every object
# pixel reads at least tanh(0.72 / 0.4) = 0.95 on the foreground map: the map shows where objects are, not how
# much they contrast (which would hint at their colour). tanh rather than a clamp keeps a gradient inside.
CONTRAST = 0.4


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
