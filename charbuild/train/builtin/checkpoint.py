"""Which architecture a single-file checkpoint is, from its tensor names alone.

A ``.safetensors`` file starts with an 8-byte little-endian length and a JSON header naming
every tensor, so :func:`read_checkpoint_keys` reads a 7 GB SDXL file's names in milliseconds
without touching the weights. :func:`checkpoint_kind` is a pure function of those names:

==================  ===========================================================================
kind                what marks it (original Stability / CompVis layout)
==================  ===========================================================================
``sdxl``            ``conditioner.embedders.0.transformer.…`` (CLIP-L) and
                    ``conditioner.embedders.1.model.…`` (OpenCLIP bigG): SDXL base and its
                    fine-tunes (Illustrious, NoobAI, Pony, Animagine …)
``sdxl_refiner``    ``conditioner.embedders.0.model.…`` only (bigG, no CLIP-L)
``sd15``            ``cond_stage_model.transformer.…`` (CLIP-L) with the SD UNet
                    ``model.diffusion_model.input_blocks.…``: SD1.x and its fine-tunes
``sd2``             ``cond_stage_model.model.…`` (OpenCLIP ViT-H)
``lora``            kohya / LyCORIS adapter keys (``lora_unet_…``, ``lora_te…``)
``diffusers``       diffusers' own names (``down_blocks.…``, ``text_model.…``): one component,
                    not a whole checkpoint
``unknown``         anything else
==================  ===========================================================================

:func:`check_checkpoint_arch` is what the config check and the loader call: it returns the
architecture charbuild should train (``"sd15"`` or ``"sdxl"``) or raises an error naming the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

from charbuild.errors import TrainingError

#: The architectures the builtin trainer can load from a single file.
SUPPORTED_ARCHS = ("sd15", "sdxl")

_ARCH_WORDS = {
    "sd15": "SD1.x",
    "sdxl": "SDXL",
    "sdxl_refiner": "the SDXL refiner",
    "sd2": "SD2.x",
    "lora": "a LoRA / LyCORIS file, not a base model",
    "diffusers": "a single diffusers component (a UNet or text encoder alone), not a whole checkpoint",
    "unknown": "no Stable Diffusion checkpoint layout charbuild knows",
}
_MAX_HEADER = 100 * 1024 * 1024  # a real header is a few hundred KB


class CheckpointError(TrainingError):
    """A base-model file is not readable, not a checkpoint, or not the architecture asked for."""

    exit_code = 2


def checkpoint_kind(keys: Iterable[str]) -> str:
    """The kind of checkpoint whose tensors are named ``keys`` (see the module table)."""
    has_sd_unet = has_clip_l = has_big_g = has_refiner_g = has_sd15_te = has_sd2_te = False
    has_lora = has_diffusers = False
    for key in keys:
        if key.startswith("model.diffusion_model.input_blocks."):
            has_sd_unet = True
        elif key.startswith("conditioner.embedders.0.transformer."):
            has_clip_l = True
        elif key.startswith("conditioner.embedders.1.model."):
            has_big_g = True
        elif key.startswith("conditioner.embedders.0.model."):
            has_refiner_g = True
        elif key.startswith("cond_stage_model.transformer."):
            has_sd15_te = True
        elif key.startswith("cond_stage_model.model."):
            has_sd2_te = True
        elif key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            has_lora = True
        elif key.startswith(("down_blocks.", "text_model.", "encoder.layers.", "mid_block.")):
            has_diffusers = True
    if has_sd_unet and has_clip_l and has_big_g:
        return "sdxl"
    if has_sd_unet and has_refiner_g and not has_clip_l:
        return "sdxl_refiner"
    if has_sd_unet and has_sd15_te:
        return "sd15"
    if has_sd_unet and has_sd2_te:
        return "sd2"
    if has_lora:
        return "lora"
    if has_diffusers:
        return "diffusers"
    return "unknown"


def prediction_hints(keys: Iterable[str]) -> dict[str, object]:
    """What a checkpoint says about its noise schedule through marker tensors.

    NoobAI-XL's v-prediction releases (and other v-pred SDXL fine-tunes) carry empty tensors
    named ``v_pred`` and ``ztsnr``; ComfyUI and Forge read them the same way. Returns
    ``{"prediction_type": "v_prediction" | None, "zero_terminal_snr": bool}`` (None: not said,
    i.e. epsilon unless the configuration says otherwise).
    """
    names = set(keys)
    return {
        "prediction_type": "v_prediction" if "v_pred" in names else None,
        "zero_terminal_snr": "ztsnr" in names,
    }


def arch_mismatch(kind: str, arch: str | None) -> str | None:
    """Why a checkpoint of ``kind`` cannot be trained as ``arch`` (None: it can).

    ``arch=None`` accepts any supported kind. The message says what the file is and what to do.
    """
    if kind not in SUPPORTED_ARCHS:
        return f"this file is {_ARCH_WORDS.get(kind, kind)}; charbuild trains SD1.x and SDXL checkpoints"
    if arch is not None and arch != kind:
        return (
            f"this is an {_ARCH_WORDS[kind]} checkpoint but the configuration says arch = {arch!r}: "
            f"set arch = {kind!r} (or leave arch out to take it from the file)"
        )
    return None


def read_safetensors_header(path: str | Path) -> dict:
    """A ``.safetensors`` file's header: ``{name: {"dtype", "shape", "data_offsets"}}`` and
    maybe ``"__metadata__"`` (the weights are not read)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("not a safetensors file (shorter than its header length)", path=path)
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise CheckpointError("not a safetensors file (implausible header length)", path=path)
            raw = f.read(size)
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint: {e.strerror or e}", path=path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError("not a safetensors file (its header is not JSON)", path=path) from e
    if not isinstance(header, dict):
        raise CheckpointError("not a safetensors file (its header is not a JSON object)", path=path)
    return header


