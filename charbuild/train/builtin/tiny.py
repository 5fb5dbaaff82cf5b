"""A tiny, randomly initialised, SD1.5-shaped model for tests, CI and quick builds.

Why a tiny model: no model can be downloaded here, and a real SD1.5 takes 30 s to create and
~30 s per training step on a 2-core CPU. This one has *the same module names as SD1.5* (so a
LoRA trained on it has real kohya key names and shapes that differ only in width), trains a
step in well under a second at 512 px, and is generated deterministically from a seed, so two
machines (and two runs) get bit-identical weights for the same torch version.

Shape (compared with SD1.5):

- UNet: ``CrossAttnDownBlock2D`` ×3 + ``DownBlock2D``, ``UNetMidBlock2DCrossAttn``,
  ``UpBlock2D`` + ``CrossAttnUpBlock2D`` ×3, ``layers_per_block = 2`` (as SD1.5), channels
  (32, 64, 64, 64) instead of (320, 640, 1280, 1280), cross-attention dim 32 instead of 768,
  conv ``proj_in``/``proj_out`` (``use_linear_projection = False``, as SD1.5).
- VAE: five encoder/decoder blocks, so it downsamples **16x** (SD's downsamples 8x), with
  only 4-32 channels (4 at full resolution: encoding dominates the latent cache, 0.23 s per
  512 px image on one thread against 0.38 s with 8) and one layer per block; 4 latent
  channels, SD's scaling factor 0.18215.
  Why 16x: the UNet's cost is its self-attention at the first level, quadratic in the latent
  area. Measured on this 2-core CPU (one thread, batch 2, forward + backward of the bare UNet):
  a 64x64 latent (512 px at 8x) takes 2.3 s with one head and 6 s with four; a 32x32 latent
  (512 px at 16x) 0.24 s. Only 16x lets ~100 steps on 128-512 px images finish in well under
  two minutes. A 64 px image gives a 4x4 latent; diffusers' UNet handles sizes that are not
  multiples of 8.
- UNet attention: one head per block (SD1.5: 8), for the same reason.
- Text encoder: a 4-layer CLIP text transformer of width 32 (SD1.5: 12 layers of 768), so
  ``clip_skip`` 1..4 are meaningful; 77 positions.
- Tokenizer: a byte-level CLIP BPE built offline: the 256 byte symbols, the same with ``</w>``,
  ``<|startoftext|>`` and ``<|endoftext|>``; ``merges.txt`` holds only its version line, so
  every word is spelled byte by byte.
- Scheduler: SD1.5's DDPM (1000 steps, scaled-linear betas 0.00085..0.012, epsilon).

The folder is a ``StableDiffusionPipeline``-style diffusers folder (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``), written once to a
temporary folder and renamed into place, and reused afterwards.

``base = "tiny-sdxl"`` (:func:`ensure_tiny_sdxl_model`) is the same idea for SDXL: a
``StableDiffusionXLPipeline`` folder whose UNet has SDXL's block types and module names
(``DownBlock2D`` + ``CrossAttnDownBlock2D`` ×2, transformer depth 1/2/10 as SDXL, linear
``proj_in``/``proj_out``, ``addition_embed_type = "text_time"``) at channels (32, 64, 64)
instead of (320, 640, 1280); a CLIP-L-shaped ``CLIPTextModel`` (quick-GELU) and a bigG-shaped
``CLIPTextModelWithProjection`` (GELU, a projection to a pooled output of 32), 4 layers each, of
widths 32 and 48 (cross-attention width 32 + 48 = 80, as SDXL's 768 + 1280 = 2048); the tiny VAE with
SDXL's scaling factor 0.13025; both tokenizers byte-level as above (the second pads with
``!``, id 0, as SDXL's OpenCLIP tokenizer); SDXL's DDPM schedule (the same as SD1.5's).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from charbuild import layout

#: Bump when the generated model changes: old caches are then not reused.
TINY_MODEL_VERSION = 2
#: The same for the tiny SDXL model.
TINY_SDXL_MODEL_VERSION = 1

SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

_DONE_MARKER = "charbuild-tiny.json"


def tiny_model_dir(root: str | Path, seed: int = 0) -> Path:
    """Where the tiny model of ``seed`` is cached for the project at ``root``."""
    return Path(root) / layout.MODELS / f"tiny-{int(seed)}"


def tiny_sdxl_model_dir(root: str | Path, seed: int = 0) -> Path:
    """Where the tiny SDXL model of ``seed`` is cached for the project at ``root``."""
    return Path(root) / layout.MODELS / f"tiny-sdxl-{int(seed)}"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_vocab() -> dict[str, int]:
    """The tiny tokenizer's vocabulary: 256 byte symbols, the same with ``</w>``, two specials."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return vocab


def _write_tokenizer(folder: Path, pad_token: str | None = None) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw"
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False), encoding="utf-8")
    (raw / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    extra = {"pad_token": pad_token} if pad_token else {}
    tok = CLIPTokenizer(vocab=str(raw / "vocab.json"), merges=str(raw / "merges.txt"), model_max_length=77, **extra)
    tok.save_pretrained(folder)
    # keep the plain vocab/merges too: the slow-tokenizer format other tools read
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).exists():
            shutil.copy2(raw / name, folder / name)
    shutil.rmtree(raw)


