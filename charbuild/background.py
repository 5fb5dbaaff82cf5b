"""Find a picture's simple background and cut the figure out of it, without a model.

What a generator writes for the original framework's pictures is an opaque picture on a
simple background (flat, a gradient, a little noise, a soft floor shadow). Its cut-out:

1. **The background's colour field** from the picture's border, in CIELAB (a perceptual
   space: a tolerance in ΔE means the same visible difference for every colour): a smooth
   surface (quadratic in x and y, cubic in y for vertical gradients) fitted to the top, left
   and right borders, robustly, so the part of the figure that touches them is left out.
2. **Region growing** from the border (:func:`background_region`), on a lightly blurred
   copy: through the *calm* pixels (the colour changes slowly there: never across the
   figure's outline) within ``tolerance`` (+ the border's noise) of the field; then on
   through calm pixels that are the field darkened, not re-hued (soft floor shadows, a
   gradient the surface does not follow); then into narrow gaps (between an arm and the
   body) through pixels that match on their own; last it is moved out to the outline.
3. **The edge refined** (:func:`soft_edge`): in a band of a few pixels along the outline
   each pixel is taken as a mix ``C = a*F + (1 - a)*B`` of the nearby background colour
   ``B`` and the nearby figure colour ``F``; ``a`` is its position between them, and the
   colour kept is ``C`` with the old background un-mixed, ``(C - (1 - a)*B) / a``.
   Composited onto any new colour, hair tips and antialiased outlines then carry none of
   the old one (no halo).
4. **A verdict** (:func:`judge`): unsure when the border is no simple background (busy, a
   colour step along it, or mostly figure), when the figure and the background have little
   contrast along much of the outline, or when the fill took almost everything or nothing.

Background enclosed by the figure (a gap closed on all sides) is not reached: it stays, by
design (an eye's white on a white background must not go).

Pure numpy on arrays (no I/O); :func:`cut_out` takes and returns Pillow images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .flatten_settings import DEFAULT_TOLERANCE


# Verdict thresholds (the benchmark, benchmarks/bench_background.py, shows where they come from).
_MIN_BORDER_BACKGROUND = 0.5   # less of the border than this is background: not a simple one
_MAX_LOW_CONTRAST = 0.25       # more of the outline than this has little contrast: unsure
_MIN_FIGURE, _MAX_FIGURE = 0.01, 0.97
_MAX_OFF_FIELD = 0.01
_MIX_MISFIT = 0.08             # RGB distance from the background-figure mix: not a mixed pixel          # more of the picture than this filled off the field: a leak?


@dataclass(frozen=True)
class Verdict:
    """What the method thinks of its own result: ``sure``, else the ``reasons`` (phrases)."""

    sure: bool
    reasons: tuple[str, ...] = ()
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"sure": self.sure, "reasons": list(self.reasons), "stats": self.stats}


@dataclass(frozen=True)
class Cutout:
    """A figure cut out of its background: ``rgba`` (H, W, 4) uint8 with the un-mixed figure
    colour and the soft mask as alpha, the background's mean colour (sRGB), the verdict."""

    rgba: np.ndarray
    background: tuple[int, int, int]
    verdict: Verdict


# --------------------------------------------------------------------------- colour


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0..1, shape (..., 3) -> (..., 3) float32."""
    c = rgb.astype(np.float32)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]], dtype=np.float32)
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883], dtype=np.float32)
    eps = 216 / 24389
    f = np.where(xyz > eps, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


# --------------------------------------------------------------------------- morphology (numpy only)


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``a`` moved by (dy, dx), the uncovered edge filled with ``fill``."""
    out = np.full_like(a, fill)
    h, w = a.shape[:2]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = a[ys, xs]
    return out


_NEIGHBOURS_4 = ((0, 1), (0, -1), (1, 0), (-1, 0))
_NEIGHBOURS_8 = _NEIGHBOURS_4 + ((1, 1), (1, -1), (-1, 1), (-1, -1))


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels (8-neighbourhood)."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        for dy, dx in _NEIGHBOURS_8:
            grown |= _shift(out, dy, dx, False)
        out = grown
    return out


