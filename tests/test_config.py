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
