"""Size classes, batch-size tables and the sd-scripts dataset TOML text (pure; rules §4).

Every image folder (one size of one part of one character) is a subset. Each axis of an image
falls in a size class (<= 512 LOW, <= 768 MID, else HIGH); every image of a folder must fall in
the same (width class, height class), and one ``[[datasets]]`` is written per class pair that
has images, with that class's resolution and batch size.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

CLASSES = ("LOW", "MID", "HIGH")
CLASS_RESOLUTION = {"LOW": 512, "MID": 768, "HIGH": 1024}

#: The batch-size keys ``<width class>_<height class>``, width-major, LOW < MID < HIGH.
BATCH_KEYS: tuple[str, ...] = tuple(f"{w}_{h}" for w in CLASSES for h in CLASSES)

_DEFAULT_TABLE = {key: 1 for key in BATCH_KEYS} | {"LOW_LOW": 2}
_12GB_TABLE = {key: 1 for key in BATCH_KEYS} | {
    "LOW_LOW": 4,
    "MID_LOW": 3,
    "LOW_MID": 3,
    "MID_MID": 2,
    "HIGH_LOW": 2,
    "LOW_HIGH": 2,
}
#: The original generator's batch sizes: ``default`` and its 12 GB VRAM variant (all 9 keys).
BATCH_SIZE_TABLES: dict[str, dict[str, int]] = {"default": _DEFAULT_TABLE, "12GB": _12GB_TABLE}


class MixedSizeClassError(ValueError):
    """The images of one folder fall in different size classes (the original refused these)."""


@dataclass(frozen=True)
class Subset:
    """One image folder of a dataset: its path (relative to the project root) and image sizes."""

    image_dir: str
    class_tokens: str
    flip_aug: bool
    image_sizes: tuple[tuple[int, int], ...]


def size_class(px: int) -> str:
    """The size class of one axis: ``LOW`` (<= 512), ``MID`` (<= 768) or ``HIGH``."""
    if px <= 512:
        return "LOW"
    if px <= 768:
        return "MID"
    return "HIGH"


def folder_class(subset: Subset) -> tuple[str, str]:
    """The (width class, height class) that all images of ``subset`` share.

    Raises :class:`MixedSizeClassError` naming the folder when they differ, ``ValueError``
    when the subset has no images.
    """
    if not subset.image_sizes:
        raise ValueError(f"{subset.image_dir}: no images in this folder")
    counts = Counter((size_class(w), size_class(h)) for w, h in subset.image_sizes)
    if len(counts) > 1:
        parts = ", ".join(f"{w}_{h} ({n} image{'s' if n > 1 else ''})" for (w, h), n in sorted(counts.items(), key=_class_order))
        raise MixedSizeClassError(
            f"{subset.image_dir}: the images fall in different size classes: {parts}; "
            "every image of one folder must be in one class (<= 512 LOW, <= 768 MID, else HIGH per axis)"
        )
    return next(iter(counts))


def _class_order(item) -> tuple[int, int]:
    (w, h) = item[0]
    return CLASSES.index(w), CLASSES.index(h)


_BARE_SAFE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f']*")


def toml_string(value: str) -> str:
    """A TOML string for ``value``: a literal ``'...'`` (the original's style) when it can be
    one, else a basic ``"..."`` string escaped by ``tomli_w``. Both round-trip through tomllib.

    Only the value goes through the library: ``tomli_w`` writes every string as a basic
    string, every array across lines and ``[[datasets.subsets]]`` as an inline array, so
    the document itself keeps the original generator's hand-written shape.
    """
    if _BARE_SAFE.fullmatch(value):
        return f"'{value}'"
    import tomli_w

    line = tomli_w.dumps({"v": value})  # 'v = "…"\n'
    return line[len("v = "):-1]


def _toml_bool(value: bool) -> str:
    return "true" if value else "false"


def render_dataset_toml(num_repeats: int, subsets: Iterable[Subset], batch_sizes: Mapping[str, int]) -> str:
    """The dataset TOML for sd-scripts, in the original generator's shape.

    ``[general]`` first, then one ``[[datasets]]`` per (width class, height class) that has
    images, ordered LOW < MID < HIGH by width then height, each listing its subsets in the given
    order. A class missing from ``batch_sizes`` gets batch size 1. The same input gives the
    same text. Raises ``ValueError`` (or :class:`MixedSizeClassError`) for bad input.
    """
    if isinstance(num_repeats, bool) or not isinstance(num_repeats, int) or num_repeats < 1:
        raise ValueError(f"num_repeats must be a positive integer, not {num_repeats!r}")
    bad = {k: v for k, v in batch_sizes.items() if k not in BATCH_KEYS or isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"bad batch sizes {bad!r}: keys are {', '.join(BATCH_KEYS)}, values positive integers")
    groups: dict[tuple[str, str], list[Subset]] = {}
    for subset in subsets:
        groups.setdefault(folder_class(subset), []).append(subset)

    lines = [
        "[general]",
        "color_aug = true",
        "enable_bucket = true",
        "bucket_no_upscale = true",
        "caption_extension = '.txt'",
        f"num_repeats = {num_repeats}",
    ]
    for (wc, hc), members in sorted(groups.items(), key=_class_order):
        lines += [
            "",
            "[[datasets]]",
            f"resolution = [{CLASS_RESOLUTION[wc]}, {CLASS_RESOLUTION[hc]}]",
            f"batch_size = {batch_sizes.get(f'{wc}_{hc}', 1)}",
        ]
        for subset in members:
            lines += [
                "",
                "[[datasets.subsets]]",
                f"image_dir = {toml_string(subset.image_dir)}",
                f"class_tokens = {toml_string(subset.class_tokens)}",
                f"flip_aug = {_toml_bool(subset.flip_aug)}",
            ]
    return "\n".join(lines) + "\n"


def dataset_semantics(toml_text: str) -> dict:
    """The parsed content of a dataset TOML (for hashing: formatting changes do not count)."""
    return tomllib.loads(toml_text)
