"""Image codes ``[fb][0-2][0-7]``: what a training image shows, from its file name.

A code's 1st character is the image kind (``f`` face: nude upper body, ``b`` body: clothed
full body), the 2nd the vertical camera angle (``0`` horizontal, ``1`` from above, ``2`` from
below) and the 3rd the horizontal angle in 45-degree steps, counter-clockwise (``0`` front,
``1`` front three-quarter, ``2`` side, ``3`` back three-quarter, ``4`` behind; ``5``..``7``
mirror ``3``..``1`` for characters that are not left-right symmetric).
"""

from __future__ import annotations

import re

#: A code at the start of a file name; anything may follow (``f00-smile.png``, ``f00_2.png``).
CODE_RE = re.compile(r"^([fb])([0-2])([0-7])", re.IGNORECASE)

#: The image file extensions charbuild reads (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

#: The original framework's template codes: v 0..2 by h 0..4, per kind.
TEMPLATE_CODES: dict[str, tuple[str, ...]] = {
    kind: tuple(f"{kind}{v}{h}" for v in range(3) for h in range(5)) for kind in "fb"
}

#: Codes of the mirror images (h 5..7) of asymmetric characters, per kind.
MIRROR_CODES: dict[str, tuple[str, ...]] = {
    kind: tuple(f"{kind}{v}{h}" for v in range(3) for h in range(5, 8)) for kind in "fb"
}

#: Every valid code (48), in angle-grid order: face before body, then v row, then h.
ALL_CODES: tuple[str, ...] = tuple(f"{kind}{v}{h}" for kind in "fb" for v in range(3) for h in range(8))


def parse_code(filename: str) -> str | None:
    """The lower-case code at the start of ``filename`` (a name, not a path), or None.

    >>> parse_code("F00-smile.png")
    'f00'
    >>> parse_code("x00.png") is None
    True
    """
    m = CODE_RE.match(filename)
    return m.group(0).lower() if m else None


def is_image_file(filename: str) -> bool:
    """Whether ``filename`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return filename.lower().endswith(IMAGE_EXTENSIONS)


def angle_order_key(code: str) -> tuple[int, int, int]:
    """Sort key for the angle grid of previews: face before body, then v row, then h column."""
    code = code.lower()
    if not CODE_RE.fullmatch(code):
        raise ValueError(f"not an image code: {code!r} (expected [fb][0-2][0-7], e.g. f00)")
    return ("fb".index(code[0]), int(code[1]), int(code[2]))


#: What file managers append to a duplicated file's name: "f00 copy", "f00 copy 2" (macOS),
#: "f00 2" (macOS Finder), "f00 - Copy", "f00 - コピー", "f00 (2)" (Windows), "f00のコピー".
_COPY_SUFFIX_RE = re.compile(r"^(?:\s*-?\s*(?:copy|コピー)(?:\s*\(?\d+\)?)?|\s+\d+|\s*\(\d+\)|\s*のコピー.*)$", re.IGNORECASE)


def looks_like_a_copy(filename: str) -> bool:
    """Whether a coded picture's name is a file manager's duplicate of another (``f00 copy.png``).

    >>> [looks_like_a_copy(n) for n in ("f00 copy.png", "f00 - Copy (2).png", "f00 (1).jpg", "f00-smile.png")]
    [True, True, True, False]
    """
    stem = filename.rsplit(".", 1)[0]
    m = CODE_RE.match(stem)
    return bool(m) and bool(_COPY_SUFFIX_RE.match(stem[m.end():]))
