#!/usr/bin/env python
"""Generate images from any diffusers text-to-image pipeline (an export, a hub id in the cache, or `toy`).

    python scripts/generate.py --model outputs/toy_sft_lpl/pipeline --prompt "a red circle at the top left" \
        --num-images 4 --steps 25 --guidance 5 --out outputs/samples
    python scripts/generate.py --model toy --prompts toy-heldout --num-prompts 8 --steps 2 --out outputs/few

Writes `<prompt index>_<image index>.png`, `grid.png` (one row per prompt) and `images.jsonl` (file,
prompt, seed, steps, guidance). Image k of prompt p uses seed S + p*K + k (K images per prompt), the
rule scripts/evaluate.py uses, so an image seen in an evaluation is regenerated here exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    a = parser.add_argument
    a("--model", required=True, help="diffusers folder, hub id (offline cache) or toy / toy-flow")
    a("--prompt", action="append", default=[], help="a prompt; repeatable")
    a("--prompts", help="a prompt set (toy-heldin, toy-heldout, a benchmark name) or a .txt/.jsonl file")
    a("--num-prompts", type=int, help="use the first N prompts of --prompts")
    a("--num-images", type=int, default=1, help="images per prompt (K)")
    a("--steps", type=int, required=True, help="sampling steps")
    a("--guidance", type=float, help="guidance scale (default: the pipeline's own default)")
    a("--seed", type=int, default=0, help="seed S of the first image")
    a("--batch-size", type=int, default=8, help="images per pipeline call")
    a("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    a("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if not args.prompt and not args.prompts:
        parser.error("give --prompt (repeatable) or --prompts")
    if args.num_images < 1 or args.steps < 1 or args.batch_size < 1:
        parser.error("--num-images, --steps and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from evaluation.prompts import load_prompts

    prompts = list(args.prompt) + (load_prompts(args.prompts, n=args.num_prompts).prompts if args.prompts else [])
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from evaluation.harness import default_guidance, load_pipeline, pipeline_sampler
    from pipelines.images import save_grid, to_uint8

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.model, getattr(torch, args.dtype), device)
    guidance = args.guidance if args.guidance is not None else default_guidance(pipe)
    sample = pipeline_sampler(pipe, args.steps, guidance)
    k = args.num_images
    jobs = [(p, i, args.seed + p * k + i) for p in range(len(prompts)) for i in range(k)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, records = [], []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="generate", unit="batch"):
        batch = jobs[start:start + args.batch_size]
        x = sample([prompts[p] for p, _, _ in batch], [s for _, _, s in batch]).cpu()
        for (p, i, seed), pixels in zip(batch, to_uint8(x)):
            name = f"{p:04d}_{i:02d}.png"
            Image.fromarray(pixels).save(out / name)
            records.append({"file": name, "prompt": prompts[p], "seed": seed, "steps": args.steps,
                            "guidance": guidance, "model": args.model})
        images.append(x)
    save_grid(torch.cat(images), out / "grid.png", nrow=k)
    (out / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} images of {len(prompts)} prompts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
