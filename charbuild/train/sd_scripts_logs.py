"""``metrics.jsonl`` for a training sd-scripts ran: its TensorBoard losses and the identity of its samples.

sd-scripts logs to TensorBoard only (``--logging_dir``/``--log_prefix``: ``<logs>/<prefix><time>/
network_train/events.out.tfevents.*``), so the report had no loss curve for an sd-scripts
training. After the training, :func:`write_metrics` reads the newest run of the job's prefix
(tags ``loss/current`` and ``lr/unet``, sd-scripts' names) and scores the samples it rendered
(``samples/<step>/<code>.png``, step 0 with ``--sample_at_first``) against the LoRA's training
pictures as the builtin does (:mod:`charbuild.train.scoring`), into ``metrics.jsonl`` beside the
output, which lands with the LoRA (:mod:`charbuild.train.observed`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import write_text_atomic
from ..layout import METRICS_NAME, SAMPLES_DIR
from . import scoring
from .metrics import training_line

LOSS_TAG = "loss/current"
LR_TAG = "lr/unet"


def newest_run(logs: Path, prefix: str) -> Path | None:
    """The newest run folder ``<logs>/<prefix><time>`` (None when there is none)."""
    if not logs.is_dir():
        return None
    runs = [p for p in logs.iterdir() if p.is_dir() and p.name.startswith(prefix)]
    return max(runs, key=lambda p: (p.stat().st_mtime_ns, p.name)) if runs else None


def read_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every TensorBoard event file under ``run`` (steps sorted, the
    last value of a repeated step kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(run.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                out.setdefault(tag, {})[int(e.step)] = float(e.value)
    return {tag: sorted(points.items()) for tag, points in out.items()}


def metrics_lines(scalars: dict[str, list[tuple[int, float]]]) -> list[dict]:
    """The training lines of ``metrics.jsonl`` from sd-scripts' scalars (pure)."""
    lrs = dict(scalars.get(LR_TAG, []))
    return [training_line(step, loss, lrs.get(step)) for step, loss in scalars.get(LOSS_TAG, [])]


def identity_lines(job, folder: Path) -> list[dict]:
    """The identity line of every sample step under ``folder/samples`` (numeric step folders)."""
    refs = scoring.references(job)
    samples = folder / SAMPLES_DIR
    if not refs or not samples.is_dir():
        return []
    lines = []
    for step_dir in sorted((p for p in samples.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        line = scoring.identity_line(int(step_dir.name), scoring.files_by_name(step_dir.rglob("*.png"), step_dir), refs)
        if line is not None:
            lines.append(line)
    return lines


def write_metrics(job, logs: Path, prefix: str) -> Path | None:
    """Write ``metrics.jsonl`` beside ``job.output`` from the newest run's losses and the samples'
    identity; its path, or None when there was nothing to write."""
    folder = Path(job.output).parent
    run = newest_run(logs, prefix)
    lines = metrics_lines(read_scalars(run)) if run is not None else []
    lines += identity_lines(job, folder)
    if not lines:
        return None
    target = folder / METRICS_NAME
    write_text_atomic(target, "".join(json.dumps(line) + "\n" for line in lines))
    return target
