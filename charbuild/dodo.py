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
           "task_merge", "task_compress", "task_samples", "task_candidate", "task_explore", "task_blocks", "task_report", "task__prune", "task__aliases"]

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


def project_graph(root: Path | None = None):
    """The task graph of the project at ``root`` (default: the working directory), loaded once.

    A project with errors raises :class:`~charbuild.errors.ConfigError` (the ``charbuild``
    commands print it as ``path:line: error:`` lines and exit 2).
    """
    from .config import load_project
    from .tasks import Graph

    root = (root or Path.cwd()).resolve()
    if root not in _graphs:
        Layout(root).build_dir.mkdir(exist_ok=True)
        project = load_project(root)
        g = Graph(project)
        if project.warnings:
            print(f"charbuild: {len(project.warnings)} warning(s); `charbuild check` lists them", file=sys.stderr)
        _graphs[root] = g
    return _graphs[root]


def graph(root: Path | None = None):
    """:func:`project_graph` for doit's task creators: a project with errors prints its problems
    and raises doit's ``InvalidDodoFile`` (one line under a plain ``doit``, no traceback)."""
    from doit.exceptions import InvalidDodoFile

    try:
        return project_graph(root)
    except CharbuildError as exc:
        for problem in exc.problems():
            print(problem, file=sys.stderr)
        for problem in getattr(exc, "warnings", []):
            print(problem, file=sys.stderr)
        raise InvalidDodoFile(f"{exc.message}; fix them (`charbuild check` lists them again)") from None


def forget_loaded_projects() -> None:
    """Drop cached projects (tests and long-lived processes that rebuild after edits)."""
    _graphs.clear()


def stale_tasks(root: str | Path):
    """Every task of the project at ``root`` that a build would run, and why (:class:`~charbuild.staleness.Stale`).

    Loads the project's tasks as doit does (under the project folder), then asks doit's own
    state check (:func:`charbuild.staleness.stale_of`); read-only.
    """
    from doit.control import TaskControl
    from doit.loader import load_doit_config, load_tasks

    from .staleness import stale_of

    root = Path(root).resolve()
    old = Path.cwd()
    os.chdir(root)
    try:
        forget_loaded_projects()
        namespace = {name: globals()[name] for name in __all__}
        config = load_doit_config(namespace)
        tasks = load_tasks(namespace, allow_delayed=False, args=[], config=config)
        return stale_of(TaskControl(tasks).tasks, root / config["dep_file"])
    finally:
        os.chdir(old)


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


def task_samples():
    from .train.samples_action import samples_tasks

    yield from samples_tasks(graph(), GROUP_DOCS["samples"])


def task_candidate():
    from .explore_tasks import candidate_tasks

    yield from candidate_tasks(graph())


def task_explore():
    from .explore_tasks import explore_tasks

    yield from explore_tasks(graph())


def task_blocks():
    from .explore_tasks import blocks_tasks

    yield from blocks_tasks(graph())


def task_report():
    from .report.tasks import report_tasks

    g = graph()
    yield from report_tasks(g, stale_check=stale_tasks)


for _group in GROUP_DOCS:  # one wording for doit list and for readers of this file
    globals()[f"task_{_group}"].__doc__ = GROUP_DOCS[_group]


def task__prune():
    """remove prepared pictures whose source is gone"""
    yield from graph().prune_tasks()


def task__aliases():
    """one task per character and per LoRA name"""
    yield from graph().alias_tasks()


