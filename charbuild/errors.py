"""One exception tree for every user-facing failure, printed by one handler.

Every problem carries the file it is about (and the line, for config files) so
that editors can jump to it: ``path:line: error: message``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth a warning) in the user's input."""

    path: str
    message: str
    line: int | None = None
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.severity}: {self.message}"


class CharbuildError(Exception):
    """Base of every error charbuild reports to a user (never a bug)."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line

    def problems(self) -> list[Problem]:
        """The problems this error stands for, for the one printing handler."""
        return [Problem(self.path or "charbuild", self.message, self.line)]

    def __str__(self) -> str:
        if self.path is None:
            return self.message
        return str(self.problems()[0])


class ConfigError(CharbuildError):
    """The project configuration has one or more errors; all are listed."""

    exit_code = 2

    def __init__(self, problems: list[Problem]):
        self._problems = [p for p in problems if p.severity == "error"]
        self.warnings = [p for p in problems if p.severity != "error"]
        super().__init__(f"{len(self._problems)} error(s) in the project configuration")

    def problems(self) -> list[Problem]:
        return list(self._problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self._problems)


class LoraFileError(CharbuildError):
    """A LoRA file cannot be read, is not a LoRA, or is not supported."""


class OptionError(CharbuildError, ValueError):
    """A value given on the command line or to a LoRA tool is not valid (it says what is)."""

    exit_code = 2


class OutputError(CharbuildError):
    """An artifact cannot be put in place (the file is held open elsewhere, or not writable)."""


class TrainingError(CharbuildError):
    """A training run failed; the message carries the log's last lines."""


def doit_action(func):
    """Make ``func`` a doit python-action that reports a :class:`CharbuildError` as doit's
    ``TaskFailed`` (its one-line message, no traceback); other exceptions stay errors."""

    @functools.wraps(func)
    def action(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CharbuildError as exc:
            from doit.exceptions import TaskFailed

            return TaskFailed(str(exc))

    return action
