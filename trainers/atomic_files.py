"""Files a reader (or a resumed run) sees whole or not at all: written to `<name>.partial`, then renamed."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(partial, path)
