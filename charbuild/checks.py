"""One validation vocabulary: checkers, the did-you-mean, and a collector of located problems.

A *checker* is a function ``value -> complaint | None``: ``None`` when the value is fine,
otherwise a phrase that completes "'<key>' …" (``"must be a whole number, not a list"``).
The same checkers serve the config loader, which collects every problem with its file,
key path and line (:class:`Collector`), and pure modules such as ``train.variants``,
which raise ``ValueError`` on the first (:func:`require`).

:func:`closest` is the one did-you-mean of the project: every "unknown X" message asks it.

This module is pure apart from :meth:`Collector.load`, which reads one TOML file.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import Problem
from .tomllines import key_lines, line_of, syntax_error_line, unclosed_construct

Checker = Callable[[Any], "str | None"]
KeyPath = tuple  # of str: ("training", "lr")


# --------------------------------------------------------------------------- did-you-mean


def closest(word: object, choices: Iterable[str], *, n: int = 1) -> list[str]:
    """The ``n`` best matches for ``word`` among ``choices`` (case-insensitive), best first.

    Returned in the spelling of ``choices``; empty when nothing is close (difflib ratio < 0.6).
    """
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(str(choice).lower(), str(choice))
    matches = difflib.get_close_matches(str(word).lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[m] for m in matches]


def did_you_mean(word: object, choices: Iterable[str], *, n: int = 1) -> str:
    """``" (did you mean 'X'?)"`` for the closest of ``choices``, or ``""``."""
    close = closest(word, choices, n=n)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def unknown_key(key: str, allowed: Iterable[str], where: str) -> str:
    """The message for a key that ``where`` does not know, with a suggestion or the allowed keys."""
    allowed = sorted(allowed)
    close = closest(key, allowed)
    hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
    return f"unknown key '{key}' in {where}{hint}"


# --------------------------------------------------------------------------- checkers


def describe(v: Any) -> str:
    """A value as a complaint names it: ``a list``, ``the string 'x'``, ``true/false``."""
    return {bool: "true/false", int: "a number", float: "a number", str: f"the string {v!r}",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


def _is_whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_int(minimum: int = 1, maximum: int | None = None) -> Checker:
    """A whole number in ``minimum..maximum`` (no upper bound when ``maximum`` is None)."""
    def check(v):
        if not _is_whole(v):
            return f"must be a whole number, not {describe(v)}"
        if v < minimum or (maximum is not None and v > maximum):
            rng = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            return f"must be {rng}, not {v}"
        return None
    return check


def is_number(positive: bool = True) -> Checker:
    """A finite number (int or float), greater than 0 when ``positive``."""
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, not {describe(v)}"
        if not math.isfinite(v):
            return f"must be a finite number, not {v}"
        if positive and not v > 0:
            return f"must be greater than 0, not {v}"
        return None
    return check


def is_fraction(v: Any) -> str | None:
    """A number in (0, 1]."""
    bad = is_number()(v)
    if bad:
        return bad
    return None if v <= 1 else f"must be a fraction in (0, 1], not {v}"


def is_bool(v: Any) -> str | None:
    """``true`` or ``false``."""
    return None if isinstance(v, bool) else f"must be true or false, not {describe(v)}"


def is_str(v: Any) -> str | None:
    """A non-empty string."""
    return None if isinstance(v, str) and v.strip() else f"must be a non-empty string, not {describe(v)}"


def is_choice(*choices: Any) -> Checker:
    """One of ``choices``, with a did-you-mean for a near miss."""
    def check(v):
        if v in choices:
            return None
        hint = did_you_mean(v, [str(c) for c in choices]) if isinstance(v, str) else ""
        return f"must be one of {', '.join(repr(c) for c in choices)}, not {v!r}{hint}"
    return check


def is_str_list(v: Any) -> str | None:
    """A list of strings (maybe empty)."""
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return f"must be a list of strings, not {describe(v)}"
    return None


def is_table(v: Any) -> str | None:
    """A TOML table."""
    return None if isinstance(v, dict) else f"must be a table, not {describe(v)}"


def either(*checks: Checker) -> Checker:
    """Passes when one of ``checks`` passes; otherwise the first one's complaint."""
    def check(v):
        complaints = [c(v) for c in checks]
        return None if any(c is None for c in complaints) else complaints[0]
    return check


def require(value: Any, key: str, check: Checker) -> Any:
    """``value`` if it passes ``check``; else raise ``ValueError("<key> = <value>: <complaint>")``."""
    complaint = check(value)
    if complaint:
        raise ValueError(f"{key} = {value!r}: {complaint}")
    return value


