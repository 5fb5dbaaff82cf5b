"""Whether this machine has an NVIDIA GPU, cheaply (the runner's words; no torch import).

The build process says where a training runs before the trainer starts; the trainer itself
picks its device with ``torch.cuda.is_available()``. Importing torch in the build process costs
seconds, so this looks for the NVIDIA driver instead: its device files on Linux, its
``nvidia-smi`` elsewhere (or torch's own answer when torch is already imported).

It also says what a local training holds while it runs (its *slot*): a GPU of ``[trainer] gpus``
on a machine with one; on a machine without, one of ``[trainer] cpu_trainings`` CPU slots
(``cpu0``, ``cpu1``, …), each training then on its share of the cores. Why: a small model's
training scales poorly over threads (the demo model's: 2 threads 18 % faster than 1 on a
2-core CPU) while two 1-thread trainings side by side each run at full speed (measured: 56 s
each against 55 s alone), so on a CPU two trainings at once nearly halve a build's time.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Sequence


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


CPU_SLOT_PREFIX = "cpu"
THREAD_VARIABLES = ("CHARBUILD_TORCH_THREADS", "OMP_NUM_THREADS")


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def training_slots(gpus: Sequence[int], cpu_trainings: int = 1) -> list[int | str]:
    """What a local training takes a lock on: one of ``gpus`` on a machine with an NVIDIA GPU,
    else one of ``cpu_trainings`` CPU slots ``cpu0``, ``cpu1``, …"""
    if has_cuda_gpu():
        return list(gpus)
    return [f"{CPU_SLOT_PREFIX}{k}" for k in range(max(1, cpu_trainings))]


def is_cpu_slot(slot: int | str) -> bool:
    """True for a CPU slot of :func:`training_slots` (not a GPU number)."""
    return isinstance(slot, str) and slot.startswith(CPU_SLOT_PREFIX)


def threads_per_training(cpu_trainings: int) -> int | None:
    """CPU threads for each of ``cpu_trainings`` trainings at once (the cores shared out, at least
    1); None for one training at a time or when the user set a thread count in the environment
    (``CHARBUILD_TORCH_THREADS`` or ``OMP_NUM_THREADS``): the trainer then chooses as always."""
    if cpu_trainings <= 1 or any(os.environ.get(v, "").strip() for v in THREAD_VARIABLES):
        return None
    return max(1, cpu_cores() // cpu_trainings)


def slot_env(slot: int | str, cpu_trainings: int = 1) -> dict[str, str]:
    """Environment variables of a trainer holding ``slot``: ``CUDA_VISIBLE_DEVICES`` = the GPU;
    for a CPU slot no GPU, and ``OMP_NUM_THREADS`` = :func:`threads_per_training` where it says one."""
    if not is_cpu_slot(slot):
        return {"CUDA_VISIBLE_DEVICES": str(slot)}
    env = {"CUDA_VISIBLE_DEVICES": ""}
    threads = threads_per_training(cpu_trainings)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def where_it_trains(slot: int | str, cpu_trainings: int = 1) -> str:
    """``on GPU 0`` for a GPU slot; for a CPU slot ``on the CPU (no GPU found)`` and, with several
    CPU trainings at once, the slot and its threads (:func:`training_slots` gave a GPU only where
    there is one)."""
    if not is_cpu_slot(slot):
        return f"on GPU {slot}"
    if cpu_trainings <= 1:
        return "on the CPU (no GPU found)"
    threads = threads_per_training(cpu_trainings)
    share = f", {threads} thread{'' if threads == 1 else 's'}" if threads is not None else ""
    return (f"on the CPU (no GPU found; slot {slot.removeprefix(CPU_SLOT_PREFIX)} of "
            f"[trainer] cpu_trainings = {cpu_trainings}{share})")
