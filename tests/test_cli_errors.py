"""Every ``charbuild`` command on a broken project: the problems as ``path:line: error:`` lines
and exit 2, never a Python traceback (each runs as a user runs it, in a process of its own)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import make_project

BROKEN_LINE = "characters/bob/character.toml:6: error: 'face.repeats' must be a whole number"

COMMANDS = [
    ["check"],
    ["check", "--quick"],
    ["build"],
    ["build", "bob"],
    ["build", "--for", "characters/bob/face/f00.png"],
    ["build", "--for", "characters/bob/face/f00.png", "--train"],
    ["status"],
    ["status", "--all"],
    ["train"],
    ["train", "bbo"],
    ["train", "--dry-run"],
    ["train", "--force", "bbo"],
    ["report"],
    ["report", "--build"],
]


def charbuild(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "charbuild.cli", *args], cwd=root, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("broken") / "p")
    toml = root / "characters/bob/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\n", '[face]\nrepeats = "four"\n'), encoding="utf-8")
    return root


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_a_broken_project_gives_path_line_errors_and_exit_2(broken, args):
    run = charbuild(broken, *args)
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    assert BROKEN_LINE in run.stderr, run.stderr
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert not (broken / "build/loras").exists()  # nothing was built


def test_doit_s_own_errors_are_charbuild_errors_with_exit_2(project):
    run = charbuild(project, "build", "nosuchtarget")
    assert "Traceback" not in run.stderr
    assert run.returncode == 2, run.stderr
    assert 'charbuild: error: command `run` invalid parameter: "nosuchtarget"' in run.stderr, run.stderr
    assert 'Type "doit list"' in run.stderr  # a command that exists


def test_new_on_a_broken_project_still_scaffolds(broken):
    run = charbuild(broken, "new", "carol")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert (broken / "characters/carol/character.toml").is_file()
    (broken / "characters/carol/character.toml").unlink()
    (broken / "characters/carol/face").rmdir()
    (broken / "characters/carol").rmdir()
