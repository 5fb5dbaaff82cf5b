"""The prepared-image ladder of a part: which pictures exist at a size, their folder, their subset.

Rules only (no I/O): a picture is prepared at every ladder size it can fill
(:func:`charbuild.images.fitted_size`), into one folder per part and size; that folder is
one subset of the part's LoRA dataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dataset_toml import Subset
    from .model import Part, SourceImage


def prepared_sizes(part: "Part", size: int) -> list[tuple["SourceImage", tuple[int, int]]]:
    """The pictures of ``part`` that exist at ladder ``size``, with their prepared dimensions."""
    from .images import fitted_size

    out = []
    for img in part.images:
        dims = fitted_size(img.width, img.height, size)
        if dims is not None:
            out.append((img, dims))
    return out


def image_dir(part: "Part", size: int) -> str:
    """The prepared-image folder of a part at a size, relative to the project root."""
    from . import layout

    return layout.image_dir(part.character, part.name, size)


def subset_for(part: "Part", size: int) -> "Subset | None":
    """The dataset subset of ``part``'s prepared folder at ``size``, or None when it is empty."""
    from .dataset_toml import Subset

    dims = prepared_sizes(part, size)
    if not dims:
        return None
    return Subset(image_dir(part, size), part.class_tokens, part.flip_aug, tuple(d for _, d in dims))
