"""The report page in a real browser: headless Chromium opens it from disk and the DOM is checked.

Skipped, with the reason, where Chromium is not installed (Debian: ``apt-get install chromium``;
``.ci/run`` installs it) or on Windows (the debugging pipe needs POSIX file descriptors).
``CHARBUILD_REPORT_SCREENSHOT=path.png`` keeps the screenshot for a person to look at.
"""

from __future__ import annotations

import os
import shutil

import pytest

from chromium_cdp import Browser, find_chromium, posix_pipes_available
from conftest import draw_picture, make_project
from graphtools import build

V = "Lora1x1A1-AdamW8"

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.extras("chromium"),
    pytest.mark.skipif(not posix_pipes_available(), reason="the DevTools pipe needs POSIX file descriptors"),
]

# What the test asks the page, in the page: real DOM state, not the HTML text.
PROBE = """(() => {
  const imgs = [...document.images].map(i => ({src: i.getAttribute('src'), complete: i.complete,
                                               w: i.naturalWidth, h: i.naturalHeight}));
  const charts = [...document.querySelectorAll('section.lora')].map(s => ({
      lora: s.dataset.name,
      series: [...s.querySelectorAll('svg.loss-chart polyline.series')].map(p => ({
          name: p.classList[1], points: p.points.numberOfItems,
          box: (b => [b.width, b.height])(p.getBBox())}))}));
  return {
    imgs,
    charts,
    loras: [...document.querySelectorAll('section.lora')].map(s => s.dataset.name),
    characters: [...document.querySelectorAll('section.character')].map(s => s.dataset.name),
    blockBars: [...document.querySelectorAll('svg.block-bar')].map(s => s.querySelectorAll('rect.block').length),
    missing: [...document.querySelectorAll('td.missing')].length,
    bodyBackground: getComputedStyle(document.body).backgroundColor,
    tags: [...document.querySelectorAll('input.lora-tag')].map(i => i.value),
  };
})()"""


@pytest.fixture(scope="module")
def report_project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("browser") / "プロジェクト", characters={
        "alice": {"keyword": "alc", "face": ["f00", "f01", "f02"], "outfits": {"dress": ("alcdr", ["b00", "b01"])}},
        "黒猫": {"keyword": "krnk", "face": ["f00", "f12"], "outfits": {}},
    }, groups={"duo": ["alice/dress"]})
    build(root)
    vdir = root / f"build/loras/alc/{V}"
    (vdir / "metrics.jsonl").write_text(
        "".join(f'{{"step": {s}, "loss": {0.5 / (1 + s / 20):.4f}, "lr": 0.0001}}\n' for s in range(0, 100, 10))
        + "".join(f'{{"step": {s}, "val_loss": {0.6 / (1 + s / 30):.4f}}}\n' for s in (50, 100)), encoding="utf-8")
    for step in (50, 100):
        for code in ("f00", "f01", "f02"):
            draw_picture(vdir / "samples" / str(step) / f"{code}.png", code, size=(64, 64), seed=step // 50)
    assert build(root) == {"report"}
    return root


def test_the_report_renders_in_chromium_with_every_image_chart_and_lora(report_project, tmp_path):
    from charbuild.config import load_project

    root = report_project
    index = root / "build/report/index.html"
    browser = Browser(CHROMIUM, tmp_path / "chromium-profile")
    try:
        browser.open_page(index.as_uri())
        state = browser.evaluate(PROBE)
        shot = tmp_path / "report.png"
        browser.screenshot(shot)
        requests = [e["params"]["request"]["url"] for e in browser.events if e["method"] == "Network.requestWillBeSent"]
    finally:
        browser.close()
    if os.environ.get("CHARBUILD_REPORT_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["CHARBUILD_REPORT_SCREENSHOT"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    project = load_project(root)
    # 7 thumbnails, 4 preview sheets, 6 samples: every one decoded by the browser
    assert len(state["imgs"]) == 7 + len(project.loras) + 6
    broken = [i for i in state["imgs"] if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert not broken, broken
    assert sorted(state["loras"]) == sorted(project.loras)
    assert sorted(state["characters"]) == sorted(project.characters)
    chart = {c["lora"]: c["series"] for c in state["charts"]}
    assert chart["alc"] == [{"name": "loss", "points": 10, "box": chart["alc"][0]["box"]},
                            {"name": "val_loss", "points": 2, "box": chart["alc"][1]["box"]}]
    assert all(w > 100 and h > 20 for w, h in (s["box"] for s in chart["alc"]))  # drawn across the plot
    # the others show the loss log the fake trainer wrote: its 5 steps, no validation
    assert all([(c["name"], c["points"]) for c in chart[name]] == [("loss", 5)] for name in project.loras if name != "alc")
    assert state["blockBars"] == [26] * len(project.loras)  # the FACE and BODY presets use all 26 blocks
    assert state["missing"] > 0
    assert state["bodyBackground"] == "rgb(31, 31, 31)"  # report.css loaded from the folder
    # each LoRA's copy-ready tag: in the first table and in its own section
    assert sorted(state["tags"]) == sorted(2 * [f"<lora:{n}-{V}:1>" for n in project.loras])
    assert requests and all(u.startswith("file://") for u in requests), requests  # nothing from the network
