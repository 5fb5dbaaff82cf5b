"""Running the doit graph in-process and recording which tasks ran."""

from __future__ import annotations

import io
from pathlib import Path

from doit.reporter import ConsoleReporter

EXECUTED: list[str] = []


class RecordingReporter(ConsoleReporter):
    """Console reporter that also records the name of every task that ran."""

    def execute_task(self, task):
        if task.actions:
            EXECUTED.append(task.name)
        super().execute_task(task)


def build(root: Path, *args: str) -> set[str]:
    """Run ``doit run ARGS`` on ``root``; return the names of the tasks that ran. Fails on errors."""
    from charbuild.dodo import run_doit

    EXECUTED.clear()
    out = io.StringIO()
    code = run_doit(root, ["run", *args], extra_config={"reporter": RecordingReporter, "outfile": out})
    assert code == 0, f"doit exited {code}:\n{out.getvalue()}"
    return {name for name in EXECUTED if not name.startswith("_")}


def groups(names: set[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for n in names:
        g, _, rest = n.partition(":")
        out.setdefault(g, set()).add(rest)
    return out
