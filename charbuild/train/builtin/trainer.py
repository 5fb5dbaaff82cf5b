"""The training loop of the builtin LoRA trainer, in four steps.

:func:`run_job` trains one LoRA from a :class:`~charbuild.train.job.TrainJob` the way sd-scripts'
``train_network.py`` does with charbuild's flags (latents cached once, DDPM noise at a uniform
random timestep, MSE between predicted and true noise, or velocity for v-prediction models,
gradient clipping at 1.0, LoRA on UNet and text encoder with separate learning rates, the chosen
optimizer and scheduler, a fixed seed), and for SDXL as ``sdxl_train_network.py`` does (both
text encoders, the pooled prompt, per-picture size/crop conditioning; see :mod:`.sdxl`). The
loss options of :mod:`.loss` (noise offset, min-SNR-γ, v-prediction, zero-terminal-SNR) apply
to both architectures:

1. :func:`resolve_setup` -- every decision that needs no torch, as a :class:`Setup` (pure data);
2. :func:`prepare` -- seed, base model, dataset, cached latents, network, optimizer
   (a :class:`Prepared`);
3. :func:`train_loop` -- the steps, calling ``on_step(step, loss, lrs)`` after each (progress
   bar, TensorBoard; later samples and validation);
4. :func:`write_result` -- the kohya-format file through the project's one safetensors writer,
   :func:`charbuild.lora.io.save_lora` (sorted header, sd-scripts' ``sshs_*`` hashes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from charbuild.errors import TrainingError

from ..job import TrainJob, adafactor_relative_step, as_job, optimizer_kwargs, scheduler_in_effect
from .models import UnsupportedError
from .network import NetworkSpec

#: sd-scripts' default --learning_rate, used when a job gives none to an optimizer that needs one.
SD_SCRIPTS_DEFAULT_LR = 2e-6
MAX_GRAD_NORM = 1.0  # sd-scripts' default --max_grad_norm
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = {"fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32"}
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")

#: ``on_step(step, loss, lrs)``: called after every optimizer step (1-based step, its loss,
#: the current learning rates: UNet first, then text encoder).
StepCallback = Callable[[int, float, list], None]


def note(msg: str) -> None:
    """One informational line on stdout (the runner captures it into train.log)."""
    print(f"[builtin] {msg}", flush=True)


def _timestamp() -> float:
    """Now, or ``SOURCE_DATE_EPOCH`` when set (reproducible files)."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde and sde.strip().isdigit():
        return float(sde)
    return time.time()



# --------------------------------------------------------------------------- 1. setup (pure)


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
    no_half_vae: bool = False  # keep a given VAE in fp32 under fp16/bf16 (see vae_dtype_for)


def resolve_setup(job: TrainJob | dict) -> Setup:
    """The :class:`Setup` of ``job``; UnsupportedError (exit code 2) for what this trainer cannot do."""
    job = as_job(job)
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
        no_half_vae=bool(params.no_half_vae),
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


def vae_dtype_for(arch: str, mixed_precision_on_gpu: bool, vae_given: bool, no_half_vae: bool) -> str:
    """The dtype the VAE encodes the (cached) latents in: "float32" or "half" (the weight dtype).

    Latents are encoded once, so fp32 costs memory only while they are cached. SD1.x: always
    fp32 (as the builtin has always done). SDXL: its VAE overflows in fp16 (sd-scripts advises
    ``--no_half_vae``), so fp32 unless a separate VAE is given (``[model] vae``, meant for a
    fixed fp16 VAE such as sdxl-vae-fp16-fix) and ``no_half_vae`` is off.
    """
    if not mixed_precision_on_gpu or no_half_vae or arch != "sdxl" or not vae_given:
        return "float32"
    return "half"


# --------------------------------------------------------------------------- helpers


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

                    opt = bnb.optim.AdamW8bit(groups, lr=lr, **kwargs)
                except ImportError:
                    note("bitsandbytes is not installed: AdamW8bit runs as torch AdamW (32-bit states)")
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
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:
        ncpu = os.cpu_count() or 1
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



