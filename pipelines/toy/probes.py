"""What a toy teacher takes from its caption: probes (`scripts/toy_probe.py`).

* `conditioning_gain`: the error of the denoiser's x_0 estimate on real renders at timestep t, with the true
  caption, with one attribute of it changed (colour, shape, size or position of one object) and with the empty
  caption. Changing a word the model reads raises the error; changing one it ignores leaves it where it was.
* `position_response`: one initial noise, one object, the nine position words. A model that follows the words
  puts the object in nine different cells; one that takes the layout from the noise puts it in the same cell
  whatever the words say (then 1 in 9 lands in the asked cell, by chance).
* `failures`: which of the checker's checks its samples fail (background, count, colour, shape, size, cell).
* `shape_readout`: whether the text tower's state at a shape word still carries the shape when the colour
  before it was never paired with that shape in training (the held-out combinations), read by a linear
  map fitted on the seen pairs, and how close the unseen pair's state lies to seen pairs of the same colour
  and of the same shape.
* `unseen_pair_failures`: whether the denoiser draws a held-out colour-shape pair when its text states are built
  from seen pairs only (token by token, E(colour, seen shape) + E(donor, shape) - E(donor, seen shape)), beside
  the caption's own states and the donor colour's seen pair in the same scenes. If the analogy states fixed the
  shape, the text tower's entangled state would be what the denoiser lacks; if not, the denoiser itself does.
* `shape_contrast_failures`: whether the denoiser's own predictions already carry a held-out pair's shape, too
  weakly to show: guidance gains a term s (c - mean_k n_k) that pushes away from the same caption with the other
  shapes (`contrast_guided`). If a moderate s fixes the unseen pair's shape while leaving the seen control
  intact, the composition is there and needs strength (more training); if no s does, it is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipelines.conditioning import Conditioning
from pipelines.samplers import ModelFn, Predict, Schedule, sample_ddim
from pipelines.schedules import append_dims, to_x0_eps
from pipelines.toy.checker import check, failure_rates
from pipelines.toy.clip_training import one_off
from pipelines.toy.world import (BACKGROUND_COLOURS, HELDOUT_COMBINATIONS, OBJECT_COLOURS, POSITIONS, SHAPES, SIZES,
                                  TRAIN_COMBINATIONS,
                                  ObjectSpec, SceneSpec, caption, render, sample_scene, toy_prompts)

CHANGED = ("colour", "shape", "size", "position")


def _renders(n: int, seed: int) -> tuple[torch.Tensor, list]:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, "train") for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, [s.spec for s in scenes]


def _captions(specs: list, seed: int) -> dict[str, list[str]]:
    """The true captions, each one-attribute-off variant (the true caption where none is feasible), and ""."""
    captions = {"true": [caption(s) for s in specs]}
    for kind in CHANGED:
        rng = np.random.default_rng(seed)
        captions[kind] = [caption(one_off(s, rng, kind, allow_heldout=True) or s) for s in specs]
    captions["empty"] = [""] * len(specs)
    return captions


@torch.no_grad()
def conditioning_gain(bundle, timesteps: tuple[float, ...] = (999, 950, 900, 800, 600, 300), n: int = 96,
                      seed: int = 0) -> dict[float, dict[str, float]]:
    """{t: {caption kind: mean squared x_0 error}} over `n` held-in renders, one noise draw shared by all kinds."""
    pixels, specs = _renders(n, seed)
    x_0 = bundle.encode_images(pixels.to(bundle.vae.device)).float()
    conds = {kind: bundle.encode_prompt(texts) for kind, texts in _captions(specs, seed + 1).items()}
    eps = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(seed)).to(x_0.device)
    table = {}
    for t in timesteps:
        tt = torch.full((n,), float(t), device=x_0.device)
        alpha, sigma = (append_dims(a, x_0.dim()) for a in bundle.schedule.alpha_sigma(tt))
        x_t = alpha * x_0 + sigma * eps
        table[t] = {}
        for kind, cond in conds.items():
            out = bundle.predict(bundle.denoiser, x_t, tt, cond).float()
            x0_hat, _ = to_x0_eps(out, x_t, alpha, sigma, bundle.prediction_type)
            table[t][kind] = float((x0_hat - x_0).pow(2).mean())
    return table


@dataclass(frozen=True)
class PositionResponse:
    found: float          # share of images where the asked colour is drawn at all
    right_cell: float     # share where it sits in the asked cell (chance: 1/9)
    distinct_cells: float  # cells the object lands in over the nine position words, mean over noises (1 to 9)


OBJECTS = (("large", "red", "circle", "blue"), ("large", "green", "square", "white"),
           ("small", "yellow", "triangle", "black"), ("large", "blue", "triangle", "yellow"))


@torch.no_grad()
def position_response(pipe, latent_shape: tuple[int, ...], noises: int = 4, steps: int = 25,
                      guidance: float = 5.0, objects=OBJECTS) -> PositionResponse:
    """Sample each object at the nine positions from the same noise; see the module docstring."""
    found = right = 0
    distinct = []
    for size, colour, shape, background in objects:
        prompts = [f"a {size} {colour} {shape} at the {p} on a {background} background" for p in POSITIONS]
        for seed in range(noises):
            noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance,
                          latents=noise.expand(len(prompts), *latent_shape[1:]).to(pipe.device),
                          output_type="np").images
            cells = set()
            for image, prompt in zip(images, prompts):
                obj = check((image * 255).round().astype(np.uint8), prompt).objects[0]
                found += obj.found
                right += obj.position_ok
                if obj.found:
                    side = image.shape[0] / 3
                    cells.add((int(obj.centre_px[0] // side), int(obj.centre_px[1] // side)))
            distinct.append(len(cells))
    total = len(objects) * noises * len(POSITIONS)
    return PositionResponse(found / total, right / total, float(np.mean(distinct)))


def failures(pipe, split: str = "heldin", prompts: int = 64, images_per_prompt: int = 4, steps: int = 25,
             guidance: float = 5.0, seed: int = 0) -> dict[str, float]:
    """`checker.failure_rates` of the model's images for the first `prompts` toy prompts of `split` (the
    evaluation's draw), image k of prompt p from a generator seeded seed + p * K + k."""
    texts = toy_prompts(split, prompts, seed=0)
    found = []
    for p, text in enumerate(texts):
        gens = [torch.Generator().manual_seed(seed + p * images_per_prompt + k) for k in range(images_per_prompt)]
        found.append(pipe([text] * images_per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                          generator=gens, output_type="np").images)
    images = (np.concatenate(found) * 255).round().astype(np.uint8)
    return failure_rates(images, [t for t in texts for _ in range(images_per_prompt)])