def read_safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names in a ``.safetensors`` file's header (the weights are not read)."""
    return [k for k in read_safetensors_header(path) if k != "__metadata__"]


_HALF_DTYPES = {"F16": "float16", "BF16": "bfloat16"}


def uniform_half_dtype(header: dict) -> str | None:
    """``"float16"``/``"bfloat16"`` when every floating tensor of a safetensors ``header`` is
    stored in that one half dtype, else None (any float32 tensor, a mix, no float tensor).
    Empty tensors (markers such as ``v_pred``) do not count.

    Why: loading such a file in its own dtype and widening afterwards gives the same values as
    loading it in float32, without holding the file's tensors and float32 copies at once.
    """
    floats = {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
              and str(v.get("dtype", "")).startswith(("F", "BF")) and 0 not in v.get("shape", ())}
    return _HALF_DTYPES.get(floats.pop()) if len(floats) == 1 else None


def read_checkpoint_keys(path: str | Path) -> list[str]:
    """Tensor names of a ``.safetensors`` (header only) or ``.ckpt``/``.pt``/``.bin`` (memory-mapped
    ``torch.load`` with ``weights_only``; a ``state_dict`` entry is looked into)."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return read_safetensors_keys(path)
    import torch

    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # pickle and zip errors come in many kinds
        raise CheckpointError(f"cannot read the checkpoint ({type(e).__name__}: {str(e)[:200]})", path=path) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError("the checkpoint holds no state dict", path=path)
    return [str(k) for k in obj]


def check_checkpoint_arch(path: str | Path, arch: str | None = None) -> str:
    """The architecture of the single-file checkpoint at ``path``: ``"sd15"`` or ``"sdxl"``.

    ``arch`` is what the configuration says (None: not given). Raises :class:`CheckpointError`
    naming the file when it cannot be read, is no supported checkpoint, or is not ``arch``.
    """
    return check_keys_arch(path, read_checkpoint_keys(path), arch)


def check_keys_arch(path: str | Path, keys: Iterable[str], arch: str | None = None) -> str:
    """:func:`check_checkpoint_arch` for keys already read from ``path``."""
    kind = checkpoint_kind(keys)
    problem = arch_mismatch(kind, arch)
    if problem:
        raise CheckpointError(problem, path=path)
    return kind
