"""combine (exact and SVD), inspect, and the click commands via CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import run_cli
from lora_fixtures import make_lora, reference_delta, rel_err, write_lora

from charbuild.errors import LoraFileError
from charbuild.lora.cli import COMMANDS, combine_cmd, compress_cmd, inspect_cmd, merge_cmd
from charbuild.lora.combine import combine_files
from charbuild.lora.io import load_lora

MODS = [
    ("lora_unet_conv_in", 320, 4, 3),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768, 0),
    ("lora_unet_conv_out", 4, 320, 3),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 0),
]


@pytest.fixture
def files(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", *make_lora("sd15", "lora", modules=MODS, rank=4, alpha=2.0, seed=1))
    b_t, b_m = make_lora("sd15", "locon_tucker", modules=MODS[:3], rank=3, alpha=3.0, seed=2)
    b = write_lora(tmp_path / "b.safetensors", b_t, b_m)
    c = write_lora(tmp_path / "c.safetensors", *make_lora("sd15", "loha", modules=MODS[1:3], rank=2, seed=3))
    return tmp_path, a, b, c


def sum_08a_05b(a, b, stem):
    """0.8·ΔA − 0.5·ΔB of a module (B has only the first three modules), independently."""
    expected = 0.8 * reference_delta(load_lora(a).tensors, stem)
    if stem in {m[0] for m in MODS[:3]}:
        expected = expected - 0.5 * reference_delta(load_lora(b).tensors, stem)
    return expected


def test_combine_exact_equals_sum_of_deltas(files):
    tmp, a, b, _ = files
    report = combine_files([(a, 0.8), (b, -0.5)], tmp / "ab.safetensors")
    out = load_lora(tmp / "ab.safetensors")
    for stem, *_ in MODS:
        assert out.modules[stem].rank == (7 if stem in {m[0] for m in MODS[:3]} else 4)
        assert rel_err(out.modules[stem].delta(), sum_08a_05b(a, b, stem)) < 1e-5, stem
    assert report["mode"] == "exact" and report["ranks"] == [4, 7]
    assert json.loads(out.metadata["charbuild.combine"]) == [["a.safetensors", 0.8], ["b.safetensors", -0.5]]
    assert out.metadata["modelspec.merged_from"] == "a.safetensors, b.safetensors"


def test_combine_svd_to_rank(files):
    tmp, a, _, c = files
    combine_files([(a, 1.0), (c, 0.5)], tmp / "ac.safetensors", rank=3)
    out = load_lora(tmp / "ac.safetensors")
    ta, tc = load_lora(a).tensors, load_lora(c).tensors
    stem = MODS[1][0]
    full = reference_delta(ta, stem) + 0.5 * reference_delta(tc, stem)
    u, s, vh = torch.linalg.svd(full)
    assert out.modules[stem].rank == 3
    assert rel_err(out.modules[stem].delta(), (u[:, :3] * s[:3]) @ vh[:3]) < 1e-4
    assert out.modules[stem].params["lora_down.weight"].shape == (3, 320, 1, 1)


def test_combine_svd_to_rank_from_factors_equals_the_full_svd(files):
    """LoRA/LoCon inputs take the factor route; each module equals the truncated SVD of the sum."""
    tmp, a, b, _ = files
    report = combine_files([(a, 0.8), (b, -0.5)], tmp / "ab5.safetensors", rank=5, workers=2)
    out = load_lora(tmp / "ab5.safetensors")
    for stem, *_ in MODS:
        full = sum_08a_05b(a, b, stem)
        flat = full.reshape(full.shape[0], -1)
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        k = min(5, len(s))
        best = ((u[:, :k] * s[:k]) @ vh[:k]).reshape(full.shape)
        assert out.modules[stem].rank == 5, stem  # padded with zero directions where the layer is narrower
        assert rel_err(out.modules[stem].delta(), best) < 1e-4, stem
    assert report["mode"] == "svd rank 5" and report["ranks"] == [5]


def test_combine_errors_write_nothing(files, tmp_path):
    tmp, a, _, c = files
    xl = write_lora(tmp / "xl.safetensors", *make_lora("sdxl", "lora", modules=[("lora_unet_input_blocks_4_1_proj_in", 640, 640, 0)]))
    with pytest.raises(LoraFileError, match="cannot combine a sdxl LoRA with a sd15"):
        combine_files([(a, 1.0), (xl, 1.0)], tmp / "x.safetensors")
    with pytest.raises(LoraFileError, match="c.safetensors.*--rank N"):
        combine_files([(a, 1.0), (c, 1.0)], tmp / "x.safetensors")
    assert not (tmp / "x.safetensors").exists()


def test_command_names():
    assert [c.name for c in COMMANDS] == ["inspect", "merge", "compress", "combine"]


def test_cli_inspect(files):
    _, a, _, _ = files
    result = CliRunner().invoke(inspect_cmd, [str(a)])
    assert result.exit_code == 0, result.output
    assert "format lora, arch sd15, 5 modules" in result.output
    assert "lora_unet_conv_out" in result.output and "always ×1" in result.output
    info = json.loads(CliRunner().invoke(inspect_cmd, [str(a), "--json"]).output)
    assert info["blocks"]["IN00"]["modules"] == 1 and info["blocks"]["BASE"]["ranks"] == [4]
    assert info["blockless"][0]["stem"] == "lora_unet_conv_out" and info["alphas"] == {"2": 5}


def test_cli_merge_with_preset_file_and_list(files):
    tmp, a, _, _ = files
    presets = tmp / "lbw.txt"
    presets.write_text("# mine\nHALF:" + ",".join(["0.5"] * 26) + "\n", encoding="utf-8")
    r = CliRunner().invoke(merge_cmd, [str(a), str(tmp / "m1.safetensors"), "--weights", f"{presets}:HALF", "--keyword", "krnk"])
    assert r.exit_code == 0, r.output
    m1 = load_lora(tmp / "m1.safetensors")
    stem = MODS[1][0]
    assert rel_err(m1.modules[stem].delta(), 0.5 * load_lora(a).modules[stem].delta()) < 1e-6
    assert m1.metadata["modelspec.trigger_phrase"] == "krnk"
    r = CliRunner().invoke(merge_cmd, [str(a), str(tmp / "m2.safetensors"), "-w", "HALF", "--preset-file", str(presets)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(merge_cmd, [str(a), str(tmp / "m3.safetensors"), "-w", "0," + ",".join(["1"] * 16)])
    assert r.exit_code == 0 and "modules kept" in r.output
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" not in load_lora(tmp / "m3.safetensors").modules


@pytest.mark.parametrize(
    "args,message,status",
    [
        (["-w", "FAEC"], "Did you mean FACE", 1),
        (["-w", "1,2,3"], "3 block weights given", 1),
        (["-w", "nofile.txt:X"], "no such preset file", 2),  # an option's value: OptionError
    ],
)
def test_cli_merge_errors(files, args, message, status, capsys):
    tmp, a, _, _ = files
    code, _, err = run_cli(capsys, "merge", str(a), str(tmp / "bad.safetensors"), *args)
    assert code == status and message in err and "Traceback" not in err  # charbuild's own handler, as every command's
    assert not (tmp / "bad.safetensors").exists()


def test_cli_compress_and_combine(files, capsys):
    tmp, a, b, _ = files
    r = CliRunner().invoke(compress_cmd, [str(a), str(tmp / "c.safetensors"), "--sv-ratio", "8", "--new-rank", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert load_lora(tmp / "c.safetensors").metadata["ss_training_comment"].startswith("Dynamic resize with sv_ratio: 8.0 from 4;")
    r = CliRunner().invoke(compress_cmd, [str(a), str(tmp / "d.safetensors"), "--method", "rank", "--new-rank", "2", "--save-precision", "bf16", "--verbose"])
    assert r.exit_code == 0 and "sum(S) retained" in r.output
    r = CliRunner().invoke(compress_cmd, [str(a), str(tmp / "e.safetensors"), "--sv-ratio", "8", "--new-rank", "2", "--threads", "3"])
    assert r.exit_code == 0, r.output
    assert load_lora(tmp / "e.safetensors").tensors.keys() == load_lora(tmp / "c.safetensors").tensors.keys()
    r = CliRunner().invoke(compress_cmd, [str(a), str(tmp / "f.safetensors"), "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in r.output and not (tmp / "f.safetensors").exists()
    r = CliRunner().invoke(combine_cmd, [f"{a}:0.8", str(b), str(tmp / "ab.safetensors")])
    assert r.exit_code == 0 and "exact" in r.output, r.output
    code, _, err = run_cli(capsys, "combine", f"{a}:0.8", str(tmp / "missing.safetensors"), str(tmp / "x.safetensors"))
    assert code == 1 and "missing.safetensors: error: no such LoRA file" in err and not (tmp / "x.safetensors").exists()
    code, _, err = run_cli(capsys, "inspect", str(tmp / "nothing.safetensors"))
    assert code == 1 and err.strip().endswith("nothing.safetensors: error: no such LoRA file") and "Error:" not in err


def test_merge_of_an_sdxl_file_with_lbws_all_warns_and_zeroes_what_lbw_zeroes(tmp_path):
    """`--weights ALL` on an SDXL file gives LBW's output (IN00, IN03, IN06, OUT00-OUT02 at 0) and says so."""
    stems = [("lora_unet_input_blocks_4_1_proj_in", 640, 640, 0), ("lora_unet_output_blocks_1_1_proj_in", 1280, 1280, 0)]
    xl = write_lora(tmp_path / "xl.safetensors", *make_lora("sdxl", "lora", modules=stems))
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(merge_cmd, [str(xl), str(out), "--weights", "ALL"])
    assert result.exit_code == 0, result.output
    assert "charbuild: warning: a 17-value SD1.5 list on an SDXL LoRA" in result.stderr
    assert "IN00, IN03, IN06, OUT00-OUT02 get 0" in result.stderr and "Traceback" not in result.output
    merged = load_lora(out)
    assert "lora_unet_input_blocks_4_1_proj_in" in merged.modules
    assert "lora_unet_output_blocks_1_1_proj_in" not in merged.modules  # OUT01 at 0: dropped, as LBW gives it 0
