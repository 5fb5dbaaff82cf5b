"""Our block weights against the LoRA Block Weight extension's own rules, module by module.

The rules below are written down, as test data, from the extension's source and from the A1111
Lora loader whose module names it matches against; they are re-implemented here independently of
``charbuild.lora.blocks``:

* hako-mikan/sd-webui-lora-block-weight, ``scripts/lora_block_weight.py`` at b403cb7 (2025-06-19):
  ``BLOCKID26/17/12/20``, ``BLOCKS`` (substrings tried in order, **the last match wins**, entries 26
  and 27 count as BASE, no match: ratio 1), ``to26`` (a short list puts 0 in the blocks it does
  not name), ``hyphener`` and the elemental branch of ``ratiodealer`` (``BLOCKS:ELEMENTS:RATIO``
  entries split on commas/new lines, matched against ``key + block id``; the ratio replaces the
  weight), ``lbw`` (multiplies ``up`` by the ratio).
* AUTOMATIC1111 stable-diffusion-webui, ``extensions-builtin/Lora/networks.py``:
  ``convert_diffusers_name_to_compvis`` and ``load_network`` turn a kohya stem into the module key
  LBW sees (``lora_unet`` -> ``diffusion_model`` for SDXL, ``lora_te1_text_model`` ->
  ``0_transformer_text_model``, ``lora_te2_…`` -> ``1_model_transformer_resblocks_…``, SD1.5
  diffusers names -> ``input_blocks``/``middle_block``/``output_blocks``).
"""

from __future__ import annotations

import random
import re

import pytest

from charbuild.lora.blocks import resolve_block_weights
from charbuild.lora.keysets import modules_for
from charbuild.lora.merge import module_weight

BLOCKID26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
BLOCKIDS = {12: BLOCKID12, 17: BLOCKID17, 20: BLOCKID20, 26: BLOCKID26}
BLOCKS = (
    ["encoder"]
    + [f"diffusion_model_input_blocks_{i}_" for i in range(12)]
    + ["diffusion_model_middle_block_"]
    + [f"diffusion_model_output_blocks_{i}_" for i in range(12)]
    + ["embedders", "transformer_resblocks"]
)


def a1111_key(stem: str, arch: str) -> str:
    """The module key A1111's Lora loader gives a kohya stem (the name LBW matches)."""
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", stem)
    if m:
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    if arch == "sdxl":
        return stem.replace("lora_unet", "diffusion_model").replace("lora_te1_text_model", "0_transformer_text_model")
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{m[4]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{m[3]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{m[4]}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
    ]  # fmt: skip
    for rx, make in rules:
        m = re.match(rx, stem)
        if m:
            return make(m)
    raise AssertionError(f"no A1111 name for {stem}")


def to26(ratios: list[float]) -> list[float]:
    out = [0.0] * 26
    for block, r in zip(BLOCKIDS[len(ratios)], ratios):
        out[BLOCKID26.index(block)] = r
    return out


def hyphener(t: str) -> str:
    words = t.split(" ")
    for i, e in enumerate(words):
        if "-" in e:
            a, b = e.split("-")
            lo, hi = sorted((BLOCKID26.index(a), BLOCKID26.index(b)))
            words[i] = " ".join(BLOCKID26[lo : hi + 1])
    return " ".join(words)


def lbw_ratio(key: str, lwei: list[float], elemental: str = "") -> float:
    """LBW's ``ratiodealer`` (the SD branch) for one module key."""
    ratio, elemkey = 1.0, ""
    for i, block in enumerate(BLOCKS):
        if block in key:
            i = 0 if i in (26, 27) else i
            ratio, elemkey = lwei[i], BLOCKID26[i]
    skey = key + elemkey
    for d in elemental.replace("\n", ",").split(","):
        if d.count(":") != 2:
            continue
        dbs, dws, dr = hyphener(d.split(":")[0]).split(" "), d.split(":")[1].split(" "), d.split(":")[2]
        dbn, dbs = (True, dbs[1:]) if dbs[0] == "NOT" else (False, dbs)
        dwn, dws = (True, dws[1:]) if dws[0] == "NOT" else (False, dws)
        flag = dbn
        for db in dbs:
            if db in skey:
                flag = not dbn
        if not flag:
            continue
        flag = dwn
        for dw in dws:
            if dw in skey:
                flag = not dwn
        if flag:
            ratio = float(dr)
    return ratio


def every_module(arch: str) -> list[str]:
    stems = [m[0] for m in modules_for(arch, conv=True, te=True, extra=True)]
    assert len(stems) == len(set(stems))
    return stems


def _distinct(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(-1.5, 2.0), 3) + i * 1e-3 for i in range(n)]  # no two blocks alike


