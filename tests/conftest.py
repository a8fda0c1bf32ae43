"""Test set-up: offline hub, repo root importable, few threads (CI has 2 cores)."""
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in every test process. pytest-xdist already runs one worker per core; a thread pool per
# worker on top oversubscribes the cores, and OpenMP's spinning threads then made the suite ~3x slower on 2
# cores. Launched subprocesses inherit the variable, so in-process and launched runs use the same kernels and
# the tests that compare them bit for bit can.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after the variables: a plugin may have imported it already, so set it too)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests", ROOT / "scripts"):  # packages, test helpers, the scripts as modules
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
