"""Block-weight exploration on the demo model: real renders, real scores.

kuroneko's face LoRA of the example, trained on the shipped demo model, explored with the full
weights (ALL) and a deliberately broken candidate (every block 0, NONE): the broken one must rank
last on identity (it is the base model again) and the base model's own samples lowest on leak.
"""

from __future__ import annotations

import json
import shutil

import pytest
from graphtools import build, groups

from charbuild.train.builtin import demo

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not (demo.DEMO_DIR / demo.WEIGHTS_FILE).is_file(),
                                reason="the demo model's weights are not in this checkout")

V = "Lora3x3A50p-AdamW8"


def test_scores_rank_the_broken_candidate_last_and_the_base_model_lowest_on_leak(example_copy, reproducible_training):
    root = example_copy
    shutil.rmtree(root / "characters/chaneko")
    (root / "characters/groups.toml").unlink()
    shutil.rmtree(root / "characters/kuroneko/outfits")
    toml = root / "characters/kuroneko/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").split("[outfits.")[0], encoding="utf-8")
    project = root / "characters/project.toml"
    text = project.read_text(encoding="utf-8").replace('group = "BODY"\n', 'group = "BODY"\nexplore = ["ALL", "NONE"]\n')
    project.write_text(text.replace("[training]\n", "[training]\nsample_every = 1000\n"), encoding="utf-8")
    ran = groups(build(root))
    assert ran["explore"] == {f"krnk/{V}"} and ran["candidate"] == {f"krnk/{V}/ALL"}
    scores = json.loads((root / f"build/loras/krnk/{V}/explore/scores.json").read_text(encoding="utf-8"))
    rows = scores["rows"]
    assert set(rows) == {"base", "chosen", "ALL", "NONE"}
    identity = {name: r["identity"] for name, r in rows.items()}
    candidates = [n for n in rows if n != "base"]
    assert max(candidates, key=lambda n: identity[n]) == "NONE", identity  # last: farthest from the character
    assert identity["ALL"] < identity["NONE"] and identity["chosen"] < identity["NONE"], identity
    leak = {name: r["leak"] for name, r in rows.items()}
    assert leak["base"] == 0.0 and leak["ALL"] > 0 and min(leak.values()) == leak["base"], leak
    assert scores["best"] in {"chosen", "ALL"}, scores["why"]
    page = (root / "build/report/index.html").read_text(encoding="utf-8")
    assert "block weights explored" in page and 'data-row="NONE"' in page


def test_an_sdxl_lora_is_explored_with_the_sdxl_forms(tmp_path, reproducible_training):
    """The same pipeline on SDXL (the tiny random SDXL model: the scores mean nothing, the files do)."""
    from conftest import make_project

    root = make_project(tmp_path / "p", sizes=(64,),
                        characters={"bob": {"keyword": "bbo", "face": ["f00", "f01"], "outfits": {}}},
                        project_extra='[model]\nbase = "tiny-sdxl"\n[merge]\nexplore = ["BODY", "NONE"]\n')
    toml = root / "characters/project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace('backend = "fake"', 'backend = "builtin"')
                    .replace("dim = 4", "dim = 4\nsteps = 2\nsample_steps = 1\nsample_size = 64"), encoding="utf-8")
    (root / "characters/bob/character.toml").write_text('keyword = "bbo"\n[face]\n', encoding="utf-8")
    ran = groups(build(root))
    v = "Lora1x1A1-AdamW8"
    assert ran["candidate"] == {f"bbo/{v}/BODY"} and ran["explore"] == {f"bbo/{v}"}
    scores = json.loads((root / f"build/loras/bbo/{v}/explore/scores.json").read_text(encoding="utf-8"))
    assert len(scores["rows"]["BODY"]["weights"].split(",")) == 20  # the SDXL form of BODY
    assert scores["rows"]["NONE"]["leak"] == 0.0 and scores["rows"]["BODY"]["size"] > 0
    for row in ("base", "chosen", "BODY", "NONE"):
        assert (root / f"build/loras/bbo/{v}/explore/{row}/f00.png").is_file()
