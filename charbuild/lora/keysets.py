"""The real module sets of SD1.5 and SDXL LoRAs: kohya stems with their layer shapes.

``sd15_modules()`` / ``sdxl_modules()`` list ``(stem, out, in, kernel)`` for every module a
kohya LoRA adapts (kernel 0 = Linear, 1 = 1x1 conv, 3 = 3x3 conv). ``conv=True`` adds the
"conv_dim" (Lora3x3 / C3Lier) modules: resnet convolutions, shortcuts, time-embedding
projections, down/up-samplers. ``extra=True`` adds what LyCORIS's ``full`` preset also adapts
(conv_in, conv_out, the time embedding; the last two belong to no block).
"""

from __future__ import annotations

from functools import lru_cache

Module = tuple[str, int, int, int]  # stem, out, in, kernel (0 = Linear)


def _transformer(prefix: str, c: int, ctx: int, depth: int, proj_kernel: int) -> list[Module]:
    out: list[Module] = [(f"{prefix}_proj_in", c, c, proj_kernel), (f"{prefix}_proj_out", c, c, proj_kernel)]
    for d in range(depth):
        tb = f"{prefix}_transformer_blocks_{d}"
        for attn, kv_in in (("attn1", c), ("attn2", ctx)):
            out += [
                (f"{tb}_{attn}_to_q", c, c, 0),
                (f"{tb}_{attn}_to_k", c, kv_in, 0),
                (f"{tb}_{attn}_to_v", c, kv_in, 0),
                (f"{tb}_{attn}_to_out_0", c, c, 0),
            ]
        out += [(f"{tb}_ff_net_0_proj", 8 * c, c, 0), (f"{tb}_ff_net_2", c, 4 * c, 0)]
    return out


def _clip(prefix: str, width: int, mlp: int, layers: int) -> list[Module]:
    out: list[Module] = []
    for i in range(layers):
        p = f"{prefix}_text_model_encoder_layers_{i}"
        out += [(f"{p}_self_attn_{x}_proj", width, width, 0) for x in ("q", "k", "v", "out")]
        out += [(f"{p}_mlp_fc1", mlp, width, 0), (f"{p}_mlp_fc2", width, mlp, 0)]
    return out


@lru_cache(maxsize=None)
def sd15_modules(conv: bool = True, te: bool = True, extra: bool = False) -> tuple[Module, ...]:
    """Every module of an SD1.5 kohya LoRA (diffusers UNet names), in a stable order."""
    chans = [320, 640, 1280, 1280]
    ctx = 768
    mods: list[Module] = []

    def resnet(p: str, cin: int, cout: int) -> None:
        if conv:
            mods.extend([(f"{p}_conv1", cout, cin, 3), (f"{p}_conv2", cout, cout, 3), (f"{p}_time_emb_proj", cout, 1280, 0)])
            if cin != cout:
                mods.append((f"{p}_conv_shortcut", cout, cin, 1))

    cin = 320
    for i, c in enumerate(chans):
        for j in range(2):
            resnet(f"lora_unet_down_blocks_{i}_resnets_{j}", cin if j == 0 else c, c)
            if i < 3:
                mods.extend(_transformer(f"lora_unet_down_blocks_{i}_attentions_{j}", c, ctx, 1, 1))
        if i < 3 and conv:
            mods.append((f"lora_unet_down_blocks_{i}_downsamplers_0_conv", c, c, 3))
        cin = c
    resnet("lora_unet_mid_block_resnets_0", 1280, 1280)
    mods.extend(_transformer("lora_unet_mid_block_attentions_0", 1280, ctx, 1, 1))
    resnet("lora_unet_mid_block_resnets_1", 1280, 1280)
    rev = chans[::-1]
    prev = 1280
    for i, c in enumerate(rev):
        skip_in = rev[min(i + 1, 3)]
        for j in range(3):
            res_in = prev if j == 0 else c
            skip = skip_in if j == 2 else c
            resnet(f"lora_unet_up_blocks_{i}_resnets_{j}", res_in + skip, c)
            if i > 0:
                mods.extend(_transformer(f"lora_unet_up_blocks_{i}_attentions_{j}", c, ctx, 1, 1))
        if i < 3 and conv:
            mods.append((f"lora_unet_up_blocks_{i}_upsamplers_0_conv", c, c, 3))
        prev = c
    if extra:
        mods += [
            ("lora_unet_conv_in", 320, 4, 3),
            ("lora_unet_conv_out", 4, 320, 3),
            ("lora_unet_time_embedding_linear_1", 1280, 320, 0),
            ("lora_unet_time_embedding_linear_2", 1280, 1280, 0),
        ]
    if te:
        mods.extend(_clip("lora_te", 768, 3072, 12))
    return tuple(mods)


