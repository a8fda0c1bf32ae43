"""Runs scripts/distill.py with faults injected at exact points, for the loop tests.

Environment knobs (all optional):
  FAULT_SIGNAL=KILL|TERM   send this signal to the own process ...
  FAULT_AT_FETCH=N         ... when the dataset is read for the N-th time (1-based)
  FAULT_NAN_FETCHES=a,b    dataset reads (1-based) whose pixels become NaN
  FAULT_NAN_RANK=r          ... on process r only (default: every process)
  DUMP_WEIGHTS=1           after training, each rank writes a hash of its trained weights to
                           <output_dir>/weights-rank<r>.txt

Usage: python tests/fault_driver.py --config X.yaml [key=value ...]
   or: accelerate launch ... tests/fault_driver.py --config X.yaml ...
"""
import hashlib
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import trainers.data as data  # noqa: E402
import trainers.loop as loop  # noqa: E402


class Faulty(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner, self.fetches = inner, 0
        self.signal_at = int(os.environ.get("FAULT_AT_FETCH", "0"))
        self.signal = getattr(signal, "SIG" + os.environ.get("FAULT_SIGNAL", "KILL"))
        self.nan = {int(x) for x in os.environ.get("FAULT_NAN_FETCHES", "").split(",") if x}
        nan_rank = os.environ.get("FAULT_NAN_RANK")
        if nan_rank is not None and nan_rank != os.environ.get("RANK", "0"):
            self.nan = set()

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.fetches += 1
        if self.fetches == self.signal_at:
            os.kill(os.getpid(), self.signal)
        item = dict(self.inner[i])
        if self.fetches in self.nan:
            item["pixel_values"] = item["pixel_values"] * float("nan")
        return item


def _wrap_builders():
    """Wrap whatever dataset a run builds (kinds registered later by method modules included)."""
    import trainers.run as run_module

    build = data.build_dataset
    run_module.build_dataset = lambda cfg: Faulty(build(cfg))


def _wrap_train():
    original = loop.train

    def train(cfg, accelerator, method, dataset):
        trainer = original(cfg, accelerator, method, dataset)
        if os.environ.get("DUMP_WEIGHTS"):
            digest = hashlib.sha256()
            for group, wrapped in sorted(trainer.modules.items()):
                for name, tensor in sorted(accelerator.unwrap_model(wrapped).state_dict().items()):
                    digest.update(f"{group}.{name}".encode())
                    digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            out = Path(cfg.output_dir) / f"weights-rank{accelerator.process_index}.txt"
            out.write_text(digest.hexdigest())
        return trainer

    loop.train = train
    import trainers.run as run_module

    run_module.train = train


if __name__ == "__main__":
    _wrap_builders()
    _wrap_train()
    import distill

    sys.exit(distill.main(sys.argv[1:]))
