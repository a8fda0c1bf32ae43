#!/usr/bin/env python
"""Probe what a toy-world model takes from its caption (pipelines/toy/probes.py).

    ./with-venv python scripts/toy_probe.py --model toy --out outputs/probe_teacher.json

Prints four tables: the x_0 error at several timesteps with the true caption, with one attribute changed and
with no caption (a word the model reads raises the error when changed); where one object lands, from one
noise, for each of the nine position words (a model that follows the words uses nine cells); and which of
the checker's checks its samples fail on held-in and held-out prompts; whether the text tower's state at a
shape word still carries the shape for the held-out colour-shape pairs (a linear read-out fitted on seen pairs);
for SD-style pipelines, whether the denoiser draws those pairs from text states built of seen pairs only; and
whether guidance pushing away from the other shapes makes it draw them (the composition present but weak).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", required=True, help="toy, toy-flow, or a diffusers folder of a toy-world model")
    p.add_argument("--renders", type=int, default=96, help="real renders for the conditioning-gain table")
    p.add_argument("--noises", type=int, default=4, help="initial noises per object for the position probe")
    p.add_argument("--steps", type=int, default=25, help="sampling steps of the position probe")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale of the position probe")
    p.add_argument("--failure-prompts", type=int, default=32,
                   help="prompts per split (x4 images) for the table of failed checks; 0 skips it")
    p.add_argument("--unseen-pair-scenes", type=int, default=0,
                   help="one-object scenes per held-out pair (x2 images, three conditions) for the analogy table; "
                        "0 skips it")
    p.add_argument("--shape-contrast-scenes", type=int, default=0,
                   help="one-object scenes per held-out pair (x2 images, unseen and seen control) for the "
                        "shape-contrast table; 0 skips it")
    p.add_argument("--contrast-scales", default="0,2,5", help="comma-separated contrast scales s of that table")
    p.add_argument("--out", default=None, help="write the three tables to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from pipelines.backbones import load_bundle
    from pipelines.toy.probes import (conditioning_gain, failures, position_response, shape_contrast_failures,
                                      shape_readout, unseen_pair_failures)

    torch.manual_seed(0)
    bundle = load_bundle(args.model)
    bundle.pipeline.set_progress_bar_config(disable=True)
    gain = conditioning_gain(bundle, n=args.renders)
    kinds = list(next(iter(gain.values())))
    print("x_0 error by caption (true, one attribute changed, empty):")
    print("t      " + "".join(f"{k:>10s}" for k in kinds))
    for t, row in gain.items():
        print(f"{t:<7g}" + "".join(f"{row[k]:10.4f}" for k in kinds))
    response = position_response(bundle.pipeline, bundle.latent_shape(1), noises=args.noises, steps=args.steps,
                                 guidance=args.guidance)
    print(f"position words: object found {response.found:.3f}, in the asked cell {response.right_cell:.3f} "
          f"(chance 0.111), distinct cells over the nine words {response.distinct_cells:.2f} (of 9)")
    failed = {}
    if args.failure_prompts:
        failed = {split: failures(bundle.pipeline, split, args.failure_prompts, steps=args.steps,
                                  guidance=args.guidance) for split in ("heldin", "heldout")}
        checks = list(failed["heldin"])
        print(f"share of images passing / failing each check ({args.failure_prompts} prompts x 4):")
        print("split    " + "".join(f"{k:>11s}" for k in checks))
        for split, row in failed.items():
            print(f"{split:<9s}" + "".join(f"{row[k]:11.3f}" for k in checks))
    pipe = bundle.pipeline
    readout = shape_readout(pipe.text_encoder, pipe.tokenizer)
    print(f"text tower, shape read linearly from the shape word's state: seen pairs {readout.seen:.3f}, "
          f"unseen pairs {readout.unseen:.3f} (chance 0.333)")
    for pair, near in readout.nearest.items():
        print(f"  {pair}: cosine to the nearest seen pair of the same colour {near['same_colour']:.3f}, "
              f"of the same shape {near['same_shape']:.3f}")
    analogy = {}
    if args.unseen_pair_scenes and type(pipe).__name__ != "StableDiffusionPipeline":
        print("analogy table skipped: it builds SD-style prompt_embeds, and this is a "
              f"{type(pipe).__name__}")
    elif args.unseen_pair_scenes:
        analogy = unseen_pair_failures(pipe, args.unseen_pair_scenes, steps=args.steps, guidance=args.guidance)
        print(f"unseen pairs, one object ({args.unseen_pair_scenes} scenes x 2): pass / shape failed / cell failed")
        for pair, rows in analogy.items():
            print(f"  {pair}: " + ", ".join(f"{name} {r['pass']:.3f} / {r['shape']:.3f} / {r['cell']:.3f}"
                                            for name, r in rows.items()))
    contrast = {}
    if args.shape_contrast_scenes:
        scales = tuple(float(v) for v in args.contrast_scales.split(","))
        contrast = shape_contrast_failures(bundle, scales, args.shape_contrast_scenes, steps=args.steps,
                                           guidance=args.guidance)
        print(f"held-out pairs and their seen controls, one object ({args.shape_contrast_scenes} scenes x 2), "
              "guidance + s (c - mean of the other shapes): pass / shape failed")
        for pair, rows in contrast.items():
            for kind, by_scale in rows.items():
                print(f"  {pair} ({kind}): " + ", ".join(f"s={s} {r['pass']:.3f} / {r['shape']:.3f}"
                                                        for s, r in by_scale.items()))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "x0_error": {str(t): r for t, r in gain.items()},
                                              "position_response": asdict(response), "failures": failed,
                                              "shape_readout": asdict(readout), "unseen_pairs": analogy,
                                              "shape_contrast": contrast}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
