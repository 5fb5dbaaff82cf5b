"""Where and in which precision the builtin trainer computes: device, weight dtype, autocast,
GradScaler, CUDA speed settings, freeing and measuring GPU memory.

sd-scripts (through accelerate) keeps the frozen base weights in the half dtype of
``--mixed_precision`` and the LoRA weights in fp32, runs the model under autocast and, for
fp16, scales the loss with a GradScaler. The builtin does the same on CUDA. On a CPU it trains
in fp32, unless ``CHARBUILD_CPU_HALF=1`` asks for the GPU's path on the CPU (half weights,
CPU autocast, a CPU GradScaler for fp16): that is how the test suite runs the mixed-precision
code without a GPU. ``CHARBUILD_DEVICE`` (``cpu``, ``cuda``, ``cuda:1``) overrides the choice
of device; tests that compare trained bytes set ``cpu`` so that they pass on a GPU machine too.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any

from .models import UnsupportedError

#: The oldest torch with ``torch.amp.GradScaler(device)`` (and CPU fp16 autocast): pyproject's floor.
MIN_TORCH = (2, 3)
DEVICE_ENV = "CHARBUILD_DEVICE"
CPU_HALF_ENV = "CHARBUILD_CPU_HALF"


@dataclass(frozen=True)
class Precision:
    """The device a training runs on and its dtypes."""

    device: Any  # torch.device
    weight_dtype: Any  # the frozen base weights' dtype: float32, float16 or bfloat16
    why: str = ""  # a note when the job's mixed precision is not what runs (fp32 on a CPU)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def half(self) -> bool:
        import torch

        return self.weight_dtype != torch.float32


def torch_version(version: str) -> tuple[int, int]:
    """(major, minor) of a torch version string such as ``"2.13.0+cpu"``."""
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def require_torch() -> None:
    """UnsupportedError naming the fix when the installed torch is older than :data:`MIN_TORCH`."""
    import torch

    if torch_version(torch.__version__) < MIN_TORCH:
        floor = f"{MIN_TORCH[0]}.{MIN_TORCH[1]}"
        raise UnsupportedError(f"torch {torch.__version__} is too old for the builtin trainer (its GradScaler "
                               f"needs torch >= {floor}): pip install -U 'torch>={floor}'")


def choose_precision(mixed_precision: str, environ=os.environ) -> Precision:
    """The :class:`Precision` of a training in ``mixed_precision`` ("no", "fp16", "bf16")."""
    import torch

    wanted = environ.get(DEVICE_ENV, "").strip()
    if wanted:
        try:
            device = torch.device(wanted)
        except RuntimeError as e:
            raise UnsupportedError(f"{DEVICE_ENV}={wanted!r} is not a device torch knows ({e})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UnsupportedError(f"{DEVICE_ENV}={wanted!r} but torch sees no CUDA device")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    if half is None:
        return Precision(device, torch.float32)
    if device.type == "cuda" or environ.get(CPU_HALF_ENV, "").strip() == "1":
        return Precision(device, half)
    return Precision(device, torch.float32, f"mixed_precision {mixed_precision} needs a GPU: training in float32 "
                                            f"on the CPU ({CPU_HALF_ENV}=1 runs the GPU's path on the CPU)")


def autocast(precision: Precision):
    """Autocast to the half weight dtype on the training's device; a no-op context in float32."""
    import torch

    if not precision.half:
        return contextlib.nullcontext()
    return torch.autocast(precision.device.type, dtype=precision.weight_dtype)


def grad_scaler(precision: Precision):
    """A GradScaler for fp16 (sd-scripts' accelerate does the same), else None (bf16, fp32)."""
    import torch

    if precision.weight_dtype != torch.float16:
        return None
    require_torch()
    return torch.amp.GradScaler(precision.device.type)


def cpu_kernel_flags(precision: Precision):
    """The loop's context for CPU kernels: on a CPU in bf16 (``CHARBUILD_CPU_HALF``), without
    oneDNN, whose bf16 convolution backward gave NaN weight gradients at random (torch 2.13 on
    x86: a 3x3 LoRA's ``lora_down`` in one step of three); else nothing changes."""
    import torch

    if precision.is_cuda or precision.weight_dtype != torch.bfloat16:
        return contextlib.nullcontext()
    return _without_onednn()


@contextlib.contextmanager
def _without_onednn():
    """oneDNN off, and back as it was (``mkldnn.flags`` would also set its TF32 flag, with a warning)."""
    import torch

    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def configure_cuda(precision: Precision) -> None:
    """TF32 matmuls and convolutions, cuDNN autotuning: faster fp32 parts (the LoRA weights, the fp32
    VAE) on Ampere and later. sd-scripts leaves both to torch's defaults (TF32 off for matmuls)."""
    import torch

    if not precision.is_cuda:
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def free_memory(precision: Precision) -> None:
    """Give memory of freed tensors back: Python's garbage, then CUDA's cache (sd-scripts'
    ``clean_memory_on_device``)."""
    gc.collect()
    if precision.is_cuda:
        import torch

        torch.cuda.empty_cache()


def peak_memory(precision: Precision) -> dict[str, float] | None:
    """The peak GPU memory so far in MiB, ``{"peak_allocated_mib", "peak_reserved_mib"}``; None on a CPU.

    Reads the caching allocator's counters: no device synchronisation.
    """
    if not precision.is_cuda:
        return None
    import torch

    mib = 1024 * 1024
    return {"peak_allocated_mib": round(torch.cuda.max_memory_allocated(precision.device) / mib, 1),
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved(precision.device) / mib, 1)}


def describe_peak(peak: dict[str, float] | None) -> str:
    """``"; peak GPU memory 5.21 GiB allocated, 6.00 GiB reserved"`` (empty without a GPU)."""
    if not peak:
        return ""
    return (f"; peak GPU memory {peak['peak_allocated_mib'] / 1024:.2f} GiB allocated, "
            f"{peak['peak_reserved_mib'] / 1024:.2f} GiB reserved")


def out_of_memory_errors() -> tuple[type, ...]:
    """The exception types of an allocation that failed (CUDA's, and torch's device-neutral one)."""
    import torch

    types = [torch.cuda.OutOfMemoryError]
    if hasattr(torch, "OutOfMemoryError"):
        types.append(torch.OutOfMemoryError)
    return tuple(dict.fromkeys(types))
