"""``charbuild report``: the page of the project as it is, or after a full build."""

from __future__ import annotations

from pathlib import Path

import click

from .build import REPORT_DIR


def report_command(root: Path, *, build_all: bool = False) -> int:
    """Write ``build/report/index.html`` of the project at ``root``; return doit's exit code.

    Without ``build_all``: ``doit preview`` (the cheap preview sheets), then ``doit --single
    report``, which ignores the report's ``task_dep`` on the LoRA tasks: nothing is trained and
    the page marks what is not built. With it: ``doit report``, which builds every LoRA first.
    """
    from charbuild.dodo import run_doit

    if build_all:
        code = run_doit(root, ["run", "report"])
    else:
        code = run_doit(root, ["run", "preview"])
        if code == 0:
            code = run_doit(root, ["run", "--single", "report"])
    page = root / REPORT_DIR / "index.html"
    if code == 0:
        click.echo(f"report: {page.as_uri()}")
    return code