def encode_text(tokenizer, text_encoder, captions: list[str], clip_skip: int | None, device):
    """SD1.x conditioning as sd-scripts: ``hidden_states[-clip_skip]`` + final layer norm."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    if not clip_skip or clip_skip <= 1:
        return text_encoder(ids, return_dict=True).last_hidden_state
    out = text_encoder(ids, output_hidden_states=True, return_dict=True)
    n = len(out.hidden_states) - 1
    if clip_skip > n:
        raise TrainingError(f"clip_skip {clip_skip} is more than the text encoder's {n} layers")
    h = out.hidden_states[-clip_skip]
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(h)


# --------------------------------------------------------------------------- 2. prepare


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


    @property
    def train_text_encoder(self) -> bool:
        return len(self.network.te_loras) > 0


def prepare(setup: Setup) -> Prepared:
    """Seed, load the base model and the dataset, cache latents, build network and optimizer.

    The order is fixed: every random draw (latent sampling, network init) follows the seed.
    """
    import torch

    from .data import cache_latents, read_dataset_toml
    from .models import load_base_model
    from .network import LoRANetwork

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    is_cuda = device.type == "cuda"
    weight_dtype = torch.float32
    if setup.mixed_precision in ("fp16", "bf16"):
        if is_cuda:
            weight_dtype = torch.float16 if setup.mixed_precision == "fp16" else torch.bfloat16
        else:
            note(f"mixed_precision {setup.mixed_precision} needs a GPU: training in float32 on the CPU")
    if not is_cuda:
        torch.set_num_threads(choose_cpu_threads())
        note(f"CPU training with {torch.get_num_threads()} thread(s)")
    seed_everything(setup.seed)
    t0 = time.time()
    base = load_base_model(setup.job.model.to_dict(), setup.root, supported_archs=("sd15", "sdxl"))
    note(f"model {base.name} ({base.arch}) loaded in {time.time() - t0:.1f}s; device {device}")
    noise_scheduler, loss = _loss_scheduler(setup, base)

    dataset = read_dataset_toml(setup.job.dataset_toml, setup.root, setup.dataset_overrides)
    for n in dataset.notes:
        note(n)
    buckets = sorted({it.bucket for it in dataset.items})
    note(f"{len(dataset.items)} images ({dataset.num_train_images} with repeats) in buckets {buckets}")

    # latents once; the VAE is not needed afterwards
    t0 = time.time()
    vae_half = vae_dtype_for(base.arch, weight_dtype != torch.float32, bool(setup.job.model.vae), setup.no_half_vae) == "half"
    base.vae.to(device, weight_dtype if vae_half else torch.float32)
    with _bar(sum(2 if it.flip_aug else 1 for it in dataset.items), "caching latents", "img") as bar:
        latents = cache_latents(dataset, base.vae, device, setup.seed, progress=bar.update)
    base.vae.to("cpu")
    vae = base.vae if setup.job.params.sample_every else None  # else not needed afterwards
    base.vae = None
    if vae_half and not all(bool(torch.isfinite(x).all()) for x in latents.values()):
        raise TrainingError(f"the VAE gave non-finite latents in {setup.mixed_precision}: it is not an fp16-safe VAE; "
                            "set no_half_vae = true (or give a fixed fp16 VAE)", path=setup.job.model.vae)
    note(f"cached {len(latents)} latents in {time.time() - t0:.1f}s"
         + (f" (VAE in {setup.mixed_precision})" if vae_half else ""))

    unet, text_encoder, text_encoder_2 = base.unet, base.text_encoder, base.text_encoder_2
    encoders = [te for te in (text_encoder, text_encoder_2) if te is not None]
    unet.to(device, weight_dtype)
    for te in encoders:
        te.to(device, weight_dtype)
    spec = setup.network
    if base.arch == "sdxl":
        network = LoRANetwork(unet, None if setup.unet_only else (text_encoder, text_encoder_2), spec, arch="sdxl")
    else:
        network = LoRANetwork(unet, None if setup.unet_only else text_encoder, spec)
    network.apply_to()
    prior_steps = None
    if setup.continue_from is not None:
        prior_steps = _load_continue_from(network, setup.continue_from)
    network.to(device, torch.float32)
    network.requires_grad_(True)
    n_unet, n_te = len(network.unet_loras), len(network.te_loras)
    note(f"{spec.algo} network: {n_unet} UNet + {n_te} text-encoder modules; dim {spec.dim} alpha {spec.alpha}"
         + (f"; conv_dim {spec.conv_dim} conv_alpha {spec.conv_alpha}" if spec.conv_dim else ""))
    if setup.gradient_checkpointing:
        _enable_gradient_checkpointing(unet, encoders if n_te else [])

    optimizer, lr_scheduler, opt_desc = make_optimizer(setup, network, is_cuda)
    note(f"optimizer {opt_desc}; scheduler {setup.job.params.scheduler}; seed {setup.seed}")
    if loss != LossSetup("epsilon", False, None, 0.0):
        note(f"loss: {loss.prediction_type}" + ("; zero terminal SNR" if loss.zero_terminal_snr else "")
             + (f"; min-SNR gamma {loss.min_snr_gamma}" if loss.min_snr_gamma is not None else "")
             + (f"; noise offset {loss.noise_offset}" if loss.noise_offset else ""))
    prep = Prepared(
        device=device, weight_dtype=weight_dtype, model_name=base.name, dataset=dataset, latents=latents,
        unet=unet, text_encoder=text_encoder, tokenizer=base.tokenizer, noise_scheduler=noise_scheduler,
        network=network, optimizer=optimizer, lr_scheduler=lr_scheduler, optimizer_desc=opt_desc,
        prior_steps=prior_steps, arch=base.arch, text_encoder_2=text_encoder_2, tokenizer_2=base.tokenizer_2, loss=loss,
        vae=vae,
    )
    if setup.cache_text_encoder_outputs:
        t0 = time.time()
        captions = list(dict.fromkeys(it.caption for it in dataset.items))
        with _autocast(weight_dtype):
            for k in range(0, len(captions), 8):
                _frozen_conditioning(setup, prep, captions[k : k + 8])
        if setup.job.params.sample_every:
            for te in encoders:  # as sd-scripts: not needed on the GPU any more (a sampler moves them back)
                te.to("cpu", torch.float32)
        else:  # nothing encodes again: the loop's and the validation's captions are cached (sd-scripts keeps them)
            prep.text_encoder = prep.text_encoder_2 = None
        note(f"cached the text encoders' outputs of {len(captions)} captions in {time.time() - t0:.1f}s"
             + ("" if prep.text_encoder is not None else "; the text encoders are released"))
    return prep


def _loss_scheduler(setup: Setup, base):
    """The noise scheduler the loop uses and the :class:`LossSetup`: the model's scheduler,
    switched to v-prediction and rescaled to zero terminal SNR where the job or model says so."""
    from .loss import apply_zero_terminal_snr

    sched = base.noise_scheduler
    loss = resolve_loss(setup, sched.config.prediction_type, base.zero_terminal_snr)
    if loss.prediction_type != sched.config.prediction_type:
        sched = type(sched).from_config(sched.config, prediction_type=loss.prediction_type)
    if loss.zero_terminal_snr:
        if not setup.zero_terminal_snr:
            note("the checkpoint is marked zero-terminal-SNR: rescaling the noise schedule")
        if not loss.v_prediction:
            note("zero_terminal_snr without v_prediction: the last timestep is pure noise (sd-scripts warns too)")
        apply_zero_terminal_snr(sched)
    return sched, loss


def _enable_gradient_checkpointing(unet, text_encoders) -> None:
    unet.enable_gradient_checkpointing()
    for text_encoder in text_encoders:
        if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5
            text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    unet.train()  # checkpointing is active in training mode only
    for text_encoder in text_encoders:
        text_encoder.train()


# --------------------------------------------------------------------------- 3. the loop


def train_loop(setup: Setup, prep: Prepared, on_step: StepCallback | None = None) -> list[float]:
    """Run ``setup.steps`` optimizer steps; return the loss of each. Calls ``on_step`` after each."""
    import torch

    from .data import make_batches

    device, weight_dtype, dataset = prep.device, prep.weight_dtype, prep.dataset
    optimizer, lr_scheduler = prep.optimizer, prep.lr_scheduler
    scaler = torch.amp.GradScaler("cuda") if (device.type == "cuda" and weight_dtype == torch.float16) else None
    trainable = [p for p in prep.network.parameters() if p.requires_grad]
    rng = random.Random(setup.seed)
    losses: list[float] = []
    while len(losses) < setup.steps:
        for batch in make_batches(dataset, rng):
            if len(losses) >= setup.steps:
                break
            with _autocast(weight_dtype):
                loss = batch_loss(setup, prep, batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {len(losses) + 1}; "
                                    "try mixed_precision = 'no' or a lower lr")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
                optimizer.step()
            if lr_scheduler is not None:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))  # also waits for the GPU: honest step times
            if on_step is not None:
                on_step(len(losses), losses[-1], _current_lrs(optimizer, lr_scheduler))
    return losses


def _bar(total: int, desc: str, unit: str):
    """A tqdm progress bar on stderr (the runner relays its ``\\r`` updates byte for byte)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def batch_loss(setup: Setup, prep: Prepared, batch: list[tuple[int, bool]]):
    """The loss of one batch of (item index, flipped) as sd-scripts forms it (call it under the
    loop's autocast): conditioning, then ``noise = N(0, 1)`` (+ the noise offset), a uniform
    timestep, the UNet's prediction against the target of ``prep.loss`` (noise or velocity),
    MSE per picture weighted by min-SNR-γ when set. The random draws are in this order, from
    torch's global generator."""
    import torch

    from .loss import apply_noise_offset, min_snr_weights, snr_table, training_target

    device, weight_dtype, dataset, sched = prep.device, prep.weight_dtype, prep.dataset, prep.noise_scheduler
    lat = torch.stack([prep.latents[key] for key in batch]).to(device)
    captions = [dataset.items[i].caption for i, _ in batch]
    cond, added = conditioning(setup, prep, batch, captions)
    eps = torch.randn_like(lat)
    if prep.loss.noise_offset:
        eps = apply_noise_offset(lat, eps, prep.loss.noise_offset)
    t = torch.randint(0, int(sched.config.num_train_timesteps), (lat.shape[0],), device=device).long()
    noisy = sched.add_noise(lat, eps, t).to(weight_dtype)
    pred = predict_noise(prep, noisy, t, cond, added)
    target = training_target(prep.loss.prediction_type, lat, eps, t, sched.alphas_cumprod)
    if prep.loss.min_snr_gamma is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    per_image = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weights = min_snr_weights(t, snr_table(sched.alphas_cumprod), prep.loss.min_snr_gamma, prep.loss.v_prediction)
    return (per_image * weights).mean()


