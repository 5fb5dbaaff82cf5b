"""The sd-scripts backend builds exactly the original's train_network.py command."""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from pathlib import Path

import pytest

from charbuild.errors import TrainingError
from charbuild.train.sdscripts_command import build_command, raw_output_path
from charbuild.train.variants import ALL_LOGICS, resolve_variant
from conftest import make_train_job

FAKE_SD = Path(__file__).resolve().parent / "fake_sd_scripts"
R = "/r"
VD = "/r/build/loras/krnk/V"


def job(preset="Lora3x3A50p-AdamW8", *, arch="sd15", vae=None, continue_from=None, steps=1000, **trainer):
    """An sd-scripts job of LoRA krnk, variant V, under /r (nothing on disk)."""
    params = resolve_variant(preset, steps=steps) if isinstance(preset, (str, dict)) else preset
    spec = {"sd_scripts": "/sd", "python": "python", "accelerate": "accelerate", "lock_dir": "/r/build/locks", **trainer}
    return make_train_job(Path(R), preset=params, variant="V", base="/m/sd15.safetensors", vae=vae, arch=arch,
                          backend="sd-scripts", trainer=spec, output=f"{VD}/.train-x/raw.safetensors",
                          continue_from=continue_from)


NAME = "krnk-V"  # <lora>-<variant>: the deliverable's stem, unique in a web UI's folder
# Paths the command builds go through pathlib: spell the expected ones the same way (Windows).
SCRIPT = str(Path("/sd") / "train_network.py")
SDXL_SCRIPT = str(Path("/sd") / "sdxl_train_network.py")
OUT_DIR = str(Path(VD) / ".train-x")
LOG_DIR = str(Path(VD) / "logs")
EXPECTED_LORA3X3 = [
    "accelerate", "launch", "--num_cpu_threads_per_process", "1", SCRIPT,
    "--pretrained_model_name_or_path=/m/sd15.safetensors",
    "--dataset_config=/r/build/loras/krnk/dataset.toml",
    f"--output_dir={OUT_DIR}",
    f"--output_name={NAME}",
    "--network_module=networks.lora",
    "--network_dim=128",
    "--network_alpha=64",
    "--network_args", "conv_dim=128", "conv_alpha=64",
    "--optimizer_type=AdamW8bit",
    "--learning_rate=100e-6",
    "--text_encoder_lr=44e-6",
    "--lr_scheduler=cosine_with_restarts",
    "--max_train_steps=1000",
    "--clip_skip=2",
    f"--logging_dir={LOG_DIR}",
    f"--log_prefix={NAME}",
    "--sdpa",  # the original's --xformers is xformers = true; PyTorch's attention otherwise
    "--save_model_as=safetensors",
    "--mixed_precision=fp16",
    "--save_precision=fp16",
    "--gradient_checkpointing",
    "--persistent_data_loader_workers",
    "--seed=31337",
]


def test_lora3x3_a50p_adamw8_is_the_originals_command():
    assert build_command(job()) == EXPECTED_LORA3X3
    assert raw_output_path(job()) == Path(OUT_DIR) / f"{NAME}.safetensors"


PRESET_ARG = f"preset={Path(OUT_DIR) / 'lycoris_preset.toml'}"


def test_loha_has_algo_and_its_own_dim():
    cmd = build_command(job("LohaA50p-AdamW8"))
    i = cmd.index("--network_args")
    assert cmd[i - 4:i + 6] == [
        "--output_name=krnk-V", "--network_module=lycoris.kohya",
        "--network_dim=32", "--network_alpha=16",
        "--network_args", "conv_dim=32", "conv_alpha=16", "algo=loha", PRESET_ARG, "--optimizer_type=AdamW8bit",
    ]


def test_locon_a1_and_lora1x1():
    cmd = build_command(job("LoconA1-AdamW8"))
    i = cmd.index("--network_args")
    assert cmd[i:i + 5] == ["--network_args", "conv_dim=128", "conv_alpha=1", "algo=lora", PRESET_ARG]
    assert "--network_alpha=1" in cmd
    cmd = build_command(job("Lora1x1A1-AdamW8"))
    assert "--network_args" not in cmd and "--network_module=networks.lora" in cmd