@dataclass
class ShapeReadout:
    """`seen` / `unseen`: share of captions whose shape a least-squares linear map, fitted on the seen pairs'
    shape-word states, reads right (chance 1/3). `nearest`: for each unseen (colour, shape), the cosine of
    its mean state to the closest seen pair of the same colour and to the closest of the same shape."""

    seen: float
    unseen: float
    nearest: dict[str, dict[str, float]]


def _shape_word_states(text_encoder, tokenizer, captions: list[str], shapes: list[str]) -> np.ndarray:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        states = text_encoder(ids).last_hidden_state
    word = torch.tensor(tokenizer.convert_tokens_to_ids([f"{shape}</w>" for shape in shapes]))
    rows, cols = (ids == word[:, None]).nonzero(as_tuple=True)  # one shape word per one-object caption
    assert torch.equal(rows, torch.arange(len(shapes))), "each caption must hold its shape word once"
    return states[rows, cols].float().numpy()


def shape_readout(text_encoder, tokenizer, per_pair: int = 40, seed: int = 0) -> ShapeReadout:
    """One-object captions for every (colour, shape), sizes, cells and backgrounds drawn at random."""
    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in OBJECT_COLOURS for s in SHAPES]
    captions, labels = [], []
    for colour, shape in pairs:
        for _ in range(per_pair):
            obj = ObjectSpec(tuple(SIZES)[rng.integers(len(SIZES))], colour, shape,
                             POSITIONS[rng.integers(len(POSITIONS))])
            free = [b for b in BACKGROUND_COLOURS if b != colour]
            captions.append(caption(SceneSpec((obj,), free[rng.integers(len(free))])))
            labels.append((colour, shape))
    x = _shape_word_states(text_encoder, tokenizer, captions, [s for _, s in labels])
    unseen = np.array([pair in HELDOUT_COMBINATIONS for pair in labels])
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    target = np.eye(len(SHAPES))[[SHAPES.index(s) for _, s in labels]]
    # ridge 1e-3 only to keep the normal equations invertible when states are rank-deficient
    gram = design[~unseen].T @ design[~unseen] + 1e-3 * np.eye(design.shape[1])
    weights = np.linalg.solve(gram, design[~unseen].T @ target[~unseen])
    right = (design @ weights).argmax(1) == target.argmax(1)

    means = {pair: x[[i for i, p in enumerate(labels) if p == pair]].mean(0) for pair in pairs}
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    seen = [p for p in pairs if p not in HELDOUT_COMBINATIONS]
    nearest = {}
    for colour, shape in sorted(HELDOUT_COMBINATIONS):
        v = means[(colour, shape)]
        nearest[f"{colour} {shape}"] = {
            "same_colour": max(cos(v, means[p]) for p in seen if p[0] == colour),
            "same_shape": max(cos(v, means[p]) for p in seen if p[1] == shape)}
    return ShapeReadout(float(right[~unseen].mean()), float(right[unseen].mean()), nearest)


