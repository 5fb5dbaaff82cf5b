"""The builtin trainer's GPU path on the CPU: fp16 (autocast + GradScaler) and bf16 with half base
weights (``CHARBUILD_CPU_HALF=1``), non-finite steps skipped, saves before the end, and samples or
validation that run out of memory.

The tiny models train in a second or two per run; the SD1.5 and SDXL runs not marked ``slow``
cover fp16 and bf16, LoRA and LoHa, v-prediction with zero-terminal SNR, min-SNR-γ, cached
text-encoder outputs, samples and validation between them.
"""

from __future__ import annotations

import dataclasses

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from conftest import builtin_job, make_tiny_dataset, make_tiny_sdxl_dataset  # noqa: E402

from charbuild.report.metrics import read_metrics  # noqa: E402
from charbuild.train.builtin import trainer  # noqa: E402
from charbuild.train.builtin.device import (  # noqa: E402
    CPU_HALF_ENV,
    DEVICE_ENV,
    choose_precision,
    grad_scaler,
    require_torch,
    torch_version,
)
from charbuild.train.builtin.models import UnsupportedError  # noqa: E402
from charbuild.train.builtin.stepping import Stepper  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _half_on_the_cpu(reproducible_training):
    mp = pytest.MonkeyPatch()
    mp.setenv(CPU_HALF_ENV, "1")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def sd15_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("half15")
    make_tiny_dataset(root)
    return root


@pytest.fixture(scope="module")
def sdxl_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("halfxl")
    make_tiny_sdxl_dataset(root)
    return root


# --------------------------------------------------------------------------- device and precision rules


def test_precision_choice():
    assert choose_precision("fp16", {DEVICE_ENV: "cpu"}).weight_dtype == torch.float32
    assert "needs a GPU" in choose_precision("bf16", {DEVICE_ENV: "cpu"}).why
    half = choose_precision("fp16", {DEVICE_ENV: "cpu", CPU_HALF_ENV: "1"})
    assert half.weight_dtype == torch.float16 and half.half and not half.why
    assert choose_precision("bf16", {DEVICE_ENV: "cpu", CPU_HALF_ENV: "1"}).weight_dtype == torch.bfloat16
    assert choose_precision("no", {DEVICE_ENV: "cpu", CPU_HALF_ENV: "1"}).weight_dtype == torch.float32
    assert grad_scaler(half) is not None and grad_scaler(choose_precision("bf16", {CPU_HALF_ENV: "1", DEVICE_ENV: "cpu"})) is None
    with pytest.raises(UnsupportedError, match="not a device"):
        choose_precision("no", {DEVICE_ENV: "gpu0"})


def test_an_old_torch_is_named_with_the_fix(monkeypatch):
    assert torch_version("2.13.0+cpu") == (2, 13) and torch_version("2.3.0a0") == (2, 3)
    monkeypatch.setattr(torch, "__version__", "2.1.2+cu121")
    with pytest.raises(UnsupportedError, match=r"torch>=2\.3"):
        require_torch()


def _tiny_stepper(scaler=None):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return model, Stepper(opt, sched, list(model.parameters()), scaler)


@pytest.mark.parametrize("scaled", [False, True], ids=["bf16-or-fp32", "fp16-scaler"])
def test_a_non_finite_step_changes_no_weight_and_no_learning_rate(scaled):
    scaler = torch.amp.GradScaler("cpu") if scaled else None
    model, stepper = _tiny_stepper(scaler)
    x = torch.ones(2, 3)
    value, stepped = stepper(model(x).pow(2).mean())
    assert stepped and math.isfinite(value)
    before = [p.detach().clone() for p in model.parameters()]
    lr, scale = stepper.lr_scheduler.get_last_lr(), scaler.get_scale() if scaled else None
    value, stepped = stepper(model(x).pow(2).mean() * float("inf"))
    assert not stepped and math.isinf(value) and stepper.skipped == [2]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert stepper.lr_scheduler.get_last_lr() == lr
    assert all(p.grad is None for p in model.parameters())
    if scaled:
        assert scaler.get_scale() == scale / 2  # as GradScaler.step would: the scale backs off
    value, stepped = stepper(model(x).pow(2).mean())
    assert stepped and not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --------------------------------------------------------------------------- whole trainings in half precision