def conditioning(setup: Setup, prep: Prepared, batch: list[tuple[int, bool]], captions: list[str]):
    """(encoder hidden states, SDXL's ``added_cond_kwargs`` or None) of a batch of (item index,
    flipped): :func:`text_conditioning` of its captions, and for SDXL each picture's size/crop ids
    (:func:`.data.sdxl_size_conditioning`)."""
    text = text_conditioning(setup, prep, captions)
    if prep.arch != "sdxl":
        return unet_conditioning(prep, text, None)
    from .data import sdxl_size_conditioning
    from .sdxl import sdxl_time_ids

    sizes = [sdxl_size_conditioning(prep.dataset.items[i], flipped) for i, flipped in batch]
    return unet_conditioning(prep, text, sdxl_time_ids(*zip(*sizes), device=prep.device))


def text_conditioning(setup: Setup, prep: Prepared, captions: list[str]):
    """The text encoders' output of ``captions``: SD1.x hidden states, SDXL an :class:`.sdxl.SDXLPromptEmbeds`.

    The encoders run with gradients when their adapters train; else each caption is encoded
    once and kept (:func:`_frozen_conditioning`).
    """
    if prep.arch != "sdxl":
        if prep.train_text_encoder:
            return encode_text(prep.tokenizer, prep.text_encoder, captions, setup.clip_skip, prep.device)
        return _cached_cond(prep, captions, setup.clip_skip)
    if not prep.train_text_encoder:
        return _frozen_conditioning(setup, prep, captions)
    from .sdxl import encode_sdxl_prompts, tokenize_sdxl

    ids1, ids2 = tokenize_sdxl(captions, prep.tokenizer, prep.tokenizer_2)
    return encode_sdxl_prompts(ids1, ids2, prep.text_encoder, prep.text_encoder_2, prep.tokenizer_2.eos_token_id)