def _sweep_rows(allowed: np.ndarray, reached: np.ndarray) -> np.ndarray:
    """Every run of allowed pixels in a row that holds a reached pixel becomes reached."""
    h, w = allowed.shape
    flat = np.zeros((h, w + 1), dtype=bool)
    flat[:, :w] = allowed
    flat = flat.ravel()
    starts = flat & ~np.concatenate([[False], flat[:-1]])
    run = np.cumsum(starts) * flat
    hit = np.zeros(run.max() + 1, dtype=bool)
    r = np.zeros((h, w + 1), dtype=bool)
    r[:, :w] = reached
    hit[run[r.ravel() & flat]] = True
    hit[0] = False
    return hit[run].reshape(h, w + 1)[:, :w]


def grow(allowed: np.ndarray, seeds: np.ndarray, max_rounds: int = 1000) -> np.ndarray:
    """The pixels of ``allowed`` 4-connected to a seed inside it (row and column sweeps)."""
    reached = seeds & allowed
    for _ in range(max_rounds):
        before = int(reached.sum())
        reached = _sweep_rows(allowed, reached)
        reached = _sweep_rows(allowed.T, reached.T).T
        if int(reached.sum()) == before:
            break
    return reached


def spread(values: np.ndarray, known: np.ndarray, rounds: int) -> np.ndarray:
    """``values`` (H, W, C) filled outward from ``known`` pixels for ``rounds`` pixels, each new
    pixel the mean of its known 8-neighbours; pixels still unreached keep their own value.

    Works on the frontier only (the unknown pixels next to known ones), so its cost follows
    the outline's length, not the picture's area.
    """
    h, w = known.shape
    out = values.astype(np.float32).reshape(h * w, -1).copy()
    have = known.ravel().copy()
    front = np.flatnonzero(dilate(known, 1) & ~known)
    for _ in range(rounds):
        if front.size == 0:
            break
        y, x = np.divmod(front, w)
        total = np.zeros((front.size, out.shape[1]), dtype=np.float32)
        count = np.zeros(front.size, dtype=np.float32)
        neighbours = []
        for dy, dx in _NEIGHBOURS_8:
            ny, nx = y + dy, x + dx
            inside = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
            nb = np.where(inside, ny * w + nx, 0)
            ok = inside & have[nb]
            total[ok] += out[nb[ok]]
            count[ok] += 1
            neighbours.append(nb[inside])
        out[front] = total / np.maximum(count, 1)[:, None]
        have[front] = True
        nxt = np.unique(np.concatenate(neighbours))
        front = nxt[~have[nxt]]
    return out.reshape(values.shape[:2] + (-1,)).reshape(values.shape)


# --------------------------------------------------------------------------- the background field


def _border_mask(h: int, w: int) -> np.ndarray:
    width = max(2, min(h, w) // 200)
    m = np.zeros((h, w), dtype=bool)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = True, True, True, True
    return m


def _design(ys: np.ndarray, xs: np.ndarray, h: int, w: int) -> np.ndarray:
    y = ys / max(h - 1, 1) * 2 - 1
    x = xs / max(w - 1, 1) * 2 - 1
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y, y ** 3], axis=-1).astype(np.float32)


def fit_background(lab: np.ndarray, tolerance: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The border's colour field: (coefficients (7, 3), inlier mask of the border pixels, residual ΔE).

    A least-squares surface over the top, left and right borders (a bust shot always touches
    the bottom one), refitted on the pixels that agree with it, so that where the figure
    touches the border is left out. Inliers: the pixels of all four borders that fit.
    """
    h, w = lab.shape[:2]
    border = _border_mask(h, w)
    sides = border.copy()
    sides[h - max(2, min(h, w) // 200):] = False
    ys, xs = np.nonzero(sides)
    a = _design(ys.astype(np.float32), xs.astype(np.float32), h, w)
    values = lab[ys, xs]
    keep = np.ones(len(values), dtype=bool)
    coef = np.zeros((a.shape[1], 3), dtype=np.float32)
    residual = 0.0
    for round_ in range(5):
        if keep.sum() < a.shape[1] * 4:
            break
        coef = np.linalg.lstsq(a[keep], values[keep], rcond=None)[0]
        resid = np.linalg.norm(values - a @ coef, axis=1)
        residual = float(np.median(resid[keep]))
        keep = resid <= (np.quantile(resid, 0.7) if round_ < 2 else max(tolerance / 2, 3 * residual))
    by, bx = np.nonzero(border)
    fitted = np.linalg.norm(lab[by, bx] - _design(by.astype(np.float32), bx.astype(np.float32), h, w) @ coef, axis=1)
    inliers = np.zeros((h, w), dtype=bool)
    good = fitted <= max(tolerance / 2, 3 * residual)
    inliers[by[good], bx[good]] = True
    return coef, inliers, residual


def background_field(coef: np.ndarray, h: int, w: int) -> np.ndarray:
    """The fitted background colour (Lab) at every pixel, (H, W, 3)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return _design(yy, xx, h, w) @ coef


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    out = a.astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis)
        n = out.shape[axis]
        out = (np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
               - np.take(c, np.arange(0, n), axis=axis)) / (2 * radius + 1)
    return out