def _inject_inf_at(monkeypatch, step: int) -> None:
    """Make the loss of ``step`` infinite (its gradients too), as an fp16 overflow would."""
    real, calls = trainer.batch_loss, []

    def batch_loss(setup, prep, batch):
        calls.append(1)
        loss = real(setup, prep, batch)
        return loss * float("inf") if len(calls) == step else loss

    monkeypatch.setattr(trainer, "batch_loss", batch_loss)


def _check_half_run(summary: dict, job: dict, dtype, injected: int | None) -> dict:
    losses = summary["losses"]
    assert len(losses) == job.params.steps
    assert all(math.isfinite(x) for i, x in enumerate(losses, 1) if i != injected)
    if injected:
        assert math.isinf(losses[injected - 1]) and injected in summary["skipped_steps"]
    sd = load_file(job.output)
    assert sd and {v.dtype for v in sd.values()} == {dtype}
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    assert any(bool(v.abs().sum()) for k, v in sd.items() if "lora_up" in k or "hada_w2_a" in k)  # it learned
    with safe_open(job.output, "pt") as f:
        return f.metadata()


def test_sd15_fp16_lora_vpred_ztsnr_with_samples_validation_skip_and_saves(sd15_project, monkeypatch, capfd):
    job = builtin_job(sd15_project, "Lora3x3", "fp16", steps=4, v_prediction=True, zero_terminal_snr=True,
                         sample_every=2, sample_steps=1, sample_size=64, validation_every=2, save_every=2)
    _inject_inf_at(monkeypatch, 3)
    summary = trainer.run_job(job)
    md = _check_half_run(summary, job, torch.float16, injected=3)
    assert md["modelspec.prediction_type"] == "v" and md["ss_zero_terminal_snr"] == "True"
    out = capfd.readouterr().out
    assert "step 3: loss inf or its gradients are not finite: step skipped (fp16 loss scale lowered)" in out
    assert "1 step(s) skipped (non-finite): [3]" in out
    log = read_metrics(Path(job.variant_dir) / "metrics.jsonl")
    assert [s for s, _ in log.loss] == [1, 2, 4] and [s for s, _ in log.val_loss] == [0, 2, 4]
    assert all(math.isfinite(v) for _, v in log.val_loss)
    assert sorted(p.name for p in (Path(job.variant_dir) / "samples" / "4").iterdir())
    # save_every: the LoRA after step 2 beside the variant (not in a temp folder), counting 2 steps
    saved = Path(job.variant_dir) / "saves" / "krnk-fp16-step00000002.safetensors"
    with safe_open(str(saved), "pt") as f:
        assert f.metadata()["ss_steps"] == "2" and f.metadata()["ss_max_train_steps"] == "4"
    assert not list((Path(job.variant_dir) / "saves").glob("*step00000004*"))  # the end is the raw file


def test_sdxl_bf16_loha_unet_only_cached_text_min_snr(sdxl_project, monkeypatch, capfd):
    job = builtin_job(sdxl_project, "Loha", "bf16", base="tiny-sdxl", steps=3, mixed_precision="bf16", save_precision="bf16",
                         network_train_unet_only=True, cache_text_encoder_outputs=True, min_snr_gamma=5.0,
                         sample_every=3, sample_steps=1, sample_size=64, validation_every=3)
    moved = []
    real_to = torch.nn.Module.to

    def spy_to(module, *args, **kwargs):
        if type(module).__name__.startswith("CLIPTextModel"):
            moved.append(args)
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    _inject_inf_at(monkeypatch, 2)
    summary = trainer.run_job(job)
    md = _check_half_run(summary, job, torch.bfloat16, injected=2)
    assert md["ss_min_snr_gamma"] == "5.0" and md["ss_network_train_unet_only"] == "True"
    out = capfd.readouterr().out
    assert "step 2: loss inf or its gradients are not finite: step skipped\n" in out
    # the encoders: to the weight dtype, parked in fp32 after caching, and moved for the samples
    # only (there and back, for step 0's baseline and for step 3); the validations read the cache
    # and leave them where they are
    loaded_and_parked = 2 * 2
    assert len(moved) == loaded_and_parked + 2 * 2 * 2


