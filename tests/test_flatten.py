"""Opaque pictures: the [flatten] settings, the mask stage's incremental contract, `check`."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from charbuild.config import load_project
from charbuild.errors import ConfigError
from graphtools import build, groups
from conftest import run_cli as run
from flatten_fixtures import GREY, digest, flatten_project, opaque_picture, set_flatten

# --------------------------------------------------------------------------- settings


def test_defaults_and_per_picture_rules(tmp_path):
    root = flatten_project(tmp_path, '[flatten]\ntolerance = 14\n[flatten.pictures]\n"FACE/f01.jpg" = "keep"\n'
                                     '"face/f00.png" = { method = "flood", tolerance = 6 }\n')
    ch = load_project(root).characters["alice"]
    assert ch.background == "black"  # the fill colour is untouched
    assert ch.flatten.rule_for("face/f02.png").method == "auto" and ch.flatten.rule_for("face/f02.png").tolerance == 14
    assert ch.flatten.rule_for("face/f01.jpg").method == "keep"  # keys compare case-insensitively
    assert (ch.flatten.rule_for("face/f00.png").method, ch.flatten.rule_for("face/f00.png").tolerance) == ("flood", 6)
    assert load_project(root).characters["bob"].flatten.rule.method == "auto"


@pytest.mark.parametrize("table, line, words", [
    ('[flatten]\nmethod = "floood"\n', 2, "did you mean 'flood'"),
    ('[flatten]\ntolerance = -3\n', 2, "greater than 0"),
    ('[flatten]\ntolerence = 3\n', 2, "did you mean 'tolerance'"),
    ('[flatten]\n[flatten.pictures]\n"face/f00.pgn" = "keep"\n', 3, "did you mean 'face/f00.png'"),
    ('[flatten]\n[flatten.pictures]\n"face/f00.png" = 3\n', 3, "must be a method"),
    ('[flatten]\nmethod = "model"\n', 1, "needs the model file"),
    ('[flatten]\nmethod = "model"\nmodel = "models/none.onnx"\n', 3, "does not exist"),
], ids=["method", "tolerance", "unknown-key", "picture-key", "picture-value", "model-missing", "model-file"])
def test_bad_settings_name_file_and_line(tmp_path, table, line, words):
    """``line`` counts from the [flatten] line, which follows the character's own lines."""
    root = flatten_project(tmp_path)
    toml = root / "characters/alice/character.toml"
    before = len(toml.read_text(encoding="utf-8").splitlines())
    set_flatten(root, table)
    line += before
    with pytest.raises(ConfigError) as exc:
        load_project(root)
    shown = [str(p) for p in exc.value.problems()]
    assert any(s.startswith(f"characters/alice/character.toml:{line}: error:") and words in s for s in shown), shown


def test_model_method_without_the_extra_is_a_config_error(tmp_path, monkeypatch):
    import charbuild.flatten_settings as fs

    monkeypatch.setattr(fs, "rembg_available", lambda: False)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    root = flatten_project(tmp_path, f'[flatten]\nmethod = "model"\nmodel = "{(tmp_path / "m.onnx").as_posix()}"\n')
    with pytest.raises(ConfigError) as exc:
        load_project(root)
    assert any("pip install 'charbuild[rembg]'" in str(p) and "character.toml:" in str(p) for p in exc.value.problems())


# --------------------------------------------------------------------------- the graph


def test_opaque_pictures_get_masks_and_sources_stay(tmp_path):
    root = flatten_project(tmp_path)
    sources = {p: digest(p) for p in (root / "characters").rglob("*.*") if p.suffix in (".png", ".jpg")}
    ran = groups(build(root))
    assert ran["mask"] == {"alice/face/f00", "alice/face/f01"}  # the RGBA pictures keep today's path
    mask_dir = root / "build/images/alice/face/mask"
    assert sorted(p.name for p in mask_dir.iterdir()) == ["f00.json", "f00.png", "f01.json", "f01.png"]
    verdict = json.loads((mask_dir / "f00.json").read_text(encoding="utf-8"))
    assert verdict["sure"] and verdict["flattened"] and verdict["method"] == "flood"
    # the prepared picture: the figure on black, the grey gone
    prepared = np.asarray(Image.open(root / "build/images/alice/face/96/f00.png"))
    assert tuple(prepared[2, 2]) == (0, 0, 0) and tuple(prepared[30, 48]) == (200, 60, 50)
    assert {p: digest(p) for p in sources} == sources
    assert build(root) == set()


def test_tolerance_rebuilds_masks_and_downstream_only(tmp_path):
    root = flatten_project(tmp_path)
    build(root, "image", "caption", "dataset", "preview")
    downstream = {f"image:alice/face/{s}@{n}" for s in ("f00", "f01") for n in (64, 96)} | {"preview:alc", "preview:alcdr"}
    set_flatten(root, "[flatten]\ntolerance = 12\n")
    ran = build(root, "image", "caption", "dataset", "preview")
    assert {n for n in ran if n.startswith("mask:")} == {"mask:alice/face/f00", "mask:alice/face/f01"}
    assert {n for n in ran if not n.startswith("mask:")} <= downstream
    # the clean PNG's cut-out came out the same: its prepared pictures are not redone (md5 cut-off)
    assert "image:alice/face/f00@96" not in ran
    set_flatten(root, "[flatten]\ntolerance = 90\n")  # so loose the figure goes too
    ran = build(root, "image", "caption", "dataset", "preview")
    assert {n for n in ran if n.startswith("mask:")} == {"mask:alice/face/f00", "mask:alice/face/f01"}
    assert {n for n in ran if not n.startswith("mask:")} <= downstream
    assert "image:alice/face/f00@96" in ran and "preview:alc" in ran


