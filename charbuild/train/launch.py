"""What the runner hands a launcher, and what a launcher is.

A *launcher* runs one training somewhere (this machine: :func:`charbuild.train.runner.launch_local`;
a Ray cluster: :data:`charbuild.train.executors.RAY`) and is registered by name in the runner.
This module is the seam both sides import, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from ..layout import LOG_NAME
from .job import TrainJob


def log_path(job: TrainJob) -> Path:
    """``<variant_dir>/train.log``: the trainer's whole output of the latest run."""
    variant_dir = job.variant_dir
    return Path(variant_dir) / LOG_NAME


@dataclass(frozen=True)
class Launch:
    """One start of a training, as the runner hands it to a launcher.

    ``job.output`` points into the runner's temp folder and ``job_file`` (in the same
    folder) holds ``job.to_json()``. The launcher must leave the raw LoRA at ``job.output``,
    write everything the trainer prints to ``log`` (bytes), echo it to ``console`` when that
    is not None, and return the trainer's exit status (0: success). On any exception
    (KeyboardInterrupt included) it must stop what it started before re-raising.
    ``pass_fds`` are lock descriptors a local process should inherit (POSIX). ``gpu`` is the
    GPU of this machine the runner leased, None for a launcher with ``local_gpu = False``.
    """

    job: TrainJob
    job_file: Path
    gpu: int | str | None
    log: BinaryIO
    console: Callable[[bytes], None] | None
    pass_fds: tuple[int, ...] = ()


#: What runs a training: the one seam for running it elsewhere (a cluster executor).
#: A launcher may also have the attributes ``local_gpu`` (False: the runner takes no GPU
#: lock of this machine, see :func:`takes_local_gpu`) and ``dry_run_lines(job) -> list[str]``
#: (what :func:`dry_run_commands` adds about where the training would run).
Launcher = Callable[[Launch], int]


def takes_local_gpu(launcher: Launcher) -> bool:
    """Whether the runner leases a GPU of this machine for ``launcher`` (True unless it has
    ``local_gpu = False``: a cluster executor whose scheduler assigns the GPUs)."""
    return bool(getattr(launcher, "local_gpu", True))
