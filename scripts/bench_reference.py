"""The reference scripts scripts/bench.py compares against: diffusers' own training examples, run as a user would.

For a method with a reference (`REFERENCES`: lcd and dpo), the benchmark

1. writes a small synthetic dataset to a temporary folder in the format that script reads
   (webdataset tar shards of jpg + txt for the LCM script; a parquet table with jpg_0, jpg_1,
   label_0 and caption for the Diffusion-DPO one), which diffstill's own data kinds also read;
2. writes the pipeline folder both sides load (`reference_pipeline`);
3. runs the script from the user's diffusers checkout, unmodified, in a child process under
   scripts/bench_clock.py, which times its optimizer steps; and runs our trainer on the same
   folder, data, batch and precision (scripts/bench.py).

Nothing of the reference scripts is copied here; they are only run from the path the user gives.
Options both sides have are pinned to the same values on both (LCM: pseudo-Huber loss, N = 50,
w in [5, 15], target EMA 0.95; DPO: LoRA rank 4 on to_q/k/v/out.0, the adapters-off base as reference).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
CLIP_POSITIONS = 77  # the LCM script pads its unconditional prompt to 77 tokens, whatever the tokenizer says
DPO_LORA_RANK = 4    # the Diffusion-DPO script's default rank


# ------------------------------------------------------------------ data in the scripts' formats


def _jpeg(resolution: int, seed: int) -> bytes:
    """A smooth random RGB image (upsampled 8x8 noise), JPEG-encoded: decodes like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    small.resize((resolution, resolution), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# The original size a sample's {key}.json records. The SDXL LCM script drops samples whose json says they are
# smaller than 700 px (LAION metadata) and feeds the size to SDXL's micro-conditioning.
ORIGINAL_SIZE = 1024


def write_webdataset_shards(folder: Path, resolution: int, n: int, shards: int = 2) -> str:
    """`shards` uncompressed tars of {key}.jpg + {key}.txt + {key}.json (original width and height); returns
    their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    size = json.dumps({"width": max(resolution, ORIGINAL_SIZE), "height": max(resolution, ORIGINAL_SIZE)}).encode()
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s, n, shards):
                _add_member(tar, f"{i:06d}.jpg", _jpeg(resolution, i))
                _add_member(tar, f"{i:06d}.txt", f"a photo of object {i}".encode())
                _add_member(tar, f"{i:06d}.json", size)
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def write_pickapic_parquet(folder: Path, resolution: int, n: int) -> str:
    """A Pick-a-Pic-layout parquet table (jpg_0, jpg_1 bytes; label_0 1/0; caption); returns the folder."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict({
        "jpg_0": [_jpeg(resolution, 2 * i) for i in range(n)],
        "jpg_1": [_jpeg(resolution, 2 * i + 1) for i in range(n)],
        "label_0": [float(i % 2) for i in range(n)],  # half the pairs swapped, as in the real data
        "caption": [f"a photo of object {i}" for i in range(n)],
    })
    table.to_parquet(str(folder / "train.parquet"))
    return str(folder)


# ------------------------------------------------------------------ the pipeline folder both sides load


def widen_text_positions(text_encoder, length: int):
    """A copy of a CLIP text encoder with `length` positions (new rows repeat the last one)."""
    config = text_encoder.config.__class__.from_dict(text_encoder.config.to_dict())
    config.max_position_embeddings = length
    wide = type(text_encoder)(config)
    state = dict(text_encoder.state_dict())
    key = next(k for k in state if k.endswith("position_embedding.weight"))  # the prefix differs across versions
    old = state[key]
    state[key] = torch.cat([old, old[-1:].expand(length - old.shape[0], -1)])
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = wide.load_state_dict(state, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):
        raise RuntimeError(f"widening the text encoder lost weights: missing {missing}, unexpected {unexpected}")
    return wide.to(text_encoder.dtype)


def reference_pipeline(source: str, folder: Path) -> str:
    """Save `source` (folder or alias) so the reference scripts can load it: CLIP prompts of 77 tokens.

    The toy teacher's text encoder has 24 positions; the LCM script hard-codes 77 for its
    unconditional prompt. Both sides then train on this same folder.
    """
    from diffusers import DiffusionPipeline

    from pipelines.backbones import resolve_source

    source = resolve_source(source)
    text_config = json.loads((Path(source) / "text_encoder" / "config.json").read_text())
    if text_config["max_position_embeddings"] >= CLIP_POSITIONS:
        return source  # already loadable as it is (the sized pipelines)
    pipe = DiffusionPipeline.from_pretrained(source)
    pipe.register_modules(text_encoder=widen_text_positions(pipe.text_encoder, CLIP_POSITIONS))
    pipe.tokenizer.model_max_length = CLIP_POSITIONS
    pipe.tokenizer.init_kwargs["max_length"] = CLIP_POSITIONS
    pipe.save_pretrained(folder, safe_serialization=True)
    return str(folder)


# ------------------------------------------------------------------ the scripts and their options


@dataclass(frozen=True)
class RefRun:
    """What one comparison fixes for both sides."""

    model: str          # pipeline folder
    data: str           # what the write_data function returned
    resolution: int
    batch: int
    precision: str      # accelerate's mixed_precision: no | fp16 | bf16
    iterations: int     # optimizer steps the script must be able to run
    output_dir: str
    checkpointing: bool


