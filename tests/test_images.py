"""Prepared images: flattening every mode, sizing, deterministic PNGs, corrupt-file errors."""

import io

import pytest
from doit.exceptions import TaskFailed
from PIL import Image, PngImagePlugin

from charbuild.errors import CharbuildError
from charbuild.images import (
    fitted_size,
    flatten,
    prepare_image,
    prepare_image_action,
    read_size,
    verify_image,
)

RED = (255, 0, 0)
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)


def _half_transparent_rgba() -> Image.Image:
    """Left half opaque red, right half fully transparent (with green hidden under alpha 0)."""
    img = Image.new("RGBA", (8, 4), (0, 255, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 4, 4))
    return img


@pytest.mark.parametrize("background, bg", [("black", BLACK), ("white", WHITE)])
def test_flatten_rgba(background, bg):
    out = flatten(_half_transparent_rgba(), background)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((7, 3)) == bg


def test_flatten_half_alpha_blends():
    out = flatten(Image.new("RGBA", (2, 2), (255, 255, 255, 128)), "black")
    assert out.getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("background, bg", [("black", BLACK), ("white", WHITE)])
def test_flatten_la(background, bg):
    img = Image.new("LA", (4, 2), (0, 0))
    img.paste((100, 255), (0, 0, 2, 2))
    out = flatten(img, background)
    assert out.getpixel((0, 0)) == (100, 100, 100)
    assert out.getpixel((3, 1)) == bg


@pytest.mark.parametrize("background, bg", [("black", BLACK), ("white", WHITE)])
def test_flatten_palette_with_trns(tmp_path, background, bg):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 255, 0, 255, 0, 0] + [0] * 762)  # index 0 green (transparent), 1 red
    img.paste(1, (0, 0, 2, 2))
    path = tmp_path / "p.png"
    img.save(path, transparency=0)  # written as a tRNS chunk
    with Image.open(path) as reread:
        assert reread.mode == "P" and "transparency" in reread.info
        out = flatten(reread, background)
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((3, 1)) == bg


def test_flatten_palette_without_transparency():
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert flatten(img, "white").getpixel((0, 0)) == (10, 20, 30)


def test_flatten_l_and_grey_with_trns_key():
    assert flatten(Image.new("L", (2, 2), 77), "white").getpixel((0, 0)) == (77, 77, 77)
    img = Image.new("L", (2, 1), 0)
    img.putpixel((1, 0), 200)
    img.info["transparency"] = 0
    out = flatten(img, "white")
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == (200, 200, 200)


def test_flatten_16bit_grey_is_scaled_not_clipped(tmp_path):
    img = Image.new("I;16", (2, 2), 32896)  # 128.5 * 256
    path = tmp_path / "g16.png"
    img.save(path)
    with Image.open(path) as reread:
        out = flatten(reread, "black")
    assert out.getpixel((0, 0))[0] in (128, 129)


@pytest.mark.parametrize("background", ["black", "white"])
def test_flatten_rgb_jpeg_is_unchanged(tmp_path, background):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (16, 16), (200, 40, 40)).save(path, quality=95)
    with Image.open(path) as img:
        out = flatten(img, background)
    r, g, b = out.getpixel((8, 8))
    assert abs(r - 200) <= 3 and abs(g - 40) <= 3 and abs(b - 40) <= 3


def test_flatten_cmyk_jpeg(tmp_path):
    path = tmp_path / "c.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    with Image.open(path) as img:
        assert img.mode == "CMYK"
        out = flatten(img, "white")
    r, g, b = out.getpixel((8, 8))
    assert r > 240 and g < 15 and b < 15


def test_flatten_rejects_other_backgrounds():
    with pytest.raises(ValueError, match="black, white"):
        flatten(Image.new("RGB", (1, 1)), "grey")


@pytest.mark.parametrize(
    "w, h, size, expected",
    [
        (1024, 1024, 512, (512, 512)),
        (600, 300, 128, (128, 64)),  # landscape
        (300, 600, 128, (64, 128)),  # portrait
        (1000, 333, 512, (512, 170)),  # 170.496 rounds down
        (1000, 335, 512, (512, 172)),  # 171.52 rounds up
        (3, 1000, 128, (1, 128)),  # never 0
        (512, 512, 512, (512, 512)),
        (511, 300, 512, None),  # no upscaling
    ],
)
def test_fitted_size(w, h, size, expected):
    assert fitted_size(w, h, size) == expected


