"""Loading the base model: a tiny model, a local diffusers folder, or a single-file checkpoint.

Classes: diffusers' ``UNet2DConditionModel``, ``AutoencoderKL`` and ``DDPMScheduler``, and
transformers' ``CLIPTextModel`` (+ ``CLIPTextModelWithProjection`` for SDXL's second encoder)
and ``CLIPTokenizer``. They load every SD1.5 and SDXL checkpoint layout and use SD1.5's module
names, so kohya's SD1.5 LoRA key names follow from ``named_modules()``; SDXL's follow through
the table in :mod:`.sdxl_names`.

Everything loads with no network access: a single-file checkpoint (SD1.x or SDXL, the
architecture read from its tensor names, :mod:`.checkpoint`) is converted by diffusers'
``from_single_file`` with the model configs shipped in ``configs/<arch>/`` and the CLIP
tokenizer built from the shipped BPE vocabulary (:mod:`.clip_tokenizer`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from charbuild.errors import TrainingError
from charbuild.fsutil import under_root

from .checkpoint import (
    SUPPORTED_ARCHS,
    CheckpointError,
    check_keys_arch,
    prediction_hints,
    read_checkpoint_keys,
    read_safetensors_header,
    uniform_half_dtype,
)

#: The model configs charbuild ships, one diffusers-style folder per architecture.
CONFIGS_DIR = Path(__file__).with_name("configs")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class UnsupportedError(TrainingError):
    """A job the builtin trainer cannot run by design (exit code 2): use another backend."""

    exit_code = 2


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion model that training needs (SDXL: two text encoders)."""

    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    noise_scheduler: object
    name: str  # what ss_sd_model_name shows
    arch: str = "sd15"  # "sd15" | "sdxl"
    text_encoder_2: object = None  # SDXL's OpenCLIP bigG (CLIPTextModelWithProjection)
    tokenizer_2: object = None  # SDXL's second tokenizer (pads with "!", id 0)
    zero_terminal_snr: bool = False  # the checkpoint says it was trained so (NoobAI v-pred's "ztsnr")


def shipped_config_dir(arch: str) -> Path:
    """The folder of model configs (``model_index.json``, ``unet/config.json`` …) for ``arch``."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"no shipped model config for arch {arch!r}")
    return CONFIGS_DIR / arch


def folder_arch(folder: Path) -> str:
    """"sdxl" for a diffusers folder with a second text encoder (or an SDXL model_index), else "sd15"."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if "XL" in str(index.get("_class_name", "")) or (folder / "text_encoder_2").is_dir():
        return "sdxl"
    return "sd15"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


def _load_diffusers_folder(folder: Path, arch: str | None = None) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    found = folder_arch(folder)
    if arch is not None and arch != found:
        raise CheckpointError(
            f"this is an {'SDXL' if found == 'sdxl' else 'SD1.x'} diffusers folder but the configuration says "
            f"arch = {arch!r}: set arch = {found!r} (or leave arch out)", path=folder,
        )  # fmt: skip
    subs = ("unet", "vae", "text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if found == "sdxl" else ())
    missing = [sub for sub in subs if not (folder / sub).is_dir()]
    if missing:
        raise TrainingError(
            f"{folder} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/", path=folder
        )
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        extra = {}
        if found == "sdxl":
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", local_files_only=True
            )
            extra["tokenizer_2"] = _bigg_padding(
                CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True)
            )
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot load the diffusers folder: {_first_line(e)}", path=folder) from e
    if (folder / "scheduler").is_dir():
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    else:
        from .tiny import SD15_SCHEDULER_CONFIG

        sched = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    return BaseModel(unet, vae, text_encoder, tokenizer, sched, folder.name, found, **extra)