def _tiny_vae(**arch):
    """The tiny 5-level VAE (8x downscale, 4 latent channels) of both demo models; ``arch``: the
    sample size and latent scaling of the architecture it stands in for."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5,
        block_out_channels=(4, 8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        **arch,
    )


def build_tiny_components(seed: int = 0):
    """Create (unet, vae, text_encoder) of the tiny model with weights drawn from ``seed``.

    Deterministic: the models are created one after the other on the CPU from one seeded
    global generator, in float32.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=2,
            cross_attention_dim=32,
            attention_head_dim=1,  # diffusers' misnomer: the number of heads (one of width 32/64)
            norm_num_groups=16,
            use_linear_projection=False,
        )
        vae = _tiny_vae(sample_size=512, scaling_factor=0.18215)
        te_config = CLIPTextConfig(
            vocab_size=514,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
        text_encoder = CLIPTextModel(te_config)
    finally:
        torch.random.set_rng_state(state)
    return unet, vae, text_encoder


def build_tiny_sdxl_components(seed: int = 0):
    """Create (unet, vae, text_encoder, text_encoder_2) of the tiny SDXL model from ``seed``.

    Deterministic like :func:`build_tiny_components`.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # the widths differ, as CLIP-L's 768 and bigG's 1280 do: diffusers' single-file loader tells the
    # two encoders apart by the width of their position embedding
    width1, width2, pooled, time_dim = 32, 48, 32, 8
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(seed))
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64),  # each level wider, as SDXL (else a shortcut conv is missing)
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),  # SDXL's depths
            cross_attention_dim=width1 + width2,
            attention_head_dim=(1, 1, 1),  # number of heads (diffusers' misnomer); SDXL: 5/10/20
            norm_num_groups=16,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=pooled + 6 * time_dim,  # SDXL: 1280 + 6·256
        )
        vae = _tiny_vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        common = dict(
            vocab_size=514, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
        )  # fmt: skip
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=width1, hidden_act="quick_gelu", projection_dim=width1, pad_token_id=513, **common)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=width2, hidden_act="gelu", projection_dim=pooled, pad_token_id=0, **common)
        )
    finally:
        torch.random.set_rng_state(state)
    return unet, vae, text_encoder, text_encoder_2


def _write_sd15(tmp: Path, seed: int) -> None:
    from diffusers import DDPMScheduler

    unet, vae, text_encoder = build_tiny_components(seed)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    _write_tokenizer(tmp / "tokenizer")
    DDPMScheduler(**SD15_SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
    _write_model_index(tmp, "StableDiffusionPipeline", {
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    })  # fmt: skip


def _write_sdxl(tmp: Path, seed: int) -> None:
    from diffusers import DDPMScheduler

    unet, vae, text_encoder, text_encoder_2 = build_tiny_sdxl_components(seed)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    text_encoder_2.save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
    _write_tokenizer(tmp / "tokenizer")
    _write_tokenizer(tmp / "tokenizer_2", pad_token="!")
    DDPMScheduler(**SD15_SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")
    _write_model_index(tmp, "StableDiffusionXLPipeline", {
        "force_zeros_for_empty_prompt": True,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    })  # fmt: skip


def _write_model_index(folder: Path, class_name: str, parts: dict) -> None:
    model_index = {
        "_class_name": class_name,
        "_diffusers_version": __import__("diffusers").__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        **parts,
    }
    text = json.dumps(dict(sorted(model_index.items())), indent=2) + "\n"
    (folder / "model_index.json").write_text(text, encoding="utf-8")


def ensure_tiny_model(root: str | Path, seed: int = 0) -> Path:
    """Return the diffusers folder of the tiny model for ``seed``, generating it once.

    ``root`` is the project root; the model lives in ``<root>/build/models/tiny-<seed>/``.
    Generation is deterministic, so a missing cache is simply rebuilt. Concurrent callers are
    safe: each builds in a private temporary folder and the first rename wins.
    """
    return _ensure(tiny_model_dir(root, seed), seed, TINY_MODEL_VERSION, _write_sd15)


def ensure_tiny_sdxl_model(root: str | Path, seed: int = 0) -> Path:
    """Return the diffusers folder of the tiny SDXL model for ``seed``, generating it once.

    It lives in ``<root>/build/models/tiny-sdxl-<seed>/``; otherwise as :func:`ensure_tiny_model`.
    """
    return _ensure(tiny_sdxl_model_dir(root, seed), seed, TINY_SDXL_MODEL_VERSION, _write_sdxl)


def _ensure(target: Path, seed: int, version: int, write) -> Path:
    """Build ``target`` with ``write(tmp_folder, seed)`` unless a finished one of ``version`` is there."""
    marker = target / _DONE_MARKER
    if marker.is_file() and not _stale(target, version):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp, int(seed))
        (tmp / _DONE_MARKER).write_text(json.dumps({"version": version, "seed": int(seed)}) + "\n", encoding="utf-8")
        if target.exists():
            if (target / _DONE_MARKER).is_file() and not _stale(target, version):
                shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first
                return target
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if (target / _DONE_MARKER).is_file():  # lost a race to a concurrent builder
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _stale(folder: Path, version: int) -> bool:
    try:
        return json.loads((folder / _DONE_MARKER).read_text(encoding="utf-8")).get("version") != version
    except (OSError, ValueError):
        return True
