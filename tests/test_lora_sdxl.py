"""Compress and combine on SDXL files, against sd-scripts' resize_lora.py and sdxl_merge_lora.py.

sd-scripts' rules used here are written down as test data from kohya-ss/sd-scripts at 48d368f
(2026-02-16): ``networks/svd_merge_lora.py`` ``LAYER12/LAYER20`` and ``get_lbw_block_index``
(SDXL branch), used by ``networks/sdxl_merge_lora.py``, whose ``merge_to_sd_model`` adds
``ratio · lbw[block] · (alpha / r) · up @ down`` to each module (``lbw`` starts as 26 ones and
only the list's blocks are set). resize_lora.py has no SDXL-specific code: the same rank rules
on SDXL keys (the reference is test_lora_compress's, applied to SDXL modules).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from lora_fixtures import make_lora, reference_delta, reference_rank, rel_err, write_lora

from charbuild.errors import LoraFileError
from charbuild.lora.cli import combine_cmd
from charbuild.lora.combine import combine_files
from charbuild.lora.compress import compress_file
from charbuild.lora.io import load_lora
from charbuild.lora.keysets import layer_shapes

# real SDXL layers: linear and cross-attention (640, context 2048), 3x3 resnet conv, 1x1 skip,
# downsampler op, te1 (CLIP-L) and te2 (bigG) layers, and the block-less out_2
SDXL_MODULES = [
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640, 0),
    ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 640, 2048, 0),
    ("lora_unet_input_blocks_1_0_in_layers_2", 320, 320, 3),
    ("lora_unet_input_blocks_4_0_skip_connection", 640, 320, 1),
    ("lora_unet_input_blocks_3_0_op", 320, 320, 3),
    ("lora_unet_middle_block_1_transformer_blocks_3_attn1_to_out_0", 1280, 1280, 0),
    ("lora_unet_output_blocks_5_1_proj_out", 640, 640, 0),
    ("lora_unet_output_blocks_8_0_out_layers_3", 320, 320, 3),
    ("lora_te1_text_model_encoder_layers_3_self_attn_v_proj", 768, 768, 0),
    ("lora_te2_text_model_encoder_layers_30_self_attn_q_proj", 1280, 1280, 0),
    ("lora_unet_time_embed_0", 1280, 320, 0),
    ("lora_unet_out_2", 4, 320, 3),
]
RANK = 12


def test_the_modules_are_real_sdxl_layers():
    shapes = layer_shapes("sdxl")
    for stem, o, i, k in SDXL_MODULES:
        assert shapes[stem] == ((o, i) if k == 0 else (o, i, k, k)), stem

# sd-scripts' svd_merge_lora.py: LAYER26 order (MID for M00) and which of it a 12/20 list sets.
LAYER26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]
LAYER12 = {"BASE", "IN04", "IN05", "IN07", "IN08", "MID", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"}
LAYER20 = {"BASE", *(f"IN{i:02d}" for i in range(9)), "MID", *(f"OUT{i:02d}" for i in range(9))}


def sd_scripts_lbw_index(stem: str) -> int:
    """get_lbw_block_index(lora_name, is_sdxl=True)."""
    if "text_model_encoder_" in stem:
        return 0
    name = stem[len("lora_unet_") :]
    if name.startswith(("time_embed_", "label_emb_")):
        return 1
    if name.startswith("input_blocks_"):
        return 1 + int(name.split("_")[2])
    if name.startswith("middle_block_"):
        return 13
    if name.startswith("output_blocks_"):
        return 14 + int(name.split("_")[2])
    if name.startswith("out_"):
        return 23
    return -1


def sd_scripts_lbw_weight(stem: str, values: list[float]) -> float:
    """The factor sdxl_merge_lora.py multiplies a module's scale by for an lbw list."""
    table = LAYER12 if len(values) == 12 else LAYER20
    targets = [i for i, b in enumerate(LAYER26) if b in table]
    weights = [1.0] * 26
    for i, v in zip(targets, values):
        weights[i] = v
    idx = sd_scripts_lbw_index(stem)
    return weights[idx] if idx in targets else 1.0


def svd_in_row_space(m: torch.Tensor, rows: torch.Tensor):
    """The thin SVD of ``m``, whose rows lie in the span of ``rows`` (the LoRA's down factors):
    Householder QR of ``rowsᵀ`` and the SVD of the narrow ``m Q`` (a full SVD of a 1280-wide
    layer takes seconds on a loaded CPU). S is padded with zeros to min(m.shape), as the full
    SVD's would be, for the rank rules' clamp."""
    q, _ = torch.linalg.qr(rows.to(m.dtype).T)
    u, s, wh = torch.linalg.svd(m @ q, full_matrices=False)
    s = torch.cat([s, s.new_zeros(min(m.shape) - len(s))])
    return u, s, wh @ q.T


