"""Wall-clock latency with warm-up: "latency per image and images/s at N steps".

The first ``warmup`` calls (allocator growth, cuDNN autotuning, torch.compile, lazy inits) are run and
discarded; each of the ``repeats`` timed calls is bracketed by ``sync`` so that queued GPU work is
counted in the call that launched it. Median is the headline number (robust to stray hiccups).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Latency:
    median_s: float
    mean_s: float
    std_s: float
    per_image_s: float      # median_s / images_per_call
    images_per_s: float     # images_per_call / median_s
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)


def cuda_sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_latency(fn: Callable[[], object], warmup: int = 2, repeats: int = 10,
                    sync: Callable[[], None] | None = cuda_sync, images_per_call: int = 1) -> Latency:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls; ``sync=None`` skips synchronisation."""
    if repeats < 1 or warmup < 0 or images_per_call < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, images_per_call >= 1; "
                         f"got {repeats}, {warmup}, {images_per_call}")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    std = statistics.stdev(times) if repeats > 1 else 0.0
    return Latency(med, statistics.fmean(times), std, med / images_per_call,
                   images_per_call / med if med > 0 else float("inf"), repeats)
