"""The kohya-ss sd-scripts backend: the original's ``train_network.py`` command, exactly.

:func:`build_command` turns a training job (see docs/architecture.md, "The training
job") into an argument list; the runner starts it with ``cwd = project_root`` (so
the dataset TOML's relative ``image_dir`` resolve) and finds the result at
:func:`raw_output_path`.

Spelling rule: single-valued options are one token ``--flag=value``; options with
several values (``--network_args``, ``--optimizer_args``) are the flag followed by
one token per value; switches are bare ``--flag``. The accelerate prefix is
``accelerate launch --num_cpu_threads_per_process 1`` as the original wrote it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import TrainingError
from .variants import DEFAULT_SCHEDULER, format_lr, output_name


def _script(job: Mapping[str, Any]) -> Path:
    trainer = job["trainer"]
    sd = trainer.get("sd_scripts")
    if not sd:
        raise TrainingError(
            "the sd-scripts backend needs trainer.sd_scripts: the folder of a kohya-ss sd-scripts checkout"
        )
    folder = Path(sd)
    if not folder.is_absolute():
        folder = Path(job["project_root"]) / folder
    arch = job["model"].get("arch", "sd15")
    return folder / ("sdxl_train_network.py" if arch == "sdxl" else "train_network.py")


def raw_output_path(job: Mapping[str, Any]) -> Path:
    """Where sd-scripts writes the LoRA: ``<dir of job["output"]>/<output_name>.safetensors``."""
    return Path(job["output"]).parent / f"{output_name(job['lora'], job['params'])}.safetensors"


def _resolution(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{value[0]},{value[1]}"
    return str(value)


def _num(value: Any) -> str:
    """An int-valued number without a trailing ``.0`` (``64``), other floats as repr."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build_command(job: Mapping[str, Any]) -> list[str]:
    """The sd-scripts training command for ``job``, as an argument list (never a shell string).

    ``--output_dir`` is the folder of ``job["output"]`` (the runner points it at its
    temporary folder). With ``trainer.accelerate`` set the command is
    ``[accelerate, "launch", "--num_cpu_threads_per_process", "1", script, ...]``;
    with ``accelerate = None`` it is ``[trainer.python, script, ...]``. SDXL uses
    ``sdxl_train_network.py`` and has no ``--clip_skip``. ``clip_skip`` is the
    params' value, else the model's (default 2). For AdaFactor the scheduler is
    left to sd-scripts (its adafactor schedule, as the original did) unless the
    params name one other than the default.
    """
    params = job["params"]
    model = job["model"]
    trainer = job["trainer"]
    arch = model.get("arch", "sd15")
    base = model.get("base")
    if not base or base == "tiny":
        raise TrainingError(
            f"model.base {base!r} cannot be trained by sd-scripts: set model.base to a checkpoint "
            "(.safetensors/.ckpt) or a diffusers folder, or use the builtin backend"
        )
    script = _script(job)
    name = output_name(job["lora"], params)
    out_dir = Path(job["output"]).parent
    variant_dir = Path(job["variant_dir"])

    accelerate = trainer.get("accelerate")
    if accelerate:
        cmd = [str(accelerate), "launch", "--num_cpu_threads_per_process", "1", str(script)]
    else:
        cmd = [str(trainer.get("python") or "python"), str(script)]

    cmd.append(f"--pretrained_model_name_or_path={base}")
    if model.get("vae"):
        cmd.append(f"--vae={model['vae']}")
    cmd += [
        f"--dataset_config={job['dataset_toml']}",
        f"--output_dir={out_dir}",
        f"--output_name={name}",
        f"--network_module={params['network_module']}",
        f"--network_dim={params['dim']}",
        f"--network_alpha={_num(params['alpha'])}",
    ]
    network_args = []
    if params.get("conv_dim"):
        network_args += [f"conv_dim={params['conv_dim']}", f"conv_alpha={_num(params['conv_alpha'])}"]
    if params.get("algo"):
        network_args.append(f"algo={params['algo']}")
    if network_args:
        cmd += ["--network_args", *network_args]

    optimizer = params["optimizer"]
    cmd.append(f"--optimizer_type={optimizer}")
    if params.get("optimizer_args"):
        cmd += ["--optimizer_args", *params["optimizer_args"]]
    if params.get("lr") is not None:
        cmd.append(f"--learning_rate={format_lr(params['lr'])}")
    if params.get("text_encoder_lr") is not None:
        cmd.append(f"--text_encoder_lr={format_lr(params['text_encoder_lr'])}")
    scheduler = params.get("scheduler") or DEFAULT_SCHEDULER
    if optimizer != "adafactor" or scheduler != DEFAULT_SCHEDULER:
        cmd.append(f"--lr_scheduler={scheduler}")

    cmd.append(f"--max_train_steps={params['steps']}")
    if arch != "sdxl":
        clip_skip = params.get("clip_skip") or model.get("clip_skip") or 2
        cmd.append(f"--clip_skip={clip_skip}")
    cmd += [f"--logging_dir={variant_dir / 'logs'}", f"--log_prefix={name}"]
    if trainer.get("xformers"):
        cmd.append("--xformers")
    cmd += [
        "--save_model_as=safetensors",
        f"--mixed_precision={params.get('mixed_precision', 'fp16')}",
        f"--save_precision={params.get('save_precision', 'fp16')}",
    ]
    if params.get("gradient_checkpointing", True):
        cmd.append("--gradient_checkpointing")
    cmd += ["--persistent_data_loader_workers", f"--seed={params.get('seed', 31337)}"]
    if job.get("continue_from"):
        cmd.append(f"--network_weights={job['continue_from']}")
    if params.get("network_train_unet_only"):
        cmd.append("--network_train_unet_only")
    if params.get("resolution") is not None:
        cmd.append(f"--resolution={_resolution(params['resolution'])}")
    if params.get("min_bucket_reso") is not None:
        cmd.append(f"--min_bucket_reso={params['min_bucket_reso']}")
    if params.get("max_bucket_reso") is not None:
        cmd.append(f"--max_bucket_reso={params['max_bucket_reso']}")
    cmd += [str(a) for a in trainer.get("extra_args") or []]
    cmd += [str(a) for a in params.get("extra_args") or []]
    return cmd
