"""Every toy recipe (configs/toy/*.yaml) runs end to end through scripts/distill.py on the shipped toy models:
one optimizer step at batch 2, then the export a plain diffusers call loads. What the recipes read besides the
toy world (teacher pairs, preference sets, a one-step student) is made small, by the scripts a user runs.

The measured toy results come from the same recipes at full length; this only proves each one still runs.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY_RECIPES = sorted((ROOT / "configs" / "toy").glob("*.yaml"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four teacher pairs per toy teacher (2 solver steps) and a 2-prompt preference set ranked by toy CLIP."""
    import make_pairs
    import make_preferences

    tmp = tmp_path_factory.mktemp("toy_inputs")
    for alias, solver, out in (("toy", "dpmpp_2m", "pairs"), ("toy-flow", "euler", "pairs_flow")):
        assert make_pairs.main(["--model", alias, "--prompts", "toy-heldin", "--num-prompts", "4", "--out",
                                str(tmp / out), "--solver", solver, "--steps", "2", "--guidance", "5",
                                "--resolution", "32", "--batch-size", "4", "--shard-size", "4"]) == 0
    prompts = tmp / "prompts.txt"
    prompts.write_text("a large red circle at the center on a blue background\n"
                       "a small green triangle at the top left on a white background\n")
    # toy_clip, not the recipes' checker: two 2-step samples nearly always tie under the checker (no pair).
    assert make_preferences.main(["--model", "toy", "--prompts", str(prompts), "--out", str(tmp / "prefs"),
                                  "--samples", "2", "--reward", "toy_clip", "--steps", "2",
                                  "--resolution", "32"]) == 0
    return tmp


def overrides_for(recipe: Path, inputs: Path, out: Path) -> list[str]:
    from pipelines.toy import TOY_TEACHER
    from trainers.config import load_config

    cfg = load_config(recipe, [])
    extra = [f"output_dir={out}", "train.max_steps=1", "train.batch_size=2", "train.checkpoint_every=1",
             "train.validate_every=0", "train.log_with=none"]
    if cfg.data.kind == "pairs":
        extra.append(f"data.path={inputs / ('pairs_flow' if cfg.model.source == 'toy-flow' else 'pairs')}")
    if cfg.data.kind in ("preference_folder", "labelled_folder"):
        extra.append(f"data.path={inputs / 'prefs'}")
    if cfg.model.source.startswith("outputs/"):  # the teacher recipes start from the build's untrained folders
        extra.append("model.source=toy-flow" if "flow" in recipe.name else "model.source=toy")
    if cfg.method == "distill_dpo":
        extra.append(f"distill_dpo.student_source={TOY_TEACHER}")
    if cfg.method == "tbcm":
        extra.append("tbcm.route_steps=2")
    return extra


@pytest.mark.parametrize("recipe", TOY_RECIPES, ids=[p.stem for p in TOY_RECIPES])
def test_toy_recipe_trains_a_step_and_exports(recipe, inputs, tmp_path):
    import distill

    out = tmp_path / recipe.stem
    assert distill.main(["--config", str(recipe), *overrides_for(recipe, inputs, out)]) == 0
    assert (out / "checkpoints" / "step-0000001").is_dir()
    assert (out / "pipeline" / "model_index.json").is_file(), "no diffusers export"


def test_tbcm_prompt_list_is_both_splits_without_evaluation_prompts():
    """configs/toy/tbcm_prompts.txt is what its config comment's write_prompts command writes: the first 1,024
    held-out-split prompts (seed 1) that are not held-out evaluation prompts, then the same for held-in; no line
    is an evaluation prompt of either split, and every held-out line names an unseen colour-shape pair."""
    from evaluation.prompts import load_prompts, load_prompts_excluding
    from pipelines.toy.world import HELDOUT_COMBINATIONS

    lines = (ROOT / "configs" / "toy" / "tbcm_prompts.txt").read_text().splitlines()
    expected = [p for split in ("toy-heldout", "toy-heldin")
                for p in load_prompts_excluding(split, split, n=1024, seed=1).prompts]
    assert lines == expected
    evaluation = set(load_prompts("toy-heldout").prompts) | set(load_prompts("toy-heldin").prompts)
    assert not evaluation & set(lines)
    unseen = [f"{colour} {shape}" for colour, shape in HELDOUT_COMBINATIONS]
    assert all(any(pair in p for pair in unseen) for p in lines[:1024])
    assert not any(any(pair in p for pair in unseen) for p in lines[1024:])