def unet_conditioning(prep: Prepared, text, time_ids):
    """(hidden states, ``added_cond_kwargs`` or None) for the UNet from :func:`text_conditioning`'s
    ``text`` and, for SDXL, the size/crop ``time_ids`` (:func:`.sdxl.sdxl_time_ids`)."""
    if prep.arch != "sdxl":
        return text, None
    from .sdxl import sdxl_added_cond_kwargs

    added = sdxl_added_cond_kwargs(text, time_ids)
    added = {k: v.to(prep.device, prep.weight_dtype) for k, v in added.items()}
    return text.hidden_states.to(prep.device), added


def predict_noise(prep: Prepared, noisy, t, cond, added):
    """The UNet's output (noise or velocity, as the model predicts) for ``noisy`` latents at
    timesteps ``t`` with :func:`unet_conditioning`'s ``cond`` and ``added``."""
    noisy, cond = noisy.to(prep.weight_dtype), cond.to(prep.weight_dtype)
    if added is None:
        return prep.unet(noisy, t, cond).sample
    return prep.unet(noisy, t, cond, added_cond_kwargs=added).sample


class Progress:
    """The step callback of a run: tqdm bar (loss, ETA), TensorBoard scalars, step end times."""

    def __init__(self, setup: Setup):
        self.bar = _bar(setup.steps, "steps", "step")
        self.writer = _summary_writer(setup.job)
        self.loss_sum = 0.0
        self.started = time.time()
        self.step_ends: list[float] = []
        self.val_loss: float | None = None

    def __call__(self, step: int, loss: float, lrs: list) -> None:
        self.step_ends.append(time.time())
        self.loss_sum += loss
        avg = self.loss_sum / step
        self.bar.update(1)
        extra = {} if self.val_loss is None else {"val": f"{self.val_loss:.4f}"}
        self.bar.set_postfix(loss=f"{loss:.4f}", avg=f"{avg:.4f}", **extra, refresh=False)
        if self.writer is not None:
            self.writer.add_scalar("loss/current", loss, step)
            self.writer.add_scalar("loss/average", avg, step)
            if lrs:
                self.writer.add_scalar("lr/unet", lrs[0], step)
            if len(lrs) > 1:
                self.writer.add_scalar("lr/textencoder", lrs[1], step)

    def validation(self, step: int, val_loss: float) -> None:
        """Log a validation loss beside the training loss."""
        if self.writer is not None:
            self.writer.add_scalar("loss/validation", val_loss, step)
        self.val_loss = val_loss

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Observers:
    """What watches a training without changing it: ``metrics.jsonl``, validation loss, samples.

    All of it is written beside ``setup.output`` (the runner's temp folder), see
    :mod:`charbuild.train.observed`. Validation runs before the first step (step 0), every
    ``validation_every`` steps and after the last; samples every ``sample_every`` steps and
    after the last.
    """

    def __init__(self, setup: Setup, prep: Prepared, progress: Progress):
        from charbuild.train.metrics import MetricsWriter
        from charbuild.train.observed import output_folder, samples_of

        from .identity_watch import IdentityWatch

        self.setup, self.prep, self.progress = setup, prep, progress
        params = setup.job.params
        folder = output_folder(setup.job)
        self.metrics = MetricsWriter(folder)
        self.validation = self.samples = self.identity = None
        self.sample_every, self.validation_every = params.sample_every, params.validation_every
        if self.validation_every:
            from .validation import ValidationSet

            items = prep.dataset.items
            self.validation = ValidationSet.build(prep.latents, [it.caption for it in items],
                                                  int(prep.noise_scheduler.config.num_train_timesteps), setup.seed,
                                                  sizes_hw=[(it.bucket[1], it.bucket[0]) for it in items])
            note(f"validation: {len(self.validation)} fixed cases (every picture at fixed timesteps and noise), "
                 f"every {self.validation_every} steps")
        if self.sample_every:
            from .samples import SampleRenderer

            self.samples = SampleRenderer(setup, prep, samples_of(setup.job), folder)
            note(f"samples: {self.samples.describe()}, every {self.sample_every} steps and at the end")
            self.identity = IdentityWatch(setup, prep, self.samples, folder, self.metrics)
            note(self.identity.describe())

    def start(self) -> None:
        if self.validation is not None:
            self._validate(0)
        if self.identity is not None:
            with self._encoders_on_device():
                self.identity.baseline()

    def __call__(self, step: int, loss: float, lrs: list) -> None:
        from charbuild.sample_prompts import sample_steps_due

        self.metrics.step(step, loss, lrs[0] if lrs else None)
        last = step == self.setup.steps
        if self.validation is not None and (step % self.validation_every == 0 or last):
            self._validate(step)
        if self.samples is not None and sample_steps_due(step, self.sample_every, self.setup.steps):
            t0 = time.time()
            with self._encoders_on_device():
                written = self.samples.render(step)
                self.identity.after(step, written, last)
            note(f"step {step}: {len(written)} samples in {time.time() - t0:.1f}s")

    @contextlib.contextmanager
    def _encoders_on_device(self):
        """The text encoders where the UNet is, for as long as a sample or validation needs them:
        with ``cache_text_encoder_outputs`` they wait on the CPU in fp32 (as sd-scripts keeps them)."""
        import torch

        p = self.prep
        parked = [te for te in (p.text_encoder, p.text_encoder_2)
                  if te is not None and next(te.parameters()).device != p.device]
        for te in parked:
            te.to(p.device, p.weight_dtype)
        try:
            yield
        finally:
            for te in parked:
                te.to("cpu", torch.float32)

    def _validate(self, step: int) -> None:
        with self._encoders_on_device():
            self._validate_here(step)

    def _validate_here(self, step: int) -> None:
        import torch

        from .validation import training_predict

        p = self.prep
        autocast = torch.autocast("cuda", dtype=p.weight_dtype) if p.weight_dtype != torch.float32 else None
        modules = [m for m in (p.unet, p.text_encoder, getattr(p, "text_encoder_2", None)) if m is not None]
        value = self.validation.evaluate(training_predict(self.setup, p), p.noise_scheduler, p.device, modules, autocast)
        self.metrics.validation(step, value)
        self.progress.validation(step, value)

    def close(self) -> None:
        self.metrics.close()


