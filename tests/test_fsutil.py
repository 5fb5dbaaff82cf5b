"""Atomic writes: an output held open elsewhere (Windows) is retried, then reported by name."""

from __future__ import annotations

import os

import pytest
from doit.exceptions import TaskFailed

from charbuild import fsutil
from charbuild.errors import OutputError
from charbuild.actions import write_text_action


@pytest.fixture
def locked(monkeypatch):
    """os.replace fails with a sharing violation ``calls["fail"]`` times, as Windows does."""
    calls = {"fail": 0, "tries": 0}
    real = os.replace

    def replace(src, dst):
        calls["tries"] += 1
        if calls["fail"] > 0:
            calls["fail"] -= 1
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)
    monkeypatch.setattr(fsutil, "REPLACE_RETRIES", (0.0, 0.0, 0.0))
    return calls


def test_a_briefly_held_file_is_replaced_after_retries(tmp_path, locked):
    target = tmp_path / "out.txt"
    target.write_text("old", encoding="utf-8")
    locked["fail"] = 2
    fsutil.write_text_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "new" and locked["tries"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_file_held_open_is_reported_by_name_and_left_as_it_was(tmp_path, locked):
    target = tmp_path / "キャラ" / "out.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")
    locked["fail"] = 99
    with pytest.raises(OutputError, match="another program may hold it open") as info:
        fsutil.write_bytes_atomic(target, b"new")
    assert info.value.path == str(target) and str(target) in str(info.value)
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["out.safetensors"]  # no temp left behind
    failed = write_text_action(str(target), "x")  # a doit action reports it, no traceback
    assert isinstance(failed, TaskFailed) and "another program may hold it open" in str(failed)


def test_an_unwritable_folder_is_reported_by_name(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fsutil.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="cannot create a file in this folder") as info:
        fsutil.write_text_atomic(tmp_path / "out.txt", "x")
    assert info.value.path == str(tmp_path)


def test_a_full_disk_is_reported_by_name_and_nothing_is_replaced(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="the disk is full") as info:
        with fsutil.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    assert info.value.path == str(target)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
