"""``charbuild status``: which targets are out of date, and why (doit's own check, read-only)."""

from __future__ import annotations

from pathlib import Path

from .dodo import stale_tasks as _stale


def stale_tasks(root: Path) -> list[tuple[str, str]]:
    """(task name, reason) for every task that a build would run, in doit's order."""
    return [(s.name, s.reason) for s in _stale(root)]
