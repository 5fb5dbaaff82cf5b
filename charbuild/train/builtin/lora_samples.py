"""Samples of an existing LoRA file, without training it again (the ``samples:`` targets).

:func:`render_lora_samples` loads the base model, adds the LoRA's weight changes to the
weights they adapt (multiplier 1: every module's ``ΔW = up·down·alpha/rank``, or its LoHa/LoKr
delta, through :mod:`charbuild.lora.io`) and renders the prompts with the training's
:class:`~.samples.SampleRenderer`: the same pipeline, scheduler, guidance, seeds and file
names as samples rendered during a training, so a ``samples:`` picture stands beside those in
the report's grid. Adding the deltas to the weights gives what the LoRA modules' forward adds
(up to float rounding) for any rank per module, which a compressed file has.

``python -m charbuild.train.builtin.lora_samples REQUEST.json`` runs it in a process of its own
(the build process never imports torch; :mod:`charbuild.train.samples_action` starts it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

from charbuild.errors import CharbuildError, TrainingError
from charbuild.layout import SAMPLES_DIR
from charbuild.sample_prompts import NATIVE_SIZE, SamplePrompt
from charbuild.train.job import ModelSpec


def _adapted_modules(base) -> dict:
    """kohya stem -> the torch module it adapts, for every module a LoRA/LoCon may adapt."""
    from .network import LoRANetwork, NetworkSpec

    every = NetworkSpec("lora", 1, 1.0, conv_dim=1, conv_alpha=1.0)  # finds 3x3 convs too (LoCon)
    encoders = (base.text_encoder, base.text_encoder_2) if base.arch == "sdxl" else base.text_encoder
    network = LoRANetwork(base.unet, encoders, every, arch=base.arch)
    return {m.stem: m._org[0] for m in list(network.unet_loras) + list(network.te_loras)}


def add_lora_to_model(base, lora_file: str | Path, weights: dict | None = None, saved: dict | None = None,
                      targets: dict | None = None) -> int:
    """Add the weight changes of ``lora_file`` to ``base``'s UNet and text encoder(s); the
    number of modules changed. TrainingError when the file adapts nothing of this model.

    ``weights``: block weights ({block: w}) to scale each module's change by, as a merge with
    them would (modules outside every block keep ×1). ``saved``: stem -> the weight before the
    change is kept there (first change only), for :func:`restore_weights`.
    """
    import torch

    from charbuild.lora.io import load_lora
    from charbuild.lora.merge import module_weight

    lora = load_lora(lora_file)
    targets = _adapted_modules(base) if targets is None else targets
    unknown = sorted(set(lora.modules) - set(targets))
    if len(unknown) == len(lora.modules):
        raise TrainingError(f"the LoRA adapts no module of the base model (a LoRA of another architecture?): "
                            f"{unknown[0]} …", path=lora_file)
    with torch.no_grad():
        for stem, module in lora.modules.items():
            if stem not in targets:
                continue
            scale = module_weight(stem, lora.arch, weights)[1] if weights is not None else 1.0
            if scale == 0.0:
                continue
            weight = targets[stem].weight
            if saved is not None and stem not in saved:
                saved[stem] = weight.detach().to("cpu", copy=True)
            weight += (module.delta().float() * scale).reshape(weight.shape).to(weight.device, weight.dtype)
    if unknown:
        print(f"charbuild: {len(unknown)} module(s) of the LoRA match nothing in the model, e.g. {unknown[0]}",
              file=sys.stderr)
    return len(lora.modules) - len(unknown)


def restore_weights(targets: dict, saved: dict) -> None:
    """Put back the weights :func:`add_lora_to_model` kept in ``saved`` (and forget them)."""
    import torch

    with torch.no_grad():
        for stem, original in saved.items():
            targets[stem].weight.copy_(original.to(targets[stem].weight.device))
    saved.clear()


def _renderer(model: ModelSpec, samples: tuple[SamplePrompt, ...], folder: str | Path, *, seed: int,
              project_root: str | Path, size: int | None, steps: int | None, v_prediction: bool,
              zero_terminal_snr: bool, subdir: str = SAMPLES_DIR):
    """(the base model on the render device, a SampleRenderer of ``samples`` into ``folder/subdir``)."""
    import torch

    from .loss import apply_zero_terminal_snr
    from .models import load_base_model
    from .samples import SampleRenderer

    from .device import choose_precision

    base = load_base_model(model.to_dict(), project_root, supported_archs=("sd15", "sdxl"))
    precision = choose_precision("fp16")  # a GPU's fp16, or a CPU's float32; CHARBUILD_DEVICE as for a training
    device, dtype = precision.device, precision.weight_dtype
    if device.type == "cpu":
        from .setup import choose_cpu_threads

        torch.set_num_threads(choose_cpu_threads())  # as a CPU training: spinning threads on busy cores ran 18x slower
    encoders = [te for te in (base.text_encoder, base.text_encoder_2) if te is not None]
    for part in [base.unet, *encoders]:
        part.to(device, dtype)
    scheduler = base.noise_scheduler
    if v_prediction and scheduler.config.prediction_type != "v_prediction":
        scheduler = type(scheduler).from_config(scheduler.config, prediction_type="v_prediction")
    if zero_terminal_snr or base.zero_terminal_snr:
        apply_zero_terminal_snr(scheduler)
    native = NATIVE_SIZE[base.arch]
    # the renderer's view of a training: its seed, clip skip and sample options, and the modules
    setup = SimpleNamespace(seed=int(seed), clip_skip=model.clip_skip,
                            job=SimpleNamespace(params=SimpleNamespace(sample_size=size, sample_steps=steps)))
    prep = SimpleNamespace(device=device, weight_dtype=dtype, vae=base.vae, unet=base.unet,
                           text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                           text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                           noise_scheduler=scheduler,
                           dataset=SimpleNamespace(datasets=[SimpleNamespace(resolution=(native, native))]))
    return base, SampleRenderer(setup, prep, samples, folder, subdir)


def render_lora_samples(lora_file: str | Path, model: ModelSpec, samples: tuple[SamplePrompt, ...],
                        folder: str | Path, *, step: int, seed: int, project_root: str | Path,
                        size: int | None = None, steps: int | None = None, v_prediction: bool = False,
                        zero_terminal_snr: bool = False) -> list[Path]:
    """Render ``samples`` of the LoRA ``lora_file`` on the base model ``model`` into
    ``<folder>/samples/<step>/<name>.png``, seeds ``seed + index``; the files written.

    ``size``/``steps`` None: as during a training (the native size and 20 steps on a GPU,
    128 px and 4 steps on a CPU). ``v_prediction``/``zero_terminal_snr``: the training's options.
    """
    base, renderer = _renderer(model, samples, folder, seed=seed, project_root=project_root, size=size, steps=steps,
                               v_prediction=v_prediction, zero_terminal_snr=zero_terminal_snr)
    add_lora_to_model(base, lora_file)
    print(f"charbuild: {renderer.describe()} of {Path(lora_file).name} on {base.name}", file=sys.stderr, flush=True)
    return renderer.render(step)


def render_rows(rows: list[dict], model: ModelSpec, samples: tuple[SamplePrompt, ...], folder: str | Path, *,
                seed: int, project_root: str | Path, size: int | None = None, steps: int | None = None,
                v_prediction: bool = False, zero_terminal_snr: bool = False) -> dict[str, list[Path]]:
    """Render ``samples`` once per row of an exploration into ``<folder>/explore/<row>/<name>.png``:
    each row (``{"name", "file", "weights"}``) is the base model plus ``file``'s changes (none
    for ``file`` None: the base model alone), scaled by the row's block ``weights`` when given.
    The base model is loaded once; the weights are restored between rows. The files by row."""
    from charbuild.layout import EXPLORE_DIR

    base, renderer = _renderer(model, samples, folder, seed=seed, project_root=project_root, size=size, steps=steps,
                               v_prediction=v_prediction, zero_terminal_snr=zero_terminal_snr, subdir=EXPLORE_DIR)
    targets = _adapted_modules(base)
    saved: dict = {}
    print(f"charbuild: {len(rows)} row(s) of {renderer.describe()} on {base.name}", file=sys.stderr, flush=True)
    written = {}
    for k, row in enumerate(rows, 1):
        restore_weights(targets, saved)
        if row.get("file"):
            add_lora_to_model(base, row["file"], row.get("weights"), saved, targets)
        print(f"charbuild: row {k}/{len(rows)}: {row['name']}", file=sys.stderr, flush=True)
        written[row["name"]] = renderer.render(row["name"])
    restore_weights(targets, saved)
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m charbuild.train.builtin.lora_samples REQUEST.json`` (written by samples_action)."""
    args = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    samples = tuple(SamplePrompt(name, prompt, index) for name, prompt, index in request["samples"])
    if "rows" in request:
        return _main_rows(request, samples)
    try:
        written = render_lora_samples(request["lora_file"], ModelSpec.from_dict(request["model"]), samples,
                                      request["folder"], step=request["step"], **_options(request))
    except CharbuildError as exc:
        print(f"charbuild: error: {exc}", file=sys.stderr)
        return 2
    print(f"charbuild: {len(written)} sample(s) in {Path(request['folder']).as_posix()}/samples/{request['step']}",
          file=sys.stderr)
    return 0


def _options(request: dict) -> dict:
    """The renderer's keyword arguments in a request (samples_action.render_options wrote them)."""
    return {k: request[k] for k in ("seed", "project_root", "size", "steps", "v_prediction", "zero_terminal_snr")}


def _main_rows(request: dict, samples: tuple[SamplePrompt, ...]) -> int:
    try:
        written = render_rows(request["rows"], ModelSpec.from_dict(request["model"]), samples, request["folder"],
                              **_options(request))
    except CharbuildError as exc:
        print(f"charbuild: error: {exc}", file=sys.stderr)
        return 2
    print(f"charbuild: {sum(map(len, written.values()))} picture(s) in {len(written)} row(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
