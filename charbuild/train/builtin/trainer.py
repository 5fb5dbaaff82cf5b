"""The training loop of the builtin LoRA trainer, and the kohya-format output file.

One call of :func:`run_job` trains one LoRA from a job dict (docs/architecture.md, "The
training job") the way sd-scripts' ``train_network.py`` does with charbuild's flags: latents
cached once, DDPM noise at a uniform random timestep, MSE between predicted and true noise
(or velocity for v-prediction models), gradient clipping at 1.0, LoRA on UNet and text
encoder with separate learning rates, the chosen optimizer and scheduler, a fixed seed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from charbuild.errors import TrainingError
from charbuild.fsutil import atomic_path

from .models import UnsupportedError

#: sd-scripts' default --learning_rate, used when a job gives none to an optimizer that needs one.
SD_SCRIPTS_DEFAULT_LR = 2e-6
MAX_GRAD_NORM = 1.0  # sd-scripts' default --max_grad_norm


def note(msg: str) -> None:
    """One informational line on stdout (the runner captures it into train.log)."""
    print(f"[builtin] {msg}", flush=True)


# --------------------------------------------------------------------------- hashes / metadata


def addnet_hash_safetensors(data: bytes) -> str:
    """sd-scripts' ``addnet_hash_safetensors``: sha256 of everything after the header."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n :]).hexdigest()


def addnet_hash_legacy(data: bytes) -> str:
    """sd-scripts' ``addnet_hash_legacy``: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    return hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def precalculate_safetensors_hashes(tensors: dict, metadata: dict) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them before saving.

    Only the ``ss_`` metadata goes into the serialised bytes that are hashed, so editing other
    metadata later does not change the hashes. Uses the LoRA toolkit's
    ``charbuild.lora.io.sd_scripts_hashes`` (one implementation for the whole project) when it
    is there, else the same computation here.
    """
    try:
        from charbuild.lora.io import sd_scripts_hashes
    except ImportError:
        sd_scripts_hashes = None
    if sd_scripts_hashes is not None:
        return sd_scripts_hashes(tensors, metadata)
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return addnet_hash_safetensors(data), addnet_hash_legacy(data)


