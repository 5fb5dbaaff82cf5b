"""A variant's sample pictures (``samples/<step>/<name>.png``) and their column order."""

from __future__ import annotations

import re
from pathlib import Path

from charbuild.sample_prompts import NOTRIGGER_DIR, code_sample_name, split_sample_name

_USER_SAMPLE = re.compile(r"^p[1-9][0-9]*$")


def sample_name_key(name: str) -> tuple:
    """Column order of the samples grid: the angle codes, then the user's prompts ``p1, p2, …``
    (a group's ``<member>/<code>`` samples member by member)."""
    member, code = split_sample_name(name)
    if code:
        return (member or "", 0, 0, code)
    return ("", 1, int(name[1:]), "") if _USER_SAMPLE.match(name) else ("", 2, 0, name)


def sample_member(name: str) -> str | None:
    """The group member a sample shows (``kuroneko/school/b00`` -> ``kuroneko/school``), else None."""
    return split_sample_name(name)[0]


def sample_files(root: Path, variant_dir: str) -> dict[int, dict[str, str]]:
    """``samples/<step>/<name>.png`` of a variant (``name``: an angle code, ``<member>/<code>`` for a
    group, or ``p1``, ``p2``, … for the user's ``sample_prompts``; not the ``notrigger/`` ones):
    step -> name -> project-relative path."""
    out: dict[int, dict[str, str]] = {}
    base = root / variant_dir / "samples"
    if not base.is_dir():
        return out
    for step_dir in base.iterdir():
        if not (step_dir.is_dir() and step_dir.name.isdigit()):
            continue
        for f in step_dir.rglob("*"):
            rel = f.relative_to(step_dir).as_posix()
            if f.suffix.lower() != ".png" or rel.startswith(NOTRIGGER_DIR + "/") or not f.is_file():
                continue
            stem = rel[: -len(f.suffix)]
            name = code_sample_name(stem) or (stem if _USER_SAMPLE.match(stem) else None)
            if name:
                out.setdefault(int(step_dir.name), {})[name] = f"{variant_dir}/samples/{step_dir.name}/{rel}"
    return {s: dict(sorted(out[s].items(), key=lambda kv: sample_name_key(kv[0]))) for s in sorted(out)}
