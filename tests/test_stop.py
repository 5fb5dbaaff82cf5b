"""Stopping a build: SIGTERM keeps what finished, leaves no half-made LoRA, frees the lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_project
from graphtools import build, groups

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def test_sigterm_keeps_finished_tasks_and_retrains_the_interrupted_one(tmp_path):
    root = make_project(tmp_path / "p", project_extra="[trainer.extra]\nfake_seconds = 30\n")
    (root / "dodo.py").write_text("from charbuild.dodo import *  # noqa\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "doit", "run", "train:alc/Lora1x1A1-AdamW8"], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = root / "build/loras/alc/Lora1x1A1-AdamW8/train.log"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and "fake trainer" in log.read_text(encoding="utf-8", errors="replace")):
        time.sleep(0.2)
    assert log.exists(), "the training never started"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, out)  # stopped, as Ctrl-C stops
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out  # as clean as `charbuild build`
    assert "charbuild: stopped; the tasks that finished are recorded" in out, out
    vdir = root / "build/loras/alc/Lora1x1A1-AdamW8"
    assert not (vdir / "raw.safetensors").exists()
    assert not [p for p in vdir.iterdir() if p.name.startswith(".train-")], "temp folder left behind"

    proj = root / "characters/project.toml"
    proj.write_text(proj.read_text(encoding="utf-8").replace("fake_seconds = 30", "fake_seconds = 0"), encoding="utf-8")
    ran = groups(build(root))  # the lock is free again, and finished work was recorded
    # alc's pictures, captions and TOML were finished before the stop: recorded, not redone
    assert not [n for n in ran.get("image", ()) | ran.get("caption", ()) if n.startswith("alice/face/")]
    assert "alc" not in ran.get("dataset", ())
    assert "alc/Lora1x1A1-AdamW8" in ran["train"]
