"""Smoke tier for the shared loop: resume equals an unbroken run, SIGTERM, non-finite steps, DDP.

Each run goes through the real CLI (scripts/distill.py, via tests/fault_driver.py which injects
faults at exact dataset reads) on a tiny SD pipeline built in code and a folder of 8 images.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from distributed_launch import assert_ranks_identical, launch_training
from image_folders import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
BATCH = 2
N = 3  # steps before the fault; every run trains 2N


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline("sd", tmp_path_factory.mktemp("tiny_sd") / "pipe")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_image_folder(folder, n=8)
    return folder


def recipe(tmp_path: Path, tiny_sd: Path, image_folder: Path, name: str, extra: tuple[str, ...] = (), **train) -> Path:
    train = {"max_steps": 2 * N, "batch_size": BATCH, "checkpoint_every": N, "keep_checkpoints": 3,
             "log_every": 1, "ema_decay": 0.9, "log_with": "none", **train}
    lines = [f"# python scripts/distill.py --config {name}.yaml", "method: sft",
             f"output_dir: {tmp_path / name}", "model:", f"  source: {tiny_sd}",
             "data:", "  kind: imagefolder", f"  path: {image_folder}", "  resolution: 16",
             "optim:", "  lr: 1.0e-3", "export:", "  enabled: false", "train:"]
    lines += [f"  {k}: {v}" for k, v in train.items()] + list(extra)
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_driver(config: Path, env: dict | None = None, overrides: list[str] = ()) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, str(DRIVER), "--config", str(config), *overrides]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def final_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run_dir / "checkpoints" / f"step-{step:07d}"
    state = {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    state.update({f"ema.{k}": v for k, v in load_file(folder / "average_ema.safetensors").items()})
    optimizer = torch.load(folder / "optimizer.bin", weights_only=True)
    for idx, slots in optimizer["state"].items():
        for slot, value in slots.items():
            state[f"opt.{idx}.{slot}"] = torch.as_tensor(value)
    return state


def logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(row["step"], row["loss"]) for row in map(json.loads, lines)]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, tiny_sd, image_folder):
    tmp = tmp_path_factory.mktemp("unbroken")
    done = run_driver(recipe(tmp, tiny_sd, image_folder, "unbroken"))
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "unbroken"


def test_killed_then_resumed_equals_unbroken(tmp_path, tiny_sd, image_folder, unbroken):
    config = recipe(tmp_path, tiny_sd, image_folder, "killed")
    # The (N*BATCH + 2)-th read happens inside step N+1, after checkpoint N was written.
    killed = run_driver(config, {"FAULT_SIGNAL": "KILL", "FAULT_AT_FETCH": str(N * BATCH + 2)})
    assert killed.returncode == -9
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == [f"step-{N:07d}"], "a kill leaves only complete checkpoints"
    # A kill between a log line and the next checkpoint leaves lines the resumed run writes again.
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": N + 1, "loss": 0.0}) + "\n")
    resumed = run_driver(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_bitwise_equal(final_state(unbroken, 2 * N), final_state(tmp_path / "killed", 2 * N))
    assert logged_losses(tmp_path / "killed") == logged_losses(unbroken)
    assert (tmp_path / "killed" / "config.yaml").is_file()
    # Relaunching the finished run under another rate resumes its last checkpoint: the change is announced and
    # the earlier settings are kept beside the new ones.
    changed = run_driver(config, overrides=["optim.lr=5.0e-4"])
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "with changed settings" in changed.stdout + changed.stderr
    assert "optim.lr: 0.001 -> 0.0005" in changed.stdout + changed.stderr
    kept = yaml.safe_load((tmp_path / "killed" / f"config.step-{2 * N:07d}.yaml").read_text())
    assert kept["optim"]["lr"] == 1e-3
    assert yaml.safe_load((tmp_path / "killed" / "config.yaml").read_text())["optim"]["lr"] == 5e-4


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, tiny_sd, image_folder, unbroken):
    config = recipe(tmp_path, tiny_sd, image_folder, "termed")
    termed = run_driver(config, {"FAULT_SIGNAL": "TERM", "FAULT_AT_FETCH": str(N * BATCH + 2)})
    assert termed.returncode == 0, termed.stderr[-3000:]
    assert "stop requested" in termed.stdout + termed.stderr
    # The step in flight finishes, then step N+1 is checkpointed (not a multiple of checkpoint_every).
    assert (tmp_path / "termed" / "checkpoints" / f"step-{N + 1:07d}").is_dir()
    resumed = run_driver(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(final_state(unbroken, 2 * N), final_state(tmp_path / "termed", 2 * N))
    assert "changed settings" not in resumed.stdout + resumed.stderr
    assert not list((tmp_path / "termed").glob("config.step-*.yaml")), "an unchanged resume keeps one config"


def test_nonfinite_steps_are_skipped_counted_and_bounded(tmp_path, tiny_sd, image_folder):
    config = recipe(tmp_path, tiny_sd, image_folder, "nan", max_nonfinite_steps=1, max_steps=2, checkpoint_every=0)
    done = run_driver(config, {"FAULT_NAN_FETCHES": "1"})  # step 0 sees a NaN sample
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["nonfinite_steps"] == 1.0
    state = final_state(tmp_path / "nan", 2)
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    shutil.rmtree(tmp_path / "nan")
    aborted = run_driver(config, {"FAULT_NAN_FETCHES": "1,3"})  # steps 0 and 1
    assert aborted.returncode != 0
    assert "train.max_nonfinite_steps=1" in aborted.stderr


def test_two_process_ddp_ranks_end_identical(tmp_path, tiny_sd, image_folder):
    """The ranks read different batches; the UNet and the text encoder trained beside it (a second optimizer
    group, called through its DDP wrapper inside the pipeline's own prompt encoding) end identical."""
    config = recipe(tmp_path, tiny_sd, image_folder, "ddp", extra=("sft:", "  train_text_encoders: [text_encoder]"),
                    max_steps=2, checkpoint_every=0)
    launch_training(config)
    assert_ranks_identical(tmp_path / "ddp")
    assert (tmp_path / "ddp" / "checkpoints" / f"step-{2:07d}").is_dir()


def test_ddp_nonfinite_loss_on_one_rank_skips_the_step_on_both(tmp_path, tiny_sd, image_folder):
    """Rank 0's first batch is NaN, rank 1's is finite. Both ranks still run the backward (DDP's gradient
    all-reduce needs both; a rank that skipped it would leave the other waiting in a mismatched collective),
    then vote and skip step 0 together: the run finishes with identical, finite weights and one counted
    non-finite step."""
    config = recipe(tmp_path, tiny_sd, image_folder, "ddp_nan", max_steps=2, checkpoint_every=0,
                    max_nonfinite_steps=1)
    launch_training(config, {"FAULT_NAN_FETCHES": "1", "FAULT_NAN_RANK": "0"})
    assert_ranks_identical(tmp_path / "ddp_nan")
    metrics = [json.loads(line) for line in (tmp_path / "ddp_nan" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["nonfinite_steps"] == 1.0 and "nonfinite_steps" not in metrics[1]
    state = final_state(tmp_path / "ddp_nan", 2)
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_two_process_fsdp_trains_resumes_and_exports(tmp_path, tiny_sd, image_folder):
    """FSDP2 on CPU (gloo): the sharded student checkpoints, resumes bit for bit, and exports whole."""
    config = recipe(tmp_path, tiny_sd, image_folder, "fsdp", max_steps=2, checkpoint_every=1, ema_decay=0.0)
    text = config.read_text().replace("  enabled: false", "  enabled: true")
    config.write_text(text)
    launch_training(config, fsdp=True)
    run_dir = tmp_path / "fsdp"
    final = run_dir / "checkpoints" / f"step-{2:07d}"
    unbroken = load_file(final / "model.safetensors")
    exported = load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == unbroken.keys() and all(torch.equal(exported[k], unbroken[k]) for k in exported)
    initial = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(initial[k], unbroken[k]) for k in initial)
    shutil.rmtree(final)
    again = launch_training(config, fsdp=True)
    assert "resumed from" in again.stdout + again.stderr
    resumed = load_file(final / "model.safetensors")
    assert_bitwise_equal(unbroken, resumed)