def _bigg_padding(tokenizer):
    # sd-scripts pads SDXL's second prompt with id 0 ("!"), as OpenCLIP does, whatever the folder says
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def load_single_file(path: Path, arch: str | None = None, config_dir: Path | None = None) -> BaseModel:
    """An SD1.x or SDXL ``.safetensors``/``.ckpt`` checkpoint, with no network access.

    ``arch``: what the configuration says (None: read from the file's tensor names); a file of
    another architecture is a :class:`~.checkpoint.CheckpointError` naming it. A file with the
    ``v_pred`` marker gets a v-prediction scheduler, one with ``ztsnr`` ``zero_terminal_snr``
    set (the training loop rescales the betas, :func:`.loss.apply_zero_terminal_snr`). ``config_dir``:
    a diffusers-style folder of configs (and tokenizers) to convert with instead of the shipped
    ``configs/<arch>/`` (tests use a tiny model's folder). A file stored in one half dtype loads
    in that dtype (:func:`~.checkpoint.uniform_half_dtype`), anything else in float32.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from .clip_tokenizer import clip_tokenizer

    keys = read_checkpoint_keys(path)
    found = check_keys_arch(path, keys, arch)
    hints = prediction_hints(keys)
    folder = Path(config_dir) if config_dir is not None else shipped_config_dir(found)
    kwargs = {}
    if not (folder / "tokenizer").is_dir():
        kwargs["tokenizer"] = clip_tokenizer()
    if found == "sdxl":
        if not (folder / "tokenizer_2").is_dir():
            kwargs["tokenizer_2"] = clip_tokenizer(pad_token="!")
        pipeline_class = StableDiffusionXLPipeline
    else:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipeline_class = StableDiffusionPipeline
    if path.suffix.lower() == ".safetensors":
        half = uniform_half_dtype(read_safetensors_header(path))
        if half is not None:  # the trainer widens each part to its training dtype (the same values)
            import torch

            kwargs["torch_dtype"] = getattr(torch, half)
    try:
        pipe = pipeline_class.from_single_file(str(path), config=str(folder), local_files_only=True, **kwargs)
    except Exception as e:  # diffusers raises many kinds here (OSError, ValueError, KeyError, HF errors)
        raise CheckpointError(
            f"cannot load the {'SDXL' if found == 'sdxl' else 'SD1.x'} checkpoint ({_first_line(e)}); "
            "is the file complete (its size as published)?", path=path,
        ) from e  # fmt: skip
    verify_text_encoders_loaded(path, found, pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    overrides = {"prediction_type": hints["prediction_type"]} if hints["prediction_type"] else {}
    sched = DDPMScheduler.from_config(pipe.scheduler.config, **overrides)
    extra = {"zero_terminal_snr": bool(hints["zero_terminal_snr"])}
    if found == "sdxl":
        extra.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=_bigg_padding(pipe.tokenizer_2))
    return BaseModel(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, sched, path.name, found, **extra)


def _text_encoder_probes(arch: str, text_encoder, text_encoder_2) -> list[tuple[str, object]]:
    """(checkpoint key, the loaded tensor it must equal): the first and last layers of each encoder."""
    import torch

    def layers(te):
        return (te.text_model if hasattr(te, "text_model") else te).encoder.layers

    def embedding(te):
        return (te.text_model if hasattr(te, "text_model") else te).embeddings.token_embedding.weight

    first_prefix = "conditioner.embedders.0.transformer.text_model." if arch == "sdxl" else "cond_stage_model.transformer.text_model."
    last = len(layers(text_encoder)) - 1
    probes = [
        (first_prefix + "embeddings.token_embedding.weight", embedding(text_encoder)),
        (first_prefix + f"encoder.layers.{last}.mlp.fc2.weight", layers(text_encoder)[last].mlp.fc2.weight),
    ]
    if text_encoder_2 is not None:
        g = "conditioner.embedders.1.model."
        last2 = len(layers(text_encoder_2)) - 1
        qkv = torch.cat([getattr(layers(text_encoder_2)[last2].self_attn, f"{x}_proj").weight for x in "qkv"])
        probes += [
            (g + "token_embedding.weight", embedding(text_encoder_2)),
            (g + f"transformer.resblocks.{last2}.attn.in_proj_weight", qkv),
            (g + "text_projection", text_encoder_2.text_projection.weight.T),
        ]
    return probes


def verify_text_encoders_loaded(path: Path, arch: str, text_encoder, text_encoder_2=None) -> None:
    """Fail unless the text encoders hold the checkpoint's weights (spot checks, ``.safetensors`` only).

    Why: without ``accelerate`` diffusers loads a converted text encoder with
    ``load_state_dict(strict=False)``, so a layout its converter does not know would leave the
    encoder at its random initialisation without a word.
    """
    if Path(path).suffix.lower() != ".safetensors":
        return
    from safetensors import safe_open

    probes = _text_encoder_probes(arch, text_encoder, text_encoder_2)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        for key, loaded in probes:
            if key not in names:
                continue  # another key layout; the converter handled it or failed loudly
            stored = f.get_tensor(key)
            if tuple(stored.shape) != tuple(loaded.shape) or not bool((stored.float() == loaded.detach().float()).all()):
                raise CheckpointError(
                    f"the text encoder was not loaded from this checkpoint ({key} differs); "
                    "is it an unusual layout? convert it to a diffusers folder and use that", path=path,
                )  # fmt: skip


def _load_vae(path: Path, arch: str = "sd15"):
    from diffusers import AutoencoderKL

    if path.is_dir():
        sub = "vae" if (path / "vae").is_dir() else None
        try:
            return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
        except Exception as e:
            raise TrainingError(f"cannot load the VAE folder: {_first_line(e)}", path=path) from e
    try:
        return AutoencoderKL.from_single_file(
            str(path), config=str(shipped_config_dir(arch)), subfolder="vae", local_files_only=True
        )
    except Exception as e:
        raise TrainingError(f"cannot load the VAE file ({_first_line(e)})", path=path) from e


def quiet_libraries() -> None:
    """Keep diffusers/transformers to errors only and without their loading progress bars:
    the training log should show charbuild's lines and the step bar."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def parse_tiny_base(base: str) -> tuple[str, int] | None:
    """("sd15" | "sdxl", seed) for ``tiny``, ``tiny:N``, ``tiny-sdxl``, ``tiny-sdxl:N``; else None."""
    name, _, seed = str(base).partition(":")
    if name not in ("tiny", "tiny-sdxl"):
        return None
    try:
        return ("sdxl" if name == "tiny-sdxl" else "sd15"), int(seed or 0)
    except ValueError:
        raise TrainingError(f"model.base {base!r}: the seed after ':' must be a whole number") from None


