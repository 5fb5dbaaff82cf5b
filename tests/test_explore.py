"""Block-weight exploration: candidates from [merge] explore, their targets, scores and the best rule.

The rules are pure (charbuild.explore); the targets run on the fake backend, whose renderer
writes stand-in pictures per row (a colour from the row's file, weights, prompt and seed), so the
incremental behaviour is tested without a model. tests/test_explore_demo.py renders real rows.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_project, run_cli
from graphtools import build, groups

from charbuild import explore
from charbuild.lora.blocks import all_blocks, resolve_block_weights

V = "Lora1x1A1-AdamW8"


def _explore(root, line: str, table: str = "[merge]\n") -> None:
    toml = root / "characters/project.toml"
    text = toml.read_text(encoding="utf-8")
    if table in text:
        text = text.replace(table, table + line + "\n")
    else:
        text += table + line + "\n"
    toml.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- pure rules


def test_candidate_names_are_preset_names_or_a_digest_safe_on_every_file_system():
    ws = resolve_block_weights("IN04:0.5,OUT03-OUT05:0")
    assert explore.candidate_name("FACE", {"IN01": 1.0}) == "FACE"
    name = explore.candidate_name("IN04:0.5,OUT03-OUT05:0", ws)
    assert name.startswith("w-") and len(name) == 10 and ":" not in name
    assert explore.candidate_name("base", {"IN01": 1.0}).startswith("w-")  # a reserved row name


def test_the_same_weights_twice_is_one_problem_naming_both():
    a = resolve_block_weights("ALL")
    cands, problems = explore.make_candidates([("ALL", a), ("all", dict(a)), ("FACE", resolve_block_weights("FACE"))])
    assert [c.name for c in cands] == ["ALL", "FACE"]
    assert problems == ["explore: 'all' gives the same weights as 'ALL'; list it once"]


def test_the_weight_string_means_exactly_the_candidate_s_weights():
    blocks = all_blocks("sd15")
    for spec in ("FACE", "IN04:0.5,OUT03-OUT05:0", "0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1"):
        w = resolve_block_weights(spec)
        assert resolve_block_weights(explore.weight_string(w, blocks)) == w


def test_exploration_prompts_are_the_pictured_codes_then_level_ones_without_trigger_then_neutral():
    from charbuild.sample_prompts import sample_set

    samples = sample_set("face", ["krnk"], extra=["krnk, smile"])
    out = explore.exploration_prompts(samples, ["f00", "f01", "f12", "F03"], ["krnk"])
    names = [s.name for s in out]
    assert names == ["f00", "f01", "f03", "f12", "notrigger/f00", "notrigger/f01", "notrigger/f03", "neutral"]
    by = {s.name: s for s in out}
    assert by["f12"].index == 7 and by["notrigger/f01"].index == 1  # the training samples' seeds
    assert "krnk" in by["f00"].prompt and "krnk" not in by["notrigger/f00"].prompt and by["neutral"].prompt == ""
    assert explore.exploration_prompts(samples, [], ["krnk"]) == ()


def test_a_group_s_exploration_renders_each_member_s_pictured_codes():
    from charbuild.sample_prompts import sample_set

    members = [("kuro/school", ["krnksf", "krnk"]), ("cha/suit", ["tyankps", "tyank"])]
    samples = sample_set("group", ["krnksf", "tyankps", "krnk", "tyank"], members=members)
    out = explore.exploration_prompts(samples, ["b00", "kuro/school/b00", "kuro/school/b12", "cha/suit/b01"],
                                      ["krnksf", "tyankps", "krnk", "tyank"])
    assert [s.name for s in out] == ["kuro/school/b00", "kuro/school/b12", "cha/suit/b01",
                                     "notrigger/kuro/school/b00", "notrigger/cha/suit/b01", "neutral"]


def test_the_best_row_is_the_closest_under_the_leak_bound_and_the_base_never_competes():
    rows = {"base": {"identity": 0.65, "leak": 0.0, "size": 0},
            "chosen": {"identity": 0.50, "leak": 0.10, "size": 10},
            "ALL": {"identity": 0.40, "leak": 0.30, "size": 12},     # closer, but leaks
            "SOFT": {"identity": 0.45, "leak": 0.05, "size": 8},
            "NONE": {"identity": 0.60, "leak": 0.0, "size": 0}}
    rows["base"]["identity"] = 0.65
    assert explore.best_row(rows, 0.15)[0] == "SOFT"
    assert explore.best_row(rows, 0.5)[0] == "ALL"
    name, why = explore.best_row(rows, 0.01)
    assert name == "NONE" and "leak <= 0.01" in why
    assert explore.best_row({k: v for k, v in rows.items() if k != "NONE"}, 0.01)[0] is None
    rows["base"]["identity"] = 0.42  # only ALL is closer than the base model, and it leaks
    name, why = explore.best_row(rows, 0.15)
    assert name is None and "leaks more than 0.15" in why
    rows["base"]["identity"] = 0.3
    name, why = explore.best_row(rows, 0.15)
    assert name is None and "closer to the character than the base model" in why


def test_without_a_leak_bound_the_chosen_weights_leak_sets_the_scale():
    rows = {"base": {"identity": 0.65, "leak": 0.0}, "chosen": {"identity": 0.50, "leak": 0.20},
            "ALL": {"identity": 0.45, "leak": 0.23},    # 15 % more leak than chosen: out
            "SOFT": {"identity": 0.48, "leak": 0.21},   # 5 % more: in, and closer than chosen
            "LOW": {"identity": 0.55, "leak": 0.05}}
    name, why = explore.best_row(rows, None)
    assert name == "SOFT" and "0.220 (the chosen weights' leak + 10 %)" in why
    assert explore.best_row(rows, 0.3)[0] == "ALL"


def test_block_effects_are_the_change_from_the_chosen_weights():
    eff = explore.block_effects({"IN01": {"identity": 0.55, "leak": 0.08}, "OUT03": {"identity": 0.49, "leak": 0.12}},
                                {"identity": 0.50, "leak": 0.10})
    assert eff == {"IN01": {"identity": 0.05, "leak": -0.02}, "OUT03": {"identity": -0.01, "leak": 0.02}}


# --------------------------------------------------------------------------- settings


def test_explore_entries_are_checked_at_their_line(tmp_path, capsys):
    root = make_project(tmp_path / "p")
    _explore(root, 'explore = ["ALL", "FCE", [1, 2], "all"]')
    code, _, err = run_cli(capsys, "check", "--root", str(root))
    assert code == 2
    assert "project.toml:9: error: [merge] explore: 'FCE': unknown block-weight preset 'FCE'. Did you mean FACE?" in err
    assert "'1,2': 2 block weights given" in err and "'all' gives the same weights as 'ALL'" in err


def test_a_lora_s_own_explore_replaces_the_project_s(tmp_path):
    from charbuild.config import load_project

    root = make_project(tmp_path / "p")
    _explore(root, 'explore = ["ALL", "BODY"]')
    toml = root / "characters/bob/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\n", '[face]\nexplore = ["INS", "NONE"]\n'),
                    encoding="utf-8")
    p = load_project(root)
    assert [c.name for c in p.loras["bbo"].explore_candidates] == ["INS", "NONE"]
    assert [c.name for c in p.loras["alc"].explore_candidates] == ["ALL", "BODY"]
    assert p.loras["bbo"].explore_candidates[1].empty


def test_a_lora_s_own_bad_entry_is_reported_at_its_line(tmp_path, capsys):
    root = make_project(tmp_path / "p")
    toml = root / "characters/bob/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\n", '[face]\nexplore = "ALL"\n'), encoding="utf-8")
    code, _, err = run_cli(capsys, "check", "--root", str(root))
    assert code == 2 and "bob/character.toml:6: error: LoRA 'bbo' 'explore' must be a list" in err, err


# --------------------------------------------------------------------------- targets (fake backend)


@pytest.fixture
def explored(tmp_path):
    root = make_project(tmp_path / "p", characters={"bob": {"keyword": "bbo", "face": ["f00", "f01"], "outfits": {}}})
    build(root)
    _explore(root, 'explore = ["ALL", "IN04:0.5,OUT03-OUT05:0", "NONE"]')
    return root


def test_candidates_render_with_base_and_chosen_and_are_scored(explored):
    root = explored
    ran = groups(build(root))
    assert set(ran) == {"candidate", "explore", "report"}  # no training, merge or compress
    digest = explore.candidate_name("x:", resolve_block_weights("IN04:0.5,OUT03-OUT05:0"))
    assert ran["candidate"] == {f"bbo/{V}/ALL", f"bbo/{V}/{digest}"}  # NONE: every block 0, no file
    edir = root / f"build/loras/bbo/{V}/explore"
    assert (edir / f"ALL/bbo-{V}-ALL.safetensors").is_file()
    scores = json.loads((edir / "scores.json").read_text(encoding="utf-8"))
    assert scores["order"] == ["base", "chosen", "ALL", digest, "NONE"]
    rows = scores["rows"]
    assert rows["base"]["leak"] == 0.0 and rows["NONE"]["leak"] == 0.0  # the NONE row is the bare base model
    assert rows["NONE"]["identity"] == rows["base"]["identity"] and rows["ALL"]["leak"] > 0
    assert set(rows["ALL"]["identity_codes"]["bob/face"]) == {"f00", "f01"}
    assert rows["ALL"]["weights"] == explore.weight_string(resolve_block_weights("ALL"), all_blocks("sd15"))
    assert sorted(p.relative_to(edir / "chosen").as_posix() for p in (edir / "chosen").rglob("*.png")) == [
        "f00.png", "f01.png", "neutral.png", "notrigger/f00.png", "notrigger/f01.png"]
    assert build(root) == set()


def test_adding_a_candidate_renders_only_that_candidate(explored):
    root = explored
    build(root)
    edir = root / f"build/loras/bbo/{V}/explore"
    before = {p: p.stat().st_mtime_ns for p in edir.rglob("*.png")}
    deliverable = root / f"build/loras/bbo/{V}/bbo-{V}.safetensors"
    kept = deliverable.read_bytes()
    toml = root / "characters/project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace('"NONE"]', '"NONE", "INS"]'), encoding="utf-8")
    ran = groups(build(root))
    assert ran["candidate"] == {f"bbo/{V}/INS"} and ran["explore"] == {f"bbo/{V}"} and "merge" not in ran
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # the other rows were kept
    assert (edir / "INS/f00.png").is_file() and deliverable.read_bytes() == kept


def test_new_sample_settings_render_again_without_merging_or_training_again(explored):
    root = explored
    build(root)
    toml = root / "characters/project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("dim = 4\n", "dim = 4\nsample_steps = 3\n"),
                    encoding="utf-8")
    ran = groups(build(root))
    assert "candidate" not in ran and "train" not in ran and "merge" not in ran and ran["explore"] == {f"bbo/{V}"}


def test_charbuild_explore_prints_the_table_with_a_copy_ready_string(explored, capsys):
    root = explored
    code, out, _ = run_cli(capsys, "explore", "bbo", "--root", str(root))
    assert code == 0
    assert f"bbo/{V}" in out and "identity" in out and "best:" in out
    lines = out.splitlines()
    for row in ("base", "chosen", "ALL", "NONE"):
        assert any(line[3:].startswith(row) for line in lines), (row, out)
    assert 'merge = "' in out or "best: none" in out


def test_charbuild_explore_names_what_to_do_without_candidates(tmp_path, capsys):
    root = make_project(tmp_path / "p")
    code, _, err = run_cli(capsys, "explore", "bbo", "--root", str(root))
    assert code != 0 and "has no candidate block weights to explore" in err and "explore = [" in err
    code, _, err = run_cli(capsys, "explore", "bob0", "--root", str(root))
    assert code != 0 and "no LoRA named 'bob0'" in err


def test_the_per_block_analysis_and_the_report_show_what_each_block_does(explored, capsys):
    root = explored
    code, out, _ = run_cli(capsys, "explore", "bbo", "--blocks", "--root", str(root))
    assert code == 0 and "(change when the block is off" in out
    analysis = json.loads((root / f"build/loras/bbo/{V}/explore/blocks.json").read_text(encoding="utf-8"))
    assert analysis["effects"] and set(analysis["effects"]) | set(analysis["skipped"]) == set(all_blocks("sd15"))
    assert all(why in ("no module", "already 0") for why in analysis["skipped"].values())
    assert "blocks" not in groups(build(root))  # asked for once: not part of every build
    page = (root / "build/report/index.html").read_text(encoding="utf-8")
    assert "block weights explored" in page and 'data-row="ALL"' in page and "best: <b>" in page
    assert 'class="change-bar"' in page and 'data-copy="' in page
    assert "block weights explored: " in page.split('id="stale"')[0]  # on the first screen, the overview
