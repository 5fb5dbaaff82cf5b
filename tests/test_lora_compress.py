"""Rank reduction: equals a full-SVD reference of resize_lora.py's algorithm (same ranks, same deltas)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from lora_fixtures import make_lora, reference_delta, reference_rank, rel_err, write_lora

from charbuild.errors import OptionError
from charbuild.lora.compress import compress_file, compress_lora, report_json
from charbuild.lora.svd import choose_rank
from charbuild.lora.io import build_lora, load_lora, sd_scripts_hashes

# real SD1.5 layers: linear, cross-attention, 1x1, 3x3 (incl. a wide up-block conv), text encoder
MODULES = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320, 0),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768, 0),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1),
    ("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, 3),
    ("lora_unet_up_blocks_3_resnets_0_conv1", 320, 960, 3),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 0),
    ("lora_unet_conv_out", 4, 320, 3),
]
RANK = 24


def decaying_lora(dtype=torch.float32, seed=0, alpha=12.0):
    """Factors with geometrically decaying singular values, so the rank rules give varied ranks."""
    tensors, meta = make_lora("sd15", "lora", modules=MODULES, rank=RANK, alpha=alpha, dtype=torch.float32, seed=seed)
    for n, key in enumerate(sorted(k for k in tensors if k.endswith("lora_up.weight"))):
        decay = torch.tensor([(0.45 + 0.09 * n) ** j for j in range(RANK)])
        t = tensors[key]
        if True:
            tensors[key] = t * decay.reshape(1, -1, *([1] * (t.dim() - 2)))
    tensors["lora_unet_conv_out.lora_up.weight"] = torch.zeros_like(tensors["lora_unet_conv_out.lora_up.weight"])
    return {k: v.to(dtype) for k, v in tensors.items()}, meta


@functools.lru_cache(maxsize=None)
def _reference_svd(stem):
    tensors, _ = decaying_lora()
    up, down = tensors[f"{stem}.lora_up.weight"].float(), tensors[f"{stem}.lora_down.weight"].float()
    m = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return torch.linalg.svd(m, full_matrices=False)  # resize_lora.py: full_matrices=True; same S and leading vectors


def reference_resize(tensors, stem, method, param, cap):
    """Full SVD of up @ down (fp32), as resize_lora.py: returns (rank, alpha, ΔW)."""
    r = tensors[f"{stem}.lora_down.weight"].shape[0]
    u, s, vh = _reference_svd(stem)
    k = reference_rank(s, method, param, cap)
    alpha = float(tensors[f"{stem}.alpha"]) / r * k
    return k, alpha, (u[:, :k] * s[:k]) @ vh[:k] * (alpha / k)


@pytest.mark.parametrize(
    "method,param", [("sv_ratio", 16.0), ("sv_ratio", 4.0), ("sv_fro", 0.9), ("sv_cumulative", 0.7), (None, 0.0)]
)
def test_compress_matches_full_svd_reference(method, param):
    tensors, meta = decaying_lora()
    out, report = compress_lora(
        build_lora(tensors, meta), method=method, param=param, new_rank=16, new_conv_rank=10, save_precision="float"
    )
    ranks = set()
    for stem, _, _, k in MODULES:
        cap = 10 if k else 16
        ref_rank, ref_alpha, ref_delta = reference_resize(tensors, stem, method, param, cap)
        got = out.modules[stem]
        assert got.rank == ref_rank == report["modules"][stem]["new_rank"], stem
        assert got.alpha == pytest.approx(ref_alpha, rel=1e-6)
        ranks.add(got.rank)
        if stem == "lora_unet_conv_out":
            assert got.rank == 1 and float(got.delta().abs().max()) == 0.0
            continue
        assert rel_err(got.delta(), ref_delta) <= 1e-4, stem
        assert got.params["lora_up.weight"].dim() == tensors[f"{stem}.lora_up.weight"].dim()
        if k == 3:
            assert got.params["lora_down.weight"].shape[1:] == tensors[f"{stem}.lora_down.weight"].shape[1:]
    if method is not None:
        assert len(ranks) > 2  # the rules actually chose different ranks
    assert out.format == "lora" and out.arch == "sd15"


def test_rank_rules_edge_cases():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, 0.0])
    assert choose_rank(s, "sv_ratio", 3.0, 128) == 3  # 2 values > 4/3, +1
    assert choose_rank(s, "sv_ratio", 3.0, 128, rank_rule="current") == 2
    assert choose_rank(s, "sv_ratio", 1000.0, 128) == 5  # clamped to len - 1, then +1
    assert choose_rank(s, "sv_ratio", 1000.0, 3) == 3  # cap
    assert choose_rank(torch.zeros(5), "sv_fro", 0.9, 128) == 1  # S[0] <= 1e-6
    assert choose_rank(s, None, 0.0, 7) == 7
    assert choose_rank(s, "sv_cumulative", 0.5, 128) == 2 and choose_rank(s, "sv_cumulative", 0.5, 128, "current") == 1


def test_metadata_and_precision(tmp_path):
    tensors, meta = decaying_lora(dtype=torch.float16)
    src = write_lora(tmp_path / "raw.safetensors", tensors, meta)
    report = compress_file(src, tmp_path / "c.safetensors", param=16.0, new_rank=128)
    out = load_lora(tmp_path / "c.safetensors")
    assert out.metadata["ss_training_comment"] == "Dynamic resize with sv_ratio: 16.0 from 24; synthetic"
    assert out.metadata["ss_network_dim"] == out.metadata["ss_network_alpha"] == "Dynamic"
    assert (out.metadata["sshs_model_hash"], out.metadata["sshs_legacy_hash"]) == sd_scripts_hashes(out.tensors, out.metadata)
    assert {t.dtype for t in out.tensors.values()} == {torch.float16}
    assert report["size_out"] < report["size_in"]
    assert 0 < report["mean_fro_retained"] <= 1 and report["mean_retained"] == pytest.approx(
        (report["mean_fro_retained"] + report["mean_sum_retained"]) / 2
    )
    compress_file(src, tmp_path / "f.safetensors", method="rank", new_rank=8, new_conv_rank=4, save_precision="bf16")
    fixed = load_lora(tmp_path / "f.safetensors")
    assert fixed.metadata["ss_training_comment"] == "dimension is resized from 24 to 8 (conv: 4); synthetic"
    assert fixed.metadata["ss_network_dim"] == "8"
    # alpha of the last module in key order: the text encoder (linear, rank 8, alpha 12/24*8)
    assert fixed.metadata["ss_network_alpha"] == "2.0"  # last module in key order: up_blocks_3 conv, 12/24*4
    assert {t.dtype for t in fixed.tensors.values()} == {torch.bfloat16}


def test_verbose_prints_retention(capsys):
    tensors, meta = decaying_lora()
    compress_lora(build_lora(tensors, meta), verbose=True)
    out = capsys.readouterr().out
    assert "sum(S) retained" in out and "Average Frobenius norm retention" in out and MODULES[0][0] in out


SMALL_CONV = [("lora_unet_conv_in", 320, 4, 3), ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320, 320, 0)]


@pytest.mark.parametrize("kind", ["locon_tucker", "loha", "loha_tucker", "lokr", "lokr_factored_w1"])
def test_lycoris_input_becomes_kohya_lora(kind):
    tensors, meta = make_lora("sd15", kind, modules=SMALL_CONV, rank=4, alpha=2.0)
    out, report = compress_lora(build_lora(tensors, meta), method="sv_fro", param=0.999999, new_rank=128, save_precision="float")
    assert out.metadata["ss_network_module"] == "networks.lora" and "ss_network_args" not in out.metadata
    for stem, o, i, k in SMALL_CONV:
        m = out.modules[stem]
        assert m.kind == "lora" and not m.tucker
        full = reference_delta(tensors, stem)
        if kind == "locon_tucker":
            assert m.rank == 4  # folded exactly: rank 4 (the legacy +1 never goes above a module's own rank)
        assert rel_err(m.delta(), full) < 1e-4, stem
        if k == 3:
            assert m.params["lora_down.weight"].shape == (m.rank, i, 3, 3)
    assert len(report["converted"]) == (1 if kind == "locon_tucker" else 2)


def test_lossy_conversion_keeps_top_directions():
    tensors, meta = make_lora("sd15", "loha", modules=SMALL_CONV[1:], rank=4)
    out, _ = compress_lora(build_lora(tensors, meta), method=None, new_rank=3, save_precision="float")
    stem = SMALL_CONV[1][0]
    u, s, vh = torch.linalg.svd(reference_delta(tensors, stem))
    assert rel_err(out.modules[stem].delta(), (u[:, :3] * s[:3]) @ vh[:3]) < 1e-4


def test_bad_options_write_nothing(tmp_path):
    tensors, meta = decaying_lora()
    src = write_lora(tmp_path / "raw.safetensors", tensors, meta)
    for kwargs, message in (
        ({"method": "svd"}, "unknown method"),
        ({"save_precision": "fp8"}, "unknown save precision"),
        ({"param": -1.0}, "positive parameter"),
        ({"new_rank": 0}, "at least 1"),
    ):
        with pytest.raises(OptionError, match=message):  # the options are wrong, not the input file
            compress_file(src, tmp_path / "c.safetensors", **kwargs)
    assert not (tmp_path / "c.safetensors").exists()


def test_progress_bar(capsys):
    tensors, meta = decaying_lora()
    compress_lora(build_lora(tensors, meta), progress=True)
    assert "compress" in capsys.readouterr().err
    assert not math.isnan(1.0)


# --- the float32-Gram fast path and its float64 fallback ----------------------------------------


def _fp16_factors(out_dim, n, r, seed, decay=0.97):
    g = torch.Generator().manual_seed(seed)
    up = (torch.randn(out_dim, r, generator=g) * 0.02 * torch.tensor([decay**j for j in range(r)])).half().float()
    down = (torch.randn(r, n, generator=g) * 0.02).half().float()
    return up, down


@pytest.mark.parametrize("method,param", [("sv_ratio", 16.0), ("sv_ratio", 4.0), ("sv_fro", 0.9), ("sv_cumulative", 0.7)])
def test_fast_path_matches_float64_path(method, param):
    from charbuild.lora.svd import _resize_fast, _resize_precise

    used = 0
    for seed, (o, n) in enumerate([(320, 2880), (1280, 11520), (768, 768), (320, 320), (1280, 1280)]):
        up, down = _fp16_factors(o, n, 64, seed)
        fast = _resize_fast(up, down, 0.5, 64, method, param, "legacy")
        ref = _resize_precise(up, down, 0.5, 64, method, param, "legacy")
        if fast is None:
            continue
        used += 1
        assert fast[3] == ref[3] and fast[2] == ref[2]
        assert rel_err(fast[0] @ fast[1], ref[0] @ ref[1]) <= 1e-5
        assert fast[4] == pytest.approx(ref[4], rel=1e-5)
    assert used >= 4  # the fast path is actually taken for ordinary factors


def test_rank_near_threshold_falls_back_to_float64():
    """A singular value within the fast path's error bound of the sv_ratio threshold: float64 decides."""
    from charbuild.lora import svd as compress

    g = torch.Generator().manual_seed(3)
    qu, _ = torch.linalg.qr(torch.randn(320, 8, generator=g, dtype=torch.float64))
    qd, _ = torch.linalg.qr(torch.randn(960, 8, generator=g, dtype=torch.float64))
    s = torch.tensor([1.0, 0.5, 0.3, 0.2, 1 / 16 * (1 + 1e-7), 0.01, 0.005, 0.001], dtype=torch.float64)
    up, down = (qu * s).float(), qd.T.float()
    assert compress._resize_fast(up, down, 1.0, 8, "sv_ratio", 16.0, "legacy") is None
    s[4] = 1 / 16 * 1.01  # clearly above: the fast path decides
    up = (qu * s).float()
    fast = compress._resize_fast(up, down, 1.0, 8, "sv_ratio", 16.0, "legacy")
    assert fast is not None and fast[3] == 6  # 5 values > S0/16, legacy +1
    up, down = (qu * s).float(), qd.T.float()
    assert compress.resize_factors(up, down, 1.0, 8, "sv_ratio", 16.0)[3] == 6


