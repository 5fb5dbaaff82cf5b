"""The architecture of the project's base model (``"sd15"`` or ``"sdxl"``), read from the model.

``charbuild check`` and ``doit list`` load the configuration every time, so this must be cheap:

- ``tiny`` / ``tiny:N`` is SD1.5, ``tiny-sdxl`` / ``tiny-sdxl:N`` SDXL (the built-in demo models);
- a diffusers folder: its ``model_index.json`` (an ``…XL…`` pipeline class, a ``text_encoder_2``)
  and ``unet/config.json`` (SDXL's ``addition_embed_type = "text_time"``; a 1024-wide
  cross-attention is SD2);
- a ``.safetensors`` file: the tensor names of its JSON header, never the weights
  (:func:`charbuild.train.builtin.checkpoint.check_checkpoint_arch`), milliseconds for 7 GB;
- a ``.ckpt`` / ``.pt`` / ``.bin`` file needs torch to list its names (seconds): the answer is
  kept in ``build/cache/base-arch.json`` by (path, size, mtime), as model hashes are.

Every failure is a :class:`~charbuild.train.builtin.checkpoint.CheckpointError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CharbuildError
from .fsutil import write_text_atomic
from .train.builtin.checkpoint import CheckpointError, arch_mismatch, check_checkpoint_arch

#: The built-in models and their architectures (a ``:N`` seed may follow a tiny model's name;
#: ``demo`` is the shipped pretrained model, :mod:`charbuild.train.builtin.demo`).
TINY_BASES = {"tiny": "sd15", "tiny-sdxl": "sdxl", "demo": "sd15"}
#: The name of the shipped pretrained demo model.
DEMO_BASE = "demo"
#: ``[training]`` defaults of a project on the demo model (unless it sets them): samples on, so
#: the report shows what each LoRA learned (step 0 is the base model), at 10 DDIM steps.
DEMO_TRAINING_DEFAULTS = {"sample_every": 40, "sample_steps": 10}
_CACHE_FILE = "base-arch.json"
# in-process answers by (path, size, mtime_ns): one load of the project reads a file once
_MEMO: dict[tuple[str, int, int], str] = {}


def tiny_base_arch(base: str) -> str | None:
    """The architecture of a built-in demo model name (``tiny``, ``tiny-sdxl:3`` …), else None.

    A seed that is not a whole number (``tiny:x``) is no demo model name: None.
    """
    name, sep, seed = str(base).partition(":")
    if name not in TINY_BASES or (sep and (not seed.isdigit() or name == DEMO_BASE)):
        return None
    return TINY_BASES[name]


def diffusers_folder_arch(folder: Path) -> str:
    """``"sd15"`` or ``"sdxl"`` for a diffusers folder, from its ``model_index.json`` and UNet config."""
    index = _json(folder / "model_index.json")
    unet = _json(folder / "unet" / "config.json")
    if index is None and unet is None:
        raise CheckpointError("this folder has neither model_index.json nor unet/config.json: it is no diffusers "
                              "Stable Diffusion folder (give a .safetensors checkpoint or a diffusers folder)", path=folder)
    index, unet = index or {}, unet or {}
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        kind = "sdxl"
    elif unet.get("cross_attention_dim") == 1024:
        kind = "sd2"
    else:
        kind = "sd15"
    problem = arch_mismatch(kind, None)
    if problem:
        raise CheckpointError(problem.replace("this file", "this folder"), path=folder)
    return kind


def _json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path.name}: {e}", path=path) from e
    return value if isinstance(value, dict) else None


def base_arch(path: Path, cache_dir: Path | None = None) -> str:
    """The architecture of the base model at ``path`` (a file or a diffusers folder).

    ``cache_dir``: where a non-safetensors checkpoint's answer is kept between runs (None: not kept).
    Raises :class:`CheckpointError` naming the file when it is unreadable or no SD1.x/SDXL model.
    """
    path = Path(path)
    if path.is_dir():
        return diffusers_folder_arch(path)
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint: {e.strerror or e}", path=path) from e
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _MEMO:
        return _MEMO[key]
    keep = cache_dir is not None and path.suffix.lower() != ".safetensors"
    cache = _read_cache(Path(cache_dir) / _CACHE_FILE) if keep else {}
    entry = cache.get(key[0])
    if entry and entry[:2] == [st.st_size, st.st_mtime_ns] and entry[2] in TINY_BASES.values():
        arch = entry[2]
    else:
        arch = check_checkpoint_arch(path)
        if keep:
            cache[key[0]] = [st.st_size, st.st_mtime_ns, arch]
            try:
                write_text_atomic(Path(cache_dir) / _CACHE_FILE, json.dumps(cache, indent=1, sort_keys=True) + "\n")
            except (OSError, CharbuildError):
                pass  # a read-only project still loads; the file is just read again next time
    _MEMO[key] = arch
    return arch


def _read_cache(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
