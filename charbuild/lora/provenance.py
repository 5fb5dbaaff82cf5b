"""What a derived LoRA file says about its name and its inputs (pure rules, one file read).

The name: ``ss_output_name`` and ``modelspec.title`` are the alias the web UIs show and what
``<lora:NAME:1>`` prompts refer to (A1111 takes its alias from ``ss_output_name``), so merge and
compress keep them and any tool may set both at once (:func:`with_output_name`).

A combination's history (:func:`combine_metadata`): each input with its file name, its model hash
(sha256 of the safetensors data part, which A1111 and sd-scripts show as ``sshs_model_hash``),
its ratio and its own merge/resize/combine record; at the top level only what every input
agrees on, never one input's history.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

NAME_KEYS = ("ss_output_name", "modelspec.title")

# Keys that describe one file's own making: never carried from an input to a combination.
_PER_FILE = (
    "sshs_model_hash", "sshs_legacy_hash", "ss_network_module", "ss_network_dim", "ss_network_alpha",
    "ss_network_args", "ss_output_name", "ss_training_comment", "modelspec.title", "modelspec.merged_from",
    "modelspec.hash_sha256", "modelspec.date", "modelspec.description",
)  # fmt: skip
_PER_FILE_PREFIXES = ("charbuild.",)


def with_output_name(metadata: Mapping[str, str], name: str | None) -> dict[str, str]:
    """``metadata`` with both name keys set to ``name`` (unchanged when ``name`` is None)."""
    out = dict(metadata)
    if name is not None:
        name = str(name).strip()
        if not name:
            raise ValueError("output_name must not be empty")
        for key in NAME_KEYS:
            out[key] = name
    return out


def model_hash(path: str | Path) -> str:
    """sha256 of a safetensors file's data part (the header skipped), read in chunks; of the
    whole file for other formats."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix.lower() == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def input_record(
    name: str, digest: str, ratio: float, metadata: Mapping[str, str], *, block_weights: Mapping[str, float] | None = None
) -> dict:
    """One input of a combination: file, hash, ratio (and the block weights applied to it in the
    combination), and the history its own metadata carries."""
    record: dict = {"file": name, "sshs_model_hash": digest, "ratio": float(ratio)}
    if block_weights is not None:
        record["block_weights"] = {b: float(w) for b, w in block_weights.items()}
    title = metadata.get("ss_output_name") or metadata.get("modelspec.title")
    if title:
        record["output_name"] = title
    if comment := metadata.get("ss_training_comment"):
        record["training_comment"] = comment  # holds resize_lora.py's "Dynamic resize …; " prefix
    for key, field, as_json in (
        ("charbuild.merge_weights", "merge_weights", True),
        ("charbuild.merge_note", "merge_note", False),
        ("charbuild.converted_from", "converted_from", False),
        ("charbuild.combine_inputs", "combine_inputs", True),
    ):
        if key in metadata:
            record[field] = _json_or_text(metadata[key]) if as_json else metadata[key]
    return record


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def shared_metadata(metadatas: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The keys every input carries with the same value, less each file's own making."""
    if not metadatas:
        return {}
    first, rest = metadatas[0], metadatas[1:]
    return {
        k: v
        for k, v in first.items()
        if k not in _PER_FILE and not k.startswith(_PER_FILE_PREFIXES) and all(m.get(k) == v for m in rest)
    }


# What sd-scripts' merge scripts write for a LoRA of each arch when the inputs do not agree on it.
_ARCH_DEFAULTS = {
    "sd15": {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"},
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
}


def combine_metadata(
    records: Sequence[dict], metadatas: Sequence[Mapping[str, str]], *, mode: str, dim: str, output_name: str,
    arch: str | None = None,
) -> dict[str, str]:  # fmt: skip
    """The header of a combination of inputs described by ``records`` (see :func:`input_record`);
    ``arch`` fills in the base-model keys the inputs do not agree on."""
    meta = {**_ARCH_DEFAULTS.get(arch or "", {}), **shared_metadata(metadatas)}
    meta["ss_network_module"] = "networks.lora"
    meta["ss_network_dim"] = meta["ss_network_alpha"] = dim
    names = [r["file"] for r in records]
    meta["modelspec.merged_from"] = ", ".join(names)
    meta["ss_training_comment"] = f"charbuild combine ({mode}) of " + ", ".join(
        f"{r['file']} x{r['ratio']:g}" for r in records
    )
    meta["charbuild.combine"] = json.dumps([[r["file"], r["ratio"]] for r in records])
    meta["charbuild.combine_inputs"] = json.dumps(records, ensure_ascii=False)
    return with_output_name(meta, output_name)
