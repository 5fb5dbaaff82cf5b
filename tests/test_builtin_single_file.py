"""Base models as users have them: single-file SD1.5 / SDXL checkpoints, loaded with no network.

The checkpoints are written by the tests from the tiny models in the original key layout
(``single_file_fixtures``) and loaded back through diffusers' real ``from_single_file`` with
``HF_HUB_OFFLINE=1`` and a hub address that cannot answer; every tensor must come back equal.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from single_file_fixtures import write_single_file  # noqa: E402

from charbuild.errors import TrainingError  # noqa: E402
from charbuild.train.builtin.checkpoint import (  # noqa: E402
    CheckpointError,
    arch_mismatch,
    check_checkpoint_arch,
    checkpoint_kind,
    read_checkpoint_keys,
    read_safetensors_keys,
)
from charbuild.train.builtin.clip_tokenizer import VOCAB_SIZE, clip_tokenizer  # noqa: E402
from charbuild.train.builtin.models import (  # noqa: E402
    CONFIGS_DIR,
    UnsupportedError,
    _load_diffusers_folder,
    load_base_model,
    load_single_file,
    parse_tiny_base,
)
from charbuild.train.builtin.tiny import ensure_tiny_model, ensure_tiny_sdxl_model  # noqa: E402


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("single-file")


@pytest.fixture(scope="module")
def tiny_sdxl(models_root):
    folder = ensure_tiny_sdxl_model(models_root, 0)
    model = _load_diffusers_folder(folder)
    path = write_single_file(models_root / "タイニー-sdxl.safetensors", model.unet, model.vae, model.text_encoder, model.text_encoder_2)
    return folder, model, path


@pytest.fixture(scope="module")
def tiny_sd15(models_root):
    folder = ensure_tiny_model(models_root, 0)
    model = _load_diffusers_folder(folder)
    path = write_single_file(models_root / "tiny-sd15.safetensors", model.unet, model.vae, model.text_encoder)
    return folder, model, path


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


# ------------------------------------------------------------------------ the CLIP tokenizer


def test_clip_tokenizer_has_clips_ids():
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77
    ids = tok("金髪の少女, 1girl").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and tok.unk_token_id not in ids[1:-1]
    big_g = clip_tokenizer(pad_token="!")
    assert big_g.pad_token_id == 0
    assert big_g("a", padding="max_length", max_length=6).input_ids == [49406, 320, 49407, 0, 0, 0]


# ------------------------------------------------------------------------ architecture from the keys


@pytest.mark.parametrize(
    "keys, kind",
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.text_model.x",
          "conditioner.embedders.1.model.positional_embedding", "first_stage_model.encoder.conv_in.weight"], "sdxl"),
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.ln_final.weight"], "sdxl_refiner"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"], "sd15"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.embeddings.x"], "sd15"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.positional_embedding"], "sd2"),
        (["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"], "lora"),
        (["down_blocks.0.resnets.0.conv1.weight"], "diffusers"),
        (["foo"], "unknown"),
        ([], "unknown"),
    ],
)  # fmt: skip
def test_checkpoint_kind(keys, kind):
    assert checkpoint_kind(keys) == kind


def test_arch_mismatch_messages():
    assert arch_mismatch("sdxl", None) is None and arch_mismatch("sdxl", "sdxl") is None
    assert "arch = 'sdxl'" in arch_mismatch("sdxl", "sd15") and "SDXL checkpoint" in arch_mismatch("sdxl", "sd15")
    assert "LoRA" in arch_mismatch("lora", None) and "SD2" in arch_mismatch("sd2", "sd15")


def test_header_only_key_reading(tmp_path, tiny_sdxl):
    _, _, path = tiny_sdxl
    keys = read_safetensors_keys(path)
    assert checkpoint_kind(keys) == "sdxl" and "__metadata__" not in keys
    assert check_checkpoint_arch(path) == "sdxl" and check_checkpoint_arch(path, "sdxl") == "sdxl"
    with pytest.raises(CheckpointError, match="arch = 'sd15'") as info:
        check_checkpoint_arch(path, "sd15")
    assert info.value.path == str(path) and "タイニー-sdxl.safetensors" in str(info.value)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="not a safetensors file") as info:
        check_checkpoint_arch(bad)
    assert info.value.path == str(bad)
    bad.write_bytes(struct.pack("<Q", 5) + b"nope!")
    with pytest.raises(CheckpointError, match="not JSON"):
        read_safetensors_keys(bad)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
                               "cond_stage_model.transformer.text_model.x": torch.zeros(1)}}, ckpt)  # fmt: skip
    assert checkpoint_kind(read_checkpoint_keys(ckpt)) == "sd15"


def test_uniform_half_dtype_of_a_header():
    from charbuild.train.builtin.checkpoint import uniform_half_dtype

    def header(*dtypes, shape=(2, 2)):
        return {"__metadata__": {"a": "b"}} | {f"t{i}": {"dtype": d, "shape": list(shape)} for i, d in enumerate(dtypes)}

    assert uniform_half_dtype(header("F16", "F16", "I64")) == "float16"
    assert uniform_half_dtype(header("BF16")) == "bfloat16"
    assert uniform_half_dtype(header("F16", "F32")) is None and uniform_half_dtype(header("F16", "BF16")) is None
    assert uniform_half_dtype(header("F32")) is None and uniform_half_dtype(header("I64")) is None
    assert uniform_half_dtype(header("F16") | {"v_pred": {"dtype": "F32", "shape": [0]}}) == "float16"


# ------------------------------------------------------------------------ loading, offline


def test_sdxl_single_file_loads_offline_with_equal_weights(tiny_sdxl):
    folder, model, path = tiny_sdxl
    loaded = load_single_file(path, None, config_dir=folder)
    assert loaded.arch == "sdxl" and loaded.name == path.name
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(model, part), getattr(loaded, part))
    assert loaded.tokenizer_2.pad_token_id == 0
    assert loaded.noise_scheduler.config.num_train_timesteps == 1000
    assert loaded.noise_scheduler.config.prediction_type == "epsilon"


def test_a_half_single_file_loads_in_its_dtype_with_the_same_values(tmp_path, tiny_sdxl):
    """An fp16 file is not widened while it loads (the trainer widens it): the values are the
    file's, as a float32 load would give them."""
    from safetensors.torch import load_file, save_file

    folder, _, path = tiny_sdxl
    tensors = load_file(str(path))
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(half))
    loaded = load_single_file(half, "sdxl", config_dir=folder)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float16}
    mixed = tmp_path / "mixed.safetensors"
    save_file({k: v.half() if v.is_floating_point() and k.startswith("model.") else v for k, v in tensors.items()},
              str(mixed))
    wide = load_single_file(mixed, "sdxl", config_dir=folder)  # fp32 parts: nothing narrowed
    assert {p.dtype for p in wide.unet.parameters()} == {torch.float32}
    a, b = loaded.unet.state_dict(), wide.unet.state_dict()
    assert [k for k in a if not torch.equal(a[k].float(), b[k])] == []