def _local_change(blurred: np.ndarray) -> np.ndarray:
    """How fast the colour changes at each pixel: the largest ΔE to the pixels 2 px away."""
    change = np.zeros(blurred.shape[:2], dtype=np.float32)
    inside = np.ones(change.shape, dtype=bool)
    for dy, dx in ((0, 2), (2, 0), (0, -2), (-2, 0)):
        diff = np.linalg.norm(blurred - _shift(blurred, dy, dx, 0), axis=-1)
        change = np.maximum(change, np.where(_shift(inside, dy, dx, False), diff, 0))
    return change


def _raw_noise(lab: np.ndarray) -> float:
    """The picture's pixel noise (ΔE) on its border: median change to the next pixel."""
    border = _border_mask(*lab.shape[:2])
    step = np.linalg.norm(lab - _shift(lab, 0, 1, 0), axis=-1)
    return float(np.median(step[border & _shift(border, 0, 1, False)])) / np.sqrt(2)


def _abrupt_steps(lab: np.ndarray, inliers: np.ndarray, tolerance: float) -> int:
    """How often the background along the top, left and right edges jumps by more than twice
    the tolerance across a run of outliers: a step the smooth field was bent to explain (a
    figure across the whole border, not a gradient)."""
    steps = 0
    for line, ok in ((lab[0], inliers[0]), (lab[:, 0], inliers[:, 0]), (lab[:, -1], inliers[:, -1])):
        idx = np.nonzero(ok)[0]
        if len(idx) < 2:
            continue
        gaps = np.nonzero(np.diff(idx) > 1)[0]
        for g in gaps:
            before, after = line[max(idx[g] - 2, 0):idx[g] + 1].mean(0), line[idx[g + 1]:idx[g + 1] + 3].mean(0)
            steps += float(np.linalg.norm(before - after)) > 2 * tolerance
    return steps


def _shade(diff: np.ndarray, tolerance: float, darker: float, hue: float = 1.0) -> np.ndarray:
    """Pixels that may be the background in shadow: ``diff`` (Lab minus the field) has a hue
    within ``hue`` x ``tolerance`` and a lightness at most ``darker`` x ``tolerance`` darker (a
    shadow darkens, it does not change the hue) and ``tolerance`` lighter."""
    return ((np.linalg.norm(diff[..., 1:], axis=-1) < hue * tolerance)
            & (diff[..., 0] > -darker * tolerance) & (diff[..., 0] < tolerance))


def _snap(lab: np.ndarray, region: np.ndarray, within: float, steps: int) -> np.ndarray:
    """``region`` moved out to the figure's edge: up to ``steps`` pixels into the neighbours
    whose colour is ``within`` ΔE of the nearest background pixels' colour."""
    local = spread(lab, region, steps + 1)
    close = np.linalg.norm(lab - local, axis=-1) < within
    for _ in range(steps):
        more = dilate(region, 1) & ~region & close
        if not more.any():
            break
        region = region | more
    return region


def _off_field(diff: np.ndarray, region: np.ndarray, residual: float) -> float:
    """The share of the picture that the region took although it is off the border's field by
    more than its noise, and not as a shadow (darker, same hue): a plateau of some other colour,
    which is how a fill that leaked into a figure part of nearly the background's colour looks.
    The region's last 8 pixels before the outline (mixed, JPEG's ringing 8x8 blocks) are left out."""
    inner = region & ~dilate(~region, 8)
    off = np.linalg.norm(diff, axis=-1) > max(4 * residual, 1.5)
    shadow = (diff[..., 0] < -2) & (np.linalg.norm(diff[..., 1:], axis=-1) < 3)
    return float((inner & off & ~shadow).mean())


