"""The VS Code tasks ship a problem matcher that must match what charbuild prints."""

from __future__ import annotations

import json
import re

from charbuild.errors import Problem
from conftest import REPO


def matcher():
    tasks = json.loads((REPO / ".vscode/tasks.json").read_text(encoding="utf-8"))["tasks"]
    labels = {t["label"] for t in tasks}
    assert {"charbuild: check", "charbuild: build this file"} <= labels
    build_this = next(t for t in tasks if t["label"] == "charbuild: build this file")
    assert build_this["args"] == ["build", "--for", "${file}"]
    pattern = build_this["problemMatcher"]["pattern"]
    return re.compile(pattern["regexp"]), pattern


def test_problem_matcher_reads_errors_with_and_without_lines():
    regexp, pattern = matcher()
    m = regexp.match(str(Problem("characters/黒猫 ちゃん/character.toml", "unknown key 'x'", 7)))
    assert m and m.group(pattern["file"]) == "characters/黒猫 ちゃん/character.toml"
    assert m.group(pattern["line"]) == "7" and m.group(pattern["severity"]) == "error"
    assert m.group(pattern["message"]) == "unknown key 'x'"
    m = regexp.match(str(Problem("characters/a/face", "angle codes missing", None, "warning")))
    assert m and m.group(pattern["file"]) == "characters/a/face" and m.group(pattern["line"]) is None
    assert m.group(pattern["severity"]) == "warning"
