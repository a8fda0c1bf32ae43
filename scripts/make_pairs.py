#!/usr/bin/env python
"""Make (noise, sample) pairs from a teacher's ODE for reflow (Rectified Diffusion, arXiv 2410.07303).

    accelerate launch scripts/make_pairs.py --model toy --prompts toy-heldin --num-prompts 2048 \\
        --out outputs/toy/pairs --solver dpmpp_2m --steps 25 --guidance 5 --resolution 32
    python scripts/make_pairs.py --model outputs/toy/reflow/pipeline --prompts toy-heldin --num-prompts 256 \\
        --out outputs/toy/reflow_straightness --solver ddim --steps 25 --guidance 1.5 --resolution 32 --measure-only

Pairs are sharded over the processes and written as safetensors shards with an index (see
`trainers/pairs.py`); re-running the same command resumes a killed run. `--measure-only` writes no
pairs: it measures the model's first-order error (path straightness) on the same (prompt, seed)
items and writes first_order.json, for comparing a teacher with its reflowed student.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("float32", "float16", "bfloat16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from trainers.pairs import SOLVERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", required=True, help="teacher: hub id, diffusers folder, or alias (toy, toy-flow)")
    p.add_argument("--prompts", required=True, help="prompt set (toy-heldin, coco-30k, ...) or a prompt file")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts (toy sets: draw N)")
    p.add_argument("--prompts-root", default=None, help="folder holding benchmark prompt files")
    p.add_argument("--pairs-per-prompt", type=int, default=1, help="pairs per prompt, each with its own noise")
    p.add_argument("--out", required=True, help="output folder (re-running with it resumes)")
    p.add_argument("--solver", choices=sorted(SOLVERS), default="dpmpp_2m",
                   help="ODE solver (dpmpp_2m: DPM-Solver++(2M), as the paper's DPM-Solver; ddim; euler)")
    p.add_argument("--steps", type=int, default=25, help="solver steps (trailing grid)")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale, diffusers convention (<= 1: none)")
    p.add_argument("--resolution", type=int, default=None, help="square image size in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="pair i uses initial noise seeded by seed + i")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per teacher batch")
    p.add_argument("--shard-size", type=int, default=256, help="pairs per shard (the unit of resume)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="teacher weights dtype")
    p.add_argument("--no-text-cache", action="store_true", help="do not store prompt embeddings (the trainer re-encodes)")
    p.add_argument("--measure-only", action="store_true", help="write no pairs; measure the first-order error")
    args = p.parse_args(argv)
    for name in ("pairs_per_prompt", "steps", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.shard_size % args.batch_size:
        p.error(f"--shard-size ({args.shard_size}) must be a multiple of --batch-size ({args.batch_size})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from evaluation.prompts import load_prompts
    from pipelines.backbones import load_bundle
    from pipelines.devices import has_accelerator
    from trainers.pairs import PairSettings, make_pairs, measure_first_order

    prompt_set = load_prompts(args.prompts, n=args.num_prompts, root=args.prompts_root, seed=args.seed)
    accelerator = Accelerator(cpu=not has_accelerator())
    bundle = load_bundle(args.model, dtype=getattr(torch, args.dtype), device=accelerator.device)
    bundle.denoiser.requires_grad_(False).eval()
    settings = PairSettings(
        model=args.model, prompts=f"{prompt_set.name} ({prompt_set.source})", num_prompts=len(prompt_set.prompts),
        pairs_per_prompt=args.pairs_per_prompt, solver=args.solver, steps=args.steps, guidance=args.guidance,
        resolution=args.resolution or bundle.default_image_size[0], seed=args.seed, batch_size=args.batch_size,
        shard_size=args.shard_size, dtype=args.dtype, text_cache=not args.no_text_cache)
    out = Path(args.out)
    if args.measure_only:
        result = measure_first_order(accelerator, bundle, prompt_set.prompts, settings)
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "first_order.json").write_text(json.dumps(result, indent=1))
            print(json.dumps({k: v for k, v in result.items() if k != "settings"}))
        return 0
    mine = sum(len(r) for j, r in enumerate(settings.shards()) if j % accelerator.num_processes == accelerator.process_index)
    with tqdm(total=mine, desc="pairs", unit="pair", disable=not accelerator.is_main_process) as bar:
        index = make_pairs(accelerator, bundle, prompt_set.prompts, out, settings, progress=bar.update)
    accelerator.print(f"{index['num_pairs']} pairs in {out} (first-order error {index['first_order_error']:.4g}, "
                      f"one-step error {index['one_step_error']:.4g})")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
