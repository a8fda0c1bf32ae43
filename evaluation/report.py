"""The evaluation report: eval.json, a markdown table, image grids and metric-vs-steps plots.

eval.json (format ``diffstill-eval/1``) holds the shared protocol once and one entry per (model, step
count); every number in an entry carries its own protocol, so a single number copied out of the file
still says how it was measured:

    {"format": "diffstill-eval/1",
     "protocol": {prompts: {name, source, count}, images_per_prompt, seed, seed_rule, batch_size, dtype,
                  resolution, metrics, flow_grid, extra},
     "results": [{"model", "label", "steps", "guidance", "resolution": [H, W], "sample_count", "grid",
                  "metrics": {"<metric>": {"<number>": {"value": float,
                                                         "protocol": {prompts, seed, steps, guidance,
                                                                      resolution, sample_count, ...metric's own
                                                                      (extractor, resize, reference, weights)}}}}}]}

Plots use matplotlib's Agg backend (no display needed): one panel per number, steps on a log2 axis,
one line per model; a model measured at a single step count (a teacher at 50 steps) is drawn as a
dashed horizontal line so few-step students are read against it.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

FORMAT = "diffstill-eval/1"
EVAL_JSON, TABLE_MD, PLOT_PNG = "eval.json", "eval.md", "metrics_vs_steps.png"


def slug(text: str) -> str:
    """A file-name-safe form of a model label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def grid_name(label: str, steps: int) -> str:
    return f"grid_{slug(label)}_steps{steps}.png"


def _entry(result: dict, protocol: dict) -> dict:
    run = {"prompts": protocol["prompts"]["name"], "prompt_count": protocol["prompts"]["count"],
           "images_per_prompt": protocol["images_per_prompt"], "seed": protocol["seed"], "steps": result["steps"],
           "guidance": result["guidance"], "resolution": result["resolution"], "sample_count": result["sample_count"],
           "dtype": protocol["dtype"]}
    metrics = {name: {key: {"value": float(v), "protocol": {**run, **result["metric_protocols"].get(name, {})}}
                      for key, v in numbers.items()}
               for name, numbers in result["values"].items()}
    keep = ("model", "label", "steps", "guidance", "resolution", "sample_count")
    return {**{k: result[k] for k in keep}, "grid": grid_name(result["label"], result["steps"]), "metrics": metrics}


def eval_document(protocol: dict, results: list[dict]) -> dict:
    return {"format": FORMAT, "protocol": protocol, "results": [_entry(r, protocol) for r in results]}


def write_eval_json(path: str | os.PathLike, protocol: dict, results: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(eval_document(protocol, results), indent=2, allow_nan=True) + "\n")
    return path


def read_eval(path: str | os.PathLike) -> dict:
    """Parse eval.json and check its format tag."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {doc.get('format')!r})")
    return doc


def numbers(entry: dict) -> dict[str, float]:
    """{number name: value} of one eval.json result entry."""
    return {k: v["value"] for per in entry["metrics"].values() for k, v in per.items()}


def _number_names(doc: dict) -> list[str]:
    return list(dict.fromkeys(k for e in doc["results"] for k in numbers(e)))


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def markdown_table(doc: dict) -> str:
    """One row per (model, steps), one column per number, then the protocol in one line."""
    names = _number_names(doc)
    head = ["model", "steps", "guidance"] + names
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in doc["results"]:
        got = numbers(e)
        lines.append("| " + " | ".join([e["label"], str(e["steps"]), f"{e['guidance']:g}"]
                                       + [_fmt(got.get(n)) for n in names]) + " |")
    p = doc["protocol"]
    lines += ["", f"Prompts: {p['prompts']['name']} ({p['prompts']['count']} prompts, {p['images_per_prompt']} "
                  f"image(s) each, from {p['prompts']['source']}); seed {p['seed']} ({p['seed_rule']}); "
                  f"dtype {p['dtype']}; resolution {p['resolution'] or 'pipeline default'}; "
                  f"flow-matching sigma grid {p.get('flow_grid', 'diffusers')}."]
    return "\n".join(lines) + "\n"


def plot_series(doc: dict) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{number name: {model label: [(steps, value), ...] sorted by steps}}: what the plot draws."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for e in doc["results"]:
        for name, value in numbers(e).items():
            series.setdefault(name, {}).setdefault(e["label"], []).append((e["steps"], value))
    return {n: {m: sorted(pts) for m, pts in per.items()} for n, per in series.items()}


def plot_metrics(doc: dict):
    """A matplotlib Figure: one panel per number vs steps, one line per model (Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    series = plot_series(doc)
    all_steps = sorted({e["steps"] for e in doc["results"]})
    cols = min(3, max(1, len(series)))
    rows = math.ceil(max(1, len(series)) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    for k, (name, per_model) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        for label, pts in per_model.items():
            xs, ys = zip(*pts)
            if len(pts) == 1 and len(all_steps) > 1:
                ax.plot([all_steps[0], all_steps[-1]], [ys[0]] * 2, "--", label=f"{label} ({xs[0]} steps)")
            else:
                ax.plot(xs, ys, "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_steps, [str(s) for s in all_steps])
        ax.set_xlabel("steps")
        ax.set_title(name)
        ax.legend(fontsize=7)
    return fig


def save_grids(out_dir: str | os.PathLike, results: list[dict]) -> list[Path]:
    """grid_<label>_steps<N>.png for every result that kept preview images."""
    from pipelines.images import save_grid
    return [save_grid(r["preview"], Path(out_dir) / grid_name(r["label"], r["steps"]), nrow=r["preview_nrow"])
            for r in results if r.get("preview") is not None]


def write_report(out_dir: str | os.PathLike, protocol: dict, results: list[dict]) -> dict[str, Path]:
    """eval.json, eval.md, the grids and the plot under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    path = write_eval_json(out / EVAL_JSON, protocol, results)
    doc = read_eval(path)
    (out / TABLE_MD).write_text(markdown_table(doc))
    save_grids(out, results)
    plot_metrics(doc).savefig(out / PLOT_PNG, dpi=110)
    return {"json": path, "table": out / TABLE_MD, "plot": out / PLOT_PNG}
