"""The metric registry of the evaluation harness: name -> builder, all weights loaded before generation.

A metric has up to three parts:

- ``columns``: per-image values computed on each process's shard, batch by batch, as images are
  generated (features, CLIP scores, rewards, checker verdicts), so no process keeps its images;
- ``reduce``: numbers from the gathered, index-ordered columns (FID against reference statistics,
  means, per-prompt diversity);
- ``measure``: a timed call of the sampler itself (speed), run on the main process only.

Metrics that read the same column (``features`` for fid, diversity and vendi) compute it once. Every
metric carries a ``protocol`` dict (extractor, resize policy, reference, weights) that eval.json
writes next to its number. docs/evaluation.md defines each metric and its conventions.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from evaluation import fid as fidlib
from evaluation.clip_score import clip_score
from evaluation.diversity import grouped, pairwise_cosine_distance, vendi_score
from evaluation.features import Extractor, clip_extractor, inception_extractor
from evaluation.speed import measure_latency
from pipelines.toy import TOY_CLIP as TOY_CLIP_DIR

ColumnFn = Callable[[Tensor, list[str]], Tensor]
SampleFn = Callable[[list[str], list[int]], Tensor]
STATS_CACHE_ENV = "DIFFSTILL_CACHE"
WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


@dataclass
class Samples:
    """Everything the reducers see: per-image columns [N, ...] in global index order, and their protocol."""

    prompts: list[str]        # per image
    prompt_ids: list[int]     # per image: index of its prompt
    seeds: list[int]          # per image
    columns: dict[str, Tensor]
    resolution: tuple[int, int]


@dataclass
class ScoringOptions:
    """Where metric weights and FID references come from (every path is local; nothing downloads)."""

    feature_model: str | None = None      # "inception" or a CLIPModel folder; None: toy CLIP (toy prompts) else inception
    inception_weights: str | None = None  # torch-fidelity Inception file or a folder holding it; None: torch hub cache
    clip_model: str | None = None         # CLIPModel folder (with tokenizer) for clip_score; None: the toy CLIP
    fid_ref: str | None = None            # reference image folder or .npz statistics (real benchmarks)
    stats_cache: str | None = None        # folder for cached reference statistics
    reward_options: dict[str, dict] = field(default_factory=dict)  # reward name -> build_reward options
    speed_batch: int = 1
    speed_warmup: int = 2
    speed_repeats: int = 5


@dataclass
class Metric:
    name: str
    protocol: dict = field(default_factory=dict)
    columns: dict[str, ColumnFn] = field(default_factory=dict)
    reduce: Callable[[Samples, object], dict[str, float]] | None = None
    measure: Callable[[SampleFn, list[str], int], dict[str, float]] | None = None


@dataclass
class Context:
    """What builders may need: whether prompts are toy captions, images per prompt, device, options, shared resources."""

    is_toy: bool
    images_per_prompt: int
    device: torch.device
    options: ScoringOptions
    shared: dict = field(default_factory=dict)


def _fingerprint(folder: Path) -> str:
    """Short hash of a model's weights (size + first MiB), so cached statistics notice retrained weights."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            f = folder / name
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
            return hashlib.sha256(head + str(f.stat().st_size).encode()).hexdigest()[:10]
    raise FileNotFoundError(f"no weights in '{folder}': expected one of {WEIGHT_FILES}")


def load_clip_folder(path: str | os.PathLike | None, what: str, flag: str):
    """(CLIPModel, tokenizer, folder) from a save_pretrained folder; one-line error naming what is missing."""
    folder = Path(path) if path else TOY_CLIP_DIR
    where = (f"pass {flag} DIR (a transformers CLIPModel save_pretrained folder with its tokenizer)"
             f"{'' if path else f' or put the toy CLIP in {TOY_CLIP_DIR}'}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{what}: CLIP model folder '{folder}' has no config.json; {where}")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise FileNotFoundError(f"{what}: CLIP weights '{folder / WEIGHT_FILES[0]}' not found; {where}")
    from transformers import AutoTokenizer, CLIPModel
    model = CLIPModel.from_pretrained(folder).requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer_config.json").is_file() else None
    return model, tokenizer, folder


def _extractor(ctx: Context) -> Extractor:
    """The feature extractor shared by fid, diversity and vendi (built once per scoring)."""
    if "extractor" not in ctx.shared:
        spec = ctx.options.feature_model or ("toy-clip" if ctx.is_toy else "inception")
        if spec == "inception":
            ext = inception_extractor(ctx.options.inception_weights, ctx.device)
        else:
            model, _, folder = load_clip_folder(None if spec == "toy-clip" else spec, "features",
                                                "--feature-model (eval.feature_model)")
            ext = clip_extractor(model.to(ctx.device), name=f"clip:{folder.name}@{_fingerprint(folder)}")
        ctx.shared["extractor"] = ext
    return ctx.shared["extractor"]


def _features_column(ext: Extractor) -> dict[str, ColumnFn]:
    return {"features": lambda images, prompts: ext(images)}


def _mean_of(column: str, key: str) -> Callable[[Samples, object], dict[str, float]]:
    return lambda s, acc: {key: float(s.columns[column].double().mean())}


