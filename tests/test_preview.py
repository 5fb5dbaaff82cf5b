"""Contact sheet: angle-grid layout, Japanese captions, deterministic bytes, doit action."""

from pathlib import Path

import pytest
from doit.exceptions import TaskFailed
from PIL import Image

from charbuild.captions import caption_text
from charbuild.errors import CharbuildError
from charbuild.preview import PreviewEntry, render_preview, render_preview_action, wrap_text


def _entries(tmp_path: Path, codes, lead=("krnk",)):
    entries = []
    for i, code in enumerate(codes):
        path = tmp_path / f"{code}.png"
        Image.new("RGB", (64, 48 + i), (40 * i % 256, 100, 200)).save(path)
        entries.append(PreviewEntry(path, code, caption_text(code, list(lead))))
    return entries


def test_renders_japanese_captions(tmp_path):
    entries = _entries(tmp_path, ["f00", "f01", "f10"], lead=("黒猫", "セーラー服"))
    out = tmp_path / "out" / "preview.png"
    render_preview(entries, out, title="黒猫 krnk")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        # two rows (f0x, f1x), two columns
        assert img.width == 8 + 2 * (192 + 8)
        assert img.height > 2 * 192


def test_grid_follows_angle_order(tmp_path):
    entries = _entries(tmp_path, ["f12", "b00", "f00", "f04", "f02", "f01", "f03"])
    render_preview(entries, tmp_path / "p.png", title="t", cell=64)
    with Image.open(tmp_path / "p.png") as img:
        assert img.width == 8 + 5 * (64 + 8)  # widest row: f00..f04
        # the first thumbnail is f00's (colour of entry index 2), centred in its cell
        assert img.getpixel((8 + 32, 30 + 32)) == (80, 100, 200)


def test_deterministic_bytes(tmp_path):
    entries = _entries(tmp_path, ["f00", "f24", "b03"])
    render_preview(entries, tmp_path / "a.png", title="krnk")
    render_preview(list(reversed(entries)), tmp_path / "b.png", title="krnk")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_empty_preview(tmp_path):
    render_preview([], tmp_path / "e.png", title="nothing")
    assert (tmp_path / "e.png").exists()


def test_unreadable_image(tmp_path):
    bad = tmp_path / "f00.png"
    bad.write_bytes(b"junk")
    with pytest.raises(CharbuildError) as info:
        render_preview([PreviewEntry(bad, "f00", "x")], tmp_path / "p.png", title="t")
    assert info.value.path == str(bad)
    assert not (tmp_path / "p.png").exists()


def test_action(tmp_path):
    entries = _entries(tmp_path, ["f00"])
    tuples = [(str(e.image_path), e.code, e.caption) for e in entries]
    assert render_preview_action(tuples, str(tmp_path / "p.png"), "krnk") is True
    assert (tmp_path / "p.png").exists()
    failed = render_preview_action([(str(tmp_path / "missing.png"), "f00", "x")], str(tmp_path / "q.png"), "krnk")
    assert isinstance(failed, TaskFailed) and "missing.png" in str(failed)


def test_wrap_text():
    length = len  # one unit per character
    assert wrap_text("aa, bb, cc", 6, length) == ["aa,", "bb, cc"]
    assert all(len(line) <= 6 for line in wrap_text("white background, black background", 6, length))
    assert wrap_text("黒猫黒猫黒猫黒猫", 3, length) == ["黒猫黒", "猫黒猫", "黒猫"]
    assert "".join(wrap_text("abc def", 100, length)) == "abc def"
