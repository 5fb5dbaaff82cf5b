"""The real CLIP tokenizer, built offline from the BPE vocabulary shipped with charbuild.

SD1.5's CLIP-L and SDXL's two text encoders (CLIP-L, OpenCLIP bigG) all use OpenAI CLIP's
49408-token byte-pair vocabulary. Hugging Face keeps it as ``vocab.json`` + ``merges.txt`` in
every model repository; charbuild ships the original compact form instead
(``tokenizer/bpe_simple_vocab_16e6.txt.gz``, 1.3 MB, MIT, see ``tokenizer/NOTICE.txt``; not a
dependency on open-clip-torch, which pulls torchvision) and derives the Hugging Face vocabulary
from it exactly as CLIP's ``SimpleTokenizer`` does: the 256 byte symbols, the same with
``</w>``, the first 48894 merges joined, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).with_name("tokenizer") / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48894


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """(token -> id, merge lines "a b") of CLIP's vocabulary, from the shipped BPE file."""
    from .tiny import bytes_to_unicode

    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(lines[1 : 1 + _MERGES])  # line 0 is the version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{BPE_FILE}: a CLIP vocabulary has {VOCAB_SIZE} tokens, this gives {len(vocab)}")
    return vocab, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A ``CLIPTokenizer`` with CLIP's vocabulary; no file or network access besides the BPE file.

    ``pad_token``: ``"<|endoftext|>"`` for CLIP-L (SD1.5, SDXL's first encoder), ``"!"`` (id 0)
    for SDXL's OpenCLIP bigG encoder, as sd-scripts sets ``pad_token_id = 0``.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, pad_token=pad_token, model_max_length=model_max_length)
