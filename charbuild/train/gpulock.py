"""One training per GPU, across processes: an OS file lock per GPU.

doit's ``-n N`` knows nothing about GPUs, so the lock lives inside the train
action. Each GPU id has ``<lock_dir>/gpu-<id>.lock``, held with
:class:`filelock.FileLock` (``flock`` on POSIX, ``msvcrt.locking`` on Windows):
the kernel drops it when its holders die, so there is never a stale lock to clear.

The runner passes the lock's descriptor to the trainer process (POSIX), so a
trainer orphaned by a SIGKILLed runner keeps its GPU locked until it exits.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from filelock import FileLock, Timeout

from .hardware import is_cpu_slot


@dataclass(frozen=True)
class GpuLease:
    """A held GPU: its id and the lock's OS file descriptor (None where unknown)."""

    gpu: int | str
    lock_fd: int | None
    lock_path: Path


def lock_fd(lock: FileLock) -> int | None:
    """The OS descriptor of a held FileLock, or None (filelock keeps it in private state)."""
    for owner in (getattr(lock, "_context", None), lock):
        fd = getattr(owner, "lock_file_fd", None)
        if fd is None:
            fd = getattr(owner, "_lock_file_fd", None)
        if isinstance(fd, int):
            return fd
    return None


def wait_message(gpus: Sequence[int | str]) -> str:
    """The one line printed while every GPU is busy."""
    ids = ", ".join(str(g) for g in gpus)
    if all(is_cpu_slot(g) for g in gpus):
        return (f"charbuild: waiting for a free CPU slot (no GPU found; [trainer] cpu_trainings = {len(gpus)}, "
                f"all busy with other trainings)")
    return f"charbuild: waiting for a free GPU (all of {ids} busy with other trainings)"


@contextlib.contextmanager
def gpu_lease(
    lock_dir: str | Path,
    gpus: Sequence[int | str],
    *,
    poll: float = 1.0,
    on_wait: Callable[[str], object] | None = print,
) -> Iterator[GpuLease]:
    """Hold the first free GPU of ``gpus`` (in order); wait, polling every ``poll`` s, while all are busy.

    ``on_wait`` is called once with a message when the first try finds all GPUs busy.
    Yields a :class:`GpuLease`; the lock is released on exit (and by the kernel if
    the process dies).
    """
    gpus = list(gpus)
    if not gpus:
        raise ValueError("no GPUs to train on: trainer.gpus is empty")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    announced = False
    held: tuple[int | str, FileLock] | None = None
    while held is None:
        for gpu in gpus:
            lock = FileLock(lock_dir / f"gpu-{gpu}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            held = (gpu, lock)
            break
        else:
            if not announced and on_wait is not None:
                on_wait(wait_message(gpus))
                announced = True
            time.sleep(poll)
    gpu, lock = held
    try:
        yield GpuLease(gpu, lock_fd(lock), Path(lock.lock_file))
    finally:
        lock.release()


@contextlib.contextmanager
def acquire_gpu(
    lock_dir: str | Path,
    gpus: Sequence[int | str],
    *,
    poll: float = 1.0,
    on_wait: Callable[[str], object] | None = print,
) -> Iterator[int | str]:
    """Context manager yielding the id of the first free GPU of ``gpus``, locked for this process.

    Prints (``on_wait``) one message while all are busy, and waits. See :func:`gpu_lease`.
    """
    with gpu_lease(lock_dir, gpus, poll=poll, on_wait=on_wait) as lease:
        yield lease.gpu
