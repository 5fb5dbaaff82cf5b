"""Locon/Loha variants trained by the real sd-scripts + LyCORIS through charbuild (opt-in, marker ``sdscripts``).

Skipped unless ``CHARBUILD_SD_SCRIPTS`` and ``CHARBUILD_SD_PYTHON`` are set (benchmarks/SD_SCRIPTS.md)
and ``lycoris-lora`` is installed in that python. One step each of ``LohaA1-AdamW8`` and
``LoconA1-AdamW8`` with ``charbuild build train`` on a random SD1.5 checkpoint (fp32 on a CPU:
about 4 minutes and 7 GB on 2 cores); both must train kohya's modules, the builtin trainer's.
The check lives in benchmarks/compare_sd_scripts_lycoris.py:

    CHARBUILD_SD_SCRIPTS=/tmp/sd-scripts CHARBUILD_SD_PYTHON=/tmp/sdenv/bin/python \\
        python -m pytest -m sdscripts tests/test_sd_scripts_lycoris_real.py -v
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import load_benchmark

REPO = Path(__file__).resolve().parent.parent




cmp = load_benchmark("compare_sd_scripts_lycoris")
SD, WHY = cmp.sd_env_from_environ()
if SD is not None:
    _probe = subprocess.run([str(SD.python), "-c", "import lycoris.kohya"], capture_output=True, text=True, env=SD.env())
    if _probe.returncode != 0:
        SD, WHY = None, f"lycoris-lora is not importable in {SD.python} (pip install lycoris-lora there)"

pytestmark = [pytest.mark.sdscripts, pytest.mark.skipif(SD is None, reason=f"real sd-scripts + LyCORIS not configured: {WHY}")]


def test_locon_and_loha_train_kohyas_modules_in_sd_scripts(tmp_path):
    """lycoris-lora 4.x's default preset stopped with "duplicated lora name:
    lora_unet_time_embedding_linear_1"; older ones adapted conv_in/conv_out/time_embedding too."""
    res = cmp.check_train(SD, tmp_path)
    assert res.ok, "\n" + res.render()
