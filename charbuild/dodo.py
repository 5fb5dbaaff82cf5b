"""The doit entry point of a charbuild project.

A project's ``dodo.py`` is one line, ``from charbuild.dodo import *``; doit runs
it with the project folder as working directory. ``charbuild build`` uses the
same task creators through :func:`run_doit`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from .errors import CharbuildError
from .layout import DOIT_DB, Layout
from .report.summary import SummaryReporter
from .tasks import GROUP_DOCS

__all__ = ["DOIT_CONFIG", "task_mask", "task_image", "task_caption", "task_dataset", "task_preview", "task_train",
           "task_merge", "task_compress", "task_report", "task__prune", "task__aliases"]

DOIT_CONFIG = {
    "backend": "sqlite3",
    "dep_file": DOIT_DB,
    "check_file_uptodate": "md5",
    "verbosity": 1,
    "action_string_formatting": "new",
    "reporter": SummaryReporter,  # doit's console output plus one line per LoRA built (report/summary.py)
}

# doit commands that only read state: they must not take the build lock.
READ_ONLY_COMMANDS = {"list", "info", "help", "dumpdb", "tabcompletion", "strace"}
_graphs: dict[Path, object] = {}


def graph(root: Path | None = None):
    """The task graph of the project at ``root`` (default: the working directory), loaded once."""
    from doit.exceptions import InvalidDodoFile

    from .config import load_project
    from .tasks import Graph

    root = (root or Path.cwd()).resolve()
    if root not in _graphs:
        Layout(root).build_dir.mkdir(exist_ok=True)
        try:
            project = load_project(root)
            g = Graph(project)
            g.check()
        except CharbuildError as exc:
            for problem in exc.problems():
                print(problem, file=sys.stderr)
            for problem in getattr(exc, "warnings", []):
                print(problem, file=sys.stderr)
            raise InvalidDodoFile(f"{exc.message}; fix them (`charbuild check` lists them again)") from None
        if project.warnings:
            print(f"charbuild: {len(project.warnings)} warning(s); `charbuild check` lists them", file=sys.stderr)
        _graphs[root] = g
    return _graphs[root]


def forget_loaded_projects() -> None:
    """Drop cached projects (tests and long-lived processes that rebuild after edits)."""
    _graphs.clear()


def task_mask():
    yield from graph().mask_tasks()


def task_image():
    yield from graph().image_tasks()


def task_caption():
    yield from graph().caption_tasks()


def task_dataset():
    yield from graph().dataset_tasks()


def task_preview():
    yield from graph().preview_tasks()


def task_train():
    yield from graph().train_tasks()


def task_merge():
    yield from graph().merge_tasks()


def task_compress():
    yield from graph().compress_tasks()


def task_report():
    from .report.tasks import report_tasks

    g = graph()
    yield from report_tasks(g.project, g)


for _group in GROUP_DOCS:  # one wording for doit list and for readers of this file
    globals()[f"task_{_group}"].__doc__ = GROUP_DOCS[_group]


def task__prune():
    """remove prepared pictures whose source is gone"""
    yield from graph().prune_tasks()


def task__aliases():
    """one task per character and per LoRA name"""
    yield from graph().alias_tasks()


def _command_of(argv: list[str]) -> str:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return "run"


def _guard_plain_doit() -> None:
    """Under a plain ``doit`` command line: take the build lock and handle SIGTERM for runs."""
    prog = Path(sys.argv[0]).name.lower() if sys.argv else ""
    if not (prog.startswith("doit") or (prog == "__main__.py" and "doit" in sys.argv[0])):
        return
    command = _command_of(sys.argv[1:])
    # doit opens its state database (build/.doit.db) before loading any task
    build_dir = Layout(Path.cwd()).build_dir
    build_dir.mkdir(exist_ok=True)
    from .buildlock import build_lock, install_sigterm_handler

    install_sigterm_handler()
    if command in READ_ONLY_COMMANDS:
        return
    try:
        lock = build_lock(build_dir)
        lock.__enter__()
    except CharbuildError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(exc.exit_code)
    _held.append(lock)


_held: list = []
_guard_plain_doit()


def run_doit(root: str | Path, argv: list[str], *, extra_config: dict | None = None) -> int:
    """Run doit on the project at ``root`` in this process, holding the build lock for runs.

    ``argv`` is doit's command line (``["run", "-n", "4", "krnk"]``, ``["list"]``).
    Returns doit's exit code.
    """
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    from . import dodo as this
    from .buildlock import build_lock, install_sigterm_handler

    import signal

    root = Path(root).resolve()
    old = Path.cwd()
    old_sigterm = signal.getsignal(signal.SIGTERM)
    os.chdir(root)
    try:
        forget_loaded_projects()
        install_sigterm_handler()
        command = _command_of(argv)
        namespace = {name: getattr(this, name) for name in __all__}
        if extra_config and "reporter" in extra_config:  # DOIT_CONFIG would override extra_config's
            namespace["DOIT_CONFIG"] = {**DOIT_CONFIG, "reporter": extra_config["reporter"]}
        # doit binds its output stream when it is imported; use the current one
        config = {"outfile": sys.stdout, **(extra_config or {})}
        main = DoitMain(ModuleTaskLoader(namespace), extra_config={"GLOBAL": config})
        if command in READ_ONLY_COMMANDS:
            return main.run(argv)
        build_dir = Layout(root).build_dir
        build_dir.mkdir(exist_ok=True)
        with build_lock(build_dir):
            return main.run(argv)
    finally:
        os.chdir(old)
        # leave the caller's process as it was (a Pool made later inherits the handler)
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, old_sigterm)
