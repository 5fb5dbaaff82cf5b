"""One line per LoRA a doit run built, printed when the run ends (issue 13 item 5, summary);
no line per up-to-date task, and ``nothing to do`` when a run ran nothing.

``SummaryReporter`` is doit's console reporter plus that summary; ``DOIT_CONFIG["reporter"]``
names it, so a plain ``doit``, ``charbuild build`` and ``charbuild train`` all print, e.g.::

    built 2 LoRA(s):
      build/loras/krnk/Lora3x3A50p-AdamW8/krnk-Lora3x3A50p-AdamW8.safetensors  35.1 MB  rank 32  trigger words: krnk  identity 0.412 → 0.153 (-63 %)

A LoRA counts as built when its ``compress:`` task (the deliverable file) ran successfully in
this run. The line reads the file itself (:func:`charbuild.lora.inspect.inspect_lora`) and,
when the training rendered samples, the identity distance at step 0 (the base model) and at the
last sample step from the ``metrics.jsonl`` beside it (per member for a group LoRA; lower is
closer to the character's own pictures, :mod:`charbuild.identity`).
"""

from __future__ import annotations

from pathlib import Path

from doit.reporter import ConsoleReporter

from charbuild.layout import METRICS_NAME

DELIVERABLE_GROUP = "compress"


def identity_text(metrics_file: Path) -> str:
    """``identity 0.412 → 0.153 (-63 %)`` (per member of a group), or "" without identity lines."""
    from charbuild.errors import CharbuildError
    from charbuild.report.metrics import read_metrics

    try:
        log = read_metrics(metrics_file)
    except CharbuildError:
        return ""
    parts = []
    for member in (log.identity if log else {}):
        change = log.identity_change(member)
        if change is None:
            continue
        before, after = change
        drop = (before - after) / before * 100 if before else 0.0
        name = f"{member} " if len(log.identity) > 1 else ""
        parts.append(f"{name}{before:.3f} → {after:.3f} ({-drop:+.0f} %)")
    return ("  identity " + ", ".join(parts)) if parts else ""


def summary_line(info: dict, shown_path: str) -> str:
    """The summary line of one LoRA from its :func:`inspect_lora` dict."""
    ranks = sorted({int(r) for r in info["ranks"]})
    rank = "rank " + ("/".join(map(str, ranks)) if ranks else "—")
    size = info["file_size"]
    size_text = f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"
    words = ", ".join(info["trigger_words"]) or "none"
    return f"  {shown_path}  {size_text}  {rank}  trigger words: {words}"


def summary_lines(paths: list[str]) -> list[str]:
    """The summary of the LoRA files ``paths`` (a file that cannot be read says why)."""
    from charbuild.errors import CharbuildError
    from charbuild.lora.inspect import inspect_lora

    lines = [f"built {len(paths)} LoRA(s):"]
    for p in paths:
        try:
            lines.append(summary_line(inspect_lora(p), p) + identity_text(Path(p).parent / METRICS_NAME))
        except (CharbuildError, OSError, ValueError) as exc:
            lines.append(f"  {p}  (cannot read it: {exc})")
    return lines


#: Task groups whose action prints its own line (``charbuild: picture k/N: …``, images.py):
#: doit's ``.  image:…`` title would say the same again.
SELF_REPORTING_GROUPS = ("image",)


class SummaryReporter(ConsoleReporter):
    """doit's console reporter, less its noise, plus one line per LoRA built in the run when it ends.

    Up-to-date tasks print nothing (doit prints a ``--`` line each: hundreds on a no-op build);
    a run that ran nothing says so in one line (plus ``nothing_to_do_hint``).
    """

    #: What to add to "nothing to do" (``charbuild train`` names ``--force``).
    nothing_to_do_hint = ""

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.built: list[str] = []
        self.executed = 0
        self.up_to_date = 0

    def execute_task(self, task):
        if task.actions:
            self.executed += 1
        if task.name.split(":", 1)[0] not in SELF_REPORTING_GROUPS:
            super().execute_task(task)

    def skip_uptodate(self, task):
        self.up_to_date += 1

    def add_success(self, task):
        super().add_success(task)
        if task.name.startswith(DELIVERABLE_GROUP + ":") and task.targets:
            self.built.append(Path(task.targets[0]).as_posix())

    def complete_run(self):
        super().complete_run()
        if not self.executed and not self.failures and not self.runtime_errors:
            self.write(f"nothing to do: everything is up to date ({self.up_to_date} task(s) checked)"
                       f"{self.nothing_to_do_hint}\n")
        if self.built:
            self.write("\n".join(summary_lines(self.built)) + "\n")


class TrainSummaryReporter(SummaryReporter):
    """:class:`SummaryReporter` for ``charbuild train``: an up-to-date LoRA is trained again with ``--force``."""

    nothing_to_do_hint = "; `charbuild train --force LORA` trains a LoRA again"
