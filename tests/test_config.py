"""Project loading and validation: every problem at once, with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from charbuild.config import load_project
from charbuild.errors import ConfigError
from charbuild.tomllines import key_lines, line_of

from conftest import draw_picture, make_project


def problems_of(root: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_project(root)
    return [str(p) for p in info.value.problems()]


def test_loads_a_small_project(project):
    p = load_project(project)
    assert set(p.characters) == {"alice", "bob"}
    assert set(p.loras) == {"alc", "alcdr", "bbo"}
    body = p.loras["alcdr"]
    assert body.kind == "body" and body.repeats == 2 and body.steps == 5
    assert [part.name for part in body.parts] == ["face", "dress"]
    assert body.keywords == ["alcdr", "alc"]
    assert p.loras["alc"].repeats == 4
    assert [img.code for img in p.characters["alice"].face.images] == ["f00", "f01", "f02"]


def test_groups_union_face_and_body_parts(tmp_path):
    root = make_project(tmp_path / "p", characters={
        "alice": {"keyword": "alc", "face": ["f00"], "outfits": {"dress": ("alcdr", ["b00"])}},
        "bob": {"keyword": "bbo", "face": ["f00"], "outfits": {"suit": ("bbosu", ["b00"])}},
    }, groups={"duo": ["alice/dress", "bob/suit"]})
    p = load_project(root)
    duo = p.loras["duo"]
    assert duo.kind == "group" and duo.repeats == 1
    assert [part.key for part in duo.parts] == ["alice/face", "alice/dress", "bob/face", "bob/suit"]
    assert duo.keywords == ["alcdr", "bbosu", "alc", "bbo"]


def test_key_lines_tracks_tables_and_keys():
    text = 'keyword = "a"\n\n[face]\nrepeats = 4\n[outfits.school]\nkeyword = "b"\ntags = [\n "x",\n]\nsteps = 3\n'
    lines = key_lines(text)
    assert lines[("keyword",)] == 1
    assert lines[("face", "repeats")] == 4
    assert lines[("outfits", "school", "keyword")] == 6
    assert lines[("outfits", "school", "steps")] == 10
    assert line_of(lines, ("outfits", "school", "nothing")) == 5


def test_every_problem_reported_with_line_numbers(project):
    toml = project / "characters" / "alice" / "character.toml"
    toml.write_text('keyword = "alc"\nclas = "girl"\nbackground = "grey"\n[face]\nrepeats = "4"\n'
                    '[outfits.dress]\nkeyword = "alcdr"\nstepz = 3\n', encoding="utf-8")
    msgs = problems_of(project)
    assert any(m.startswith("characters/alice/character.toml:2: error: unknown key 'clas'") and "did you mean 'class'" in m for m in msgs), msgs
    assert any(m.startswith("characters/alice/character.toml:3: error: 'background' must be one of") for m in msgs), msgs
    assert any(m.startswith("characters/alice/character.toml:5: error: 'face.repeats' must be a whole number") for m in msgs), msgs
    assert any(m.startswith("characters/alice/character.toml:8: error: unknown key 'stepz'") for m in msgs), msgs


def test_toml_syntax_error_has_its_line(project):
    (project / "characters" / "bob" / "character.toml").write_text('keyword = "bbo"\ntags = ["a",\n[face]\n', encoding="utf-8")
    msgs = problems_of(project)
    assert any(m.startswith("characters/bob/character.toml:3: error: TOML syntax error") for m in msgs), msgs


def test_missing_keyword_and_duplicate_keyword(project):
    (project / "characters" / "bob" / "character.toml").write_text('keyword = "alc"\n', encoding="utf-8")
    msgs = problems_of(project)
    assert any("'alc' is used twice" in m for m in msgs), msgs
    (project / "characters" / "bob" / "character.toml").write_text('class = "boy"\n', encoding="utf-8")
    msgs = problems_of(project)
    assert any(m.startswith("characters/bob/character.toml: error: missing 'keyword'") for m in msgs), msgs


def test_picture_problems(project):
    face = project / "characters" / "alice" / "face"
    draw_picture(face / "smile.png", "f00")
    draw_picture(face / "b00.png", "b00")
    (face / "f04.png").write_bytes(b"not a png at all")
    draw_picture(project / "characters" / "alice" / "outfits" / "dress" / "f10.png", "f10")
    msgs = problems_of(project)
    assert any("alice/face/smile.png: error: the file name does not start with an image code" in m for m in msgs), msgs
    assert any("alice/face/b00.png: error: a 'b' picture in a face folder" in m for m in msgs), msgs
    assert any("alice/outfits/dress/f10.png: error: a 'f' picture in a outfit folder" in m for m in msgs), msgs
    assert any("alice/face/f04.png: error:" in m for m in msgs), msgs


def test_unknown_group_member_and_lora_without_images(tmp_path):
    root = make_project(tmp_path / "p", characters={
        "alice": {"keyword": "alc", "face": ["f00"], "outfits": {"dress": ("alcdr", [])}},
    }, groups={"duo": ["alice/dres"]})
    msgs = problems_of(root)
    assert any("characters/groups.toml:2: error: [duo] member 'alice/dres'" in m and "did you mean 'alice/dress'" in m for m in msgs), msgs
    assert any("alice/outfits/dress: error: outfit 'dress' has no body pictures" in m for m in msgs), msgs


def test_template_and_symmetry_warnings(project):
    toml = project / "characters" / "bob" / "character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace('background = "black"', 'background = "black"\nsymmetric = false'), encoding="utf-8")
    p = load_project(project)
    msgs = [str(w) for w in p.warnings]
    assert any("characters/bob/face: warning: angle codes missing from the template set" in m for m in msgs), msgs
    assert any("characters/bob/face: warning: the character is not symmetric" in m for m in msgs), msgs


def test_project_toml_errors(project):
    (project / "characters" / "project.toml").write_text(
        '[dataset]\nsizes = [128, "x"]\nbatch_sizes = "8GB"\n[trainer]\nbackend = "gpu"\n[compres]\n', encoding="utf-8")
    msgs = problems_of(project)
    assert any(m.startswith("characters/project.toml:2: error: 'dataset.sizes'") for m in msgs), msgs
    assert any(m.startswith("characters/project.toml:3: error: 'dataset.batch_sizes' names no table") for m in msgs), msgs
    assert any(m.startswith("characters/project.toml:5: error: 'trainer.backend' must be one of") for m in msgs), msgs
    assert any(m.startswith("characters/project.toml:6: error: unknown key 'compres'") and "did you mean 'compress'" in m for m in msgs), msgs


def test_japanese_and_spaced_names(tmp_path):
    root = make_project(tmp_path / "プロジェクト dir", characters={
        "黒猫 ちゃん": {"keyword": "krnk", "face": ["f00", "f12"], "outfits": {"制服 夏": ("krnksf", ["b00"])}},
    })
    p = load_project(root)
    assert set(p.characters) == {"黒猫 ちゃん"}
    assert p.loras["krnksf"].parts[1].name == "制服 夏"


def test_source_formats_accepted(tmp_path):
    root = make_project(tmp_path / "p", characters={"a": {"keyword": "aa", "face": ["f00"], "outfits": {}}})
    face = root / "characters" / "a" / "face"
    draw_picture(face / "f01.jpg", "f01")
    draw_picture(face / "f02-smile.webp", "f02")
    p = load_project(root)
    assert [(i.code, i.stem) for i in p.characters["a"].face.images] == [("f00", "f00"), ("f01", "f01"), ("f02", "f02-smile")]


def test_unclosed_array_at_the_end_names_the_line_it_starts_on(project):
    (project / "characters" / "bob" / "character.toml").write_text(
        'keyword = "bbo"\nclass = "boy"\ntags = ["a",\n  "b",\n', encoding="utf-8")
    msgs = problems_of(project)
    assert "characters/bob/character.toml:3: error: TOML syntax error: the array that starts on this line is " \
           "never closed (Invalid value at the end of the file); fix the syntax" in msgs, msgs


def test_unclosed_string_and_open_end_name_a_line(tmp_path):
    from charbuild.tomllines import syntax_error_line
    import tomllib

    for text, line in [('a = 1\nb = """x\ny\n', 2), ('a = 1\nb = [ # [\n1,\n\n', 2), ("a = 1\nb = [1, 2]\nc =\n\n", 3)]:
        with pytest.raises(tomllib.TOMLDecodeError) as info:
            tomllib.loads(text)
        assert syntax_error_line(info.value, text) == line, text


def test_a_broken_character_file_is_not_blamed_on_groups_toml(tmp_path):
    root = make_project(tmp_path / "p", characters={
        "alice": {"keyword": "alc", "face": ["f00"], "outfits": {"dress": ("alcdr", ["b00"])}},
        "bob": {"keyword": "bbo", "face": ["f00"], "outfits": {"suit": ("bbosu", ["b00"])}},
    }, groups={"duo": ["alice/dress", "bob/suit"]})
    (root / "characters" / "bob" / "character.toml").write_text('keyword = "bbo"\ntags = ["a",\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_project(root)
    errors = [str(p) for p in info.value.problems()]
    assert errors == ["characters/bob/character.toml:2: error: TOML syntax error: the array that starts on this "
                      "line is never closed (Invalid value at the end of the file); fix the syntax"], errors
    notes = [str(w) for w in info.value.warnings if "groups.toml" in w.path]
    assert notes == ["characters/groups.toml:2: warning: [duo] member 'bob/suit' not checked: its character "
                     "could not be read (fix characters/bob/character.toml first)"], notes


FACE_LBW = "0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1,1,1,0,1,1,1,0,0,1"


def _write_project_toml(root: Path, extra: str) -> None:
    toml = root / "characters" / "project.toml"
    toml.write_text(toml.read_text(encoding="utf-8") + extra, encoding="utf-8")


def test_lbw_weight_strings_are_accepted_wherever_weights_are(project):
    from charbuild.config import merge_spec, resolve_merge_weights
    from charbuild.lora.blocks import resolve_block_weights

    _write_project_toml(project, f'[merge]\nface = "MYFACE"\nbody = "{FACE_LBW}"\n'
                                 f'[merge.presets]\nMYFACE = "{FACE_LBW}"\nSHORT = "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"\n')
    toml = project / "characters" / "bob" / "character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\n", '[face]\nmerge = " 1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1 "\n'),
                    encoding="utf-8")
    p = load_project(project)
    expected = resolve_block_weights(FACE_LBW)  # as `charbuild merge --weights 0,1,…` reads it
    assert resolve_merge_weights(merge_spec(p.loras["alc"], p.merge), p) == expected
    assert resolve_merge_weights(merge_spec(p.loras["alcdr"], p.merge), p) == expected
    assert resolve_merge_weights("SHORT", p) == resolve_block_weights("INS")
    assert resolve_merge_weights(merge_spec(p.loras["bbo"], p.merge), p) == resolve_block_weights(
        "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1")


