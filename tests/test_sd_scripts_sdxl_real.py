"""charbuild's SDXL command and dataset TOMLs against the real kohya-ss sd-scripts (opt-in, marker ``sdscripts``).

Skipped unless ``CHARBUILD_SD_SCRIPTS`` and ``CHARBUILD_SD_PYTHON`` are set (benchmarks/SD_SCRIPTS.md).
The checks live in benchmarks/compare_sd_scripts_sdxl.py; its heavy ``train`` check is not run here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import load_benchmark

REPO = Path(__file__).resolve().parent.parent




cmp = load_benchmark("compare_sd_scripts_sdxl")
SD, WHY = cmp.sd_env_from_environ()

pytestmark = [pytest.mark.sdscripts, pytest.mark.skipif(SD is None, reason=f"real sd-scripts not configured: {WHY}")]


def test_sdxl_command_parses_in_sdxl_train_network(tmp_path):
    res = cmp.check_command(SD, tmp_path)
    assert res.ok, "\n" + res.render()


def test_sdxl_dataset_tomls_load_in_sd_scripts(tmp_path):
    res = cmp.check_dataset(SD, tmp_path)
    assert res.ok, "\n" + res.render()