def load_base_model(model: dict, project_root: str | Path, supported_archs: tuple[str, ...] = ("sd15",)) -> BaseModel:
    """Load ``job["model"]``: base "demo" (:mod:`.demo`), "tiny" / "tiny-sdxl" (:mod:`.tiny`), a diffusers folder or a
    single-file checkpoint; ``model["arch"]`` (None or absent: taken from the model) must match it.

    ``supported_archs``: what the calling training loop can train; another architecture is an
    :class:`UnsupportedError` (exit code 2). The models come back on the CPU, frozen
    (``requires_grad`` off), in float32 or, from a single file stored in one half dtype, in that
    dtype: the caller moves each part to its device and dtype.
    """
    quiet_libraries()
    arch = model.get("arch")
    if arch is not None and arch not in SUPPORTED_ARCHS:
        raise UnsupportedError(f"the builtin trainer supports SD1.x and SDXL, not arch {arch!r}; use backend = 'sd-scripts'")
    if arch is not None and arch not in supported_archs:
        raise UnsupportedError(f"the builtin trainer cannot train arch {arch!r} yet; use backend = 'sd-scripts'")
    base = model.get("base")
    if not base:
        raise TrainingError("no base model given (model.base)")
    tiny = parse_tiny_base(str(base))
    if str(base) == "demo":
        from diffusers import DDPMScheduler

        from .demo import load_demo_parts
        from .tiny import SD15_SCHEDULER_CONFIG

        if arch not in (None, "sd15"):
            raise TrainingError(f"model.base 'demo' is an SD1.5 model but arch is {arch!r}")
        unet, vae, text_encoder, tokenizer, name = load_demo_parts()
        loaded = BaseModel(unet, vae, text_encoder, tokenizer, DDPMScheduler(**SD15_SCHEDULER_CONFIG), name, "sd15")
    elif tiny is not None:
        from .tiny import ensure_tiny_model, ensure_tiny_sdxl_model

        tiny_arch, seed = tiny
        if arch is not None and arch != tiny_arch:
            raise TrainingError(f"model.base {base!r} is {'an SDXL' if tiny_arch == 'sdxl' else 'an SD1.5'} model but arch is {arch!r}")
        ensure = ensure_tiny_sdxl_model if tiny_arch == "sdxl" else ensure_tiny_model
        loaded = _load_diffusers_folder(ensure(Path(project_root), seed), tiny_arch)
        loaded.name = f"tiny-sdxl-{seed}" if tiny_arch == "sdxl" else f"tiny-{seed}"
    else:
        path = under_root(project_root, base)
        if path.is_dir():
            loaded = _load_diffusers_folder(path, arch)
        elif path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise TrainingError("base model file must be .safetensors or .ckpt", path=path)
            loaded = load_single_file(path, arch)
        else:
            raise TrainingError("base model not found", path=path)
    if loaded.arch not in supported_archs:
        raise UnsupportedError(
            f"the base model is {loaded.arch.upper()}, which the builtin trainer cannot train yet; use backend = 'sd-scripts'"
        )
    if model.get("vae"):
        vpath = under_root(project_root, model["vae"])
        if not vpath.exists():
            raise TrainingError("VAE not found", path=vpath)
        loaded.vae = _load_vae(vpath, loaded.arch)
    for m in (loaded.unet, loaded.vae, loaded.text_encoder, loaded.text_encoder_2):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return loaded
