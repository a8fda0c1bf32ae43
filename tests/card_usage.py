"""The sampling arguments an exported folder's model card tells a user to pass (its usage line)."""
import ast
import re
from pathlib import Path


def card_call_kwargs(folder: Path) -> dict:
    """{"num_inference_steps": N} or {"sigmas": [...]}, plus guidance_scale, from `image = pipe(prompt, ...)`."""
    line = next(l for l in (Path(folder) / "README.md").read_text().splitlines() if l.startswith("image = pipe("))
    call = ast.parse(re.sub(r"\.images\[0\]$", "", line.split("=", 1)[1].strip())).body[0].value
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
