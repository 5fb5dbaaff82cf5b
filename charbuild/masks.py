"""The mask stage: each opaque picture cut out of its background, as a build target.

For a picture whose ``[flatten]`` method is not ``keep`` (and, for ``auto``, whose file has
no alpha channel) the graph makes one ``mask`` task writing

- ``build/images/<char>/<part>/mask/<stem>.png``: the picture the image stage flattens onto
  the fill colour: the figure with its un-mixed colour and its mask as alpha; for a picture
  the method kept (``auto`` and unsure), the picture itself, fully opaque;
- ``…/mask/<stem>.json``: the verdict: the method used, whether it flattened, whether it was
  sure and why not, the background colour it found and the statistics it judged by.

The source is never written. A picture with real transparency keeps its own alpha.
The verdicts are what ``charbuild check`` and the report list (:func:`unsure_pictures`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Pillow is imported where pictures are read: never while doit loads the tasks
    from PIL import Image

from . import layout
from .errors import CharbuildError, Problem, doit_action
from .flatten_settings import FlattenRule
from .fsutil import read_json, write_bytes_atomic, write_text_atomic
from .signature import file_md5

#: Bumped when the cut-out changes for the same picture and settings (rebuilds every mask).
MASK_VERSION = 1


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_has_alpha(f) -> bool | None:
    """From a PNG's chunks before its pixels: an alpha colour type or a tRNS chunk (None: not a PNG)."""
    if f.read(8) != _PNG_SIGNATURE:
        return None
    while True:
        head = f.read(8)
        if len(head) < 8:
            return False
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind == b"IHDR":
            data = f.read(length)
            if len(data) >= 10 and data[9] in (4, 6):  # grey + alpha, RGBA
                return True
            f.seek(4, 1)
            continue
        if kind == b"tRNS":
            return True
        if kind in (b"IDAT", b"IEND"):
            return False
        f.seek(length + 4, 1)


def has_alpha_channel(path: str | Path) -> bool:
    """Whether the picture's file has an alpha channel or a transparent colour (header only).

    PNG headers are read directly (this runs for every picture whenever doit loads the tasks);
    JPEG has no alpha; other formats ask Pillow.
    """
    try:
        with open(path, "rb") as f:
            found = _png_has_alpha(f)
        if found is not None:
            return found
        if Path(path).suffix.lower() in (".jpg", ".jpeg"):
            return False
        from PIL import Image

        with Image.open(path) as img:
            return "A" in img.getbands() or "a" in img.mode or "transparency" in img.info
    except (OSError, ValueError, SyntaxError):
        return False  # unreadable pictures are the image stage's to report


def needs_mask(rule: FlattenRule, path: str | Path) -> bool:
    """Whether the picture gets a mask task: not ``keep``, and for ``auto`` an opaque file."""
    if rule.method == "keep":
        return False
    return rule.method != "auto" or not has_alpha_channel(path)


def _transparent(img: Image.Image) -> Image.Image | None:
    """``img`` as RGBA when it holds real transparency (an alpha below 255 somewhere), else None."""
    if not ("A" in img.getbands() or "a" in img.mode or "transparency" in img.info):
        return None
    rgba = img.convert("RGBA")
    return rgba if rgba.getchannel("A").getextrema()[0] < 255 else None


def cut(img: Image.Image, rule: FlattenRule) -> tuple[Image.Image, dict]:
    """The cut-out of a loaded picture under ``rule`` and its verdict (a JSON-ready dict)."""
    from .images import flatten

    own = _transparent(img)
    if own is not None:
        return own, {"method": "alpha", "flattened": True, "sure": True, "reasons": [],
                     "note": "the picture has transparency: its own alpha is the mask"}
    rgb = flatten(img, "black")  # no alpha here: any mode to RGB (16-bit grey, CMYK, ...)
    if rule.method == "model":
        from .rembg_adapter import cut_out_with_model

        rgba, verdict = cut_out_with_model(rgb, rule.model)
        return rgba, {"method": "model", "flattened": True, **verdict}
    from .background import cut_out

    rgba, verdict = cut_out(rgb, rule.tolerance)
    flattened = verdict.sure or rule.method == "flood"
    out = {"method": "flood", "flattened": flattened, "sure": verdict.sure, "reasons": list(verdict.reasons),
           "stats": _plain(verdict.stats)}
    return (rgba if flattened else rgb.convert("RGBA")), out


