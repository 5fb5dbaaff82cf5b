"""The builtin trainer's decisions that need no torch: a job's :class:`Setup`, its loss options,
the network spec and the optimizer, and the notes about settings the builtin ignores.

Step 1 of :mod:`charbuild.train.builtin.trainer` (``resolve_setup``); pure data and checks,
torch only inside the functions that build torch objects.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charbuild.errors import TrainingError

from ..hardware import cpu_cores
from ..job import TrainJob, adafactor_relative_step, optimizer_kwargs, scheduler_in_effect
from .models import UnsupportedError
from .network import NetworkSpec

#: sd-scripts' default --learning_rate, used when a job gives none to an optimizer that needs one.
SD_SCRIPTS_DEFAULT_LR = 2e-6
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


def note(msg: str) -> None:
    """One informational line on stdout (the runner captures it into train.log)."""
    print(f"[builtin] {msg}", flush=True)


def _timestamp() -> float:
    """Now, or ``SOURCE_DATE_EPOCH`` when set (reproducible files)."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde and sde.strip().isdigit():
        return float(sde)
    return time.time()


@dataclass(frozen=True)
class Setup:
    """What a training will do, decided from the job alone (no torch, no files read)."""

    job: TrainJob
    root: Path
    output: Path
    steps: int
    seed: int
    clip_skip: int | None
    network: NetworkSpec
    network_module: str
    network_args: dict[str, str]
    unet_only: bool
    gradient_checkpointing: bool
    mixed_precision: str  # no | fp16 | bf16 (on a CPU the weights stay float32)
    save_dtype: str  # torch dtype name of the saved tensors
    optimizer: str  # adamw | adamw8bit | adafactor (AdamW8bit needs bitsandbytes on CUDA, else AdamW)
    optimizer_kwargs: dict[str, Any]
    lr: float | None
    text_encoder_lr: float | None
    scheduler: str  # the schedule in effect: "adafactor" when Adafactor's relative step drives it
    dataset_overrides: dict[str, int] = field(default_factory=dict)
    continue_from: Path | None = None
    noise_offset: float = 0.0  # 0: off
    min_snr_gamma: float | None = None  # None: off
    v_prediction: bool = False  # the model predicts v (also when the model's scheduler says so)
    zero_terminal_snr: bool = False  # rescale the betas (also when the checkpoint says "ztsnr")
    cache_text_encoder_outputs: bool = False  # UNet-only: encode every caption before the loop
    no_half_vae: bool | None = None  # keep the VAE in fp32 under fp16/bf16 (None: the arch's default; vae_dtype_for)


def resolve_setup(job: TrainJob) -> Setup:
    """The :class:`Setup` of ``job``; UnsupportedError (exit code 2) for what this trainer cannot do."""
    params = job.params
    if params.steps < 1:
        raise TrainingError("steps must be at least 1")
    spec, module, net_args = network_spec(params.to_dict())
    mp = params.mixed_precision.lower()
    if mp not in MIXED_PRECISIONS:
        raise UnsupportedError(f"mixed_precision {mp!r} is not one of fp16, bf16, no")
    save_dtype = SAVE_PRECISIONS.get(params.save_precision.lower())
    if save_dtype is None:
        raise UnsupportedError(f"save_precision {params.save_precision!r} is not one of fp16, bf16, float")
    optimizer = params.optimizer.lower()
    if optimizer not in OPTIMIZERS:
        raise UnsupportedError(f"optimizer {params.optimizer!r} is not supported by the builtin trainer")
    kwargs = optimizer_kwargs(params.optimizer_args)
    if optimizer == "adafactor":
        kwargs["relative_step"] = adafactor_relative_step(params.optimizer_args)
    overrides = {}
    if params.resolution:
        overrides["resolution"] = int(params.resolution)
    for key in ("min_bucket_reso", "max_bucket_reso"):
        if getattr(params, key):
            overrides[key] = int(getattr(params, key))
    if params.cache_text_encoder_outputs and not params.network_train_unet_only:
        # sd-scripts refuses it too: cached outputs cannot train the text encoders' adapters
        raise TrainingError("cache_text_encoder_outputs needs network_train_unet_only = true "
                            "(the text encoders cannot train on cached outputs)")
    if params.noise_offset and params.noise_offset < 0:
        raise TrainingError(f"noise_offset must be 0 (off) or more, not {params.noise_offset}")
    if params.min_snr_gamma is not None and params.min_snr_gamma <= 0:
        raise TrainingError(f"min_snr_gamma must be more than 0 (or left out), not {params.min_snr_gamma}")
    return Setup(
        job=job,
        root=Path(job.project_root).resolve(),
        output=Path(job.output),
        steps=params.steps,
        seed=params.seed,
        clip_skip=int(params.clip_skip) if params.clip_skip else None,
        network=spec,
        network_module=module,
        network_args=net_args,
        unet_only=params.network_train_unet_only,
        gradient_checkpointing=params.gradient_checkpointing,
        mixed_precision=mp,
        save_dtype=save_dtype,
        optimizer=optimizer,
        optimizer_kwargs=kwargs,
        lr=params.lr,
        text_encoder_lr=params.text_encoder_lr,
        scheduler=scheduler_in_effect(params.optimizer, params.optimizer_args, params.scheduler),
        dataset_overrides=overrides,
        continue_from=Path(job.continue_from) if job.continue_from else None,
        noise_offset=float(params.noise_offset or 0.0),
        min_snr_gamma=float(params.min_snr_gamma) if params.min_snr_gamma is not None else None,
        v_prediction=bool(params.v_prediction),
        zero_terminal_snr=bool(params.zero_terminal_snr),
        cache_text_encoder_outputs=bool(params.cache_text_encoder_outputs),
        no_half_vae=params.no_half_vae,
    )


