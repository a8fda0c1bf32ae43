#!/usr/bin/env python
"""Time the optimizer steps of any Accelerate training script, unmodified, from outside it.

    python scripts/bench_clock.py --warmup 2 --steps 10 --out times.json SCRIPT.py -- --its --own --args

The script runs in this process (`runpy`, as `python SCRIPT.py ARGS` would run it) while
`accelerate.Accelerator.backward` is wrapped by a clock that stamps the start and end of every
call. With one backward per optimizer step (no gradient accumulation), the time from one
backward's start to the next one's is one whole training iteration: data, encoders, forwards,
backward, clipping, optimizer, EMA and logging. At the start of backward call `warmup + steps + 1`
the clock stops the script (so nothing after the loop, such as saving weights, runs), leaving
`steps` whole iterations to report. scripts/bench.py runs this in a child process per reference
script, so argv, logging set-up and peak memory stay the script's own.
"""
from __future__ import annotations

import argparse
import json
import resource
import runpy
import sys
import time
from pathlib import Path

import torch


class EnoughSteps(Exception):
    """Raised inside the timed script once the clock has every stamp it needs."""


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepClock:
    """While active, stamps every `Accelerator.backward` call; stops the run at call number `limit` (None: never)."""

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.starts: list[float] = []
        self.ends: list[float] = []
        self._original = None

    def __enter__(self) -> "StepClock":
        from accelerate import Accelerator

        self._original = original = Accelerator.backward
        clock = self

        def timed_backward(accelerator, loss, **kwargs):
            _sync()
            clock.starts.append(time.perf_counter())
            if clock.limit is not None and len(clock.starts) >= clock.limit:
                raise EnoughSteps(f"{clock.limit} backward calls stamped")
            result = original(accelerator, loss, **kwargs)
            _sync()
            clock.ends.append(time.perf_counter())
            return result

        Accelerator.backward = timed_backward
        return self

    def __exit__(self, *exc) -> None:
        from accelerate import Accelerator

        Accelerator.backward = self._original

    def step_times(self, warmup: int) -> list[float]:
        """Seconds from each backward start to the next, after the first `warmup` iterations."""
        return [b - a for a, b in zip(self.starts, self.starts[1:])][warmup:]

    def backward_times(self, warmup: int) -> list[float]:
        """Seconds inside each completed backward after the first `warmup`."""
        return [e - s for s, e in zip(self.starts, self.ends)][warmup:]


def run_script(path: str | Path, argv: list[str], clock: StepClock) -> bool:
    """Run `path` as __main__ with `argv` under `clock`; True if the clock stopped it, False if it ended."""
    saved = sys.argv
    sys.argv = [str(path), *argv]
    try:
        with clock:
            runpy.run_path(str(path), run_name="__main__")
    except EnoughSteps:
        return True
    finally:
        sys.argv = saved
    return False


def peak_memory_gib() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process


def time_script(path: str | Path, argv: list[str], warmup: int, steps: int) -> dict:
    """Run the script for warmup + steps iterations; the timed iterations and the process's peak memory."""
    clock = StepClock(limit=warmup + steps + 1)
    stopped = run_script(path, argv, clock)
    return {"script": str(path), "step_times": clock.step_times(warmup), "backward_times": clock.backward_times(warmup),
            "backward_calls": len(clock.starts), "stopped_by_clock": stopped, "peak_memory_GiB": peak_memory_gib()}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--warmup", type=int, default=2, help="iterations run before timing starts")
    p.add_argument("--steps", type=int, default=5, help="iterations timed")
    p.add_argument("--out", required=True, help="JSON file for the step times")
    p.add_argument("script", help="the training script (run unmodified)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments, after --")
    args = p.parse_args(argv)
    if args.script_args[:1] == ["--"]:
        args.script_args = args.script_args[1:]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = time_script(args.script, args.script_args, args.warmup, args.steps)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0 if len(result["step_times"]) == args.steps else 1


if __name__ == "__main__":
    sys.exit(main())
