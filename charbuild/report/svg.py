"""SVG charts drawn as text: the loss curves and the block-weight bar (pure functions, no JS).

The markup is deterministic (fixed number formatting), so the same data gives the same page
and a rebuilt report with unchanged data has unchanged bytes.
"""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

from .metrics import LossLog

SERIES_COLOURS = {"loss": "#4a90d9", "val_loss": "#e8833a"}
SERIES_LABELS = {"loss": "training loss", "val_loss": "validation loss"}


def _f(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".") if x != int(x) else str(int(x))


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (1, 2, 5 × 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("tick range must be finite")
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda st: abs((hi - lo) / st - (count - 1)))
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.001:
        return f"{v:.3g}"
    return f"{v:.4g}"


#: Colours of the identity curves (one per member of a group LoRA), in turn.
MEMBER_COLOURS = ("#6cc070", "#d96cc0", "#d9c46c", "#6cc0d9")
#: A curve with at least this many points also gets a smoothed line over its raw points.
SMOOTH_FROM = 8


def smoothed(points: Sequence[tuple[int, float]], window: int | None = None) -> list[tuple[int, float]]:
    """A centred moving average of ``points`` (window: about a tenth of them, odd, at least 3)."""
    n = len(points)
    w = window or max(3, (n // 10) | 1)
    half = w // 2
    out = []
    for i, (s, _) in enumerate(points):
        chunk = [v for _, v in points[max(0, i - half): i + half + 1]]
        out.append((s, sum(chunk) / len(chunk)))
    return out


def loss_chart_svg(log: LossLog, *, width: int = 640, height: int = 260, title: str = "loss") -> str:
    """An inline ``<svg>`` with one polyline per curve (training loss, validation loss).

    Each polyline has ``class="series <name>"`` and ``data-count`` = its number of points; a noisy
    training loss (:data:`SMOOTH_FROM` points or more) is drawn faint with a smoothed line
    (``class="smoothed <name>"``) over it. Raises ``ValueError`` when ``log`` has no points (the
    caller says so in words instead).
    """
    series = {name: pts for name, pts in (("loss", log.loss), ("val_loss", log.val_loss)) if pts}
    if not series:
        raise ValueError("no loss values to draw")
    return line_chart_svg(series, SERIES_COLOURS, SERIES_LABELS, width=width, height=height, title=title)


def identity_chart_svg(log: LossLog, *, width: int = 640, height: int = 200) -> str:
    """The identity distance per sample step, one polyline per member (``class="series identity"``)."""
    series = {member: pts for member, pts in log.identity.items() if pts}
    if not series:
        raise ValueError("no identity values to draw")
    colours = {m: MEMBER_COLOURS[i % len(MEMBER_COLOURS)] for i, m in enumerate(series)}
    labels = {m: f"identity distance {m}" for m in series}
    return line_chart_svg(series, colours, labels, width=width, height=height, title="identity distance (lower is closer)",
                          css="identity")


def line_chart_svg(series: dict, colours: dict, labels: dict, *, width: int, height: int, title: str,
                   css: str | None = None) -> str:
    """An inline ``<svg>`` line chart of ``series`` (name -> (step, value) points), y from the data."""
    left, right, top, bottom = 56, 12, 24, 34
    pw, ph = width - left - right, height - top - bottom
    steps = [s for pts in series.values() for s, _ in pts]
    values = [v for pts in series.values() for _, v in pts]
    x0, x1 = min(0, min(steps)), max(steps)
    y0, y1 = min(values), max(values)
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1.0), y1 + (abs(y1) * 0.1 or 1.0)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def sx(s: float) -> float:
        return left + (s - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    out = [f'<svg class="loss-chart" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="plot"/>']
    for t in nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{left}" y1="{_f(y)}" x2="{left + pw}" y2="{_f(y)}" class="grid"/>'
                   f'<text x="{left - 4}" y="{_f(y + 4)}" text-anchor="end">{_tick_label(t)}</text>')
    for t in nice_ticks(x0, x1):
        x = sx(t)
        out.append(f'<line x1="{_f(x)}" y1="{top + ph}" x2="{_f(x)}" y2="{top + ph + 4}" class="axis"/>'
                   f'<text x="{_f(x)}" y="{top + ph + 16}" text-anchor="middle">{_tick_label(t)}</text>')
    out.append(f'<text x="{left + pw / 2:.0f}" y="{height - 2}" text-anchor="middle">step</text>')
    legend_x = left + 8
    for name, pts in series.items():
        colour = colours[name]
        coords = " ".join(f"{_f(sx(s))},{_f(sy(v))}" for s, v in pts)
        smooth = css is None and len(pts) >= SMOOTH_FROM
        cls = f"series {css} {escape(name)}" if css else f"series {name}"
        faint = ' stroke-opacity="0.35"' if smooth else ""
        out.append(f'<polyline class="{cls}" data-count="{len(pts)}" fill="none" stroke="{colour}" '
                   f'stroke-width="{1 if smooth else 1.5}"{faint} points="{coords}"/>')
        if smooth:
            line = " ".join(f"{_f(sx(s))},{_f(sy(v))}" for s, v in smoothed(pts))
            out.append(f'<polyline class="smoothed {name}" fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>')
        if len(pts) == 1 or css:  # a single point draws no line: mark it (and every sample step)
            for s, v in pts:
                out.append(f'<circle cx="{_f(sx(s))}" cy="{_f(sy(v))}" r="3" fill="{colour}"/>')
        label = f"{labels[name]} ({len(pts)} points, last {_tick_label(pts[-1][1])})"
        out.append(f'<rect x="{legend_x}" y="8" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{legend_x + 14}" y="17">{escape(label)}</text>')
        legend_x += 14 + 7 * len(label) + 16
    out.append("</svg>")
    return "".join(out)


def short_block_label(name: str) -> str:
    """``IN04`` -> ``I04``, ``OUT11`` -> ``O11``, ``M00`` -> ``M``, ``BASE`` -> ``B``: fits under a bar."""
    if name == "BASE":
        return "B"
    if name.startswith("M"):
        return "M"
    return name[0] + name.lstrip("INOUT")


def block_bar_svg(blocks: Sequence[tuple[str, float]], *, cell: int = 26, height: int = 120) -> str:
    """An inline ``<svg>`` bar chart of block weights: one bar per ``(block name, weight)``.

    Bars grow up from the zero line for positive weights and down for negative ones; each bar
    has ``class="block"``, ``data-block`` and ``data-weight``, and a tooltip.
    """
    if not blocks:
        raise ValueError("no block weights to draw")
    values = [v for _, v in blocks]
    top_v = max(1.0, max(values))
    low_v = min(0.0, min(values))
    label_h, top = 22, 14
    ph = height - label_h - top
    width = len(blocks) * cell + 8

    def sy(v: float) -> float:
        return top + (top_v - v) / (top_v - low_v) * ph

    zero = sy(0)
    out = [f'<svg class="block-bar" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="merge weights, {len(blocks)} blocks">']
    for i, (name, v) in enumerate(blocks):
        x = 4 + i * cell
        y, h = (sy(v), zero - sy(v)) if v >= 0 else (zero, sy(v) - zero)
        cls = "block zero" if v == 0 else "block"
        out.append(f'<g><title>{escape(name)}: {_f(v)}</title>'
                   f'<rect class="{cls}" data-block="{escape(name)}" data-weight="{_f(v)}" x="{x + 2}" y="{_f(y)}" '
                   f'width="{cell - 4}" height="{_f(max(h, 0))}"/>'
                   f'<text x="{x + cell / 2:.0f}" y="{top - 3}" text-anchor="middle" class="value">{_f(v)}</text>'
                   f'<text x="{x + cell / 2:.0f}" y="{height - label_h + 14}" text-anchor="middle" class="name">'
                   f'{escape(short_block_label(name))}</text></g>')
    out.append(f'<line x1="2" y1="{_f(zero)}" x2="{width - 2}" y2="{_f(zero)}" class="axis"/></svg>')
    return "".join(out)


def change_bar_svg(blocks: Sequence[tuple[str, float]], *, title: str, cell: int = 30, height: int = 170) -> str:
    """An inline ``<svg>`` bar chart of signed changes per block (scaled to the largest one): bars
    up for a positive change, down for a negative one, the value above each bar."""
    if not blocks:
        raise ValueError("no blocks to draw")
    scale = max([abs(v) for _, v in blocks] + [1e-9])
    label_h, top = 34, 28
    half = (height - label_h - top) / 2
    zero = top + half
    width = max(len(blocks) * cell + 8, 6 * len(title) + 110)
    out = [f'<svg class="change-bar" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="{escape(title)}"><text x="4" y="12">{escape(title)} (values ×1000)</text>']
    for i, (name, v) in enumerate(blocks):
        x = 4 + i * cell
        h = abs(v) / scale * half
        y = zero - h if v >= 0 else zero
        cls = "change up" if v > 0 else "change down" if v < 0 else "change zero"
        out.append(f'<g><title>{escape(name)}: {v:+.4f}</title>'
                   f'<rect class="{cls}" data-block="{escape(name)}" data-change="{v:.4f}" x="{x + 3}" y="{y:.1f}" '
                   f'width="{cell - 6}" height="{max(h, 0.5):.1f}"/>'
                   f'<text x="{x + cell / 2:.0f}" y="{(y - 3 if v >= 0 else y + h + 10):.1f}" text-anchor="middle" '
                   f'class="value">{v * 1000:+.0f}</text>'
                   f'<text x="{x + cell / 2:.0f}" y="{height - label_h + 14}" text-anchor="middle" class="name">'
                   f'{escape(short_block_label(name))}</text></g>')
    out.append(f'<line x1="2" y1="{zero:.1f}" x2="{width - 2}" y2="{zero:.1f}" class="axis"/></svg>')
    return "".join(out)