# --------------------------------------------------------------------------- 4. the result


def write_result(setup: Setup, prep: Prepared) -> int:
    """Write the trained network to ``setup.output`` (kohya keys, sd-scripts metadata); its tensor count."""
    import torch

    from charbuild.lora.io import save_lora

    tensors = prep.network.kohya_state_dict(getattr(torch, setup.save_dtype))
    metadata = build_metadata(setup, prep.model_name, prep.dataset, prep.optimizer_desc, prep.prior_steps,
                              arch=prep.arch, loss=prep.loss)
    save_lora(setup.output, tensors, metadata)
    return len(tensors)


def run_job(job: TrainJob | dict, on_step: StepCallback | None = None) -> dict:
    """Train the LoRA described by ``job`` and write it to its ``output``.

    Returns a summary dict (steps, final/average loss, steps per second, module count).
    Raises :class:`TrainingError` (or :class:`UnsupportedError`, exit code 2) for problems the
    user can fix. ``on_step`` is called after every step, beside the progress bar.
    """
    import torch

    setup = resolve_setup(job)
    prep = prepare(setup)
    progress = Progress(setup)
    observers = Observers(setup, prep, progress)

    def step_done(step: int, loss: float, lrs: list) -> None:
        progress(step, loss, lrs)
        observers(step, loss, lrs)
        if on_step is not None:
            on_step(step, loss, lrs)

    try:
        observers.start()
        progress.started = time.time()  # the step-0 validation is not a training step
        losses = train_loop(setup, prep, step_done)
    finally:
        progress.close()
        observers.close()
    steps = setup.steps
    train_s = time.time() - progress.started
    average = sum(losses) / len(losses)
    note(f"{steps} steps in {train_s:.1f}s ({steps / max(train_s, 1e-9):.2f} steps/s); final loss {losses[-1]:.4f}, "
         f"average {average:.4f}")
    n_tensors = write_result(setup, prep)
    note(f"wrote {setup.output} ({n_tensors} tensors)")
    ends = progress.step_ends
    return {
        "steps": steps,
        "final_loss": losses[-1],
        "average_loss": average,
        "losses": losses,
        "steps_per_s": steps / max(train_s, 1e-9),
        "step_durations": [b - a for a, b in zip([progress.started] + ends[:-1], ends)],
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if prep.device.type == "cuda" else None,
        "modules": len(prep.network.unet_loras) + len(prep.network.te_loras),
        "output": str(setup.output),
    }