@pytest.mark.parametrize("preset", ["LoconA1-AdamW8", "LohaA50p-AdaFactor", "LoconA50p-AdamW8"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lycoris_variants_get_kohyas_modules_as_a_preset(preset, arch):
    """LyCORIS's default preset ("full") adapts conv_in, conv_out and the time embedding, which
    kohya's networks.lora and the builtin do not, and in lycoris-lora 4.x builds
    time_embedding.linear_1 twice ("duplicated lora name"): Locon/Loha name a preset file of
    kohya's module choice."""
    import tomllib

    from charbuild.train.sdscripts_command import lycoris_preset_path, lycoris_preset_text

    j = job(preset, arch=arch)
    cmd = build_command(j)
    i = cmd.index("--network_args")
    args = cmd[i + 1:cmd.index("--optimizer_type=" + j.params.optimizer)]
    assert args[-1] == f"preset={lycoris_preset_path(j)}" == PRESET_ARG
    assert tomllib.loads(lycoris_preset_text(j.params)) == {
        "enable_conv": True,
        "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
        "unet_target_name": [],  # LyCORIS's default: conv_in, conv_out, time_embedding.linear_1/2
        "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"],
        "text_encoder_target_name": [],
    }


def test_lycoris_preset_without_conv_is_transformers_only():
    """conv_dim = 0: kohya searches the transformer blocks only (their 1x1 proj_in/out included)."""
    import tomllib

    from charbuild.train.sdscripts_command import lycoris_preset_text

    params = resolve_variant({"preset": "LoconA1-AdamW8", "conv_dim": 0}, steps=10)
    preset = tomllib.loads(lycoris_preset_text(params))
    assert preset["enable_conv"] is False and preset["unet_target_module"] == ["Transformer2DModel"]
    assert not [a for a in build_command(job(params)) if a.startswith("conv_dim=")]


def test_prepare_files_writes_the_lycoris_preset_only_for_lycoris(tmp_path):
    from charbuild.train.backends import get_backend, prepare_files
    from charbuild.train.sdscripts_command import LYCORIS_PRESET_NAME, lycoris_preset_path, lycoris_preset_text

    backend = get_backend("sd-scripts")
    for preset, wanted in (("LohaA1-AdamW8", True), ("Lora3x3A1-AdamW8", False), ("Lora1x1A1-AdamW8", False)):
        j = dataclasses.replace(job(preset), output=str(tmp_path / preset / ".train" / "raw.safetensors"))
        (tmp_path / preset / ".train").mkdir(parents=True)
        prepare_files(backend, j)
        path = lycoris_preset_path(j)
        assert path.name == LYCORIS_PRESET_NAME and path.is_file() == wanted, preset
        if wanted:
            assert path.read_text(encoding="utf-8") == lycoris_preset_text(j.params)
            assert f"preset={path}" in build_command(j)
        else:
            assert not [a for a in build_command(j) if a.startswith("preset=")]


def test_adafactor_flags_and_no_learning_rates():
    cmd = build_command(job("Lora3x3A1-AdaFacotor"))
    i = cmd.index("--optimizer_type=adafactor")
    assert cmd[i:i + 6] == [
        "--optimizer_type=adafactor", "--optimizer_args",
        "relative_step=True", "scale_parameter=True", "warmup_init=False", "--max_train_steps=1000",
    ]
    assert not [a for a in cmd if a.startswith(("--learning_rate", "--text_encoder_lr", "--lr_scheduler"))]
    assert "--output_name=krnk-V" in cmd


def test_sdxl_uses_its_script_and_has_no_clip_skip():
    cmd = build_command(job(arch="sdxl"))
    assert cmd[4] == SDXL_SCRIPT
    assert not [a for a in cmd if a.startswith("--clip_skip")]
    # safe by default: the fp32 VAE (the SDXL VAE overflows in fp16) and cached latents (no color_aug)
    assert [a for a in cmd if a != SDXL_SCRIPT] == [
        a for a in EXPECTED_LORA3X3 if a not in (SCRIPT, "--clip_skip=2")
    ] + ["--no_half_vae", "--cache_latents"]
    assert "--no_half_vae" not in build_command(job({"preset": "Lora3x3A50p-AdamW8", "no_half_vae": False}, arch="sdxl"))


def test_vae_continue_from_xformers_and_extra_args():
    params = resolve_variant(
        {"preset": "Lora3x3A50p-AdamW8", "extra_args": ["--max_data_loader_n_workers=0"], "clip_skip": 1,
         "network_train_unet_only": True, "resolution": [512, 768]},
        steps=1000,
    )
    cmd = build_command(job(params, vae="/m/vae.pt", continue_from="/old/prev.safetensors", xformers=True,
                            extra_args=["--noise_offset=0.05"]))
    assert cmd[5:7] == ["--pretrained_model_name_or_path=/m/sd15.safetensors", "--vae=/m/vae.pt"]
    assert "--clip_skip=1" in cmd  # the params' clip skip beats the model's
    i = cmd.index("--xformers")
    assert cmd[i - 1] == f"--log_prefix={NAME}" and cmd[i + 1] == "--save_model_as=safetensors"
    assert cmd[-6:] == [
        "--seed=31337", "--network_weights=/old/prev.safetensors", "--network_train_unet_only",
        "--resolution=512,768", "--noise_offset=0.05", "--max_data_loader_n_workers=0",
    ]
    assert "--xformers" not in build_command(job()) and "--sdpa" not in cmd


def test_without_accelerate_python_runs_the_script():
    cmd = build_command(job(accelerate=None, python="/venv/bin/python"))
    assert cmd[:2] == ["/venv/bin/python", SCRIPT]
    assert cmd[2:] == EXPECTED_LORA3X3[5:]


def test_relative_sd_scripts_folder_is_under_the_project_root():
    assert build_command(job(sd_scripts="tools/sd-scripts"))[4] == str(Path(R) / "tools/sd-scripts/train_network.py")


def test_tiny_model_or_missing_sd_scripts_is_a_training_error():
    j = job()
    j = j.with_model(base="tiny")
    with pytest.raises(TrainingError, match="builtin backend"):
        build_command(j)
    with pytest.raises(TrainingError, match="trainer.sd_scripts"):
        build_command(job(sd_scripts=None))


def _load_fake_parser():
    spec = importlib.util.spec_from_file_location("_fake_common", FAKE_SD / "_fake_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.parser


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_fake_sd_scripts_accepts_the_command_of_every_preset(arch):
    parser = _load_fake_parser()
    for logic, cont in itertools.product(ALL_LOGICS, (None, "/old.safetensors")):
        cmd = build_command(job(logic, arch=arch, continue_from=cont, accelerate=None, xformers=True))
        args = parser(arch == "sdxl").parse_args(cmd[2:])
        p = resolve_variant(logic, steps=1000)
        assert args.network_dim == p.dim and args.network_alpha == p.alpha
        assert args.max_train_steps == 1000 and args.network_weights == cont
        assert args.learning_rate == (None if p.lr is None else pytest.approx(p.lr))


def test_fake_sd_scripts_refuses_an_unknown_flag():
    parser = _load_fake_parser()
    with pytest.raises(SystemExit):
        parser(True).parse_args(build_command(job(accelerate=None))[2:])  # --clip_skip is not SDXL's


def test_data_loader_workers_and_the_persistent_flag():
    """sd-scripts refuses --persistent_data_loader_workers with 0 workers (issue 9, item 6)."""
    assert build_command(job()) == EXPECTED_LORA3X3  # sd-scripts' default: nothing to say
    cmd = build_command(job({"preset": "Lora3x3A50p-AdamW8", "data_loader_workers": 0}))
    assert "--max_data_loader_n_workers=0" in cmd and "--persistent_data_loader_workers" not in cmd
    cmd = build_command(job({"preset": "Lora3x3A50p-AdamW8", "data_loader_workers": 2}))
    i = cmd.index("--max_data_loader_n_workers=2")
    assert cmd[i + 1:i + 3] == ["--persistent_data_loader_workers", "--seed=31337"]
    # the same number given the old way, as an extra argument, is honoured too
    cmd = build_command(job({"preset": "Lora3x3A50p-AdamW8", "extra_args": ["--max_data_loader_n_workers", "0"]}))
    assert "--persistent_data_loader_workers" not in cmd
    with pytest.raises(ValueError, match="data_loader_workers = -1"):
        resolve_variant({"preset": "Lora3x3A50p-AdamW8", "data_loader_workers": -1}, steps=10)


@pytest.mark.parametrize("workers", [0, 3])
def test_the_fake_sd_scripts_parser_accepts_the_worker_flags(workers):
    cmd = build_command(job({"preset": "Lora3x3A50p-AdamW8", "data_loader_workers": workers}, accelerate=None))
    args = _load_fake_parser()(False).parse_args(cmd[2:])
    assert args.max_data_loader_n_workers == workers
    assert args.persistent_data_loader_workers is (workers > 0)


# --------------------------------------------------------------------------- SDXL and the loss options

def test_sdxl_unet_only_caches_the_text_encoder_outputs():
    cmd = build_command(job({"preset": "Lora3x3A50p-AdamW8", "network_train_unet_only": True}, arch="sdxl"))
    i = cmd.index("--network_train_unet_only")
    assert cmd.count("--network_train_unet_only") == 1 and "--cache_text_encoder_outputs" in cmd[i:]
    assert "--cache_text_encoder_outputs" not in build_command(job(arch="sdxl"))  # both encoders learn: nothing cached
    # asking for the cache brings UNet-only with it (sd-scripts refuses the cache otherwise)
    cmd = build_command(job({"preset": "Lora3x3A50p-AdamW8", "cache_text_encoder_outputs": True}, arch="sdxl"))
    assert cmd.count("--network_train_unet_only") == 1 and "--cache_text_encoder_outputs" in cmd
    # train_network.py (SD1.x) has no text-encoder cache
    sd15 = build_command(job({"preset": "Lora3x3A50p-AdamW8", "network_train_unet_only": True,
                              "cache_text_encoder_outputs": True}))
    assert "--cache_text_encoder_outputs" not in sd15 and sd15.count("--network_train_unet_only") == 1


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_loss_and_vae_flags(arch):
    params = {"preset": "Lora3x3A50p-AdamW8", "noise_offset": 0.0357, "min_snr_gamma": 5, "v_prediction": True,
              "zero_terminal_snr": True, "no_half_vae": True, "extra_args": ["--max_data_loader_n_workers=2"]}
    cmd = build_command(job(params, arch=arch))
    i = cmd.index("--noise_offset=0.0357")
    assert cmd[i:i + 5] == ["--noise_offset=0.0357", "--min_snr_gamma=5", "--v_parameterization",
                            "--zero_terminal_snr", "--no_half_vae"]
    assert cmd[-1] == "--max_data_loader_n_workers=2"  # the user's extra arguments stay last
    plain = build_command(job(arch=arch))
    assert not [a for a in plain if a.startswith(("--noise_offset", "--min_snr", "--v_param", "--zero_term"))]
    assert ("--no_half_vae" in plain) == (arch == "sdxl")  # left out: SDXL's VAE in fp32


def test_the_fake_sdxl_script_runs_the_sdxl_command(tmp_path):
    """The command as the runner starts it (python, no accelerate), through the fake's strict parser
    and sd-scripts' rules, to a LoRA file with SDXL keys."""
    import json
    import subprocess
    import sys

    from safetensors import safe_open

    base = tmp_path / "xl.safetensors"
    base.write_bytes(b"x")
    toml = tmp_path / "dataset.toml"
    toml.write_text("[general]\n", encoding="utf-8")
    params = {"preset": "Lora1x1A1-AdamW8", "dim": 4, "network_train_unet_only": True, "noise_offset": 0.05,
              "min_snr_gamma": 5, "v_prediction": True, "zero_terminal_snr": True, "no_half_vae": True,
              "mixed_precision": "bf16", "data_loader_workers": 0}
    j = job(params, arch="sdxl", accelerate=None, python=sys.executable, sd_scripts=str(FAKE_SD), steps=3)
    j = dataclasses.replace(j.with_model(base=str(base)), dataset_toml=str(toml), output=str(tmp_path / "out" / "raw.safetensors"))
    (tmp_path / "out").mkdir()
    argv_log = tmp_path / "argv.jsonl"
    env = {**__import__("os").environ, "FAKE_SD_ARGV": str(argv_log)}
    res = subprocess.run(build_command(j), capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    argv = json.loads(argv_log.read_text(encoding="utf-8"))["argv"]
    assert argv[0].endswith("sdxl_train_network.py") and "--cache_text_encoder_outputs" in argv
    with safe_open(str(tmp_path / "out" / f"{NAME}.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks",
                                      "lora_te1_", "lora_te2_")) for k in keys), keys[:5]


def test_the_fake_refuses_a_text_encoder_cache_with_text_encoder_training(tmp_path):
    """As sdxl_train_network.py asserts: charbuild never builds this command, the fake must still refuse it."""
    import subprocess
    import sys

    (tmp_path / "m.safetensors").write_bytes(b"x")
    (tmp_path / "d.toml").write_text("[general]\n", encoding="utf-8")
    j = job(arch="sdxl", accelerate=None, python=sys.executable, sd_scripts=str(FAKE_SD))
    j = dataclasses.replace(j.with_model(base=str(tmp_path / "m.safetensors")), dataset_toml=str(tmp_path / "d.toml"),
                            output=str(tmp_path / "raw.safetensors"))
    res = subprocess.run(build_command(j) + ["--cache_text_encoder_outputs"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 3 and "cannot be trained with caching Text Encoder outputs" in res.stderr
