"""scripts/toy_results.py: the rows file covers the README's results table, every recipe in it resolves, and
the runner orders, skips and runs commands as its docstring says."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

import toy_results  # noqa: E402


def readme_table() -> list[str]:
    """The body rows of every table in the README's "## Results on the toy world" section (each table's header
    and |---| line dropped): the current models' table and the one kept from the first UNet teacher."""
    section = (ROOT / "README.md").read_text().split("## Results on the toy world", 1)[1].split("\n## ", 1)[0]
    rows, previous = [], ""
    for line in section.splitlines():
        if line.startswith("| ") and previous.startswith("|") and not set(line) <= set("|- "):
            rows.append(line)
        previous = line
    return rows


def readme_table_labels() -> list[str]:
    return [line.split("|")[1].strip() for line in readme_table()]


def test_rows_file_covers_the_readme_table_both_ways():
    rows = toy_results.load_rows()
    claimed = [label for row in rows.values() for label in row.readme]
    readme = readme_table_labels()
    assert len(readme) > 20
    assert sorted(set(readme) - set(claimed)) == []  # every README row can be reproduced
    assert sorted(set(claimed) - set(readme)) == []  # and no entry describes a row that is gone


def test_readme_rows_name_their_row_id():
    rows = toy_results.load_rows()
    for line in readme_table():
        ids = re.findall(r"`(\w+)`\s*\|\s*$", line)
        assert ids and ids[0] in rows, f"README row without a known row id in its last column: {line}"
        assert line.split("|")[1].strip() in rows[ids[0]].readme


def test_every_recipe_with_its_overrides_resolves(tmp_path):
    """Strict configs: a renamed or removed key in an override fails here, not hours into a re-run."""
    from trainers.config import load_config

    rows = toy_results.load_rows()
    for row in rows.values():
        if row.recipe:
            command = toy_results.train_command(row, tmp_path, [])
            overrides = command[command.index(row.recipe) + 1:]
            load_config(ROOT / row.recipe, overrides)


def write_manifest(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_needs_run_first_and_exported_rows_are_not_retrained(tmp_path):
    manifest = write_manifest(tmp_path / "rows.yaml", """
rows:
  base:
    readme: [base row]
    recipe: configs/toy/fdistill_rkl.yaml
    before: ["python scripts/make_pairs.py --out {out}/pairs"]
    eval: {steps: [1], guidance: 1, splits: [heldout]}
  child:
    readme: [child row]
    recipe: configs/toy/distill_dpo.yaml
    needs: [base]
    overrides: ["model.source={out:base}/pipeline"]
    eval: {steps: [1], guidance: 1}
""")
    rows = toy_results.load_rows(manifest)
    out = tmp_path / "runs"
    commands = toy_results.plan("child", rows, out, ["train.max_steps=2"], None)
    scripts = [c[1] for c in commands]
    assert scripts == ["scripts/make_pairs.py", "scripts/distill.py", "scripts/evaluate.py",
                       "scripts/distill.py", "scripts/evaluate.py", "scripts/evaluate.py"]
    assert commands[0][0] == sys.executable and commands[0][-1] == str(out / "base" / "pairs")
    assert f"model.source={out / 'base'}/pipeline" in commands[3] and "train.max_steps=2" in commands[3]
    assert commands[3][-1] == f"output_dir={out / 'child'}"
    (out / "base" / "pipeline").mkdir(parents=True)
    (out / "base" / "pipeline" / "model_index.json").write_text("{}")
    again = [c[1] for c in toy_results.plan("child", rows, out, [], None)]
    assert again == ["scripts/evaluate.py", "scripts/distill.py", "scripts/evaluate.py", "scripts/evaluate.py"]
    (out / "base" / "eval_heldout").mkdir()
    (out / "base" / "eval_heldout" / "eval.json").write_text("{}")
    evaluated = [c[1] for c in toy_results.plan("child", rows, out, [], None)]
    assert evaluated == ["scripts/distill.py", "scripts/evaluate.py", "scripts/evaluate.py"]
    assert [c[1] for c in toy_results.plan("base", rows, out, [], None)] == ["scripts/evaluate.py"]


@pytest.mark.parametrize("text,message", [
    ("rows:\n  a:\n    readme: [x]\n    recipee: configs/toy/lcd.yaml\n", "unknown key"),
    ("rows:\n  a:\n    readme: []\n    needs: [b]\n", "unknown row 'b'"),
    ("rows:\n  a:\n    readme: [x]\n    model: toy\n    eval: {steps: [1]}\n", "eval needs steps and guidance"),
    ("rows:\n  a:\n    readme: [x]\n    eval: {steps: [1], guidance: 1}\n", "exactly one of recipe"),
])
def test_bad_rows_file_is_one_line_naming_the_row(tmp_path, capsys, text, message):
    manifest = write_manifest(tmp_path / "rows.yaml", text)
    assert toy_results.main(["--manifest", str(manifest), "--list"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "row a" in err and "\n" not in err


def test_a_row_trains_evaluates_and_prints_its_table_line(tmp_path, capsys):
    """The real runner on one real row, cut to 2 training steps and 2 prompts: it trains, exports, evaluates
    (at one torch thread, the default, recorded in the report) and prints the README-style line from the report; run again, it plans the evaluation alone (no retraining)."""
    out = tmp_path / "runs"
    args = ["lcd_unet_2k", "--out", str(out), "--set", "train.max_steps=2", "--num-prompts", "2"]
    assert toy_results.main(args) == 0
    printed = capsys.readouterr().out
    assert (out / "lcd_unet_2k" / "pipeline" / "model_index.json").is_file()
    line = printed.strip().splitlines()[-1]
    assert re.fullmatch(r"\| lcd_unet_2k \| 2 \|  \| \d\.\d{3} / \d+\.\d{2} \|", line), line  # steps 4, then 2
    assert "OMP_NUM_THREADS=1" in printed.splitlines()[0]  # every command runs at the pinned thread count,
    report = json.loads((out / "lcd_unet_2k" / "eval_heldout" / "eval.json").read_text())
    assert report["protocol"]["extra"]["torch_threads"] == 1  # and the evaluation records it
    assert toy_results.main([*args, "--print"]) == 0  # the plan of a second run: evaluation only
    again = capsys.readouterr().out
    assert "scripts/distill.py" not in again and "scripts/evaluate.py" in again
