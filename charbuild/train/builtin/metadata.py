"""The header of a LoRA file the builtin trainer writes: sd-scripts' ``ss_*`` and ``modelspec.*``
keys (as ``train_network.py`` writes them) and charbuild's own (docs/lora-metadata.md).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path


from .setup import LossSetup, Setup, _timestamp, resolve_loss
from .stepping import MAX_GRAD_NORM


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
    steps_done: int | None = None,
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
    that file plus this run's). A save before the end (``steps_done``, ``save_every``) has
    ``ss_steps`` = ``steps_done`` and counts those in ``charbuild.total_steps``.
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
    done = steps if steps_done is None else steps_done
    md = {
        "ss_training_started_at": str(ts),
        "ss_output_name": name,
        "ss_learning_rate": str(lr),
        "ss_text_encoder_lr": str(te_lr if te_lr is not None else lr),
        "ss_unet_lr": str(lr),
        "ss_num_train_images": str(dataset.num_train_images),
        "ss_max_train_steps": str(steps),
        "ss_steps": str(done),
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
        **_modelspec(name, job.keywords, ts, res, loss.v_prediction),
    }
    md.update(_arch_and_loss_keys(sdxl, loss))
    md["ss_num_batches_per_epoch"] = str(batches_per_epoch(dataset))
    md["ss_num_epochs"] = str(math.ceil(steps / max(1, int(md["ss_num_batches_per_epoch"]))))
    if clip_skip:
        md["modelspec.encoder_layer"] = str(clip_skip)
    if prior_steps is not None:
        md["charbuild.continue_from"] = setup.continue_from.name
        md["charbuild.total_steps"] = str(prior_steps + done)
    return md


def _modelspec(name: str, keywords, ts: float, res, v_prediction: bool) -> dict[str, str]:
    """The ``modelspec.*`` keys of an SD1.5 LoRA (SDXL's architecture keys replace two of them)."""
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.trigger_phrase": ", ".join(keywords),
        "modelspec.date": datetime.fromtimestamp(ts, tz=timezone.utc).replace(tzinfo=None).isoformat(),
        "modelspec.resolution": f"{res[0]}x{res[1]}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }


def batches_per_epoch(dataset) -> int:
    """Batches of one epoch as sd-scripts counts them: per dataset and bucket, repeats / batch size, rounded up."""
    return sum(
        math.ceil(sum(it.num_repeats for it in ds.items if it.bucket == b) / ds.batch_size)
        for ds in dataset.datasets for b in {it.bucket for it in ds.items}
    )


def _arch_and_loss_keys(sdxl: bool, loss: LossSetup) -> dict[str, str]:
    """SDXL's version keys; the loss options as sd-scripts writes them (SDXL always, SD1.x when set)."""
    md = dict(SDXL_METADATA) if sdxl else {}
    if sdxl or loss.min_snr_gamma is not None:
        md["ss_min_snr_gamma"] = str(loss.min_snr_gamma)
    if sdxl or loss.zero_terminal_snr:
        md["ss_zero_terminal_snr"] = str(loss.zero_terminal_snr)
    return md
