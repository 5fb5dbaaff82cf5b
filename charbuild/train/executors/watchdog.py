"""Orphan guard on a worker: ``python -m charbuild.train.executors.watchdog WORKER_PID PGID GRACE [DIR]``.

A Ray worker that is killed (``ray.cancel(force=True)``, the node's OOM killer, a
crash) cannot stop the trainer it started in its own process group, and a trainer
that prints nothing for a while would keep its GPU busy. This small process, started
beside the trainer in a session of its own, waits until either the trainer's group
is gone (normal end: it exits) or the worker is gone (it stops the group: SIGTERM,
GRACE seconds, SIGKILL) and deletes the worker's temporary project copy DIR. POSIX only.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

POLL = 0.25


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def guard(worker_pid: int, pgid: int, grace: float, leftover: str | None = None) -> int:
    """Watch until the group ends (0) or the worker dies and the group is stopped (1)."""
    stopped = _watch(worker_pid, pgid, grace)
    if leftover and _worker_gone(worker_pid, settle=POLL):  # a living worker cleans up after itself
        shutil.rmtree(leftover, ignore_errors=True)
    return int(stopped)


def _worker_gone(worker_pid: int, settle: float = 0.0) -> bool:
    time.sleep(settle)  # a worker that has just reaped the trainer may still be cleaning up
    return not _alive(worker_pid) or os.getppid() != worker_pid


def _watch(worker_pid: int, pgid: int, grace: float) -> bool:
    while _group_alive(pgid):
        if _worker_gone(worker_pid):
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
                try:
                    os.killpg(pgid, sig)
                except (ProcessLookupError, PermissionError):
                    return True
                deadline = time.monotonic() + wait
                while time.monotonic() < deadline and _group_alive(pgid):
                    time.sleep(0.05)
            return True
        time.sleep(POLL)
    return False


def main(argv: list[str] | None = None) -> int:
    """Entry point (see the module doc)."""
    argv = sys.argv[1:] if argv is None else argv
    worker_pid, pgid, grace = int(argv[0]), int(argv[1]), float(argv[2])
    return guard(worker_pid, pgid, grace, argv[3] if len(argv) > 3 else None)


if __name__ == "__main__":
    sys.exit(main())