def build_clip_score(ctx: Context) -> Metric:
    model, tokenizer, folder = load_clip_folder(ctx.options.clip_model, "clip_score",
                                                "--clip-model (eval.clip_model)")
    if tokenizer is None:
        raise FileNotFoundError(f"clip_score: no tokenizer in '{folder}'; save the CLIP's tokenizer there too")
    model = model.to(ctx.device)
    protocol = {"model": f"{folder}@{_fingerprint(folder)}", "definition": "100 * max(cos(E_I, E_T), 0), mean over images"}
    return Metric("clip_score", protocol, {"clip_score": lambda x, p: clip_score(model, tokenizer, x, p)},
                  _mean_of("clip_score", "clip_score"))


def build_toy_attributes(ctx: Context) -> Metric:
    from pipelines.toy.checker import check_batch
    column = {"toy_attributes": lambda x, p: check_batch(x.detach().cpu(), list(p)).float()}
    protocol = {"definition": "fraction of images passing pipelines.toy.checker.check_batch"}
    return Metric("toy_attributes", protocol, column, _mean_of("toy_attributes", "toy_attributes"))


def build_reward_metric(name: str, ctx: Context) -> Metric:
    from rewards import build_reward
    reward = build_reward(name, device=ctx.device, **ctx.options.reward_options.get(name, {}))
    key = f"reward:{name}"
    protocol = {"reward": name, "scale": getattr(reward, "scale", ""), "options": ctx.options.reward_options.get(name, {})}
    return Metric(key, protocol, {key: lambda x, p: reward(x, list(p)).float()}, _mean_of(key, key))


def _grouped_metric(name: str, fn: Callable[[Tensor], Tensor], ctx: Context) -> Metric:
    if ctx.images_per_prompt < 2:
        raise ValueError(f"{name} compares images of the same prompt: use --num-images 2 or more per prompt")
    ext = _extractor(ctx)
    protocol = {"extractor": ext.name, "resize": ext.resize, "per": "prompt, then mean over prompts"}
    reduce = lambda s, acc: {name: grouped(fn, s.columns["features"], s.prompt_ids)[0]}
    return Metric(name, protocol, _features_column(ext), reduce)


def build_speed(ctx: Context) -> Metric:
    o = ctx.options
    protocol = {"batch": o.speed_batch, "warmup": o.speed_warmup, "repeats": o.speed_repeats, "statistic": "median",
                "device": str(ctx.device)}

    def measure(sample: SampleFn, prompts: list[str], seed: int) -> dict[str, float]:
        batch = [prompts[i % len(prompts)] for i in range(o.speed_batch)]
        seeds = [seed + i for i in range(o.speed_batch)]
        lat = measure_latency(lambda: sample(batch, seeds), o.speed_warmup, o.speed_repeats, images_per_call=o.speed_batch)
        return {"latency_s_per_image": lat.per_image_s, "images_per_s": lat.images_per_s}

    return Metric("speed", protocol, measure=measure)


# ---------------------------------------------------------------- FID and its reference statistics

def toy_reference_images(prompts: list[str], seeds: list[int], resolution: int):
    """Real toy-world renders of the same captions, one per generated image (layout jitter from its seed)."""
    from pipelines.toy.world import parse_caption, place, render
    for prompt, seed in zip(prompts, seeds):
        scene = place(parse_caption(prompt), np.random.default_rng(seed))
        yield torch.from_numpy(render(scene, resolution)).permute(2, 0, 1).float() / 127.5 - 1


def _cache_path(ctx: Context, ref: Path, ext: Extractor, size: int) -> Path:
    root = Path(ctx.options.stats_cache or os.environ.get(STATS_CACHE_ENV) or Path.home() / ".cache" / "diffstill")
    key = hashlib.sha256(f"{ref.resolve()}|{ext.name}|{ext.resize}|{size}".encode()).hexdigest()[:12]
    return root / "fid_stats" / f"{ref.name}-{size}px-{key}.npz"


def _reference(ctx: Context, ext: Extractor, s: Samples, accelerator) -> tuple[fidlib.FeatureStats, dict]:
    """Reference statistics (memoised for repeated evaluations, e.g. during training) and their description."""
    size = s.resolution[0]
    ref = ctx.options.fid_ref
    if ref is None:
        key = ("toy", tuple(s.prompts), tuple(s.seeds), size)
        if key not in ctx.shared:
            if s.resolution[0] != s.resolution[1]:
                raise ValueError(f"toy FID reference renders are square; got {s.resolution} images")
            rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
            shard = toy_reference_images(s.prompts[rank::world], s.seeds[rank::world], size)
            ctx.shared[key] = fidlib.compute_stats(shard, ext, accelerator=accelerator, image_size=size)
        return ctx.shared[key], {"reference": "toy-world renders of the same prompts", "reference_count": ctx.shared[key].n}
    ref = Path(ref)
    if ref.suffix == ".npz":
        stats = fidlib.FeatureStats.load(ref)
    else:
        key = ("folder", str(ref), size)
        if key not in ctx.shared:
            ctx.shared[key] = fidlib.reference_stats(ref, ext, _cache_path(ctx, ref, ext, size), image_size=size,
                                                     accelerator=accelerator)
        stats = ctx.shared[key]
    return stats, {"reference": str(ref), "reference_count": stats.n, "reference_image_size": size}