@pytest.mark.slow
@pytest.mark.parametrize("arch, network, precision", [("sd15", "Loha", "bf16"), ("sdxl", "Lora3x3", "fp16")])
def test_the_other_half_combinations(sd15_project, sdxl_project, arch, network, precision):
    root, base = (sd15_project, "tiny") if arch == "sd15" else (sdxl_project, "tiny-sdxl")
    job = builtin_job(root, network, f"{arch}-{precision}", base=base, steps=3, mixed_precision=precision,
                      save_precision=precision, validation_every=3)
    _check_half_run(trainer.run_job(job), job, getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[precision]), None)


# --------------------------------------------------------------------------- what does not end a training


def test_out_of_memory_in_samples_or_validation_is_a_warning(sd15_project, monkeypatch, capfd):
    from charbuild.train.builtin import samples, validation

    def no_memory(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test double)")

    monkeypatch.setattr(samples.SampleRenderer, "render", no_memory)
    monkeypatch.setattr(validation.ValidationSet, "evaluate", no_memory)
    job = builtin_job(sd15_project, "Lora1x1", "oom", steps=2, mixed_precision="no", sample_every=1,
                         validation_every=1)
    summary = trainer.run_job(job)
    assert len(summary["losses"]) == 2 and Path(job.output).is_file()
    out = capfd.readouterr().out
    for what, step in (("validation", 0), ("samples", 1), ("validation", 2)):
        assert f"warning: step {step}: {what} skipped, out of memory (CUDA out of memory." in out
    assert [s for s, _ in read_metrics(Path(job.variant_dir) / "metrics.jsonl").loss] == [1, 2]


def test_another_error_in_samples_still_stops_the_training(sd15_project, monkeypatch):
    from charbuild.train.builtin import samples

    def broken(*a, **kw):
        raise ValueError("a bug, not a full GPU")

    monkeypatch.setattr(samples.SampleRenderer, "render", broken)
    with pytest.raises(ValueError, match="a bug"):
        trainer.run_job(builtin_job(sd15_project, "Lora1x1", "bug", steps=1, mixed_precision="no", sample_every=1))


def test_continue_from_a_save(sd15_project):
    first = builtin_job(sd15_project, "Lora1x1", "long", steps=3, mixed_precision="no", save_every=2)
    trainer.run_job(first)
    saved = Path(first.variant_dir) / "saves" / "krnk-long-step00000002.safetensors"
    rest = builtin_job(sd15_project, "Lora1x1", "rest", steps=1, mixed_precision="no")
    rest = dataclasses.replace(rest, continue_from=str(saved))
    trainer.run_job(rest)
    with safe_open(rest.output, "pt") as f:
        md = f.metadata()
    assert md["ss_steps"] == "1" and md["charbuild.total_steps"] == "3" and md["charbuild.continue_from"] == saved.name


def test_peak_gpu_memory_is_read_and_described(monkeypatch):
    """The CUDA allocator's counters (a test double: no GPU here) in MiB, and the summary line's words."""
    from charbuild.train.builtin import device

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 6 * 2**30)
    peak = device.peak_memory(device.Precision(torch.device("cuda"), torch.float16))
    assert peak == {"peak_allocated_mib": 5120.0, "peak_reserved_mib": 6144.0}
    assert device.describe_peak(peak) == "; peak GPU memory 5.00 GiB allocated, 6.00 GiB reserved"
    assert device.peak_memory(choose_precision("no", {DEVICE_ENV: "cpu"})) is None and device.describe_peak(None) == ""


def test_peak_memory_lands_in_metrics_lines(tmp_path):
    from charbuild.train.metrics import MetricsWriter

    with MetricsWriter(tmp_path) as w:
        w.step(1, 0.5, 1e-4, extra={"peak_allocated_mib": 5120.0, "peak_reserved_mib": 6144.0})
        w.step(2, float("nan"), extra={"peak_allocated_mib": 1.0})  # a skipped step's line is left out
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "lr": 1e-4, "peak_allocated_mib": 5120.0, "peak_reserved_mib": 6144.0}]
    assert read_metrics(tmp_path / "metrics.jsonl").loss == [(1, 0.5)]


