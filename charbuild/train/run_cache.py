"""The run cache: finished trainings kept by the content of their inputs and settings.

Reverting a setting, or moving the project, finds the earlier result instead of training
again. The cache folder is :attr:`charbuild.layout.Layout.run_cache_dir` (safe to delete).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..fsutil import atomic_path
from ..signature import canonical_json


def run_cache_key(signature: Mapping[str, Any]) -> str:
    """The identity of a training: its settings and the *content* of its inputs.

    File times and the project's location are left out, so reverting a setting or
    moving the project finds the earlier result.
    """
    content = {"extra": signature["extra"], "files": {k: v[2] for k, v in signature["files"].items()}}
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()[:32]


def cached_file(cache_dir: Path, signature: Mapping[str, Any]) -> Path:
    """Where the training of ``signature`` is kept in ``cache_dir``."""
    return Path(cache_dir) / f"{run_cache_key(signature)}.safetensors"


def restore(cache_dir: Path, signature: Mapping[str, Any], output: Path) -> Path | None:
    """Copy the cached training of ``signature`` onto ``output`` (atomically); its path, or None."""
    cached = cached_file(cache_dir, signature)
    if not cached.is_file():
        return None
    with atomic_path(output) as tmp:
        shutil.copyfile(cached, tmp)
    return cached


def store(cache_dir: Path, signature: Mapping[str, Any], output: Path) -> None:
    """Keep ``output`` as the training of ``signature`` (a hard link where possible)."""
    cached = cached_file(cache_dir, signature)
    if cached.exists():
        return
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(output, cached)  # no extra disk space where the file system allows it
    except OSError:
        with atomic_path(cached) as tmp:
            shutil.copyfile(output, tmp)
