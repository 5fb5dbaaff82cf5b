"""Image codes: parsing, template sets, angle-grid order."""

import pytest

from charbuild.codes import (
    ALL_CODES,
    CODE_RE,
    IMAGE_EXTENSIONS,
    MIRROR_CODES,
    TEMPLATE_CODES,
    angle_order_key,
    is_image_file,
    parse_code,
)


@pytest.mark.parametrize(
    "name, code",
    [
        ("f00.png", "f00"),
        ("f00-smile.png", "f00"),
        ("f00_2.png", "f00"),
        ("B27.JPG", "b27"),
        ("F14", "f14"),
        ("b105.png", "b10"),  # anything may follow the code
        ("f30.png", None),  # v only 0..2
        ("f08.png", None),  # h only 0..7
        ("x00.png", None),
        ("face-f00.png", None),  # the code must come first
        ("f0.png", None),
        ("", None),
    ],
)
def test_parse_code(name, code):
    assert parse_code(name) == code


def test_code_re_is_anchored_and_case_insensitive():
    assert CODE_RE.match("F12abc")
    assert not CODE_RE.match("af12")


def test_template_codes():
    assert TEMPLATE_CODES["f"] == (
        "f00", "f01", "f02", "f03", "f04",
        "f10", "f11", "f12", "f13", "f14",
        "f20", "f21", "f22", "f23", "f24",
    )
    assert TEMPLATE_CODES["b"] == tuple("b" + c[1:] for c in TEMPLATE_CODES["f"])


def test_mirror_codes():
    assert MIRROR_CODES["f"] == ("f05", "f06", "f07", "f15", "f16", "f17", "f25", "f26", "f27")
    assert MIRROR_CODES["b"] == tuple("b" + c[1:] for c in MIRROR_CODES["f"])


def test_all_codes():
    assert len(ALL_CODES) == 48 == len(set(ALL_CODES))
    assert set(ALL_CODES) == set(TEMPLATE_CODES["f"] + TEMPLATE_CODES["b"] + MIRROR_CODES["f"] + MIRROR_CODES["b"])
    assert all(parse_code(c) == c for c in ALL_CODES)


def test_angle_order_key_sorts_rows_then_columns():
    shuffled = ["b00", "f21", "f07", "f10", "f00", "F02"]
    assert sorted(shuffled, key=angle_order_key) == ["f00", "F02", "f07", "f10", "f21", "b00"]
    assert sorted(reversed(ALL_CODES), key=angle_order_key) == list(ALL_CODES)


def test_angle_order_key_rejects_non_codes():
    with pytest.raises(ValueError, match="not an image code"):
        angle_order_key("f09")


def test_image_extensions():
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".webp")
    assert is_image_file("f00.PNG") and is_image_file("a.jpeg") and not is_image_file("f00.txt")
