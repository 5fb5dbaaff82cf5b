"""The doit task of the report: ``build/report/index.html``.

Depends on exactly what the page shows:

- ``file_dep``: every source picture (the thumbnails);
- ``uptodate``: :class:`~charbuild.report.build.ReportUpToDate`: the plan (template grids,
  dataset tables, merge weights, trigger words, settings) and the size/mtime of the preview
  sheets, LoRA files, loss logs and samples it shows;
- ``task_dep``: every LoRA's dataset, preview and compress tasks, so that ``doit`` (also with
  ``-n N``) writes the page last, with this run's LoRAs on it, and a second ``doit`` leaves it
  alone.

``doit report`` therefore brings every LoRA up to date first (trainings included).
``charbuild report`` runs ``doit preview`` and then ``doit --single report`` (doit's option that
ignores ``task_dep``): the page of the project as it is, with what is not built marked, and
nothing trained.
"""

from __future__ import annotations

import time
from typing import Iterator

from .build import REPORT_DIR, ReportUpToDate, build_report_action
from .source import lora_task_names, report_plan, source_pictures

REPORT_DOC = "the project report page build/report/index.html (open it from disk)"


def report_tasks(graph, stale_check=None) -> Iterator[dict]:
    """Yield the report's doit task dict for the task ``graph`` of a project.

    ``stale_check(root)`` (a module-level function, so that ``doit -n N`` can pickle it) lists
    the project's stale tasks for the page's state column; the composition root
    (:mod:`charbuild.dodo`) passes its own, so this package never imports doit's loading.
    """
    plan = report_plan(graph)
    root = str(graph.project.root)
    yield {
        "basename": "report",
        "doc": REPORT_DOC,
        "actions": [(build_report_action, [plan, root, time.time_ns(), stale_check])],
        "file_dep": source_pictures(plan),
        "task_dep": lora_task_names(graph),
        "targets": [f"{REPORT_DIR}/index.html"],
        "uptodate": [ReportUpToDate(plan, root)],
        "clean": True,
    }
