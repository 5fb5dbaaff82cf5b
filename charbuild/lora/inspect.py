"""What a LoRA file holds: format, arch, modules per block, ranks, alphas, metadata, trigger words."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from charbuild.lora.blocks import all_blocks, block_of
from charbuild.lora.io import load_lora

KEY_METADATA = (
    "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
    "ss_output_name", "ss_training_comment", "ss_num_epochs", "ss_steps", "sshs_model_hash", "sshs_legacy_hash",
    "modelspec.architecture", "modelspec.title", "modelspec.trigger_phrase", "modelspec.usage_hint",
    "modelspec.description", "modelspec.date", "modelspec.merged_from",
    "charbuild.merge_weights", "charbuild.merge_note", "charbuild.combine", "charbuild.converted_from",
)  # fmt: skip

BLOCKLESS_NOTE = "always ×1 (belongs to no block; block weights do not apply)"


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 6)


def inspect_lora(path: str | Path) -> dict:
    """Describe the LoRA at ``path`` as a JSON-ready dict (validates it like :func:`load_lora`)."""
    lora = load_lora(path)
    blocks: dict[str, dict] = {}
    blockless: list[dict] = []
    ranks: Counter[int] = Counter()
    alphas: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for stem, m in lora.modules.items():
        alpha = m.alpha if m.alpha is not None else m.rank
        ranks[m.rank] += 1
        alphas[str(_num(alpha))] += 1
        kinds[("conv " if m.conv else "linear ") + m.kind + (" tucker" if m.tucker else "")] += 1
        block = block_of(stem, lora.arch)
        if block is None:
            blockless.append({"stem": stem, "rank": m.rank, "alpha": _num(alpha), "note": BLOCKLESS_NOTE})
            continue
        b = blocks.setdefault(block, {"modules": 0, "ranks": set(), "alphas": set()})
        b["modules"] += 1
        b["ranks"].add(m.rank)
        b["alphas"].add(_num(alpha))
    ordered = {
        b: {"modules": blocks[b]["modules"], "ranks": sorted(blocks[b]["ranks"]), "alphas": sorted(blocks[b]["alphas"])}
        for b in all_blocks(lora.arch)
        if b in blocks
    }
    meta = lora.metadata
    triggers = [w.strip() for w in meta.get("modelspec.trigger_phrase", "").split(",") if w.strip()]
    top_tags: list[list] = []
    try:
        freq = json.loads(meta.get("ss_tag_frequency", "{}") or "{}")
        total: Counter[str] = Counter()
        for tags in freq.values():
            total.update({t.strip(): int(n) for t, n in tags.items()})
        top_tags = [[t, n] for t, n in total.most_common(10)]
    except (ValueError, AttributeError, TypeError):
        top_tags = []
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in lora.tensors.values())
    return {
        "path": str(path),
        "file_size": Path(path).stat().st_size,
        "format": lora.format,
        "arch": lora.arch,
        "modules": len(lora.modules),
        "kinds": dict(sorted(kinds.items())),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": dict(sorted(alphas.items())),
        "dtypes": dict(dtypes),
        "blocks": ordered,
        "blockless": blockless,
        "metadata": {k: meta[k] for k in KEY_METADATA if k in meta},
        "trigger_words": triggers,
        "top_tags": top_tags,
    }


def format_inspection(info: dict) -> str:
    """Human-readable text for an :func:`inspect_lora` dict."""
    size = info["file_size"]
    lines = [
        f"{info['path']}",
        f"  format {info['format']}, arch {info['arch']}, {info['modules']} modules, {size / 1e6:.1f} MB",
        "  kinds:  " + ", ".join(f"{k} ×{n}" for k, n in info["kinds"].items()),
        "  ranks:  " + ", ".join(f"{k} ×{n}" for k, n in info["ranks"].items()),
        "  alphas: " + ", ".join(f"{k} ×{n}" for k, n in info["alphas"].items()),
        "  dtypes: " + ", ".join(f"{k} ×{n}" for k, n in info["dtypes"].items()),
        "  blocks:",
    ]
    for block, b in info["blocks"].items():
        ranks = "/".join(map(str, b["ranks"]))
        alphas = "/".join(map(str, b["alphas"]))
        lines.append(f"    {block:6} {b['modules']:4} modules  rank {ranks}  alpha {alphas}")
    for m in info["blockless"]:
        lines.append(f"    {'-':6} {m['stem']}  rank {m['rank']}  alpha {m['alpha']}: {m['note']}")
    if info["trigger_words"]:
        lines.append("  trigger words: " + ", ".join(info["trigger_words"]))
    if info["top_tags"]:
        lines.append("  top tags: " + ", ".join(f"{t} ({n})" for t, n in info["top_tags"]))
    if info["metadata"]:
        lines.append("  metadata:")
        for k, v in info["metadata"].items():
            v = v if len(v) <= 100 else v[:97] + "..."
            lines.append(f"    {k}: {v}")
    return "\n".join(lines)
