#!/usr/bin/env python
"""Training-step speed and memory of each trainer on real-size architectures (random weights).

    python scripts/bench.py --methods sft --sizes toy,sd15 --steps 5 --warmup 2
    python scripts/bench.py --methods sft --sizes sd15,sdxl,dit600m --precision bf16 --batch 8   # on a GPU

For every (method, size): build the architecture from config (pipelines/sized.py;
`toy` is the shipped toy teacher), run warm-up steps through the real loop
(trainers.loop.Trainer), then time steps and report the median, samples/s,
peak memory, the share of step time per phase (trainers.profiling), and the
model FLOPs utilisation against this device's measured matmul peak. Appends a
markdown table to --out and writes JSON next to it. Speed lives here, never in
tests.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, resolution: int, n: int = 64):
        self.resolution, self.n = resolution, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.rand(3, self.resolution, self.resolution, generator=g) * 2 - 1,
                "prompt": f"a photo of object {i}", "skipped": 0, "index": i}


def model_source(size: str, workdir: Path) -> tuple[str, int]:
    """(pipeline folder or alias, image resolution) for a size name."""
    if size == "toy":
        return "toy", 32
    from pipelines.sized import sized_pipeline

    pipe = sized_pipeline(size)
    folder = workdir / size
    pipe.save_pretrained(folder, safe_serialization=True)
    latent = {"sd15": 64, "sdxl": 128, "dit600m": 32}[size]
    return str(folder), latent * pipe.vae_scale_factor


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput (FLOP/s): the denominator of MFU."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(trainer) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.run_step()
    trainer.state.step += 1
    return float(counter.get_total_flops())


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process


def bench_one(method: str, size: str, args, workdir: Path) -> dict:
    from accelerate import Accelerator

    from pipelines.devices import has_accelerator
    from trainers.config import load_config, method_class
    from trainers.loop import Trainer
    from trainers.profiling import Profile
    from trainers.run import load_run_bundle

    source, resolution = model_source(size, workdir)
    overrides = [f"method={method}", f"model.source={source}", f"output_dir={workdir / 'run'}",
                 f"train.batch_size={args.batch}", f"train.mixed_precision={args.precision}",
                 f"model.gradient_checkpointing={str(args.checkpointing).lower()}", "train.log_with=none",
                 f"data.resolution={resolution}", "data.kind=imagefolder", "data.path=unused"]
    cfg = load_config(None, overrides + list(args.override))
    accelerator = Accelerator(mixed_precision=args.precision, cpu=not has_accelerator())
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bundle = load_run_bundle(cfg, accelerator.device)
    trainer = Trainer(cfg, accelerator, method_class(method)(cfg, bundle), RandomImages(resolution))
    for _ in range(args.warmup):
        trainer.run_step()
        trainer.state.step += 1
    flops = step_flops(trainer)
    times = []
    with Profile() as profile:
        for _ in range(args.steps):
            sync(accelerator.device)
            start = time.perf_counter()
            trainer.run_step()
            sync(accelerator.device)
            times.append(time.perf_counter() - start)
            trainer.state.step += 1
    median = statistics.median(times)
    total = sum(profile.seconds.values()) or 1.0
    trainable = sum(p.numel() for m in trainer.modules.values() for p in m.parameters() if p.requires_grad)
    return {"method": method, "size": size, "batch": args.batch, "precision": args.precision,
            "resolution": resolution, "trainable_params_M": trainable / 1e6, "median_step_s": median,
            "samples_per_s": args.batch / median, "peak_memory_GiB": peak_memory_gib(accelerator.device),
            "step_TFLOP": flops / 1e12, "achieved_TFLOPs": flops / median / 1e12,
            "phases": {k: v / total for k, v in sorted(profile.seconds.items(), key=lambda kv: -kv[1])},
            "steps_timed": args.steps}


def markdown(rows: list[dict], device: str, peak: float) -> str:
    lines = [f"### {time.strftime('%Y-%m-%d')} on {device} (matmul peak {peak / 1e12:.2f} TFLOP/s)", "",
             "| method | size | batch | precision | step (s, median) | samples/s | peak mem (GiB) | TFLOP/step | MFU | phases |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        phases = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["phases"].items())
        lines.append(f"| {r['method']} | {r['size']} | {r['batch']} | {r['precision']} | {r['median_step_s']:.3f} | "
                     f"{r['samples_per_s']:.2f} | {r['peak_memory_GiB']:.2f} | {r['step_TFLOP']:.3f} | "
                     f"{100 * r['mfu']:.1f}% | {phases} |")
    return "\n".join(lines) + "\n"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--methods", default="sft", help="comma-separated trainer names")
    p.add_argument("--sizes", default="toy", help="comma-separated: toy, sd15, sdxl, dit600m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the trained denoiser")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="outputs/bench/benchmarks.md", help="markdown file to append to")
    p.add_argument("override", nargs="*", help="extra config overrides, e.g. sft.lpl.weight=1")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(device, dtype)
    rows = []
    for size in args.sizes.split(","):
        for method in args.methods.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                row = bench_one(method, size, args, Path(tmp))
            row["mfu"] = row["achieved_TFLOPs"] * 1e12 / peak
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, device_name(), peak)
    with open(out, "a") as fh:
        fh.write(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"device": device_name(), "peak_flops": peak, "rows": rows}, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
