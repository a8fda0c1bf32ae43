"""Where a training step's time goes: named phases, free when nobody is measuring.

Methods and the loop wrap their parts in `phase("teacher")`, `phase("student")`, ...;
outside a `Profile` block that is a no-op. Inside one (scripts/bench.py), each phase
synchronises the device at its edges and adds its wall time, so the shares are
real on a GPU too. Phases may nest; time is charged to the innermost one.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

_active: "Profile | None" = None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Profile:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[str, float]] = []

    def __enter__(self) -> "Profile":
        global _active
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None

    def reset(self) -> None:
        self.seconds.clear()

    def push(self, name: str) -> None:
        _sync()
        now = time.perf_counter()
        if self._stack:
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
        self._stack.append((name, now))

    def pop(self) -> None:
        _sync()
        now = time.perf_counter()
        name, since = self._stack.pop()
        self.seconds[name] += now - since
        if self._stack:
            self._stack[-1] = (self._stack[-1][0], now)


@contextlib.contextmanager
def phase(name: str):
    profile = _active
    if profile is None:
        yield
        return
    profile.push(name)
    try:
        yield
    finally:
        profile.pop()
