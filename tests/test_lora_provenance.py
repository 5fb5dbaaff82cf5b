"""What merge, compress and combine write about a file's name and history (issue 9 items 1 and 5)."""

from __future__ import annotations

import hashlib
import json

from lora_fixtures import make_lora, write_lora

from charbuild.lora.combine import combine_files
from charbuild.lora.compress import compress_file
from charbuild.lora.io import load_lora
from charbuild.lora.merge import merge_file

MODS = [
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, 768, 0),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 0),
]


def _addnet_hash(path) -> str:
    """sha256 of a safetensors file's data part (what A1111 and sd-scripts call the model hash)."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


def _named(tmp_path, name, seed, **meta):
    tensors, metadata = make_lora("sd15", "lora", modules=MODS, rank=4, seed=seed,
                                  metadata={"ss_output_name": name, "modelspec.title": name, **meta})  # fmt: skip
    return write_lora(tmp_path / f"{name}.safetensors", tensors, metadata)


def test_combine_records_each_input_and_copies_no_ones_history(tmp_path):
    """Only the first input was merged and resized: combine must not say the result was."""
    raw = _named(tmp_path, "krnk-A", 1, ss_tag_frequency='{"krnk": {"1girl": 3}}')
    merged = tmp_path / "krnk-A-merged.safetensors"
    merge_file(raw, merged, "FACE", note="face only")
    first = tmp_path / "krnk-A-small.safetensors"
    compress_file(merged, first, param=8.0, new_rank=2)
    second = _named(tmp_path, "other-B", 2, ss_tag_frequency='{"other": {"1boy": 2}}')
    out = tmp_path / "both.safetensors"
    combine_files([(first, 0.8), (second, -0.5)], out)
    meta = load_lora(out).metadata

    assert "charbuild.merge_weights" not in meta and "charbuild.merge_note" not in meta
    assert "Dynamic resize" not in meta.get("ss_training_comment", "")
    assert "ss_tag_frequency" not in meta  # the two inputs disagree: neither is the truth for the result
    assert meta["ss_base_model_version"] == "sd_v1"  # all inputs agree
    assert meta["ss_output_name"] == meta["modelspec.title"] == "both"  # sdxl_merge_lora.py: the output's stem

    inputs = json.loads(meta["charbuild.combine_inputs"])
    assert [i["file"] for i in inputs] == ["krnk-A-small.safetensors", "other-B.safetensors"]
    assert [i["ratio"] for i in inputs] == [0.8, -0.5]
    assert inputs[0]["sshs_model_hash"] == _addnet_hash(first)
    assert inputs[1]["sshs_model_hash"] == _addnet_hash(second)
    assert inputs[0]["output_name"] == "krnk-A" and inputs[1]["output_name"] == "other-B"
    face = json.loads(load_lora(merged).metadata["charbuild.merge_weights"])
    assert inputs[0]["merge_weights"] == face and inputs[0]["merge_note"] == "face only"
    assert inputs[0]["training_comment"].startswith("Dynamic resize with sv_ratio: 8.0 from 4; ")
    assert "merge_weights" not in inputs[1] and "Dynamic resize" not in inputs[1].get("training_comment", "")
    # the old short record stays as it was
    assert json.loads(meta["charbuild.combine"]) == [["krnk-A-small.safetensors", 0.8], ["other-B.safetensors", -0.5]]


def test_a_combined_input_keeps_its_own_inputs(tmp_path):
    a, b, c = (_named(tmp_path, n, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    ab = tmp_path / "ab.safetensors"
    combine_files([(a, 1.0), (b, 0.5)], ab)
    combine_files([(ab, 1.0), (c, 0.25)], tmp_path / "abc.safetensors", rank=3)
    inputs = json.loads(load_lora(tmp_path / "abc.safetensors").metadata["charbuild.combine_inputs"])
    assert [i["file"] for i in inputs[0]["combine_inputs"]] == ["a.safetensors", "b.safetensors"]
    assert "combine_inputs" not in inputs[1]


def test_merge_and_compress_keep_the_name(tmp_path):
    raw = _named(tmp_path, "krnk-Lora3x3A50p-AdamW8", 1)
    merge_file(raw, tmp_path / "merged.safetensors", "OUTALL")
    compress_file(tmp_path / "merged.safetensors", tmp_path / "small.safetensors", param=8.0, new_rank=2)
    for name in ("merged", "small"):
        meta = load_lora(tmp_path / f"{name}.safetensors").metadata
        assert meta["ss_output_name"] == meta["modelspec.title"] == "krnk-Lora3x3A50p-AdamW8", name


def test_output_name_sets_both_keys(tmp_path):
    """A LoRA trained elsewhere gets the deliverable's name stamped by merge, compress or combine."""
    raw = _named(tmp_path, "trained-elsewhere", 1)
    merge_file(raw, tmp_path / "m.safetensors", "ALL", output_name="krnk-Lora3x3A50p-AdamW8")
    compress_file(raw, tmp_path / "c.safetensors", param=8.0, new_rank=2, output_name="krnk-Lora3x3A50p-AdamW8")
    combine_files([(raw, 1.0)], tmp_path / "x.safetensors", output_name="krnk-Lora3x3A50p-AdamW8")
    for name in ("m", "c", "x"):
        meta = load_lora(tmp_path / f"{name}.safetensors").metadata
        assert meta["ss_output_name"] == meta["modelspec.title"] == "krnk-Lora3x3A50p-AdamW8", name
    untitled = make_lora("sd15", "lora", modules=MODS[:1], rank=2)[0]
    write_lora(tmp_path / "untitled.safetensors", untitled, {})
    compress_file(tmp_path / "untitled.safetensors", tmp_path / "u.safetensors", new_rank=2, output_name="krnk-X")
    meta = load_lora(tmp_path / "u.safetensors").metadata
    assert meta["ss_output_name"] == meta["modelspec.title"] == "krnk-X"
