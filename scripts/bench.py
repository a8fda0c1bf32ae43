#!/usr/bin/env python
"""Training-step speed and memory of each trainer on real-size architectures (random weights).

    python scripts/bench.py --methods sft,lcd,dpo,tbcm --sizes toy,sd15 --steps 5 --warmup 2
    python scripts/bench.py --methods lcd,dpo --sizes toy --batch 8 --reference-dir ~/src/diffusers
    python scripts/bench.py --methods sft --sizes sd15,sdxl,dit600m --precision bf16 --batch 8   # on a GPU

For every (method, size): build the architecture from config (pipelines/sized.py;
`toy` is the shipped toy teacher), feed the method the synthetic data its
contract asks for (scripts/bench_inputs.py), run warm-up steps through the real
loop (trainers.loop.Trainer), then time steps and report the median, samples/s,
peak memory, the share of step time per phase (trainers.profiling), and the
model FLOPs utilisation against this device's measured matmul peak.

With --reference-dir (a diffusers checkout), methods that have a reference
script (scripts/bench_reference.py: lcd, dpo) are also run side by side with
it on the same pipeline folder, data files, batch and precision, and the ratio
of samples/s (ours / theirs) is reported. Appends markdown tables to --out and
writes JSON next to it. Speed lives here, never in tests.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench_inputs import METHOD_DATA, method_overrides, synthetic_dataset  # noqa: E402
from bench_reference import (  # noqa: E402
    NO_REFERENCE, REFERENCES, RefRun, checkout_commit, reference_pipeline, run_reference)


def model_source(size: str, workdir: Path) -> tuple[str, int]:
    """(pipeline folder or alias, image resolution) for a size name; a folder already in `workdir` is reused."""
    if size == "toy":
        return "toy", 32
    from pipelines.sized import sized_pipeline

    folder = workdir / size
    if not (folder / "model_index.json").is_file():
        sized_pipeline(size).save_pretrained(folder, safe_serialization=True)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    latent = {"sd15": 64, "sdxl": 128, "dit600m": 32}[size]
    channels = vae.get("block_out_channels") or vae["encoder_block_out_channels"]  # AutoencoderKL or the DC-AE
    return str(folder), latent * 2 ** (len(channels) - 1)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput (FLOP/s): the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 1024
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


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """FLOPs of aten.convolution_backward, grouped convolutions included.

    torch's own formula ignores `groups`: it counts a depthwise convolution of C channels' backward at (C + 1)
    times its forward instead of 2 times (Sana's depthwise convs have 5,760 channels). Each gradient (input,
    weight) costs what the forward convolution does: one multiply-add per (output element, weight element
    of its group), i.e. 2 * |out| * |w[0]|, where `out` is grad_out for a convolution and the forward
    input for a transposed one, and |w[0]| = (C_in / groups) * prod(kernel) is one output channel's weights.
    """
    out = x_shape if transposed else grad_out_shape
    forward = 2 * math.prod(out) * math.prod(w_shape[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def advance(trainer) -> None:
    """One training step through the real loop, counted as the loop counts it."""
    trainer.run_step()
    trainer.state.step += 1


def step_flops(trainer) -> float:
    """FLOPs of one training step, counted op by op in eager mode: compiled kernels bypass the counter, so a
    `--compile` run counts the same step uncompiled (the model FLOPs are the same; MFU is about the maths)."""
    from torch.utils.flop_counter import FlopCounterMode

    fixed = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False, custom_mapping=fixed) as counter:
        advance(trainer)
    return float(counter.get_total_flops())


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process


def user_overrides(method: str, overrides: list[str]) -> list[str]:
    """The command line's overrides for this method: another method's section (`tbcm.route_steps=4` while
    timing lcd) is left out, so one command can tune several methods at once."""
    from trainers import METHODS

    return [o for o in overrides if o.split(".", 1)[0] not in METHODS or o.split(".", 1)[0] == method]


def make_trainer(method: str, source: str, resolution: int, args, workdir: Path, overrides: list[str],
                 dataset: Callable | None = None):
    """The real loop's Trainer for `method` on `source`; `dataset(cfg, bundle)` defaults to the synthetic inputs."""
    from accelerate import Accelerator

    from pipelines.devices import has_accelerator
    from trainers.config import load_config, method_class
    from trainers.loop import Trainer
    from trainers.run import load_run_bundle

    base = [f"method={method}", f"model.source={source}", f"output_dir={workdir / 'run'}",
            f"train.batch_size={args.batch}", f"train.mixed_precision={args.precision}",
            f"model.gradient_checkpointing={str(args.checkpointing).lower()}", "train.log_with=none",
            f"data.resolution={resolution}"]
    cfg = load_config(None, base + overrides + user_overrides(method, args.override))
    accelerator = Accelerator(mixed_precision=args.precision, cpu=not has_accelerator(),
                              dynamo_backend="inductor" if args.compile else None)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.train.seed)
    bundle = load_run_bundle(cfg, accelerator.device)
    if dataset is None:
        data = synthetic_dataset(cfg.data.kind, resolution, bundle)
    else:
        data = dataset(cfg, bundle)
    return Trainer(cfg, accelerator, method_class(method)(cfg, bundle), data)


