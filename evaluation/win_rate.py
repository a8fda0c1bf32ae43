"""Paired win rates: how often a model's image beats the baseline's image from the same seed and prompt.

Every model is sampled from the same initial noise for image i (seed S + i), so image i of a model and
image i of the baseline differ only by the model: comparing them pairwise removes the prompt-to-prompt
and seed-to-seed spread that a difference of means carries. A win counts 1, a tie 1/2 (the convention
of preference benchmarks, which keeps 50% the no-effect value even for a 0/1 judge that mostly ties).

The standard error treats prompts, not images, as the independent unit: images of one prompt share
its difficulty, so per-image errors would overstate the precision.
"""
from __future__ import annotations

import math

from torch import Tensor

from evaluation.diversity import grouped

# Per-image columns that are scores (higher is better) and so can be compared pairwise.
SCORE_PREFIXES = ("clip_score", "toy_attributes", "reward:")


def is_score_column(name: str) -> bool:
    return name.startswith(SCORE_PREFIXES)


def win_rate(model: Tensor, baseline: Tensor, prompt_ids: list[int]) -> dict[str, float]:
    """{"win_rate", "win_rate_se", "ties"} of per-image scores `model` against `baseline` (same images order)."""
    if model.shape != baseline.shape or model.ndim != 1 or len(prompt_ids) != len(model):
        raise ValueError(f"win_rate needs two [N] score columns and N prompt ids; got {tuple(model.shape)}, "
                         f"{tuple(baseline.shape)} and {len(prompt_ids)} ids")
    model, baseline = model.double(), baseline.double()
    tie = (model == baseline).double()
    outcome = (model > baseline).double() + 0.5 * tie
    _, per_prompt = grouped(lambda v: v.mean(), outcome, prompt_ids)
    means = list(per_prompt.values())
    n = len(means)
    mean = sum(means) / n
    se = math.sqrt(sum((m - mean) ** 2 for m in means) / (n - 1) / n) if n > 1 else float("nan")
    return {"win_rate": float(outcome.mean()), "win_rate_se": se, "ties": float(tie.mean())}


def add_win_rates(results: list[dict], baseline: str) -> None:
    """Give every result not labelled `baseline` a "win_rate" metric against the baseline's result at the
    same step count (or at its only one), one number set per score column."""
    base = {r["steps"]: r for r in results if r["label"] == baseline}
    if not base:
        raise ValueError(f"--baseline {baseline!r} is not the label of any evaluated model")
    for r in results:
        if r["label"] == baseline:
            continue
        b = base.get(r["steps"]) or (next(iter(base.values())) if len(base) == 1 else None)
        if b is None:
            raise ValueError(f"{r['label']} @ {r['steps']} steps has no baseline result at {r['steps']} steps; "
                             f"evaluate {baseline} at those steps or at a single step count")
        numbers, described = {}, []
        for name, column in r["columns"].items():
            if is_score_column(name) and name in b["columns"]:
                got = win_rate(column, b["columns"][name], r["prompt_ids"])
                numbers.update({f"{k}:{name}": v for k, v in got.items()})
                described.append(name)
        r["values"]["win_rate"] = numbers
        r["metric_protocols"]["win_rate"] = {
            "baseline": baseline, "baseline_steps": b["steps"], "baseline_guidance": b["guidance"], "scores": described,
            "definition": "mean over images of 1[score > baseline's score from the same seed] + 0.5 * 1[equal]; "
                          "se over prompts"}
