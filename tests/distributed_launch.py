"""Two-process CPU launches for the distributed tests: one launcher, a free port each time."""
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_launcher(fsdp: bool = False) -> list[str]:
    """`accelerate launch` for 2 processes on this machine: gloo DDP (or FSDP2) when there is no GPU."""
    mode = ["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
