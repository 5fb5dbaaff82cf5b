"""One build at a time per project, and builds that keep their work when stopped.

doit's sqlite3 state is written once, at the end of a run; a second writer
finishing meanwhile fails with "database is locked", and SIGTERM (an editor's
"stop build", a CI timeout) would lose every success of the run. So a build
takes an OS file lock (released by the kernel when the process dies: no stale
lock files to remove) and turns SIGTERM into KeyboardInterrupt, which doit
handles by recording the tasks that finished.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from .errors import CharbuildError


class BuildLocked(CharbuildError):
    exit_code = 3


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


STOPPED = "charbuild: stopped; the tasks that finished are recorded (run the build again to go on)"


def _quiet_interrupt_hook(previous):
    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            print(STOPPED, file=sys.stderr)  # Python still exits as interrupted (status 130 / SIGINT)
        else:
            previous(kind, value, tb)

    return hook


def install_quiet_interrupts() -> None:
    """A plain ``doit`` stopped by Ctrl-C or SIGTERM says :data:`STOPPED` instead of printing
    the traceback of the ``KeyboardInterrupt`` that doit lets through (``charbuild`` commands
    catch it themselves); every other uncaught exception keeps its traceback."""
    if getattr(sys.excepthook, "charbuild_quiet", False):
        return
    hook = _quiet_interrupt_hook(sys.excepthook)
    hook.charbuild_quiet = True
    sys.excepthook = hook


def install_sigterm_handler() -> None:
    """Make SIGTERM behave like Ctrl-C (main thread only; a no-op elsewhere)."""
    with contextlib.suppress(ValueError, AttributeError):
        signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def build_lock(build_dir: str | Path) -> Iterator[None]:
    """Hold the project's build lock; fail at once with a clear message when it is taken."""
    lock_dir = Path(build_dir) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / "build.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise BuildLocked(
            f"another build of this project is running ({lock_dir.parent.name}/{lock_dir.name}/build.lock is held); "
            "wait for it to finish or stop it first", path=lock_dir / "build.lock") from None
    try:
        (lock_dir / "build.pid").write_text(str(os.getpid()), encoding="utf-8")
        yield
    finally:
        lock.release()
