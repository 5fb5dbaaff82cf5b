"""LoRA file reading/writing: round trips, sd-scripts hashes, every rejected input."""

from __future__ import annotations

import hashlib
import json

import pytest
import safetensors.torch
import torch
from lora_fixtures import KINDS, make_lora, reference_delta, write_lora

from charbuild.errors import LoraFileError
from charbuild.lora.io import _file_order, _header, _specs, build_lora, load_lora, save_lora, sd_scripts_hashes

SMALL = [("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1), ("lora_te_text_model_encoder_layers_0_mlp_fc1", 3072, 768, 0)]


def sd_scripts_reference(tensors, metadata):
    """precalculate_safetensors_hashes as sd-scripts writes it (train_util.py)."""
    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = safetensors.torch.save(tensors, ss)
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[n + 8 :]).hexdigest(), hashlib.sha256(b[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_keeps_tensors_and_metadata(tmp_path, kind):
    tensors, meta = make_lora("sd15", kind, modules=SMALL, metadata={"ss_tag_frequency": json.dumps({"a": {"x, é": 2}})})
    written = save_lora(tmp_path / "a.safetensors", tensors, meta)
    back = load_lora(tmp_path / "a.safetensors")
    assert back.metadata == written
    assert {k: v for k, v in back.metadata.items() if not k.startswith("sshs_")} == meta
    assert back.tensors.keys() == tensors.keys()
    assert all(torch.equal(back.tensors[k], tensors[k]) for k in tensors)
    assert back.format == {"lora": "lora", "locon_tucker": "locon", "loha": "loha", "loha_tucker": "loha"}.get(kind, "lokr")
    assert back.arch == "sd15"
    for stem, module in back.modules.items():
        assert torch.allclose(module.delta().double(), reference_delta(tensors, stem), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rank", [1, 40])  # ~40 KB (legacy hash of an empty read) and > 1.1 MB
def test_hashes_match_sd_scripts(tmp_path, dtype, rank):
    tensors, meta = make_lora("sd15", "lora", modules=SMALL, rank=rank, dtype=dtype)
    meta["ss_weird"] = 'quote " backslash \\ newline \n tab \t unicode ü 日本'
    meta["modelspec.title"] = "not hashed"
    written = save_lora(tmp_path / "a.safetensors", tensors, meta)
    expected = sd_scripts_reference(tensors, meta)
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == expected
    assert sd_scripts_hashes(tensors, meta) == expected
    with safetensors.safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["sshs_model_hash"] == expected[0]


def test_layout_matches_safetensors():
    """Our writer's data part is the library's byte for byte; its header the library's, keys sorted."""
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.uint8, torch.bool,
              torch.int32, torch.float8_e4m3fn, torch.int16]  # fmt: skip
    tensors = {f"t{i}": torch.zeros(i + 1, 2).to(d) for i, d in enumerate(reversed(dtypes))}
    tensors["scalar"] = torch.tensor(3.0)
    for meta in (None, {}, {"ss_x": "1"}, {"ss_z": 'é\n"q\\', "ss_a": "12345"}):
        b = safetensors.torch.save(tensors, meta)
        n = int.from_bytes(b[:8], "little")
        ours = _header(_specs(tensors, _file_order(tensors)), meta)
        assert len(ours) == n
        assert json.loads(ours) == json.loads(b[8 : 8 + n])


def test_saved_file_data_equals_the_librarys(tmp_path):
    tensors, meta = make_lora("sd15", "lora", modules=SMALL, rank=4)
    tensors["extra.alpha"] = torch.tensor(2.0, dtype=torch.float32)
    written = save_lora(tmp_path / "a.safetensors", tensors, meta)
    ours = (tmp_path / "a.safetensors").read_bytes()
    lib = safetensors.torch.save(tensors, written)
    n_ours, n_lib = int.from_bytes(ours[:8], "little"), int.from_bytes(lib[:8], "little")
    assert ours[8 + n_ours :] == lib[8 + n_lib :]
    assert json.loads(ours[8 : 8 + n_ours]) == json.loads(lib[8 : 8 + n_lib])
    assert ours[8 : 8 + n_ours].rstrip().decode() == json.dumps(json.loads(ours[8 : 8 + n_ours]), sort_keys=True,
                                                                  separators=(",", ":"), ensure_ascii=False)  # fmt: skip


def test_hashes_without_ss_metadata_match_sd_scripts(tmp_path):
    tensors, _ = make_lora("sd15", "lora", modules=SMALL, rank=40)
    written = save_lora(tmp_path / "a.safetensors", tensors, {"modelspec.title": "x"})
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == sd_scripts_reference(tensors, {})


def test_torch_files_load_weights_only(tmp_path):
    tensors, _ = make_lora("sd15", "lora", modules=SMALL)
    torch.save(tensors, tmp_path / "a.pt")
    assert load_lora(tmp_path / "a.pt").tensors.keys() == tensors.keys()


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path, capsys):
    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(LoraFileError, match="evil.ckpt.*never unpickles"):
        load_lora(tmp_path / "evil.ckpt")
    assert "pwned" not in capsys.readouterr().out


def test_peft_keys_are_renamed(tmp_path):
    down, up = torch.randn(4, 320), torch.randn(320, 4)
    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up,
    }
    lora = build_lora(tensors, {})
    m = lora.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert torch.equal(m.params["lora_down.weight"], down) and m.scale == 1.0


def test_peft_keys_of_unknown_layout_fail_clearly():
    with pytest.raises(LoraFileError, match="lora_A/lora_B.*transformer.x.lora_A.weight"):
        build_lora({"transformer.x.lora_A.weight": torch.zeros(2, 2), "transformer.x.lora_B.weight": torch.zeros(2, 2)}, {})


def test_sdxl_is_detected_from_stems():
    tensors, meta = make_lora("sdxl", "lora", modules=[("lora_unet_input_blocks_4_1_proj_in", 640, 640, 0)])
    meta.pop("ss_base_model_version")
    assert build_lora(tensors, meta).arch == "sdxl"


def _bad_inputs():
    good, _ = make_lora("sd15", "lora", modules=SMALL[:1])
    stem = SMALL[0][0]
    nan = dict(good)
    nan[f"{stem}.lora_up.weight"] = good[f"{stem}.lora_up.weight"].clone()
    nan[f"{stem}.lora_up.weight"][0, 0] = float("nan")
    inf = dict(good)
    inf[f"{stem}.alpha"] = torch.tensor(float("inf"))
    unpaired = {k: v for k, v in good.items() if "lora_up" not in k}
    shape = dict(good)
    shape[f"{stem}.lora_up.weight"] = torch.zeros(320, 5, 1, 1)
    dora = dict(good)
    dora[f"{stem}.dora_scale"] = torch.ones(1, 320)
    unknown = dict(good)
    unknown["lora_unet_x.weird_thing"] = torch.zeros(1)
    unknown["something_else"] = torch.zeros(1)
    return [
        ("not_lora", {"model.diffusion_model.w": torch.zeros(2)}, "not a LoRA"),
        ("nan", nan, "NaN or inf values in .*lora_up"),
        ("inf", inf, "NaN or inf values in .*alpha"),
        ("unpaired", unpaired, "unpaired factors.*lacks lora_up"),
        ("shape", shape, "shape mismatch"),
        ("dora", dora, "DoRA"),
        ("unknown", unknown, r"2 unknown key\(s\).*lora_unet_x.weird_thing, something_else"),
    ]


BAD = _bad_inputs()


@pytest.mark.parametrize("name,tensors,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_file_and_write_nothing(tmp_path, name, tensors, message):
    from charbuild.lora.combine import combine_files
    from charbuild.lora.compress import compress_file
    from charbuild.lora.merge import merge_file

    src = write_lora(tmp_path / f"{name}.safetensors", tensors)
    with pytest.raises(LoraFileError, match=message) as err:
        load_lora(src)
    assert str(src) in str(err.value)
    for run in (
        lambda dst: merge_file(src, dst, "ALL"),
        lambda dst: compress_file(src, dst),
        lambda dst: combine_files([(src, 1.0)], dst),
    ):
        dst = tmp_path / "out" / "dst.safetensors"
        with pytest.raises(LoraFileError):
            run(dst)
        assert not dst.exists()
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_garbage_file_and_missing_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(LoraFileError, match="junk.safetensors.*not a readable safetensors"):
        load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(LoraFileError, match="no such LoRA file"):
        load_lora(tmp_path / "missing.safetensors")


def test_failed_save_leaves_no_file(tmp_path):
    with pytest.raises(AttributeError):
        save_lora(tmp_path / "y.safetensors", {"a": "not a tensor"}, {})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_non_contiguous_tensors_are_saved(tmp_path):
    view = torch.arange(6.0).reshape(2, 3)[:, 0]
    save_lora(tmp_path / "x.safetensors", {"a": view}, {})
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / "x.safetensors"))["a"], view)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16])
def test_fp8_and_bf16_files_are_checked_for_nan(tmp_path, dtype):
    tensors, meta = make_lora("sd15", "lora", modules=SMALL, rank=4)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    assert set(build_lora(tensors, meta).modules) == {stem for stem, *_ in SMALL}
    up = next(k for k in tensors if k.endswith("lora_up.weight"))
    bad = tensors[up].float()
    bad[0, 0] = float("nan")
    tensors[up] = bad.to(dtype)
    with pytest.raises(LoraFileError, match="NaN or inf values"):
        build_lora(tensors, meta)


