"""The builtin trainer on SDXL (``tiny-sdxl``, CPU, two steps each).

End to end through the backend's own process (``python -m charbuild.train.builtin JOB.json``):
the file has the key set and shapes of the network for the same model and config, names only
kohya SDXL modules, loads through ``charbuild.lora.io`` and diffusers' kohya converter, carries
``sdxl_train_network.py``'s metadata, and the same job gives the same bytes in-process. Then
UNet-only with cached text-encoder outputs (each caption encoded once, counted), and the loss
options (v-prediction, zero-terminal-SNR, min-SNR-γ, noise offset) against their formulas on
one batch of the real loop, for SDXL and SD1.5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from charbuild.errors import TrainingError  # noqa: E402
from charbuild.lora.io import load_lora  # noqa: E402
from charbuild.lora.keysets import sdxl_modules  # noqa: E402
from charbuild.train.builtin.data import ImageItem, sdxl_size_conditioning  # noqa: E402
from charbuild.train.builtin.trainer import (  # noqa: E402
    LossSetup,
    batch_loss,
    prepare,
    resolve_loss,
    resolve_setup,
    run_job,
    vae_dtype_for,
)
from charbuild.train.builtin.metadata import build_metadata  # noqa: E402
from conftest import SDXL_CAPTIONS as CAPTIONS, builtin_job, make_tiny_sdxl_dataset  # noqa: E402

STEPS = 2


_make_project = make_tiny_sdxl_dataset


def _job(root: Path, network: str, variant: str, base: str = "tiny-sdxl", **over):
    over.setdefault("steps", STEPS)
    return builtin_job(root, network, variant, base=base, **over)


@pytest.fixture(scope="module", autouse=True)
def _reproducible(reproducible_training):
    """Every training of this module repeats byte for byte (conftest.reproducible_training)."""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    _make_project(root)
    return root


def _stem(key: str) -> str:
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise AssertionError(key)


_BASES: dict = {}


def _expected_network_shapes(root: Path, network: str, unet_only: bool = False) -> dict[str, tuple]:
    """Key -> shape of the network the trainer's modules would build for the same model and config."""
    from charbuild.train.builtin.models import load_base_model
    from charbuild.train.builtin.network import LoRANetwork
    from charbuild.train.builtin.setup import network_spec

    if root not in _BASES:
        _BASES[root] = load_base_model({"base": "tiny-sdxl"}, root, supported_archs=("sdxl",))
    base = _BASES[root]
    spec, _, _ = network_spec(_job(root, network, "x").params.to_dict())
    net = LoRANetwork(base.unet, None if unet_only else (base.text_encoder, base.text_encoder_2), spec)
    return {k: tuple(v.shape) for k, v in net.kohya_state_dict(torch.float16).items()}


