"""The loss log a trainer writes beside its TensorBoard logs: ``<variant_dir>/metrics.jsonl``.

Format (UTF-8, one JSON object per line, appended as training goes; blank lines are ignored):

- a training line: ``{"step": 120, "loss": 0.0831, "lr": 0.0001}`` — ``step`` a non-negative
  integer, ``loss`` a finite number, ``lr`` optional (a number);
- a validation line: ``{"step": 200, "val_loss": 0.0912}``;
- an identity line (a sample step, :mod:`charbuild.train.scoring`):
  ``{"step": 0, "identity": {"kuroneko/face": 0.41}, "identity_codes": {...}}`` — the mean
  distance of the samples to the training pictures, per member (lower is closer);
- a trigger line: ``{"step": 40, "trigger": 0.05}``;
- any other keys are allowed and ignored (a trainer may add ``"epoch"``, ``"time"``, …).

A line may hold both ``loss`` and ``val_loss``. Steps need not be sorted; a step logged twice
(a resumed run) keeps its last value. The reader is strict: a line that is not such an object
raises a :class:`~charbuild.errors.CharbuildError` naming the file and line, so a corrupt log is
reported rather than drawn wrong — except a truncated *last* line, which a running or killed
trainer leaves behind and which is skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from charbuild.errors import CharbuildError
from charbuild.layout import METRICS_NAME



@dataclass
class LossLog:
    """The curves of one training: (step, value) pairs sorted by step."""

    loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    #: member -> (step, mean identity distance) and member -> step -> code -> distance
    identity: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    identity_codes: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    trigger: list[tuple[int, float]] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not self.loss and not self.val_loss and not self.identity

    def identity_change(self, member: str) -> tuple[float, float] | None:
        """(first, last) identity distance of ``member`` (step 0 -> the last sample step), or None."""
        points = self.identity.get(member) or []
        return (points[0][1], points[-1][1]) if len(points) >= 2 else None


def _number(obj: dict, key: str, where: str) -> float | None:
    if key not in obj or obj[key] is None:
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: {key!r} must be a finite number, not {v!r}")
    return float(v)


def parse_metrics(text: str, path: str | Path = METRICS_NAME) -> LossLog:
    """Parse the text of a ``metrics.jsonl`` file (see the module docstring for the format)."""
    curves: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}, "lr": {}}
    identity: dict[str, dict[int, float]] = {}
    identity_codes: dict[str, dict[int, dict[str, float]]] = {}
    trigger: dict[int, float] = {}
    lines = text.split("\n")
    last_index = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except ValueError:
                if i == last_index and not text.endswith("\n"):
                    break  # a line the trainer is still writing (or was killed while writing)
                raise ValueError("not a JSON object") from None
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            step = obj.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"'step' must be a non-negative integer, not {step!r}")
            values = {k: _number(obj, k, "") for k in curves}
            scores = _scores(obj)
            if values["loss"] is None and values["val_loss"] is None and not scores:
                raise ValueError("needs 'loss' or 'val_loss'")
        except ValueError as exc:
            message = str(exc).lstrip(": ")
            raise CharbuildError(
                f"bad loss log line ({message}); expected {{\"step\": N, \"loss\": X}} or {{\"step\": N, \"val_loss\": X}}",
                path=path, line=i + 1,
            ) from None
        for k, v in values.items():
            if v is not None:
                curves[k][step] = v
        for member, v in scores.get("identity", {}).items():
            identity.setdefault(member, {})[step] = v
        for member, codes in scores.get("identity_codes", {}).items():
            identity_codes.setdefault(member, {})[step] = codes
        if "trigger" in scores:
            trigger[step] = scores["trigger"]
    log = LossLog(*(sorted(curves[k].items()) for k in ("loss", "val_loss", "lr")))
    log.identity = {m: sorted(points.items()) for m, points in sorted(identity.items())}
    log.identity_codes = identity_codes
    log.trigger = sorted(trigger.items())
    return log


def _scores(obj: dict) -> dict:
    """The identity and trigger values of a metrics line (checked: finite numbers by name)."""
    out: dict = {}
    if "identity" in obj:
        ident = obj["identity"]
        if not isinstance(ident, dict) or not all(isinstance(k, str) for k in ident):
            raise ValueError("'identity' must be an object of member: distance")
        out["identity"] = {m: _number(ident, m, "identity") for m in ident if ident[m] is not None}
        codes = obj.get("identity_codes", {})
        if isinstance(codes, dict):
            out["identity_codes"] = {m: {str(c): float(v) for c, v in d.items() if isinstance(v, (int, float))}
                                     for m, d in codes.items() if isinstance(d, dict)}
    if obj.get("trigger") is not None:
        out["trigger"] = _number(obj, "trigger", "")
    return out


def read_metrics(path: str | Path) -> LossLog | None:
    """The loss log at ``path``, or None when the file does not exist."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CharbuildError(f"cannot read the loss log ({exc})", path=path) from None
    return parse_metrics(text, path)
