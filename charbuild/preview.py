"""Contact sheet per LoRA: every training image in angle-grid order with its code and caption.

One row per (kind, vertical angle) — f0x, f1x, f2x, b0x, ... — with the images in horizontal
angle order, so a missing or wrong angle stands out. Uses only Pillow's built-in font, so the
sheet renders the same on every machine with the same Pillow; glyphs the font lacks (e.g.
Japanese) are drawn as its placeholder box rather than failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from charbuild.codes import angle_order_key
from charbuild.errors import CharbuildError, doit_action
from charbuild.fsutil import write_bytes_atomic
from charbuild.images import png_bytes, thumbnail

SHEET_BG = (48, 48, 48)
CELL_BG = (96, 96, 96)
TEXT = (235, 235, 235)
CODE_TEXT = (255, 210, 90)
PAD = 8


@dataclass(frozen=True)
class PreviewEntry:
    """One image on the sheet: the (prepared) image, its code and its caption text."""

    image_path: Path
    code: str
    caption: str


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _safe_length(font, text: str) -> float:
    try:
        return font.getlength(text)
    except (UnicodeError, OSError, ValueError):
        return font.getlength(_ascii_fallback(text))


def _ascii_fallback(text: str) -> str:
    return "".join(ch if ord(ch) < 128 else "?" for ch in text)


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font, fill) -> None:
    try:
        draw.text(xy, text, font=font, fill=fill)
    except (UnicodeError, OSError, ValueError):  # a bitmap font without the glyphs
        draw.text(xy, _ascii_fallback(text), font=font, fill=fill)


def wrap_text(text: str, width: float, length) -> list[str]:
    """Greedy wrap of ``text`` to lines no wider than ``width`` (``length(str) -> px``).

    Breaks after ``", "`` or spaces where it can, and between characters inside words that are
    too long (Japanese has no spaces).
    """
    words: list[str] = []
    for part in text.split(" "):
        words.append(part + " ")
    if words:
        words[-1] = words[-1][:-1]
    lines: list[str] = []
    line = ""
    for word in words:
        if length((line + word).rstrip()) <= width:
            line += word
            continue
        if line:
            lines.append(line.rstrip())
            line = ""
        while length(word.rstrip()) > width and len(word.rstrip()) > 1:
            cut = 1
            while cut < len(word) and length(word[: cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line.strip():
        lines.append(line.rstrip())
    return lines


def _thumbnail(path: Path, cell: int) -> Image.Image:
    try:
        return thumbnail(path, cell, "RGB", "the preview")
    except CharbuildError as exc:
        raise CharbuildError(f"{exc.message}; rebuild it", path=path) from None


def render_preview(entries: Iterable[PreviewEntry], out_path: str | Path, *, title: str, cell: int = 192) -> None:
    """Render the contact sheet of ``entries`` to the PNG ``out_path`` (atomic, deterministic).

    Rows group entries by kind and vertical angle; within a row they are in horizontal-angle
    order (ties by image path). Each thumbnail is ``cell`` px, with its code and the caption
    wrapped beneath it.
    """
    ordered = sorted(entries, key=lambda e: (angle_order_key(e.code), str(e.image_path)))
    rows = [list(group) for _, group in groupby(ordered, key=lambda e: angle_order_key(e.code)[:2])]
    small, big = _font(11), _font(16)
    line_h = 13
    text_w = cell
    wrapped = {id(e): wrap_text(e.caption, text_w, lambda s: _safe_length(small, s)) for e in ordered}
    caption_lines = max((len(lines) for lines in wrapped.values()), default=0)
    cell_h = cell + 4 + 16 + caption_lines * line_h + PAD
    cols = max((len(r) for r in rows), default=1)
    title_h = 30
    width = PAD + cols * (cell + PAD)
    height = title_h + max(len(rows), 1) * (cell_h + PAD) + PAD
    sheet = Image.new("RGB", (max(width, 320), height), SHEET_BG)
    draw = ImageDraw.Draw(sheet)
    _draw_text(draw, (PAD, 7), f"{title}  ({len(ordered)} images)", big, TEXT)
    if not ordered:
        _draw_text(draw, (PAD, title_h + PAD), "no images", small, TEXT)
    for r, row in enumerate(rows):
        y0 = title_h + r * (cell_h + PAD)
        for c, entry in enumerate(row):
            x0 = PAD + c * (cell + PAD)
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=CELL_BG)
            thumb = _thumbnail(Path(entry.image_path), cell)
            sheet.paste(thumb, (x0 + (cell - thumb.width) // 2, y0 + (cell - thumb.height) // 2))
            stem = Path(entry.image_path).stem
            label = entry.code + (stem[3:] if stem.lower().startswith(entry.code.lower()) else f"  {stem}")
            _draw_text(draw, (x0, y0 + cell + 3), label, _font(13), CODE_TEXT)
            for i, line in enumerate(wrapped[id(entry)]):
                _draw_text(draw, (x0, y0 + cell + 20 + i * line_h), line, small, TEXT)
    write_bytes_atomic(out_path, png_bytes(sheet))


@doit_action
def render_preview_action(entries_as_tuples: Sequence[Sequence[str]], out_path: str, title: str):
    """doit python-action: ``entries_as_tuples`` holds ``(image_path, code, caption)`` tuples.

    Returns True, or ``TaskFailed`` with the message when an image cannot be read.
    """
    entries = [PreviewEntry(Path(p), code, caption) for p, code, caption in entries_as_tuples]
    render_preview(entries, out_path, title=title)
    return True