@pytest.fixture(scope="module")
def trained_in_process(project, tmp_path_factory):
    """Lora3x3 on UNet and both encoders, through the backend's own process."""
    from charbuild.train.backends import BUILTIN

    job = _job(project, "Lora3x3", "l3", gradient_checkpointing=True)
    job_file = tmp_path_factory.mktemp("job") / "job.json"
    job_file.write_text(json.dumps(job.to_dict()), encoding="utf-8")
    env = BUILTIN.env(job, os.environ)
    proc = subprocess.run(BUILTIN.command(job, job_file), env=env, cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return job, proc.stdout


def test_sdxl_file_from_the_backend_process(project, trained_in_process):
    job, log = trained_in_process
    assert "model tiny-sdxl-0 (sdxl)" in log
    sd = load_file(job.output)
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_network_shapes(project, "Lora3x3")
    stems = {_stem(k) for k in sd}
    assert stems <= {s for s, *_ in sdxl_modules(conv=True, te=True)}  # kohya SDXL names only
    for prefix in ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_", "lora_te2_"):
        assert any(s.startswith(prefix) for s in stems), prefix
    assert any(k.endswith("in_layers_2.lora_down.weight") and sd[k].dim() == 4 and sd[k].shape[-1] == 3 for k in sd)
    assert all(t.dtype == torch.float16 for t in sd.values())
    assert any(float(sd[k].abs().sum()) > 0 for k in sd if k.endswith("lora_up.weight"))  # it trained

    lora = load_lora(job.output)
    assert lora.arch == "sdxl" and lora.format == "lora" and set(lora.modules) == stems
    md = lora.metadata
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert md["modelspec.prediction_type"] == "epsilon"
    assert md["ss_clip_skip"] == "None" and "modelspec.encoder_layer" not in md  # SDXL has no clip skip
    assert md["ss_noise_offset"] == "None" and md["ss_min_snr_gamma"] == "None" and md["ss_zero_terminal_snr"] == "False"
    assert md["ss_network_train_unet_only"] == "False" and md["ss_gradient_checkpointing"] == "True"
    assert md["ss_sd_model_name"] == "tiny-sdxl-0" and md["ss_output_name"] == "krnk-l3"


def _diffusers_module(root, rest: str):
    """The module a key of diffusers' converted (legacy attention-processor) state dict names."""
    path = rest.rsplit(".", 2)[0]  # drop down/up + weight
    for old, new in ((".processor.to_out_lora", ".to_out.0"), (".processor.to_q_lora", ".to_q"),
                     (".processor.to_k_lora", ".to_k"), (".processor.to_v_lora", ".to_v"),
                     (".to_out_lora", ".out_proj"), (".to_q_lora", ".q_proj"), (".to_k_lora", ".k_proj"),
                     (".to_v_lora", ".v_proj"), (".lora_linear_layer", ""), (".lora", "")):  # fmt: skip
        if path.endswith(old):
            path = path[: -len(old)] + new
            break
    if not hasattr(root, "text_model"):
        path = path.removeprefix("text_model.")
    return root.get_submodule(path)


def test_sdxl_file_loads_through_diffusers_kohya_converter(project, trained_in_process):
    from diffusers import StableDiffusionXLPipeline

    from charbuild.train.builtin.models import load_base_model

    job, _ = trained_in_process
    base = load_base_model({"base": "tiny-sdxl"}, project, supported_archs=("sdxl",))
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(job.output, unet_config=base.unet.config)[:2]
    n_modules = len({_stem(k) for k in load_file(job.output)})
    assert len(state) == 2 * n_modules and len(alphas) == n_modules  # no module left behind
    roots = {"unet": base.unet, "text_encoder": base.text_encoder, "text_encoder_2": base.text_encoder_2}
    for key in state:
        head, rest = key.split(".", 1)
        module = _diffusers_module(roots[head], rest)
        weight = state[key]
        if key.endswith("down.weight"):
            assert weight.shape[1] == (module.in_channels if hasattr(module, "in_channels") else module.in_features), key
        else:
            assert weight.shape[0] == (module.out_channels if hasattr(module, "out_channels") else module.out_features), key


def test_sdxl_same_job_same_bytes(project, trained_in_process):
    """The job again, in this process: the same bytes as the backend's process wrote (deterministic)."""
    job, _ = trained_in_process
    first = Path(job.output).read_bytes()
    run_job(job)
    assert hashlib.sha256(Path(job.output).read_bytes()).hexdigest() == hashlib.sha256(first).hexdigest()


def test_sdxl_loha(project):
    job = _job(project, "Loha", "lh", steps=1)
    run_job(job)
    sd = load_file(job.output)
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_network_shapes(project, "Loha")
    lora = load_lora(job.output)
    assert lora.arch == "sdxl" and lora.format == "loha"
    assert any(s.startswith("lora_te2_") for s in lora.modules) and any("_in_layers_2" in s for s in lora.modules)


def test_unet_only_with_cached_text_encoder_outputs(project, monkeypatch):
    """No text-encoder keys; each encoder sees each distinct caption once; the loss options land in the metadata."""
    from charbuild.train.builtin import models

    seen = {"te1": 0, "te2": 0}
    real_load = models.load_base_model

    def counting_load(*a, **kw):
        base = real_load(*a, **kw)
        for name, te in (("te1", base.text_encoder), ("te2", base.text_encoder_2)):
            te.register_forward_pre_hook(lambda m, args, kwargs, name=name: seen.__setitem__(
                name, seen[name] + int((args[0] if args else kwargs["input_ids"]).shape[0])), with_kwargs=True)
        return base

    monkeypatch.setattr(models, "load_base_model", counting_load)
    job = _job(project, "Lora1x1", "unet", steps=3, network_train_unet_only=True, cache_text_encoder_outputs=True,
               v_prediction=True, zero_terminal_snr=True, min_snr_gamma=5.0, noise_offset=0.05)
    summary = run_job(job)
    distinct = len(set(CAPTIONS))
    assert seen == {"te1": distinct, "te2": distinct}  # 3 steps of batch 2, yet each caption encoded once
    sd = load_file(job.output)
    assert sd and not any(k.startswith(("lora_te1_", "lora_te2_")) for k in sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expected_network_shapes(project, "Lora1x1", unet_only=True)
    assert all(abs(x) < 10 for x in summary["losses"])
    with safe_open(job.output, "pt") as f:
        md = f.metadata()
    assert md["ss_network_train_unet_only"] == "True"
    assert md["modelspec.prediction_type"] == "v"
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_min_snr_gamma"] == "5.0" and md["ss_noise_offset"] == "0.05"
    # nothing encodes again (no samples; validation reads the same cache): the encoders are let go,
    # unlike sd-scripts; a training that samples keeps them
    assert prepare(resolve_setup(job)).text_encoder is None
    kept = prepare(resolve_setup(_job(project, "Lora1x1", "unet-s", network_train_unet_only=True,
                                      cache_text_encoder_outputs=True, sample_every=2)))
    assert kept.text_encoder is not None and kept.text_encoder_2 is not None
    # validation reads the cache: with the encoders released it gives what it gives with them kept
    from charbuild.report.metrics import read_metrics

    val = {}
    for name, over in (("released", {}), ("kept", {"sample_every": 2, "sample_steps": 1, "sample_size": 64})):
        run = _job(project, "Lora1x1", f"val-{name}", steps=2, network_train_unet_only=True,
                   cache_text_encoder_outputs=True, validation_every=1, **over)
        run_job(run)
        val[name] = read_metrics(Path(run.variant_dir) / "metrics.jsonl").val_loss
    assert len(val["released"]) == 3 and val["released"] == val["kept"]


@pytest.mark.parametrize("base", ["tiny-sdxl", "tiny"])
def test_loss_options_change_the_loss_as_the_formulas_say(project, base):
    """One batch of the real loop with every option, against the formulas with the same draws."""
    options = dict(v_prediction=True, zero_terminal_snr=True, min_snr_gamma=2.0, noise_offset=0.1)
    setup = resolve_setup(_job(project, "Lora1x1", f"loss-{base}", base=base, network_train_unet_only=True, **options))
    prep = prepare(setup)
    sched = prep.noise_scheduler
    assert prep.loss == LossSetup("v_prediction", True, 2.0, 0.1)
    assert sched.config.prediction_type == "v_prediction" and float(sched.alphas_cumprod[-1]) == 0.0  # rescaled
    batch = [(1, True), (2, False)]  # 64x75 (flipped) and 64x64, both in the 64x64 bucket

    torch.manual_seed(7)
    with torch.no_grad():
        got = float(batch_loss(setup, prep, batch))

    # the same draws by hand: noise, offset (one per image and channel), timestep
    from charbuild.train.builtin.conditioning import conditioning

    torch.manual_seed(7)
    lat = torch.stack([prep.latents[k] for k in batch])
    with torch.no_grad():
        cond, added = conditioning(setup, prep, batch, [prep.dataset.items[i].caption for i, _ in batch])
    if base == "tiny-sdxl":  # each picture's size/crop ids and the pooled prompt reach the UNet
        # 64x75 fitted into 64x64: 54.6 wide at left 4, right 58.6; flipped, left 64 - 58.6 = 5
        assert added["time_ids"].tolist() == [[75, 64, 0, 5, 64, 64], [64, 64, 0, 0, 64, 64]]
        assert added["text_embeds"].shape == (2, prep.text_encoder_2.config.projection_dim)
    else:
        assert added is None
    noise = torch.randn_like(lat)
    noise = noise + 0.1 * torch.randn(lat.shape[0], lat.shape[1], 1, 1)
    t = torch.randint(0, 1000, (2,))
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
    with torch.no_grad():
        kw = {"added_cond_kwargs": added} if added is not None else {}
        pred = prep.unet(noisy, t, cond, **kw).sample
    v = a.sqrt() * noise - (1 - a).sqrt() * lat
    snr = (a / (1 - a)).flatten()
    per_image = ((pred - v) ** 2).mean(dim=(1, 2, 3))
    expected = float((per_image * torch.minimum(snr, torch.tensor(2.0)) / (snr + 1)).mean())
    plain = float(((pred - noise) ** 2).mean())
    assert got == pytest.approx(expected, rel=1e-4)
    assert abs(got - plain) > 1e-3 * abs(plain)  # the options do change it

    md = build_metadata(setup, prep.model_name, prep.dataset, prep.optimizer_desc, arch=prep.arch, loss=prep.loss)
    assert md["modelspec.prediction_type"] == "v" and md["ss_zero_terminal_snr"] == "True"
    assert md["ss_min_snr_gamma"] == "2.0" and md["ss_noise_offset"] == "0.1"
    if base == "tiny":  # SD1.5 keeps its own version; the option keys appear only when set
        assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
        plain_md = build_metadata(setup, prep.model_name, prep.dataset, prep.optimizer_desc, loss=LossSetup("epsilon", False, None, 0.0))
        assert "ss_min_snr_gamma" not in plain_md and "ss_zero_terminal_snr" not in plain_md
        assert plain_md["modelspec.prediction_type"] == "epsilon" and plain_md["ss_noise_offset"] == "None"


# ------------------------------------------------------------------------ the rules (pure)


def test_size_conditioning_is_sd_scripts():
    item = ImageItem(Path("x.png"), "c", bucket=(64, 64), resized=(96, 64), num_repeats=1, flip_aug=True,
                     dataset_index=0, original=(96, 64))  # fmt: skip
    # sd-scripts' get_crop_ltrb fits 96x64 into 64x64: 64 x 42.67, offset top (64 - 42.67) // 2 = 10
    assert sdxl_size_conditioning(item, False) == ((64, 96), (10, 0), (64, 64))
    assert sdxl_size_conditioning(item, True) == ((64, 96), (10, 0), (64, 64))
    tall = dataclasses.replace(item, bucket=(128, 64), original=(100, 80))
    # bucket wider than the picture: height fits, 80 x 64, left (128 - 80) // 2 = 24, right 104
    assert sdxl_size_conditioning(tall, False) == ((80, 100), (0, 24), (64, 128))
    assert sdxl_size_conditioning(tall, True) == ((80, 100), (0, 24), (64, 128))  # 128 - 104
    odd = dataclasses.replace(item, bucket=(128, 64), original=(75, 64))  # 75 x 64 at left 26, right 101
    assert sdxl_size_conditioning(odd, False)[1] == (0, 26) and sdxl_size_conditioning(odd, True)[1] == (0, 27)


def test_loss_and_vae_rules(project):
    setup = resolve_setup(_job(project, "Lora1x1", "r", min_snr_gamma=5.0, zero_terminal_snr=True))
    with pytest.raises(TrainingError, match="min_snr_gamma with zero_terminal_snr needs v_prediction"):
        resolve_loss(setup, "epsilon", False)
    assert resolve_loss(setup, "v_prediction", False) == LossSetup("v_prediction", True, 5.0, 0.0)  # the model's scheduler
    plain = resolve_setup(_job(project, "Lora1x1", "p"))
    assert resolve_loss(plain, "epsilon", True).zero_terminal_snr  # the checkpoint's ztsnr marker
    with pytest.raises(TrainingError, match="cache_text_encoder_outputs needs network_train_unet_only"):
        resolve_setup(_job(project, "Lora1x1", "c", cache_text_encoder_outputs=True))
    # VAE: fp32 unless SDXL on a GPU in fp16/bf16 with a separate (fixed fp16) VAE and no_half_vae = false
    assert vae_dtype_for("sdxl", True, True, False) == "half"
    assert vae_dtype_for("sdxl", True, True, None) == "float32"  # left out: SDXL's safe default
    assert vae_dtype_for("sdxl", True, False, False) == "float32"
    assert vae_dtype_for("sdxl", True, True, True) == "float32"
    assert vae_dtype_for("sdxl", False, True, False) == "float32"
    assert vae_dtype_for("sd15", True, True, False) == "float32"


def test_sdxl_training_with_samples_and_validation(project, tmp_path):
    """The whole SDXL loop with what watches it: samples rendered by the SDXL pipeline on the
    training's own modules (both encoders), validation with the size ids, metrics.jsonl — and the
    trained bytes equal those of the same training without them."""
    from charbuild.report.metrics import read_metrics

    runs = {}
    for name, over in (("watched", {"sample_every": 2, "sample_steps": 1, "sample_size": 64, "validation_every": 1}),
                       ("plain", {})):
        job = _job(project, "Lora1x1", "w", network_train_unet_only=True, **over)
        job = dataclasses.replace(job, variant_dir=str(tmp_path / name), output=str(tmp_path / name / "raw.safetensors"))
        runs[name] = run_job(job)
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    assert runs["watched"]["losses"] == runs["plain"]["losses"]
    assert (watched / "raw.safetensors").read_bytes() == (plain / "raw.safetensors").read_bytes()
    pictures = sorted(p.relative_to(watched).as_posix() for p in (watched / "samples").rglob("*.png"))
    # step 0 is the base model without the LoRA (the baseline), then the sample steps; at step 0 and
    # the end also the prompts without the trigger words
    assert pictures and {p.split("/")[1] for p in pictures} == {"0", str(STEPS)}
    assert {p.split("/")[1] for p in pictures if "/notrigger/" in p} == {"0", str(STEPS)}
    metrics = read_metrics(watched / "metrics.jsonl")
    assert [step for step, _ in metrics.val_loss] == list(range(STEPS + 1))
    assert all(value > 0 for _, value in metrics.val_loss)