@pytest.mark.parametrize("side", ["up", "down"])
@pytest.mark.parametrize("gap", [1e-4, 1e-7, 0.0])
def test_ill_conditioned_factors_get_float64_grams(side, gap):
    """Nearly (or exactly) collinear factor columns: float32 Grams lose them. The fast route
    takes that side's Gram in float64 (or hands over to the float64 route); the result is
    the full SVD's either way."""
    from charbuild.lora import svd as compress

    g = torch.Generator().manual_seed(4)
    up = torch.randn(640, 16, generator=g)
    down = torch.randn(16, 2880, generator=g)
    if side == "up":
        up[:, 1] = up[:, 0] + gap * up[:, 1]
    else:
        down[1] = down[0] + gap * down[1]
    fast = compress._resize_fast(up, down, 1.0, 16, "sv_fro", 0.99, "legacy")
    u, s, vh = torch.linalg.svd((up.double() @ down.double()), full_matrices=False)
    for new_up, new_down, _, k, _ in [r for r in (fast, compress.resize_factors(up, down, 1.0, 16, "sv_fro", 0.99)) if r]:
        assert k == reference_rank(s.float(), "sv_fro", 0.99, 16)
        kk = min(k, 16)
        assert rel_err((new_up @ new_down).double(), (u[:, :kk] * s[:kk]) @ vh[:kk]) <= 1e-4
    if gap == 1e-4:
        assert fast is not None  # one float64 Gram was enough


