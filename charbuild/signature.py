"""Input signatures for expensive targets (trained LoRAs).

doit records a task's dependencies only when the task *finishes*, and loses the
whole run's records on SIGTERM/SIGKILL. A training that runs for an hour must
not be marked fresh for inputs edited while it ran, and must not be retrained
because a database record was lost. So the train action computes a signature of
its inputs when it *starts* and stores it in a sidecar beside the LoRA; an
``uptodate`` check compares the sidecar with the inputs on disk.

A signature maps each input file to (size, mtime_ns, md5) plus an ``extra``
dict (training parameters, model signature, dataset semantics). Checking is
cheap: a file whose size and mtime match the sidecar is not re-hashed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from .fsutil import read_json, rel_posix, under_root, write_text_atomic

SIDECAR_VERSION = 1


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """MD5 hex digest of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """A stable JSON spelling of ``value`` (sorted keys, no spaces) for hashing and comparing."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compute_signature(files: Iterable[str | Path], root: str | Path, extra: dict, known: dict | None = None) -> dict:
    """Signature of ``files`` (keyed by path relative to ``root``) and ``extra``.

    ``known``: a signature computed moments ago; a file whose size and mtime are unchanged
    since keeps its MD5 from there instead of being read again.
    """
    root = Path(root)
    known_files = (known or {}).get("files", {})
    entries = {}
    for f in sorted(Path(p) for p in files):
        st = f.stat()
        key = rel_posix(f, root)
        old = known_files.get(key)
        same = old is not None and old[:2] == [st.st_size, st.st_mtime_ns]
        entries[key] = [st.st_size, st.st_mtime_ns, old[2] if same else file_md5(f)]
    return {"version": SIDECAR_VERSION, "files": entries, "extra": json.loads(canonical_json(extra))}


def write_sidecar(path: str | Path, signature: dict) -> None:
    """Write a signature sidecar atomically."""
    write_text_atomic(path, json.dumps(signature, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


def read_sidecar(path: str | Path) -> dict | None:
    """The sidecar's signature, or None when it is missing or unreadable."""
    return read_json(path)


def describe_difference(saved: dict | None, files: Iterable[str | Path], root: str | Path, extra: dict) -> str | None:
    """Why ``saved`` does not match the current inputs, or None when it does.

    Files whose (size, mtime) match are trusted without hashing; others are
    compared by MD5, so a touched but identical file is not a change.
    """
    if saved is None:
        return "no signature of a finished training"
    if saved.get("version") != SIDECAR_VERSION:
        return "signature format changed"
    root = Path(root)
    current = json.loads(canonical_json(extra))
    old_extra = saved.get("extra", {})
    if old_extra != current:
        changed = sorted(k for k in set(old_extra) | set(current) if old_extra.get(k) != current.get(k))
        return "settings changed: " + ", ".join(changed)
    old_files = saved.get("files", {})
    keys = {}
    for f in files:
        keys[rel_posix(f, root)] = Path(f)
    added = sorted(set(keys) - set(old_files))
    removed = sorted(set(old_files) - set(keys))
    if added or removed:
        parts = []
        if added:
            parts.append(f"{len(added)} input(s) added (e.g. {added[0]})")
        if removed:
            parts.append(f"{len(removed)} input(s) removed (e.g. {removed[0]})")
        return "; ".join(parts)
    for key, path in sorted(keys.items()):
        size, mtime_ns, md5 = old_files[key]
        try:
            st = path.stat()
        except OSError:
            return f"input missing: {key}"
        if st.st_size == size and st.st_mtime_ns == mtime_ns:
            continue
        if st.st_size != size or file_md5(path) != md5:
            return f"input changed: {key}"
    return None


def model_signature(value: str | None, root: str | Path, cache_dir: str | Path) -> dict | None:
    """A base model's identity for training signatures, hashed once and cached.

    ``"tiny"`` is its own identity. A file (or every file of a diffusers folder)
    is hashed with MD5 once; the hash is cached by (path, size, mtime) in
    ``cache_dir/model-hashes.json``, so multi-GB checkpoints are not re-read on
    every build.
    """
    if value is None:
        return None
    if value == "tiny":
        return {"tiny": True}
    from .base_arch import DEMO_BASE, tiny_base_arch

    if value == DEMO_BASE:  # the shipped weights' SHA-256 (from its manifest: nothing to hash here)
        from .train.builtin.demo import demo_identity

        return {"demo": demo_identity()}

    if tiny_base_arch(value):  # tiny:N, tiny-sdxl[:N]: generated from the name, nothing to hash
        return {"tiny": value}
    root = Path(root)
    path = under_root(root, value)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    cache_file = Path(cache_dir) / "model-hashes.json"
    cache = read_sidecar(cache_file) or {}
    changed = False
    digest = hashlib.md5()
    for f in files:
        st = f.stat()
        key = str(f.resolve())
        entry = cache.get(key)
        if not entry or entry[0] != st.st_size or entry[1] != st.st_mtime_ns:
            entry = [st.st_size, st.st_mtime_ns, file_md5(f)]
            cache[key] = entry
            changed = True
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        digest.update(f"{rel}\0{entry[2]}\0".encode())
    if changed:
        write_sidecar(cache_file, cache)
    return {"md5": digest.hexdigest()}
