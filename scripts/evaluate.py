"""Evaluate diffusers pipelines (teachers, students) on a prompt set at several step counts.

    python scripts/evaluate.py --model outputs/toy_lcd --prompts toy-heldout --steps 1,2,4 \\
        --metrics fid,clip_score,toy_attributes,diversity,vendi,speed --num-images 4 --out outputs/eval_lcd
    accelerate launch scripts/evaluate.py --model teacher --steps 50 --guidance 7.5 \\
        --model outputs/sdxl_tbcm --steps 1,2,4 --guidance 0 --prompts coco-30k --prompts-root /data/prompts \\
        --fid-ref /data/coco-val-images --metrics fid,clip_score --clip-model /weights/clip-vit-large-patch14 --out ...

``--steps``, ``--guidance`` and ``--label`` are given once (for every model) or once per ``--model``,
in the same order. Writes eval.json, eval.md, one grid PNG per model and step count and
metrics_vs_steps.png under ``--out``. docs/evaluation.md describes the protocol and every metric.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.flags import per_entry  # noqa: E402

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--model", action="append", required=True, help="diffusers folder, hub id (offline cache) or alias; repeatable")
    a("--label", action="append", help="name for each --model in the report (default: its folder name)")
    a("--prompts", required=True, help="toy-heldin, toy-heldout, coco-30k, mjhq-30k, hpsv2, parti, or a prompt FILE")
    a("--prompts-root", help="folder holding the benchmark prompt files (default $DIFFSTILL_PROMPTS)")
    a("--num-prompts", type=int, help="use the first N prompts (toy sets: draw N; default 64 toy / all otherwise)")
    a("--prompt-seed", type=int, default=0, help="seed of the toy prompt draw (kept apart from image seeds)")
    a("--steps", action="append", required=True, help="N[,N...] sampling steps; once, or once per --model")
    a("--guidance", action="append", type=float, help="guidance scale; once, or once per --model (default: pipeline's)")
    a("--num-images", type=int, default=1, help="images per prompt (diversity and vendi need 2 or more)")
    a("--metrics", default="fid,clip_score", help="comma list of fid, clip_score, reward:<name>, diversity, vendi, "
                                                  "speed, toy_attributes")
    a("--seed", type=int, default=0, help="base seed S: image i (global index) uses seed S + i")
    a("--batch-size", type=int, default=8, help="images per pipeline call (part of the protocol)")
    a("--resolution", type=int, help="square output size (default: the pipeline's own)")
    a("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: float16 on CUDA, float32 otherwise")
    a("--out", required=True, help="output folder")
    a("--feature-model", help="FID/diversity features: 'inception' or a CLIPModel folder (default: toy CLIP for "
                              "toy captions, inception otherwise)")
    a("--inception-weights", help="torch-fidelity Inception weights file or folder (default: torch hub cache)")
    a("--clip-model", help="CLIPModel folder with tokenizer for clip_score (default: the toy CLIP)")
    a("--fid-ref", help="FID reference: folder of real images or a datasets save_to_disk folder (column image), "
                        "statistics cached; or a .npz of statistics")
    a("--stats-cache", help="folder for cached reference statistics (default $DIFFSTILL_CACHE or ~/.cache/diffstill)")
    a("--reward-option", action="append", default=[], metavar="NAME:KEY=VALUE",
      help="option for reward NAME's builder, e.g. hpsv2:path=/weights/HPS_v2_compressed.pt; repeatable")
    a("--speed-batch", type=int, default=1, help="images per timed call for the speed metric")
    a("--speed-warmup", type=int, default=2, help="untimed calls before timing")
    a("--speed-repeats", type=int, default=5, help="timed calls (median reported)")
    a("--flow-grid", choices=["diffusers", "uniform"], default="diffusers",
      help="flow-matching pipelines only: diffusers' default sigma grid (at N steps the last is a negligible "
           "step from 1/1000 to 0) or N uniform steps (sigmas passed to the pipeline call)")
    a("--baseline", metavar="LABEL", help="also report each other model's paired win rate against this model's "
                                           "images from the same seeds, per score metric (clip_score, "
                                           "toy_attributes, reward:<name>), at equal steps or its only step count")
    a("--save-images", action="store_true", help="also write every image as images/<label>/steps<N>/<index>.png")
    return p


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected integers like 1,2,4") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps {text!r}: expected positive integers like 1,2,4")
    return steps


def default_labels(models: list[str]) -> list[str]:
    labels, seen = [], {}
    for m in models:
        base = Path(m.rstrip("/")).name or m
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return labels


def reward_options(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        name, sep, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not sep or not eq or not name or not key:
            raise ValueError(f"--reward-option {item!r}: expected NAME:KEY=VALUE")
        out.setdefault(name, {})[key] = value
    return out


def setup(args, accelerator):
    """Everything that can fail on bad input, before any model is loaded or image generated."""
    from evaluation.harness import EvalProtocol, RunSpec
    from evaluation.prompts import load_prompts
    from evaluation.scoring import ScoringOptions, build_scoring

    prompts = load_prompts(args.prompts, n=args.num_prompts, root=args.prompts_root, seed=args.prompt_seed)
    n = len(args.model)
    steps = [parse_steps(s) for s in per_entry(args.steps, n, "--steps", "--model")]
    labels = per_entry(args.label, n, "--label", "--model") if args.label else default_labels(args.model)
    if len(set(labels)) != n:
        raise ValueError(f"--label values must be distinct, got {labels}")
    runs = [RunSpec(m, lab, st, g) for m, lab, st, g in
            zip(args.model, labels, steps, per_entry(args.guidance, n, "--guidance", "--model"))]
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    check_baseline(args.baseline, runs, metrics)
    options = ScoringOptions(args.feature_model, args.inception_weights, args.clip_model, args.fid_ref,
                             args.stats_cache, reward_options(args.reward_option), args.speed_batch,
                             args.speed_warmup, args.speed_repeats)
    dtype = "float16" if args.dtype == "auto" and accelerator.device.type == "cuda" else args.dtype
    dtype = "float32" if dtype == "auto" else dtype
    scoring = build_scoring(metrics, prompts.prompts, images_per_prompt=args.num_images, device=accelerator.device,
                            options=options)
    protocol = EvalProtocol(prompts.describe(), args.num_images, args.seed, args.batch_size, dtype,
                            args.resolution, metrics, flow_grid=args.flow_grid,
                            extra={"processes": accelerator.num_processes,
                                   "torch_threads": torch.get_num_threads()})
    return prompts, runs, scoring, protocol, DTYPES[dtype]


def check_baseline(baseline: str | None, runs, metrics: list[str]) -> None:
    """--baseline names a model, shares step counts with the others, and has a score metric to compare."""
    if baseline is None:
        return
    from evaluation.win_rate import is_score_column
    by_label = {r.label: r for r in runs}
    if baseline not in by_label:
        raise ValueError(f"--baseline {baseline!r} is not one of the model labels {list(by_label)}")
    if not any(is_score_column(m) for m in metrics):
        raise ValueError("--baseline compares per-image scores: add clip_score, toy_attributes or reward:<name> "
                         "to --metrics")
    base_steps = by_label[baseline].steps
    for r in runs:
        missing = [n for n in r.steps if n not in base_steps]
        if r.label != baseline and missing and len(base_steps) > 1:
            raise ValueError(f"--baseline {baseline} is evaluated at steps {base_steps} but {r.label} at {missing}; "
                             f"give the baseline those steps too, or a single step count")


def png_saver(out: Path):
    """on_batch hook factory: each process writes its own images as PNG (uint8, as diffusers saves them)."""
    from PIL import Image

    from pipelines.images import to_uint8

    def for_run(run, steps):
        folder = out / "images" / run.label / f"steps{steps}"
        folder.mkdir(parents=True, exist_ok=True)
        return lambda indices, images: [Image.fromarray(a).save(folder / f"{i:06d}.png")
                                        for i, a in zip(indices, to_uint8(images))]
    return for_run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from accelerate import Accelerator

    from pipelines.devices import has_accelerator
    accelerator = Accelerator(cpu=not has_accelerator())
    try:
        prompts, runs, scoring, protocol, dtype = setup(args, accelerator)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if accelerator.is_main_process:
            print(f"evaluate.py: error: {msg}", file=sys.stderr)
        return 2
    from evaluation.harness import evaluate_models
    from evaluation.report import write_report
    out = Path(args.out)
    results = evaluate_models(runs, prompts, scoring, protocol, dtype=dtype, accelerator=accelerator,
                              on_batch=png_saver(out) if args.save_images else None)
    if args.baseline is not None:
        from evaluation.win_rate import add_win_rates
        add_win_rates(results, args.baseline)
    if accelerator.is_main_process:
        paths = write_report(out, protocol.as_dict(), results)
        print((out / "eval.md").read_text())
        print(f"wrote {paths['json']}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
