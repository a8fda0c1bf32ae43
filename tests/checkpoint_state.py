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


def assert_resume_is_exact(recipe: Path, output_dir: Path, step: int, capsys) -> dict[str, torch.Tensor]:
    """scripts/distill.py's main on `recipe` in this process (one rank), writing to `output_dir`; then the
    checkpoint of `step` is deleted and the same command runs again, resuming from the checkpoint before it.
    Every tensor of the re-made checkpoint must equal the first bit for bit. Returns the first one's tensors.
    (Resuming is the same code on one rank or many; the 2-process launches check that ranks agree.)"""
    import shutil

    import distill

    argv = ["--config", str(recipe), f"output_dir={output_dir}"]
    assert distill.main(argv) == 0
    final = Path(output_dir) / "checkpoints" / f"step-{step:07d}"
    first = checkpoint_tensors(final)
    shutil.rmtree(final)
    capsys.readouterr()
    assert distill.main(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    again = checkpoint_tensors(final)
    assert again.keys() == first.keys()
    different = [k for k in first if not torch.equal(first[k], again[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    return first
