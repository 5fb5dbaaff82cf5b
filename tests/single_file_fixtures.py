"""Write a diffusers model as the original single-file checkpoint (CompVis / Stability layout).

Users have base models as one ``.safetensors`` in the original key layout (what A1111, ComfyUI
and Civitai use); diffusers' ``from_single_file`` converts it back. These tests write such files
from the tiny models, so the real conversion path runs without a downloaded model:

- UNet: ``model.diffusion_model.`` + the SGM module path (:mod:`charbuild.train.builtin.sdxl_names`,
  which holds for SD1.5's UNet too: both have two layers per level);
- VAE: ``first_stage_model.`` + ``encoder.down.i.block.j`` / ``decoder.up.(n-1-i)`` /
  ``mid.block_1`` / ``mid.attn_1.{q,k,v,proj_out}`` (1x1 convs in the original);
- CLIP-L: ``cond_stage_model.transformer.text_model.…`` (SD1.5) or
  ``conditioner.embedders.0.transformer.text_model.…`` (SDXL), Hugging Face names;
- SDXL's bigG: ``conditioner.embedders.1.model.…`` in OpenCLIP's names (``in_proj_weight``
  = q, k, v stacked; ``text_projection`` transposed).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from charbuild.train.builtin.sdxl_names import sdxl_unet_module_name, up_block_attentions

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, n_up: int) -> str:
    key = key.replace("conv_norm_out", "norm_out")
    m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$", key)
    if m:
        side, kind, i, part, j, rest = m.groups()
        level = int(i) if kind == "down_blocks" else n_up - 1 - int(i)
        group = "down" if kind == "down_blocks" else "up"
        if part == "resnets":
            head, _, tail = rest.partition(".")
            return f"{side}.{group}.{level}.block.{j}.{_VAE_RESNET.get(head, head)}.{tail}"
        return f"{side}.{group}.{level}.{'downsample' if part == 'downsamplers' else 'upsample'}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", key)
    if m:
        side, part, j, rest = m.groups()
        if part == "resnets":
            head, _, tail = rest.partition(".")
            return f"{side}.mid.block_{int(j) + 1}.{_VAE_RESNET.get(head, head)}.{tail}"
        for new, old in _VAE_ATTN.items():
            if rest.startswith(new + "."):
                return f"{side}.mid.attn_1.{old}{rest[len(new):]}"
    return key


def _vae_tensors(vae) -> dict[str, torch.Tensor]:
    n_up = len(vae.decoder.up_blocks)
    out = {}
    for key, value in vae.state_dict().items():
        new = "first_stage_model." + _vae_key(key, n_up)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the original attention uses 1x1 convs
        out[new] = value
    return out


def _unet_tensors(unet) -> dict[str, torch.Tensor]:
    has_attn = up_block_attentions(unet)
    return {"model.diffusion_model." + sdxl_unet_module_name(k, has_attn): v for k, v in unet.state_dict().items()}


def _clip_l_tensors(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    return out


def _open_clip_tensors(text_encoder_2, prefix: str) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    out = {
        prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["final_layer_norm.bias"],
        prefix + "text_projection": sd["text_projection.weight"].T.contiguous(),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(text_encoder_2.config.num_hidden_layers):
        layer = f"encoder.layers.{i}."
        block = f"{prefix}transformer.resblocks.{i}."
        for what in ("weight", "bias"):
            out[block + f"attn.in_proj_{what}"] = torch.cat([sd[layer + f"self_attn.{x}_proj.{what}"] for x in "qkv"])
            for ours, theirs in names.items():
                out[block + f"{theirs}.{what}"] = sd[layer + f"{ours}.{what}"]
    return out


def write_single_file(path: Path, unet, vae, text_encoder, text_encoder_2=None) -> Path:
    """Save the components as one original-layout ``.safetensors`` (SDXL when ``text_encoder_2``)."""
    tensors = {**_unet_tensors(unet), **_vae_tensors(vae)}
    if text_encoder_2 is None:
        tensors.update(_clip_l_tensors(text_encoder, "cond_stage_model.transformer."))
    else:
        tensors.update(_clip_l_tensors(text_encoder, "conditioner.embedders.0.transformer."))
        tensors.update(_open_clip_tensors(text_encoder_2, "conditioner.embedders.1.model."))
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return path
