"""Block names, stem -> block mapping over the full SD1.5/SDXL key sets, weight specs, preset files."""

from __future__ import annotations

from collections import Counter

import pytest

from charbuild.lora.blocks import (
    BUILTIN_PRESETS,
    block_names,
    block_of,
    parse_preset_file,
    resolve_block_weights,
    sdxl_form,
)
from charbuild.lora.keysets import layer_shapes, sd15_modules, sdxl_modules


def test_block_name_lists():
    assert len(block_names("sd15", 26)) == 26 and block_names("sd15", 26)[13] == "M00"
    assert block_names("sd15", 17) == ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [
        f"OUT{i:02d}" for i in range(3, 12)
    ]
    assert block_names("sdxl", 12) == ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT0{i}" for i in range(6)]
    assert block_names("sdxl", 20)[-1] == "OUT08"
    with pytest.raises(ValueError, match="sd15 26, sd15 17, sdxl 20, sdxl 12"):
        block_names("sd15", 20)


@pytest.mark.parametrize(
    "stem,block",
    [
        ("lora_te_text_model_encoder_layers_11_mlp_fc2", "BASE"),
        ("lora_unet_conv_in", "IN00"),
        ("lora_unet_down_blocks_0_resnets_0_conv1", "IN01"),
        ("lora_unet_down_blocks_0_attentions_1_proj_in", "IN02"),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "IN03"),
        ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "IN04"),
        ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k", "IN08"),
        ("lora_unet_down_blocks_2_downsamplers_0_conv", "IN09"),
        ("lora_unet_down_blocks_3_resnets_1_time_emb_proj", "IN11"),
        ("lora_unet_mid_block_attentions_0_proj_out", "M00"),
        ("lora_unet_mid_block_resnets_1_conv2", "M00"),
        ("lora_unet_up_blocks_0_resnets_0_conv1", "OUT00"),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "OUT02"),
        ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", "OUT03"),
        ("lora_unet_up_blocks_2_upsamplers_0_conv", "OUT08"),
        ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0", "OUT11"),
        ("lora_unet_conv_out", None),
        ("lora_unet_time_embedding_linear_1", None),
        ("lora_unet_time_embedding_linear_2", None),
    ],
)
def test_sd15_stem_kinds(stem, block):
    assert block_of(stem, "sd15") == block


def test_full_sd15_key_set_block_counts():
    mods = sd15_modules(conv=True, te=True, extra=True)
    assert len(mods) == 354 and len({m[0] for m in mods}) == 354
    counts = Counter(block_of(stem, "sd15") for stem, *_ in mods)
    # 12 text-encoder layers x 6; each transformer 12 modules; resnets 3 (+1 shortcut); samplers 1
    assert counts["BASE"] == 72
    assert counts["IN00"] == 1 and counts[None] == 3
    assert counts["IN01"] == 3 + 12 and counts["IN04"] == 4 + 12 and counts["IN03"] == 1
    assert counts["IN10"] == counts["IN11"] == 3
    assert counts["M00"] == 3 + 12 + 3
    assert counts["OUT00"] == 4 and counts["OUT02"] == 5 and counts["OUT05"] == 4 + 12 + 1
    assert counts["OUT11"] == 4 + 12
    assert set(counts) - {None} == set(block_names("sd15", 26))
    plain = Counter(block_of(stem, "sd15") for stem, *_ in sd15_modules(conv=False))
    assert set(plain) == set(block_names("sd15", 17))  # the 17 blocks a plain LoRA touches


def test_full_sdxl_key_set_block_counts():
    mods = sdxl_modules(conv=True, te=True, extra=True)
    counts = Counter(block_of(stem, "sdxl") for stem, *_ in mods)
    assert set(counts) - {None} == set(block_names("sdxl", 20))
    assert counts[None] == 5  # out_2, time_embed_0/2, label_emb_0_0/0_2
    assert counts["BASE"] == 6 * (12 + 32)
    assert counts["IN07"] == 4 + 2 + 10 * 10
    plain = Counter(block_of(stem, "sdxl") for stem, *_ in sdxl_modules(conv=False))
    assert set(plain) == set(block_names("sdxl", 12))
    assert layer_shapes("sdxl")["lora_unet_output_blocks_0_0_in_layers_2"] == (1280, 2560, 3, 3)


def test_resolve_presets_lists_and_strings():
    face = resolve_block_weights("FACE")
    assert list(face.values()) == BUILTIN_PRESETS["FACE"] and list(face) == block_names("sd15", 26)
    outd = resolve_block_weights("OUTD")
    assert outd["OUT03"] == 1 and outd["IN00"] == 0 and outd["IN03"] == 0 and outd["BASE"] == 1
    assert resolve_block_weights("face") == face
    assert resolve_block_weights(",".join(["0.5"] * 17))["IN03"] == 0.0
    assert resolve_block_weights([1.0] * 12, "sdxl")["IN00"] == 0.0
    assert resolve_block_weights("FACE", "sdxl") == resolve_block_weights(sdxl_form(resolve_block_weights("FACE")), "sdxl")
    assert resolve_block_weights("MINE", presets={"MINE": [2.0] * 26})["OUT11"] == 2.0
    assert resolve_block_weights("FACE", presets={"FACE": [0.0] * 26})["IN01"] == 0.0