# Each unseen pair -> (a shape its colour was trained with, a donor colour trained with both shapes).
ANALOGY_PLAN: dict[tuple[str, str], tuple[str, str]] = {
    ("purple", "triangle"): ("circle", "red"),
    ("orange", "circle"): ("square", "blue"),
    ("green", "square"): ("triangle", "yellow"),
}
assert set(ANALOGY_PLAN) == set(HELDOUT_COMBINATIONS)
assert all({(c, s2), (d, s), (d, s2)} <= set(TRAIN_COMBINATIONS) for (c, s), (s2, d) in ANALOGY_PLAN.items())


def text_states(pipe, texts: list[str]) -> torch.Tensor:
    """The final-layer token states an SD-style pipeline cross-attends to (what `encode_prompt` passes on)."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def analogy_states(encode, make_captions, colour: str, shape: str, seen_shape: str, donor: str) -> torch.Tensor:
    """E(colour, seen_shape) + E(donor, shape) - E(donor, seen_shape) for the same scenes: the words differ only
    in the colour and shape slots and the object's article is always "a", so the token positions line up."""
    return (encode(make_captions(colour, seen_shape)) + encode(make_captions(donor, shape))
            - encode(make_captions(donor, seen_shape)))


def _one_object_scenes(rng: np.random.Generator, n: int, avoid: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """n (size, cell, background) draws for one-object scenes; the background is none of the colours in `avoid`."""
    free = [b for b in BACKGROUND_COLOURS if b not in avoid]
    return [(tuple(SIZES)[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))],
             free[rng.integers(len(free))]) for _ in range(n)]


def _one_object_captions(scenes: list[tuple[str, str, str]], colour: str, shape: str) -> list[str]:
    return [caption(SceneSpec((ObjectSpec(size, colour, shape, pos),), bg)) for size, pos, bg in scenes]