def _timestamp() -> float:
    """Now, or ``SOURCE_DATE_EPOCH`` when set (reproducible files)."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde and sde.strip().isdigit():
        return float(sde)
    return time.time()


# --------------------------------------------------------------------------- options


def parse_optimizer_args(items) -> dict:
    """``["relative_step=True", "betas=(0.9,0.99)"]`` -> kwargs (values via ``ast.literal_eval``)."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            raise TrainingError(f"optimizer argument {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def network_spec(params: dict):
    """The :class:`~.network.NetworkSpec` and the ss_network_* metadata of the job's params."""
    from .network import NetworkSpec

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


def make_optimizer(params: dict, network, is_cuda: bool):
    """(optimizer, lr scheduler or None, description) as sd-scripts sets them up."""
    import torch

    name = (params.get("optimizer") or "AdamW").lower()
    kwargs = parse_optimizer_args(params.get("optimizer_args"))
    lr = params.get("lr")
    te_lr = params.get("text_encoder_lr")
    steps = int(params["steps"])
    sched_name = params.get("scheduler") or "cosine_with_restarts"
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule

        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            if lr is not None or te_lr is not None:
                note("adafactor with relative_step: learning rates are ignored (as sd-scripts)")
            groups = network.param_groups(None, None)
            opt = Adafactor(groups, lr=None, **kwargs)
            return opt, AdafactorSchedule(opt, initial_lr=lr or 0.0), f"Adafactor({kwargs})"
        lr = lr if lr is not None else SD_SCRIPTS_DEFAULT_LR
        groups = network.param_groups(lr, te_lr if te_lr is not None else lr)
        opt = Adafactor(groups, lr=lr, **kwargs)
    elif name in ("adamw", "adamw8bit"):
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
    else:
        raise UnsupportedError(f"optimizer {params.get('optimizer')!r} is not supported by the builtin trainer")
    from diffusers.optimization import get_scheduler

    try:
        sched = get_scheduler(sched_name, opt, num_warmup_steps=0, num_training_steps=steps, num_cycles=1)
    except (ValueError, KeyError) as e:
        raise UnsupportedError(f"lr scheduler {sched_name!r}: {e}") from e
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


# --------------------------------------------------------------------------- the run


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


def run_job(job: dict) -> dict:
    """Train the LoRA described by ``job`` and write it to ``job["output"]``.

    Returns a summary dict (steps, final/average loss, steps per second, module count).
    Raises :class:`TrainingError` (or :class:`UnsupportedError`, exit code 2) for problems the
    user can fix.
    """
    import torch
    from tqdm import tqdm

    from .data import cache_latents, make_batches, read_dataset_toml
    from .models import load_base_model
    from .network import LoRANetwork

    params = dict(job["params"])
    model_cfg = dict(job.get("model") or {})
    root = Path(job.get("project_root") or ".").resolve()
    output = Path(job["output"])
    steps = int(params["steps"])
    if steps < 1:
        raise TrainingError("steps must be at least 1")
    seed = int(params.get("seed") if params.get("seed") is not None else 0)
    clip_skip = params.get("clip_skip")
    if clip_skip is None:
        clip_skip = model_cfg.get("clip_skip")
    clip_skip = int(clip_skip) if clip_skip else None
    spec, network_module, net_args = network_spec(params)
    unet_only = bool(params.get("network_train_unet_only"))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    is_cuda = device.type == "cuda"
    mp = (params.get("mixed_precision") or "no").lower()
    weight_dtype = torch.float32
    if mp in ("fp16", "bf16"):
        if is_cuda:
            weight_dtype = torch.float16 if mp == "fp16" else torch.bfloat16
        else:
            note(f"mixed_precision {mp} needs a GPU: training in float32 on the CPU")
    elif mp != "no":
        raise UnsupportedError(f"mixed_precision {mp!r} is not one of fp16, bf16, no")
    save_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32, "fp32": torch.float32}.get(
        (params.get("save_precision") or "fp16").lower()
    )
    if save_dtype is None:
        raise UnsupportedError(f"save_precision {params.get('save_precision')!r} is not one of fp16, bf16, float")

    if not is_cuda:
        torch.set_num_threads(choose_cpu_threads())
        note(f"CPU training with {torch.get_num_threads()} thread(s)")
    seed_everything(seed)
    t0 = time.time()
    base = load_base_model(model_cfg, root)
    note(f"model {base.name} loaded in {time.time() - t0:.1f}s; device {device}")

    overrides = {}
    if params.get("resolution"):
        overrides["resolution"] = int(params["resolution"])
    for k in ("min_bucket_reso", "max_bucket_reso"):
        if params.get(k):
            overrides[k] = int(params[k])
    dataset = read_dataset_toml(job["dataset_toml"], root, overrides)
    for n in dataset.notes:
        note(n)
    buckets = sorted({it.bucket for it in dataset.items})
    note(f"{len(dataset.items)} images ({dataset.num_train_images} with repeats) in buckets {buckets}")

    # latents once; the VAE is not needed afterwards
    t0 = time.time()
    base.vae.to(device, torch.float32)
    latents = cache_latents(dataset, base.vae, device, seed)
    base.vae.to("cpu")
    base.vae = None
    note(f"cached {len(latents)} latents in {time.time() - t0:.1f}s")

    unet, text_encoder, tokenizer = base.unet, base.text_encoder, base.tokenizer
    unet.to(device, weight_dtype)
    text_encoder.to(device, weight_dtype)
    network = LoRANetwork(unet, None if unet_only else text_encoder, spec)
    network.apply_to()
    if job.get("continue_from"):
        _load_continue_from(network, Path(job["continue_from"]))
    network.to(device, torch.float32)
    network.requires_grad_(True)
    n_unet, n_te = len(network.unet_loras), len(network.te_loras)
    note(f"{spec.algo} network: {n_unet} UNet + {n_te} text-encoder modules; dim {spec.dim} alpha {spec.alpha}"
         + (f"; conv_dim {spec.conv_dim} conv_alpha {spec.conv_alpha}" if spec.conv_dim else ""))
    train_te = n_te > 0
    if params.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
        if train_te:
            if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5
                text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        unet.train()  # checkpointing is active in training mode only
        if train_te:
            text_encoder.train()

    optimizer, lr_scheduler, opt_desc = make_optimizer(params, network, is_cuda)
    note(f"optimizer {opt_desc}; scheduler {params.get('scheduler') or 'cosine_with_restarts'}; seed {seed}")
    scaler = torch.amp.GradScaler("cuda") if (is_cuda and weight_dtype == torch.float16) else None
    noise_scheduler = base.noise_scheduler
    n_timesteps = int(noise_scheduler.config.num_train_timesteps)
    prediction_type = noise_scheduler.config.prediction_type

    writer = _summary_writer(job)
    te_cache: dict[str, torch.Tensor] = {}
    rng = random.Random(seed)
    loss_sum, loss_count, losses, step_ends = 0.0, 0, [], []
    step = 0
    trainable = [p for p in network.parameters() if p.requires_grad]
    autocast = torch.autocast("cuda", dtype=weight_dtype) if weight_dtype != torch.float32 else None
    t_train = time.time()
    bar = tqdm(total=steps, desc="steps", unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    try:
        while step < steps:
            for batch in make_batches(dataset, rng):
                if step >= steps:
                    break
                lat = torch.stack([latents[key] for key in batch]).to(device)
                captions = [dataset.items[i].caption for i, _ in batch]
                with autocast if autocast is not None else _nullcontext():
                    if train_te:
                        cond = encode_text(tokenizer, text_encoder, captions, clip_skip, device)
                    else:
                        cond = _cached_cond(te_cache, captions, tokenizer, text_encoder, clip_skip, device)
                    noise = torch.randn_like(lat)
                    t = torch.randint(0, n_timesteps, (lat.shape[0],), device=device).long()
                    noisy = noise_scheduler.add_noise(lat, noise, t)
                    pred = unet(noisy.to(weight_dtype), t, cond.to(weight_dtype)).sample
                    if prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(lat, noise, t)
                    else:
                        target = noise
                    loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} at step {step + 1}; try mixed_precision = 'no' or a lower lr")
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
                step += 1
                cur = float(loss.detach())  # also waits for the GPU: honest step times
                step_ends.append(time.time())
                losses.append(cur)
                loss_sum += cur
                loss_count += 1
                avg = loss_sum / loss_count
                bar.update(1)
                bar.set_postfix(loss=f"{cur:.4f}", avg=f"{avg:.4f}", refresh=False)
                if writer is not None:
                    writer.add_scalar("loss/current", cur, step)
                    writer.add_scalar("loss/average", avg, step)
                    lrs = _current_lrs(optimizer, lr_scheduler)
                    if lrs:
                        writer.add_scalar("lr/unet", lrs[0], step)
                    if len(lrs) > 1:
                        writer.add_scalar("lr/textencoder", lrs[1], step)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    train_s = time.time() - t_train
    note(f"{steps} steps in {train_s:.1f}s ({steps / max(train_s, 1e-9):.2f} steps/s); final loss {losses[-1]:.4f}, "
         f"average {loss_sum / loss_count:.4f}")

    tensors = network.kohya_state_dict(save_dtype)
    metadata = build_metadata(job, params, base.name, dataset, network_module, spec, net_args, clip_skip, seed,
                              steps, mp, opt_desc, model_cfg)
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    save_lora(tensors, metadata, output)
    note(f"wrote {output} ({len(tensors)} tensors)")
    return {
        "steps": steps,
        "final_loss": losses[-1],
        "average_loss": loss_sum / loss_count,
        "losses": losses,
        "steps_per_s": steps / max(train_s, 1e-9),
        "step_durations": [b - a for a, b in zip([t_train] + step_ends[:-1], step_ends)],
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if is_cuda else None,
        "modules": n_unet + n_te,
        "output": str(output),
    }


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in sorted key order.

    The safetensors library writes the metadata map in hash-map order, which changes from
    process to process; sorting makes equal inputs give equal bytes. Tensor data and offsets
    are untouched (the header keeps its length: same content, other order).
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def save_lora(tensors: dict, metadata: dict, output: Path) -> None:
    """Write ``tensors`` + string ``metadata`` as safetensors to ``output``, atomically.

    The header is written in sorted order, so a rerun with the same inputs gives the same bytes.
    """
    from safetensors.torch import save

    data = canonical_safetensors(save(tensors, {k: str(v) for k, v in metadata.items()}))
    with atomic_path(output) as tmp:
        tmp.write_bytes(data)


