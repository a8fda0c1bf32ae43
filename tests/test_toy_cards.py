"""The teachers' model cards: the measured-quality section is built from eval.json files alone."""
from __future__ import annotations

import json
from pathlib import Path

from evaluation.report import FORMAT
from pipelines.toy.cards import MARKER, quality_section, write_quality_section

PROTOCOL = {"prompts": {"count": 2}, "images_per_prompt": 3, "seed": 0}


def entry(label: str, steps: int, guidance: float, passed: float, fid: float) -> dict:
    return {"label": label, "steps": steps, "guidance": guidance,
            "metrics": {"fid": {"fid": {"value": fid}}, "toy_attributes": {"toy_attributes": {"value": passed}},
                        "clip_score": {"clip_score": {"value": 80.0}}}}


def write_eval(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "protocol": PROTOCOL, "results": entries}))


def test_card_merges_the_guidance_sweep_with_the_cards_own_scale(tmp_path):
    """The card's own run (guidance 5 at 25 and 1 steps) gives the 25-step row of guidance 5; a sweep
    folder adds guidance 2; a step count other than 25 never enters the guidance table; a split the
    sweep lacks (held-in here) is left out of it rather than shown as the card's scale alone."""
    for split, passed in (("heldin", 0.9), ("heldout", 0.5)):
        write_eval(tmp_path / "teacher" / split / "eval.json",
                   [entry("teacher", 25, 5.0, passed, 1.5), entry("teacher", 1, 5.0, 0.01, 30.0)])
    write_eval(tmp_path / "teacher_guidance" / "heldout" / "eval.json", [entry("teacher_w2", 25, 2.0, 0.52, 0.75)])

    section = quality_section(tmp_path, "teacher", None)

    assert "| 25 | 0.900 | 1.50 | 80.00 | 0.500 | 1.50 | 80.00 |" in section
    table = section[section.index("Guidance at 25 steps"):].splitlines()
    assert "| guidance | heldout pass rate | heldout FID |" in table
    assert [row for row in table if row.startswith("| 2 ") or row.startswith("| 5 ")] == [
        "| 2 | 0.520 | 0.75 |", "| 5 | 0.500 | 1.50 |"]
    assert not any(row.startswith("| 1 ") for row in table)


def test_card_without_a_sweep_has_no_guidance_table_and_rewrites_in_place(tmp_path):
    write_eval(tmp_path / "teacher" / "heldin" / "eval.json", [entry("teacher", 25, 5.0, 0.9, 1.5)])
    card = tmp_path / "export"
    card.mkdir()
    (card / "README.md").write_text(f"# Teacher\n\n{MARKER}\n\nold numbers\n\n## Usage\n\nkeep me\n")

    section = quality_section(tmp_path, "teacher", None)
    write_quality_section(card, section)

    text = (card / "README.md").read_text()
    assert "Guidance at" not in section
    assert "old numbers" not in text and text.count(MARKER) == 1
    assert text.startswith("# Teacher") and text.rstrip().endswith("## Usage\n\nkeep me")
