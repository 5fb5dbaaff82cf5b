"""The trainer side of ``metrics.jsonl``: one JSON line per training step and per validation.

The format is the report's (:mod:`charbuild.report.metrics`): ``{"step", "loss", "lr"?}`` and
``{"step", "val_loss"}``; on a GPU the builtin adds ``peak_allocated_mib`` and
``peak_reserved_mib`` (the peak GPU memory so far) to each training line. A trainer writes the file beside its output, which the runner points
into its temp folder, so the log lands in the variant folder together with the LoRA it
describes (:func:`charbuild.train.observed.land`) and a stopped training leaves none.
Each line is one ``O_APPEND`` write: a reader of a running log sees whole lines only (a line
being written is the one exception the report's reader skips).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..layout import METRICS_NAME


def metrics_path(folder: str | Path) -> Path:
    """``<folder>/metrics.jsonl``."""
    return Path(folder) / METRICS_NAME


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def training_line(step: int, loss: float, lr: float | None = None) -> dict:
    """The record of one training step (``lr``: the UNet's learning rate, when known)."""
    rec = {"step": int(step), "loss": _finite(loss)}
    if lr is not None and _finite(lr) is not None:
        rec["lr"] = float(lr)
    return rec


def validation_line(step: int, val_loss: float) -> dict:
    """The record of one validation."""
    return {"step": int(step), "val_loss": _finite(val_loss)}


class MetricsWriter:
    """Appends records to ``<folder>/metrics.jsonl``, which it starts empty."""

    def __init__(self, folder: str | Path):
        self.path = metrics_path(folder)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_BINARY", 0),
                           0o644)

    def write(self, record: dict) -> None:
        """Append one record (a line is skipped when its value is not a finite number)."""
        if any(record.get(k, 0) is None for k in ("loss", "val_loss")):
            return
        os.write(self._fd, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))

    def step(self, step: int, loss: float, lr: float | None = None, extra: dict | None = None) -> None:
        """A training line; ``extra``: more keys for it (the builtin's peak GPU memory in MiB)."""
        self.write({**(extra or {}), **training_line(step, loss, lr)})

    def validation(self, step: int, val_loss: float) -> None:
        self.write(validation_line(step, val_loss))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