def test_every_weight_error_names_the_line_of_its_value(project):
    _write_project_toml(project, '[merge]\nbody = "0,1,x"\n[merge.presets]\nMYFACE = "0,1,1"\nOK = "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"\n')
    toml = project / "characters" / "alice" / "character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\n", '[face]\nmerge = "MYFACE"\n')
                    .replace('keyword = "alcdr"\n', 'keyword = "alcdr"\nmerge = "1,0,1"\n'), encoding="utf-8")
    msgs = problems_of(project)
    lines = toml.read_text(encoding="utf-8").splitlines()
    assert "characters/project.toml:11: error: [merge.presets] MYFACE: 3 block weights given; sd15 takes 17 or 26 " \
           "values (17: BASE…OUT11, 26: BASE…OUT11)" in msgs, msgs
    assert any(m.startswith("characters/project.toml:9: error: 'merge.body': block weight: 'x' is not a number") for m in msgs), msgs
    merge_line = lines.index('merge = "1,0,1"') + 1
    assert any(m.startswith(f"characters/alice/character.toml:{merge_line}: error: LoRA 'alcdr' merge weights: 3 block weights")
               for m in msgs), msgs
    # the broken preset is reported once, at its own line, not again where the face LoRA names it
    assert not any("'alc' merge weights" in m for m in msgs), msgs
    assert len(msgs) == 3, msgs


