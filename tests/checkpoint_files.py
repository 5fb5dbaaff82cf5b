"""Header-only stand-ins for base-model files: the tensor names of a real checkpoint layout,
each tensor empty, so the configuration's architecture check reads them as it reads a 7 GB file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

#: One tensor name per component that :func:`checkpoint_kind` looks at, as the original layouts name them.
LAYOUT_KEYS = {
    "sd15": ["model.diffusion_model.input_blocks.0.0.weight",
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
             "first_stage_model.decoder.conv_in.weight"],
    "sdxl": ["model.diffusion_model.input_blocks.0.0.weight",
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight",
             "first_stage_model.decoder.conv_in.weight"],
    "sd2": ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"],
    "lora": ["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"],
}


def write_layout_checkpoint(path: Path, kind: str) -> Path:
    """A valid ``.safetensors`` file whose (empty) tensors are named as a ``kind`` checkpoint's."""
    header = {key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for key in LAYOUT_KEYS[kind]}
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def write_sized_checkpoint(path: Path, kind: str, data_bytes: int) -> Path:
    """A valid ``kind``-layout ``.safetensors`` carrying ``data_bytes`` random bytes (one U8 tensor
    beside the empty named ones): a base model of a given size, e.g. one that must travel."""
    import os

    header = {key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for key in LAYOUT_KEYS[kind]}
    header["model.diffusion_model.charbuild_test_payload"] = {"dtype": "U8", "shape": [data_bytes],
                                                             "data_offsets": [0, data_bytes]}
    raw = json.dumps(header).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + os.urandom(data_bytes))
    return path
