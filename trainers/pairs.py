"""Teacher noise -> sample pairs: generation (sharded, resumable), the `pairs` dataset, first-order error.

Rectified Diffusion (Wang et al., arXiv 2410.07303) retrains a model on deterministic pairs
(x_T, x_0) drawn from its own probability-flow ODE. This module makes them and reads them back.

Layout of a pairs folder (written by `scripts/make_pairs.py`):

    settings.json             everything a pair depends on besides its index (checked on resume)
    text/                     prompt embeddings, one row per prompt (`trainers.data_cache.cache_text_embeddings`)
    pairs-00000.safetensors   x_T, x_0 [n,C,h,w] float32; pair_index, prompt_index int64; first_order_error,
    ...                       one_step_error float32 [n]
    index.json                written last, once every shard exists: shards, prompts, summary numbers

Determinism, the evaluation harness's rule: pair i has prompt i // K (K pairs per prompt) and its
initial noise comes from a CPU generator seeded with seed + i. Pairs are cut into shards of fixed
size; shard j is made by process j mod world in fixed batches, and written atomically (temporary
file, then rename). So a pair's bytes do not depend on the number of processes, and a killed run
re-run with the same command makes exactly the shards that are missing.

First-order error. For a DDIM-family trajectory with model predictions x0_hat_i at its grid points
and final sample x_0, E_i = mean((x0_hat_i - x_0)^2): zero at every point iff the trajectory is the
first-order path x_t = alpha_t x_0 + sigma_t eps with one constant (x_0, eps), i.e. iff one DDIM
step from any point lands on the same x_0 as the full solve. We report its mean over the grid
points (`first_order_error`, a path-straightness measure) and its value at the first point
(`one_step_error`: how far one step from x_T lands from the many-step sample).
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import trainers.data as data
import trainers.data_cache as data_cache
from pipelines.conditioning import Conditioning
from pipelines.samplers import guided, sample_ddim, sample_dpmpp_2m, sample_flow_euler
from trainers.atomic_files import write_json_atomic
from trainers.method import initial_noise

SOLVERS = {"dpmpp_2m": sample_dpmpp_2m, "ddim": sample_ddim, "euler": sample_flow_euler}
FORMAT = 1


@dataclass
class PairSettings:
    """What every pair depends on besides its index; a resumed run must match these exactly."""

    model: str
    prompts: str            # the prompt set's description (name and source)
    num_prompts: int
    pairs_per_prompt: int
    solver: str
    steps: int
    guidance: float
    resolution: int
    seed: int
    batch_size: int         # batches are fixed per shard, so batch composition never changes
    shard_size: int
    dtype: str
    text_cache: bool

    @property
    def num_pairs(self) -> int:
        return self.num_prompts * self.pairs_per_prompt

    def shards(self) -> list[range]:
        n, k = self.num_pairs, self.shard_size
        return [range(s, min(s + k, n)) for s in range(0, n, k)]


def shard_file(j: int) -> str:
    return f"pairs-{j:05d}.safetensors"


# ------------------------------------------------------------------ the ODE and its error


def first_order_error(x0_hats: list[torch.Tensor], x_0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over grid points, value at the first point) of mean_{C,H,W} (x0_hat_i - x_0)^2, per sample [B]."""
    errors = torch.stack([(h.float() - x_0.float()).pow(2).flatten(1).mean(1) for h in x0_hats])
    return errors.mean(0), errors[0]


def default_solver(schedule) -> str:
    """The solver the exported scheduler reproduces: DDIM on VP schedules, Euler on flow ones."""
    return "ddim" if schedule.kind == "vp" else "euler"