#: What sd-scripts writes for an SDXL LoRA (``sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0``,
#: ``sai_model_spec``: ``ARCH_SD_XL_V1_BASE + "/lora"``, ``IMPL_STABILITY_AI`` for an SDXL LoRA).
SDXL_METADATA = {
    "ss_base_model_version": "sdxl_base_v1-0",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
}


def build_metadata(
    setup: Setup,
    model_name: str,
    dataset,
    opt_desc: str,
    prior_steps: int | None = None,
    arch: str = "sd15",
    loss: LossSetup | None = None,
) -> dict[str, str]:
    """The safetensors header metadata (all strings), sd-scripts' ``ss_*`` and modelspec keys.

    ``arch`` is the trained model's ("sdxl": ``sdxl_train_network.py``'s version and modelspec
    keys, no clip skip); ``loss`` the :class:`LossSetup` in effect (None: the job's options).
    SDXL files always carry ``ss_min_snr_gamma`` and ``ss_zero_terminal_snr`` as sd-scripts
    writes them (``str(value)``); an SD1.x file only when they are set, so that files trained
    before these options existed keep their bytes. ``modelspec.prediction_type`` is "v" for
    v-prediction.

    A continued training (``prior_steps`` not None) counts like sd-scripts with
    ``--network_weights``: ``ss_steps``/``ss_max_train_steps`` are the steps of this run; it adds
    ``charbuild.continue_from`` (the file's name) and ``charbuild.total_steps`` (the steps in
    that file plus this run's).
    """
    job, params, spec = setup.job, setup.job.params, setup.network
    if loss is None:
        loss = resolve_loss(setup, "epsilon", False)
    sdxl = arch == "sdxl"
    clip_skip = None if sdxl else setup.clip_skip  # SDXL has no clip skip (sd-scripts leaves it None)
    ts = _timestamp()
    name = job.title  # <lora>-<variant>: unique, and the deliverable's stem (the web UIs' alias)
    res = dataset.datasets[0].resolution
    lr, te_lr = params.lr, params.text_encoder_lr
    steps = setup.steps
    md = {
        "ss_training_started_at": str(ts),
        "ss_output_name": name,
        "ss_learning_rate": str(lr),
        "ss_text_encoder_lr": str(te_lr if te_lr is not None else lr),
        "ss_unet_lr": str(lr),
        "ss_num_train_images": str(dataset.num_train_images),
        "ss_num_batches_per_epoch": "",
        "ss_max_train_steps": str(steps),
        "ss_steps": str(steps),
        "ss_lr_scheduler": str(params.scheduler),
        "ss_optimizer": opt_desc,
        "ss_network_module": setup.network_module,
        "ss_network_dim": str(spec.dim),
        "ss_network_alpha": str(float(spec.alpha)),
        "ss_network_args": json.dumps(setup.network_args),
        "ss_mixed_precision": setup.mixed_precision,
        "ss_full_fp16": "False",
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_clip_skip": str(clip_skip),
        "ss_seed": str(setup.seed),
        "ss_sd_model_name": model_name,
        "ss_vae_name": Path(job.model.vae).name if job.model.vae else "None",
        "ss_resolution": f"({res[0]}, {res[1]})",
        "ss_gradient_checkpointing": str(setup.gradient_checkpointing),
        "ss_network_train_unet_only": str(setup.unet_only),
        "ss_cache_latents": "True",
        "ss_max_grad_norm": str(MAX_GRAD_NORM),
        "ss_caption_dropout_rate": "0.0",
        "ss_noise_offset": str(loss.noise_offset) if loss.noise_offset else "None",
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs()),
        "ss_training_comment": f"charbuild builtin trainer; lora {job.lora}; variant {job.variant}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.trigger_phrase": ", ".join(job.keywords),
        "modelspec.date": datetime.fromtimestamp(ts, tz=timezone.utc).replace(tzinfo=None).isoformat(),
        "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.prediction_type": "v" if loss.v_prediction else "epsilon",
    }
    if sdxl:
        md.update(SDXL_METADATA)
    if sdxl or loss.min_snr_gamma is not None:
        md["ss_min_snr_gamma"] = str(loss.min_snr_gamma)
    if sdxl or loss.zero_terminal_snr:
        md["ss_zero_terminal_snr"] = str(loss.zero_terminal_snr)
    md["ss_num_batches_per_epoch"] = str(sum(
        math.ceil(sum(it.num_repeats for it in ds.items if it.bucket == b) / ds.batch_size)
        for ds in dataset.datasets for b in {it.bucket for it in ds.items}
    ))
    md["ss_num_epochs"] = str(math.ceil(steps / max(1, int(md["ss_num_batches_per_epoch"]))))
    if clip_skip:
        md["modelspec.encoder_layer"] = str(clip_skip)
    if prior_steps is not None:
        md["charbuild.continue_from"] = setup.continue_from.name
        md["charbuild.total_steps"] = str(prior_steps + steps)
    return md