def test_sd15_single_file_loads_offline_with_equal_weights(tiny_sd15):
    folder, model, path = tiny_sd15
    loaded = load_single_file(path, "sd15", config_dir=folder)
    assert loaded.arch == "sd15" and loaded.text_encoder_2 is None
    for part in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(model, part), getattr(loaded, part))
    with pytest.raises(CheckpointError, match="SD1.x checkpoint") as info:
        load_single_file(path, "sdxl", config_dir=folder)
    assert info.value.path == str(path)


def test_shipped_configs_and_the_clip_tokenizer_are_used(tmp_path, tiny_sdxl):
    """The shipped config folder (model_index, scheduler) with no tokenizer folder: the CLIP
    tokenizers come from the shipped BPE file. Only the model sizes are the tiny ones."""
    folder, model, path = tiny_sdxl
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS_DIR / "sdxl", configs)
    assert not (configs / "tokenizer").exists()
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        shutil.copy2(folder / sub / "config.json", configs / sub / "config.json")
    loaded = load_single_file(path, "sdxl", config_dir=configs)
    _assert_same_weights(model.unet, loaded.unet)
    assert len(loaded.tokenizer) == len(loaded.tokenizer_2) == VOCAB_SIZE
    assert loaded.tokenizer_2.pad_token_id == 0 and loaded.tokenizer.pad_token_id == 49407
    assert type(loaded.noise_scheduler).__name__ == "DDPMScheduler"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_shipped_config_folders_are_complete(arch):
    folder = CONFIGS_DIR / arch
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for name, spec in index.items():
        if not name.startswith("_") and isinstance(spec, list) and spec[0] and name != "tokenizer" and not name.startswith("tokenizer"):
            assert any((folder / name / f).is_file() for f in ("config.json", "scheduler_config.json")), name