def test_fitted_size_rejects_nonsense():
    with pytest.raises(ValueError):
        fitted_size(0, 10, 10)


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("w, h, size, expected", [(600, 300, 256, (256, 128)), (300, 600, 256, (128, 256)), (100, 50, 512, (100, 50))])
def test_prepare_image_sizes(tmp_path, w, h, size, expected):
    src = _save(Image.new("RGBA", (w, h), (10, 20, 30, 255)), tmp_path / "f00.png")
    dst = tmp_path / "out" / "256" / "f00.png"
    assert prepare_image(src, dst, size, "black") == expected
    with Image.open(dst) as out:
        assert out.size == expected and out.mode == "RGB" and out.format == "PNG"


def test_prepare_image_flattens_before_resizing(tmp_path):
    src = _save(_half_transparent_rgba().resize((64, 32), Image.Resampling.NEAREST), tmp_path / "f00.png")
    dst = tmp_path / "f00_out.png"
    prepare_image(src, dst, 16, "white")
    with Image.open(dst) as out:
        assert out.size == (16, 8)
        assert out.getpixel((0, 4)) == RED
        assert out.getpixel((15, 4)) == WHITE  # no green leaking from under alpha 0


def test_prepare_image_is_deterministic_and_has_no_metadata(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "from a drawing tool")
    src = _save(_half_transparent_rgba().resize((300, 200)), tmp_path / "f00.png", pnginfo=info, dpi=(300, 300))
    prepare_image(src, tmp_path / "a.png", 128, "black")
    prepare_image(src, tmp_path / "b.png", 128, "black")
    a, b = (tmp_path / "a.png").read_bytes(), (tmp_path / "b.png").read_bytes()
    assert a == b
    for chunk in (b"tEXt", b"iTXt", b"zTXt", b"pHYs", b"iCCP", b"eXIf", b"tIME"):
        assert chunk not in a


def test_prepare_image_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (100, 50), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    src = _save(img, tmp_path / "f00.jpg", exif=exif.tobytes())
    assert read_size(src) == (50, 100)
    assert prepare_image(src, tmp_path / "o.png", 64, "black") == (32, 64)


def test_read_size_and_verify(tmp_path):
    src = _save(Image.new("RGB", (123, 45)), tmp_path / "f00.png")
    assert read_size(src) == (123, 45)
    assert verify_image(src) is None


def test_corrupt_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "f01.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(CharbuildError) as info:
        read_size(bad)
    assert info.value.path == str(bad) and "corrupt" in info.value.message
    assert str(bad) in str(info.value)
    with pytest.raises(CharbuildError) as info:
        prepare_image(bad, tmp_path / "out.png", 128, "black")
    assert info.value.path == str(bad)
    assert not (tmp_path / "out.png").exists()
    assert "corrupt" in verify_image(bad)


def test_truncated_file_is_caught_by_verify_and_prepare(tmp_path):
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    bad = tmp_path / "f02.png"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert read_size(bad) == (64, 64)  # the header is intact
    assert verify_image(bad) is not None
    with pytest.raises(CharbuildError):
        prepare_image(bad, tmp_path / "out.png", 32, "black")


def test_prepare_image_action(tmp_path):
    good = _save(Image.new("RGB", (64, 64)), tmp_path / "f00.png")
    assert prepare_image_action(str(good), str(tmp_path / "o.png"), 32, "white") is True
    bad = tmp_path / "f03.png"
    bad.write_bytes(b"junk")
    result = prepare_image_action(str(bad), str(tmp_path / "p.png"), 32, "white")
    assert isinstance(result, TaskFailed)
    assert "f03.png" in str(result)


def test_prepare_image_action_prints_its_place_in_the_image_stage(tmp_path, capsys):
    good = _save(Image.new("RGB", (64, 48)), tmp_path / "f00.png")
    assert prepare_image_action(str(good), str(tmp_path / "o.png"), 32, "white", (3, 40)) is True
    assert capsys.readouterr().err == f"charbuild: picture 3/40: {(tmp_path / 'o.png').as_posix()} (32x24)\n"


def test_the_builtin_trainer_reads_a_transparent_picture_flattened_on_white(tmp_path):
    """Transparency, a palette's transparent colour (tRNS) included, becomes white as images.flatten does."""
    pytest.importorskip("torch")
    from charbuild.train.builtin.data import load_image_tensor

    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.save(tmp_path / "a.png")
    grey = Image.new("L", (8, 8), 7)
    grey.save(tmp_path / "t.png", transparency=7)
    for name in ("a.png", "t.png"):
        t = load_image_tensor(tmp_path / name, (8, 8))
        assert t.shape == (3, 8, 8) and float(t.min()) == 1.0, name  # white in [-1, 1]