def test_per_picture_keep_and_fill_colour(tmp_path):
    root = flatten_project(tmp_path)
    build(root, "image")
    set_flatten(root, '[flatten]\n[flatten.pictures]\n"face/f01.jpg" = "keep"\n')
    ran = groups(build(root, "image", "_prune"))
    assert "mask" not in ran and ran["image"] == {"alice/face/f01@64", "alice/face/f01@96"}
    assert not (root / "build/images/alice/face/mask/f01.png").exists()  # pruned
    kept = np.asarray(Image.open(root / "build/images/alice/face/96/f01.png"))
    assert abs(int(kept[2, 2, 0]) - GREY[0]) < 6  # its own background kept
    toml = root / "characters/alice/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace('background = "black"', 'background = "white"'), encoding="utf-8")
    ran = groups(build(root, "image"))
    assert "mask" not in ran  # the cut-out does not depend on the fill colour
    assert {"alice/face/f00@96", "alice/face/f00@64"} <= ran["image"]
    assert tuple(np.asarray(Image.open(root / "build/images/alice/face/96/f00.png"))[2, 2]) == (255, 255, 255)


def test_editing_or_touching_a_picture(tmp_path):
    root = flatten_project(tmp_path)
    build(root, "image")
    src = root / "characters/alice/face/f00.png"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert build(root, "image") == set()
    opaque_picture(src, seed=6)
    ran = groups(build(root, "image"))
    assert ran == {"mask": {"alice/face/f00"}, "image": {"alice/face/f00@64", "alice/face/f00@96"}}


def test_check_lists_unsure_pictures(tmp_path, capsys):
    root = flatten_project(tmp_path)
    opaque_picture(root / "characters/alice/face/f00.png", figure=(230, 230, 228))  # ΔE ~2 from the grey
    code, out, err = run(capsys, "check", "--root", str(root))
    assert code == 0, err
    line = next(x for x in err.splitlines() if x.startswith("characters/alice/face/f00.png: warning:"))
    assert "kept as it is" in line and "unsure" in line
    assert "f01.jpg: warning" not in err
    # a build keeps that picture as it is; --quick reads the verdict the build wrote
    build(root, "image")
    assert json.loads((root / "build/images/alice/face/mask/f00.json").read_text(encoding="utf-8"))["flattened"] is False
    code, out, err = run(capsys, "check", "--quick", "--root", str(root))
    assert "characters/alice/face/f00.png: warning:" in err


def test_report_shows_source_mask_result_and_flags_the_unsure(tmp_path):
    from charbuild.report.build import build_report
    from charbuild.report.source import report_plan
    from charbuild.tasks import Graph

    root = flatten_project(tmp_path, '[flatten]\n[flatten.pictures]\n"face/f01.jpg" = "flood"\n')
    opaque_picture(root / "characters/alice/face/f01.jpg", figure=(230, 230, 228), fmt="JPEG")  # unsure
    build(root, "image")
    plan = report_plan(Graph(load_project(root)))
    face = plan["characters"][0]["parts"][0]
    assert [r["source"] for r in face["flatten"]] == ["characters/alice/face/f00.png", "characters/alice/face/f01.jpg"]
    assert face["flatten"][0]["result"] == "build/images/alice/face/96/f00.png"
    build_report(plan, root, run_started_ns=0)
    html = (root / "build/report/index.html").read_text(encoding="utf-8")
    table = html.split('<table class="flatten">')[1].split("</table>")[0]
    rows = table.split("<tr")[2:]
    assert len(rows) == 2 and "f00.png" in rows[0] and "flattened (flood)" in rows[0] and "data-unsure" not in rows[0]
    assert "data-unsure" in rows[1] and "flattened; unsure: " in rows[1]
    assert "2 opaque picture(s) cut out, 1 unsure" in html
    srcs = re.findall(r'src="(files/[^"]+)"', table)
    assert len(srcs) == 6 and all((root / "build/report" / s).is_file() for s in srcs)
    mask = Image.open(root / "build/report" / srcs[1])
    assert mask.getpixel((0, 0)) == (0, 0, 0) and mask.getpixel((48, 30)) == (255, 255, 255)


@pytest.mark.parametrize("mode, save, expected", [
    ("RGB", {}, False), ("RGBA", {}, True), ("L", {}, False), ("LA", {}, True), ("P", {}, False),
    ("P", {"transparency": 0}, True), ("RGB", {"transparency": (0, 0, 0)}, True), ("I;16", {}, False),
], ids=["RGB", "RGBA", "L", "LA", "P", "P-tRNS", "RGB-tRNS", "I16"])
def test_alpha_channel_from_the_png_header(tmp_path, mode, save, expected):
    from charbuild.masks import has_alpha_channel

    path = tmp_path / "p.png"
    Image.new(mode, (8, 8)).save(path, **save)
    with Image.open(path) as img:  # Pillow agrees
        assert ("A" in img.getbands() or "transparency" in img.info) == expected
    assert has_alpha_channel(path) is expected
    Image.new("RGBA" if expected else "RGB", (8, 8)).save(tmp_path / "w.webp")
    assert has_alpha_channel(tmp_path / "w.webp") is expected