def test_trained_like_up_factor_stays_on_the_fast_route():
    """kohya starts up at zero, so a trained up spans few directions plus small ones."""
    from charbuild.lora import svd as compress

    g = torch.Generator().manual_seed(7)
    basis = torch.randn(1280, 4, generator=g)
    up = (basis @ torch.randn(4, 32, generator=g) + 1e-3 * torch.randn(1280, 32, generator=g)).half().float()
    down = (torch.randn(32, 11520, generator=g) * 0.02).half().float()
    fast = compress._resize_fast(up, down, 0.5, 32, "sv_ratio", 16.0, "legacy")
    ref = compress._resize_precise(up, down, 0.5, 32, "sv_ratio", 16.0, "legacy")
    assert fast is not None and fast[3] == ref[3] and fast[2] == ref[2]
    assert rel_err(fast[0] @ fast[1], ref[0] @ ref[1]) <= 1e-5


def test_worker_threads_do_not_change_the_result():
    tensors, meta = decaying_lora(dtype=torch.float16)
    lora = build_lora(tensors, meta)
    threads = torch.get_num_threads()
    one, report_one = compress_lora(lora, workers=1)
    three, report_three = compress_lora(lora, workers=3)
    assert torch.get_num_threads() == threads  # restored after the pool
    assert list(one.tensors) == list(three.tensors)
    assert all(torch.equal(one.tensors[k], three.tensors[k]) for k in one.tensors)
    assert report_json(report_one) == report_json(report_three)  # (NaN stats of the all-zero module)