def _check_fid_ref(ctx: Context, ext: Extractor) -> None:
    ref = ctx.options.fid_ref
    if ref is None:
        if not ctx.is_toy:
            raise ValueError("fid on this prompt set needs --fid-ref or eval.fid_ref (a folder of real images, "
                             "a saved datasets folder, or a .npz of statistics)")
        return
    path = Path(ref)
    if not path.exists():
        raise FileNotFoundError(f"FID reference not found: '{path}' (give a folder of real images, a saved "
                                "datasets folder, or a .npz)")
    if path.suffix == ".npz":
        found = {k: v for k, v in fidlib.FeatureStats.load(path).protocol.items() if k in ("extractor", "resolution", "resize")}
        want = fidlib.protocol_of(ext)
        if any(found.get(k) != want[k] for k in found):
            raise ValueError(f"FID reference '{path}' was made under {found}, not {want}; recompute it with this extractor")


def build_fid(ctx: Context) -> Metric:
    ext = _extractor(ctx)
    _check_fid_ref(ctx, ext)
    protocol = {"extractor": ext.name, "feature_resolution": ext.resolution, "resize": ext.resize}

    def reduce(s: Samples, accelerator) -> dict[str, float]:
        ref, described = _reference(ctx, ext, s, accelerator)
        protocol.update(described)
        own = fidlib.stats_from_features(s.columns["features"], fidlib.protocol_of(ext))
        return {"fid": fidlib.fid_from_stats(own, ref)}

    return Metric("fid", protocol, _features_column(ext), reduce)


METRICS: dict[str, Callable[[Context], Metric]] = {
    "fid": build_fid,
    "clip_score": build_clip_score,
    "diversity": lambda ctx: _grouped_metric("diversity", pairwise_cosine_distance, ctx),
    "vendi": lambda ctx: _grouped_metric("vendi", vendi_score, ctx),
    "speed": build_speed,
    "toy_attributes": build_toy_attributes,
}


def check_metric_name(name: str) -> None:
    if name in METRICS:
        return
    if name.startswith("reward:"):
        from rewards import REWARDS
        if name[len("reward:"):] in REWARDS:
            return
        raise ValueError(f"unknown reward in metric {name!r}; choose reward:<name> with name one of {sorted(REWARDS)}")
    raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}, reward:<name>")


def flatten(values: dict[str, dict[str, float]]) -> dict[str, float]:
    """{number name: value} from {metric name: {number name: value}}."""
    return {k: v for numbers in values.values() for k, v in numbers.items()}


class Scoring:
    """The built metrics of one evaluation: per-image columns, reductions and timed measurements."""

    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics
        self.columns: dict[str, ColumnFn] = {}
        for m in metrics:
            self.columns.update(m.columns)

    @torch.no_grad()
    def score_batch(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        return {k: fn(images, prompts).detach().float().cpu() for k, fn in self.columns.items()}

    def reduce(self, samples: Samples, accelerator=None) -> dict[str, dict[str, float]]:
        """{metric name: {number name: value}} from the gathered columns (every process may call it)."""
        return {m.name: m.reduce(samples, accelerator) for m in self.metrics if m.reduce is not None}

    def measure(self, sample: SampleFn, prompts: list[str], seed: int) -> dict[str, dict[str, float]]:
        """{metric name: {number name: value}} of the timed metrics (call on one process)."""
        return {m.name: m.measure(sample, prompts, seed) for m in self.metrics if m.measure is not None}

    @property
    def timed(self) -> bool:
        return any(m.measure is not None for m in self.metrics)

    def protocols(self) -> dict[str, dict]:
        return {m.name: dict(m.protocol) for m in self.metrics}


def is_toy_captions(prompts: list[str]) -> bool:
    """True when every prompt is an exact toy-world caption (then toy renders are the FID reference)."""
    from pipelines.toy.world import parse_caption
    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        return False
    return True


def build_scoring(metrics: list[str], prompts: list[str], *, images_per_prompt: int,
                  device: torch.device | str = "cpu", options: ScoringOptions | None = None) -> Scoring:
    """Check every metric name, then build each (loading its weights: a missing file fails here, early)."""
    if not metrics:
        raise ValueError("no metrics asked for; pass --metrics with some of " + ", ".join(METRICS) + ", reward:<name>")
    for name in metrics:
        check_metric_name(name)
    is_toy = is_toy_captions(prompts)
    if "toy_attributes" in metrics and not is_toy:
        raise ValueError("toy_attributes judges toy-world captions only; use --prompts toy-heldin or toy-heldout")
    ctx = Context(is_toy, images_per_prompt, torch.device(device), options or ScoringOptions())
    built = [build_reward_metric(n[len("reward:"):], ctx) if n.startswith("reward:") else METRICS[n](ctx)
             for n in dict.fromkeys(metrics)]
    return Scoring(built)