def _decaying(seed: int, rank: int = RANK):
    tensors, meta = make_lora("sdxl", "lora", modules=SDXL_MODULES, rank=rank, alpha=rank / 2, seed=seed)
    for n, key in enumerate(sorted(k for k in tensors if k.endswith("lora_up.weight"))):
        decay = torch.tensor([(0.4 + 0.05 * n) ** j for j in range(rank)])
        tensors[key] = tensors[key] * decay.reshape(1, -1, *([1] * (tensors[key].dim() - 2)))
    tensors["lora_unet_out_2.lora_up.weight"].zero_()
    meta["modelspec.architecture"] = "stable-diffusion-xl-v1-base/lora"
    return tensors, meta


@pytest.mark.parametrize("method,param", [("sv_ratio", 8.0), ("sv_fro", 0.95), (None, 0.0)])
def test_compress_sdxl_equals_resize_lora(tmp_path, method, param):
    tensors, meta = _decaying(0)
    src = write_lora(tmp_path / "xl.safetensors", tensors, meta)
    options = {"method": method or "rank", "param": param, "new_rank": 8, "new_conv_rank": 6, "save_precision": "float"}
    compress_file(src, tmp_path / "small.safetensors", **options)
    out = load_lora(tmp_path / "small.safetensors")
    assert out.arch == "sdxl" and set(out.modules) == {m[0] for m in SDXL_MODULES}
    for stem, _, _, k in SDXL_MODULES:
        r = tensors[f"{stem}.lora_down.weight"].shape[0]
        up, down = tensors[f"{stem}.lora_up.weight"].float(), tensors[f"{stem}.lora_down.weight"].float()
        u, s, vh = svd_in_row_space(up.reshape(up.shape[0], -1) @ down.reshape(r, -1), down.reshape(r, -1))
        rank = reference_rank(s, method, param, 6 if k else 8)
        alpha = float(tensors[f"{stem}.alpha"]) / r * rank
        got = out.modules[stem]
        assert got.rank == rank and got.alpha == pytest.approx(alpha, rel=1e-6), stem
        if stem != "lora_unet_out_2":
            assert rel_err(got.delta(), (u[:, :rank] * s[:rank]) @ vh[:rank] * (alpha / rank)) < 1e-4, stem
        if k:
            assert got.params["lora_down.weight"].shape[1:] == down.shape[1:], stem
    for key in ("ss_base_model_version", "modelspec.architecture", "ss_output_name", "modelspec.title"):
        assert out.metadata[key] == meta[key], key


@pytest.fixture
def two_xl(tmp_path):
    a_t, a_m = _decaying(1)
    b_t, b_m = _decaying(2, rank=6)
    del b_t["lora_unet_input_blocks_3_0_op.lora_up.weight"], b_t["lora_unet_input_blocks_3_0_op.lora_down.weight"]
    del b_t["lora_unet_input_blocks_3_0_op.alpha"]
    return tmp_path, write_lora(tmp_path / "a.safetensors", a_t, a_m), write_lora(tmp_path / "b.safetensors", b_t, b_m)


def sd_scripts_merge(files_ratios_lbws, stem):
    """What sdxl_merge_lora.py --sd_model adds to module ``stem`` (float64)."""
    total = None
    for path, ratio, lbw in files_ratios_lbws:
        tensors = load_lora(path).tensors
        if f"{stem}.lora_down.weight" not in tensors:
            continue
        w = sd_scripts_lbw_weight(stem, lbw) if lbw else 1.0
        d = ratio * w * reference_delta(tensors, stem)
        total = d if total is None else total + d
    return total


LBW20_A = [0.9, 0.0, 1.3, -0.4, 0.6, 0.5, 1.1, 0.2, 0.75, 1.2, 2.0, 0.3, 0.1, 0.8, 1.4, -1.0, 0.45, 0.55, 0.65, 0.35]
LBW20_B = [1.0, 0.5, 0.0, 0.25, 1.5, 0.7, 0.6, 0.4, 1.0, 0.0, -0.5, 0.9, 1.0, 1.1, 0.2, 0.3, 0.8, 0.9, 1.0, 0.6]