@pytest.mark.parametrize(
    "kind,options",
    [("lora", {}), ("lora", {"method": "rank", "new_rank": 6, "new_conv_rank": 3, "save_precision": "bf16"}),
     ("loha", {"method": "sv_fro", "param": 0.99, "save_precision": "float"})],
)  # fmt: skip
def test_streamed_file_equals_the_in_memory_result(tmp_path, kind, options):
    """compress_file writes module by module; its file holds what compress_lora returns."""
    if kind == "lora":
        tensors, meta = decaying_lora(dtype=torch.float16)
    else:
        tensors, meta = make_lora("sd15", kind, modules=SMALL_CONV, rank=4, alpha=2.0)
    src = write_lora(tmp_path / "raw.safetensors", tensors, meta)
    report = compress_file(src, tmp_path / "c.safetensors", workers=2, **options)
    expected, expected_report = compress_lora(load_lora(src), workers=1, **options)
    got = load_lora(tmp_path / "c.safetensors")
    assert got.tensors.keys() == expected.tensors.keys()
    assert all(torch.equal(got.tensors[k], expected.tensors[k]) for k in got.tensors)
    assert {k: v for k, v in got.metadata.items() if not k.startswith("sshs_")} == expected.metadata
    assert (got.metadata["sshs_model_hash"], got.metadata["sshs_legacy_hash"]) == sd_scripts_hashes(got.tensors, got.metadata)
    assert report_json({k: v for k, v in report.items() if k not in ("src", "dst", "size_in", "size_out")}) == report_json(expected_report)


