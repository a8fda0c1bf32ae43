"""Evaluation harness: sharded, seeded generation through plain diffusers, scored on the fly, gathered.

Determinism across process counts. Image k of prompt p has global index i = p * K + k (K images per
prompt) and seed S + i; its initial noise comes from a CPU ``torch.Generator`` seeded with that value,
so it is the same on any device. The index range is cut into batches of ``batch_size`` *globally*
and batch j runs on process j mod world. Every batch therefore has the same members, the same seeds
and the same arithmetic whether one process or eight run it, which is what makes a 2-process run
reproduce a 1-process run image for image.

Scoring is streamed: each process turns its images into per-image columns (``evaluation.scoring``)
as soon as a batch is generated, and only those columns (and a few preview images) are gathered;
reductions (FID, means, per-prompt diversity) run on the gathered, index-ordered columns.

Two entry points share this path: ``evaluate_models`` (scripts/evaluate.py: models x step counts from
diffusers folders or hub ids) and ``evaluate_in_training`` (the training loop: any sampling callable).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from evaluation.prompts import PromptSet
from evaluation.scoring import SampleFn, Samples, Scoring, flatten

SEED_RULE = "image k of prompt p has global index i = p*K + k and seed S + i (CPU torch.Generator for the noise)"
BatchHook = Callable[[list[int], Tensor], None]


@dataclass
class RunSpec:
    """One model to evaluate: where it comes from, its label, the step counts and guidance to use."""

    model: str
    label: str
    steps: list[int]
    guidance: float | None   # None: the pipeline's own default guidance_scale


@dataclass
class EvalProtocol:
    """What every number in eval.json depends on besides the model, step count and guidance."""

    prompts: dict                 # PromptSet.describe(): name, source, count
    images_per_prompt: int
    seed: int
    batch_size: int
    dtype: str
    resolution: int | None        # None: the pipeline's default (the measured size is written per result)
    metrics: list[str]
    seed_rule: str = SEED_RULE
    flow_grid: str = "diffusers"  # see flow_grid_kwargs
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- sharding and gathering

def global_batches(num_images: int, batch_size: int) -> list[list[int]]:
    """Global image indices cut into consecutive batches (the unit that is assigned to a process)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, num_images))) for s in range(0, num_images, batch_size)]


def shard_batches(num_images: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The batches process ``rank`` of ``world`` runs: every world-th global batch."""
    return global_batches(num_images, batch_size)[rank::world]


def _world(accelerator) -> tuple[int, int]:
    return (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)


def gather_rows(x: Tensor | None, accelerator) -> Tensor | None:
    """Concatenate every process's rows in rank order; a process with no rows passes None."""
    if accelerator is None or accelerator.num_processes == 1:
        return x
    from accelerate.utils import gather_object

    from evaluation.fid import gather_features
    meta = [m for m in gather_object([None if x is None else (tuple(x.shape[1:]), x.dtype)]) if m is not None]
    if not meta:
        return None
    shape, dtype = meta[0]
    return gather_features(x if x is not None else torch.zeros((0, *shape), dtype=dtype), accelerator)


def _cat(chunks: list[Tensor]) -> Tensor | None:
    return torch.cat(chunks) if chunks else None


# ---------------------------------------------------------------- generation

def pipeline_sampler(pipe, steps: int, guidance: float, height: int | None = None, width: int | None = None,
                     **call_kwargs) -> SampleFn:
    """``sample(prompts, seeds) -> images [-1, 1]`` through a diffusers pipeline's own ``__call__``."""
    def sample(prompts: list[str], seeds: list[int]) -> Tensor:
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        # Some pipelines draw later noise from the global RNG (SD3 does not pass `generator` to its
        # scheduler, so stochastic flow sampling re-noises unseeded): seed it from the batch too.
        torch.manual_seed(int(seeds[0]))
        out = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   height=height, width=width, output_type="pt", **call_kwargs)
        return out.images.float() * 2 - 1   # output_type="pt" gives [0, 1]
    return sample


@dataclass
class Generated:
    """Gathered result of one sharded generation: reducer input and preview images (index order)."""

    samples: Samples
    preview: Tensor | None


