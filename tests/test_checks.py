"""The one validation vocabulary: checkers, did-you-mean, located origins."""

from __future__ import annotations

import pytest

from charbuild.checks import (Origin, closest, did_you_mean, either, is_choice, is_int, is_number, is_str_list,
                              require, unknown_key)
from charbuild.tomllines import key_lines


def test_closest_ignores_case_and_keeps_the_choices_spelling():
    assert closest("adamw8bit", ["AdamW8bit", "AdamW", "adafactor"]) == ["AdamW8bit"]
    assert closest("zzz", ["face", "body"]) == []
    assert did_you_mean("fase", ["face", "body"]) == " (did you mean 'face'?)"
    assert did_you_mean("zzz", ["face"]) == ""
    assert unknown_key("stepz", ["steps", "repeats"], "[face]") == "unknown key 'stepz' in [face]; did you mean 'steps'?"
    assert unknown_key("q", ["steps", "repeats"], "[face]") == "unknown key 'q' in [face]; allowed: repeats, steps"


def test_checkers_complain_in_one_voice():
    assert is_int(1)(3) is None and is_int(1)(True) == "must be a whole number, not true/false"
    assert is_int(0, 12)(13) == "must be 0..12, not 13"
    assert is_number()(float("nan")) == "must be a finite number, not nan"
    assert is_choice("fp16", "bf16")("fp61") == "must be one of 'fp16', 'bf16', not 'fp61' (did you mean 'fp16'?)"
    assert is_str_list(["a"]) is None and is_str_list("a") == "must be a list of strings, not the string 'a'"
    assert either(is_int(1), is_str_list)(["x"]) is None
    assert require(4, "dim", is_int(1)) == 4
    with pytest.raises(ValueError, match=r"^dim = -4: must be >= 1, not -4$"):
        require(-4, "dim", is_int(1))


def test_origin_finds_the_line_of_a_key_or_its_table():
    lines = key_lines('[face]\nsteps = 4\n[face.training]\nlr = 1e-4\n')
    face = Origin("c.toml", ("face",), lines)
    assert face.line() == 1 and face.line("steps") == 2 and face.line("merge") == 1
    assert face.at("training").line("lr") == 4 and face.has("steps") and not face.has("merge")
    assert Origin("c.toml").line() is None