@dataclass(frozen=True)
class LossSetup:
    """How the loss is formed, decided once the model is loaded (its scheduler and markers count)."""

    prediction_type: str  # epsilon | v_prediction
    zero_terminal_snr: bool
    min_snr_gamma: float | None
    noise_offset: float

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"


def resolve_loss(setup: Setup, model_prediction_type: str, model_zero_terminal_snr: bool) -> LossSetup:
    """The :class:`LossSetup` of a training: the job's options, or what the model says it is
    (a v-prediction scheduler, NoobAI's ``ztsnr`` marker); TrainingError for a mix that cannot
    train (min-SNR-γ on epsilon with zero terminal SNR divides 0 by 0 at the last timestep)."""
    prediction = "v_prediction" if setup.v_prediction or model_prediction_type == "v_prediction" else "epsilon"
    ztsnr = setup.zero_terminal_snr or model_zero_terminal_snr
    if ztsnr and setup.min_snr_gamma is not None and prediction == "epsilon":
        raise TrainingError("min_snr_gamma with zero_terminal_snr needs v_prediction: the last timestep's SNR is 0, "
                            "so its epsilon weight min(SNR, γ)/SNR is 0/0")
    return LossSetup(prediction, ztsnr, setup.min_snr_gamma, setup.noise_offset)


def vae_dtype_for(arch: str, mixed_precision_on_gpu: bool, vae_given: bool, no_half_vae: bool | None) -> str:
    """The dtype the VAE encodes the (cached) latents in: "float32" or "half" (the weight dtype).

    Latents are encoded once, so fp32 costs memory only while they are cached. SD1.x: always
    fp32 (as the builtin has always done). SDXL: its VAE overflows in fp16, so fp32 unless a
    separate VAE is given (``[model] vae``, meant for a fixed fp16 VAE such as
    sdxl-vae-fp16-fix) and ``no_half_vae = false`` is set: the default (None) is the safe fp32,
    as for sd-scripts (:func:`~charbuild.train.variants.no_half_vae_in_effect`).
    """
    from ..variants import no_half_vae_in_effect

    if not mixed_precision_on_gpu or arch != "sdxl" or not vae_given or no_half_vae_in_effect(no_half_vae, arch):
        return "float32"
    return "half"


def network_spec(params: dict):
    """The :class:`~.network.NetworkSpec` and the ss_network_* metadata of the job's params."""
    network = params.get("network") or "Lora1x1"
    algo = (params.get("algo") or "").lower() or None
    if network == "Loha":
        algo = "loha"
    if algo not in (None, "lora", "locon", "loha"):
        raise UnsupportedError(f"LyCORIS algo {algo!r} is not supported by the builtin trainer; use backend = 'sd-scripts'")
    dim = int(params["dim"])
    alpha = float(params["alpha"]) if params.get("alpha") is not None else float(dim)
    conv_dim = params.get("conv_dim")
    conv_alpha = params.get("conv_alpha")
    if conv_dim is not None:
        conv_dim = int(conv_dim)
        conv_alpha = float(conv_alpha) if conv_alpha is not None else float(conv_dim)
    spec = NetworkSpec("loha" if algo == "loha" else "lora", dim, alpha, conv_dim, conv_alpha)
    module = params.get("network_module") or ("lycoris.kohya" if algo else "networks.lora")
    net_args = {}
    if conv_dim is not None:
        net_args["conv_dim"] = str(params.get("conv_dim"))
        net_args["conv_alpha"] = str(params.get("conv_alpha") if params.get("conv_alpha") is not None else conv_dim)
    if algo:
        net_args["algo"] = algo
    return spec, module, net_args