def generate_and_score(sample: SampleFn, prompts: list[str], scoring: Scoring, *, images_per_prompt: int = 1,
                       seed: int = 0, batch_size: int = 8, accelerator=None, preview: int = 0,
                       on_batch: BatchHook | None = None, desc: str = "generate+score") -> Generated:
    """Generate ``images_per_prompt`` images per prompt on this process's shard, score them, gather.

    ``preview``: how many leading images (by global index) to gather for grids; ``on_batch(indices,
    images)`` sees each generated batch on its own process (e.g. to save PNGs).
    """
    rank, world = _world(accelerator)
    n = len(prompts) * images_per_prompt
    mine = shard_batches(n, batch_size, rank, world)
    columns: dict[str, list[Tensor]] = {k: [] for k in scoring.columns}
    indices, kept, kept_idx, size = [], [], [], None
    for batch in tqdm(mine, desc=desc, unit="batch", disable=rank != 0):
        batch_prompts = [prompts[i // images_per_prompt] for i in batch]
        images = sample(batch_prompts, [seed + i for i in batch])
        size = tuple(images.shape[-2:])
        for k, v in scoring.score_batch(images, batch_prompts).items():
            columns[k].append(v)
        indices.append(torch.tensor(batch))
        keep = [j for j, i in enumerate(batch) if i < preview]
        kept.append(images[keep].cpu())
        kept_idx.append(torch.tensor([batch[j] for j in keep], dtype=torch.long))
        if on_batch is not None:
            on_batch(batch, images)
    return _gather(prompts, images_per_prompt, seed, columns, indices, kept, kept_idx, size, accelerator)


def _gather(prompts, images_per_prompt, seed, columns, indices, kept, kept_idx, size, accelerator) -> Generated:
    order = gather_rows(_cat(indices), accelerator)
    if order is None:
        raise ValueError("no images were generated: the prompt list is empty")
    perm = torch.argsort(order)
    gathered = {k: gather_rows(_cat(v), accelerator)[perm] for k, v in columns.items()}
    sizes = [s for s in _gather_objects(size, accelerator) if s is not None]
    if len(set(sizes)) != 1:
        raise ValueError(f"generated images differ in size across batches: {sorted(set(sizes))}")
    p_idx = gather_rows(_cat(kept_idx), accelerator)
    p_img = gather_rows(_cat(kept), accelerator)
    preview = p_img[torch.argsort(p_idx)] if p_img is not None and len(p_idx) else None
    ordered = order[perm].tolist()
    samples = Samples([prompts[i // images_per_prompt] for i in ordered], [i // images_per_prompt for i in ordered],
                      [seed + i for i in ordered], gathered, sizes[0])
    return Generated(samples, preview)


def _gather_objects(obj, accelerator) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object
    return gather_object([obj])


# ---------------------------------------------------------------- entry points

def preview_count(num_prompts: int, images_per_prompt: int) -> tuple[int, int]:
    """(images in a grid, images per grid row): up to 8 prompts x K, or 16 prompts 4 per row when K = 1."""
    if images_per_prompt > 1:
        return min(num_prompts, 8) * images_per_prompt, images_per_prompt
    return min(num_prompts, 16), 4


def evaluate_in_training(sample: SampleFn, prompts: list[str], scoring: Scoring, *, seed: int = 0,
                         images_per_prompt: int = 1, batch_size: int = 8, accelerator=None) -> dict[str, float]:
    """A small evaluation from inside a training loop: numbers only, same seeds every call.

    ``sample(prompts, seeds) -> images [-1, 1]`` is any sampler (``pipeline_sampler`` on an exported
    pipeline, or the loop's own denoiser + ``pipelines.samplers``); build ``scoring`` once with
    ``evaluation.scoring.build_scoring``. Every process must call this (generation is sharded).
    """
    generated = generate_and_score(sample, prompts, scoring, images_per_prompt=images_per_prompt, seed=seed,
                                   batch_size=batch_size, accelerator=accelerator, desc="eval")
    values = flatten(scoring.reduce(generated.samples, accelerator))
    if scoring.timed:
        if accelerator is None or accelerator.is_main_process:
            values.update(flatten(scoring.measure(sample, prompts, seed)))
        if accelerator is not None:
            accelerator.wait_for_everyone()
    return values


def load_pipeline(source: str, dtype: torch.dtype, device: torch.device | str):
    """A diffusers pipeline from a folder, hub id (offline cache) or pipelines.backbones alias."""
    from diffusers import DiffusionPipeline

    from pipelines.backbones import resolve_source
    pipe = DiffusionPipeline.from_pretrained(resolve_source(source), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_guidance(pipe) -> float:
    """The ``guidance_scale`` a pipeline's ``__call__`` uses when none is given."""
    import inspect
    param = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    if param is None or not isinstance(param.default, (int, float)):
        raise ValueError(f"{type(pipe).__name__} has no numeric default guidance_scale; pass --guidance")
    return float(param.default)


FLOW_GRIDS = ("diffusers", "uniform")


def flow_grid_kwargs(pipe, steps: int, grid: str) -> dict:
    """Extra pipeline-call arguments that set a flow-matching pipeline's sigma grid.

    diffusers' FlowMatchEulerDiscreteScheduler spaces N steps from sigma 1 down to its sigma_min
    (1/1000) and then appends 0, so at N = 2 the grid is [1, 0.001, 0]: one real step and one
    negligible one. "uniform" passes sigmas 1, (N-1)/N, ..., 1/N (then 0), N real steps; the
    scheduler's shift still applies. VP schedulers are left alone.
    """
    if grid not in FLOW_GRIDS:
        raise ValueError(f"flow grid {grid!r}: expected one of {', '.join(FLOW_GRIDS)}")
    if grid == "diffusers" or type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        return {}
    from pipelines.schedules import uniform_flow_sigmas

    return {"sigmas": uniform_flow_sigmas(steps)}


def evaluate_run(run: RunSpec, prompts: PromptSet, scoring: Scoring, protocol: EvalProtocol, *, dtype: torch.dtype,
                 accelerator=None, on_batch: Callable[[RunSpec, int], BatchHook] | None = None) -> list[dict]:
    """Every step count of one model: one result dict per step count (numbers, protocol, preview)."""
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    pipe = load_pipeline(run.model, dtype, device)
    guidance = run.guidance if run.guidance is not None else default_guidance(pipe)
    n_preview, nrow = preview_count(len(prompts.prompts), protocol.images_per_prompt)
    results = []
    for steps in run.steps:
        sample = pipeline_sampler(pipe, steps, guidance, protocol.resolution, protocol.resolution,
                                  **flow_grid_kwargs(pipe, steps, protocol.flow_grid))
        generated = generate_and_score(
            sample, prompts.prompts, scoring, images_per_prompt=protocol.images_per_prompt, seed=protocol.seed,
            batch_size=protocol.batch_size, accelerator=accelerator, preview=n_preview,
            on_batch=on_batch(run, steps) if on_batch else None, desc=f"{run.label} @ {steps} steps")
        values = scoring.reduce(generated.samples, accelerator)
        if scoring.timed:
            if accelerator is None or accelerator.is_main_process:
                values.update(scoring.measure(sample, prompts.prompts, protocol.seed))
            if accelerator is not None:
                accelerator.wait_for_everyone()
        results.append({"model": run.model, "label": run.label, "steps": steps, "guidance": guidance,
                        "resolution": list(generated.samples.resolution), "sample_count": len(generated.samples.seeds),
                        "values": values, "metric_protocols": scoring.protocols(),
                        # per-image score columns, index order: what paired comparisons (win rates) read
                        "columns": {k: v for k, v in generated.samples.columns.items() if v.ndim == 1},
                        "prompt_ids": generated.samples.prompt_ids,
                        "preview": generated.preview, "preview_nrow": nrow})
    del pipe
    return results


def evaluate_models(runs: list[RunSpec], prompts: PromptSet, scoring: Scoring, protocol: EvalProtocol, *,
                    dtype: torch.dtype, accelerator=None,
                    on_batch: Callable[[RunSpec, int], BatchHook] | None = None) -> list[dict]:
    """All models x step counts, in order; see ``evaluate_run``."""
    return [r for run in runs for r in evaluate_run(run, prompts, scoring, protocol, dtype=dtype,
                                                    accelerator=accelerator, on_batch=on_batch)]
