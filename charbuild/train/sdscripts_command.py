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
from typing import Any

from ..dataset_toml import writes_color_aug
from ..errors import TrainingError
from ..fsutil import under_root
from .job import TrainJob, scheduler_in_effect
from .variants import DEFAULT_DATA_LOADER_WORKERS, DEFAULT_SCHEDULER, format_lr, no_half_vae_in_effect


def _script(job: TrainJob) -> Path:
    sd = job.trainer.sd_scripts
    if not sd:
        raise TrainingError(
            "the sd-scripts backend needs trainer.sd_scripts: the folder of a kohya-ss sd-scripts checkout"
        )
    folder = under_root(job.project_root, sd)
    return folder / ("sdxl_train_network.py" if job.model.arch == "sdxl" else "train_network.py")


def raw_output_path(job: TrainJob) -> Path:
    """Where sd-scripts writes the LoRA: ``<dir of job.output>/<lora>-<variant>.safetensors``."""
    return Path(job.output).parent / f"{job.title}.safetensors"


def data_loader_workers(job: TrainJob) -> int:
    """The data-loader workers sd-scripts will run: ``params.data_loader_workers``, unless an
    extra argument ``--max_data_loader_n_workers`` (the last one wins, as in argparse) says otherwise."""
    workers = job.params.data_loader_workers
    args = [str(a) for a in (*job.trainer.extra_args, *job.params.extra_args)]
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        if flag == "--max_data_loader_n_workers":
            value = value if sep else (args[i + 1] if i + 1 < len(args) else "")
            if value.strip().isdigit():
                workers = int(value)
    return workers


