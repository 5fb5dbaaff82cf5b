"""Bake block weights into a LoRA file, exactly as the LBW extension applies them at run time.

For a module of block b with weight w, only the factor the extension scales is multiplied by
w: ``lora_up`` (LoRA/LoCon), ``hada_w1_a`` (LoHa), ``lokr_w1`` or ``lokr_w1_a`` (LoKr). The
change is linear in w, so fractional and negative weights behave as at inference time (unlike
merge tools that scale up *and* down, giving w²). Down factors, alpha and rank stay as they
are; modules at weight 0 are dropped; block-less modules (conv_out, time embedding) stay ×1.

Metadata: everything is kept (the name keys ``ss_output_name`` / ``modelspec.title`` too, unless
``output_name`` sets both); ``charbuild.merge_weights`` records the weights applied (JSON,
block -> value), ``charbuild.merge_note`` an optional note, and ``modelspec.trigger_phrase``
the keywords when given. ``save_lora`` refreshes the sshs hashes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

from charbuild.errors import LoraFileError
from charbuild.lora.blocks import all_blocks, block_of, resolve_block_weights
from charbuild.lora.io import LoraFile, LoraModule, load_lora, save_lora
from charbuild.lora.provenance import with_output_name


def scaled_factor(module: LoraModule) -> str:
    """The suffix of the one factor LBW multiplies by the block weight."""
    if module.kind == "lora":
        return "lora_up.weight"
    if module.kind == "loha":
        return "hada_w1_a"
    return "lokr_w1" if "lokr_w1" in module.params else "lokr_w1_a"


def module_weight(stem: str, arch: str, weights: Mapping[str, float]) -> tuple[str | None, float]:
    """``(block, weight)`` of a stem; block-less modules and blocks missing from ``weights`` get 1.0."""
    block = block_of(stem, arch)
    if block is None:
        return None, 1.0
    return block, float(weights.get(block, 1.0))


def merge_lora(lora: LoraFile, weights: Mapping[str, float]) -> LoraFile:
    """Return a new LoraFile with block ``weights`` ({block: w}) baked in. Pure: ``lora`` is untouched.

    Weights are multiplied in float32 and stored back in each factor's dtype.
    """
    unknown = sorted(set(weights) - set(all_blocks(lora.arch)))
    if unknown:
        raise ValueError(f"unknown block name(s) for {lora.arch}: {', '.join(unknown)}")
    tensors = dict(lora.tensors)
    modules: dict[str, LoraModule] = {}
    for stem, module in lora.modules.items():
        _, w = module_weight(stem, lora.arch, weights)
        if w == 0.0:
            for key in [k for k in tensors if k.split(".", 1)[0] == stem]:
                del tensors[key]
            continue
        if w != 1.0:
            suffix = scaled_factor(module)
            t = module.params[suffix]
            scaled = (t.float() * w).to(t.dtype)
            tensors[f"{stem}.{suffix}"] = scaled
            module = replace(module, params={**module.params, suffix: scaled})
        modules[stem] = module
    if not modules:
        raise LoraFileError("every module has block weight 0: the merged LoRA would be empty", lora.path)
    metadata = dict(lora.metadata)
    metadata["charbuild.merge_weights"] = json.dumps({b: float(weights.get(b, 1.0)) for b in all_blocks(lora.arch)})
    return LoraFile(tensors=tensors, metadata=metadata, format=lora.format, arch=lora.arch, modules=modules, path=lora.path)


def merge_file(
    src: str | Path,
    dst: str | Path,
    weights: Mapping[str, float] | Sequence[float] | str,
    *,
    keywords: Sequence[str] | None = None,
    note: str | None = None,
    presets: Mapping[str, Sequence[float]] | None = None,
    output_name: str | None = None,
) -> dict:
    """Read ``src``, bake in ``weights``, write ``dst`` atomically; return a report.

    ``weights`` is a {block: w} dict or any spec :func:`resolve_block_weights` accepts (preset
    name, list, comma string), resolved for the file's arch (an SDXL file's FACE/BODY are their
    SDXL forms, :func:`charbuild.lora.blocks.arch_presets`). ``output_name`` sets
    ``ss_output_name`` and ``modelspec.title`` (kept as ``src`` has them otherwise). Nothing is
    written on error.
    """
    lora = load_lora(src)
    try:
        with_output_name({}, output_name)
        resolved = resolve_block_weights(weights, lora.arch, presets)
    except ValueError as exc:
        raise LoraFileError(str(exc), src) from None
    merged = merge_lora(lora, resolved)
    if keywords:
        merged.metadata["modelspec.trigger_phrase"] = ", ".join(keywords)
    if note:
        merged.metadata["charbuild.merge_note"] = note
    written = save_lora(dst, merged.tensors, with_output_name(merged.metadata, output_name))
    per_block: dict[str, dict[str, float]] = {}
    blockless: list[str] = []
    for stem in lora.modules:
        block, w = module_weight(stem, lora.arch, resolved)
        if block is None:
            blockless.append(stem)
            continue
        entry = per_block.setdefault(block, {"weight": w, "modules": 0})
        entry["modules"] += 1
    return {
        "src": str(src),
        "dst": str(dst),
        "arch": lora.arch,
        "format": lora.format,
        "weights": resolved,
        "modules_in": len(lora.modules),
        "modules_out": len(merged.modules),
        "modules_dropped": len(lora.modules) - len(merged.modules),
        "per_block": per_block,
        "blockless": blockless,
        "sshs_model_hash": written["sshs_model_hash"],
    }