def unseen_pair_failures(pipe, per_pair: int = 32, images_per_prompt: int = 2, steps: int = 25,
                         guidance: float = 5.0, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """For each held-out pair, `checker.failure_rates` of one-object scenes (size, cell and background drawn at
    random) sampled from: `own` the caption's states, `analogy` the analogy states (judged against the same
    caption), `donor_pair` the donor colour's seen pair in the same scenes. Image k of scene i is seeded
    seed + i * K + k in every condition, so the three see the same noises."""
    rng = np.random.default_rng(seed)
    uncond = text_states(pipe, [""])
    out = {}
    for (colour, shape), (seen_shape, donor) in ANALOGY_PLAN.items():
        scenes = _one_object_scenes(rng, per_pair, (colour, donor))

        def make_captions(c: str, s: str, scenes=scenes) -> list[str]:
            return _one_object_captions(scenes, c, s)

        asked = make_captions(colour, shape)
        conditions = {
            "own": (text_states(pipe, asked), asked),
            "analogy": (analogy_states(lambda t: text_states(pipe, t), make_captions, colour, shape, seen_shape, donor),
                        asked),
            "donor_pair": (text_states(pipe, make_captions(donor, shape)), make_captions(donor, shape)),
        }
        rates = {}
        for name, (states, texts) in conditions.items():
            found = []
            for i in range(per_pair):
                gens = [torch.Generator().manual_seed(seed + i * images_per_prompt + k) for k in range(images_per_prompt)]
                found.append(pipe(prompt_embeds=states[i:i + 1].repeat(images_per_prompt, 1, 1),
                                  negative_prompt_embeds=uncond.repeat(images_per_prompt, 1, 1),
                                  num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                                  output_type="np").images)
            images = (np.concatenate(found) * 255).round().astype(np.uint8)
            rates[name] = failure_rates(images, [t for t in texts for _ in range(images_per_prompt)])
        out[f"{colour} {shape}"] = rates
    return out


def contrast_guided(predict: Predict, cond: Conditioning, uncond: Conditioning, contrasts: list[Conditioning],
                    guidance: float, contrast_scale: float, prediction_type: str, schedule: Schedule) -> ModelFn:
    """out = u + g (c - u) + s (c - mean_k n_k), on raw outputs, in one call on the batch [u; c; n_1; ...; n_K].

    With s = 0 it is classifier-free guidance (`samplers.guided`). The contrast captions differ from the asked one
    in a single word, so the extra term amplifies only what the denoiser does differently for that word.
    """
    batch = cond.batch_size
    uncond = uncond.repeat(batch) if uncond.batch_size == 1 and batch > 1 else uncond

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = 2 + len(contrasts)
        outs = predict(torch.cat([x_t] * k), torch.cat([t] * k), Conditioning.cat([uncond, cond, *contrasts]))
        u, c, *n = outs.chunk(k)
        out = u + guidance * (c - u)
        if n:
            out = out + contrast_scale * (c - torch.stack(n).mean(0))
        alpha, sigma = (append_dims(a, x_t.ndim) for a in schedule.alpha_sigma(t))
        return to_x0_eps(out, x_t, alpha, sigma, prediction_type)

    return model_fn


@torch.no_grad()
def shape_contrast_failures(bundle, scales: tuple[float, ...] = (0.0, 2.0, 5.0), per_pair: int = 32,
                            images_per_prompt: int = 2, steps: int = 25, guidance: float = 5.0,
                            seed: int = 0) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{pair: {"unseen" | "seen": {str(s): failure_rates}}}: one-object scenes of each held-out pair, and of the
    seen pair of the same shape in its analogy donor's colour as the control, sampled with `contrast_guided`
    (deterministic DDIM, the contrasts the same captions with each other shape) at each contrast scale s.
    Image k of scene i starts from the noise seeded seed + i * K + k in every condition."""
    rng = np.random.default_rng(seed)
    uncond = bundle.encode_unconditional(1)
    shape_one = bundle.latent_shape(1)
    noise = torch.cat([torch.randn(shape_one, generator=torch.Generator().manual_seed(seed + j))
                       for j in range(per_pair * images_per_prompt)])
    predict = lambda x_t, t, c: bundle.predict(bundle.denoiser, x_t, t, c)  # noqa: E731
    timesteps = bundle.schedule.timesteps(steps)
    out = {}
    for (colour, shape), (_, donor) in ANALOGY_PLAN.items():
        scenes = _one_object_scenes(rng, per_pair, (colour, donor))
        rows = {}
        for kind, c in (("unseen", colour), ("seen", donor)):
            asked = [text for text in _one_object_captions(scenes, c, shape) for _ in range(images_per_prompt)]
            cond = bundle.encode_prompt(asked)
            contrasts = [bundle.encode_prompt([text for text in _one_object_captions(scenes, c, other)
                                               for _ in range(images_per_prompt)]) for other in SHAPES if other != shape]
            rows[kind] = {}
            for s in scales:
                model_fn = contrast_guided(predict, cond, uncond, contrasts if s else [], guidance, s,
                                           bundle.prediction_type, bundle.schedule)
                images = bundle.decode_latents(sample_ddim(model_fn, noise.clone(), timesteps, bundle.schedule))
                rows[kind][f"{s:g}"] = failure_rates(images.clamp(-1, 1), asked)
        out[f"{colour} {shape}"] = rows
    return out
