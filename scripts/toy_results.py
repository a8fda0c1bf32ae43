#!/usr/bin/env python
"""Reproduce rows of the README's toy-world results table: train each row's model, then evaluate it.

    ./with-venv python scripts/toy_results.py --list                  # every row id and what it is
    ./with-venv python scripts/toy_results.py reflow_unet --print     # the exact commands, nothing run
    ./with-venv python scripts/toy_results.py reflow_unet             # run them; prints the table lines
    ./with-venv python scripts/toy_results.py reflow_unet --threads 2 # the same with two torch threads a process

`docs/results/toy_results.yaml` holds, per row id: the commands that prepare its inputs (pairs, preferences, a
reward model), the recipe and overrides that train it, the rows whose models it starts from, and the
evaluation protocol (steps, guidance, splits, prompts, flow grid). Everything a row writes goes under
`--out/<id>`; `{out}` in a command is that folder and `{out:ID}` another row's. A row whose model is already
exported is not trained again (delete its folder to redo it), so a killed run continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "docs" / "results" / "toy_results.yaml"
SPLITS = ("heldin", "heldout")
EVAL_KEYS = {"steps", "guidance", "splits", "num_prompts", "num_images", "flow_grid", "metrics"}
ROW_KEYS = {"readme", "before", "recipe", "overrides", "needs", "model", "eval", "note"}


@dataclass
class Evaluation:
    steps: list[int]
    guidance: float
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    num_prompts: int = 64
    num_images: int = 4
    flow_grid: str = "diffusers"
    metrics: str = "fid,toy_attributes,clip_score"


@dataclass
class Row:
    id: str
    readme: list[str]                       # first-column labels of the README rows it reproduces ([] for inputs)
    before: list[str] = field(default_factory=list)
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    model: str | None = None                # a shipped model (toy, toy-flow) when nothing is trained
    eval: Evaluation | None = None
    note: str = ""


def _row(row_id: str, raw: dict, source: Path) -> Row:
    unknown = set(raw) - ROW_KEYS
    if unknown:
        raise ValueError(f"{source}: row {row_id}: unknown key(s) {sorted(unknown)} (known: {sorted(ROW_KEYS)})")
    ev = raw.get("eval")
    if ev is not None:
        bad = set(ev) - EVAL_KEYS
        if bad or "steps" not in ev or "guidance" not in ev:
            raise ValueError(f"{source}: row {row_id}: eval needs steps and guidance and takes only "
                             f"{sorted(EVAL_KEYS)} (got {sorted(ev)})")
        ev = Evaluation(**ev)
        if set(ev.splits) - set(SPLITS):
            raise ValueError(f"{source}: row {row_id}: eval.splits must be from {SPLITS}, got {ev.splits}")
    row = Row(id=row_id, **{**raw, "eval": ev})
    if row.readme and not (row.eval or row.before):
        raise ValueError(f"{source}: row {row_id}: a README row needs an eval (or the commands that print it)")
    if row.eval is not None and (row.recipe is None) == (row.model is None):
        raise ValueError(f"{source}: row {row_id}: an evaluated row needs exactly one of recipe (train it) or "
                         "model (a shipped model)")
    return row


def load_rows(path: Path = MANIFEST) -> dict[str, Row]:
    raw = yaml.safe_load(path.read_text())
    rows = {row_id: _row(row_id, spec, path) for row_id, spec in (raw.get("rows") or {}).items()}
    for row in rows.values():
        for other in row.needs + [m for c in row.before + row.overrides for m in re.findall(r"\{out:(\w+)\}", c)]:
            if other not in rows:
                raise ValueError(f"{path}: row {row.id} refers to unknown row {other!r}")
    return rows


def _expand(text: str, row_id: str, out_root: Path) -> str:
    text = re.sub(r"\{out:(\w+)\}", lambda m: str(out_root / m.group(1)), text)
    return text.replace("{out}", str(out_root / row_id))


def _python(command: list[str]) -> list[str]:
    """A manifest command starting with `python` runs under this interpreter (the project's venv)."""
    return [sys.executable, *command[1:]] if command[:1] == ["python"] else command


def _shown(command: list[str]) -> str:
    return shlex.join(["python", *command[1:]] if command[0] == sys.executable else command)


def train_command(row: Row, out_root: Path, extra: list[str]) -> list[str]:
    overrides = [_expand(o, row.id, out_root) for o in row.overrides]
    return [sys.executable, "scripts/distill.py", "--config", row.recipe, *overrides, *extra,
            f"output_dir={out_root / row.id}"]


def eval_commands(row: Row, out_root: Path, num_prompts: int | None = None) -> list[list[str]]:
    ev = row.eval
    model = row.model or str(out_root / row.id / "pipeline")
    return [[sys.executable, "scripts/evaluate.py", "--model", model, "--label", row.id, "--prompts", f"toy-{split}",
             "--num-prompts", str(num_prompts or ev.num_prompts), "--num-images", str(ev.num_images),
             "--metrics", ev.metrics, "--batch-size", "32", "--steps", ",".join(map(str, ev.steps)),
             "--guidance", str(ev.guidance), "--flow-grid", ev.flow_grid,
             "--out", str(out_root / row.id / f"eval_{split}")]
            for split in ev.splits]


def evaluated(row: Row, out_root: Path) -> bool:
    return row.eval is not None and all((ROOT / out_root / row.id / f"eval_{split}" / "eval.json").is_file()
                                        for split in row.eval.splits)


def plan(row_id: str, rows: dict[str, Row], out_root: Path, extra: list[str], num_prompts: int | None,
         seen: set[str] | None = None) -> list[list[str]]:
    """Every command of `row_id`, after those of the rows it needs; rows already exported are not trained
    again, and a needed row already evaluated is not evaluated again (the asked row always is)."""
    needed = seen is not None
    seen = set() if seen is None else seen
    if row_id in seen:
        return []
    seen.add(row_id)
    row = rows[row_id]
    commands = [c for need in row.needs for c in plan(need, rows, out_root, extra, num_prompts, seen)]
    exported = (ROOT / out_root / row.id / "pipeline" / "model_index.json").is_file()
    if not (row.recipe and exported):
        commands += [_python(shlex.split(_expand(c, row.id, out_root))) for c in row.before]
        if row.recipe:
            commands.append(train_command(row, out_root, extra))
    if row.eval is not None and not (needed and exported and evaluated(row, out_root)):
        commands += eval_commands(row, out_root, num_prompts)
    return commands


def table_lines(row: Row, out_root: Path) -> list[str]:
    """README-style lines `| id | steps | held-in pass / FID | held-out pass / FID |` from the reports."""
    cells: dict[int, dict[str, str]] = {}
    for split in row.eval.splits:
        report = json.loads((ROOT / out_root / row.id / f"eval_{split}" / "eval.json").read_text())
        for entry in report["results"]:
            m = entry["metrics"]
            value = f"{m['toy_attributes']['toy_attributes']['value']:.3f} / {m['fid']['fid']['value']:.2f}"
            cells.setdefault(entry["steps"], {})[split] = value
    return [f"| {row.id} | {steps} | {cells[steps].get('heldin', '')} | {cells[steps].get('heldout', '')} |"
            for steps in sorted(cells, reverse=True)]


def run_environment(threads: int) -> dict[str, str]:
    """What every command runs under: offline, and a fixed thread count, because the count changes the order
    of floating-point reductions and so a trained row's weights (docs/results/toy_results.yaml)."""
    return {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("rows", nargs="*", help="row ids from docs/results/toy_results.yaml")
    p.add_argument("--list", action="store_true", help="print every row id with the README rows it reproduces")
    p.add_argument("--print", action="store_true", help="print the commands instead of running them")
    p.add_argument("--out", default="outputs/toy_results",
                   help="one folder per row under this (a relative path is taken from the repository root)")
    p.add_argument("--manifest", default=str(MANIFEST), help="the rows file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra training override for every row trained (e.g. train.max_steps=2 for a smoke run)")
    p.add_argument("--num-prompts", type=int, default=None, help="evaluate on this many prompts instead")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (OMP_NUM_THREADS) for every command: a run is bit-for-bit "
                        "repeatable at one count, not across counts")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = load_rows(Path(args.manifest))
    except (OSError, ValueError, yaml.YAMLError) as err:
        print(f"toy_results.py: {err}", file=sys.stderr)
        return 2
    if args.list:
        for row in rows.values():
            print(f"{row.id}: {'; '.join(row.readme)}")
        return 0
    unknown = [r for r in args.rows if r not in rows]
    if not args.rows or unknown:
        print(f"toy_results.py: name row ids to run ({'unknown: ' + ', '.join(unknown) if unknown else 'none given'}"
              f"); --list shows them", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"toy_results.py: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    out_root = Path(args.out)  # commands run from ROOT, so a relative --out stays readable in them
    env = {**os.environ, **run_environment(args.threads)}
    print(" ".join(f"{k}={v}" for k, v in run_environment(args.threads).items()))
    for row_id in args.rows:
        row = rows[row_id]
        if row.note:
            print(f"# {row_id}: {row.note}")
        for command in plan(row_id, rows, out_root, args.set, args.num_prompts):
            print(_shown(command), flush=True)
            if not args.print:
                subprocess.run(command, cwd=ROOT, env=env, check=True)
        if not args.print and row.eval is not None:
            print("\n".join(table_lines(row, out_root)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