def time_trainer(trainer, args) -> dict:
    """Warm up, count one step's FLOPs, time `args.steps` steps, then profile as many again for the phase shares.

    The timed steps run without the phase profiler: it synchronises the device at every phase edge, which keeps
    the host from queueing the next kernels while the device works and so inflates step time on a GPU."""
    from trainers.profiling import Profile

    device = trainer.acc.device
    for _ in range(args.warmup):
        advance(trainer)
    # torch's FLOP counter crashes the process (SIGSEGV, torch 2.14) on forward-mode AD's dual tensors: such
    # runs report no FLOPs and no MFU rather than lose every other row.
    flops = None if getattr(trainer.cfg.options, "jvp", None) == "forward_ad" else step_flops(trainer)
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        advance(trainer)
        sync(device)
        times.append(time.perf_counter() - start)
    with Profile() as profile:
        for _ in range(args.steps):
            advance(trainer)
    median = statistics.median(times)
    total = sum(profile.seconds.values()) or 1.0
    trainable = sum(p.numel() for m in trainer.modules.values() for p in m.parameters() if p.requires_grad)
    return {"trainable_params_M": trainable / 1e6, "median_step_s": median, "samples_per_s": args.batch / median,
            "peak_memory_GiB": peak_memory_gib(device), "step_TFLOP": None if flops is None else flops / 1e12,
            "achieved_TFLOPs": None if flops is None else flops / median / 1e12,
            "phases": {k: v / total for k, v in sorted(profile.seconds.items(), key=lambda kv: -kv[1])},
            "steps_timed": len(times), "step_times": times}


def bench_one(method: str, size: str, source: str, resolution: int, args, workdir: Path) -> dict:
    trainer = make_trainer(method, source, resolution, args, workdir, method_overrides(method))
    return {"method": method, "size": size, "batch": args.batch, "precision": args.precision,
            "compiled": args.compile, "checkpointing": args.checkpointing, "overrides": user_overrides(method, args.override),
            "resolution": resolution, **time_trainer(trainer, args)}


def compare_one(method: str, size: str, source: str, resolution: int, args, workdir: Path) -> dict:
    """Our step and the reference script's on the same pipeline folder, data files, batch and precision."""
    from trainers.data import build_dataset

    ref = REFERENCES[method]
    script = ref.script(size)  # fails at once for a size no reference script trains
    folder = reference_pipeline(source, workdir / "reference_pipeline")
    iterations = args.warmup + args.steps + 1
    data = ref.write_data(workdir / "reference_data", resolution, args.batch * (iterations + 1))
    run = RefRun(model=folder, data=data, resolution=resolution, batch=args.batch, precision=args.precision,
                 iterations=iterations, output_dir=str(workdir / "reference_run"), checkpointing=args.checkpointing)
    checkout = Path(args.reference_dir)
    # The reference first, in its own process, while this one holds no model: the device is all its own.
    theirs = run_reference(checkout, ref, size, run, args.warmup, args.steps, args.reference_pythonpath)
    trainer = make_trainer(method, folder, resolution, args, workdir, ref.our_overrides(data),
                           dataset=lambda cfg, bundle: build_dataset(cfg.data))
    ours = time_trainer(trainer, args)
    their_median = statistics.median(theirs["step_times"])
    return {"method": method, "size": size, "batch": args.batch, "precision": args.precision,
            "resolution": resolution, "reference": script, "reference_commit": checkout_commit(checkout),
            "ours": ours, "reference_median_step_s": their_median, "reference_samples_per_s": args.batch / their_median,
            "reference_backward_share": sum(theirs["backward_times"]) / sum(theirs["step_times"]),
            "reference_peak_memory_GiB": theirs["peak_memory_GiB"], "reference_step_times": theirs["step_times"],
            "ratio": ours["samples_per_s"] / (args.batch / their_median)}


