"""charbuild.background: the built-in background cut-out on hand-made pictures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from charbuild.background import cut_out, cut_out_array, grow, srgb_to_lab

SIZE = 160
FIGURE = np.array([200, 60, 50], np.float32)


def disk_alpha(cy=80, cx=80, r=45, size=SIZE, ss=4):
    """An antialiased disk's coverage (4x4 supersampled), plus a body rectangle below it."""
    yy, xx = np.mgrid[0:size * ss, 0:size * ss] / ss
    inside = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2)
    return inside.reshape(size, ss, size, ss).mean((1, 3)).astype(np.float32)


def composite(alpha, background, figure=FIGURE):
    pic = alpha[..., None] * figure + (1 - alpha[..., None]) * background
    return np.clip(np.rint(pic), 0, 255).astype(np.uint8)


def flat(colour, sigma=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return np.asarray(colour, np.float32) + rng.normal(0, sigma, (SIZE, SIZE, 3)).astype(np.float32)


def iou(cut, alpha):
    est, true = cut.rgba[..., 3] >= 128, alpha >= 0.5
    return (est & true).sum() / (est | true).sum()


def on_new_colour(cut, new):
    a = cut.rgba[..., 3:].astype(np.float32) / 255
    return a * cut.rgba[..., :3] + (1 - a) * np.asarray(new, np.float32)


def test_lab_reference_values():
    lab = srgb_to_lab(np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], np.float32))
    assert np.allclose(lab[0], [100, 0, 0], atol=0.05)
    assert np.allclose(lab[1], [53.24, 80.09, 67.20], atol=0.05)
    assert np.allclose(lab[2], [0, 0, 0], atol=0.05)


def test_grow_follows_connections_only():
    allowed = np.array([[1, 1, 0, 1],
                        [0, 1, 0, 1],
                        [1, 1, 0, 1],
                        [1, 0, 0, 1]], bool)
    seeds = np.zeros_like(allowed)
    seeds[0, 0] = True
    grown = grow(allowed, seeds)
    assert grown.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]


def test_flat_background_soft_edge_without_halo():
    alpha = disk_alpha()
    old = (235, 235, 235)
    cut = cut_out_array(composite(alpha, flat(old)))
    assert cut.verdict.sure, cut.verdict.reasons
    assert iou(cut, alpha) > 0.99
    edge = (alpha > 0) & (alpha < 1)
    assert np.abs(cut.rgba[..., 3][edge] / 255 - alpha[edge]).max() < 0.03
    # on black the edge is the figure's colour fading out, with no grey of the old background
    truth = alpha[..., None] * FIGURE
    assert np.abs(on_new_colour(cut, (0, 0, 0)) - truth)[edge].max() < 6
    assert cut.background == old


def test_hard_cut_would_leave_a_halo():
    """The refinement matters: the same mask without un-mixing leaves the old colour."""
    alpha = disk_alpha()
    pic = composite(alpha, flat((235, 235, 235)))
    edge = (alpha > 0.05) & (alpha < 0.5)
    hard = np.where((alpha >= 0.05)[..., None], pic, 0).astype(np.float32)
    assert np.abs(hard - alpha[..., None] * FIGURE)[edge].max() > 60


def test_vertical_gradient():
    t = np.linspace(0, 1, SIZE, dtype=np.float32)[:, None, None]
    bg = np.broadcast_to((1 - t) * np.array([60, 70, 120]) + t * np.array([230, 230, 200]), (SIZE, SIZE, 3))
    alpha = disk_alpha()
    cut = cut_out_array(composite(alpha, bg))
    assert cut.verdict.sure, cut.verdict.reasons
    assert iou(cut, alpha) > 0.98


def test_noisy_background():
    alpha = disk_alpha()
    cut = cut_out_array(composite(alpha, flat((220, 225, 230), sigma=7)))
    assert cut.verdict.sure, cut.verdict.reasons
    assert iou(cut, alpha) > 0.97


