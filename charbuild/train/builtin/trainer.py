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

import math
import random
import time
from pathlib import Path
from typing import Any, Callable

from charbuild.errors import TrainingError

from ..job import TrainJob
from .conditioning import conditioning, frozen_conditioning, predict_noise
from .setup import (LossSetup, Prepared, Setup, choose_cpu_threads, ignored_settings_notes,
                    make_optimizer, note, resolve_loss, resolve_setup, seed_everything,
                    torch_compile_requested, vae_dtype_for)
from .observers import Observers, Progress, _bar, _current_lrs, write_result


#: ``on_step(step, loss, lrs)``: called after every optimizer step (1-based step, its loss,
#: the current learning rates: UNet first, then text encoder).
StepCallback = Callable[[int, float, list], None]


# --------------------------------------------------------------------------- 1. setup (pure)


# --------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------- 2. prepare


def prepare(setup: Setup) -> Prepared:
    """Seed, load the base model and the dataset, cache latents, build network and optimizer.

    The order is fixed: every random draw (latent sampling, network init) follows the seed.
    """
    import torch

    from .data import read_dataset_toml
    from .device import choose_precision, configure_cuda, require_torch
    from .models import load_base_model
    from .network import LoRANetwork

    require_torch()
    precision = choose_precision(setup.mixed_precision)
    device, weight_dtype = precision.device, precision.weight_dtype
    if precision.why:
        note(precision.why)
    if not precision.is_cuda:
        torch.set_num_threads(choose_cpu_threads())
        note(f"CPU training with {torch.get_num_threads()} thread(s)" + (f" in {weight_dtype}" if precision.half else ""))
    configure_cuda(precision)
    for n in ignored_settings_notes(setup.job):
        note(n)
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
    latents, vae = _encode_latents(setup, base, dataset, precision)

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
    _compile_unet(setup, precision, unet)

    optimizer, lr_scheduler, opt_desc = make_optimizer(setup, network, precision.is_cuda)
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
        vae=vae, precision=precision,
    )
    if setup.cache_text_encoder_outputs:
        _cache_text_encoder_outputs(setup, prep, encoders)
    return prep


def _encode_latents(setup: Setup, base, dataset, precision) -> tuple[dict, Any]:
    """The dataset's latents, encoded once, one picture at a time (as sd-scripts' default
    ``--vae_batch_size``); the VAE goes back to the CPU and is kept only when samples need it."""
    import torch

    from .data import cache_latents
    from .device import free_memory

    t0 = time.time()
    vae_half = vae_dtype_for(base.arch, precision.half, bool(setup.job.model.vae), setup.no_half_vae) == "half"
    base.vae.to(precision.device, precision.weight_dtype if vae_half else torch.float32)
    with _bar(sum(2 if it.flip_aug else 1 for it in dataset.items), "caching latents", "img") as bar:
        latents = cache_latents(dataset, base.vae, precision.device, setup.seed, progress=bar.update)
    base.vae.to("cpu", torch.float32)
    vae = base.vae if setup.job.params.sample_every else None  # else not needed afterwards
    base.vae = None
    free_memory(precision)
    if vae_half and not all(bool(torch.isfinite(x).all()) for x in latents.values()):
        raise TrainingError(f"the VAE gave non-finite latents in {setup.mixed_precision}: it is not an fp16-safe VAE; "
                            "set no_half_vae = true (or give a fixed fp16 VAE)", path=setup.job.model.vae)
    note(f"cached {len(latents)} latents in {time.time() - t0:.1f}s"
         + (f" (VAE in {setup.mixed_precision})" if vae_half else ""))
    return latents, vae


def _cache_text_encoder_outputs(setup: Setup, prep: Prepared, encoders: list) -> None:
    """Encode every caption once (``cache_text_encoder_outputs``), then move the text encoders off
    the GPU: to the CPU in fp32 when samples will need them again, else release them."""
    import torch

    from .device import autocast, free_memory

    t0 = time.time()
    captions = list(dict.fromkeys(it.caption for it in prep.dataset.items))
    with autocast(prep.precision):
        for k in range(0, len(captions), 8):
            frozen_conditioning(setup, prep, captions[k : k + 8])
    if setup.job.params.sample_every:
        for te in encoders:  # as sd-scripts: not needed on the GPU any more (a sampler moves them back)
            te.to("cpu", torch.float32)
    else:  # nothing encodes again: the loop's and the validation's captions are cached (sd-scripts keeps them)
        prep.text_encoder = prep.text_encoder_2 = None
    free_memory(prep.precision)
    note(f"cached the text encoders' outputs of {len(captions)} captions in {time.time() - t0:.1f}s"
         + ("" if prep.text_encoder is not None else "; the text encoders are released"))