def guarded(fn: Callable[..., dict], method: str, size: str, *args) -> dict:
    """fn(method, size, *args); a combination that cannot run (e.g. lcd's guidance embedding on a DiT) becomes an
    error row.

    Afterwards the row's models are freed, so the next row's peak memory is its own."""
    try:
        return fn(method, size, *args)
    except Exception as err:  # noqa: BLE001 - one bad combination must not lose the others' rows
        traceback.print_exc()
        return {"method": method, "size": size,
                "error": f"could not run: {type(err).__name__}: {str(err).splitlines()[0]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def precision_name(precision: str) -> str:
    return "fp32" if precision == "no" else precision


def setup_name(r: dict) -> str:
    """Precision plus the levers a row was run with: `bf16, checkpointing, compiled, optim.fused=false`."""
    parts = [precision_name(r["precision"])]
    parts += [name for name in ("checkpointing", "compiled") if r.get(name)]
    return ", ".join(parts + list(r.get("overrides", [])))


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(rows: list[dict], device: str, peak: float) -> str:
    lines = [f"### {time.strftime('%Y-%m-%d')} on {device} (matmul peak {peak / 1e12:.2f} TFLOP/s)", "",
             "| method | size | batch | setup | step (s, median) | samples/s | peak mem (GiB) | TFLOP/step | MFU | phases |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['size']} | | | {r['error']} | | | | | |")
            continue
        phases = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["phases"].items())
        lines.append(f"| {r['method']} | {r['size']} | {r['batch']} | {setup_name(r)} | "
                     f"{r['median_step_s']:.3f} | {r['samples_per_s']:.2f} | {r['peak_memory_GiB']:.2f} | "
                     f"{_number(r['step_TFLOP'], '.3f')} | {_number(r['mfu'], '.1%')} | {phases} |")
    return "\n".join(lines) + "\n"


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["Against the reference scripts (same pipeline folder, data files, batch and precision):", "",
             ("| method | size | batch | precision | reference | ours step (s) | reference step (s) | ours samples/s | "
              "reference samples/s | ours / reference | peak mem ours / reference (GiB) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['size']} | | | {r['error']} | | | | | | |")
            continue
        o = r["ours"]
        lines.append(f"| {r['method']} | {r['size']} | {r['batch']} | {precision_name(r['precision'])} | "
                     f"{Path(r['reference']).name} | {o['median_step_s']:.3f} | {r['reference_median_step_s']:.3f} | "
                     f"{o['samples_per_s']:.2f} | {r['reference_samples_per_s']:.2f} | {r['ratio']:.2f}x | "
                     f"{o['peak_memory_GiB']:.2f} / {r['reference_peak_memory_GiB']:.2f} |")
    return "\n".join(lines) + "\n"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--methods", default="sft", help="comma-separated trainer names: " + ", ".join(METHOD_DATA))
    p.add_argument("--sizes", default="toy", help="comma-separated: toy, sd15, sdxl, dit600m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of the trained denoiser")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained modules (accelerate's inductor "
                                                           "backend, as `accelerate launch --dynamo_backend inductor`)")
    p.add_argument("--pipelines-dir", help="keep the sized pipeline folders here and reuse them in later runs")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="outputs/bench/benchmarks.md", help="markdown file to append to")
    p.add_argument("--reference-dir", help="a diffusers checkout: also time its reference scripts (lcd: the LCM "
                                          "distillation example, dpo: the Diffusion-DPO example) side by side")
    p.add_argument("--reference-pythonpath", help="folder prepended to PYTHONPATH for the reference scripts only "
                                                  "(e.g. one holding webdataset==0.2.85 for the LCM script)")
    p.add_argument("--reference-only", action="store_true", help="skip the synthetic-input rows; only compare")
    p.add_argument("override", nargs="*", help="extra config overrides, e.g. sft.lpl.weight=1")
    return p.parse_args(argv)


def run_all(args, peak: float) -> tuple[list[dict], list[dict]]:
    """(synthetic-input rows, reference comparisons) for every size and method asked for."""
    rows, comparisons = [], []
    for size in args.sizes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            # a sized pipeline is saved once for every method (and kept across runs with --pipelines-dir)
            source, resolution = model_source(size, Path(args.pipelines_dir or tmp))
            for method in args.methods.split(","):
                workdir = Path(tmp) / method
                if not args.reference_only:
                    row = guarded(bench_one, method, size, source, resolution, args, workdir / "own")
                    if "error" not in row:
                        row["mfu"] = None if row["achieved_TFLOPs"] is None else row["achieved_TFLOPs"] * 1e12 / peak
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if args.reference_dir and method in REFERENCES:
                    comparisons.append(guarded(compare_one, method, size, source, resolution, args, workdir / "ref"))
                    print(json.dumps(comparisons[-1]), flush=True)
                elif args.reference_dir:
                    missing = NO_REFERENCE.get(method, "no reference script is wired for this method")
                    comparisons.append({"method": method, "size": size, "error": f"no reference: {missing}"})
    return rows, comparisons


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    dtype = dtype if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(device, dtype)
    rows, comparisons = run_all(args, peak)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables = markdown(rows, device_name(), peak) if rows else f"### {time.strftime('%Y-%m-%d')} on {device_name()}\n"
    if comparisons:
        tables += "\n" + comparison_markdown(comparisons)
    with open(out, "a") as fh:
        fh.write(tables + "\n")
    out.with_suffix(".json").write_text(json.dumps({"device": device_name(), "peak_flops": peak, "rows": rows,
                                                     "comparisons": comparisons}, indent=1))
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