def build_metadata(job, params, model_name, dataset, network_module, spec, net_args, clip_skip, seed, steps, mp,
                   opt_desc, model_cfg) -> dict[str, str]:
    """The safetensors header metadata (all strings), sd-scripts' ``ss_*`` and modelspec keys."""
    ts = _timestamp()
    name = params.get("name") or job.get("lora") or Path(job["output"]).stem
    res = dataset.datasets[0].resolution
    lr = params.get("lr")
    te_lr = params.get("text_encoder_lr")
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
        "ss_lr_scheduler": str(params.get("scheduler") or "cosine_with_restarts"),
        "ss_optimizer": opt_desc,
        "ss_network_module": network_module,
        "ss_network_dim": str(spec.dim),
        "ss_network_alpha": str(float(spec.alpha)),
        "ss_network_args": json.dumps(net_args),
        "ss_mixed_precision": mp,
        "ss_full_fp16": "False",
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_clip_skip": str(clip_skip),
        "ss_seed": str(seed),
        "ss_sd_model_name": model_name,
        "ss_vae_name": Path(model_cfg["vae"]).name if model_cfg.get("vae") else "None",
        "ss_resolution": f"({res[0]}, {res[1]})",
        "ss_gradient_checkpointing": str(bool(params.get("gradient_checkpointing"))),
        "ss_network_train_unet_only": str(bool(params.get("network_train_unet_only"))),
        "ss_cache_latents": "True",
        "ss_max_grad_norm": str(MAX_GRAD_NORM),
        "ss_caption_dropout_rate": "0.0",
        "ss_noise_offset": "None",
        "ss_tag_frequency": json.dumps(dataset.tag_frequency()),
        "ss_dataset_dirs": json.dumps(dataset.dataset_dirs()),
        "ss_training_comment": f"charbuild builtin trainer; lora {job.get('lora')}; variant {job.get('variant')}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.trigger_phrase": ", ".join(job.get("keywords") or []),
        "modelspec.date": datetime.fromtimestamp(ts, tz=timezone.utc).replace(tzinfo=None).isoformat(),
        "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.prediction_type": "epsilon",
    }
    md["ss_num_batches_per_epoch"] = str(sum(
        math.ceil(sum(it.num_repeats for it in ds.items if it.bucket == b) / ds.batch_size)
        for ds in dataset.datasets for b in {it.bucket for it in ds.items}
    ))
    md["ss_num_epochs"] = str(math.ceil(steps / max(1, int(md["ss_num_batches_per_epoch"]))))
    if clip_skip:
        md["modelspec.encoder_layer"] = str(clip_skip)
    return md


