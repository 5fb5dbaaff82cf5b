"""``base = "demo"``: a small pretrained SD1.5-architecture model that can draw, shipped with charbuild.

Why: no real model can be downloaded here, in CI or on a newcomer's first run, and the
randomly initialised ``tiny`` model draws noise, so nothing would show that a LoRA learns its
character. The demo model was pretrained by ``scripts/pretrain_demo.py`` (deterministic from
a seed, about 40 minutes on a 2-core CPU) on procedurally drawn characters in the style of the
example project (``scripts/demo_looks.py``), with the example characters' own looks held out;
see ``docs/demo-model.md``.

Architecture: diffusers' ``UNet2DConditionModel`` with SD1.5's block types, layer counts and
module names (so a LoRA on it has kohya's SD1.5 key names and 17 blocks), channels
(32, 64, 96, 96) and cross-attention width 64; an ``AutoencoderKL`` of three levels
(downsampling 4x: 64 px pictures, 16x16 latents); a 4-layer CLIP text transformer of width 64
with 128 positions; SD1.5's DDPM schedule (epsilon prediction). Its native size is 64 px
(``vae.config.sample_size``), the size it was pretrained at.

Tokenizer: CLIP's BPE format (``vocab.json`` + ``merges.txt``, read by transformers'
``CLIPTokenizer``), trained on the project's tag language so each known word is one token
(:func:`train_bpe`): the 512 byte symbols stay in the vocabulary, so any other word (a new
keyword such as ``krnk``) is spelled in byte pieces, distinct for distinct words. A whole
caption (about 60 tokens with its commas) fits the 128-token window.

Files (package data, ``demo_model/``): ``demo.safetensors`` (every weight in fp16, names
prefixed ``unet.``, ``vae.``, ``text_encoder.``), ``model.json`` (the three model configs, the
tokenizer's window, the SHA-256 of the weights and how they were trained), ``vocab.json``,
``merges.txt``. The weights are checked against the SHA-256 on every load: a corrupt or
replaced file is a clear :class:`~charbuild.errors.TrainingError`, never a silently wrong model.
Nothing is read from the network.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from charbuild.errors import TrainingError

DEMO_DIR = Path(__file__).with_name("demo_model")
WEIGHTS_FILE = "demo.safetensors"
MANIFEST_FILE = "model.json"
#: The tokenizer's window (positions of the text encoder).
DEMO_MAX_LENGTH = 128
#: The size the model was pretrained at.
DEMO_SIZE = 64
PARTS = ("unet", "vae", "text_encoder")


def unet_config() -> dict:
    """The demo UNet: SD1.5's block layout at small widths."""
    return dict(
        sample_size=DEMO_SIZE // 4, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 96, 96), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=2, norm_num_groups=16, use_linear_projection=False,
    )  # fmt: skip


def vae_config(scaling_factor: float = 0.18215) -> dict:
    """The demo VAE: three levels (4x downsampling), 4 latent channels."""
    return dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=DEMO_SIZE, scaling_factor=scaling_factor,
    )  # fmt: skip


def text_config(vocab_size: int) -> dict:
    """The demo text encoder: a 4-layer CLIP text transformer of width 64 (clip_skip 1..4 meaningful)."""
    return dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=DEMO_MAX_LENGTH, hidden_act="quick_gelu", projection_dim=64,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )  # fmt: skip


# --- tokenizer --------------------------------------------------------------------------------


def _word_symbols(word: str) -> tuple[str, ...]:
    from .tiny import bytes_to_unicode

    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def train_bpe(words: dict[str, int]) -> list[tuple[str, str]]:
    """Byte-pair merges (in rank order) that make every word of ``words`` (word -> count) one token.

    Deterministic: the most frequent adjacent pair is merged first, ties broken by the pair's
    spelling. Words are what CLIP's pre-tokenizer yields (lower-case letter runs).
    """
    pieces = {w: _word_symbols(w) for w in sorted(words)}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for w, syms in pieces.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += words[w]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in pieces.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            pieces[w] = tuple(out)


