"""The embedded toy world: procedural (image, caption) pairs of coloured shapes.

Every method in the suite has to run and be measured on a 2-core CPU with no
downloads, so the suite carries a text-to-image world of its own: one or two
shapes on a flat background, described by an exact caption such as

    "a small red circle at the top left on a blue background"
    "a large green square at the left and a small yellow triangle at the right on a gray background"

Everything about a scene is recoverable from its caption (`parse_caption` is the
exact inverse of `caption`), which is what lets `pipelines.toy.checker` score a
generated image against its prompt without a learned model.

Geometry is kept in units of the image side (0..1), so one scene renders at any
resolution; the constants below were chosen for 32x32 (see docs/toy_world.md
for the measurements behind them). A fixed set of (colour, shape) combinations
is held out: the training sampler never draws them, and held-out prompts always
contain at least one, so generalisation to unseen compositions is measurable.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
# Object colours, spread out in RGB (closest pair, orange/yellow, is ~93 apart)
# so that a VAE's blur and colour shift cannot turn one into another.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 230, 40),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (150, 50, 200),
}
# Backgrounds: any object colour (never one of the image's own objects) or a neutral.
PALETTE: dict[str, tuple[int, int, int]] = {
    **OBJECT_COLOURS,
    "gray": (128, 128, 128),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
BACKGROUND_COLOURS = tuple(PALETTE)
# Half extent of each size in image-side units: 5 px and 7 px at 32x32. Small
# objects of radius 4 fell apart under a 4x down-and-up VAE proxy (docs/toy_world.md);
# a large radius above 7 would leave no room for two large objects.
SIZES: dict[str, float] = {"small": 5 / 32, "large": 7 / 32}
# The 3x3 grid in row-major order; index = 3 * row + col.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# 3 of the 18 (colour, shape) combinations (16.7%): one per shape and per
# colour, so every colour and every shape is still seen in training.
HELDOUT_COMBINATIONS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "circle"), ("green", "square")}
)
TRAIN_COMBINATIONS = tuple(
    (c, s) for c in OBJECT_COLOURS for s in SHAPES if (c, s) not in HELDOUT_COMBINATIONS
)
JITTER = 1 / 32   # max centre offset per axis (1 px at 32x32)
MARGIN = 1 / 32   # objects stay this far inside the frame
MIN_GAP = 2 / 32  # free space between two objects along at least one axis
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object."""

    size: str
    colour: str
    shape: str
    position: str

    @property
    def cell(self) -> tuple[int, int]:
        """(row, col) of the object's cell in the 3x3 grid."""
        return divmod(POSITIONS.index(self.position), 3)


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says about a scene: objects in canonical order, background."""

    objects: tuple[ObjectSpec, ...]
    background: str


@dataclass(frozen=True)
class Scene:
    """A spec plus where each object's bounding-box centre lies, (x, y) in image-side units."""

    spec: SceneSpec
    centres: tuple[tuple[float, float], ...]


def canonical_order(objects) -> tuple[ObjectSpec, ...]:
    """Left to right, then top to bottom (cells are distinct, so the order is total)."""
    return tuple(sorted(objects, key=lambda o: (o.cell[1], o.cell[0])))


def is_heldout(obj: ObjectSpec) -> bool:
    return (obj.colour, obj.shape) in HELDOUT_COMBINATIONS


def _nominal_centre(obj: ObjectSpec) -> tuple[float, float]:
    """Cell centre, pulled inwards so the object stays MARGIN inside the frame."""
    row, col = obj.cell
    r = SIZES[obj.size]
    lo, hi = r + MARGIN, 1 - r - MARGIN
    return (min(max((col + 0.5) / 3, lo), hi), min(max((row + 0.5) / 3, lo), hi))


def _gap(a: ObjectSpec, ca, b: ObjectSpec, cb) -> float:
    """Free space between two bounding boxes along the better-separated axis (<0: overlap)."""
    r = SIZES[a.size] + SIZES[b.size]
    return max(abs(ca[0] - cb[0]) - r, abs(ca[1] - cb[1]) - r)


def is_feasible(spec: SceneSpec) -> bool:
    """Renderable without overlap: 1-2 objects, distinct cells, background unlike the objects.

    With the sizes above, two objects fit only in non-adjacent cells (no shared
    edge or corner), e.g. "left" and "right" or "top left" and "bottom".
    """
    objs = spec.objects
    if not 1 <= len(objs) <= 2 or len({o.position for o in objs}) != len(objs):
        return False
    if spec.background in {o.colour for o in objs}:
        return False
    if len(objs) == 2:
        a, b = objs
        return _gap(a, _nominal_centre(a), b, _nominal_centre(b)) >= MIN_GAP - 1e-9
    return True


