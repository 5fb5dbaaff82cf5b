"""Loading the base model: the tiny model, a local diffusers folder, or a single-file SD1.5.

Classes: diffusers' ``UNet2DConditionModel``, ``AutoencoderKL`` and ``DDPMScheduler``, and
transformers' ``CLIPTextModel`` + ``CLIPTokenizer``. They are well maintained, load every
SD1.5 checkpoint layout, and (the point for a LoRA trainer) use SD1.5's module names, so kohya's
LoRA key names follow directly from ``named_modules()`` with no conversion table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from charbuild.errors import TrainingError


class UnsupportedError(TrainingError):
    """A job the builtin trainer cannot run by design (exit code 2): use another backend."""

    exit_code = 2


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion 1.x model that training needs."""

    unet: object
    vae: object
    text_encoder: object
    tokenizer: object
    noise_scheduler: object
    name: str  # what ss_sd_model_name shows


def _load_diffusers_folder(folder: Path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer") if not (folder / sub).is_dir()]
    if missing:
        raise TrainingError(
            f"{folder} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/", path=folder
        )
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
    if (folder / "scheduler").is_dir():
        sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    else:
        from .tiny import SD15_SCHEDULER_CONFIG

        sched = DDPMScheduler(**SD15_SCHEDULER_CONFIG)
    return unet, vae, text_encoder, tokenizer, sched


def _hub_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_then_hub(load, what: str, path: Path, say):
    """``load(local_only=True)``; when that fails and ``HF_HUB_OFFLINE`` is not set, once more
    from the Hugging Face hub (diffusers fetches the config files it lacks; they are cached)."""
    try:
        return load(True)
    except Exception as local_error:  # diffusers raises many kinds here (OSError, ValueError, HF errors)
        error = local_error
    if not _hub_offline():
        say(f"charbuild: fetching the config files for {what} from the Hugging Face hub (once; then cached)")
        try:
            return load(False)
        except Exception as hub_error:
            error = hub_error
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise TrainingError(
        f"cannot load {what} ({first[:200]}); diffusers needs its config files (and for a model the "
        "tokenizer), from the Hugging Face cache or (with network access, HF_HUB_OFFLINE unset) from "
        "the hub. Offline: convert it to a diffusers folder on a machine with network access "
        "(from_single_file(...).save_pretrained(DIR)) and use DIR",
        path=path,
    ) from error


def _load_single_file(path: Path, say=print):
    """SD1.5 ``.safetensors``/``.ckpt`` through ``StableDiffusionPipeline.from_single_file``.

    diffusers needs SD1.5's config files and CLIP tokenizer besides the weights: from the
    Hugging Face cache if they are there, else fetched once (see :func:`_cache_then_hub`).
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    def load(local_only: bool):
        return StableDiffusionPipeline.from_single_file(
            str(path), local_files_only=local_only, safety_checker=None, requires_safety_checker=False
        )

    pipe = _cache_then_hub(load, "the single-file checkpoint", path, say)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, sched


def _load_vae(path: Path, say=print):
    from diffusers import AutoencoderKL

    if path.is_dir():
        sub = "vae" if (path / "vae").is_dir() else None
        try:
            return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"cannot load the VAE folder: {first[:300]}", path=path) from e
    return _cache_then_hub(
        lambda local_only: AutoencoderKL.from_single_file(str(path), config=None, local_files_only=local_only),
        "the VAE file", path, say,
    )  # fmt: skip


def quiet_libraries() -> None:
    """Keep diffusers/transformers to errors only and without their loading progress bars:
    the training log should show charbuild's lines and the step bar."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def load_base_model(model: dict, project_root: str | Path) -> BaseModel:
    """Load ``job["model"]``: base "tiny" (see :mod:`.tiny`), a diffusers folder or a single file.

    The models come back in float32 on the CPU, frozen (``requires_grad`` off).
    """
    quiet_libraries()
    arch = model.get("arch", "sd15")
    if arch != "sd15":
        raise UnsupportedError(f"the builtin trainer supports SD1.x only, not arch {arch!r}; use backend = 'sd-scripts'")
    base = model.get("base")
    if not base:
        raise TrainingError("no base model given (model.base)")
    if base == "tiny" or str(base).startswith("tiny:"):
        from .tiny import ensure_tiny_model

        seed = int(str(base).partition(":")[2] or 0)
        folder = ensure_tiny_model(Path(project_root), seed)
        parts = _load_diffusers_folder(folder)
        name = f"tiny-{seed}"
    else:
        path = Path(base)
        if not path.is_absolute():
            path = Path(project_root) / path
        if path.is_dir():
            parts = _load_diffusers_folder(path)
        elif path.is_file():
            if path.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".bin"):
                raise TrainingError("base model file must be .safetensors or .ckpt", path=path)
            parts = _load_single_file(path)
        else:
            raise TrainingError("base model not found", path=path)
        name = path.name
    unet, vae, text_encoder, tokenizer, sched = parts
    if model.get("vae"):
        vpath = Path(model["vae"])
        if not vpath.is_absolute():
            vpath = Path(project_root) / vpath
        if not vpath.exists():
            raise TrainingError("VAE not found", path=vpath)
        vae = _load_vae(vpath)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    return BaseModel(unet, vae, text_encoder, tokenizer, sched, name)
