"""The identity distance on hand-made pairs: identical, background swapped, shifted colours, another character."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from charbuild import identity

ROOT = Path(__file__).resolve().parent.parent


def figure(hair=(28, 28, 38), outfit=(35, 45, 100), skin=(250, 222, 200), bg=(0, 0, 0), ears=True, size=128):
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size / 128
    d.rectangle((40 * s, 60 * s, 88 * s, 120 * s), fill=outfit)  # body
    d.ellipse((38 * s, 14 * s, 90 * s, 66 * s), fill=hair)  # hair
    d.ellipse((48 * s, 28 * s, 80 * s, 62 * s), fill=skin)  # face
    if ears:
        d.polygon([(40 * s, 30 * s), (46 * s, 4 * s), (58 * s, 20 * s)], fill=hair)
        d.polygon([(88 * s, 30 * s), (82 * s, 4 * s), (70 * s, 20 * s)], fill=hair)
    return np.asarray(img, dtype=np.float64)


def test_identical_pictures_are_at_distance_zero():
    a = figure()
    assert identity.distance_arrays(a, a.copy()) == 0.0


def test_the_background_does_not_count():
    on_black, on_white = figure(bg=(0, 0, 0)), figure(bg=(255, 255, 255))
    assert identity.distance_arrays(on_white, on_black) < 0.05


def framed(rgb: np.ndarray, shift: float, width: int = 2) -> np.ndarray:
    """``rgb`` with its outermost ``width`` pixels a shade off (``shift`` per channel): a VAE decoder's edge."""
    out = rgb.copy()
    for sl in (np.s_[:width], np.s_[-width:]):
        out[sl] = np.clip(out[sl] + shift, 0, 255)
        out[:, sl] = np.clip(rgb[:, sl] + shift, 0, 255)
    return out


@pytest.mark.parametrize("bg,shift", [((255, 255, 255), -25.0), ((0, 0, 0), 25.0)])
def test_an_off_shade_frame_is_not_the_background(bg, shift):
    """A decoder's darker (lighter) edge on a white (black) picture: the same figure, near 0
    (with the outermost ring as the background the whole background counted as figure: 0.6)."""
    ref = figure(bg=bg, size=64)
    assert identity.distance_arrays(framed(ref, shift), ref) < 0.05
    other = figure(hair=(242, 150, 192), outfit=(246, 246, 250), skin=(140, 95, 65), ears=False, bg=bg, size=64)
    assert identity.distance_arrays(framed(other, shift), ref) > 0.4  # another character stays far


def test_the_distance_grows_with_a_colour_shift():
    ref = figure()
    small = figure(hair=(60, 40, 30))  # black hair turning dark brown
    large = figure(hair=(150, 92, 48))  # brown hair
    d_small, d_large = identity.distance_arrays(small, ref), identity.distance_arrays(large, ref)
    assert 0 < d_small < d_large
    assert d_large > 0.15


def test_another_character_is_far():
    ref = figure()
    other = figure(hair=(242, 150, 192), outfit=(246, 246, 250), skin=(140, 95, 65), ears=False)
    shifted = figure(hair=(60, 40, 30))
    assert identity.distance_arrays(other, ref) > 2 * identity.distance_arrays(shifted, ref)
    assert identity.distance_arrays(other, ref) > 0.4


def test_an_empty_sample_is_as_far_as_can_be_in_colour():
    blank = np.zeros((64, 64, 3))
    assert identity.distance_arrays(blank, figure()) == pytest.approx(1.0)


def test_size_does_not_matter():
    big, small = figure(size=256), figure(size=64)
    assert identity.distance_arrays(small, big) < 0.05


def test_example_characters_files():
    kuro = ROOT / "characters" / "kuroneko" / "face" / "f00.png"
    cha = ROOT / "characters" / "chaneko" / "face" / "f00.png"
    same = identity.distance(kuro, kuro)
    other = identity.distance(cha, kuro)
    assert same == 0.0 and other > 0.15  # the same skin and pose: hair and eyes differ


def test_identity_gain_summary():
    gain = identity.identity_gain({"f00": 0.5, "f01": 0.4, "f02": 0.3}, {"f00": 0.2, "f01": 0.2, "f02": 0.35})
    assert gain["before"] == pytest.approx(0.4) and gain["after"] == pytest.approx(0.25)
    assert gain["drop"] == pytest.approx(0.375) and gain["closer"] == pytest.approx(2 / 3) and gain["codes"] == 3
    assert identity.identity_gain({}, {"f00": 1.0})["before"] is None