def test_presets_written_as_strings_or_tables():
    """A user preset as LBW users copy it ("0,1,1,…"), in named form or as a table: never read char by char."""
    face = ",".join(str(int(v)) for v in BUILTIN_PRESETS["FACE"])
    assert resolve_block_weights("MYFACE", presets={"MYFACE": face}) == resolve_block_weights("FACE")
    assert resolve_block_weights("XL", "sdxl", {"XL": "IN07 IN08::1,OUT00-OUT02::0.5"})["OUT01"] == 0.5
    assert resolve_block_weights("T", "sdxl", {"T": {"M00": 0}})["M00"] == 0.0
    assert resolve_block_weights("ALIAS", "sdxl", {"ALIAS": "HALF", "HALF": ",".join(["0.5"] * 12)})["IN05"] == 0.5
    with pytest.raises(ValueError, match="preset MYFACE: 3 block weights given"):
        resolve_block_weights("MYFACE", presets={"MYFACE": "1,0,1"})
    with pytest.raises(ValueError, match="preset LOOP: .*unknown block-weight preset 'LOOP'"):
        resolve_block_weights("LOOP", presets={"LOOP": "LOOP"})


def test_resolve_dict_defaults_to_one():
    w = resolve_block_weights({"MID": 0.25, "out03": -1})
    assert w["M00"] == 0.25 and w["OUT03"] == -1.0 and w["IN05"] == 1.0 and len(w) == 26


@pytest.mark.parametrize(
    "spec,arch,message",
    [
        ("FCAE", "sd15", "Did you mean FACE"),
        ("nothing_like_it", "sd15", "Presets: ALL, ALL0.5, BODY"),
        ([1.0] * 5, "sd15", "5 block weights given; sd15 takes 17 or 26"),
        ([1.0] * 26 + [1.0], "sdxl", "27 block weights given; sdxl takes 12 or 20"),
        ({"IN12": 1}, "sd15", "unknown block name.*IN12"),
        ("1,x,1", "sd15", "'x' is not a number"),
        ("1", "xl", "unknown arch"),
    ],
)
def test_resolve_errors(spec, arch, message):
    with pytest.raises(ValueError, match=message):
        resolve_block_weights(spec, arch)


def test_parse_preset_file():
    text = "# comment line\nA:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1\n\nB:0.5, 0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5\nC:1#,2\n"
    presets = parse_preset_file(text)
    assert presets == {"A": [1.0] + [0.0] * 15 + [1.0], "B": [0.5] * 12}


@pytest.mark.parametrize(
    "text,message",
    [
        ("OK:" + ",".join(["1"] * 17) + "\nRAND:1,R,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0", "f.txt:2: preset RAND uses R"),
        ("P:" + ",".join(["U"] * 17), "f.txt:1: preset P uses U"),
        ("P:" + ",".join(["X"] * 17), "uses X"),
        ("P:1,2,3", "f.txt:1: preset P has 3 values"),
        ("just text", "f.txt:1: expected NAME:v1"),
        ("P:1,a" + ",1" * 15, "values must be numbers"),
    ],
)
def test_parse_preset_file_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_preset_file(text, "f.txt")


def test_an_sd15_list_on_sdxl_is_applied_as_lbw_does_and_says_so():
    """LBW's ALL (17 ones) leaves IN00, IN03, IN06 and OUT00-OUT02 of an SDXL LoRA at 0."""
    from charbuild.lora.blocks import SdxlListWarning

    with pytest.warns(SdxlListWarning, match=r"IN00, IN03, IN06, OUT00-OUT02 get 0.*give 20 values"):
        w = resolve_block_weights("ALL", "sdxl")
    assert [b for b, v in w.items() if v == 0.0] == ["IN00", "IN03", "IN06", "OUT00", "OUT01", "OUT02"]
    with pytest.warns(SdxlListWarning, match="values for IN09-IN11, OUT09-OUT11 reach no SDXL block"):
        w = resolve_block_weights([float(i) for i in range(1, 27)], "sdxl")
    assert w["IN08"] == 10.0 and w["M00"] == 14.0 and w["OUT00"] == 15.0 and w["OUT08"] == 23.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(resolve_block_weights("NONE", "sdxl").values()) == {0.0}  # nothing to warn about
        resolve_block_weights([1.0] * 20, "sdxl")
