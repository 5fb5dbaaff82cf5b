"""Block-weight merge: equals an independent per-block computation of the full deltas."""

from __future__ import annotations

import json

import pytest
import torch
from lora_fixtures import KINDS, make_lora, reference_delta, rel_err, representative_modules, write_lora

from charbuild.errors import LoraFileError
from charbuild.lora.blocks import block_of, resolve_block_weights
from charbuild.lora.io import build_lora, load_lora
from charbuild.lora.merge import merge_file, merge_lora

FRACTIONAL = "0,0.5,0.5,0.5,0,0,0,0,0,1,0,0,0,0.5,0,0,0.5,1,1,0.5,0.5,0.5,0.5,0,0,0.5"
# BASE, IN01, … with negative and fractional values, OUT03 = 0
MIXED = [0.7] + [-0.5] * 12 + [0.25] + [0.0] * 4 + [1.5] * 8


CASES = [(kind, MIXED) for kind in KINDS] + [("lora", FRACTIONAL), ("lora", "FACE")]


@pytest.mark.parametrize("kind,spec", CASES, ids=[f"{k}-{'FACE' if s == 'FACE' else len(s)}" for k, s in CASES])
def test_merge_equals_per_block_reference(kind, spec):
    # block mapping does not depend on the format: the other formats run on the smaller layers
    modules = None if (kind, spec) == ("lora", MIXED) else representative_modules("sd15", max_numel=400_000)
    tensors, meta = make_lora("sd15", kind, rank=3, modules=modules)
    weights = resolve_block_weights(spec)
    merged = merge_lora(build_lora(tensors, meta), weights)
    stems = {k.split(".", 1)[0] for k in tensors}
    kept = {k.split(".", 1)[0] for k in merged.tensors}
    for stem in sorted(stems):
        block = block_of(stem, "sd15")
        w = 1.0 if block is None else weights[block]
        if w == 0.0:
            assert stem not in kept and stem not in merged.modules
            continue
        expected = reference_delta(tensors, stem) * w
        assert rel_err(reference_delta(merged.tensors, stem), expected) < 1e-6, stem
        # only the LBW factor changes; down factors, alpha and rank stay
        for key in tensors:
            if key.split(".", 1)[0] == stem and not key.endswith(("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")):
                assert merged.tensors[key] is tensors[key]
    blockless = [s for s in stems if block_of(s, "sd15") is None]
    assert blockless and all(s in kept for s in blockless)
    assert json.loads(merged.metadata["charbuild.merge_weights"]) == weights
    assert merged.metadata["ss_network_module"] == meta["ss_network_module"]


def test_merge_is_pure_and_keeps_dtype():
    tensors, meta = make_lora("sd15", "lora", rank=2, dtype=torch.float16)
    before = {k: v.clone() for k, v in tensors.items()}
    lora = build_lora(tensors, meta)
    merged = merge_lora(lora, resolve_block_weights(MIXED))
    assert all(torch.equal(tensors[k], before[k]) for k in tensors)
    assert {v.dtype for v in merged.tensors.values()} == {torch.float16}


def test_merge_sdxl_by_block():
    tensors, meta = make_lora("sdxl", "lora", rank=2)
    weights = resolve_block_weights([0.0] + [0.5] * 9 + [2.0] + [-1.0] * 9, "sdxl")
    merged = merge_lora(build_lora(tensors, meta), weights)
    for stem in {k.split(".", 1)[0] for k in merged.tensors}:
        block = block_of(stem, "sdxl")
        w = 1.0 if block is None else weights[block]
        assert rel_err(reference_delta(merged.tensors, stem), reference_delta(tensors, stem) * w) < 1e-6
    assert not any(k.startswith("lora_te") for k in merged.tensors)


def test_merge_file_face_on_an_sdxl_file_is_faces_sdxl_form(tmp_path):
    """`charbuild merge IN OUT --weights FACE` on an SDXL file: the SDXL form of FACE, as in an
    SDXL project (not "preset FACE has 26 values")."""
    from charbuild.block_weights import arch_presets

    tensors, meta = make_lora("sdxl", "lora", rank=2)
    src = write_lora(tmp_path / "xl.safetensors", tensors, meta)
    merge_file(src, tmp_path / "m.safetensors", "FACE")
    expected = merge_lora(build_lora(tensors, meta), resolve_block_weights(arch_presets("sdxl")["FACE"], "sdxl"))
    out = load_lora(tmp_path / "m.safetensors")
    assert set(out.tensors) == set(expected.tensors)
    assert all(torch.equal(out.tensors[k], expected.tensors[k]) for k in expected.tensors)


def test_merge_file_records_keywords_and_note(tmp_path):
    tensors, meta = make_lora("sd15", "loha", rank=2, modules=representative_modules("sd15", max_numel=400_000))
    src = write_lora(tmp_path / "raw.safetensors", tensors, meta)
    report = merge_file(src, tmp_path / "m.safetensors", "FACE", keywords=["krnk", "red eyes"], note="face build")
    out = load_lora(tmp_path / "m.safetensors")
    assert out.metadata["modelspec.trigger_phrase"] == "krnk, red eyes"
    assert out.metadata["charbuild.merge_note"] == "face build"
    assert out.metadata["ss_training_comment"] == "synthetic" and out.metadata["sshs_model_hash"] == report["sshs_model_hash"]
    assert report["modules_out"] == len(out.modules) and report["modules_dropped"] > 0
    assert "lora_unet_conv_out" in report["blockless"]


def test_merge_errors_write_nothing(tmp_path):
    tensors, meta = make_lora("sd15", "lora", rank=2)
    src = write_lora(tmp_path / "raw.safetensors", tensors, meta)
    dst = tmp_path / "m.safetensors"
    with pytest.raises(LoraFileError, match="raw.safetensors.*Did you mean FACE"):
        merge_file(src, dst, "FAC")
    with pytest.raises(LoraFileError, match="every module has block weight 0"):
        merge_file(
            write_lora(tmp_path / "te.safetensors", {k: v for k, v in tensors.items() if k.startswith("lora_te")}, meta),
            dst,
            "NONE",
        )
    assert not dst.exists()
    with pytest.raises(ValueError, match="unknown block"):
        merge_lora(build_lora(tensors, meta), {"IN99": 1.0})