@pytest.mark.parametrize("arch,n", [("sdxl", 12), ("sdxl", 20), ("sd15", 17), ("sd15", 26), ("sdxl", 17), ("sdxl", 26)])
@pytest.mark.filterwarnings("ignore::charbuild.lora.blocks.SdxlListWarning")
def test_lists_equal_lbw_for_every_module(arch, n):
    """Every list length LBW takes, on every module, SD1.5 lists on SDXL included (LBW maps them by name)."""
    values = _distinct(n, n)
    ours = resolve_block_weights(",".join(map(str, values)), arch)
    lwei = to26(values) if n != 26 else values
    stems = every_module(arch)
    for stem in stems:
        assert module_weight(stem, arch, ours)[1] == pytest.approx(lbw_ratio(a1111_key(stem, arch), lwei)), stem
    te = [s for s in stems if s.startswith(("lora_te1_", "lora_te2_", "lora_te_"))]
    assert len(te) == (6 * (12 + 32) if arch == "sdxl" else 72)  # te1 and te2 both checked


def test_sdxl_twelve_values_leave_the_conv_only_blocks_at_zero():
    """A 12-value list names no IN00-IN03, IN06, OUT06-OUT08: LBW gives their conv modules 0."""
    w = resolve_block_weights([1.0] * 12, "sdxl")
    for stem in ("lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_output_blocks_7_0_out_layers_3", "lora_unet_input_blocks_0_0"):  # fmt: skip
        assert module_weight(stem, "sdxl", w)[1] == 0.0 == lbw_ratio(a1111_key(stem, "sdxl"), to26([1.0] * 12))
    for stem in ("lora_unet_out_2", "lora_unet_time_embed_0", "lora_unet_label_emb_0_0"):
        assert module_weight(stem, "sdxl", w) == (None, 1.0) and lbw_ratio(a1111_key(stem, "sdxl"), to26([0.0] * 12)) == 1


NAMED = [
    "IN04 IN05::0.5,OUT03-OUT05::0,M00::2",
    "IN05-OUT05::0.25\nOUT01::-1",
    "OUT08-IN07::0.5,IN08::1.5",  # a range given backwards, then one block overridden
    "BASE::0,IN00-IN08::0.7",
]


@pytest.mark.parametrize("spec", NAMED)
@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_named_blocks_equal_lbw_elementals(spec, arch):
    """LBW's ``lbwe=`` form with whole blocks, on its own (base ratios all 1), module by module."""
    if arch == "sd15" and "OUT08-IN07" in spec:
        spec = spec.replace("OUT08-IN07", "OUT11-IN07")
    ours = resolve_block_weights(spec, arch)
    for stem in every_module(arch):
        expected = lbw_ratio(a1111_key(stem, arch), [1.0] * 26, spec)
        assert module_weight(stem, arch, ours)[1] == pytest.approx(expected), (stem, spec)


def test_lbw_reads_a_space_after_the_comma_as_every_module():
    """Why a spaced elemental entry is refused: LBW gives it to every module, IN08 or not."""
    key = a1111_key("lora_unet_input_blocks_4_1_proj_in", "sdxl")
    assert lbw_ratio(key, [1.0] * 26, "IN08::1.5") == 1.0
    assert lbw_ratio(key, [1.0] * 26, "IN04::0, IN08::1.5") == 1.5


def test_named_short_form_equals_the_dict():
    spec = "IN04:0.5, OUT03-OUT05:0, mid:2"
    assert resolve_block_weights(spec, "sdxl") == resolve_block_weights(
        {"IN04": 0.5, "OUT03": 0, "OUT04": 0, "OUT05": 0, "M00": 2}, "sdxl"
    )


@pytest.mark.parametrize(
    "spec,message",
    [
        ("IN04:attn2:0", "per-element weights.*'attn2'.*IN04::0"),
        ("IN04::0.5, OUT03::0", "empty name, which LBW matches against every module"),
        ("IN04  IN05::0.5", "empty name"),
        ("NOT BASE::0", "NOT is not accepted"),
        ("IN10::1", "unknown block name for sdxl: IN10"),
        ("IN04-OUT99::1", "unknown block name.*OUT99"),
        ("IN04:x", "ratio: 'x' is not a number"),
        ("IN04:1:2:3", "expected BLOCKS:RATIO"),
    ],
)
def test_named_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_block_weights(spec, "sdxl")
