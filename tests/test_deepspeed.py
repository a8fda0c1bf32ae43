"""DeepSpeed ZeRO-2 through the shared loop, on the CPU (marker `deepspeed`: needs `pip install deepspeed`).

    ./with-venv pip install deepspeed && ./with-venv pytest -m deepspeed -n 0 tests/test_deepspeed.py

DeepSpeed runs its own optimizer step, clipping and accumulation boundary inside `backward`, so these
runs check that the loop hands it the recipe's settings: the same recipe (gradient accumulation 2,
clipping 1.0) trained plainly and under ZeRO-2 ends with the same weights, a resumed ZeRO-2 run equals
an unbroken one bit for bit, and a NaN batch is counted and leaves the weights as a plain run's skip does.
DeepSpeed's CPU accelerator builds one small C++ op with the system compiler on first use.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distributed_launch import failure_report, free_port

pytestmark = pytest.mark.deepspeed
ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
ZERO2 = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config: {zero_stage: 2, offload_optimizer_device: none, offload_param_device: none, zero3_init_flag: false}
mixed_precision: 'no'
machine_rank: 0
num_machines: 1
num_processes: 1
use_cpu: false
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from pipelines.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("deepspeed")
    rng = np.random.default_rng(1)
    (root / "images").mkdir()
    with open(root / "images" / "metadata.jsonl", "w") as fh:
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n")
    (root / "zero2.yaml").write_text(ZERO2)
    (root / "recipe.yaml").write_text("method: sft\n")
    return root, save_tiny_pipeline("sd", root / "base")


def train(setup, name: str, deepspeed: bool, env: dict | None = None, *overrides: str) -> Path:
    root, base = setup
    if deepspeed:
        mode = ["--config_file", str(root / "zero2.yaml")]
    else:
        mode = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--main_process_port", str(free_port()),
           str(DRIVER), "--config", str(root / "recipe.yaml"), f"output_dir={root / name}", f"model.source={base}",
           "data.kind=imagefolder", f"data.path={root / 'images'}", "data.resolution=32", "train.batch_size=2",
           "train.gradient_accumulation=2", "train.max_grad_norm=1.0", "train.max_steps=3", "train.ema_decay=0",
           "train.log_every=1", "optim.lr=1e-3", "optim.schedule=cosine", "optim.warmup_steps=1",
           "sft.sample_steps=2", *overrides]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, failure_report(done)
    latest = sorted((root / name / "checkpoints").iterdir())[-1]
    assert (latest / "zero_to_fp32.py").is_file() == deepspeed  # a DeepSpeed engine wrote the checkpoint
    return root / name


def unet(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_zero2_trains_as_the_plain_loop_and_resumes_exactly(setup):
    """Accumulation 2 and clipping reach the engine: weights match the plain loop to float round-off (the
    update itself is ~2e-3, so a doubled step count or a missed clip would show at 1e-3); stopping after
    step 2 and resuming gives the unbroken run's weights bit for bit."""
    root, base = setup
    plain, zero2 = unet(train(setup, "plain", False)), unet(train(setup, "zero2", True))
    moved = max_difference(plain, load_file(base / "unet" / "diffusion_pytorch_model.safetensors"))
    assert moved > 1e-3 and max_difference(plain, zero2) < 1e-5
    train(setup, "resumed", True, None, "train.max_steps=2", "train.checkpoint_every=1", "export.enabled=false")
    resumed = unet(train(setup, "resumed", True, None, "train.checkpoint_every=1"))
    assert max_difference(zero2, resumed) == 0.0


def test_zero2_nan_batch_is_counted_and_skipped(setup):
    """Step 0 reads a NaN image: DeepSpeed skips its own update (its overflow check, fp32 here) and the loop
    counts the step; the weights equal the plain loop's, which skips the same step itself."""
    nan = {"FAULT_NAN_FETCHES": "1"}
    zero2 = train(setup, "nan_zero2", True, nan)
    plain = train(setup, "nan_plain", False, nan)
    first = json.loads((zero2 / "metrics.jsonl").read_text().splitlines()[0])
    assert first["nonfinite_steps"] == 1.0
    weights = unet(zero2)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert max_difference(weights, unet(plain)) < 1e-5
