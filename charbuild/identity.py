"""The identity score: how far a sample is from the character's own training picture (pure).

What a character LoRA must learn is what its pictures show and its captions do not say: hair
colour and style, ears, eye and skin colour, the outfit's colours. Those are mostly *colours
of the figure*, so the distance compares the figures' colours, not the backgrounds':

1. Both pictures are sampled at :data:`GRID` x :data:`GRID` points (the pixel at each cell's
   centre: no blending, so a dark figure's edge on a white background makes no grey), in RGB.
2. The *figure* of each is the cells that differ from its background by more than
   :data:`FOREGROUND_THRESHOLD` (Euclidean RGB, 0-255 scale), the background being the median
   colour of the ring of cells :data:`EDGE` in from the edge; the :data:`EDGE` outer rings are
   never figure. A VAE
   decoder (the demo model's, and small ones generally) leaves a frame a shade off at the very
   edge of a picture: taken as the background, that frame made the whole real background count
   as figure, so a training picture and its own VAE round trip were 0.77 apart (more than the
   base model's random samples). A sample on white and its reference on black compare equal
   when their figures are.
3. **Colour term**: each figure's colours as a histogram over a :data:`LEVELS`³ RGB palette
   (soft-assigned to the two nearest levels per channel, so a small shift moves mass smoothly
   rather than jumping a bin), normalised to sum 1; the term is half the L1 distance of the two
   histograms (total variation, 0 = the same colours in the same proportions, 1 = no colour in
   common).
4. **Layout term**: the two figure masks' disagreement (1 - intersection / union), which sees a
   figure that is missing, much smaller or of another shape (long hair, a tail, ears).

``distance = COLOUR_WEIGHT · colour + (1 - COLOUR_WEIGHT) · layout``, in [0, 1]; 0 for the
same picture. It is deterministic (no randomness, no model) and cheap (a 512 px pair in
milliseconds). A LoRA's *identity* at a sample step is the mean distance over its template codes
(each sample against the training picture of the same code); its *gain* is the fall of that
mean from step 0 (the base model without the LoRA) to the last step.

The *trigger score* is the same distance between a prompt without the trigger words rendered
with the LoRA and the same prompt rendered by the base model (step 0): the keyword should carry
the character, the rest of the prompt should keep its meaning (low is good).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

GRID = 48
LEVELS = 5
FOREGROUND_THRESHOLD = 24.0
COLOUR_WEIGHT = 0.7
#: Rings of cells at the picture's edge that are neither background nor figure (4 % of the side).
EDGE = 2


def load_rgb(path: str | Path):
    """A picture as a float RGB array (H, W, 3), 0-255; transparency flattened onto black."""
    from PIL import Image

    from .images import flatten

    with Image.open(path) as img:
        return np.asarray(flatten(img, "black"), dtype=np.float64)


def shrink(rgb: np.ndarray, grid: int = GRID) -> np.ndarray:
    """``rgb`` (H, W, 3) as a (grid, grid, 3) array: the pixel at each cell's centre (any H and W)."""
    h, w, _ = rgb.shape
    ys = ((np.arange(grid) + 0.5) * h / grid).astype(int)
    xs = ((np.arange(grid) + 0.5) * w / grid).astype(int)
    return rgb[ys[:, None], xs[None, :]]


def figure_mask(cells: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Cells whose colour is farther than ``threshold`` from the background: the median colour of
    the ring :data:`EDGE` cells in from the edge (a decoder's off-shade frame is not the
    background); the :data:`EDGE` outer rings are never figure."""
    inner = cells[EDGE:-EDGE, EDGE:-EDGE]
    ring = np.concatenate([inner[0], inner[-1], inner[1:-1, 0], inner[1:-1, -1]])
    background = np.median(ring, axis=0)
    mask = np.linalg.norm(cells - background, axis=-1) > threshold
    mask[:EDGE, :] = mask[-EDGE:, :] = mask[:, :EDGE] = mask[:, -EDGE:] = False
    return mask


def colour_histogram(cells: np.ndarray, mask: np.ndarray, levels: int = LEVELS) -> np.ndarray:
    """The figure's colours as a normalised ``levels``³ histogram (soft-assigned per channel)."""
    pixels = cells[mask]
    hist = np.zeros((levels,) * 3)
    if len(pixels) == 0:
        return hist.reshape(-1)
    pos = pixels / 255.0 * (levels - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, levels - 2)
    frac = pos - lo
    for corner in range(8):
        bits = [(corner >> c) & 1 for c in range(3)]
        weight = np.prod([frac[:, c] if b else 1 - frac[:, c] for c, b in enumerate(bits)], axis=0)
        idx = tuple(lo[:, c] + b for c, b in enumerate(bits))
        np.add.at(hist, idx, weight)
    return (hist / hist.sum()).reshape(-1)


def distance_arrays(sample: np.ndarray, reference: np.ndarray) -> float:
    """The identity distance of two RGB arrays (see the module docstring), in [0, 1]."""
    a, b = shrink(sample), shrink(reference)
    ma, mb = figure_mask(a), figure_mask(b)
    if not ma.any() and not mb.any():
        return 0.0
    colour = 0.5 * float(np.abs(colour_histogram(a, ma) - colour_histogram(b, mb)).sum())
    if not ma.any() or not mb.any():
        colour = 1.0
    layout = 1.0 - float((ma & mb).sum()) / float((ma | mb).sum())
    return COLOUR_WEIGHT * colour + (1 - COLOUR_WEIGHT) * layout


def distance(sample: str | Path, reference: str | Path) -> float:
    """The identity distance between two picture files."""
    return distance_arrays(load_rgb(sample), load_rgb(reference))


def mean(values: Iterable[float]) -> float | None:
    """The mean of ``values``, or None for none."""
    vals = [float(v) for v in values]
    return sum(vals) / len(vals) if vals else None


def identity_gain(before: Mapping[str, float], after: Mapping[str, float]) -> dict:
    """Compare per-code distances at step 0 (``before``) and the last step (``after``).

    Returns ``before``/``after`` (mean distances over the codes both have), ``drop`` (the
    mean's relative fall, 0.3 = 30 % closer) and ``closer`` (the share of codes whose distance fell).
    """
    codes = sorted(set(before) & set(after))
    if not codes:
        return {"before": None, "after": None, "drop": None, "closer": None, "codes": 0}
    b = mean(before[c] for c in codes)
    a = mean(after[c] for c in codes)
    closer = sum(1 for c in codes if after[c] < before[c]) / len(codes)
    drop = (b - a) / b if b else 0.0
    return {"before": b, "after": a, "drop": drop, "closer": closer, "codes": len(codes)}
