"""The report's pure parts: the loss-log format, the SVG charts, the angle grid and the page."""

from __future__ import annotations

import re

import pytest

from charbuild.errors import CharbuildError
from charbuild.report.metrics import LossLog, parse_metrics, read_metrics
from charbuild.report.render import render_page
from charbuild.report.source import template_grid
from charbuild.report.svg import block_bar_svg, loss_chart_svg, nice_ticks


def test_metrics_reads_training_and_validation_lines_sorted_last_value_wins():
    text = ('{"step": 20, "loss": 0.4, "lr": 0.0001}\n'
            '\n'
            '{"step": 10, "loss": 0.5, "epoch": 1}\n'
            '{"step": 20, "val_loss": 0.45}\n'
            '{"step": 20, "loss": 0.35}\n')
    log = parse_metrics(text)
    assert log.loss == [(10, 0.5), (20, 0.35)]
    assert log.val_loss == [(20, 0.45)]
    assert log.lr == [(20, 0.0001)]


def test_metrics_skips_a_truncated_last_line_but_not_a_bad_middle_line(tmp_path):
    assert parse_metrics('{"step": 1, "loss": 0.5}\n{"step": 2, "lo').loss == [(1, 0.5)]
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.4}\n', encoding="utf-8")
    with pytest.raises(CharbuildError) as err:
        read_metrics(path)
    assert err.value.line == 2 and err.value.path == str(path)


@pytest.mark.parametrize("line, words", [
    ('{"loss": 0.5}', "'step'"),
    ('{"step": -1, "loss": 0.5}', "'step'"),
    ('{"step": 1}', "needs 'loss' or 'val_loss'"),
    ('{"step": 1, "loss": "x"}', "'loss' must be a finite number"),
    ('{"step": 1, "loss": NaN}', "'loss' must be a finite number"),
    ('[1, 2]', "not a JSON object"),
])
def test_metrics_bad_lines_name_the_line_and_the_problem(line, words):
    with pytest.raises(CharbuildError) as err:
        parse_metrics('{"step": 0, "loss": 1}\n' + line + "\n", "v/metrics.jsonl")
    assert err.value.line == 2
    assert words in err.value.message
    assert str(err.value).startswith("v/metrics.jsonl:2:")


def test_read_metrics_of_a_missing_file_is_none(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") is None


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0.27, 0.52) == [0.3, 0.35, 0.4, 0.45, 0.5]
    assert nice_ticks(0, 1000) == [0, 200, 400, 600, 800, 1000]


def _points(svg: str, series: str) -> list[tuple[float, float]]:
    m = re.search(rf'<polyline class="series {series}" data-count="(\d+)"[^>]* points="([^"]*)"', svg)
    pts = [tuple(map(float, p.split(","))) for p in m.group(2).split()]
    assert len(pts) == int(m.group(1))
    return pts


def test_loss_chart_maps_steps_left_to_right_and_lower_loss_lower_on_the_page():
    log = LossLog(loss=[(0, 1.0), (50, 0.5), (100, 0.25)], val_loss=[(100, 0.75)])
    svg = loss_chart_svg(log, width=600, height=300)
    pts = _points(svg, "loss")
    assert [x for x, _ in pts] == sorted(x for x, _ in pts) and pts[0][0] < pts[-1][0]
    assert pts[0][1] < pts[1][1] < pts[2][1]  # SVG y grows downwards: a falling loss goes down the page
    (vx, vy), = _points(svg, "val_loss")
    assert vx == pts[-1][0] and pts[0][1] < vy < pts[2][1]
    assert "http" not in svg  # inline SVG needs no namespace URL in HTML


def test_loss_chart_of_no_points_refuses():
    with pytest.raises(ValueError):
        loss_chart_svg(LossLog())


def test_block_bar_draws_one_bar_per_block_up_for_positive_down_for_negative():
    svg = block_bar_svg([("BASE", 0.0), ("IN01", 1.0), ("OUT03", -0.5)])
    bars = re.findall(r'<rect class="(block[^"]*)" data-block="(\w+)" data-weight="([^"]+)" x="[^"]+" y="([^"]+)" '
                      r'width="[^"]+" height="([^"]+)"', svg)
    assert [(b[1], b[2]) for b in bars] == [("BASE", "0"), ("IN01", "1"), ("OUT03", "-0.5")]
    zero_y = float(bars[0][3])
    assert float(bars[1][3]) < zero_y and float(bars[1][4]) > 0  # above the zero line
    assert float(bars[2][3]) == zero_y and float(bars[2][4]) == pytest.approx(float(bars[1][4]) / 2)
    assert bars[0][0] == "block zero"


