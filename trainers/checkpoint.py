"""Atomic, resumable checkpoints.

Layout: `<run>/checkpoints/step-0000100/` holds the Accelerator state (models
and optimizers, in whatever sharded form the distributed backend uses), the
EMA/target copies as safetensors, and `loop_state.json` (step, data position,
counters). It is written under a temporary name and renamed only when
complete, so a kill mid-write never leaves a checkpoint that looks finished.
The loop re-derives every step's noise from (seed, rank, step), so no global
RNG state has to be restored for a resumed run to match an unbroken one.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LOOP_STATE = "loop_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / LOOP_STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(accelerator, run_dir: Path, step: int, loop_state: dict,
                    averages: dict[str, torch.nn.Module], keep: int) -> Path:
    """Every process calls this; the main process writes the shared files."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # Every rank writes its own files (RNG states, shards) into tmp; the rename
    # below must wait for the slowest one or its files land in a vanished folder.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, module in averages.items():
            save_file(_state_dict_cpu(module), str(tmp / f"average_{name}.safetensors"))
        (tmp / LOOP_STATE).write_text(json.dumps({"step": step, **loop_state}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, averages: dict[str, torch.nn.Module]) -> dict:
    """Restore models, optimizers and averages in place; return the loop state."""
    accelerator.load_state(str(path))
    for name, module in averages.items():
        module.load_state_dict(load_file(str(Path(path) / f"average_{name}.safetensors")))
    return json.loads((Path(path) / LOOP_STATE).read_text())
