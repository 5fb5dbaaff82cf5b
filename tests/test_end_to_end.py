"""End to end: the example project, trained by the built-in trainer on the tiny model.

A reduced configuration (two ladder sizes, two steps per LoRA) so that CI builds every
target — compressed LoRAs included — in a few minutes on a CPU. The full example builds
the same graph with the committed settings (`doit` in the repo root).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

LORAS = ["krnk", "krnksf", "tyank", "tyankps", "krnksf_tyankps"]
VARIANT = "Lora3x3A50p-AdamW8"


def test_example_project_builds_every_target(example_copy):
    root = example_copy
    for toml in (root / "characters").rglob("*.toml"):
        text = toml.read_text(encoding="utf-8")
        text = re.sub(r"(?m)^steps = \d+", "steps = 2", text)
        text = text.replace("sizes = [128, 192, 256, 384, 512, 768]", "sizes = [128, 256]")
        toml.write_text(text, encoding="utf-8")
    (root / "dodo.py").write_text("from charbuild.dodo import *  # noqa\n", encoding="utf-8")

    proc = subprocess.run([sys.executable, "-m", "doit"], cwd=root, capture_output=True, text=True,
                          encoding="utf-8", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    for lora in LORAS:
        final = root / f"build/loras/{lora}/{VARIANT}/{lora}-{VARIANT}.safetensors"
        assert final.exists(), final
        assert (root / f"build/loras/{lora}/preview.png").exists()
        info = subprocess.run([sys.executable, "-m", "charbuild.cli", "inspect", "--json", str(final)],
                              capture_output=True, text=True, encoding="utf-8", timeout=120)
        assert info.returncode == 0, info.stderr
        data = json.loads(info.stdout)
        assert data["format"] == "lora" and data["arch"] == "sd15"
    info = json.loads(subprocess.run(
        [sys.executable, "-m", "charbuild.cli", "inspect", "--json",
         str(root / f"build/loras/krnksf_tyankps/{VARIANT}/krnksf_tyankps-{VARIANT}.safetensors")],
        capture_output=True, text=True, encoding="utf-8", timeout=120).stdout)
    assert "krnksf" in json.dumps(info) and "tyank" in json.dumps(info)

    again = subprocess.run([sys.executable, "-m", "doit"], cwd=root, capture_output=True, text=True,
                           encoding="utf-8", timeout=600)
    assert again.returncode == 0
    assert [l for l in again.stdout.splitlines() if l.startswith(".  ")] == []
