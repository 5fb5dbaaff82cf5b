"""The sd-scripts backend builds exactly the original's train_network.py command."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

from charbuild.errors import TrainingError
from charbuild.train.sdscripts import build_command, raw_output_path
from charbuild.train.variants import ALL_LOGICS, resolve_variant

FAKE_SD = Path(__file__).resolve().parent / "fake_sd_scripts"
R = "/r"
VD = "/r/build/loras/krnk/V"


def job(preset="Lora3x3A50p-AdamW8", *, arch="sd15", vae=None, continue_from=None, steps=1000, **trainer):
    params = resolve_variant(preset, steps=steps) if isinstance(preset, (str, dict)) else preset
    tr = {"backend": "sd-scripts", "gpus": [0], "sd_scripts": "/sd", "python": "python",
          "accelerate": "accelerate", "xformers": False, "lock_dir": "/r/build/locks", "extra_args": []}
    tr.update(trainer)
    return {
        "lora": "krnk", "kind": "face", "variant": "V", "project_root": R,
        "dataset_toml": "/r/build/loras/krnk/dataset.toml",
        "output": f"{VD}/.train-x/raw.safetensors", "variant_dir": VD,
        "params": params.to_dict(),
        "model": {"base": "/m/sd15.safetensors", "vae": vae, "arch": arch, "clip_skip": 2},
        "trainer": tr, "keywords": ["krnk"], "inputs": [], "signature_extra": {},
        "continue_from": continue_from,
    }


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


def test_loha_has_algo_and_its_own_dim():
    cmd = build_command(job("LohaA50p-AdamW8"))
    i = cmd.index("--network_args")
    assert cmd[i - 4:i + 5] == [
        "--output_name=krnk-V", "--network_module=lycoris.kohya",
        "--network_dim=32", "--network_alpha=16",
        "--network_args", "conv_dim=32", "conv_alpha=16", "algo=loha", "--optimizer_type=AdamW8bit",
    ]


def test_locon_a1_and_lora1x1():
    cmd = build_command(job("LoconA1-AdamW8"))
    i = cmd.index("--network_args")
    assert cmd[i:i + 4] == ["--network_args", "conv_dim=128", "conv_alpha=1", "algo=lora"]
    assert "--network_alpha=1" in cmd
    cmd = build_command(job("Lora1x1A1-AdamW8"))
    assert "--network_args" not in cmd and "--network_module=networks.lora" in cmd


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
    assert [a for a in cmd if a != SDXL_SCRIPT] == [
        a for a in EXPECTED_LORA3X3 if a not in (SCRIPT, "--clip_skip=2")
    ]


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
    assert "--xformers" not in build_command(job())


def test_without_accelerate_python_runs_the_script():
    cmd = build_command(job(accelerate=None, python="/venv/bin/python"))
    assert cmd[:2] == ["/venv/bin/python", SCRIPT]
    assert cmd[2:] == EXPECTED_LORA3X3[5:]


def test_relative_sd_scripts_folder_is_under_the_project_root():
    assert build_command(job(sd_scripts="tools/sd-scripts"))[4] == str(Path(R) / "tools/sd-scripts/train_network.py")


def test_tiny_model_or_missing_sd_scripts_is_a_training_error():
    j = job()
    j["model"]["base"] = "tiny"
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
