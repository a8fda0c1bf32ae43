"""Prompt sets for evaluation: the toy world's splits, the public benchmarks read from disk, any file.

Named sets:

- ``toy-heldin`` / ``toy-heldout``: captions drawn by ``pipelines.toy.world.toy_prompts`` (training
  combinations only / at least one held-out colour-shape combination per prompt); deterministic in
  (count, seed).
- ``coco-30k``, ``mjhq-30k``, ``hpsv2``, ``parti``: cannot be downloaded here, so they are read from a
  root folder (``--prompts-root`` or ``$DIFFSTILL_PROMPTS``). Under that root a set is either one file
  ``<name>.<txt|jsonl|json|csv|tsv>`` or a folder ``<name>/`` whose files of those kinds are all read in
  name order (for MJHQ, its own ``meta_data.json``; for HPSv2, its four style files; for Parti, its
  ``PartiPrompts.tsv``). docs/evaluation.md lists each set's expected layout.

File formats (``read_prompt_file``), chosen so the benchmarks' published files are read as they are:

- ``.txt``: one prompt per line; blank lines are skipped.
- ``.jsonl``: one JSON object per line with a ``prompt`` field (optional ``category``).
- ``.json``: a list of strings (HPSv2's style files), a list of objects with ``prompt``, or an object
  mapping ids to objects with ``prompt`` and ``category`` (MJHQ-30K's ``meta_data.json``).
- ``.csv`` / ``.tsv``: a header row with a ``prompt`` column, matched case-insensitively (Parti's
  ``Prompt``), optional ``category`` column.

A prompt's category defaults to the file's stem, so a folder of per-style files keeps its styles.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

TOY_SETS = {"toy-heldin": "heldin", "toy-heldout": "heldout"}
BENCHMARK_SETS = ("coco-30k", "mjhq-30k", "hpsv2", "parti")
PROMPT_SETS = (*TOY_SETS, *BENCHMARK_SETS)
PROMPT_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv")
ROOT_ENV = "DIFFSTILL_PROMPTS"
DEFAULT_TOY_PROMPTS = 64


@dataclass
class PromptSet:
    """An ordered list of prompts, where they came from, and an optional category per prompt."""

    name: str
    prompts: list[str]
    source: str
    categories: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} ({self.source}) holds no prompts")
        if self.categories and len(self.categories) != len(self.prompts):
            raise ValueError(f"prompt set {self.name!r}: {len(self.categories)} categories for {len(self.prompts)} prompts")

    def head(self, n: int | None) -> "PromptSet":
        """The first ``n`` prompts (all when ``n`` is None); files are read in their own order."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"need at least 1 prompt, got --num-prompts {n}")
        return PromptSet(self.name, self.prompts[:n], self.source, self.categories[:n])

    @property
    def is_toy(self) -> bool:
        return self.name in TOY_SETS

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "count": len(self.prompts)}


def _row_prompt(row: dict, where: str) -> tuple[str, str | None]:
    keys = {str(k).lower(): k for k in row}
    if "prompt" not in keys:
        raise ValueError(f"{where}: no 'prompt' field/column (found {sorted(row)})")
    category = row[keys["category"]] if "category" in keys else None
    return str(row[keys["prompt"]]).strip(), (str(category) if category is not None else None)


def _read_rows(path: Path) -> list[tuple[str, str | None]]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return [(line.strip(), None) for line in text.splitlines() if line.strip()]
    if suffix == ".jsonl":
        return [_row_prompt(json.loads(line), f"{path}:{i + 1}") for i, line in enumerate(text.splitlines()) if line.strip()]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        return [_row_prompt(row, f"{path}:{i + 2}") for i, row in enumerate(reader)]
    if suffix == ".json":
        data = json.loads(text)
        items = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a list of prompts or an object of {{id: {{prompt, category}}}}")
        return [(s.strip(), None) if isinstance(s, str) else _row_prompt(s, f"{path}[{i}]") for i, s in enumerate(items)]
    raise ValueError(f"{path}: unsupported prompt file type {suffix!r}; use one of {PROMPT_SUFFIXES}")