def _resolution(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"{value[0]},{value[1]}"
    return str(value)


def _num(value: Any) -> str:
    """An int-valued number without a trailing ``.0`` (``64``), other floats as repr."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def loss_and_precision_flags(job: TrainJob) -> list[str]:
    """The flags of the noise schedule, the loss weighting and the VAE precision, for both scripts.

    ``--noise_offset``, ``--min_snr_gamma``, ``--v_parameterization`` (``params.v_prediction``),
    ``--zero_terminal_snr`` as the params say, and ``--no_half_vae`` as
    :func:`~charbuild.train.variants.no_half_vae_in_effect` says (left out: SDXL yes, SD1.5 no).
    ``--cache_latents`` where the dataset TOML allows it (no ``color_aug``: SDXL, see
    :func:`charbuild.dataset_toml.writes_color_aug`), as the builtin always does. SDXL UNet-only training
    also gets ``--cache_text_encoder_outputs`` (the frozen encoders give every caption the same
    output, so sd-scripts encodes each once and frees them); ``cache_text_encoder_outputs = true``
    brings ``--network_train_unet_only`` with it, which sd-scripts requires. train_network.py
    (SD1.x) has no text-encoder cache: the flag is not passed there.
    """
    params, flags = job.params, []
    if params.noise_offset:
        flags.append(f"--noise_offset={_num(params.noise_offset)}")
    if params.min_snr_gamma is not None:
        flags.append(f"--min_snr_gamma={_num(params.min_snr_gamma)}")
    if params.v_prediction:
        flags.append("--v_parameterization")
    if params.zero_terminal_snr:
        flags.append("--zero_terminal_snr")
    if no_half_vae_in_effect(params.no_half_vae, job.model.arch):
        flags.append("--no_half_vae")
    if not writes_color_aug(job.model.arch):
        flags.append("--cache_latents")
    if job.model.arch == "sdxl" and (params.network_train_unet_only or params.cache_text_encoder_outputs):
        if not params.network_train_unet_only:
            flags.append("--network_train_unet_only")
        flags.append("--cache_text_encoder_outputs")
    return flags


def build_command(job: TrainJob) -> list[str]:
    """The sd-scripts training command for ``job``, as an argument list (never a shell string).

    ``--output_dir`` is the folder of ``job.output`` (the runner points it at its
    temporary folder). With ``trainer.accelerate`` set the command is
    ``[accelerate, "launch", "--num_cpu_threads_per_process", "1", script, ...]``;
    with ``accelerate = None`` it is ``[trainer.python, script, ...]``. SDXL uses
    ``sdxl_train_network.py`` and has no ``--clip_skip``; the loss and VAE flags are
    :func:`loss_and_precision_flags`'s. For AdaFactor the scheduler is
    left to sd-scripts (its adafactor schedule, as the original did) unless the
    params name one other than the default. ``--output_name`` is ``<lora>-<variant>``, the
    deliverable's stem (sd-scripts writes it into the file as ``ss_output_name``). The data
    loader's ``--persistent_data_loader_workers`` is passed only with workers > 0. Every value comes from the job as it is:
    the defaults live in :class:`~charbuild.train.variants.TrainParams` and
    :mod:`charbuild.train.job`.
    """
    params, model, trainer = job.params, job.model, job.trainer
    base = model.base
    if not base or base in ("tiny", "demo"):
        raise TrainingError(
            f"model.base {base!r} cannot be trained by sd-scripts: set model.base to a checkpoint "
            "(.safetensors/.ckpt) or a diffusers folder, or use the builtin backend"
        )
    script = _script(job)
    name = job.title  # --output_name is also ss_output_name inside the file: the web UIs' alias
    out_dir = Path(job.output).parent
    variant_dir = Path(job.variant_dir)

    if trainer.accelerate:
        cmd = [str(trainer.accelerate), "launch", "--num_cpu_threads_per_process", "1", str(script)]
    else:
        cmd = [str(trainer.python or "python"), str(script)]

    cmd.append(f"--pretrained_model_name_or_path={base}")
    if model.vae:
        cmd.append(f"--vae={model.vae}")
    cmd += [f"--dataset_config={job.dataset_toml}", f"--output_dir={out_dir}", f"--output_name={name}"]
    cmd += network_flags(params, lycoris_preset_path(job) if params.network_module == LYCORIS_MODULE else None)
    cmd += optimizer_flags(params)
    cmd.append(f"--max_train_steps={params.steps}")
    if model.arch != "sdxl":
        cmd.append(f"--clip_skip={params.clip_skip}")
    cmd += [f"--logging_dir={variant_dir / 'logs'}", f"--log_prefix={name}"]
    # PyTorch's memory-efficient attention unless xformers is asked for (sd-scripts' default is
    # the plain attention: slower, and O(n²) memory at 1024 px)
    cmd.append("--xformers" if trainer.xformers else "--sdpa")
    cmd += [
        "--save_model_as=safetensors",
        f"--mixed_precision={params.mixed_precision}",
        f"--save_precision={params.save_precision}",
    ]
    if params.gradient_checkpointing:
        cmd.append("--gradient_checkpointing")
    if params.data_loader_workers != DEFAULT_DATA_LOADER_WORKERS:
        cmd.append(f"--max_data_loader_n_workers={params.data_loader_workers}")
    # sd-scripts stops with "persistent_workers option needs num_workers > 0" otherwise
    if data_loader_workers(job) > 0:
        cmd.append("--persistent_data_loader_workers")
    cmd += run_flags(job)
    cmd += sample_args(job)
    cmd += loss_and_precision_flags(job)
    cmd += [str(a) for a in trainer.extra_args]
    cmd += [str(a) for a in params.extra_args]
    return cmd


# ---------------------------------------------------------------------------- samples

#: The prompt file beside the job's output (the runner's temp folder), one line per sample.
SAMPLE_PROMPTS_NAME = "sample_prompts.txt"
#: sd-scripts writes its samples into ``<output_dir>/sample``.
SD_SCRIPTS_SAMPLE_DIR = "sample"


def sample_prompts_path(job: TrainJob) -> Path:
    """``<dir of job.output>/sample_prompts.txt``: what ``--sample_prompts`` names."""
    return Path(job.output).parent / SAMPLE_PROMPTS_NAME


def sample_args(job: TrainJob) -> list[str]:
    """sd-scripts' sampling flags for ``job`` (none when ``sample_every`` is off).

    ``--sample_every_n_steps`` samples at every multiple of it (sd-scripts samples at the end of
    a step-counted training only when the steps are such a multiple); DDIM, as the builtin;
    ``--sample_at_first``: step 0, the baseline the identity score starts from (the LoRA's
    initial weights change nothing), as the builtin's step 0.
    """
    if not job.params.sample_every:
        return []
    return [f"--sample_prompts={sample_prompts_path(job)}", f"--sample_every_n_steps={job.params.sample_every}",
            "--sample_sampler=ddim", "--sample_at_first"]


def sample_prompt_text(job: TrainJob) -> str:
    """The ``--sample_prompts`` file's text: the job's samples with their seeds, size and steps."""
    from ..sample_prompts import DEFAULT_SAMPLE_STEPS, NATIVE_SIZE, sd_scripts_prompt_file
    from .observed import samples_of

    size = job.params.sample_size or NATIVE_SIZE.get(job.model.arch, 512)
    return sd_scripts_prompt_file(samples_of(job), seed=job.params.seed, width=size, height=size,
                                  steps=job.params.sample_steps or DEFAULT_SAMPLE_STEPS)


def write_sample_prompts(job: TrainJob) -> Path | None:
    """Write the prompt file of ``job`` (atomically) when it samples; its path, or None."""
    from ..fsutil import write_text_atomic

    if not job.params.sample_every:
        return None
    path = sample_prompts_path(job)
    write_text_atomic(path, sample_prompt_text(job))
    return path


def collect_samples(job: TrainJob) -> list[Path]:
    """Move sd-scripts' ``sample/<output_name>_<step>_<line>_<time>_<seed>.png`` files to
    ``samples/<step>/<name>.png`` beside the job's output; the files moved. Of two files for one
    step and line (a resumed run) the later name wins."""
    from ..fsutil import replace_file
    from ..layout import SAMPLES_DIR
    from ..sample_prompts import sd_scripts_sample_name
    from .observed import samples_of

    source = Path(job.output).parent / SD_SCRIPTS_SAMPLE_DIR
    if not source.is_dir():
        return []
    samples = samples_of(job)
    moved = []
    for f in sorted(source.iterdir()):
        found = sd_scripts_sample_name(f.name, job.title, samples)
        if found is None or not f.is_file():
            continue
        step, name = found
        target = Path(job.output).parent / SAMPLES_DIR / str(step) / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_file(f, target)
        moved.append(target)
    return moved


# ---------------------------------------------------------------------------- LyCORIS

LYCORIS_MODULE = "lycoris.kohya"
#: The LyCORIS preset file beside the job's output (the runner's temp folder).
LYCORIS_PRESET_NAME = "lycoris_preset.toml"


def lycoris_preset_path(job: TrainJob) -> Path:
    """``<dir of job.output>/lycoris_preset.toml``: what ``--network_args preset=`` names."""
    return Path(job.output).parent / LYCORIS_PRESET_NAME


def lycoris_preset_text(params) -> str:
    """The LyCORIS preset of a Locon/Loha variant: the modules kohya's ``networks.lora`` picks.

    LyCORIS's default preset ("full") adapts more than kohya's LoRA does (``conv_in``,
    ``conv_out``, ``time_embedding.linear_1/2``), and from lycoris-lora 4.x on it names
    ``TimestepEmbedding`` among its module types as well as ``time_embedding.linear_1`` by
    name, so it builds that module twice and stops (``AssertionError: duplicated lora name:
    lora_unet_time_embedding_linear_1``) on an SD1.5/SDXL UNet. This preset gives LyCORIS
    (2.x to 4.x read the same keys) kohya's choice, the one the builtin trainer's network
    makes: the linear layers and 1x1 convs inside ``Transformer2DModel``; with ``conv_dim``
    also everything inside ``ResnetBlock2D``/``Downsample2D``/``Upsample2D`` (3x3 convs at
    ``conv_dim``); the text encoders' ``CLIPAttention``/``CLIPMLP`` linears. Every key is
    written: LyCORIS keeps a preset's values on its class, and an absent key would keep the
    default's.
    """
    conv = bool(params.conv_dim)
    unet = ["Transformer2DModel"] + (["ResnetBlock2D", "Downsample2D", "Upsample2D"] if conv else [])
    text = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]

    def toml_list(items: list[str]) -> str:
        return "[" + ", ".join(f'"{x}"' for x in items) + "]"

    return (
        "# charbuild: kohya networks.lora's modules (the builtin trainer's), not LyCORIS's \"full\" preset\n"
        f"enable_conv = {'true' if conv else 'false'}\n"
        f"unet_target_module = {toml_list(unet)}\n"
        "unet_target_name = []\n"
        f"text_encoder_target_module = {toml_list(text)}\n"
        "text_encoder_target_name = []\n"
    )


def write_lycoris_preset(job: TrainJob) -> Path | None:
    """Write the LyCORIS preset of a ``lycoris.kohya`` job (atomically); its path, or None."""
    from ..fsutil import write_text_atomic

    if job.params.network_module != LYCORIS_MODULE:
        return None
    path = lycoris_preset_path(job)
    write_text_atomic(path, lycoris_preset_text(job.params))
    return path


def network_flags(params, lycoris_preset: Path | None = None) -> list[str]:
    """``--network_module`` … ``--network_args``: the network a variant trains.

    ``lycoris_preset`` (the file :func:`write_lycoris_preset` writes) is passed to LyCORIS as
    ``preset=<path>``, last of the network arguments.
    """
    cmd = [f"--network_module={params.network_module}", f"--network_dim={params.dim}",
           f"--network_alpha={_num(params.alpha)}"]
    network_args = []
    if params.conv_dim:
        network_args += [f"conv_dim={params.conv_dim}", f"conv_alpha={_num(params.conv_alpha)}"]
    if params.algo:
        network_args.append(f"algo={params.algo}")
    if lycoris_preset is not None:
        network_args.append(f"preset={lycoris_preset}")
    if network_args:
        cmd += ["--network_args", *network_args]
    return cmd


def optimizer_flags(params) -> list[str]:
    """The optimizer, its arguments, the learning rates and the schedule."""
    cmd = [f"--optimizer_type={params.optimizer}"]
    if params.optimizer_args:
        cmd += ["--optimizer_args", *params.optimizer_args]
    if params.lr is not None:
        cmd.append(f"--learning_rate={format_lr(params.lr)}")
    if params.text_encoder_lr is not None:
        cmd.append(f"--text_encoder_lr={format_lr(params.text_encoder_lr)}")
    # sd-scripts runs its adafactor schedule whenever Adafactor's relative step is on: the
    # original command left the flag out then; any other schedule is spelled out
    if scheduler_in_effect(params.optimizer, params.optimizer_args, params.scheduler) != "adafactor" or params.scheduler != DEFAULT_SCHEDULER:
        cmd.append(f"--lr_scheduler={params.scheduler}")
    return cmd


def run_flags(job: TrainJob) -> list[str]:
    """Seed, the LoRA to continue from, UNet-only training and the bucket sizes."""
    params = job.params
    cmd = [f"--seed={params.seed}"]
    if job.continue_from:
        cmd.append(f"--network_weights={job.continue_from}")
    if params.network_train_unet_only:
        cmd.append("--network_train_unet_only")
    if params.resolution is not None:
        cmd.append(f"--resolution={_resolution(params.resolution)}")
    if params.min_bucket_reso is not None:
        cmd.append(f"--min_bucket_reso={params.min_bucket_reso}")
    if params.max_bucket_reso is not None:
        cmd.append(f"--max_bucket_reso={params.max_bucket_reso}")
    return cmd
