"""The doit task of the report: ``build/report/index.html``.

Depends on exactly what the page shows:

- ``file_dep``: every source picture (thumbnails) and every LoRA's preview sheet (a target of
  ``preview:<lora>``, so doit brings the sheets up to date first — they are cheap);
- ``uptodate``: :class:`~charbuild.report.build.ReportUpToDate`, the plan (dataset tables,
  merge weights, trigger words, settings, template grids) and the size/mtime of the LoRA files,
  loss logs and samples it shows. A training's output is deliberately *not* a ``file_dep``:
  that would make ``doit report`` train every LoRA first.

So ``doit report`` is cheap at any point of a project and the page says what is not built.
"""

from __future__ import annotations

import time
from typing import Iterator

from .build import REPORT_DIR, ReportUpToDate, build_report_action
from .source import report_plan, source_pictures

REPORT_DOC = "the project report page build/report/index.html (open it from disk)"


def report_tasks(project, graph) -> Iterator[dict]:
    """Yield the report's doit task dict for ``project`` and its task ``graph``."""
    plan = report_plan(graph)
    root = str(project.root)
    yield {
        "basename": "report",
        "doc": REPORT_DOC,
        "actions": [(build_report_action, [plan, root, time.time_ns()])],
        "file_dep": source_pictures(plan) + [lora["preview"] for lora in plan["loras"]],
        "targets": [f"{REPORT_DIR}/index.html"],
        "uptodate": [ReportUpToDate(plan, root)],
        "clean": True,
    }