def _load_continue_from(network, path: Path) -> int:
    """Load the LoRA at ``path`` into ``network``; return the steps it was trained for (0: unknown)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainingError("LoRA to continue from not found", path=path)
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise TrainingError(f"cannot read LoRA to continue from: {e}", path=path) from e
    try:
        missing, unexpected = network.load_kohya_state_dict(sd)
    except ValueError as e:
        raise TrainingError(f"LoRA to continue from does not fit this network: {e}", path=path) from e
    if len(missing) == len(list(network.state_dict())):
        raise TrainingError("LoRA to continue from shares no module with this network", path=path)
    with safe_open(str(path), "pt") as f:
        md = f.metadata() or {}
    prior = 0
    for key in ("charbuild.total_steps", "ss_steps", "ss_max_train_steps"):
        if str(md.get(key, "")).isdigit():
            prior = int(md[key])
            break
    note(f"continuing from {path} ({prior} steps): {len(missing)} missing, {len(unexpected)} unexpected keys")
    return prior


def _cached_cond(prep: Prepared, captions, clip_skip):
    """SD1.x: the frozen text encoder's states of ``captions``, each caption encoded once."""
    import torch

    cache = prep.text_cache
    todo = [c for c in dict.fromkeys(captions) if c not in cache]
    if todo:
        with torch.no_grad():
            enc = encode_text(prep.tokenizer, prep.text_encoder, todo, clip_skip, prep.device)
        for c, e in zip(todo, enc):
            cache[c] = e
    return torch.stack([cache[c] for c in captions])