def _plain(stats: dict) -> dict:
    return {k: (round(float(v), 4) if not isinstance(v, (int, str)) else v) for k, v in stats.items()}


def make_mask(src: str, png: str, sidecar: str, rule: dict) -> dict:
    """Write the cut-out of ``src`` to ``png`` and its verdict to ``sidecar`` (both atomically)."""
    from .images import load_source, png_bytes

    img = load_source(src)
    rgba, verdict = cut(img, FlattenRule(**rule))
    verdict = {"source": Path(src).as_posix(), "source_md5": file_md5(src), "rule": FlattenRule(**rule).signature(),
               "version": MASK_VERSION, **verdict}
    write_bytes_atomic(png, png_bytes(rgba))
    write_text_atomic(sidecar, json.dumps(verdict, indent=1, sort_keys=True) + "\n")
    return verdict


@doit_action
def mask_action(src: str, png: str, sidecar: str, rule: dict):
    """doit python-action around :func:`make_mask`; says so on stderr when the method was unsure."""
    import sys

    verdict = make_mask(src, png, sidecar, rule)
    if not verdict.get("sure", True):
        print(unsure_line(src, verdict), file=sys.stderr, flush=True)
    return True


def unsure_line(src: str, verdict: dict) -> str:
    """``<src>: background kept/flattened, unsure: <reasons>`` (the check and build warning)."""
    done = "flattened anyway (method flood)" if verdict.get("flattened") else "kept as it is (method auto)"
    return f"{src}: the background was {done}; unsure: {'; '.join(verdict.get('reasons', []))}"


def is_current(verdict: dict | None, entry: "MaskEntry", root: Path) -> bool:
    """Whether ``verdict`` was made from the picture as it is now, under the rule it has now."""
    if not verdict or verdict.get("version") != MASK_VERSION or verdict.get("rule") != entry.rule.signature():
        return False
    try:
        return verdict.get("source_md5") == file_md5(root / entry.source)
    except OSError:
        return False


def read_verdict(sidecar: str | Path) -> dict | None:
    """The verdict written beside a mask, or None when there is none (yet) or it is unreadable."""
    return read_json(sidecar)


@dataclass(frozen=True)
class MaskEntry:
    """One picture with a mask task: its source, its rule and its two targets (graph paths)."""

    source: str
    png: str
    sidecar: str
    rule: FlattenRule
    name: str           # <char>/<part>/<stem>: the mask task's name


def mask_entries(project) -> list[MaskEntry]:
    """Every picture of the project that gets a mask, in the graph's order."""
    out = []
    for ch in project.characters.values():
        for part in ch.parts():
            for img in part.images:
                rule = ch.flatten.rule_for(img.path.relative_to(ch.dir).as_posix())
                if needs_mask(rule, img.path):
                    out.append(MaskEntry(img.rel, layout.mask_png(ch.name, part.name, img.stem),
                                         layout.mask_verdict(ch.name, part.name, img.stem), rule,
                                         f"{ch.name}/{part.name}/{img.stem}"))
    return out


def unsure_pictures(project, *, judge_missing: bool = False) -> list[Problem]:
    """A warning per picture whose built mask says the method was unsure.

    A picture whose mask is not built yet, or was built from other settings, is judged now
    when ``judge_missing`` (the same cut-out, nothing written), else left out.
    """
    from .images import load_source

    problems = []
    for entry in mask_entries(project):
        verdict = read_verdict(project.root / entry.sidecar)
        if not is_current(verdict, entry, project.root):
            if not judge_missing:
                continue
            try:
                _, verdict = cut(load_source(project.root / entry.source), entry.rule)
            except CharbuildError:
                continue  # the picture's own error is reported elsewhere
        if not verdict.get("sure", True):
            problems.append(Problem(entry.source, unsure_line(entry.source, verdict).split(": ", 1)[1], None, "warning"))
    return problems