def test_a_bad_training_value_is_reported_once_at_its_own_line(project):
    _write_project_toml(project, "")
    toml = project / "characters" / "project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("dim = 4\n", 'dim = 4\nlr = "fast"\n'), encoding="utf-8")
    msgs = problems_of(project)
    assert msgs == ["characters/project.toml:6: error: 'training.lr' must be a learning rate: a float like 1e-4 or an "
                    "integer number of 1e-6 units, not 'fast'"], msgs


def test_a_lora_training_value_is_reported_at_its_own_line(project):
    toml = project / "characters" / "bob" / "character.toml"
    toml.write_text(toml.read_text(encoding="utf-8") + "[face.training]\nseed = -1\nmixed_precision = \"fp61\"\n", encoding="utf-8")
    msgs = problems_of(project)
    n = len(toml.read_text(encoding="utf-8").splitlines())
    assert f"characters/bob/character.toml:{n - 1}: error: 'face.training.seed' must be >= 0, not -1" in msgs, msgs
    assert any(m.startswith(f"characters/bob/character.toml:{n}: error: 'face.training.mixed_precision' must be one of")
               and "did you mean 'fp16'" in m for m in msgs), msgs


def test_settings_hold_the_users_values_only(project):
    _write_project_toml(project, f'[merge.presets]\nMYFACE = "{FACE_LBW}"\n')
    p = load_project(project)
    assert p.training == {"variants": ["Lora1x1A1-AdamW8"], "dim": 4}
    assert set(p.merge) == {"presets", "face", "body", "group", "explore", "explore_max_leak", "explore_blocks"}
    assert p.merge["presets"]["MYFACE"] == [float(x) for x in FACE_LBW.split(",")]
    assert not [k for t in (p.model, p.trainer, p.dataset, p.compress, p.captions) for k in t if k.startswith("_")]
    alc = p.loras["alc"]
    assert alc.line == 5 and alc.origin.line("steps") == 6 and alc.source == "characters/alice/character.toml"
    assert p.origin.line("training", "dim") == 5


