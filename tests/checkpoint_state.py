"""Every tensor a checkpoint folder holds, flat, for bitwise resume comparisons in the tests."""
from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Models and averages (safetensors) and optimizer slots (optimizer*.bin), keyed by file and name."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update({f"{path.stem}.{k}": v for k, v in load_file(path).items()})
    for path in sorted(folder.glob("optimizer*.bin")):
        for idx, slots in torch.load(path, weights_only=True)["state"].items():
            state.update({f"{path.stem}.{idx}.{k}": torch.as_tensor(v) for k, v in slots.items()})
    return state