def background_region(lab: np.ndarray, tolerance: float) -> tuple[np.ndarray, dict]:
    """The background pixels connected to the border, and the statistics the verdict reads.

    Grown on a lightly blurred copy (more blur for a noisy border) through the pixels that
    are near the border's colour field and *calm*: where the colour changes slowly (a flat
    area, a gradient, a soft shadow), never across an outline, where it changes fast.
    """
    h, w = lab.shape[:2]
    noise = _raw_noise(lab)
    blurred = _box_blur(lab, 1 if noise < 2 else 2)
    coef, inliers, residual = fit_background(blurred, tolerance)
    field_lab = background_field(coef, h, w)
    distance = np.linalg.norm(blurred - field_lab, axis=-1)
    calm = _local_change(blurred) < max(tolerance / 2, 3 * residual)
    region = grow((distance < tolerance + 3 * residual) & calm, inliers)
    # creep on through calm pixels (soft shadows, a gradient the surface does not follow)
    region = grow(region | (calm & _shade(blurred - field_lab, tolerance, 3)), region)
    # and into narrow gaps (between an arm and the body), which are all near an edge
    # (blurred least, unblurred when clean; JPEG's halved colour resolution blurs the hue of a thin gap)
    lab3 = _box_blur(lab, 1)
    sharp = _shade((lab3 if noise >= 2 else lab) - field_lab, tolerance, 1.5, hue=1.4)
    border = _border_mask(h, w)
    region = grow(region | sharp, region | (border & sharp))
    region = _snap(lab3, region, tolerance / 2 + noise, max(2, round(min(h, w) / 128)))
    stats = {"noise": round(noise, 2), "residual": round(residual, 2), "tolerance": tolerance,
             "steps": _abrupt_steps(blurred, inliers, tolerance),
             "off_field": round(_off_field(blurred - field_lab, region, residual), 4),
             "border_background": round(float(region[border].mean()), 4),
             "figure": round(float(1 - region.mean()), 4)}
    return region, stats


# --------------------------------------------------------------------------- the soft edge