def test_backend_specific_settings_travel_in_trainer_extra(project):
    _write_project_toml(project, '[trainer.extra]\nfake_seconds = 0.5\nanything = { nested = [1, 2] }\n')
    p = load_project(project)
    assert p.trainer["extra"] == {"fake_seconds": 0.5, "anything": {"nested": [1, 2]}}
    toml = project / "characters" / "project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[trainer.extra]\n", ""), encoding="utf-8")
    msgs = problems_of(project)
    assert "characters/project.toml:8: error: 'trainer.fake_seconds' is a backend-specific setting: move it into " \
           "the [trainer.extra] table" in msgs, msgs


def test_default_trainer_extra_is_an_empty_table(project):
    assert load_project(project).trainer["extra"] == {}


def test_continue_from_a_file_or_a_variant_of_the_project(project):
    (project / "models").mkdir()
    (project / "models" / "old.safetensors").write_bytes(b"x")
    alice = project / "characters" / "alice" / "character.toml"
    text = alice.read_text(encoding="utf-8")
    alice.write_text(text.replace("[face]\n", '[face]\ncontinue_from = "models/old.safetensors"\n')
                     .replace('keyword = "alcdr"\n', 'keyword = "alcdr"\ncontinue_from = "alc/Lora1x1A1-AdamW8"\n'),
                     encoding="utf-8")
    p = load_project(project)
    assert p.loras["alc"].continue_from == "models/old.safetensors"
    assert p.loras["alcdr"].continue_from == "alc/Lora1x1A1-AdamW8"
    assert p.loras["bbo"].continue_from is None


def test_continue_from_errors_name_the_file_and_line(project):
    alice = project / "characters" / "alice" / "character.toml"
    text = alice.read_text(encoding="utf-8")
    alice.write_text(text.replace("[face]\n", '[face]\ncontinue_from = "models/none.safetensors"\n')
                     .replace('keyword = "alcdr"\n', 'keyword = "alcdr"\ncontinue_from = "alcdr/Lora1x1A1-AdamW8"\n'),
                     encoding="utf-8")
    bob = project / "characters" / "bob" / "character.toml"
    bob.write_text(bob.read_text(encoding="utf-8").replace("[face]\n", '[face]\ncontinue_from = "alc/Lora3x3"\n'), encoding="utf-8")
    msgs = problems_of(project)
    lines = alice.read_text(encoding="utf-8").splitlines()
    first = lines.index('continue_from = "models/none.safetensors"') + 1
    second = lines.index('continue_from = "alcdr/Lora1x1A1-AdamW8"') + 1
    assert any(m.startswith(f"characters/alice/character.toml:{first}: error: 'continue_from' file "
                            "'models/none.safetensors' does not exist") for m in msgs), msgs
    assert f"characters/alice/character.toml:{second}: error: 'continue_from' makes LoRA 'alcdr' continue from itself " \
           "(alcdr -> alcdr); continue from another LoRA or a file" in msgs, msgs
    assert any(m.startswith("characters/bob/character.toml:6: error: 'continue_from' = 'alc/Lora3x3': LoRA 'alc' has "
                            "no variant 'Lora3x3'") for m in msgs), msgs
    bob.write_text(bob.read_text(encoding="utf-8").replace('"alc/Lora3x3"', '"alk/Lora1x1A1-AdamW8"'), encoding="utf-8")
    msgs = problems_of(project)
    assert any(m.startswith("characters/bob/character.toml:6: error: 'continue_from' = 'alk/Lora1x1A1-AdamW8' names no "
                            "LoRA of this project (did you mean 'alc'?)") for m in msgs), msgs