def _load_continue_from(network, path: Path) -> None:
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
    note(f"continuing from {path}: {len(missing)} missing, {len(unexpected)} unexpected keys")


def _cached_cond(cache, captions, tokenizer, text_encoder, clip_skip, device):
    import torch

    todo = [c for c in dict.fromkeys(captions) if c not in cache]
    if todo:
        with torch.no_grad():
            enc = encode_text(tokenizer, text_encoder, todo, clip_skip, device)
        for c, e in zip(todo, enc):
            cache[c] = e
    return torch.stack([cache[c] for c in captions])


def _current_lrs(optimizer, lr_scheduler) -> list[float]:
    try:
        if lr_scheduler is not None:
            return [float(x) for x in lr_scheduler.get_last_lr()]
        return [float(g["lr"]) for g in optimizer.param_groups]
    except (TypeError, KeyError, AttributeError, IndexError):
        return []


def _summary_writer(job: dict):
    vdir = job.get("variant_dir")
    if not vdir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        note("tensorboard is not installed: no TensorBoard logs")
        return None
    stamp = datetime.fromtimestamp(_timestamp()).strftime("%Y%m%d%H%M%S")
    prefix = f"{job.get('lora') or 'lora'}-{job.get('variant') or 'variant'}"
    return SummaryWriter(log_dir=str(Path(vdir) / "logs" / f"{prefix}-{stamp}" / "network_train"))


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
