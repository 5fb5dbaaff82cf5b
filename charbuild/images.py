"""Prepared images: flatten onto a plain background, downscale (never upscale), save as PNG.

The original filled transparent backgrounds black (dark hair) or white (light hair) and made
one downscaled copy per training size with a batch tool. Here each copy is one doit target.
Output PNGs carry no metadata and use fixed encoder settings, so the same source gives the
same bytes (and doit/the signature layer see no spurious change).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from charbuild.errors import CharbuildError, doit_action
from charbuild.fsutil import write_bytes_atomic

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}

#: Fixed PNG encoder settings: deterministic bytes for the same pixels.
PNG_SAVE_OPTIONS = {"format": "PNG", "optimize": False, "compress_level": 6}

# Errors Pillow raises for unreadable, truncated or hostile files.
_IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_FIX_HINT = "re-export it from your drawing tool as PNG, or remove it from the folder"

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


def _unreadable(path: str | Path, exc: BaseException) -> CharbuildError:
    reason = str(exc) or type(exc).__name__
    return CharbuildError(f"image is unreadable or corrupt ({reason}); {_FIX_HINT}", path=path)


def read_size(path: str | Path) -> tuple[int, int]:
    """Width and height of the image as displayed (EXIF orientation applied), from its header.

    Raises :class:`CharbuildError` naming ``path`` when it is not a readable image.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            # PNG keeps EXIF wherever it likes; only a chunk before the pixels is "header".
            has_exif = img.format != "PNG" or "exif" in img.info
            orientation = img.getexif().get(0x0112) if has_exif else None
    except _IMAGE_ERRORS as exc:
        raise _unreadable(path, exc) from None
    if orientation in _SWAPPING_ORIENTATIONS:
        return height, width
    return width, height


def verify_image(path: str | Path) -> str | None:
    """Decode the whole image; return a message saying what is wrong, or None when it is fine."""
    try:
        with Image.open(path) as img:
            img.load()
    except _IMAGE_ERRORS as exc:
        return _unreadable(path, exc).message
    return None


def fitted_size(width: int, height: int, size: int) -> tuple[int, int] | None:
    """The size with the longer side ``size`` and the other scaled and rounded (at least 1).

    None when ``size`` exceeds the longer side (no upscaling). Exact integer rounding (half up).
    """
    if width < 1 or height < 1 or size < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height} -> {size}")
    longer = max(width, height)
    if size > longer:
        return None

    def scale(side: int) -> int:
        return max(1, (2 * side * size + longer) // (2 * longer))

    return scale(width), scale(height)


def flatten(img: Image.Image, background: str) -> Image.Image:
    """An RGB copy of ``img`` with any transparency composited onto ``background``.

    ``background`` is ``"black"`` or ``"white"``. Handles alpha modes (RGBA, LA, PA, RGBa, La),
    palette or grey images with a transparent colour (tRNS), L, 1, RGB, CMYK, YCbCr and 16/32-bit
    grey (I;16, I: scaled from 0..65535, F: clipped).
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, not {background!r}")
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        mode = "L"
    elif mode == "F":
        img = img.convert("L")
        mode = "L"
    has_alpha = "A" in img.getbands() or "a" in mode or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, BACKGROUNDS[background] + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _load_source(src: str | Path) -> Image.Image:
    """Open, fully decode and orient ``src``; raise CharbuildError naming it when corrupt."""
    try:
        with Image.open(src) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img)
            oriented.load()
            return oriented if oriented is not img else img.copy()
    except _IMAGE_ERRORS as exc:
        raise _unreadable(src, exc) from None


def load_source(src: str | Path) -> Image.Image:
    """``src`` decoded and oriented (EXIF), as the image stage reads it; CharbuildError naming it."""
    return _load_source(src)


def thumbnail(path: str | Path, px: int, mode: str, purpose: str) -> Image.Image:
    """``path`` shrunk to fit ``px`` × ``px`` (LANCZOS) in ``mode``; a picture that cannot be read
    is a CharbuildError naming it and ``purpose`` (``"the preview"``, ``"the report"``)."""
    try:
        with Image.open(path) as img:
            img.load()
            thumb = img.convert(mode)
    except _IMAGE_ERRORS as exc:
        raise CharbuildError(f"cannot read the picture for {purpose} ({exc})", path=path) from None
    thumb.thumbnail((px, px), Image.Resampling.LANCZOS)
    return thumb


def png_bytes(img: Image.Image) -> bytes:
    """``img`` encoded as PNG with fixed settings and no metadata (no text, ICC, EXIF, DPI)."""
    clean = img.copy()
    clean.info = {}
    buf = io.BytesIO()
    clean.save(buf, **PNG_SAVE_OPTIONS)
    return buf.getvalue()


def prepare_image(src: str | Path, dst: str | Path, size: int, background: str) -> tuple[int, int]:
    """Write ``src`` flattened onto ``background`` and downscaled to ``size`` as the PNG ``dst``.

    The longer side becomes ``size`` (Lanczos); smaller sources keep their size (no upscaling).
    ``dst`` is written atomically with deterministic bytes. Returns the written (width, height).
    Raises :class:`CharbuildError` naming ``src`` when it is unreadable or corrupt.
    """
    img = flatten(_load_source(src), background)
    target = fitted_size(img.width, img.height, size)
    if target is not None and target != img.size:
        img = img.resize(target, Image.Resampling.LANCZOS)
    write_bytes_atomic(dst, png_bytes(img))
    return img.size


def progress_line(position: tuple[int, int], dst: str | Path, written: tuple[int, int]) -> str:
    """The terminal line of one prepared picture: ``picture 3/40: <dst> (512x768)``.

    ``position`` is the picture's place among all the project's prepared pictures (the graph's
    order), so a long image stage shows how far it has come, also under ``doit -n N``.
    """
    k, n = position
    return f"charbuild: picture {k}/{n}: {Path(dst).as_posix()} ({written[0]}x{written[1]})"


@doit_action
def prepare_image_action(src: str, dst: str, size: int, background: str, position: tuple[int, int] | None = None):
    """doit python-action around :func:`prepare_image`: True, or ``TaskFailed`` with the message.

    With ``position`` (k, n) it prints :func:`progress_line` to stderr (doit shows it as it runs).
    """
    written = prepare_image(src, dst, size, background)
    if position is not None:
        print(progress_line(position, dst, written), file=sys.stderr, flush=True)
    return True
