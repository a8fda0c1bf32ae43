"""The toy teachers' model cards: a measured-quality section added to the export's README.md.

The numbers come from scripts/evaluate.py runs on toy-heldin and toy-heldout
(eval.json files) and from the build's FID floors (build_report.json), so the
card says exactly what was measured and how:

    python scripts/build_toy_world.py --stages cards --results docs/results/toy_teachers
"""
from __future__ import annotations

import json
from pathlib import Path

MARKER = "## Measured quality"


def numbers_by(eval_json: Path, key: str, **where) -> dict:
    """{entry[key]: {number: value}} for the eval.json entries whose fields equal `where`."""
    from evaluation.report import numbers, read_eval

    return {e[key]: numbers(e) for e in read_eval(eval_json)["results"] if all(e[k] == v for k, v in where.items())}


def quality_section(results: Path, label: str, floors: dict | None) -> str:
    """Markdown: pass rate, FID and CLIP score per step count, held-in beside held-out, read from
    results/<label>/{heldin,heldout}/eval.json."""
    folder = results / label
    splits = {s: numbers_by(folder / s / "eval.json", "steps", label=label) for s in ("heldin", "heldout")
              if (folder / s / "eval.json").is_file()}
    if not splits:
        raise FileNotFoundError(f"no eval.json under {folder}/heldin or {folder}/heldout; run scripts/evaluate.py")
    doc = json.loads((folder / next(iter(splits)) / "eval.json").read_text())
    proto = doc["protocol"]
    guidance = doc["results"][0]["guidance"]
    lines = [MARKER, "", f"scripts/evaluate.py, {proto['prompts']['count']} prompts x {proto['images_per_prompt']} "
             f"images per split, seed {proto['seed']}, guidance {guidance}, the folder's own scheduler. "
             "Pass rate: the exact attribute checker (pipelines/toy/checker.py). FID: toy CLIP image features "
             "against real renders of the same prompts. docs/toy_world.md has the protocol.", "",
             "| steps | " + " | ".join(f"{s} pass rate | {s} FID | {s} CLIP score" for s in splits) + " |",
             "|---|" + "---|---|---|" * len(splits)]
    for steps in sorted(next(iter(splits.values())), reverse=True):
        cells = [f"{splits[s][steps].get('toy_attributes', float('nan')):.3f} | {splits[s][steps].get('fid', float('nan')):.2f}"
                 f" | {splits[s][steps].get('clip_score', float('nan')):.2f}" for s in splits]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    if floors:
        lines += ["", "FID floors (same prompts, counts and extractor): "
                  + "; ".join(f"{s}: real vs real {f['real_vs_real']:.2f}, VAE reconstruction {f['vae_recon']:.2f}"
                              for s, f in floors.items()) + "."]
    sweep = guidance_table(results, label)
    if sweep:
        lines += ["", *sweep]
    return "\n".join(lines) + "\n"


def guidance_table(results: Path, label: str, steps: int = 25) -> list[str]:
    """Markdown lines: pass rate and FID at `steps` for each guidance scale measured, read from the
    card's own results/<label>/<split>/eval.json and a sweep in results/<label>_guidance/<split>/eval.json
    (scripts/evaluate.py with the teacher once per scale, each with its own --guidance); [] without a sweep."""
    rows: dict[str, dict[float, dict[str, float]]] = {}
    for split in ("heldin", "heldout"):
        sweep = results / f"{label}_guidance" / split / "eval.json"
        if not sweep.is_file():
            continue
        main = results / label / split / "eval.json"
        own = numbers_by(main, "guidance", steps=steps) if main.is_file() else {}
        rows[split] = {**own, **numbers_by(sweep, "guidance", steps=steps)}
    if not rows:
        return []
    scales = sorted({g for per in rows.values() for g in per})
    lines = [f"Guidance at {steps} steps (same protocol):", "",
             "| guidance | " + " | ".join(f"{s} pass rate | {s} FID" for s in rows) + " |",
             "|---|" + "---|---|" * len(rows)]
    for g in scales:
        cells = [f"{rows[s][g]['toy_attributes']:.3f} | {rows[s][g]['fid']:.2f}" if g in rows[s] else "- | -"
                 for s in rows]
        lines.append(f"| {g:g} | " + " | ".join(cells) + " |")
    return lines


def write_quality_section(folder: Path, section: str) -> None:
    """Replace (or append) the measured-quality section of folder/README.md."""
    readme = folder / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    head, _, tail = text.partition(MARKER)
    rest = tail.split("\n## ", 1)
    after = "\n## " + rest[1] if len(rest) == 2 else ""
    readme.write_text(head.rstrip() + "\n\n" + section + after)
