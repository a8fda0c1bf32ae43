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


def quality_rows(eval_json: Path, label: str) -> dict[int, dict[str, float]]:
    """{steps: {number: value}} for one model label of an eval.json."""
    from evaluation.report import numbers, read_eval

    return {e["steps"]: numbers(e) for e in read_eval(eval_json)["results"] if e["label"] == label}


def quality_section(results: Path, label: str, floors: dict | None) -> str:
    """Markdown: pass rate, FID and CLIP score per step count, held-in beside held-out, read from
    results/<label>/{heldin,heldout}/eval.json."""
    folder = results / label
    splits = {s: quality_rows(folder / s / "eval.json", label) for s in ("heldin", "heldout")
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
    return "\n".join(lines) + "\n"


def write_quality_section(folder: Path, section: str) -> None:
    """Replace (or append) the measured-quality section of folder/README.md."""
    readme = folder / "README.md"
    text = readme.read_text() if readme.is_file() else ""
    head, _, tail = text.partition(MARKER)
    rest = tail.split("\n## ", 1)
    after = "\n## " + rest[1] if len(rest) == 2 else ""
    readme.write_text(head.rstrip() + "\n\n" + section + after)