def make_optimizer(setup: Setup, network, is_cuda: bool):
    """(optimizer, lr scheduler or None, description) as sd-scripts sets them up."""
    import torch

    name, kwargs = setup.optimizer, dict(setup.optimizer_kwargs)
    lr, te_lr = setup.lr, setup.text_encoder_lr
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        if kwargs["relative_step"]:
            if lr is not None or te_lr is not None:
                note("adafactor with relative_step: learning rates are ignored (as sd-scripts)")
            groups = network.param_groups(None, None)
            opt = Adafactor(groups, lr=None, **kwargs)
            return opt, AdafactorSchedule(opt, initial_lr=lr or 0.0), f"Adafactor({kwargs})"
        lr = lr if lr is not None else SD_SCRIPTS_DEFAULT_LR
        groups = network.param_groups(lr, te_lr if te_lr is not None else lr)
        opt = Adafactor(groups, lr=lr, **kwargs)
    else:
        if lr is None:
            lr = SD_SCRIPTS_DEFAULT_LR
            note(f"no learning rate given: using sd-scripts' default {lr}")
        groups = network.param_groups(lr, te_lr if te_lr is not None else lr)
        opt = None
        if name == "adamw8bit":
            if is_cuda:
                try:
                    import bitsandbytes as bnb
                except ImportError:  # sd-scripts stops too: 32-bit states would cost +0.9 GiB (SD1.5), +2.9 GiB (SDXL)
                    raise UnsupportedError("optimizer AdamW8bit needs bitsandbytes on a GPU: pip install 'charbuild[gpu]' "
                                           "(or set optimizer = \"AdamW\" for 32-bit AdamW)") from None
                opt = bnb.optim.AdamW8bit(groups, lr=lr, **kwargs)
            else:
                note("AdamW8bit needs bitsandbytes on CUDA: using torch AdamW (32-bit states) on the CPU")
        if opt is None:
            opt = torch.optim.AdamW(groups, lr=lr, **kwargs)
    from diffusers.optimization import get_scheduler

    try:
        sched = get_scheduler(setup.scheduler, opt, num_warmup_steps=0, num_training_steps=setup.steps, num_cycles=1)
    except (ValueError, KeyError) as e:
        raise UnsupportedError(f"lr scheduler {setup.scheduler!r}: {e}") from e
    return opt, sched, f"{type(opt).__name__}({kwargs})"


def choose_cpu_threads() -> int:
    """Threads for CPU training: ``CHARBUILD_TORCH_THREADS`` or ``OMP_NUM_THREADS`` if set, else
    the cores not already busy (cores − 1-minute load average, at least 1).

    Why: torch's OpenMP threads spin-wait; on a machine whose cores are taken by other jobs
    (a parallel build), two threads on two busy cores ran a tiny-model step 5-10x slower
    than one thread.
    """
    for var in ("CHARBUILD_TORCH_THREADS", "OMP_NUM_THREADS"):
        v = os.environ.get(var, "").strip()
        if v.isdigit() and int(v) > 0:
            return int(v)
    ncpu = cpu_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (OSError, AttributeError):
        busy = 0
    return max(1, min(ncpu, ncpu - busy))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def torch_compile_requested(job: TrainJob) -> bool:
    """``[trainer.extra] torch_compile`` (a bool; UnsupportedError for anything else)."""
    value = job.trainer.extra.get("torch_compile", False)
    if not isinstance(value, bool):
        raise UnsupportedError(f"[trainer.extra] torch_compile must be true or false, not {value!r}")
    return value


def ignored_settings_notes(job: TrainJob) -> list[str]:
    """What the builtin trainer does not use of the job's settings, one note each."""
    from ..variants import DEFAULT_DATA_LOADER_WORKERS

    notes = []
    if job.trainer.xformers:
        notes.append("xformers = true is ignored: the builtin trainer uses PyTorch's scaled-dot-product attention "
                     "(as sd-scripts' --sdpa)")
    if job.params.data_loader_workers != DEFAULT_DATA_LOADER_WORKERS:
        notes.append(f"data_loader_workers = {job.params.data_loader_workers} is ignored: the builtin trainer "
                     "keeps the cached latents in memory and has no data loader")
    return notes


@dataclass
class Prepared:
    """Everything the loop needs, in memory."""

    device: Any
    weight_dtype: Any
    model_name: str
    dataset: Any
    latents: dict
    unet: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    network: Any
    optimizer: Any
    lr_scheduler: Any
    optimizer_desc: str
    prior_steps: int | None = None  # steps already in the file it continues from
    arch: str = "sd15"  # what the loaded model is: "sd15" | "sdxl"
    text_encoder_2: Any = None  # SDXL's second text encoder (OpenCLIP bigG)
    tokenizer_2: Any = None
    loss: LossSetup = LossSetup("epsilon", False, None, 0.0)
    text_cache: dict = field(default_factory=dict)  # caption -> frozen encoders' output (UNet-only)
    vae: Any = None  # kept (on the CPU) only when the training renders samples
    precision: Any = None  # the .device.Precision (device, weight dtype) it trains in
    skipped_steps: list = field(default_factory=list)  # 1-based steps skipped for a non-finite loss or gradient


    @property
    def train_text_encoder(self) -> bool:
        return len(self.network.te_loras) > 0