def sample_spec(rng: np.random.Generator, split: str = "train") -> SceneSpec:
    """Draw a feasible scene spec. "train" never uses a held-out (colour, shape);
    "heldout" always contains at least one (its other object may be anything)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    heldout = sorted(HELDOUT_COMBINATIONS)
    every = TRAIN_COMBINATIONS + tuple(heldout)
    while True:
        n = int(rng.integers(1, 3))
        pools = [heldout if split == "heldout" else TRAIN_COMBINATIONS]
        pools += [every if split == "heldout" else TRAIN_COMBINATIONS] * (n - 1)
        cells = rng.choice(len(POSITIONS), size=n, replace=False)
        objects = []
        for pool, cell in zip(pools, cells):
            colour, shape = pool[int(rng.integers(len(pool)))]
            size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
            objects.append(ObjectSpec(size, colour, shape, POSITIONS[int(cell)]))
        free = [c for c in BACKGROUND_COLOURS if c not in {o.colour for o in objects}]
        spec = SceneSpec(canonical_order(objects), free[int(rng.integers(len(free)))])
        if is_feasible(spec):
            return spec


def place(spec: SceneSpec, rng: np.random.Generator, tries: int = 16) -> Scene:
    """Jitter each object's centre within JITTER, keeping MIN_GAP between objects."""
    if not is_feasible(spec):
        raise ValueError(f"scene cannot be drawn without overlap or clashing colours: {caption(spec)!r}")
    nominal = [_nominal_centre(o) for o in spec.objects]
    for _ in range(tries):
        centres = []
        for obj, (x, y) in zip(spec.objects, nominal):
            r = SIZES[obj.size]
            dx, dy = rng.uniform(-JITTER, JITTER, size=2)
            centres.append(tuple(float(np.clip(v, r + MARGIN, 1 - r - MARGIN)) for v in (x + dx, y + dy)))
        if len(centres) < 2 or _gap(spec.objects[0], centres[0], spec.objects[1], centres[1]) >= MIN_GAP:
            return Scene(spec, tuple(centres))
    return Scene(spec, tuple(nominal))  # nominal placement is feasible by construction


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """One random scene of the given split, deterministic in the generator's state."""
    return place(sample_spec(rng, split), rng)


def caption(scene: Scene | SceneSpec) -> str:
    """The exact caption, objects in canonical order."""
    spec = scene.spec if isinstance(scene, Scene) else scene
    phrases = [f"a {o.size} {o.colour} {o.shape} at the {o.position}" for o in canonical_order(spec.objects)]
    return f"{' and '.join(phrases)} on {_article(spec.background)} {spec.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_OBJECT_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) (\w+) ({'|'.join(SHAPES)}) at the ({'|'.join(POSITIONS)})"
)


def parse_caption(text: str) -> SceneSpec:
    """Inverse of `caption`: 'a <size> <colour> <shape> at the <position> [and ...] on a|an <bg> background'."""
    head, sep, tail = text.strip().rpartition(" on ")
    words = tail.split(" ")
    if not sep or len(words) != 3 or words[2] != "background":
        raise ValueError(f"caption must end with 'on a|an <colour> background': {text!r}")
    background = words[1]
    if background not in PALETTE or words[0] != _article(background):
        raise ValueError(f"background must be 'a|an <colour>' with colour in {list(PALETTE)}: {text!r}")
    objects = []
    for phrase in head.split(" and "):
        m = _OBJECT_RE.fullmatch(phrase)
        if m is None or m.group(2) not in OBJECT_COLOURS:
            raise ValueError(
                f"object phrase {phrase!r} is not 'a <small|large> <colour> <shape> at the <position>' "
                f"with colour in {list(OBJECT_COLOURS)}"
            )
        objects.append(ObjectSpec(m.group(1), m.group(2), m.group(3), m.group(4)))
    if len(objects) > 2 or len({o.position for o in objects}) != len(objects):
        raise ValueError(f"a caption names one or two objects in distinct cells: {text!r}")
    return SceneSpec(canonical_order(objects), background)


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Shapes share a 2r x 2r bounding box, so their fill ratios are pi/4, 1 and 1/2."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)  # apex up, base at the bottom


def render(scene: Scene, resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """uint8 [H, W, 3]; anti-aliased by drawing at `supersample`x and box-averaging."""
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / n
    x, y = coords[None, :], coords[:, None]
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = PALETTE[scene.spec.background]
    for obj, (cx, cy) in zip(scene.spec.objects, scene.centres):
        canvas[_inside(obj.shape, x - cx, y - cy, SIZES[obj.size])] = PALETTE[obj.colour]
    canvas = canvas.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
    return np.rint(canvas).astype(np.uint8)


def vocabulary() -> list[str]:
    """Every word a caption can contain, each once, in a fixed order."""
    words = ["a", "an", "and", "at", "the", "on", "background", *SIZES, *SHAPES, *PALETTE]
    words += [w for p in POSITIONS for w in p.split()]
    return list(dict.fromkeys(words))


def split_index(split: str) -> int:
    """Index into SPLITS; "heldin" is the training split seen from the prompt side."""
    if split == "heldin":
        split = "train"
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' (alias 'heldin') or 'heldout', got {split!r}")
    return SPLITS.index(split)


class ToyDataset(torch.utils.data.Dataset):
    """Map-style dataset of `size` scenes; item i depends only on (seed, split, i).

    Items follow the trainer contract: {"pixel_values": float32 [3, H, W] in
    [-1, 1], "prompt": str, "skipped": 0}.
    """

    def __init__(self, split: str = "train", size: int = 10_000, seed: int = 0, resolution: int = 32):
        self.split_key = split_index(split)
        self.split = SPLITS[self.split_key]
        self.size, self.seed, self.resolution = int(size), int(seed), int(resolution)

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ToyDataset of size {self.size}")
        return sample_scene(np.random.default_rng([self.seed, self.split_key, index]), self.split)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        pixels = torch.from_numpy(render(scene, self.resolution)).permute(2, 0, 1).float()
        return {"pixel_values": pixels / 127.5 - 1.0, "prompt": caption(scene), "skipped": 0}


# Prompt lists live in prompts.py; re-exported here for callers that import them from the world.
from .prompts import toy_prompts  # noqa: E402, F401  (prompts.py needs the names above)