def test_stream_writes_in_order_with_room_to_spare(tmp_path):
    from charbuild.lora.io import header_room, stream_lora

    tensors, meta = make_lora("sd15", "lora", modules=SMALL, rank=40)
    order = sorted(tensors)
    room = header_room([(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order], meta) + 100
    with stream_lora(tmp_path / "s.safetensors", room) as out:
        for key in order:
            out.add(key, tensors[key])
        written = out.finish(meta)
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == sd_scripts_reference(tensors, meta)
    back = load_lora(tmp_path / "s.safetensors")
    assert back.metadata == written and all(torch.equal(back.tensors[k], tensors[k]) for k in tensors)
    data = (tmp_path / "s.safetensors").read_bytes()
    assert int.from_bytes(data[:8], "little") % 8 == 0


def test_stream_refuses_out_of_order_tensors_and_leaves_nothing(tmp_path):
    from charbuild.lora.io import stream_lora

    with pytest.raises(ValueError, match="out of safetensors order"):
        with stream_lora(tmp_path / "s.safetensors", 1000) as out:
            out.add("b", torch.zeros(2))
            out.add("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="finish"):
        with stream_lora(tmp_path / "t.safetensors", 1000) as out:
            out.add("a", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_library_header_is_the_librarys_bytes():
    from charbuild.lora.io import _library_header

    tensors = {f"t{i:04d}.é": torch.zeros(i % 3 + 1, 2).to(torch.float16 if i % 2 else torch.float32) for i in range(50)}
    order = _file_order(tensors)
    for meta in ({}, {"ss_x": 'é\n"q\\ \u2028 \x01 /'}):  # one key: the library's order is then fixed
        assert _library_header(_specs(tensors, order), meta) == _lib_header(tensors, meta)


def _lib_header(tensors, meta):
    b = safetensors.torch.save(tensors, meta)
    return b[8 : 8 + int.from_bytes(b[:8], "little")]


@pytest.mark.parametrize(
    "size,where",
    [(0x100000 - 4000, "data"), (0x100000 + 0x8000, "metadata+data"), (0x120000, "metadata"), (0x100000 - 40, "entries")],
)
def test_legacy_hash_when_the_ss_header_reaches_its_offset(tmp_path, size, where):
    """A big ss_* header (ss_tag_frequency of a large dataset) holds part or all of the legacy
    bytes. With one ss_* key the library's header is deterministic, so sd-scripts' value is."""
    if where == "entries":  # metadata ends just before 1 MB, tensor entries cover the window
        tensors = {f"lora_te_x_{i:05d}.alpha": torch.tensor(float(i)) for i in range(2000)}
    else:
        tensors, _ = make_lora("sd15", "lora", modules=SMALL, rank=4)
    meta = {"ss_tag_frequency": json.dumps({"big": "x" * size}), "modelspec.title": "not hashed"}
    written = save_lora(tmp_path / "a.safetensors", tensors, meta)
    expected = sd_scripts_reference(tensors, meta)
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == expected
    assert sd_scripts_hashes(tensors, meta) == expected