@torch.no_grad()
def solve(bundle, denoiser, cond: Conditioning, uncond: Conditioning, x_T: torch.Tensor, steps: int,
          guidance: float, solver: str, callback: Optional[Callable] = None,
          timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x_0 from x_T along `denoiser`'s guided ODE on `timesteps` (descending), by default the schedule's
    trailing grid of `steps` points."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    was_training = denoiser.training
    denoiser.eval()
    predict = lambda x_t, t, c: bundle.predict(denoiser, x_t, t, c)  # noqa: E731
    model_fn = guided(predict, cond, uncond, guidance, bundle.prediction_type, bundle.schedule)
    grid = bundle.schedule.timesteps(steps) if timesteps is None else timesteps
    x_0 = SOLVERS[solver](model_fn, x_T, grid, bundle.schedule, callback=callback)
    denoiser.train(was_training)
    return x_0


def solve_with_error(bundle, cond, uncond, x_T, s: PairSettings) -> dict[str, torch.Tensor]:
    """The teacher's x_0 for x_T and the trajectory's first-order errors."""
    x0_hats: list[torch.Tensor] = []
    x_0 = solve(bundle, bundle.denoiser, cond, uncond, x_T, s.steps, s.guidance, s.solver,
                callback=lambda i, t, x_t, x0_hat: x0_hats.append(x0_hat))
    mean_err, first_err = first_order_error(x0_hats, x_0)
    return {"x_0": x_0.float().cpu(), "first_order_error": mean_err.cpu(), "one_step_error": first_err.cpu()}


# ------------------------------------------------------------------ generation


class PairMaker:
    """Makes the pairs of given indices: prompt conditioning (cached or encoded), seeded noise, the ODE."""

    def __init__(self, bundle, prompts: list[str], settings: PairSettings, folder: Path | None = None):
        self.bundle, self.prompts, self.s = bundle, prompts, settings
        self.size = (settings.resolution, settings.resolution)
        self.shape = bundle.latent_shape(1, self.size)[1:]
        self.uncond = bundle.encode_unconditional(1, image_size=self.size)
        self.text = data_cache.TensorCacheDataset(str(folder / "text")) if folder and settings.text_cache else None

    def conditioning(self, prompt_indices: list[int]) -> Conditioning:
        if self.text is None:
            return self.bundle.encode_prompt([self.prompts[p] for p in prompt_indices], image_size=self.size)
        return Conditioning.cat([Conditioning(self.text[p]["cond"])[None] for p in prompt_indices])

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        s, device = self.s, self.bundle.denoiser.device
        prompt_indices = [i // s.pairs_per_prompt for i in indices]
        x_T = initial_noise(self.shape, [s.seed + i for i in indices], device)
        out = solve_with_error(self.bundle, self.conditioning(prompt_indices), self.uncond, x_T, s)
        return {"x_T": x_T.float().cpu(), **out, "pair_index": torch.tensor(indices, dtype=torch.int64),
                "prompt_index": torch.tensor(prompt_indices, dtype=torch.int64)}

    def shard(self, items: range) -> dict[str, torch.Tensor]:
        parts = [self.batch(list(items[b: b + self.s.batch_size])) for b in range(0, len(items), self.s.batch_size)]
        return {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}


def write_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A reader (or a resumed run) sees the whole shard or none of it."""
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial))
    os.replace(partial, path)


def check_settings(folder: Path, settings: PairSettings) -> None:
    path = folder / "settings.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in asdict(settings).items() if old.get(k) != v]
    if diff:
        raise ValueError(f"{folder} holds pairs made with other settings ({'; '.join(diff)}); "
                         "re-run with the same options to resume, or choose a new --out folder")


def make_pairs(accelerator, bundle, prompts: list[str], folder: str | Path, settings: PairSettings,
               progress: Callable[[int], None] = lambda n: None) -> dict:
    """Make (or finish) the pairs folder; every process calls this. Returns the index (read back on all ranks)."""
    folder = Path(folder)
    check_settings(folder, settings)
    if (folder / "index.json").is_file():
        return json.loads((folder / "index.json").read_text())
    accelerator.wait_for_everyone()  # every rank has checked before anything is written
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.partial"):  # left by a killed run; their shards are made again
            stale.unlink()
        (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=1))
        if settings.text_cache and not (folder / "text" / "index.json").is_file():
            encode = lambda ps: bundle.encode_prompt(ps, image_size=(settings.resolution,) * 2)  # noqa: E731
            data_cache.cache_text_embeddings(prompts, encode, str(folder / "text"))
    accelerator.wait_for_everyone()
    maker = PairMaker(bundle, prompts, settings, folder)
    shards = settings.shards()
    for j in range(accelerator.process_index, len(shards), accelerator.num_processes):
        if (folder / shard_file(j)).is_file():
            progress(len(shards[j]))
            continue
        write_atomic(maker.shard(shards[j]), folder / shard_file(j))
        progress(len(shards[j]))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_index(folder, prompts, settings, tuple(maker.shape))
    accelerator.wait_for_everyone()
    return json.loads((folder / "index.json").read_text())


def write_index(folder: Path, prompts: list[str], settings: PairSettings, latent_shape: tuple[int, ...]) -> None:
    """index.json, after checking that the shards hold every pair index exactly once."""
    entries, seen, errors = [], [], {"first_order_error": [], "one_step_error": []}
    for j, items in enumerate(settings.shards()):
        with safe_open(str(folder / shard_file(j)), framework="pt") as f:
            seen.append(f.get_tensor("pair_index"))
            for k in errors:
                errors[k].append(f.get_tensor(k))
        entries.append({"file": shard_file(j), "count": len(items)})
    seen_all = torch.cat(seen)
    if not torch.equal(seen_all, torch.arange(settings.num_pairs)):
        raise RuntimeError(f"{folder}: shards do not hold pairs 0..{settings.num_pairs - 1} once each; "
                           "delete the folder and make the pairs again")
    index = {"kind": "pairs", "format": FORMAT, "num_pairs": settings.num_pairs, "shards": entries,
             "prompts": prompts, "pairs_per_prompt": settings.pairs_per_prompt, "resolution": settings.resolution,
             "latent_shape": list(latent_shape), "text_cache": "text" if settings.text_cache else None,
             "settings": asdict(settings), **{k: float(torch.cat(v).mean()) for k, v in errors.items()}}
    write_json_atomic(folder / "index.json", index)


def measure_first_order(accelerator, bundle, prompts: list[str], settings: PairSettings) -> dict:
    """First-order errors of `bundle`'s ODE on the pairs' (prompt, seed) items, sharded and gathered."""
    from accelerate.utils import gather_object

    maker = PairMaker(bundle, prompts, settings)
    batches = [range(s, min(s + settings.batch_size, settings.num_pairs))
               for s in range(0, settings.num_pairs, settings.batch_size)]
    rows = []
    for b in batches[accelerator.process_index::accelerator.num_processes]:
        out = maker.batch(list(b))
        rows += list(zip(out["pair_index"].tolist(), out["first_order_error"].tolist(), out["one_step_error"].tolist()))
    rows = sorted(gather_object(rows)) if accelerator.num_processes > 1 else rows
    return {"first_order_error": float(np.mean([r[1] for r in rows])),
            "one_step_error": float(np.mean([r[2] for r in rows])), "count": len(rows), "settings": asdict(settings)}


# ------------------------------------------------------------------ the dataset


class PairsDataset(torch.utils.data.Dataset):
    """Items {"x_T", "x_0" [C,h,w], "prompt", "cond" (when the folder caches text), "index", "skipped"}."""

    def __init__(self, path: str):
        index_path = Path(path) / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found; make the pairs with scripts/make_pairs.py "
                                    "(a folder without index.json is unfinished: re-run the same command)")
        self.index = json.loads(index_path.read_text())
        if self.index.get("kind") != "pairs":
            raise ValueError(f"{index_path} is not a pairs index (kind {self.index.get('kind')!r})")
        self.path = Path(path)
        self.ends = list(np.cumsum([s["count"] for s in self.index["shards"]]))
        self.text = data_cache.TensorCacheDataset(str(self.path / self.index["text_cache"])) if self.index["text_cache"] else None

    @property
    def resolution(self) -> int:
        return int(self.index["resolution"])

    def __len__(self) -> int:
        return int(self.index["num_pairs"])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range for {len(self)} pairs in {self.path}")
        s = bisect.bisect_right(self.ends, i)
        row = i - (self.ends[s - 1] if s else 0)
        with safe_open(str(self.path / self.index["shards"][s]["file"]), framework="pt") as f:
            x_T, x_0 = (f.get_slice(k)[row: row + 1][0] for k in ("x_T", "x_0"))
            p = int(f.get_slice("prompt_index")[row: row + 1][0])
        item = {"x_T": x_T, "x_0": x_0, "prompt": self.index["prompts"][p], "index": i, "skipped": 0}
        if self.text is not None:
            item["cond"] = self.text[p]["cond"]
        return item


def _build_pairs(cfg) -> PairsDataset:
    ds = PairsDataset(cfg.path)
    if ds.resolution != cfg.resolution:
        raise ValueError(f"the pairs in {cfg.path} were made at {ds.resolution} px but data.resolution is "
                         f"{cfg.resolution}; set data.resolution: {ds.resolution}")
    return ds


data.BUILDERS["pairs"] = _build_pairs