def test_sd15_shipped_unet_config_has_sd15s_lora_modules():
    from diffusers import UNet2DConditionModel

    from charbuild.lora.keysets import sd15_modules
    from charbuild.train.builtin.network import LoRANetwork, NetworkSpec

    config = json.loads((CONFIGS_DIR / "sd15" / "unet" / "config.json").read_text(encoding="utf-8"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        network = LoRANetwork(unet, None, NetworkSpec("lora", 4, 2, 4, 2))
    assert network.arch == "sd15"
    assert {m.stem for m in network.unet_loras} == {s for s, *_ in sd15_modules(conv=True, te=False)}


def test_load_base_model_tiny_sdxl_and_arch_checks(models_root, tiny_sdxl):
    _, model, path = tiny_sdxl
    assert parse_tiny_base("tiny-sdxl:3") == ("sdxl", 3) and parse_tiny_base("tiny") == ("sd15", 0)
    assert parse_tiny_base("tinyish") is None
    with pytest.raises(TrainingError, match="whole number"):
        parse_tiny_base("tiny-sdxl:x")
    both = ("sd15", "sdxl")
    base = load_base_model({"base": "tiny-sdxl"}, models_root, supported_archs=both)
    assert base.arch == "sdxl" and base.name == "tiny-sdxl-0" and base.text_encoder_2 is not None
    assert not any(p.requires_grad for p in base.text_encoder_2.parameters())
    _assert_same_weights(model.unet, base.unet)
    with pytest.raises(UnsupportedError, match="sd-scripts"):
        load_base_model({"base": "tiny-sdxl"}, models_root)  # a loop that trains SD1.x only
    with pytest.raises(TrainingError, match="arch is 'sd15'"):
        load_base_model({"base": "tiny-sdxl", "arch": "sd15"}, models_root, supported_archs=both)
    with pytest.raises(CheckpointError, match="arch = 'sd15'") as info:
        load_base_model({"base": str(path), "arch": "sd15"}, models_root, supported_archs=both)
    assert info.value.path == str(path)
    sd15 = load_base_model({"base": "tiny", "arch": "sd15"}, models_root)
    assert sd15.arch == "sd15" and sd15.name == "tiny-0" and sd15.tokenizer_2 is None


def test_a_text_encoder_left_at_random_is_an_error(tiny_sdxl):
    """diffusers (without accelerate) loads text encoders with strict=False: charbuild checks."""
    from charbuild.train.builtin.models import verify_text_encoders_loaded
    from charbuild.train.builtin.tiny import build_tiny_sdxl_components

    _, model, path = tiny_sdxl
    verify_text_encoders_loaded(path, "sdxl", model.text_encoder, model.text_encoder_2)
    _, _, other_te1, other_te2 = build_tiny_sdxl_components(1)
    with pytest.raises(CheckpointError, match="text encoder was not loaded") as info:
        verify_text_encoders_loaded(path, "sdxl", model.text_encoder, other_te2)
    assert info.value.path == str(path) and "conditioner.embedders.1" in str(info.value)
    with pytest.raises(CheckpointError, match="conditioner.embedders.0"):
        verify_text_encoders_loaded(path, "sdxl", other_te1, model.text_encoder_2)


def test_v_pred_markers_give_a_v_prediction_schedule(tmp_path, tiny_sdxl):
    """NoobAI-XL v-pred files carry empty ``v_pred`` and ``ztsnr`` tensors, as ComfyUI reads them."""
    from safetensors.torch import load_file, save_file

    from charbuild.train.builtin.checkpoint import prediction_hints

    assert prediction_hints(["a", "b"]) == {"prediction_type": None, "zero_terminal_snr": False}
    assert prediction_hints(["v_pred", "ztsnr"]) == {"prediction_type": "v_prediction", "zero_terminal_snr": True}
    folder, _, path = tiny_sdxl
    tensors = load_file(str(path))
    vpred = tmp_path / "noob-vpred.safetensors"
    save_file({**tensors, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, str(vpred))
    loaded = load_single_file(vpred, "sdxl", config_dir=folder)
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction" and loaded.zero_terminal_snr
    plain = load_single_file(path, "sdxl", config_dir=folder)
    assert plain.noise_scheduler.config.prediction_type == "epsilon" and not plain.zero_terminal_snr
