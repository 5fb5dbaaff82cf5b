"""The project report: ``build/report/index.html``, a static page that opens from disk.

Modules, one job each:

- :mod:`.source`: the one adapter that reads charbuild's project and graph (swap it when those
  move); it turns them into the plain, JSON-ready *plan* of the report;
- :mod:`.metrics`: the ``metrics.jsonl`` loss-log format the trainers write, and its reader;
- :mod:`.svg`: the loss chart and the block-weight bar, as SVG text (pure);
- :mod:`.render`: the HTML page from collected data (pure);
- :mod:`.build`: the doit action: thumbnails, copies, LoRA inspection, then the page, atomically;
- :mod:`.tasks`: :func:`report_tasks`, the doit task creator;
- :mod:`.summary`: the end-of-run line per LoRA built (a doit reporter).
"""
