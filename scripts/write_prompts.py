#!/usr/bin/env python
"""Write a prompt list to a .txt file (one per line), optionally without the prompts of another set.

    python scripts/write_prompts.py --prompts toy-heldout --num-prompts 1024 --prompt-seed 1 \
        --exclude toy-heldout --out outputs/heldout_train_prompts.txt

Preference building (`scripts/make_preferences.py --prompts FILE`), prompt-only training
(`data.kind: prompts`, `data.path: FILE`) and evaluation all read such a file. `--exclude` keeps the
list disjoint from an evaluation set (with its defaults: for toy sets, the fixed 64-prompt lists), so
a model trained on prompts of the held-out split is still evaluated on captions it never saw.
`--prompts` may be repeated to write one list from several sets, in order; `--num-prompts` and
`--exclude` are then given once (for every set) or once per set:

    python scripts/write_prompts.py --prompts toy-heldout --exclude toy-heldout --prompts toy-heldin \
        --exclude toy-heldin --num-prompts 1024 --prompt-seed 1 --out outputs/both_splits.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.flags import per_entry  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--prompts", action="append", required=True,
                        help="toy-heldin / toy-heldout, a benchmark set, or a file; repeatable")
    parser.add_argument("--num-prompts", type=int, action="append", required=True,
                        help="how many prompts to write; once, or once per --prompts")
    parser.add_argument("--prompt-seed", type=int, default=0, help="seed of a toy draw")
    parser.add_argument("--exclude", action="append",
                        help="a prompt set whose prompts are left out (e.g. the evaluation list); once, or once "
                             "per --prompts")
    parser.add_argument("--prompts-root", help="folder of the benchmark prompt files")
    parser.add_argument("--out", required=True, help="the .txt file to write")
    args = parser.parse_args(argv)
    if min(args.num_prompts) < 1:
        parser.error(f"--num-prompts must be >= 1, got {min(args.num_prompts)}")
    try:
        args.num_prompts = per_entry(args.num_prompts, len(args.prompts), "--num-prompts", "--prompts")
        args.exclude = per_entry(args.exclude, len(args.prompts), "--exclude", "--prompts")
    except ValueError as err:
        parser.error(str(err))
    if not args.out.endswith(".txt"):
        parser.error(f"--out must be a .txt file (one prompt per line), got {args.out!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from evaluation.prompts import load_prompts, load_prompts_excluding

    lines = []
    for spec, n, exclude in zip(args.prompts, args.num_prompts, args.exclude):
        try:
            if exclude:
                prompts = load_prompts_excluding(spec, exclude, n=n, root=args.prompts_root, seed=args.prompt_seed)
            else:
                prompts = load_prompts(spec, n=n, root=args.prompts_root, seed=args.prompt_seed)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"write_prompts: {err}") from None
        lines += prompts.prompts
        print(f"{len(prompts.prompts)} prompts ({prompts.source})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(p + "\n" for p in lines), encoding="utf-8")
    print(f"{len(lines)} prompts -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
