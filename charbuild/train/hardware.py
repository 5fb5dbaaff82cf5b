"""Whether this machine has an NVIDIA GPU, cheaply (the runner's words; no torch import).

The build process says where a training runs before the trainer starts; the trainer itself
picks its device with ``torch.cuda.is_available()``. Importing torch in the build process costs
seconds, so this looks for the NVIDIA driver instead: its device files on Linux, its
``nvidia-smi`` elsewhere (or torch's own answer when torch is already imported).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys


def has_cuda_gpu() -> bool:
    """True when an NVIDIA GPU is visible to this process (``CUDA_VISIBLE_DEVICES`` respected)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    if sys.platform.startswith("linux"):
        return bool(glob.glob("/dev/nvidia[0-9]*"))
    return shutil.which("nvidia-smi") is not None


def where_it_trains(gpu: int | str) -> str:
    """``on GPU 0``, or, without a GPU, ``on the CPU`` (the GPU lock ``gpu`` still orders the trainings)."""
    return f"on GPU {gpu}" if has_cuda_gpu() else "on the CPU (no GPU found)"
