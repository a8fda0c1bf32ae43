"""Modules inside wrappers: reaching the model in a DDP/FSDP or torch.compile wrapper, and letting a diffusers
pipeline call a trained component through its wrapper (so DDP syncs its gradients) while reading the
component's own attributes."""
from __future__ import annotations

import contextlib

import torch
from diffusers import DiffusionPipeline


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/FSDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = next((getattr(module, a) for a in ("module", "_orig_mod")
                      if isinstance(getattr(module, a, None), torch.nn.Module)), None)
        if inner is None:
            return module
        module = inner


class _CallThrough:
    """Stands in for a pipeline component: calls go through its wrapper (DDP syncs the gradients),
    attribute reads (`dtype`, `config`, ...) reach the module itself, as the pipeline's code expects."""

    def __init__(self, wrapper: torch.nn.Module):
        self._wrapper, self._module = wrapper, unwrap_model(wrapper)

    def __call__(self, *args, **kwargs):
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


@contextlib.contextmanager
def calling_through(pipe: DiffusionPipeline, wrappers: dict[str, torch.nn.Module]):
    """Within the block, `pipe.<name>(...)` runs `wrappers[name]`; the components are put back after."""
    saved = {name: getattr(pipe, name) for name in wrappers}
    try:
        for name, wrapper in wrappers.items():
            # object.__setattr__: DiffusionPipeline.__setattr__ would re-register the component in its config.
            object.__setattr__(pipe, name, wrapper if wrapper is saved[name] else _CallThrough(wrapper))
        yield
    finally:
        for name, module in saved.items():
            object.__setattr__(pipe, name, module)