def test_an_unreadable_project_toml_is_not_blamed_on_the_loras(project):
    toml = project / "characters" / "alice" / "character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\n", '[face]\nmerge = "MYFACE"\n'), encoding="utf-8")
    (project / "characters" / "project.toml").write_text('[merge.presets]\nMYFACE = "0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1,1,1,0,1,1,1,0,0,1\n',
                                                          encoding="utf-8")
    msgs = problems_of(project)
    assert len(msgs) == 1 and msgs[0].startswith("characters/project.toml:2: error: TOML syntax error"), msgs


def _messages(project_root, severity: str) -> list[str]:
    from charbuild.config import load_project

    try:
        problems = load_project(project_root).warnings
    except ConfigError as exc:
        problems = exc.problems() + exc.warnings
    return [str(p) for p in problems if p.severity == severity]


def test_picture_names_that_differ_only_in_case_are_refused_naming_both(project):
    probe = project / "characters/bob/face/CASE-PROBE"
    probe.write_bytes(b"")
    if (project / "characters/bob/face/case-probe").exists():
        pytest.skip("a case-insensitive file system cannot hold F00.png beside f00.png")
    probe.unlink()
    draw_picture(project / "characters/bob/face/F00.png", "f00", seed=3)
    errors = _messages(project, "error")
    assert any("two pictures named 'f00' (F00.png and f00.png)" in e and "case-insensitive file systems" in e
               for e in errors), errors


def test_a_file_manager_copy_is_a_warning(project):
    draw_picture(project / "characters/bob/face/f00 copy.png", "f00", seed=3)
    warnings = _messages(project, "warning")
    assert any(w.startswith("characters/bob/face/f00 copy.png: warning: looks like a file manager's copy of a f00")
               for w in warnings), warnings


def test_a_mirrored_code_on_a_symmetric_character_is_a_warning(project):
    draw_picture(project / "characters/bob/face/f05.png", "f05", seed=3)
    warnings = _messages(project, "warning")
    assert any(w.startswith("characters/bob/face/f05.png: warning: a mirrored-angle code (f05) on a symmetric character")
               for w in warnings), warnings


def test_an_empty_picture_is_one_error_not_also_a_missing_code(project):
    (project / "characters/bob/face/f01.png").write_bytes(b"")
    problems = _messages(project, "error") + _messages(project, "warning")
    assert any(p.startswith("characters/bob/face/f01.png: error:") for p in problems), problems
    missing = [p for p in problems if p.startswith("characters/bob/face: warning: angle codes missing")]
    assert missing and "f01" not in missing[0].split(":", 3)[3], missing


def test_cpu_trainings_sets_the_cpu_slots_and_the_builds_default_parallelism(project, monkeypatch):
    from charbuild.dodo import default_jobs, project_graph
    from charbuild.train import hardware

    monkeypatch.setattr(hardware, "has_cuda_gpu", lambda: False)
    assert load_project(project).trainer["cpu_trainings"] == 1 and default_jobs(project) == 1
    _write_project_toml(project, "cpu_trainings = 3\n")  # the fixture's project.toml ends in [trainer]
    assert load_project(project).trainer["cpu_trainings"] == 3
    assert default_jobs(project) == 3  # plain doit runs 3 tasks at once: every CPU slot busy
    g = project_graph(project)
    lora = g.project.loras["alc"]
    assert g.train_job(lora, g.variants(lora)[0]).trainer.cpu_trainings == 3
    monkeypatch.setattr(hardware, "has_cuda_gpu", lambda: True)
    assert default_jobs(project) == 1  # with a GPU: one per GPU of [trainer] gpus (default [0])
    _write_project_toml(project, "gpus = [0, 1]\n")
    assert default_jobs(project) == 2
    toml = project / "characters" / "project.toml"
    text = toml.read_text(encoding="utf-8")
    toml.write_text(text.replace("cpu_trainings = 3", "cpu_trainings = 0"), encoding="utf-8")
    msgs = problems_of(project)
    assert any(m.startswith("characters/project.toml:8: error: 'trainer.cpu_trainings' must be") for m in msgs), msgs
    assert default_jobs(project) == 1  # the build reports the error; no parallel run meanwhile