def test_jpeg_artefacts():
    alpha = disk_alpha()
    buf = io.BytesIO()
    Image.fromarray(composite(alpha, flat((240, 240, 240)))).save(buf, "JPEG", quality=75)
    img = Image.open(io.BytesIO(buf.getvalue()))
    rgba, verdict = cut_out(img)
    assert verdict.sure, verdict.reasons
    assert rgba.mode == "RGBA" and rgba.size == (SIZE, SIZE)
    est = np.asarray(rgba)[..., 3] >= 128
    assert (est & (alpha >= 0.5)).sum() / (est | (alpha >= 0.5)).sum() > 0.97


def test_soft_floor_shadow_is_background():
    alpha = disk_alpha(cy=70)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    shade = 1 - 0.3 * np.exp(-(((yy - 125) / 12) ** 2 + ((xx - 80) / 40) ** 2) * 1.5)
    bg = flat((230, 230, 235)) * shade[..., None]
    cut = cut_out_array(composite(alpha, bg))
    assert iou(cut, alpha) > 0.98
    assert cut.rgba[125, 80, 3] == 0  # the shadow's centre


def test_figure_touching_the_bottom_border():
    """A bust shot: the body runs off the bottom edge; it stays figure."""
    alpha = disk_alpha(cy=60, r=35)
    alpha[100:, 40:120] = 1
    cut = cut_out_array(composite(alpha, flat((240, 240, 240), sigma=2)))
    assert cut.verdict.sure, cut.verdict.reasons
    assert iou(cut, alpha) > 0.98
    assert (cut.rgba[-1, 45:115, 3] == 255).all()


def test_figure_covering_the_border_is_unsure():
    """The figure runs off the left, right and bottom edges: most of the border is figure."""
    alpha = np.zeros((SIZE, SIZE), np.float32)
    alpha[60:] = 1
    cut = cut_out_array(composite(alpha, flat((240, 240, 240))))
    assert not cut.verdict.sure
    assert any("border" in r for r in cut.verdict.reasons)


def test_low_contrast_is_unsure():
    alpha = disk_alpha()
    figure = np.array([228, 228, 222], np.float32)  # ΔE ~3 from the background
    cut = cut_out_array(composite(alpha, flat((232, 232, 232)), figure))
    assert not cut.verdict.sure
    assert cut.verdict.reasons


def test_busy_background_is_unsure():
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 255, (10, 10, 3)).astype(np.uint8)
    bg = np.asarray(Image.fromarray(blocks).resize((SIZE, SIZE), Image.Resampling.NEAREST), np.float32)
    cut = cut_out_array(composite(disk_alpha(), bg))
    assert not cut.verdict.sure


def test_tolerance_must_be_positive():
    with pytest.raises(ValueError):
        cut_out_array(np.zeros((8, 8, 3), np.uint8), 0)


@pytest.mark.parametrize("background, sigma, part", [
    ((230, 230, 230), 1.5, (236, 228, 222)),   # a pale shirt, ΔE ~6, on a slightly noisy grey
    ((250, 226, 206), 0.0, (250, 222, 200)),   # skin on a skin-coloured ground, ΔE ~2.4, clean
], ids=["pale-shirt", "skin-on-skin"])
def test_a_fill_that_leaks_into_a_near_background_colour_is_unsure(background, sigma, part):
    """A figure part in nearly the background's colour (another hue: no shadow) is taken by the
    fill; the verdict says so instead of calling it sure."""
    alpha = disk_alpha(cy=50, r=30)
    pic = composite(alpha, flat(background, sigma=sigma))
    pic[85:150, 35:125] = part  # without an outline
    cut = cut_out_array(pic)
    assert cut.rgba[120, 80, 3] == 0  # it went
    assert not cut.verdict.sure
    assert any("near, but not the background's" in r for r in cut.verdict.reasons)
