"""Which of a set of loaded doit tasks a build would run, and why: doit's own check, read-only.

The answer of ``charbuild status`` and of the report's state column. It takes doit ``Task``
objects that are already loaded (see :func:`charbuild.dodo.stale_tasks`) and reads the
state database; it never runs anything nor writes the database.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple


class Stale(NamedTuple):
    """A task a build would run: its doit name, why, and its targets (project-relative)."""

    name: str
    reason: str
    targets: tuple[str, ...]


def stale_of(tasks: Mapping[str, object], db_file: Path) -> list[Stale]:
    """Every task of ``tasks`` (doit name -> doit ``Task``) that a build would run, in order."""
    from doit.dependency import Dependency, MD5Checker, SqliteDB

    dep = Dependency(SqliteDB, str(db_file), checker_cls=MD5Checker)
    out = []
    try:
        for task in tasks.values():
            if not task.actions:
                continue
            result = dep.get_status(task, tasks, get_log=True)
            if result.status == "up-to-date":
                continue
            out.append(Stale(task.name, reasons(task, result), tuple(str(t) for t in task.targets)))
    finally:
        dep.close()
    return out


def reasons(task, result) -> str:
    """doit's status ``result`` of ``task`` as one line a user reads."""
    if result.status == "error":
        message = result.get_error_message()
        if "Dependent file" in message and "does not exist" in message:  # doit's words for an input still to build
            return "waits for inputs that are not built yet: " + message.split("'")[1]
        return f"error while checking: {message}"
    r = result.reasons
    added = set(r.get("added_file_dep") or ())
    if r.get("missing_target") and len(r["missing_target"]) == len(task.targets):
        return "not built yet"  # doit also lists every input as changed then: no news
    parts = []
    if r.get("missing_target"):
        parts.append("target missing: " + ", ".join(r["missing_target"]))
    if r.get("has_no_dependencies"):
        parts.append("no dependencies (always runs)")
    if r.get("uptodate_false"):
        for utd, _args, _kw in r["uptodate_false"]:
            parts.append(repr(utd) if hasattr(utd, "reason") else "settings or generated text changed")
    if r.get("checker_changed"):
        parts.append("file checker changed")
    for key, label in (("changed_file_dep", "changed"), ("missing_file_dep", "missing"),
                       ("added_file_dep", "new input"), ("removed_file_dep", "input removed")):
        # doit lists a new input as changed too (it has no saved state): say it once, as new
        files = [f for f in r.get(key) or () if key == "added_file_dep" or f not in added]
        if files:
            parts.append(f"{label}: {files[0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else ""))
    return "; ".join(parts) or "never built"
