"""Which device kind this machine has (decides CPU-vs-GPU Accelerator set-up in the scripts)."""
import torch


def has_accelerator() -> bool:
    """Whether a GPU-like device exists; without one, several processes run as CPU (gloo) DDP.

    accelerate treats a `--multi_gpu` launch on a machine without GPUs as independent
    single-process runs unless the Accelerator is created with cpu=True.
    """
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())