def default_jobs(root: Path) -> int:
    """doit's ``-n`` when the command line gives none: as many tasks at once as trainings can run
    at once here, the GPUs of ``[trainer] gpus`` or, without a GPU, ``[trainer] cpu_trainings``
    (:func:`charbuild.train.hardware.training_slots`), so that a plain ``doit`` keeps every
    training slot busy. 1 for another executor (a cluster: say ``-n``) or a project.toml with
    errors (the build reports them)."""
    from .project_toml import load_project_toml
    from .train.hardware import training_slots

    problems: list = []
    trainer = load_project_toml(root, root / "characters", problems).trainer
    if problems or trainer.get("executor", "local") != "local":
        return 1
    return len(training_slots(trainer["gpus"], trainer["cpu_trainings"]))


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
    import multiprocessing

    if multiprocessing.current_process().name != "MainProcess":
        # a worker of ``doit -n N`` started by "spawn" (Windows, macOS): it imports this module
        # again with the build's command line (while unpickling its task, before
        # ``parent_process()`` is set), but the build and its lock are its parent's
        return
    command = _command_of(sys.argv[1:])
    if command not in READ_ONLY_COMMANDS and (jobs := default_jobs(Path.cwd())) > 1:
        DOIT_CONFIG["num_process"] = jobs
    # doit opens its state database (build/.doit.db) before loading any task
    build_dir = Layout(Path.cwd()).build_dir
    build_dir.mkdir(exist_ok=True)
    from .buildlock import build_lock, install_quiet_interrupts, install_sigterm_handler

    install_sigterm_handler()
    install_quiet_interrupts()
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


def run_doit(root: str | Path, argv: list[str], *, extra_config: dict | None = None,
             force_train: frozenset[str] = frozenset(), analyse: frozenset[str] = frozenset()) -> int:
    """Run doit on the project at ``root`` in this process, holding the build lock for runs.

    ``argv`` is doit's command line (``["run", "-n", "4", "krnk"]``, ``["list"]``).
    ``force_train``: ``"<lora>/<variant>"`` labels whose training runs even when up to date,
    without the run cache (``charbuild train --force``). ``analyse``: LoRA names that get the
    per-block analysis (``blocks:`` tasks) although ``[merge] explore_blocks`` is off.
    Returns doit's exit code, except for doit's own errors before any task runs (an unknown
    target, a bad option: doit's ``ERROR: …`` line, exit 3), which are printed as
    ``charbuild: error: …`` and return 2. A project with errors raises ConfigError.
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
        doit_config = dict(DOIT_CONFIG)
        if (jobs := default_jobs(root)) > 1:  # doit's own default (0) runs tasks in this process
            doit_config["num_process"] = jobs
        if extra_config and "reporter" in extra_config:  # DOIT_CONFIG would override extra_config's
            doit_config["reporter"] = extra_config["reporter"]
        namespace["DOIT_CONFIG"] = doit_config
        # doit binds its output stream when it is imported; use the current one
        config = {"outfile": sys.stdout, **(extra_config or {})}
        main = DoitMain(ModuleTaskLoader(namespace), extra_config={"GLOBAL": config})
        main.BIN_NAME = "doit"  # doit's hints ("Type "doit list" …") name a command that exists
        graph_ = project_graph(root)  # a project with errors: ConfigError here
        graph_.force_train, graph_.analyse = frozenset(force_train), frozenset(analyse)
        if command in READ_ONLY_COMMANDS:
            return _run_main(main, argv)
        build_dir = Layout(root).build_dir
        build_dir.mkdir(exist_ok=True)
        with build_lock(build_dir):
            return _run_main(main, argv)
    finally:
        os.chdir(old)
        # leave the caller's process as it was (a Pool made later inherits the handler)
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, old_sigterm)


class _DoitErrorLines:
    """``sys.stderr`` while doit runs: doit's own user errors, which it writes as one
    ``ERROR: <message>`` line before returning 3, become ``charbuild: error: <message>``."""

    PREFIX = "ERROR: "

    def __init__(self, stream):
        self._stream = stream
        self.seen = False

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIX):
            self.seen = True
            text = "charbuild: error: " + text[len(self.PREFIX):]
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _run_main(main, argv: list[str]) -> int:
    """``main.run(argv)`` with doit's own errors as charbuild's (exit 2 instead of doit's 3)."""
    stream = sys.stderr
    sys.stderr = lines = _DoitErrorLines(stream)
    try:
        code = main.run(argv)
    finally:
        sys.stderr = stream
    return 2 if code == 3 and lines.seen else code
