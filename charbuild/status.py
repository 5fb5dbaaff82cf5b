"""Which targets are out of date, and why: doit's own status check, read-only."""

from __future__ import annotations

import os
from pathlib import Path


def stale_tasks(root: Path) -> list[tuple[str, str]]:
    """(task name, reason) for every task that a build would run, in doit's order."""
    from doit.control import TaskControl
    from doit.dependency import Dependency, SqliteDB, MD5Checker

    from . import dodo

    old = Path.cwd()
    os.chdir(root)
    try:
        dodo.forget_loaded_projects()
        namespace = {name: getattr(dodo, name) for name in dodo.__all__}
        from doit.loader import load_doit_config, load_tasks

        config = load_doit_config(namespace)
        tasks = load_tasks(namespace, allow_delayed=False, args=[], config=config)
        control = TaskControl(tasks)
        db_file = root / config["dep_file"]
        dep = Dependency(SqliteDB, str(db_file), checker_cls=MD5Checker)
        out = []
        try:
            for task in control.tasks.values():
                if task.actions is None or not task.actions:
                    continue
                result = dep.get_status(task, control.tasks, get_log=True)
                if result.status == "up-to-date":
                    continue
                out.append((task.name, _reasons(task, result)))
        finally:
            dep.close()
        return out
    finally:
        os.chdir(old)


def _reasons(task, result) -> str:
    if result.status == "error":
        message = result.get_error_message()
        if "Dependent file" in message and "does not exist" in message:  # doit's words for an input still to build
            return "waits for inputs that are not built yet: " + message.split("'")[1]
        return f"error while checking: {message}"
    r = result.reasons
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
    added = set(r.get("added_file_dep") or ())
    for key, label in (("changed_file_dep", "changed"), ("missing_file_dep", "missing"),
                       ("added_file_dep", "new input"), ("removed_file_dep", "input removed")):
        # doit lists a new input as changed too (it has no saved state): say it once, as new
        files = [f for f in r.get(key) or () if key == "added_file_dep" or f not in added]
        if files:
            parts.append(f"{label}: {files[0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else ""))
    return "; ".join(parts) or "never built"