def _compile_unet(setup: Setup, precision, unet) -> None:
    """``torch.compile`` the UNet's forward when ``[trainer.extra] torch_compile = true`` (sd-scripts'
    ``--torch_compile``): slower first steps, faster later ones on a GPU."""
    import torch

    if not torch_compile_requested(setup.job):
        return
    note("torch.compile: the UNet is compiled (the first steps take longer)")
    unet.forward = torch.compile(unet.forward)


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
    """Run ``setup.steps`` optimizer steps; return the loss of each. Calls ``on_step`` after each.

    A step whose loss or gradients are not finite is skipped (:class:`.stepping.Stepper`: no
    weight and no learning rate changes), noted, and listed in ``prep.skipped_steps``; the
    training goes on, as sd-scripts' does. ``on_step`` sees its loss as it was (inf or nan).
    """
    from .device import cpu_kernel_flags, grad_scaler
    from .stepping import Stepper

    trainable = [p for p in prep.network.parameters() if p.requires_grad]
    stepper = Stepper(prep.optimizer, prep.lr_scheduler, trainable, grad_scaler(prep.precision))
    prep.skipped_steps = stepper.skipped
    rng = random.Random(setup.seed)
    losses: list[float] = []
    with cpu_kernel_flags(prep.precision):
        _steps(setup, prep, stepper, rng, losses, on_step)
    return losses


def _steps(setup: Setup, prep: Prepared, stepper, rng: random.Random, losses: list[float],
           on_step: StepCallback | None) -> None:
    """:func:`train_loop`'s steps, appended to ``losses``."""
    from .data import make_batches
    from .device import autocast

    while len(losses) < setup.steps:
        for batch in make_batches(prep.dataset, rng):
            if len(losses) >= setup.steps:
                break
            with autocast(prep.precision):
                loss = batch_loss(setup, prep, batch)
            value, stepped = stepper(loss)  # reads the loss: also waits for the GPU, honest step times
            losses.append(value)
            if not stepped:
                note(f"step {len(losses)}: loss {value} or its gradients are not finite: step skipped"
                     + (" (fp16 loss scale lowered)" if stepper.scaler is not None else ""))
            if on_step is not None:
                on_step(len(losses), losses[-1], _current_lrs(prep.optimizer, prep.lr_scheduler))


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


# --------------------------------------------------------------------------- 4. the result


def run_job(job: TrainJob, on_step: StepCallback | None = None) -> dict:
    """Train the LoRA described by ``job`` and write it to its ``output``.

    Returns a summary dict (steps, final/average loss, steps per second, module count).
    Raises :class:`TrainingError` (or :class:`UnsupportedError`, exit code 2) for problems the
    user can fix. ``on_step`` is called after every step, beside the progress bar.
    """
    import torch

    from .device import describe_peak, peak_memory

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
    finite = [x for x in losses if math.isfinite(x)]
    average = sum(finite) / len(finite) if finite else float("nan")
    peak = peak_memory(prep.precision)
    skipped = list(prep.skipped_steps)
    note(f"{steps} steps in {train_s:.1f}s ({steps / max(train_s, 1e-9):.2f} steps/s); final loss {losses[-1]:.4f}, "
         f"average {average:.4f}" + (f"; {len(skipped)} step(s) skipped (non-finite): {skipped[:10]}" if skipped else "")
         + describe_peak(peak))
    n_tensors = write_result(setup, prep)
    note(f"wrote {setup.output} ({n_tensors} tensors)")
    ends = progress.step_ends
    return {
        "steps": steps,
        "final_loss": losses[-1],
        "average_loss": average,
        "losses": losses,
        "skipped_steps": skipped,
        "steps_per_s": steps / max(train_s, 1e-9),
        "step_durations": [b - a for a, b in zip([progress.started] + ends[:-1], ends)],
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(prep.device) if prep.device.type == "cuda" else None,
        "peak_memory_mib": peak,
        "modules": len(prep.network.unet_loras) + len(prep.network.te_loras),
        "output": str(setup.output),
    }


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


