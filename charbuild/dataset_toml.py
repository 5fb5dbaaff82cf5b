"""Size classes, batch-size tables and the sd-scripts dataset TOML text (pure; rules §4).

Every image folder (one size of one part of one character) is a subset. Each axis of an image
falls in a size class (<= 512 LOW, <= 768 MID, else HIGH); every image of a folder must fall in
the same (width class, height class), and one ``[[datasets]]`` is written per class pair that
has images, with that class's resolution and batch size.

SDXL (1024-class training) scales the SD1.5 rules by 2: classes <= 1024 LOW, <= 1536 MID,
else HIGH, buckets 1024 / 1536 / 2048, and ``[general]`` also sets the bucket range sd-scripts
checks a dataset's resolution against (``max_bucket_reso`` >= the largest resolution; its
default of 1024 would refuse the 1536 and 2048 buckets). SD1.5 output is the original's, byte
for byte. See :data:`SIZE_CLASSES`.

An SDXL TOML has no ``color_aug = true``: with it sd-scripts cannot cache latents and runs the
VAE every step, and the SDXL VAE overflows in fp16 (sd-scripts replaces the NaN latents by
zeros and trains on them). Without it the sd-scripts command caches the latents
(``--cache_latents``, see :func:`writes_color_aug`), as the builtin trainer always does.
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

CLASSES = ("LOW", "MID", "HIGH")
#: SD1.5's class resolutions (the original generator's; ``SIZE_CLASSES[arch]`` for either arch).
CLASS_RESOLUTION = {"LOW": 512, "MID": 768, "HIGH": 1024}


@dataclass(frozen=True)
class SizeClasses:
    """An architecture's size classes: the largest side of LOW and MID, each class's bucket
    resolution, the extra ``[general]`` bucket lines of its dataset TOML, and whether it
    writes ``color_aug = true`` (the original generator did; SDXL does not)."""

    low_max: int
    mid_max: int
    resolution: Mapping[str, int]
    general: tuple[str, ...] = ()
    color_aug: bool = True


#: Per architecture; SDXL is SD1.5 scaled by 2 (1024-class training).
SIZE_CLASSES: dict[str, SizeClasses] = {
    "sd15": SizeClasses(512, 768, CLASS_RESOLUTION),
    "sdxl": SizeClasses(1024, 1536, {"LOW": 1024, "MID": 1536, "HIGH": 2048},
                        ("min_bucket_reso = 256", "max_bucket_reso = 2048", "bucket_reso_steps = 64"), color_aug=False),
}


def writes_color_aug(arch: str) -> bool:
    """Whether ``arch``'s dataset TOML turns sd-scripts' ``color_aug`` on (then sd-scripts cannot
    cache latents): SD1.5 yes, as the original; SDXL no."""
    return _classes(arch).color_aug

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
#: SDXL's: one picture per step at 1024 px and above fits 12 GB only with gradient checkpointing
#: and cached text-encoder outputs, so ``default`` and ``12GB`` are 1 everywhere; ``24GB``
#: doubles the 1024 x 1024 class. Starting points, not measurements.
SDXL_BATCH_SIZE_TABLES: dict[str, dict[str, int]] = {
    "default": {key: 1 for key in BATCH_KEYS},
    "12GB": {key: 1 for key in BATCH_KEYS},
    "24GB": {key: 1 for key in BATCH_KEYS} | {"LOW_LOW": 2},
}


def batch_size_tables(arch: str = "sd15") -> dict[str, dict[str, int]]:
    """The named batch-size tables of ``arch`` (``dataset.batch_sizes = "<name>"``)."""
    return SDXL_BATCH_SIZE_TABLES if arch == "sdxl" else BATCH_SIZE_TABLES


class MixedSizeClassError(ValueError):
    """The images of one folder fall in different size classes (the original refused these)."""


@dataclass(frozen=True)
class Subset:
    """One image folder of a dataset: its path (relative to the project root) and image sizes."""

    image_dir: str
    class_tokens: str
    flip_aug: bool
    image_sizes: tuple[tuple[int, int], ...]


def _classes(arch: str) -> SizeClasses:
    try:
        return SIZE_CLASSES[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(SIZE_CLASSES)}") from None


def size_class(px: int, arch: str = "sd15") -> str:
    """The size class of one axis: ``LOW`` (<= 512; SDXL 1024), ``MID`` (<= 768; SDXL 1536) or ``HIGH``."""
    classes = _classes(arch)
    if px <= classes.low_max:
        return "LOW"
    if px <= classes.mid_max:
        return "MID"
    return "HIGH"


def class_resolution(cls: str, arch: str = "sd15") -> int:
    """The bucket resolution of size class ``cls`` for ``arch`` (SD1.5 512/768/1024, SDXL 1024/1536/2048)."""
    return _classes(arch).resolution[cls]


def folder_class(subset: Subset, arch: str = "sd15") -> tuple[str, str]:
    """The (width class, height class) that all images of ``subset`` share.

    Raises :class:`MixedSizeClassError` naming the folder when they differ, ``ValueError``
    when the subset has no images.
    """
    if not subset.image_sizes:
        raise ValueError(f"{subset.image_dir}: no images in this folder")
    counts = Counter((size_class(w, arch), size_class(h, arch)) for w, h in subset.image_sizes)
    if len(counts) > 1:
        parts = ", ".join(f"{w}_{h} ({n} image{'s' if n > 1 else ''})" for (w, h), n in sorted(counts.items(), key=_class_order))
        c = _classes(arch)
        raise MixedSizeClassError(
            f"{subset.image_dir}: the images fall in different size classes: {parts}; "
            f"every image of one folder must be in one class (<= {c.low_max} LOW, <= {c.mid_max} MID, else HIGH per axis)"
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


def render_dataset_toml(num_repeats: int, subsets: Iterable[Subset], batch_sizes: Mapping[str, int],
                        arch: str = "sd15") -> str:
    """The dataset TOML for sd-scripts, in the original generator's shape.

    ``arch``: the size classes and bucket lines (:data:`SIZE_CLASSES`); ``"sd15"`` writes
    exactly what the original generator wrote.

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
    classes = _classes(arch)
    groups: dict[tuple[str, str], list[Subset]] = {}
    for subset in subsets:
        groups.setdefault(folder_class(subset, arch), []).append(subset)

    lines = [
        "[general]",
        *(("color_aug = true",) if classes.color_aug else ()),
        "enable_bucket = true",
        "bucket_no_upscale = true",
        "caption_extension = '.txt'",
        f"num_repeats = {num_repeats}",
        *classes.general,
    ]
    for (wc, hc), members in sorted(groups.items(), key=_class_order):
        lines += [
            "",
            "[[datasets]]",
            f"resolution = [{classes.resolution[wc]}, {classes.resolution[hc]}]",
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