def test_combine_sdxl_with_lbws_equals_sdxl_merge_lora(two_xl):
    """Per-input 20-value block weights, exact route: the sum sdxl_merge_lora.py bakes into a checkpoint."""
    tmp, a, b = two_xl
    report = combine_files([(a, 0.8), (b, -0.6)], tmp / "ab.safetensors",
                           block_weights=[",".join(map(str, LBW20_A)), LBW20_B])  # fmt: skip
    out = load_lora(tmp / "ab.safetensors")
    assert report["arch"] == "sdxl" and out.arch == "sdxl"
    checked = 0
    for stem, *_ in SDXL_MODULES:
        expected = sd_scripts_merge([(a, 0.8, LBW20_A), (b, -0.6, LBW20_B)], stem)
        if stem == "lora_unet_time_embed_0":
            # deviation: sd-scripts gives time_embed the IN00 weight; LBW, and we, leave it at x1
            ours = 0.8 * reference_delta(load_lora(a).tensors, stem) - 0.6 * reference_delta(load_lora(b).tensors, stem)
            assert rel_err(out.modules[stem].delta(), ours) < 1e-5
            continue
        if float(expected.abs().max()) == 0.0:
            assert stem not in out.modules or float(out.modules[stem].delta().abs().max()) == 0.0, stem
            continue
        assert rel_err(out.modules[stem].delta(), expected) < 1e-5, stem
        checked += 1
    assert checked >= 9
    # IN00 at 0 in both inputs' lists drops nothing here (no IN00 module); b's IN01 is 0.5, a's IN01 1.3
    inputs = json.loads(out.metadata["charbuild.combine_inputs"])
    assert inputs[0]["block_weights"]["IN01"] == 1.3 and inputs[1]["block_weights"]["OUT08"] == 0.6
    assert out.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert out.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_combine_sdxl_twelve_values_follow_lbw_not_sd_scripts(two_xl):
    """A 12-value list: the blocks it does not name get 0 (LBW's to26), where sdxl_merge_lora.py keeps 1."""
    tmp, a, _ = two_xl
    lbw12 = [1.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
    combine_files([(a, 1.0)], tmp / "a12.safetensors", block_weights=[lbw12])
    out = load_lora(tmp / "a12.safetensors")
    ta = load_lora(a).tensors
    for stem in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_out_0",
                 "lora_unet_output_blocks_5_1_proj_out", "lora_te2_text_model_encoder_layers_30_self_attn_q_proj"):  # fmt: skip
        expected = sd_scripts_lbw_weight(stem, lbw12) * reference_delta(ta, stem)  # blocks both name: equal
        assert rel_err(out.modules[stem].delta(), expected) < 1e-5, stem
    for stem in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_8_0_out_layers_3"):
        assert stem not in out.modules and sd_scripts_lbw_weight(stem, lbw12) == 1.0  # LBW: 0; sd-scripts: 1
    assert "lora_unet_out_2" in out.modules and "lora_unet_time_embed_0" in out.modules  # block-less: x1


def test_combine_sdxl_to_rank_equals_truncated_svd(two_xl):
    """--rank N: the truncated SVD of the weighted sum (svd_merge_lora.py's route, without its 0.99-quantile clamp)."""
    tmp, a, b = two_xl
    combine_files([(a, 1.0), (b, 0.5)], tmp / "r4.safetensors", rank=4, block_weights=[None, "IN04 IN05::0.5,M00::0"])
    out = load_lora(tmp / "r4.safetensors")
    for stem in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "lora_unet_input_blocks_1_0_in_layers_2",
                 "lora_te1_text_model_encoder_layers_3_self_attn_v_proj", "lora_unet_middle_block_1_transformer_blocks_3_attn1_to_out_0"):  # fmt: skip
        w_b = 0.0 if "middle_block" in stem else 0.5 if "input_blocks_4" in stem else 1.0
        ta, tb = load_lora(a).tensors, load_lora(b).tensors
        full = reference_delta(ta, stem) + 0.5 * w_b * reference_delta(tb, stem)
        downs = torch.cat([t[f"{stem}.lora_down.weight"].double().flatten(1) for t in (ta, tb)])
        u, s, vh = svd_in_row_space(full, downs)
        assert out.modules[stem].rank == 4
        assert rel_err(out.modules[stem].delta(), (u[:, :4] * s[:4]) @ vh[:4]) < 1e-4, stem


def test_combine_block_weight_errors_name_the_input(two_xl):
    tmp, a, b = two_xl
    with pytest.raises(LoraFileError, match=r"b\.safetensors.*block weights: 3 block weights given; sdxl takes 12 or 20"):
        combine_files([(a, 1.0), (b, 1.0)], tmp / "x.safetensors", block_weights=[None, "1,0,1"])
    with pytest.raises(LoraFileError, match="1 block-weight specs for 2 inputs"):
        combine_files([(a, 1.0), (b, 1.0)], tmp / "x.safetensors", block_weights=["ALL"])
    assert not (tmp / "x.safetensors").exists()


def test_cli_combine_weights_per_input(two_xl):
    tmp, a, b = two_xl
    r = CliRunner().invoke(combine_cmd, [f"{a}:0.8", f"{b}:-0.6", str(tmp / "cli.safetensors"), "--no-progress",
                                         "-w", ",".join(map(str, LBW20_A)), "-w", "-"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = load_lora(tmp / "cli.safetensors")
    stem = "lora_unet_output_blocks_5_1_proj_out"
    assert rel_err(out.modules[stem].delta(), sd_scripts_merge([(a, 0.8, LBW20_A), (b, -0.6, None)], stem)) < 1e-5
    r = CliRunner().invoke(combine_cmd, [str(a), str(b), str(tmp / "y.safetensors"), "-w", "ALL"])
    assert r.exit_code == 2 and "once per input" in r.output and not (tmp / "y.safetensors").exists()
