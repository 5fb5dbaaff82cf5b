"""Filesystem helpers: atomic writes and project-relative POSIX paths."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import OutputError

# Windows refuses to replace a file another program holds open; virus scanners and indexers
# hold new files for a moment, so a few retries ride that out before it is reported.
REPLACE_RETRIES = (0.05, 0.1, 0.2, 0.4, 0.8)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}

# mkstemp creates files readable by the owner only; artifacts get the usual mode.
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(target: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it into place on success.

    An interrupted or failed write leaves no half-written ``target`` behind, so
    doit (which checks targets for existence only) never takes it as built. ``mode``: the
    file's permissions (default: the usual ones under the umask; ``0o600`` keeps a secret
    this user's from its first byte on).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    except OSError as exc:
        raise OutputError(f"cannot create a file in this folder ({exc.strerror or exc}); check its permissions and free space", target.parent) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(OSError):
            os.chmod(tmp_path, _FILE_MODE if mode is None else mode)
        replace_file(tmp_path, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise OutputError("the disk is full: free some space, then build again (nothing was replaced)", target) from None
        raise


def replace_file(src: str | Path, target: str | Path) -> None:
    """``os.replace``, retried briefly on Windows sharing errors, then an OutputError naming ``target``."""
    for delay in (*REPLACE_RETRIES, None):
        try:
            os.replace(src, target)
            return
        except PermissionError as exc:
            if delay is None:
                raise OutputError(
                    f"cannot replace this file ({exc.strerror or exc}): another program may hold it open "
                    "(a WebUI that loaded the LoRA, an image viewer) or it is read-only; close it there, "
                    "then build again",
                    target,
                ) from None
            time.sleep(delay)


def write_bytes_atomic(target: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``target`` atomically (``mode``: see :func:`atomic_path`)."""
    with atomic_path(target, mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | Path, text: str, mode: int | None = None) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically, with ``\\n`` line ends on every OS."""
    write_bytes_atomic(target, text.encode("utf-8"), mode)


def read_json(path: str | Path):
    """The JSON value in a file, or None when the file is missing or unreadable (not JSON)."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def under_root(root: str | Path, value: str | Path) -> Path:
    """A path the user wrote (``~`` expanded): absolute as given, else relative to the project ``root``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(root) / path


def rel_posix(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` as a POSIX string: the one spelling of a path doit sees."""
    return Path(os.path.relpath(Path(path), Path(root))).as_posix()
