"""A variant's sample pictures (``samples/<step>/<name>.png``) and their column order."""

from __future__ import annotations

import re
from pathlib import Path

from charbuild.codes import parse_code

_USER_SAMPLE = re.compile(r"^p[1-9][0-9]*$")


def sample_name_key(name: str) -> tuple:
    """Column order of the samples grid: the angle codes, then the user's prompts ``p1, p2, …``."""
    return (1, int(name[1:]), "") if _USER_SAMPLE.match(name) else (0, 0, name)


def sample_files(root: Path, variant_dir: str) -> dict[int, dict[str, str]]:
    """``samples/<step>/<name>.png`` of a variant (``name``: an angle code, or ``p1``, ``p2``, … for
    the user's ``sample_prompts``): step -> name -> project-relative path."""
    out: dict[int, dict[str, str]] = {}
    base = root / variant_dir / "samples"
    if not base.is_dir():
        return out
    for step_dir in base.iterdir():
        if not (step_dir.is_dir() and step_dir.name.isdigit()):
            continue
        for f in step_dir.iterdir():
            code = parse_code(f.name)
            name = code if code and f.stem.lower() == code else f.stem if _USER_SAMPLE.match(f.stem) else None
            if f.suffix.lower() == ".png" and name and f.is_file():
                out.setdefault(int(step_dir.name), {})[name] = f"{variant_dir}/samples/{step_dir.name}/{f.name}"
    return {s: dict(sorted(out[s].items(), key=lambda kv: sample_name_key(kv[0]))) for s in sorted(out)}