def test_template_grid_symmetric_5_columns_missing_marked():
    grid = template_grid("f", {"f00": ["a/f00.png"], "f04": ["a/f04.png", "a/f04-b.png"]}, symmetric=True)
    assert grid["columns"] == 5 and len(grid["rows"]) == 3 and all(len(r) == 5 for r in grid["rows"])
    assert grid["rows"][0][4]["pictures"] == ["a/f04.png", "a/f04-b.png"]
    assert grid["missing"] == [c for c in ("f01", "f02", "f03", "f10", "f11", "f12", "f13", "f14",
                                           "f20", "f21", "f22", "f23", "f24")]


def test_template_grid_asymmetric_has_8_columns_and_expects_mirrors():
    grid = template_grid("b", {"b05": ["x/b05.png"]}, symmetric=False)
    assert grid["columns"] == 8 and all(len(r) == 8 for r in grid["rows"])
    assert "b05" not in grid["missing"] and "b06" in grid["missing"] and "b27" in grid["missing"]
    sym = template_grid("b", {"b05": ["x/b05.png"]}, symmetric=True)
    assert sym["columns"] == 8 and "b06" not in sym["missing"]  # shown, not required


def _page(**over):
    part = {"name": "face", "kind": "face", "keyword": "k", **template_grid("f", {"f00": ["characters/ねこ/face/f00.png"]}, True)}
    lora = {"name": "k", "kind": "face", "keywords": ["k"], "characters": ["ねこ"], "repeats": 2,
            "preview": "build/loras/k/preview.png", "preview_src": "files/p.png",
            "dataset": [{"folder": "build/images/ねこ/face/64", "part": "ねこ/face", "size": 64, "pictures": 1,
                         "resolution": [512, 512], "batch": 2, "flip_aug": True}],
            "merge": {"preset": "FACE", "arch": "sd15", "blocks": [["BASE", 0.0], ["IN01", 1.0]]},
            "compress": {"method": "sv_ratio", "sv_ratio": 16},
            "variants": [{"name": "V", "dir": "build/loras/k/V", "params": {"dim": 4},
                          "files": {"raw": "r", "merged": "m", "compressed": "build/loras/k/V/k-V.safetensors"},
                          "found": {}, "samples": {}, "metrics": None, "metrics_error": None}]}
    page = {"project": "p<&>", "characters": [{"name": "ねこ", "keyword": "k", "symmetric": True, "parts": [part]}],
            "thumbs": {"characters/ねこ/face/f00.png": "files/t.png"}, "loras": [lora],
            "stale": [("train:k/V", "not built yet")]}
    page.update(over)
    return page


def test_page_has_every_section_relative_urls_and_escaped_text():
    html = render_page(_page())
    assert "p&lt;&amp;&gt;" in html and "p<&>" not in html
    assert 'value="&lt;lora:k-V:1&gt;"' in html
    assert "no loss data yet" in html and "not built yet" in html and "no samples yet" in html
    assert "no samples yet: set <code>sample_every = N</code> in <code>[training]</code>" in html  # what to do
    assert '<td class="missing" data-code="f01">' in html
    urls = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert urls and all(not re.match(r"[a-z]+:", u) and not u.startswith("//") for u in urls), urls
    assert "http://" not in html and "https://" not in html


def test_page_says_everything_is_up_to_date_when_nothing_is_stale():
    html = render_page(_page(stale=[]))
    assert "everything is up to date" in html and "train:k/V" not in html


def test_the_plan_of_a_real_project(tmp_path):
    """The adapter on a project on disk: grids, dataset rows, merge blocks, files, settings."""
    from conftest import make_project

    from charbuild.config import load_project
    from charbuild.report.source import report_plan, source_pictures
    from charbuild.tasks import Graph

    root = make_project(tmp_path / "p", project_extra='[merge]\nface = "ALL"\n')
    toml = root / "characters/bob/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]", "symmetric = false\n[face]"), encoding="utf-8")
    plan = report_plan(Graph(load_project(root)))
    chars = {c["name"]: c for c in plan["characters"]}
    bob_face = chars["bob"]["parts"][0]
    assert chars["bob"]["symmetric"] is False and bob_face["columns"] == 8
    assert "f05" in bob_face["missing"] and "f00" not in bob_face["missing"]
    assert [p["name"] for p in chars["alice"]["parts"]] == ["face", "dress"]
    assert chars["alice"]["parts"][0]["columns"] == 5
    assert source_pictures(plan) == sorted(p.relative_to(root).as_posix() for p in (root / "characters").rglob("*.png"))
    loras = {lo["name"]: lo for lo in plan["loras"]}
    assert [(r["size"], r["pictures"], r["batch"]) for r in loras["alcdr"]["dataset"]] == [(64, 3, 2), (96, 3, 2), (64, 2, 2), (96, 2, 2)]
    assert len(loras["alc"]["merge"]["blocks"]) == 17 and loras["alc"]["merge"]["preset"] == "ALL"
    assert len(loras["alcdr"]["merge"]["blocks"]) == 26  # BODY uses blocks outside the 17
    v = loras["alc"]["variants"][0]
    assert v["files"]["compressed"] == "build/loras/alc/Lora1x1A1-AdamW8/alc-Lora1x1A1-AdamW8.safetensors"
    assert v["params"]["dim"] == 4 and v["params"]["steps"] == 5
    assert loras["alcdr"]["keywords"] == ["alcdr", "alc"]