def _frozen_conditioning(setup: Setup, prep: Prepared, captions):
    """The frozen encoders' output of ``captions`` (SD1.x: states; SDXL: :class:`.sdxl.SDXLPromptEmbeds`),
    each caption encoded once and kept in ``prep.text_cache`` (sd-scripts' cached outputs)."""
    if prep.arch != "sdxl":
        return _cached_cond(prep, captions, setup.clip_skip)
    import torch

    from .sdxl import SDXLPromptEmbeds, encode_sdxl_prompts, tokenize_sdxl

    cache = prep.text_cache
    todo = [c for c in dict.fromkeys(captions) if c not in cache]
    if todo:
        ids1, ids2 = tokenize_sdxl(todo, prep.tokenizer, prep.tokenizer_2)
        with torch.no_grad():
            emb = encode_sdxl_prompts(ids1, ids2, prep.text_encoder, prep.text_encoder_2, prep.tokenizer_2.eos_token_id)
        for c, h, p in zip(todo, emb.hidden_states, emb.pooled):
            cache[c] = (h.to(prep.device), p.to(prep.device))
    return SDXLPromptEmbeds(torch.stack([cache[c][0] for c in captions]), torch.stack([cache[c][1] for c in captions]))


def _current_lrs(optimizer, lr_scheduler) -> list[float]:
    try:
        if lr_scheduler is not None:
            return [float(x) for x in lr_scheduler.get_last_lr()]
        return [float(g["lr"]) for g in optimizer.param_groups]
    except (TypeError, KeyError, AttributeError, IndexError):
        return []


def _summary_writer(job: TrainJob):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        note("tensorboard is not installed: no TensorBoard logs")
        return None
    stamp = datetime.fromtimestamp(_timestamp()).strftime("%Y%m%d%H%M%S")
    return SummaryWriter(log_dir=str(Path(job.variant_dir) / "logs" / f"{job.lora}-{job.variant}-{stamp}" / "network_train"))


def _autocast(weight_dtype):
    """CUDA autocast to the half weight dtype; a no-op context in float32 (the CPU)."""
    import contextlib

    import torch

    if weight_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=weight_dtype)