def soft_edge(rgb: np.ndarray, region: np.ndarray, tolerance: float, noise: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Alpha (H, W) and un-mixed colour (H, W, 3) in 0..1, and the low-contrast share of the outline.

    Along the outline (two pixels outside, four inside) each pixel is
    placed between the nearest pure background colour and the nearest pure figure colour.
    """
    h, w = region.shape
    r = max(1, round(min(h, w) / 512))
    figure = ~region
    edge_bg = region & dilate(figure, 2 * r)
    edge_fg = figure & dilate(region, 4 * r)
    band = edge_bg | edge_fg
    sure_bg, sure_fg = region & ~band, figure & ~band
    # far enough that every band pixel has both (a thin strand's inside may be far off)
    bg_near = spread(rgb, sure_bg, 8 * r + 4)
    fg_near = spread(rgb, sure_fg, 12 * r + 4)
    alpha = figure.astype(np.float32)
    ys, xs = np.nonzero(band)
    c, b, f = rgb[ys, xs], bg_near[ys, xs], fg_near[ys, xs]
    span = f - b
    a = np.clip(((c - b) * span).sum(-1) / np.maximum((span * span).sum(-1), 1e-6), 0, 1)
    # a figure pixel the mix does not explain (a dark outline between a light inside and a
    # dark background) is the figure's own colour: it stays whole
    unexplained = np.linalg.norm(c - (a[:, None] * f + (1 - a)[:, None] * b), axis=-1) > _MIX_MISFIT
    a = np.where(unexplained & figure[ys, xs], 1.0, a)
    # where figure and background are alike the mix is undefined: keep the hard mask there
    contrast = np.linalg.norm(srgb_to_lab(f) - srgb_to_lab(b), axis=-1)
    alike = contrast < max(tolerance / 2, 3 * noise)
    a = np.where(alike, figure[ys, xs].astype(np.float32), a)
    alpha[ys, xs] = a
    colour = rgb.astype(np.float32).copy()
    unmixed = np.clip((c - (1 - a)[:, None] * b) / np.maximum(a, 1e-3)[:, None], 0, 1)
    colour[ys, xs] = np.where(a[:, None] > 0, unmixed, f)
    colour[alpha == 0] = 0
    on_figure = figure[ys, xs]
    low = float((contrast < tolerance)[on_figure].mean()) if on_figure.any() else 0.0
    return alpha, colour, low


# --------------------------------------------------------------------------- the whole cut-out


def judge(stats: dict) -> Verdict:
    """The verdict on a cut-out from its statistics (see the module's docstring)."""
    reasons = []
    if stats["border_background"] < _MIN_BORDER_BACKGROUND:
        reasons.append(f"the border is not a simple background ({100 * (1 - stats['border_background']):.0f}% "
                       "of it is figure or busy background)")
    if stats.get("steps", 0):
        reasons.append("the border changes colour abruptly (the figure or an object runs across it), "
                       "not as a gradient would")
    if stats["residual"] > stats["tolerance"] / 2:
        reasons.append(f"the background is not smooth (it varies by ΔE {stats['residual']:.1f} along the border, "
                       f"tolerance {stats['tolerance']:g})")
    if stats.get("low_contrast", 0) > _MAX_LOW_CONTRAST:
        reasons.append(f"low contrast where the background touches the figure ({100 * stats['low_contrast']:.0f}% "
                       "of the outline)")
    if stats.get("off_field", 0) > _MAX_OFF_FIELD:
        reasons.append(f"the fill took {100 * stats['off_field']:.1f}% of the picture in a colour near, but not "
                       "the background's: maybe a part of the figure in nearly that colour")
    if not _MIN_FIGURE <= stats["figure"] <= _MAX_FIGURE:
        reasons.append(f"the figure covers {100 * stats['figure']:.0f}% of the picture (the fill leaked or found nothing)")
    return Verdict(not reasons, tuple(reasons), stats)


def cut_out_array(rgb8: np.ndarray, tolerance: float = DEFAULT_TOLERANCE) -> Cutout:
    """The cut-out of an opaque (H, W, 3) uint8 picture on a simple background."""
    if tolerance <= 0:
        raise ValueError(f"tolerance must be greater than 0, not {tolerance}")
    rgb = rgb8.astype(np.float32) / 255
    lab = srgb_to_lab(rgb)
    region, stats = background_region(lab, tolerance)
    alpha, colour, low = soft_edge(rgb, region, tolerance, stats["noise"])
    stats["low_contrast"] = round(low, 4)
    bg = rgb8[region].mean(axis=0) if region.any() else rgb8.reshape(-1, 3).mean(axis=0)
    rgba = np.concatenate([colour, alpha[..., None]], axis=-1)
    rgba8 = np.clip(np.rint(rgba * 255), 0, 255).astype(np.uint8)
    return Cutout(rgba8, tuple(int(round(v)) for v in bg), judge(stats))


def cut_out(img, tolerance: float = DEFAULT_TOLERANCE):
    """:func:`cut_out_array` for a Pillow image: (RGBA image, :class:`Verdict`)."""
    from PIL import Image

    result = cut_out_array(np.asarray(img.convert("RGB")), tolerance)
    return Image.fromarray(result.rgba, "RGBA"), result.verdict


def unmix(rgb8: np.ndarray, alpha8: np.ndarray) -> np.ndarray:
    """The cut-out (H, W, 4) uint8 of a picture given its soft mask (e.g. a model's): where the
    mask is partial, the colour of the nearest pure background is un-mixed as in :func:`soft_edge`."""
    rgb = rgb8.astype(np.float32) / 255
    a = alpha8.astype(np.float32) / 255
    r = max(1, round(min(a.shape) / 512))
    bg_near = spread(rgb, a <= 0, 8 * r + 2)
    colour = np.clip((rgb - (1 - a)[..., None] * bg_near) / np.maximum(a, 1e-3)[..., None], 0, 1)
    colour = np.where((a >= 1)[..., None], rgb, colour)
    colour[a <= 0] = 0
    return np.dstack([np.clip(np.rint(colour * 255), 0, 255).astype(np.uint8), alpha8.astype(np.uint8)])