def test_sample_files_are_the_angle_codes_then_the_users_prompts(tmp_path):
    """samples/<step>/<name>.png: template codes first, then p1, p2, … (the user's sample_prompts),
    in number order; other files are not samples."""
    from charbuild.report.build import sample_files

    step = tmp_path / "v" / "samples" / "10"
    step.mkdir(parents=True)
    for name in ("p10.png", "f01.png", "p2.png", "f00.png", "notes.png", "p0.png", "f00.txt"):
        (step / name).write_bytes(b"x")
    assert list(sample_files(tmp_path, "v")[10]) == ["f00", "f01", "p2", "p10"]


def test_a_group_s_samples_are_one_grid_per_member(tmp_path):
    """``samples/<step>/<member>/<code>.png``: named by member and code, member by member, the
    ``notrigger/`` pictures left out; the page shows one table per member, captioned with it."""
    from charbuild.report.build import sample_files
    from charbuild.report.render import _samples_grid

    for step in ("0", "80"):
        for rel in ("kuro/school/b00.png", "kuro/school/b01.png", "cha/suit/b00.png", "notrigger/kuro/school/b00.png"):
            (tmp_path / "v/samples" / step / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "v/samples" / step / rel).write_bytes(b"x")
    found = sample_files(tmp_path, "v")
    assert list(found[80]) == ["cha/suit/b00", "kuro/school/b00", "kuro/school/b01"]
    assert found[80]["kuro/school/b01"] == "v/samples/80/kuro/school/b01.png"
    html = _samples_grid(found)
    assert html.count('<table class="samples">') == 2
    assert "<caption>cha/suit</caption>" in html and "<caption>kuro/school</caption>" in html
    assert "<th>b01</th>" in html


def test_the_plan_of_an_sdxl_project_uses_sdxl_classes_and_blocks(tmp_path):
    """An SDXL project's dataset rows have SDXL's bucket resolutions and its merge bar SDXL's blocks."""
    from charbuild.config import load_project
    from charbuild.report.source import report_plan
    from charbuild.tasks import Graph
    from conftest import make_project

    root = make_project(tmp_path / "p", project_extra='[model]\nbase = "tiny-sdxl"\n')
    plan = report_plan(Graph(load_project(root)))
    loras = {lo["name"]: lo for lo in plan["loras"]}
    assert {tuple(r["resolution"]) for r in loras["alc"]["dataset"]} == {(1024, 1024)}
    assert loras["alc"]["merge"]["arch"] == "sdxl" and len(loras["alc"]["merge"]["blocks"]) in (12, 20)


def test_the_legacy_hash_of_a_lora_under_1_mib_is_not_shown(tmp_path):
    """sd-scripts' legacy hash reads from 1 MiB on: every smaller file's is the hash of nothing."""
    from lora_fixtures import make_lora

    from charbuild.lora.io import build_lora, save_lora
    from charbuild.report.build import _inspect

    small = tmp_path / "small.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors, meta = make_lora("sd15", "lora", rank=2, modules=[(stem, 320, 320, 0)])
    lora = build_lora(tensors, meta)
    save_lora(small, lora.tensors, lora.metadata)
    info = _inspect(small)
    assert info["size"] < 2**20 and list(info["hashes"]) == ["sshs_model_hash"], info["hashes"]
    big = tmp_path / "big.safetensors"
    tensors, meta = make_lora("sd15", "lora", rank=128, modules=[(stem, 1280, 1280, 0)])  # 1.3 MB of float32
    save_lora(big, tensors, meta)
    hashes = _inspect(big)["hashes"]
    assert set(hashes) == {"sshs_model_hash", "sshs_legacy_hash"} and hashes["sshs_legacy_hash"] != "e3b0c442"