def bpe_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout for ``merges``: bytes, bytes + ``</w>``, the merges, then the two specials."""
    from .tiny import byte_level_vocab

    tokens = [t for t, _ in sorted(byte_level_vocab().items(), key=lambda kv: kv[1]) if not t.startswith("<|")]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_files(folder: Path, merges: list[tuple[str, str]]) -> int:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``; the vocabulary size."""
    vocab = bpe_vocab(merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return len(vocab)


def load_tokenizer(folder: Path = DEMO_DIR):
    """The demo model's ``CLIPTokenizer`` (window :data:`DEMO_MAX_LENGTH`)."""
    from transformers import CLIPTokenizer

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=DEMO_MAX_LENGTH)


# --- the shipped model ------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(folder: Path = DEMO_DIR) -> dict:
    """``model.json`` of the demo model (torch-free): configs, hash, training record."""
    path = folder / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(
            "the demo model is not installed (no model.json): reinstall charbuild, or regenerate it with "
            "python scripts/pretrain_demo.py", path=path) from None  # fmt: skip
    except (OSError, ValueError) as e:
        raise TrainingError(f"the demo model's manifest is unreadable ({e}): reinstall charbuild", path=path) from e


def demo_identity(folder: Path = DEMO_DIR) -> str:
    """The demo weights' SHA-256 as the manifest states it (what training signatures record)."""
    return str(read_manifest(folder).get("sha256", ""))


def verify_weights(folder: Path = DEMO_DIR) -> Path:
    """The weights file, after checking its SHA-256 against ``model.json``; a TrainingError if it differs."""
    manifest = read_manifest(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise TrainingError("the demo model's weights are missing: reinstall charbuild (or run "
                            "python scripts/pretrain_demo.py)", path=path)
    found = sha256_of(path)
    if found != manifest.get("sha256"):
        raise TrainingError(
            f"the demo model's weights are corrupt or replaced (SHA-256 {found[:12]}…, expected "
            f"{str(manifest.get('sha256'))[:12]}…): reinstall charbuild, or regenerate both files with "
            "python scripts/pretrain_demo.py", path=path)  # fmt: skip
    return path


def build_components(manifest: dict):
    """(unet, vae, text_encoder) of ``manifest``'s configs, randomly initialised, float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**manifest["unet"])
    vae = AutoencoderKL(**manifest["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**manifest["text_encoder"]))
    return unet, vae, text_encoder


def split_state(state: dict) -> dict[str, dict]:
    """``{"unet.x": t, ...}`` -> ``{"unet": {"x": t}, ...}``."""
    out: dict[str, dict] = {p: {} for p in PARTS}
    for key, tensor in state.items():
        part, _, name = key.partition(".")
        if part not in out:
            raise TrainingError(f"unexpected tensor {key!r} in the demo weights")
        out[part][name] = tensor
    return out


def load_demo_parts(folder: Path = DEMO_DIR) -> tuple:
    """(unet, vae, text_encoder, tokenizer, name) of the demo model (float32, CPU), hash-checked,
    offline; :func:`.models.load_base_model` makes its ``BaseModel`` (SD1.5's DDPM schedule)."""
    import torch
    from safetensors.torch import load_file

    path = verify_weights(folder)
    manifest = read_manifest(folder)
    unet, vae, text_encoder = build_components(manifest)
    parts = split_state(load_file(str(path)))
    for name, module in zip(PARTS, (unet, vae, text_encoder)):
        state = {k: v.to(torch.float32) for k, v in parts[name].items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise TrainingError(f"the demo weights do not fit the model ({name}: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}): reinstall charbuild", path=path)
    return unet, vae, text_encoder, load_tokenizer(folder), f"demo-{manifest['sha256'][:8]}"
