"""save_checkpoint's ordering across ranks, with a recording stand-in for the Accelerator.

A real 2-process run fails here only by chance (rank 1 still writing its RNG state into the
temporary folder while rank 0 renames it), so the invariant is checked directly: after `save_state`
there is a barrier that every rank passes while the temporary folder still exists and the final one
does not; only then does the main process rename.
"""
from pathlib import Path

import torch

from trainers.checkpoint import LOOP_STATE, latest_checkpoint, save_checkpoint


class Recorder:
    """Main-process stand-in: records each barrier with (final exists, temporary exists) at that moment."""

    is_main_process = True

    def __init__(self, final: Path, tmp: Path):
        self.final, self.tmp, self.events = final, tmp, []

    def wait_for_everyone(self):
        self.events.append(("barrier", self.final.exists(), self.tmp.exists()))

    def save_state(self, folder: str):
        self.events.append(("save_state", Path(folder) == self.tmp))
        Path(folder, "random_states_0.pkl").write_bytes(b"rng")


def test_a_barrier_separates_every_ranks_save_from_the_rename(tmp_path):
    final = tmp_path / "checkpoints" / "step-0000003"
    acc = Recorder(final, tmp_path / "checkpoints" / ".tmp-step-0000003")
    out = save_checkpoint(acc, tmp_path, 3, {"data_position": 7}, {"ema": torch.nn.Linear(2, 2)}, keep=2)
    assert acc.events == [("barrier", False, True),   # folder made before anyone saves into it
                          ("save_state", True),
                          ("barrier", False, True),   # every rank done writing; nothing renamed yet
                          ("barrier", True, False)]   # renamed, before anyone reads it
    assert out == final == latest_checkpoint(tmp_path)
    assert {p.name for p in final.iterdir()} == {"random_states_0.pkl", "average_ema.safetensors", LOOP_STATE}