# --------------------------------------------------------------------------- what a GPU run does differently


def test_adamw8bit_on_a_gpu_without_bitsandbytes_stops_with_the_fix(sd15_project):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    setup = trainer.resolve_setup(builtin_job(sd15_project, "Lora1x1", "bnb", steps=1))
    network = torch.nn.Linear(2, 2)
    network.param_groups = lambda lr, te_lr: [{"params": list(network.parameters()), "lr": lr}]
    with pytest.raises(UnsupportedError, match=r"pip install 'charbuild\[gpu\]'"):
        trainer.make_optimizer(setup, network, is_cuda=True)
    assert type(trainer.make_optimizer(setup, network, is_cuda=False)[0]).__name__ == "AdamW"  # a CPU: 32-bit, noted


def test_cuda_speed_flags():
    from charbuild.train.builtin import device

    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]
    saved = [getattr(obj, name) for obj, name in flags]
    try:
        for obj, name in flags:
            setattr(obj, name, False)
        device.configure_cuda(choose_precision("fp16", {DEVICE_ENV: "cpu", CPU_HALF_ENV: "1"}))
        assert not any(getattr(obj, name) for obj, name in flags)  # a CPU: untouched
        device.configure_cuda(device.Precision(torch.device("cuda"), torch.float16))
        assert all(getattr(obj, name) for obj, name in flags)
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


def test_sdxl_size_ids_stay_float32_in_bf16():
    from types import SimpleNamespace

    from charbuild.train.builtin.conditioning import unet_conditioning
    from charbuild.train.builtin.sdxl import SDXLPromptEmbeds, sdxl_time_ids

    prep = SimpleNamespace(arch="sdxl", device=torch.device("cpu"), weight_dtype=torch.bfloat16)
    text = SDXLPromptEmbeds(torch.zeros(1, 77, 8, dtype=torch.bfloat16), torch.zeros(1, 4, dtype=torch.bfloat16))
    _, added = unet_conditioning(prep, text, sdxl_time_ids([(1365, 2048)], [(0, 0)], [(1024, 1536)]))
    assert added["time_ids"].dtype == torch.float32 and added["time_ids"][0].tolist()[:2] == [1365.0, 2048.0]
    assert added["text_embeds"].dtype == torch.bfloat16
    assert torch.tensor(1365.0).to(torch.bfloat16).item() == 1368.0  # what bf16 made of it


def test_settings_the_builtin_ignores_and_torch_compile(sd15_project):
    job = builtin_job(sd15_project, "Lora1x1", "n", data_loader_workers=0)
    assert trainer.ignored_settings_notes(job)[0].startswith("data_loader_workers = 0 is ignored")
    job = builtin_job(sd15_project, "Lora1x1", "n").with_trainer(xformers=True, extra={"torch_compile": "yes"})
    assert [n.split(" =")[0] for n in trainer.ignored_settings_notes(job)] == ["xformers"]
    with pytest.raises(UnsupportedError, match="torch_compile must be true or false"):
        trainer.torch_compile_requested(job)


def test_latents_one_picture_at_a_time_and_no_color_aug_note(sd15_project):
    from charbuild.train.builtin.data import cache_latents, read_dataset_toml
    from charbuild.train.builtin.models import load_base_model

    toml = sd15_project / "build" / "loras" / "krnk" / "dataset.toml"
    assert "color_aug = true" in toml.read_text(encoding="utf-8")
    dataset = read_dataset_toml(toml, sd15_project)
    assert not [n for n in dataset.notes if "color_aug" in n]  # charbuild wrote it: nothing to tell the user
    vae = load_base_model({"base": "tiny", "vae": None, "arch": "sd15", "clip_skip": 2}, sd15_project).vae
    batches = []
    real_encode = vae.encode
    vae.encode = lambda x: batches.append(x.shape[0]) or real_encode(x)
    latents = cache_latents(dataset, vae, torch.device("cpu"), 0)
    assert batches and set(batches) == {1} and len(latents) == len(batches)
