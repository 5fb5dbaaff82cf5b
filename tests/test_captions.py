"""Caption rules for every code (against an independent table), overrides, folder names, `tags`."""

from pathlib import Path

import pytest

from charbuild.captions import (
    DEFAULT_RULES,
    TAG_RULE_KEYS,
    FolderKeywords,
    TagRules,
    caption_folder,
    caption_tags,
    caption_text,
    parse_folder_name,
    rules_with_overrides,
)
from charbuild.codes import ALL_CODES
from charbuild.errors import CharbuildError

# --- an independent statement of rules §2, written per horizontal angle h -------------------

DIRECTION = {0: "from front", 1: "from front", 2: "from side", 3: "from behind",
             4: "from behind", 5: "from behind", 6: "from side", 7: "from front"}
VERTICAL = {"0": "from horizontal", "1": "from above", "2": "from below"}
# which part of the bare upper body shows, per h
BODY_SIDE = {0: "front", 1: "front", 2: "front", 3: "back", 4: "back", 5: "back", 6: "front", 7: "front"}
BODY_SIDE_TAGS = {"front": "nipples, collarbone, abs, ribs", "back": "shoulder blades, median furrow"}
# navel: from above and front-facing, or from below and from the front (face images only)
NAVEL_VH = {"10", "11", "12", "16", "17", "20", "21", "27"}
# the face is hidden only from straight behind
NO_EXPRESSION_H = {4}

KRNK_F00 = (
    "krnk, white background, black background, simple background, from horizontal, from front, "
    "upper body, standing, straight standing, nude, completely nude, bare shoulders, nipples, "
    "collarbone, abs, ribs, looking at viewer, smile, open mouth, blush"
)


def expected_caption(code: str, lead: str) -> str:
    kind, v, h = code[0], code[1], int(code[2])
    parts = [lead, "white background, black background, simple background", VERTICAL[v], DIRECTION[h]]
    parts.append("upper body" if kind == "f" else "full body")
    parts.append("standing, straight standing")
    if kind == "f":
        parts.append("nude, completely nude, bare shoulders")
        parts.append(BODY_SIDE_TAGS[BODY_SIDE[h]])
        if code[1:] in NAVEL_VH:
            parts.append("navel")
    parts.append("looking at viewer" if h == 0 else "looking away")
    if h not in NO_EXPRESSION_H:
        parts.append("smile, open mouth, blush")
    return ", ".join(p for p in parts if p)


@pytest.mark.parametrize("code", ALL_CODES)
def test_caption_rules_for_every_code(code):
    assert caption_text(code, ["krnk", "shorthair"]) == expected_caption(code, "krnk, shorthair")
    assert caption_text(code, []) == expected_caption(code, "")


def test_original_example_string():
    assert caption_text("f00", ["krnk"]) == KRNK_F00


def test_body_images_have_no_nude_tags():
    for code in ALL_CODES:
        if code.startswith("b"):
            tags = caption_tags(code, ["krnksf"])
            assert "full body" in tags and "upper body" not in tags
            assert not {"nude", "navel", "nipples", "shoulder blades"} & set(tags)


def test_upper_case_code_and_lead_tag_cleanup():
    assert caption_text("F00", [" krnk ", "", "  "]) == KRNK_F00


def test_caption_tags_rejects_non_codes():
    with pytest.raises(ValueError, match="not an image code"):
        caption_tags("f09", ["krnk"])


def test_caption_has_no_trailing_newline():
    assert not caption_text("b24", ["x"]).endswith(("\n", " ", ","))


# --- overrides ------------------------------------------------------------------------------


def test_rule_keys_are_the_fields():
    assert TAG_RULE_KEYS == tuple(TagRules.__dataclass_fields__)
    assert "expression" in TAG_RULE_KEYS and "background" in TAG_RULE_KEYS


def test_override_expression():
    rules = rules_with_overrides({"expression": ["smile"]})
    assert rules.expression == ("smile",)
    assert rules.nude == DEFAULT_RULES.nude
    assert caption_text("f00", ["krnk"], rules) == KRNK_F00.replace("smile, open mouth, blush", "smile")
    assert DEFAULT_RULES.expression == ("smile", "open mouth", "blush")  # default untouched


def test_override_with_empty_list_drops_the_rule():
    rules = rules_with_overrides({"expression": [], "background": ("simple background",)})
    text = caption_text("f00", ["krnk"], rules)
    assert text.startswith("krnk, simple background, from horizontal")
    assert text.endswith("looking at viewer")


def test_override_errors_list_everything():
    with pytest.raises(ValueError) as info:
        rules_with_overrides({"expresion": ["smile"], "nude": "nude", "navel": ["navel", 3], "zzz_qqq": []})
    msg = str(info.value)
    assert "'expresion'" in msg and "did you mean 'expression'" in msg
    assert "'zzz_qqq'" in msg
    assert "'nude' must be a list" in msg
    assert "'navel'" in msg


# --- folder names (rules §3) ----------------------------------------------------------------


def test_original_folder_name_example():
    assert parse_folder_name("kuronekomimi girl, shorthair, choker, ahoge_f0768") == FolderKeywords(
        keyword="kuronekomimi",
        class_tokens="kuronekomimi girl",
        lead_tags=("kuronekomimi", "shorthair", "choker", "ahoge"),
        flip_aug=True,
    )


