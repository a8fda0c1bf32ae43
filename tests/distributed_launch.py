"""Two-process CPU launches for the distributed tests: one launcher, a free port each time, failures that
show which rank died and why."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launcher(fsdp: bool = False) -> list[str]:
    """`accelerate launch` for 2 processes on this machine: gloo DDP (or FSDP2) when there is no GPU."""
    mode = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]


def failure_report(done: subprocess.CompletedProcess) -> str:
    """The first rank's own traceback (the root cause; the others only see a closed connection) and the tail."""
    lines = done.stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if re.match(r"\[rank\d\]: Traceback", line)), None)
    if first is None:
        return done.stderr[-4000:]
    rank = lines[first].split("]")[0] + "]"
    own = [line for line in lines[first:] if line.startswith(rank)][:60]
    return "\n".join(own) + "\n...\n" + done.stderr[-1500:]


def launch(args: list[str], env: dict | None = None, fsdp: bool = False) -> subprocess.CompletedProcess:
    """Run `args` (a script and its arguments) on 2 CPU processes; assert it exited 0."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(two_process_launcher(fsdp) + [str(a) for a in args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, failure_report(done)
    return done


def launch_training(config: Path, env: dict | None = None, fsdp: bool = False) -> subprocess.CompletedProcess:
    """scripts/distill.py through the fault driver on 2 processes, each rank dumping a hash of its weights."""
    return launch([DRIVER, "--config", config], {"DUMP_WEIGHTS": "1", **(env or {})}, fsdp)


def assert_ranks_identical(run_dir: Path) -> None:
    hashes = [(Path(run_dir) / f"weights-rank{r}.txt").read_text() for r in range(2)]
    assert hashes[0] == hashes[1], "the two ranks ended with different weights"
