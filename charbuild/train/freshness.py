"""Is a raw LoRA still what its inputs and settings would train? (the train tasks' ``uptodate``)"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..signature import describe_difference, read_sidecar
from .job import TrainJob


class Freshness(NamedTuple):
    """``(fresh, reason)``; its truth value is ``fresh`` (safe to use as a doit ``uptodate`` result)."""

    fresh: bool
    reason: str

    def __bool__(self) -> bool:
        return bool(self.fresh)


def sidecar_path(job: TrainJob) -> Path:
    """The signature sidecar beside the raw LoRA: ``raw.safetensors`` -> ``raw.json``."""
    return Path(job.output).with_suffix(".json")


def is_up_to_date(job: TrainJob) -> Freshness:
    """Whether ``job.output`` was trained from the inputs and settings now on disk, and why not.

    Compares the sidecar written at the start of the finished training with the
    current inputs (size+mtime fast path, MD5 otherwise: a touched file is no
    change) and ``signature_extra``.
    """
    if not Path(job.output).is_file():
        return Freshness(False, "not trained yet")
    reason = describe_difference(
        read_sidecar(sidecar_path(job)), list(job.inputs), job.project_root, dict(job.signature_extra)
    )
    return Freshness(reason is None, reason or "up to date")
