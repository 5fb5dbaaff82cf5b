"""diffusers' SDXL UNet module paths -> the original (SGM) paths that kohya's SDXL LoRA keys use.

sd-scripts trains SDXL on its own ``SdxlUNet2DConditionModel`` (``library/sdxl_original_unet.py``),
whose module tree is the original Stability one, so ``sdxl_train_network.py`` writes
``lora_unet_input_blocks_4_1_…`` where diffusers says ``down_blocks.1.attentions.0``. We train
diffusers' ``UNet2DConditionModel`` and name each adapter by the SGM path of its module:

===============================================  =========================================
diffusers                                        SGM (sd-scripts)
===============================================  =========================================
``conv_in``                                      ``input_blocks.0.0``
``time_embedding.linear_{1,2}``                  ``time_embed.{0,2}``
``add_embedding.linear_{1,2}``                   ``label_emb.0.{0,2}``
``down_blocks.i.resnets.j``                      ``input_blocks.(3i+j+1).0``
``down_blocks.i.attentions.j``                   ``input_blocks.(3i+j+1).1``
``down_blocks.i.downsamplers.0.conv``            ``input_blocks.(3i+3).0.op``
``mid_block.resnets.0`` / ``attentions.0`` /     ``middle_block.0`` / ``.1`` / ``.2``
``resnets.1``
``up_blocks.i.resnets.j``                        ``output_blocks.(3i+j).0``
``up_blocks.i.attentions.j``                     ``output_blocks.(3i+j).1``
``up_blocks.i.upsamplers.0.conv``                ``output_blocks.(3i+2).{1|2}.conv`` (2 when
                                                 the block has attentions)
``conv_norm_out`` / ``conv_out``                 ``out.0`` / ``out.2``
inside a resnet: ``norm1``, ``conv1``,           ``in_layers.0``, ``in_layers.2``,
``time_emb_proj``, ``norm2``, ``conv2``,         ``emb_layers.1``, ``out_layers.0``,
``conv_shortcut``                                ``out_layers.3``, ``skip_connection``
===============================================  =========================================

Inside a transformer (``proj_in``, ``transformer_blocks.d.attn1.to_q``, ``ff.net.0.proj`` …) the
names are the same in both. The table is the one of sd-scripts' ``library/sdxl_model_util.py``
(``convert_diffusers_unet_state_dict_to_sdxl``), written as a function of the path.
"""

from __future__ import annotations

import re

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _resnet_rest(rest: str | None) -> str | None:
    if not rest:
        return rest
    head, _, tail = rest.partition(".")
    mapped = _RESNET_PARTS.get(head, head)
    return f"{mapped}.{tail}" if tail else mapped


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def sdxl_unet_module_name(name: str, up_block_has_attentions: tuple[bool, ...] = (True, True, False)) -> str:
    """The SGM module path of diffusers SDXL UNet module ``name`` (``""`` stays ``""``).

    ``up_block_has_attentions[i]`` says whether ``up_blocks.i`` has attentions (SDXL: the first
    two), which decides where its upsampler sits in the original ``output_blocks`` list.
    A path the table does not know raises ``ValueError``.
    """
    if name in ("", "down_blocks", "up_blocks", "mid_block"):
        return {"down_blocks": "input_blocks", "up_blocks": "output_blocks", "mid_block": "middle_block"}.get(name, "")
    for top, sgm in _TOP.items():
        if name == top or name.startswith(top + "."):
            return sgm + name[len(top) :]
    m = _BLOCK.match(name)
    if m:
        kind, i, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if part == "downsamplers":
                if rest and (rest == "conv" or rest.startswith("conv.")):
                    rest = "op" + rest[len("conv") :]  # diffusers' Downsample2D.conv is the original "op"
                return _join(f"input_blocks.{3 * i + 3}.0", rest)
            slot = 0 if part == "resnets" else 1
            rest = _resnet_rest(rest) if part == "resnets" else rest
            return _join(f"input_blocks.{3 * i + j + 1}.{slot}", rest)
        if part == "upsamplers":
            slot = 2 if i < len(up_block_has_attentions) and up_block_has_attentions[i] else 1
            return _join(f"output_blocks.{3 * i + 2}.{slot}", rest)
        slot = 0 if part == "resnets" else 1
        rest = _resnet_rest(rest) if part == "resnets" else rest
        return _join(f"output_blocks.{3 * i + j}.{slot}", rest)
    m = _MID.match(name)
    if m:
        part, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = 1 if part == "attentions" else (0 if j == 0 else 2)
        rest = _resnet_rest(rest) if part == "resnets" else rest
        return _join(f"middle_block.{index}", rest)
    raise ValueError(f"no SGM name for SDXL UNet module {name!r}")


def up_block_attentions(unet) -> tuple[bool, ...]:
    """Which of ``unet.up_blocks`` have attentions (the input of :func:`sdxl_unet_module_name`)."""
    return tuple(bool(getattr(block, "attentions", None)) for block in unet.up_blocks)
