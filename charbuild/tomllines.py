"""Line numbers for TOML keys, so config errors can say ``path:line``.

``tomllib`` gives values but no positions. This scanner reads the text line by
line, tracks the current ``[table]`` header and records the line of every
``key = value`` under its full dotted path. It understands what charbuild's
config files use (tables, dotted and quoted keys, inline tables and multi-line
arrays as values) and falls back to the nearest enclosing table's line.
"""

from __future__ import annotations

import re

_HEADER_RE = re.compile(r"^\s*\[\[?\s*(?P<name>[^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"""^\s*(?P<key>(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'))*)\s*=""")
_PART_RE = re.compile(r"""[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'""")
_SYNTAX_LINE_RE = re.compile(r"at line (\d+)")


def split_dotted(text: str) -> tuple[str, ...]:
    """``a."b.c".d`` → ``("a", "b.c", "d")``."""
    parts = []
    for m in _PART_RE.finditer(text):
        p = m.group(0)
        if p[0] in "\"'":
            p = p[1:-1]
        parts.append(p)
    return tuple(parts)


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map every table path and key path in ``text`` to its 1-based line number."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    depth = 0  # open brackets/braces of a multi-line value
    in_multiline_string: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw
        if in_multiline_string:
            if in_multiline_string in line:
                in_multiline_string = None
            continue
        if depth > 0:
            depth += _bracket_balance(line)
            continue
        header = _HEADER_RE.match(line)
        if header and not _KEY_RE.match(line):
            table = split_dotted(header.group("name"))
            lines.setdefault(table, number)
            continue
        key = _KEY_RE.match(line)
        if key:
            path = table + split_dotted(key.group("key"))
            lines.setdefault(path, number)
            value = line[key.end():]
            for quote in ('"""', "'''"):
                if value.count(quote) == 1:
                    in_multiline_string = quote
            if not in_multiline_string:
                depth = max(0, _bracket_balance(value))
                _record_inline(value, path, number, lines)
    return lines


def _bracket_balance(text: str) -> int:
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', "", text).split("#", 1)[0]
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def _record_inline(value: str, path: tuple[str, ...], number: int, lines: dict) -> None:
    """Keys inside a one-line inline table ``{ a = 1, b = 2 }`` share its line."""
    if "{" not in value:
        return
    for m in re.finditer(r"[{,]\s*([A-Za-z0-9_-]+)\s*=", value):
        lines.setdefault(path + (m.group(1),), number)


def line_of(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    """The line of ``path``, or of its nearest recorded ancestor, or None."""
    path = tuple(path)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None


def syntax_error_line(exc: Exception, text: str | None = None) -> int | None:
    """The line a ``tomllib.TOMLDecodeError`` is about.

    ``tomllib`` gives a position for most errors, but only "at end of document" for a
    construct that is never closed; then, given the ``text``, this is the line where the
    unclosed array, inline table or string starts (:func:`unclosed_construct_line`), or
    the last non-blank line when nothing is left open.
    """
    lineno = getattr(exc, "lineno", None)
    if isinstance(lineno, int) and lineno > 0 and "end of document" not in str(exc):
        return lineno
    m = _SYNTAX_LINE_RE.search(str(exc))
    if m:
        return int(m.group(1))
    if text is None:
        return None
    unclosed = unclosed_construct(text)
    return unclosed[0] if unclosed else last_line(text)


def last_line(text: str) -> int | None:
    """The number of the last non-blank line of ``text`` (None for an empty text)."""
    numbered = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return numbered[-1] if numbered else None


def unclosed_construct(text: str) -> tuple[int, str] | None:
    """``(line, what)`` of the outermost construct still open at the end of ``text``.

    ``what`` is "array", "inline table" or "string" (basic, literal and their multi-line
    forms); comments are skipped. None when everything is closed.
    """
    opened: list[tuple[int, str]] = []   # (line, what) of each open bracket, outermost first
    string: str | None = None  # the open string's delimiter
    string_line = 0
    number, i, n = 1, 0, len(text)
    while i < n:
        ch = text[i]
        if string is not None:
            if ch == "\\" and string in ('"', '"""'):
                if text[i + 1:i + 2] == "\n":
                    number += 1
                i += 2
                continue
            if text.startswith(string, i):
                i += len(string)
                string = None
                continue
            if ch == "\n":
                if len(string) == 1:  # a one-line string ends at the end of its line
                    return string_line, "string"
                number += 1
            i += 1
            continue
        if ch == "\n":
            number += 1
        elif ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch in "\"'":
            string = ch * 3 if text.startswith(ch * 3, i) else ch
            string_line = number
            i += len(string)
            continue
        elif ch in "[{":
            opened.append((number, "array" if ch == "[" else "inline table"))
        elif ch in "]}" and opened:
            opened.pop()
        i += 1
    if string is not None:
        return string_line, "string"
    return opened[0] if opened else None
