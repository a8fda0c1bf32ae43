"""Test set-up: offline hub, repo root importable, few threads (CI has 2 cores)."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests", ROOT / "scripts"):  # packages, test helpers, the scripts as modules
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
