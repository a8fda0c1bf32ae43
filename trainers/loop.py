"""THE training loop: one for every method.

It owns the Accelerator's mechanics (prepare, mixed precision, gradient
accumulation, clipping), the optimizers and their LR schedules, EMA/target
copies, checkpoints and resume, logging, validation grids and the final
export. Methods only say which groups step and what their loss is.

Reproducibility: each step's noise comes from a generator seeded by
(seed, rank, step), and the data order from a seeded, resumable index stream,
so 2N uninterrupted steps equal N steps + a kill + N resumed steps.
"""
from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from trainers.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainers.config import RunConfig, changed_settings, dump_config, save_config
from trainers.deepspeed_config import fill_deepspeed_config
from trainers.batches import Batches
from trainers.index_stream import IndexStream
from trainers.ema import make_average, update_average
from trainers.method import Method
from trainers.optim import build_optimizer, lr_at
from trainers.profiling import phase


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The RNG of one step on one process, independent of any earlier step."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LoopState:
    step: int = 0
    nonfinite_steps: int = 0
    skipped_samples: int = 0
    data: dict = field(default_factory=dict)


class Trainer:
    """Holds what one run needs between steps; `train()` drives it."""

    def __init__(self, cfg: RunConfig, accelerator, method: Method, dataset):
        self.cfg, self.acc, self.method, self.dataset = cfg, accelerator, method, dataset
        self.run_dir = Path(cfg.output_dir)
        self.state = LoopState()
        self.stopped = False
        stream = IndexStream(len(dataset), seed=cfg.train.seed, rank=accelerator.process_index,
                             world_size=accelerator.num_processes, batch_size=cfg.train.batch_size)
        self.batches = Batches(dataset, stream, cfg.train.num_workers, pin_memory=accelerator.device.type == "cuda")
        self._prepare()
        self.evaluator = None
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (step, numbers) of the latest evaluation
        if cfg.eval.every > 0:
            from trainers.evaluating import InTrainingEval

            self.evaluator = InTrainingEval(cfg, method, accelerator)

    def _check_backend(self, modules: dict, specs: dict) -> None:
        """Refuse combinations the distributed backend would get silently wrong."""
        from accelerate.utils import DistributedType

        kind = self.acc.distributed_type
        if kind == DistributedType.DEEPSPEED and len(modules) > 1:
            raise RuntimeError(f"{self.cfg.method} trains {len(modules)} networks ({', '.join(modules)}); accelerate "
                               "prepares one DeepSpeed engine per run: use DDP or FSDP (configs/accelerate/)")
        if kind == DistributedType.FSDP and specs:
            raise RuntimeError(f"{self.cfg.method} keeps whole EMA/target copies ({', '.join(specs)}), which FSDP's "
                               "sharded parameters cannot feed: use DDP, or set train.ema_decay=0 where it is optional")

    def _prepare(self) -> None:
        from accelerate.utils import DistributedType

        modules = self.method.trainable()
        self._check_backend(modules, self.method.averaged())
        # Accelerate owns the micro-step bookkeeping (no_sync, loss scaling, DeepSpeed's step boundary).
        self.acc.gradient_accumulation_steps = self.cfg.train.gradient_accumulation
        if self.acc.distributed_type == DistributedType.DEEPSPEED:
            fill_deepspeed_config(self.acc.state.deepspeed_plugin.deepspeed_config, self.cfg.train)
        self.optim_cfgs = {g: self.cfg.group_optim(g) for g in modules}
        optimizers = [build_optimizer(m.parameters(), self.optim_cfgs[g]) for g, m in modules.items()]
        prepared = self.acc.prepare(*modules.values(), *optimizers)
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        n = len(modules)
        self.modules = dict(zip(modules, prepared[:n]))
        self.optimizers = dict(zip(modules, prepared[n:]))
        specs = self.method.averaged()
        self.average_specs = specs
        self.averages = {name: make_average(self.acc.unwrap_model(self.modules[g])) for name, (g, _) in specs.items()}
        self.method.bind(self.modules, self.averages)

    def evaluate(self) -> dict[str, float]:
        numbers = as_floats(self.evaluator())
        self.last_eval = (self.state.step, numbers)
        return numbers

    # ---- resume / checkpoint -------------------------------------------------------------
    def resume_if_possible(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return
        loop = load_checkpoint(self.acc, path, self.averages)
        self.state = LoopState(step=loop["step"], nonfinite_steps=loop["nonfinite_steps"],
                               skipped_samples=loop["skipped_samples"], data=loop["data"])
        self.batches.load_state_dict(loop["data"])
        self.acc.print(f"resumed from {path} at step {self.state.step}")

    def checkpoint(self) -> None:
        loop = {"nonfinite_steps": self.state.nonfinite_steps, "skipped_samples": self.state.skipped_samples,
                "data": self.batches.state_dict()}
        save_checkpoint(self.acc, self.run_dir, self.state.step, loop, self.averages, self.cfg.train.keep_checkpoints)

    # ---- one step ------------------------------------------------------------------------
    def next_batch(self) -> dict:
        batch = next(self.batches)
        self.state.skipped_samples += int(batch.get("skipped", 0))
        return batch

    def run_step(self) -> dict[str, float]:
        """Accumulate, check finiteness on every process, then step the active groups."""
        step, accum = self.state.step, self.cfg.train.gradient_accumulation
        groups = self.method.groups_for_step(step)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        for g in groups:  # before any backward: DeepSpeed steps inside the last micro-step's backward
            lr = lr_at(step, self.optim_cfgs[g], self.cfg.train.max_steps)
            for pg in self.optimizers[g].param_groups:
                pg["lr"] = lr
        active = [self.modules[g] for g in groups]
        generator = step_generator(self.cfg.train.seed, self.acc.process_index, step, self.acc.device)
        # Logged values stay on the device (converted when written) and every micro-step runs its backward, finite
        # or not: the one host sync of a step is the finiteness vote below, so the host can queue the next kernels
        # while the device still works, and DDP ranks never disagree about whether a backward (all-reduce) happens.
        logs: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        finite = torch.ones((), dtype=torch.bool, device=self.acc.device)
        for micro in range(accum):
            with phase("data"):
                batch = self.next_batch()
            # accumulate(): no gradient all-reduce before the last micro-step; backward() divides by accum.
            with self.acc.accumulate(*active), self.acc.autocast():
                with phase("forward"):
                    out = self.method.loss(batch, step, groups, generator)
                    loss = out.loss.float().mean()
                finite = finite & torch.isfinite(loss.detach())
                with phase("backward"):
                    self.acc.backward(loss)
            for k, v in {"loss": loss, **out.logs}.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float().mean()
                counts[k] = counts.get(k, 0) + 1
        # Mean over the micro-steps that logged a key: a key only some batches carry (a group absent from
        # a batch) is not diluted by the others.
        logs = {k: v / counts[k] for k, v in logs.items()}
        if not self._all_finite(finite):
            return self._skip_step(logs)
        with phase("optimizer"):
            for g in groups:
                self._step_group(g)
        return logs

    def _all_finite(self, finite: torch.Tensor) -> bool:
        flag = (~finite).float().reshape(1)
        return float(self.acc.reduce(flag, reduction="sum")) == 0.0

    def _skip_step(self, logs: dict) -> dict:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.state.nonfinite_steps += 1
        limit = self.cfg.train.max_nonfinite_steps
        if self.state.nonfinite_steps > limit:
            raise RuntimeError(
                f"{self.state.nonfinite_steps} steps had a non-finite loss (limit train.max_nonfinite_steps={limit}); "
                "lower optim.lr, enable gradient clipping, or use bf16 instead of fp16")
        logs["nonfinite_steps"] = torch.tensor(float(self.state.nonfinite_steps))
        return logs

    def _step_group(self, group: str) -> None:
        module, opt = self.modules[group], self.optimizers[group]
        if self.cfg.train.max_grad_norm > 0:
            self.acc.clip_grad_norm_(module.parameters(), self.cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name, (g, decay) in self.average_specs.items():
            if g == group:
                update_average(self.averages[name], self.acc.unwrap_model(module), decay)

    # ---- side jobs -----------------------------------------------------------------------
    def log(self, logs: dict[str, float], elapsed: float) -> None:
        logs = {**logs, "lr": lr_at(self.state.step - 1, next(iter(self.optim_cfgs.values())), self.cfg.train.max_steps),
                "skipped_samples": float(self.state.skipped_samples), "step_time_s": elapsed}
        self.acc.log(logs, step=self.state.step)
        if self.acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({"step": self.state.step, **logs}) + "\n")

    def validate(self) -> None:
        if not self.acc.is_main_process:
            return
        from pipelines.images import save_grid

        prompts = self.cfg.train.validation_prompts or [self.dataset[i]["prompt"] for i in range(min(4, len(self.dataset)))]
        generator = torch.Generator(self.acc.device).manual_seed(self.cfg.train.seed)
        images = self.method.generate(list(prompts), generator)
        save_grid(images, self.run_dir / "validation" / f"step-{self.state.step:07d}.png", nrow=len(prompts))


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the metrics lines of steps <= `step`, the step the run (re)starts from.

    A run killed after its last checkpoint has logged steps that the resumed run logs again; without this the
    file would hold both copies (or, for a run restarted from scratch, a stale prefix). A line cut short by the
    kill is dropped too, rather than stopping the resume."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def record_config(cfg: RunConfig, run_dir: Path, accelerator) -> None:
    """Write the run's config.yaml; a resume under changed settings says so and keeps the old file.

    The checkpoint holds weights and optimizer state, not the settings that produced them, so a resumed run
    silently trains under whatever the new launch says (a different rate or schedule, more steps). Changing
    them can be intended; it should never be unnoticed, nor erase the record of what ran before.
    """
    old_file, resumed_from = run_dir / "config.yaml", latest_checkpoint(run_dir)
    if resumed_from is not None and old_file.is_file():
        changes = changed_settings(yaml.safe_load(old_file.read_text()) or {}, yaml.safe_load(dump_config(cfg)))
        if changes:
            kept = old_file.with_name(f"config.{resumed_from.name}.yaml")
            old_file.replace(kept)
            accelerator.print(f"resuming {resumed_from.name} with changed settings (the earlier ones are kept in "
                              f"{kept.name}): " + "; ".join(changes))
    save_config(cfg, run_dir)


def train(cfg: RunConfig, accelerator, method: Method, dataset) -> Trainer:
    """Run (or resume) a training run to `cfg.train.max_steps`, checkpointing as it goes."""
    trainer = Trainer(cfg, accelerator, method, dataset)
    if accelerator.is_main_process:
        record_config(cfg, trainer.run_dir, accelerator)
    trainer.resume_if_possible()
    if accelerator.is_main_process:
        drop_metrics_after(trainer.run_dir / "metrics.jsonl", trainer.state.step)
    if cfg.train.log_with != "none":
        accelerator.init_trackers("train")
    bar = tqdm(total=cfg.train.max_steps, initial=trainer.state.step, disable=not accelerator.is_main_process,
               desc=cfg.method, dynamic_ncols=True)
    # Each key's latest value since the last log line: a method that alternates optimizer groups (f-distill's
    # student every k-th step) would otherwise never show the other groups' keys when k divides log_every.
    recent: dict = {}
    with StopFlag() as stop:
        while trainer.state.step < cfg.train.max_steps:
            start = time.perf_counter()
            logs = trainer.run_step()
            recent.update(logs)
            trainer.state.step += 1
            bar.update(1)
            step = trainer.state.step
            # The final model is always evaluated too: its numbers go on the exported model card.
            if trainer.evaluator is not None and (_due(step, cfg.eval.every) or step == cfg.train.max_steps):
                logs.update(trainer.evaluate())
            if _due(step, cfg.train.log_every) or any(k.startswith("eval/") for k in logs):
                logs, recent = as_floats({**recent, **logs}), {}
                bar.set_postfix(loss=f"{logs['loss']:.4g}")
                trainer.log(logs, time.perf_counter() - start)
            if _due(step, cfg.train.validate_every):
                trainer.validate()
            if _stop_requested(accelerator, stop):
                trainer.checkpoint()
                accelerator.print(f"stop requested: checkpoint written at step {step}; re-run the same command to resume")
                bar.close()
                trainer.stopped = True
                return trainer
            if _due(step, cfg.train.checkpoint_every) and step < cfg.train.max_steps:
                trainer.checkpoint()
    if trainer.evaluator is not None and trainer.last_eval is None:
        trainer.evaluate()  # a relaunched finished run trains nothing; its export still gets the final numbers
    bar.close()
    trainer.checkpoint()
    return trainer


def as_floats(logs: dict[str, float | torch.Tensor]) -> dict[str, float]:
    """Logged values as Python floats: the one place a step's device scalars are read back."""
    return {k: float(v) for k, v in logs.items()}


def _stop_requested(accelerator, stop: StopFlag) -> bool:
    if accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="max")) > 0
