"""charbuild's outputs against the real kohya-ss sd-scripts (opt-in, marker ``sdscripts``).

Skipped unless ``CHARBUILD_SD_SCRIPTS`` points at an sd-scripts checkout and
``CHARBUILD_SD_PYTHON`` at a python that has its dependencies (see benchmarks/SD_SCRIPTS.md);
CI has neither. The checks live in benchmarks/compare_sd_scripts.py and are shared with it:

    CHARBUILD_SD_SCRIPTS=/tmp/sd-scripts CHARBUILD_SD_PYTHON=/tmp/sdenv/bin/python \\
        python -m pytest -m sdscripts tests/test_sd_scripts_real.py -v

``CHARBUILD_SD_REAL_WEIGHTS=1`` also loads into a random-weight SD1.5 (4 GB, about a minute)
instead of one on the meta device. The resize_lora.py comparisons take 1-2 minutes each.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import load_benchmark

REPO = Path(__file__).resolve().parent.parent




cmp = load_benchmark("compare_sd_scripts")
SD, WHY = cmp.sd_env_from_environ()

pytestmark = [
    pytest.mark.sdscripts,
    pytest.mark.skipif(SD is None, reason=f"real sd-scripts not configured: {WHY}"),
]


def _assert_ok(res):
    assert res.ok, "\n" + res.render()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sdscripts")


def test_dataset_tomls_load_in_sd_scripts(work):
    """Every dataset TOML of the example project: config_util reads it, counts images, reads our captions."""
    res = cmp.check_dataset(SD, work / "a")
    _assert_ok(res)
    assert len(res.data["results"]) >= 1


@pytest.mark.parametrize("case", list(cmp.COMPRESS_CASES))
def test_compress_matches_resize_lora(work, case):
    """Same keys, ranks, alphas, deltas and ss_* metadata as networks/resize_lora.py; valid sshs hashes."""
    res = cmp.check_compress(SD, work / f"b-{case}", [case])
    _assert_ok(res)


def test_compressed_lora_loads_in_sd_scripts(work):
    """A compress_file output loads strictly into sd-scripts' SD1.5 LoRANetwork; module outputs as the formula."""
    from charbuild.lora.compress import compress_file

    d = work / "c"
    src = cmp.make_random_lora(d / "random_lora.safetensors")
    files = []
    for name, (_, kwargs) in cmp.COMPRESS_CASES.items():
        dst = d / f"charbuild_{name}.safetensors"
        compress_file(src, dst, save_precision="fp16", **kwargs)
        files.append(dst)
    real = os.environ.get("CHARBUILD_SD_REAL_WEIGHTS") == "1"
    res = cmp.check_loading(SD, d, files, real_weights=real)
    _assert_ok(res)


def test_builtin_trained_lora_loads_in_sd_scripts(work):
    """A LoRA from the builtin trainer (and its merged/compressed files): SD1.5 names in sd-scripts,
    and a strict load plus real forward in the tiny model it was trained on."""
    d = work / "t"
    raw = cmp.train_builtin_lora(d)
    if raw is None:
        log = (d / "trainproj.log").read_text(encoding="utf-8") if (d / "trainproj.log").exists() else ""
        pytest.fail("the builtin trainer wrote no raw.safetensors:\n" + log[-3000:])
    files = [raw] + sorted(p for p in raw.parent.glob("*.safetensors") if p != raw)
    models = sorted((d / "trainproj" / "build" / "models").glob("tiny-*"))
    assert models, "no tiny model folder under build/models"
    res = cmp.check_loading(SD, d, [], tiny_files=files, tiny_model=models[0])
    _assert_ok(res)