def test_a_failing_writer_stops_the_workers_and_restores_torch_threads(tmp_path):
    from charbuild.lora import compress as compress_module

    tensors, meta = decaying_lora(dtype=torch.float16)
    lora = build_lora(tensors, meta)
    threads = torch.get_num_threads()
    calls = []

    def sink(key, tensor):
        calls.append(key)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")

    opts = compress_module._options("sv_ratio", 16.0, 128, None, "fp16", "legacy")
    with pytest.raises(OSError) as info:  # (the kept traceback keeps the failed call's frame alive)
        compress_module._resize_all(lora, opts, sink, workers=2, progress=False, verbose=False)
    assert torch.get_num_threads() == threads and len(calls) == 4 and info.value.errno == 28


@pytest.mark.parametrize("method,param", [("sv_ratio", 16.0), ("sv_fro", 0.9), ("sv_cumulative", 0.7), (None, 0.0)])
def test_loha_through_its_factors_equals_the_full_delta_svd(method, param):
    """Plain LoHa goes through its Khatri-Rao factors; the ranks and deltas are the full SVD's."""
    from charbuild.lora.compress import loha_factors
    from charbuild.lora.svd import resize_factors, resize_full

    modules = [("lora_unet_down_blocks_0_resnets_0_conv1", 320, 320, 3),
               ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768, 0)]  # fmt: skip
    tensors, meta = make_lora("sd15", "loha", modules=modules, rank=6, alpha=3.0, seed=5)
    lora = build_lora({k: v.half() for k, v in tensors.items()}, meta)
    for stem, *_ in modules:
        module = lora.modules[stem]
        factors = loha_factors(module)
        assert factors is not None and factors[0].shape[1] == 36
        assert rel_err(factors[0] @ factors[1], module.delta()) < 1e-6
        up, down, alpha, k, _ = resize_factors(*factors, 1.0, 24, method, param)
        ref_up, ref_down, ref_alpha, ref_k, _ = resize_full(module.delta(), 24, method, param)
        assert (k, alpha) == (ref_k, ref_alpha), stem
        assert rel_err(up @ down, ref_up @ ref_down) < 1e-4, stem
    narrow = make_lora("sd15", "loha", modules=[("lora_unet_conv_out", 4, 320, 3)], rank=6)[0]
    assert loha_factors(build_lora(narrow, {}).modules["lora_unet_conv_out"]) is None  # 36 > 4/2: full SVD


@pytest.mark.parametrize("method, param", [("sv_ratio", 16.0), ("sv_fro", 0.999999), ("sv_cumulative", 0.999999),
                                           ("rank", None)])
def test_compression_never_raises_a_module_s_rank_above_its_own(tmp_path, method, param):
    """resize_lora.py's ``+ 1`` made a dim-8 LoRA's modules rank 9 (a zero direction padded in), so
    the "compressed" file was larger than the merged one; charbuild caps at the module's rank."""
    tensors, meta = make_lora("sd15", "lora", rank=8, alpha=4.0, seed=3)  # random factors: all 8 directions count
    src = write_lora(tmp_path / "in.safetensors", tensors, meta)
    dst = tmp_path / "out.safetensors"
    compress_file(src, dst, method=None if method == "rank" else method, param=param, new_rank=128,
                  save_precision="float")
    before, after = load_lora(src), load_lora(dst)
    assert 8 in {m.rank for m in before.modules.values()}
    for stem, m in after.modules.items():
        own = before.modules[stem]
        assert m.rank <= own.rank, stem
        if method != "rank":  # every direction counts, none is added
            assert m.rank == min(own.rank, *own.delta().shape), stem
        assert rel_err(m.delta(), before.modules[stem].delta()) < 1e-4, stem
    numel = lambda lora: sum(t.numel() for m in lora.modules.values() for t in m.params.values())  # noqa: E731
    assert numel(after) <= numel(before)  # the weights are never bigger (the header says more)