def _common_args(run: RefRun) -> list[str]:
    args = ["--resolution", str(run.resolution), "--train_batch_size", str(run.batch), "--mixed_precision",
            run.precision, "--max_train_steps", str(run.iterations + 1), "--output_dir", run.output_dir,
            "--seed", "0", "--checkpointing_steps", "1000000", "--report_to", "tensorboard"]
    return args + (["--gradient_checkpointing"] if run.checkpointing else [])


def lcm_args(run: RefRun) -> list[str]:
    return _common_args(run) + [
        "--pretrained_teacher_model", run.model, "--train_shards_path_or_url", run.data,
        "--max_train_samples", str(run.batch * (run.iterations + 1)),
        "--dataloader_num_workers", "1",  # the script divides by it and asks for persistent workers: >= 1
        "--loss_type", "huber", "--num_ddim_timesteps", "50", "--w_min", "5", "--w_max", "15", "--ema_decay", "0.95",
        "--validation_steps", "1000000"]


def dpo_args(run: RefRun) -> list[str]:
    return _common_args(run) + [
        "--pretrained_model_name_or_path", run.model, "--dataset_name", run.data, "--dataset_split_name", "train",
        "--rank", str(DPO_LORA_RANK)]


@dataclass(frozen=True)
class Reference:
    scripts: dict[str, str]                              # bench size -> script path inside a diffusers checkout
    write_data: Callable[[Path, int, int], str]          # (folder, resolution, n) -> data path
    our_overrides: Callable[[str], list[str]]            # data path -> our config overrides for the same run
    argv: Callable[[RefRun], list[str]]                  # the same options for every size's script

    def script(self, size: str) -> str:
        if size not in self.scripts:
            raise ValueError(f"no reference script for size {size!r}; the diffusers examples compared here train "
                             f"{', '.join(self.scripts)}")
        return self.scripts[size]


def per_size(sd: str, sdxl: str) -> dict[str, str]:
    """The SD 1.x/2.x script for the toy and SD1.5-size UNets, its SDXL variant for the SDXL-size one."""
    return {"toy": sd, "sd15": sd, "sdxl": sdxl}


REFERENCES: dict[str, Reference] = {
    "lcd": Reference(
        per_size("examples/consistency_distillation/train_lcm_distill_sd_wds.py",
                 "examples/consistency_distillation/train_lcm_distill_sdxl_wds.py"),
        write_webdataset_shards,
        lambda data: ["data.kind=webdataset", f"data.path={data}", "lcd.loss=huber", "lcd.num_ddim_timesteps=50",
                      "lcd.w_min=5", "lcd.w_max=15", "lcd.target_decay=0.95"],
        lcm_args),
    "dpo": Reference(
        per_size("examples/research_projects/diffusion_dpo/train_diffusion_dpo.py",
                 "examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py"),
        write_pickapic_parquet,
        lambda data: ["data.kind=pickapic_with_ties", f"data.path={data}", f"model.lora.rank={DPO_LORA_RANK}",
                      "dpo.loss=dpo", "dpo.reference=adapters_off"],
        dpo_args),
}


# Methods whose reference run does not exist yet, and why (shown in the comparison table).
NO_REFERENCE: dict[str, str] = {
    "tbcm": "its baseline is in the suite: compare the tbcm and scm rows (sCM on real latents, same student and loss)",
}


def checkout_commit(checkout: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def run_reference(checkout: Path, ref: Reference, size: str, run: RefRun, warmup: int, steps: int,
                  pythonpath: str | None = None) -> dict:
    """Time the size's reference script in a child process (scripts/bench_clock.py); its step times and peak
    memory."""
    name = ref.script(size)
    script = checkout / name
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found; --reference-dir must be a diffusers checkout with {name}")
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "times.json", Path(tmp) / "log.txt"
        command = [sys.executable, str(HERE / "bench_clock.py"), "--warmup", str(warmup), "--steps", str(steps),
                   "--out", str(out), str(script), "--", *ref.argv(run)]
        with open(log, "w") as fh:
            done = subprocess.run(command, check=False, stdout=fh, stderr=subprocess.STDOUT, env=_child_env(pythonpath))
        if not out.is_file():
            text = log.read_text(errors="replace")
            tail = "\n".join(text.splitlines()[-25:])
            raise RuntimeError(f"{name} failed (exit {done.returncode}){_hint(text)}:\n{tail}")
        result = json.loads(out.read_text())
    if len(result["step_times"]) < steps:
        raise RuntimeError(f"{name} ended after {result['backward_calls']} optimizer steps; "
                           f"{warmup + steps + 1} were needed (check its --max_train_steps and data size)")
    return result


def _hint(log: str) -> str:
    if "KeyError: 'fname'" in log:
        return (" -- its group_by_keys_nothrow does not skip the end-of-shard marker that webdataset >= 0.2.86 "
                "yields; give it webdataset 0.2.85: pip install --no-deps --target DIR webdataset==0.2.85, then "
                "--reference-pythonpath DIR")
    if "No module named 'wandb'" in log:
        return " -- the Diffusion-DPO script imports wandb at the top: pip install 'diffstill[bench]'"
    return ""


def _child_env(pythonpath: str | None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    return env