@lru_cache(maxsize=None)
def sdxl_modules(conv: bool = True, te: bool = True, extra: bool = False) -> tuple[Module, ...]:
    """Every module of an SDXL kohya LoRA (original SGM UNet names, two text encoders)."""
    ctx = 2048
    mods: list[Module] = []

    def res(p: str, cin: int, cout: int) -> None:
        if conv:
            mods.extend([(f"{p}_in_layers_2", cout, cin, 3), (f"{p}_emb_layers_1", cout, 1280, 0), (f"{p}_out_layers_3", cout, cout, 3)])
            if cin != cout:
                mods.append((f"{p}_skip_connection", cout, cin, 1))

    # input blocks: (index, in, out, transformer depth) ; op = downsample
    layout = [(1, 320, 320, 0), (2, 320, 320, 0), (4, 320, 640, 2), (5, 640, 640, 2), (7, 640, 1280, 10), (8, 1280, 1280, 10)]
    for i, cin, cout, depth in layout:
        res(f"lora_unet_input_blocks_{i}_0", cin, cout)
        if depth:
            mods.extend(_transformer(f"lora_unet_input_blocks_{i}_1", cout, ctx, depth, 0))
    if conv:
        mods += [("lora_unet_input_blocks_3_0_op", 320, 320, 3), ("lora_unet_input_blocks_6_0_op", 640, 640, 3)]
    res("lora_unet_middle_block_0", 1280, 1280)
    mods.extend(_transformer("lora_unet_middle_block_1", 1280, ctx, 10, 0))
    res("lora_unet_middle_block_2", 1280, 1280)
    out_layout = [
        (0, 2560, 1280, 10), (1, 2560, 1280, 10), (2, 1920, 1280, 10),
        (3, 1920, 640, 2), (4, 1280, 640, 2), (5, 960, 640, 2),
        (6, 960, 320, 0), (7, 640, 320, 0), (8, 640, 320, 0),
    ]  # fmt: skip
    for i, cin, cout, depth in out_layout:
        res(f"lora_unet_output_blocks_{i}_0", cin, cout)
        if depth:
            mods.extend(_transformer(f"lora_unet_output_blocks_{i}_1", cout, ctx, depth, 0))
    if conv:
        mods += [("lora_unet_output_blocks_2_2_conv", 1280, 1280, 3), ("lora_unet_output_blocks_5_2_conv", 640, 640, 3)]
    if extra:
        mods += [
            ("lora_unet_input_blocks_0_0", 320, 4, 3),
            ("lora_unet_out_2", 4, 320, 3),
            ("lora_unet_time_embed_0", 1280, 320, 0),
            ("lora_unet_time_embed_2", 1280, 1280, 0),
            ("lora_unet_label_emb_0_0", 1280, 2816, 0),
            ("lora_unet_label_emb_0_2", 1280, 1280, 0),
        ]
    if te:
        mods.extend(_clip("lora_te1", 768, 3072, 12))
        mods.extend(_clip("lora_te2", 1280, 5120, 32))
    return tuple(mods)


def modules_for(arch: str, **kw: bool) -> tuple[Module, ...]:
    """``sd15_modules`` or ``sdxl_modules`` by ``arch``."""
    return sd15_modules(**kw) if arch == "sd15" else sdxl_modules(**kw)


@lru_cache(maxsize=None)
def layer_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Stem -> the adapted layer's weight shape ((out, in) or (out, in, k, k)), for all known stems."""
    out: dict[str, tuple[int, ...]] = {}
    for stem, o, i, k in modules_for(arch, conv=True, te=True, extra=True):
        out[stem] = (o, i) if k == 0 else (o, i, k, k)
    return out