# --------------------------------------------------------------------------- where values were written


@dataclass(frozen=True)
class Origin:
    """Where a table's values were written: the file as messages show it, the table's key
    path, and the line of every key path of the file (kept beside the values, never in them)."""

    file: str
    table: KeyPath = ()
    lines: Mapping[KeyPath, int] = field(default_factory=dict, compare=False, repr=False)

    def line(self, *keys: str) -> int | None:
        """The line of ``table + keys``, or of its nearest written ancestor (None: nowhere)."""
        path = self.table + tuple(keys)
        return line_of(self.lines, path) if path else None

    def has(self, *keys: str) -> bool:
        """Whether ``table + keys`` itself is written in the file."""
        return (self.table + tuple(keys)) in self.lines

    def at(self, *keys: str) -> "Origin":
        """The origin of the sub-table ``keys``."""
        return Origin(self.file, self.table + tuple(keys), self.lines)


def dotted(keypath: Iterable[Any]) -> str:
    """``("a", "b")`` → ``a.b``."""
    return ".".join(str(k) for k in keypath)


def table_name(keypath: KeyPath) -> str:
    """``[a.b]`` for a table path, ``the top level`` for the root."""
    return f"[{dotted(keypath)}]" if keypath else "the top level"


class Collector:
    """Collects the problems of one TOML file, each with the line of its key path."""

    def __init__(self, root: Path, path: Path, problems: list[Problem]):
        self.path = path
        self.shown = show_path(root, path)
        self.problems = problems
        self.origin = Origin(self.shown)

    @property
    def lines(self) -> Mapping[KeyPath, int]:
        return self.origin.lines

    def error(self, message: str, keypath: KeyPath = ()) -> None:
        self.problems.append(Problem(self.shown, message, line_of(self.lines, keypath) if keypath else None))

    def warning(self, message: str, keypath: KeyPath = ()) -> None:
        self.problems.append(Problem(self.shown, message, line_of(self.lines, keypath) if keypath else None, "warning"))

    def load(self) -> dict | None:
        """The file's TOML data, or None after reporting why it cannot be read."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            self.error(f"not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8")
            return None
        except OSError as exc:
            self.error(f"cannot read: {exc.strerror}")
            return None
        self.origin = Origin(self.shown, (), key_lines(text))
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.problems.append(Problem(self.shown, syntax_message(exc, text), syntax_error_line(exc, text)))
            return None

    def check_keys(self, table: Mapping, allowed: Iterable[str], keypath: KeyPath = (), what: str = "") -> None:
        """Report each key of ``table`` that is not ``allowed``, with a did-you-mean."""
        allowed = set(allowed)
        for key in table:
            if key not in allowed:
                self.error(unknown_key(key, allowed, what or table_name(keypath)), keypath + (key,))

    def get(self, table: Mapping, key: str, check: Checker, default: Any, keypath: KeyPath = ()) -> Any:
        """``table[key]`` if it passes ``check``, else ``default`` (after reporting the complaint)."""
        if key not in table:
            return default
        value = table[key]
        complaint = check(value)
        if complaint:
            self.error(f"'{dotted(keypath + (key,))}' {complaint}", keypath + (key,))
            return default
        return value

    def checked(self, table: Mapping, checks: Mapping[str, Checker], keypath: KeyPath = ()) -> dict:
        """``table`` without the values that fail their key's checker; each failure is reported
        at its own line. Keys without a checker are kept (:meth:`check_keys` reports unknown keys)."""
        out = {}
        for key, value in table.items():
            check = checks.get(key)
            complaint = check(value) if check is not None else None
            if complaint:
                self.error(f"'{dotted(keypath + (key,))}' {complaint}", keypath + (key,))
            else:
                out[key] = value
        return out


def syntax_message(exc: Exception, text: str) -> str:
    """``tomllib``'s message without its position (the line goes in front), said for the line shown."""
    message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
    if "(at end of document)" in message:
        message = message.replace(" (at end of document)", "")
        unclosed = unclosed_construct(text)
        if unclosed:
            message = f"the {unclosed[1]} that starts on this line is never closed ({message} at the end of the file)"
        else:
            message += " at the end of the file"
    return f"TOML syntax error: {message}; fix the syntax"


def show_path(root: Path, path: Path) -> str:
    """``path`` as messages show it: relative to ``root`` (POSIX) when under it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
