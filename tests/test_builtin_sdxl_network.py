"""The builtin trainer's SDXL pieces: the tiny SDXL model and the LoRA network's kohya SDXL keys.

The key-set test builds the full-size SDXL UNet and both text encoders on torch's ``meta``
device (no memory, no weights) from the configs charbuild ships, and compares every adapted
module, shape included, with :func:`charbuild.lora.keysets.sdxl_modules` (sd-scripts' set).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from charbuild.lora.keysets import sdxl_modules  # noqa: E402
from charbuild.train.builtin.network import LoRANetwork, NetworkSpec, unet_arch  # noqa: E402
from charbuild.train.builtin.sdxl_names import sdxl_unet_module_name  # noqa: E402
from charbuild.train.builtin.tiny import build_tiny_sdxl_components, ensure_tiny_sdxl_model  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "charbuild" / "train" / "builtin" / "configs"


def _module_kind(adapter) -> tuple[int, int, int]:
    """(out, in, kernel) of the adapted layer, kernel 0 for Linear, as keysets writes it."""
    org = adapter._org[0]
    if isinstance(org, torch.nn.Linear):
        return org.out_features, org.in_features, 0
    return org.out_channels, org.in_channels, org.kernel_size[0]


def _stems(network) -> dict[str, tuple[int, int, int]]:
    return {m.stem: _module_kind(m) for m in list(network.unet_loras) + list(network.te_loras)}


@pytest.fixture(scope="module")
def full_sdxl():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(sub):
        return json.loads((CONFIGS / "sdxl" / sub / "config.json").read_text(encoding="utf-8"))

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        te1 = CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2")))
    return unet, te1, te2


@pytest.mark.parametrize("conv", [True, False])
def test_sdxl_lora_keys_and_shapes_equal_sd_scripts(full_sdxl, conv):
    unet, te1, te2 = full_sdxl
    spec = NetworkSpec("lora", 4, 2, 4 if conv else None, 2 if conv else None)
    with torch.device("meta"):
        network = LoRANetwork(unet, (te1, te2), spec)
    assert network.arch == "sdxl"
    ours = _stems(network)
    reference = {stem: (o, i, k) for stem, o, i, k in sdxl_modules(conv=conv, te=True)}
    assert sorted(set(reference) - set(ours)) == []
    assert sorted(set(ours) - set(reference)) == []
    assert {s: ours[s] for s in reference if ours[s] != reference[s]} == {}
    assert len(ours) == len(reference)


def test_sdxl_unet_only_and_one_encoder(full_sdxl):
    unet, te1, te2 = full_sdxl
    spec = NetworkSpec("lora", 4, 2)
    with torch.device("meta"):
        unet_only = LoRANetwork(unet, None, spec)
        te2_only = LoRANetwork(unet, (None, te2), spec)
    assert not unet_only.te_loras
    assert {m.stem for m in te2_only.te_loras} == {s for s, *_ in sdxl_modules(conv=False) if s.startswith("lora_te2_")}
    with pytest.raises(ValueError, match="both text encoders"):
        LoRANetwork(unet, te1, spec, arch="sdxl")


def test_sdxl_loha_keys(full_sdxl):
    unet, te1, te2 = full_sdxl
    with torch.device("meta"):
        network = LoRANetwork(unet, (te1, te2), NetworkSpec("loha", 2, 1, 2, 1))
    adapters = list(network.unet_loras) + list(network.te_loras)
    sd = {f"{m.stem}.{k}": tuple(v.shape) for m in adapters for k, v in m.state_dict().items()}
    stem = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"  # Linear 2048 -> 640
    assert sd[f"{stem}.hada_w1_a"] == (640, 2) and sd[f"{stem}.hada_w1_b"] == (2, 2048)
    conv = "lora_unet_output_blocks_2_2_conv"  # the upsampler's 3x3 conv, 1280 -> 1280
    assert sd[f"{conv}.hada_w2_b"] == (2, 1280 * 9)
    assert {k.rsplit(".", 1)[0] for k in sd} == {s for s, *_ in sdxl_modules(conv=True)}


@pytest.mark.parametrize(
    "diffusers_name, sgm",
    [
        ("conv_in", "input_blocks.0.0"),
        ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_q", "input_blocks.5.1.transformer_blocks.1.attn1.to_q"),
        ("down_blocks.2.resnets.0.time_emb_proj", "input_blocks.7.0.emb_layers.1"),
        ("mid_block.resnets.0.conv2", "middle_block.0.out_layers.3"),
        ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
        ("mid_block.resnets.1.norm1", "middle_block.2.in_layers.0"),
        ("up_blocks.0.resnets.2.conv1", "output_blocks.2.0.in_layers.2"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
        ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("conv_out", "out.2"),
    ],
)
def test_sgm_names(diffusers_name, sgm):
    assert sdxl_unet_module_name(diffusers_name) == sgm


def test_sgm_name_unknown_path_is_an_error():
    with pytest.raises(ValueError, match="no SGM name"):
        sdxl_unet_module_name("encoder.layers.0")


def test_tiny_sdxl_has_sdxl_names(full_sdxl):
    unet, _vae, te1, te2 = build_tiny_sdxl_components(0)
    assert unet_arch(unet) == "sdxl" and unet_arch(full_sdxl[0]) == "sdxl"
    assert unet.config.addition_embed_type == "text_time"
    assert type(te1).__name__ == "CLIPTextModel" and type(te2).__name__ == "CLIPTextModelWithProjection"
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert unet.config.projection_class_embeddings_input_dim == te2.config.projection_dim + 6 * unet.config.addition_time_embed_dim
    network = LoRANetwork(unet, (te1, te2), NetworkSpec("lora", 2, 1, 2, 1))
    full_unet = {s for s, *_ in sdxl_modules(conv=True, te=False)}
    ours = _stems(network)
    # the same UNet modules as the real SDXL (same depths), the text encoders' first layers
    assert {s for s in ours if s.startswith("lora_unet_")} == full_unet
    layers = te1.config.num_hidden_layers
    te_ref = {s for s, *_ in sdxl_modules(conv=False) if s.startswith("lora_te")}
    te_ref = {s for s in te_ref if int(s.split("_layers_")[1].split("_")[0]) < layers}
    assert {s for s in ours if s.startswith("lora_te")} == te_ref


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_tiny_sdxl_is_cached_and_deterministic(tmp_path):
    a = ensure_tiny_sdxl_model(tmp_path / "a", 0)
    b = ensure_tiny_sdxl_model(tmp_path / "b", 0)
    assert a == tmp_path / "a" / "build" / "models" / "tiny-sdxl-0"
    assert _tree_digest(a) == _tree_digest(b)
    stamp = (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_sdxl_model(tmp_path / "a", 0) == a
    assert (a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((a / "model_index.json").read_text(encoding="utf-8"))["_class_name"] == "StableDiffusionXLPipeline"
    other = ensure_tiny_sdxl_model(tmp_path / "a", 1)
    assert _tree_digest(other)["unet/diffusion_pytorch_model.safetensors"] != _tree_digest(a)["unet/diffusion_pytorch_model.safetensors"]

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(a, local_files_only=True)
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.vae.config.scaling_factor == 0.13025