@pytest.mark.parametrize(
    "name, keyword, class_tokens, lead, flip",
    [
        ("krnk girl_f0512", "krnk", "krnk girl", ("krnk",), True),
        ("krnk", "krnk", "krnk", ("krnk",), True),
        ("krnk girl_noflip_f0512", "krnk", "krnk girl", ("krnk",), False),
        ("krnk girl, choker_flip_x", "krnk", "krnk girl", ("krnk", "choker"), True),
        ("krnk girl_f0512_noflip_", "krnk", "krnk girl", ("krnk",), False),
        ("krnk girl_f0512_noflip", "krnk", "krnk girl", ("krnk",), True),  # marker needs both '_'
        ("黒猫 少女, 短髪_f0512", "黒猫", "黒猫 少女", ("黒猫", "短髪"), True),
        ("krnk cat girl,  a ,b_c, d", "krnk", "krnk cat girl", ("krnk", "a", "b"), True),
    ],
)
def test_parse_folder_name(name, keyword, class_tokens, lead, flip):
    parsed = parse_folder_name(name)
    assert (parsed.keyword, parsed.class_tokens, parsed.lead_tags, parsed.flip_aug) == (keyword, class_tokens, lead, flip)


@pytest.mark.parametrize("name", ["_f0512", " , _x", ""])
def test_parse_folder_name_without_keyword(name):
    with pytest.raises(ValueError, match="no keyword"):
        parse_folder_name(name)


def test_parse_folder_name_with_both_flip_markers():
    with pytest.raises(ValueError, match="both"):
        parse_folder_name("krnk_flip_noflip_")


# --- caption_folder (`charbuild tags FOLDER`) -----------------------------------------------


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"not decoded")


def test_caption_folder_writes_from_folder_name(tmp_path):
    folder = tmp_path / "kuronekomimi girl, shorthair_f0768"
    folder.mkdir()
    _touch(folder, "f00.png", "f24-smile.webp", "cat.png", "notes.md")
    report = caption_folder(folder)
    assert [p.name for p in report.written] == ["f00.txt", "f24-smile.txt"]
    assert (folder / "f00.txt").read_text(encoding="utf-8") == caption_text("f00", ["kuronekomimi", "shorthair"])
    assert (folder / "f24-smile.txt").read_bytes() == caption_text("f24", ["kuronekomimi", "shorthair"]).encode("utf-8")
    assert [(p.name, "image code" in why) for p, why in report.skipped] == [("cat.png", True)]
    assert not (folder / "cat.txt").exists() and not (folder / "notes.txt").exists()
    assert any("cat.png" in line for line in report.lines())


def test_caption_folder_with_keyword_and_tags(tmp_path):
    _touch(tmp_path, "B12.PNG")
    report = caption_folder(tmp_path, keyword="krnksf", tags=["krnk", "school uniform"])
    assert report.lead_tags == ("krnksf", "krnk", "school uniform")
    assert (tmp_path / "B12.txt").read_text(encoding="utf-8") == caption_text("b12", ["krnksf", "krnk", "school uniform"])


def test_caption_folder_japanese_keyword_is_utf8(tmp_path):
    folder = tmp_path / "黒猫 少女_f0512"
    folder.mkdir()
    _touch(folder, "f00.png")
    caption_folder(folder)
    assert (folder / "f00.txt").read_bytes().startswith("黒猫, white background".encode("utf-8"))


def test_caption_folder_keeps_edited_captions(tmp_path):
    _touch(tmp_path, "f00.png", "f01.png")
    caption_folder(tmp_path, keyword="krnk")
    (tmp_path / "f00.txt").write_text("krnk, my edit", encoding="utf-8")
    (tmp_path / "f01.txt").write_text(caption_text("f01", ["krnk"]) + "\n", encoding="utf-8")  # same + newline

    report = caption_folder(tmp_path, keyword="krnk")
    assert report.written == []
    assert [p.name for p in report.unchanged] == ["f01.txt"]
    assert [(p.name, "--overwrite" in why) for p, why in report.skipped] == [("f00.txt", True)]
    assert (tmp_path / "f00.txt").read_text(encoding="utf-8") == "krnk, my edit"

    report = caption_folder(tmp_path, keyword="krnk", overwrite=True)
    assert [p.name for p in report.written] == ["f00.txt"]
    assert (tmp_path / "f00.txt").read_text(encoding="utf-8") == caption_text("f00", ["krnk"])


def test_caption_folder_uses_rules(tmp_path):
    _touch(tmp_path, "f04.png")
    caption_folder(tmp_path, keyword="k", rules=rules_with_overrides({"background": []}))
    assert (tmp_path / "f04.txt").read_text(encoding="utf-8").startswith("k, from horizontal, from behind")


def test_caption_folder_errors(tmp_path):
    with pytest.raises(CharbuildError, match="not a folder"):
        caption_folder(tmp_path / "missing")
    bad = tmp_path / "_f0512"
    bad.mkdir()
    with pytest.raises(CharbuildError, match="--keyword"):
        caption_folder(bad)
