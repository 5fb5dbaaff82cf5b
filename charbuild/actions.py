"""The actions of the doit tasks: module-level functions with plain arguments (so ``doit -n N``
can pickle every task under any start method), and the train tasks' ``uptodate`` check.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import doit_action

@doit_action
def write_text_action(target: str, text: str) -> bool:
    """Write a text artifact atomically (UTF-8, ``\\n`` line ends)."""
    from .fsutil import write_text_atomic

    write_text_atomic(target, text)
    return True


def train_action(job):
    """Train one LoRA variant, a :class:`~charbuild.train.job.TrainJob` (imports the training
    machinery only when a training runs)."""
    from .train.runner import train_action as run

    return run(job)


@doit_action
def merge_action(src: str, dst: str, weights: dict, keywords: list[str], note: str, output_name: str | None = None):
    """Block-weight merge of a raw LoRA into ``dst``, named ``output_name`` inside (the
    deliverable's stem: a raw file trained before names were unique gets its name here)."""
    from .lora.merge import merge_file

    merge_file(src, dst, weights, keywords=keywords, note=note, output_name=output_name)
    return True


@doit_action
def compress_action(src: str, dst: str, settings: dict):
    """SVD rank reduction of a merged LoRA into ``dst`` (the deliverable file)."""
    from .lora.compress import compress_file

    method = settings["method"]
    param = None if method == "rank" else settings[method]
    report = compress_file(src, dst, method=None if method == "rank" else method, param=param,
                           new_rank=settings["new_rank"], new_conv_rank=settings.get("new_conv_rank"),
                           save_precision=settings["save_precision"])  # fmt: skip
    return {"report": _json_safe(report)}


def prune_action(images_dir: str, expected: list[str]) -> bool:
    """Delete prepared pictures and captions whose source is gone (only under ``images_dir``)."""
    keep = set(expected)
    root = Path(images_dir)
    if not root.is_dir():
        return True
    removed = 0
    for path in sorted(root.rglob("*"), reverse=True):
        rel = path.as_posix()
        if path.is_file() and rel not in keep and path.suffix in (".png", ".txt", ".json"):
            path.unlink()
            removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if removed:
        print(f"removed {removed} prepared file(s) whose source picture is gone")
    return True


def _json_safe(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=str))


class TrainUpToDate:
    """doit ``uptodate`` check of a training: compares the signature sidecar with the inputs.

    Its ``repr`` is what ``doit info`` / ``charbuild status`` print as the reason.
    """

    def __init__(self, job):
        self.job = job
        self.reason: str | None = None

    def __call__(self, task, values) -> bool:
        from .train.runner import is_up_to_date

        ok, reason = is_up_to_date(self.job)
        self.reason = reason
        return ok

    def __repr__(self) -> str:
        return f"training: {self.reason or 'inputs and settings unchanged'}"
