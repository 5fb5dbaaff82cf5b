"""SDXL conditioning for the training loop: prompts through both text encoders, size/crop ids.

As sd-scripts' ``sdxl_train_network.py`` (``library/train_util.get_hidden_states_sdxl``,
``library/sdxl_train_util.get_size_embeddings``), for diffusers' ``UNet2DConditionModel``:

- each caption is tokenised by both tokenizers to 77 tokens (``<|startoftext|>`` … ``<|endoftext|>``,
  then padding: ``<|endoftext|>`` for CLIP-L, ``!`` (id 0) for OpenCLIP bigG);
- ``encoder_hidden_states`` = the penultimate layer's hidden states of CLIP-L (768) and of bigG
  (1280), concatenated on the feature axis (2048); SDXL has no clip skip;
- ``text_embeds`` (the pooled prompt) = bigG's final-layer-normed hidden state at the (last)
  ``<|endoftext|>`` token through its ``text_projection`` (sd-scripts' ``pool_workaround``:
  CLIP's own pooling takes the highest token id, which is wrong when a token was added);
- ``time_ids`` = (original height, width, crop top, left, target height, width) per image;
  the UNet embeds them itself (sinusoidal, 256 each on SDXL, the same embedding sd-scripts
  computes in ``get_size_embeddings``).

Long prompts (sd-scripts' ``--max_token_length`` 150/225) are not supported: captions are cut at
75 tokens, as sd-scripts does without that flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SDXLPromptEmbeds:
    """What the UNet needs from the captions: cross-attention states and the pooled prompt."""

    hidden_states: torch.Tensor  # (batch, 77, width1 + width2)
    pooled: torch.Tensor  # (batch, projection_dim of text encoder 2)


def tokenize_sdxl(captions: Sequence[str], tokenizer1, tokenizer2) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (batch, 77) of ``captions`` for each tokenizer, padded and cut to its length."""

    def ids(tokenizer) -> torch.Tensor:
        return tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    return ids(tokenizer1), ids(tokenizer2)


def pooled_at_eos(text_encoder2, last_hidden_state: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The projected hidden state at each row's first ``eos_token_id`` (index 0 when none)."""
    eos_index = torch.argmax((input_ids == eos_token_id).int(), dim=1).to(last_hidden_state.device)
    rows = torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device)
    pooled = last_hidden_state[rows, eos_index]
    projection = text_encoder2.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden_state.dtype)


def encode_sdxl_prompts(
    input_ids1: torch.Tensor,
    input_ids2: torch.Tensor,
    text_encoder1,
    text_encoder2,
    eos_token_id: int,
) -> SDXLPromptEmbeds:
    """Run both text encoders (gradients flow when their adapters train).

    ``eos_token_id``: tokenizer 2's ``<|endoftext|>`` id (49407 for the real vocabulary).
    """
    device1 = next(text_encoder1.parameters()).device
    device2 = next(text_encoder2.parameters()).device
    out1 = text_encoder1(input_ids1.to(device1), output_hidden_states=True, return_dict=True)
    out2 = text_encoder2(input_ids2.to(device2), output_hidden_states=True, return_dict=True)
    hidden1 = out1.hidden_states[-2]  # penultimate layer (index 11 of 13 on CLIP-L)
    hidden2 = out2.hidden_states[-2]
    pooled = pooled_at_eos(text_encoder2, out2.last_hidden_state, input_ids2, eos_token_id)
    hidden = torch.cat([hidden1, hidden2.to(hidden1.device, hidden1.dtype)], dim=2)
    return SDXLPromptEmbeds(hidden, pooled.to(hidden.device))


def sdxl_time_ids(
    original_sizes_hw: Sequence[tuple[int, int]],
    crop_top_lefts: Sequence[tuple[int, int]],
    target_sizes_hw: Sequence[tuple[int, int]],
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """The UNet's ``time_ids`` (batch, 6): original (h, w), crop (top, left), target (h, w).

    For bucketed training (sd-scripts' default): the original size is the picture's size
    before resizing, the crop is where the bucket's crop of the resized picture starts, and
    the target is the bucket size.
    """
    n = len(original_sizes_hw)
    if not (len(crop_top_lefts) == len(target_sizes_hw) == n):
        raise ValueError("sdxl_time_ids: one original size, crop and target size per image")
    rows = [[*map(float, o), *map(float, c), *map(float, t)] for o, c, t in zip(original_sizes_hw, crop_top_lefts, target_sizes_hw)]
    return torch.tensor(rows, dtype=dtype, device=device).reshape(n, 6)


def sdxl_added_cond_kwargs(embeds: SDXLPromptEmbeds, time_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``added_cond_kwargs`` for diffusers' SDXL UNet call (``text_time`` conditioning).

    The size/crop ids stay float32 whatever the pooled prompt's dtype: bf16 would round them
    (1365 -> 1368); sd-scripts embeds them in fp32 too.
    """
    return {"text_embeds": embeds.pooled, "time_ids": time_ids.to(embeds.pooled.device, torch.float32)}


def size_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """sd-scripts' sinusoidal embedding of each of (batch, k) values: (batch, k·dim), cos first.

    diffusers' SDXL UNet computes the same from ``time_ids`` (``Timesteps(dim,
    flip_sin_to_cos=True, downscale_freq_shift=0)``); this is here to test that equality.
    """
    import math

    b, k = values.shape
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(values.device)
    args = values.flatten()[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.reshape(b, k * dim)