def read_prompt_file(path: str | os.PathLike, name: str | None = None) -> PromptSet:
    """Prompts (and categories, defaulting to the file's stem) from one file of a supported format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: '{path}'")
    rows = [(p, c or path.stem) for p, c in _read_rows(path) if p]
    return PromptSet(name or path.stem, [p for p, _ in rows], str(path), [c for _, c in rows])


def _benchmark_files(root: Path, name: str) -> list[Path]:
    for suffix in PROMPT_SUFFIXES:
        if (root / f"{name}{suffix}").is_file():
            return [root / f"{name}{suffix}"]
    folder = root / name
    if folder.is_dir():
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PROMPT_SUFFIXES)
    return []


def read_benchmark(name: str, root: str | os.PathLike | None = None) -> PromptSet:
    """A public benchmark's prompts from ``root`` (or ``$DIFFSTILL_PROMPTS``); see the module docstring."""
    root = root or os.environ.get(ROOT_ENV)
    if root is None:
        raise FileNotFoundError(f"prompt set {name!r} is read from disk: pass --prompts-root DIR (or set "
                                f"${ROOT_ENV}) holding {name}.txt|.jsonl|.json|.csv|.tsv or a folder {name}/")
    files = _benchmark_files(Path(root), name)
    if not files:
        raise FileNotFoundError(f"prompt set {name!r} not found under '{root}': put {name}.txt (one prompt per "
                                f"line), .jsonl/.json/.csv/.tsv, or a folder '{name}/' of such files there "
                                f"(docs/evaluation.md)")
    parts = [read_prompt_file(f) for f in files]
    source = str(files[0]) if len(files) == 1 else f"{Path(root) / name}/ ({len(files)} files)"
    return PromptSet(name, [p for s in parts for p in s.prompts], source, [c for s in parts for c in s.categories])


def load_prompts(spec: str, *, n: int | None = None, root: str | os.PathLike | None = None,
                 seed: int = 0) -> PromptSet:
    """A named set (``PROMPT_SETS``) or a prompt file path, cut to its first ``n`` prompts.

    Toy sets are drawn fresh: ``n`` distinct captions (default ``DEFAULT_TOY_PROMPTS``) from ``seed``.
    """
    if spec in TOY_SETS:
        from pipelines.toy.world import toy_prompts
        count = n or DEFAULT_TOY_PROMPTS
        prompts = toy_prompts(TOY_SETS[spec], count, seed=seed)
        return PromptSet(spec, prompts, f"pipelines.toy.world.toy_prompts({TOY_SETS[spec]!r}, {count}, seed={seed})")
    if spec in BENCHMARK_SETS:
        return read_benchmark(spec, root).head(n)
    path = Path(spec)
    if path.suffix.lower() in PROMPT_SUFFIXES or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: '{path}'")
        return read_prompt_file(path).head(n)
    raise ValueError(f"unknown prompt set {spec!r}: choose one of {', '.join(PROMPT_SETS)}, "
                     f"or give a prompt file ({'/'.join(PROMPT_SUFFIXES)})")


def load_prompts_excluding(spec: str, exclude: str, *, n: int, root: str | os.PathLike | None = None,
                           seed: int = 0) -> PromptSet:
    """The first ``n`` prompts of ``spec`` that are not in the set ``exclude`` (loaded with its defaults).

    Training prompts drawn from the distribution an evaluation list comes from (``toy-heldout`` drawn with
    another seed, say) can repeat that list's captions; this keeps them disjoint. A toy draw of n + |exclude|
    extends the draw of n (``toy_prompts``), so the result is deterministic in (spec, n, seed, exclude).
    """
    banned = set(load_prompts(exclude, root=root).prompts)
    pool = load_prompts(spec, n=n + len(banned), root=root, seed=seed)
    kept = [p for p in pool.prompts if p not in banned][:n]
    if len(kept) < n:
        raise ValueError(f"only {len(kept)} prompts of {spec!r} are not in {exclude!r}; ask for fewer than {n}")
    return PromptSet(spec, kept, f"{pool.source} without the prompts of {exclude!r}")
