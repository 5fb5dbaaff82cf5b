"""The report as a doit target: when it rebuilds, what it shows, and that it is written atomically."""

from __future__ import annotations

import time

import pytest

from conftest import draw_picture, make_project
from graphtools import build

from charbuild.report.build import build_report
from charbuild.report.source import report_plan

V = "Lora1x1A1-AdamW8"


def page(root) -> str:
    return (root / "build/report/index.html").read_text(encoding="utf-8")


def test_a_full_build_writes_the_page_with_its_loras_and_a_second_build_leaves_it(built):
    root, first = built
    assert "report" in first
    html = page(root)
    assert "not built yet" not in html  # written after every compress of the run, under any -n
    assert f"&lt;lora:alcdr-{V}:1&gt;" in html and f"build/loras/duo/{V}/duo-{V}.safetensors" in html
    assert "everything is up to date" in html
    before = (root / "build/report/index.html").stat().st_mtime_ns
    assert build(root) == set()
    assert (root / "build/report/index.html").stat().st_mtime_ns == before


def test_editing_a_source_picture_rebuilds_the_page_with_a_new_thumbnail(built):
    root, _ = built
    files = root / "build/report/files"
    old = {p.name: p.read_bytes() for p in files.iterdir()}
    draw_picture(root / "characters/bob/face/f03.png", "f03", seed=7)
    assert "report" in build(root)
    new = {p.name: p.read_bytes() for p in files.iterdir()}
    assert old.keys() == new.keys()
    assert sum(old[n] != new[n] for n in old) >= 2  # the thumbnail and bob's preview sheet


def test_a_loss_log_appearing_rebuilds_only_the_page_and_draws_it(built):
    root, _ = built
    vdir = root / f"build/loras/bbo/{V}"
    # the fake trainer writes a loss log of its 5 steps beside the LoRA, as every trainer does
    assert '<polyline class="series loss" data-count="5"' in page(root)
    (vdir / "metrics.jsonl").write_text(
        "".join(f'{{"step": {s}, "loss": {1 / (s + 1):.4f}, "lr": 0.0001}}\n' for s in range(0, 50, 5))
        + '{"step": 50, "val_loss": 0.3}\n', encoding="utf-8")
    assert build(root) == {"report"}
    html = page(root)
    assert '<polyline class="series loss" data-count="10"' in html
    assert '<polyline class="series val_loss" data-count="1"' in html
    assert build(root) == set()
    with (vdir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 55, "loss": 0.1}\n')
    assert build(root) == {"report"}
    assert '<polyline class="series loss" data-count="11"' in page(root)


def test_a_bad_loss_log_is_shown_on_the_page_with_its_line(built):
    root, _ = built
    (root / f"build/loras/alc/{V}/metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 2, "loss": 0.4}\n',
                                                              encoding="utf-8")
    assert build(root) == {"report"}
    assert f"<p class=\"warn\">build/loras/alc/{V}/metrics.jsonl:2: error: bad loss log line" in page(root)


def test_samples_make_a_steps_by_codes_grid_and_leave_with_their_files(built):
    root, _ = built
    samples = root / f"build/loras/alc/{V}/samples"
    for step in (10, 5):
        for code in ("f00", "f02"):
            draw_picture(samples / str(step) / f"{code}.png", code, seed=step)
    (samples / "5" / "notes.txt").write_text("ignored", encoding="utf-8")
    assert build(root) == {"report"}
    html = page(root)
    table = html[html.index('<table class="samples">'):]
    table = table[: table.index("</table>")]
    assert table.index("step 5") < table.index("step 10") and table.count("<img") == 4
    count = len(list((root / "build/report/files").iterdir()))
    for p in sorted(samples.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    assert build(root) == {"report"}
    assert len(list((root / "build/report/files").iterdir())) == count - 4  # copies of gone samples removed
    assert "no samples yet" in page(root)


def test_charbuild_report_writes_the_page_of_a_half_built_project_without_training(tmp_path):
    root = make_project(tmp_path / "proj")
    assert build(root, "preview")
    assert build(root, "--single", "report") == {"report"}
    assert not list((root / "build/loras").rglob("*.safetensors"))
    html = page(root)
    assert "not built yet" in html and "no preview sheet yet" not in html
    start = html.index('id="stale"')
    stale = html[start:html.index("</section>", start)]
    assert f"<td>train:alc/{V}</td><td>not built yet</td>" in stale and f"<td>compress:bbo/{V}</td>" in stale
    assert "<td>preview:" not in stale  # built by the run before
    assert build(root, "--single", "report") == set()


def test_the_report_command_prints_the_page_address(tmp_path):
    from click.testing import CliRunner

    from charbuild.cli import cli

    root = make_project(tmp_path / "proj")
    result = CliRunner().invoke(cli, ["report", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert (root / "build/report/index.html").as_uri() in result.output
    assert not list((root / "build/loras").rglob("*.safetensors"))


def test_a_failed_write_leaves_the_previous_page_whole(built, monkeypatch):
    root, _ = built
    index = root / "build/report/index.html"
    before = index.read_bytes()
    from charbuild.dodo import forget_loaded_projects, graph
    from charbuild.fsutil import atomic_path

    forget_loaded_projects()
    plan = report_plan(graph(root))
    monkeypatch.setattr("charbuild.report.build.write_text_atomic",
                        lambda target, text: _failing_write(atomic_path, target, text))
    with pytest.raises(Exception, match="disk is full"):
        build_report(plan, root, run_started_ns=time.time_ns())
    assert index.read_bytes() == before
    assert not [p for p in index.parent.iterdir() if p.name.endswith(".tmp.html")]


def _failing_write(atomic_path, target, text):
    with atomic_path(target) as tmp:
        tmp.write_text(text[:100], encoding="utf-8")  # half written, then the disk fills up
        raise OSError(28, "No space left on device")


def test_a_run_ends_with_one_summary_line_per_lora_it_built(tmp_path):
    import io

    from charbuild.dodo import run_doit

    root = make_project(tmp_path / "proj")
    out = io.StringIO()
    assert run_doit(root, ["run"], extra_config={"outfile": out}) == 0
    lines = out.getvalue().splitlines()
    start = lines.index("built 3 LoRA(s):")
    summary = sorted(lines[start + 1:start + 4])
    assert summary[0].startswith(f"  build/loras/alc/{V}/alc-{V}.safetensors  ")
    assert summary[0].endswith("  trigger words: alc") and " kB  rank " in summary[0]
    assert summary[1].endswith("trigger words: alcdr, alc")
    size = (root / f"build/loras/alc/{V}/alc-{V}.safetensors").stat().st_size
    assert f"{size / 1e3:.1f} kB" in summary[0]
    toml = root / "characters/bob/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\nsteps = 5", "[face]\nsteps = 6"), encoding="utf-8")
    out = io.StringIO()
    assert run_doit(root, ["run"], extra_config={"outfile": out}) == 0
    assert "built 1 LoRA(s):" in out.getvalue() and f"bbo-{V}.safetensors" in out.getvalue()
    out = io.StringIO()
    assert run_doit(root, ["run"], extra_config={"outfile": out}) == 0
    assert "LoRA(s)" not in out.getvalue()
