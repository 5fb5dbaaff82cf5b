"""Training variants: the original preset grammar, precedence of settings, output names."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from charbuild.train.variants import (
    ALL_LOGICS,
    TRAINING_KEYS,
    Logic,
    TrainParams,
    output_name,
    parse_logic,
    resolve_variant,
    steps_for_kind,
)

PARAM_KEYS = {
    "name", "logic", "network", "network_module", "algo", "dim", "alpha", "conv_dim", "conv_alpha",
    "optimizer", "optimizer_args", "lr", "lr_units", "text_encoder_lr", "steps", "scheduler", "seed",
    "clip_skip", "mixed_precision", "save_precision", "gradient_checkpointing",
    "network_train_unet_only", "resolution", "min_bucket_reso", "max_bucket_reso", "extra_args",
    "data_loader_workers", "noise_offset", "min_snr_gamma", "v_prediction", "zero_terminal_snr",
    "cache_text_encoder_outputs", "no_half_vae", "sample_every", "sample_prompts", "sample_size", "sample_steps",
    "validation_every", "save_every",
}

ADAFACTOR_ARGS = ["relative_step=True", "scale_parameter=True", "warmup_init=False"]

# network -> (module, algo, sample dim, has conv)
NET = {
    "Lora3x3": ("networks.lora", None, 128, True),
    "Lora1x1": ("networks.lora", None, 128, False),
    "Locon": ("lycoris.kohya", "lora", 128, True),
    "Loha": ("lycoris.kohya", "loha", 32, True),
}
COMBOS = list(itertools.product(NET, ["A1", "A50p"], ["AdamW8", "AdaFactor"]))


@pytest.mark.parametrize("net,alpha_mode,opt", COMBOS, ids=[f"{n}{a}-{o}" for n, a, o in COMBOS])
def test_every_preset_resolves_to_the_original_rules(net, alpha_mode, opt):
    text = f"{net}{alpha_mode}-{opt}"
    assert parse_logic(text) == Logic(net, alpha_mode, opt)
    p = resolve_variant(text, defaults={}, overrides={}, steps=1000).to_dict()
    module, algo, dim, conv = NET[net]
    alpha = 1 if alpha_mode == "A1" else dim // 2
    assert set(p) == PARAM_KEYS
    assert (p["name"], p["logic"], p["network"]) == (text, text, net)
    assert (p["network_module"], p["algo"], p["dim"], p["alpha"]) == (module, algo, dim, alpha)
    assert p["conv_dim"] == (dim if conv else None)
    assert p["conv_alpha"] == (alpha if conv else None)
    if opt == "AdamW8":
        assert p["optimizer"] == "AdamW8bit" and p["optimizer_args"] == []
        assert p["lr"] == pytest.approx(1e-4) and p["lr_units"] == 100
        assert p["text_encoder_lr"] == pytest.approx(4.4e-5)
    else:
        assert p["optimizer"] == "adafactor" and p["optimizer_args"] == ADAFACTOR_ARGS
        assert p["lr"] is None and p["lr_units"] is None and p["text_encoder_lr"] is None
    assert p["steps"] == 1000 and p["scheduler"] == "cosine_with_restarts" and p["seed"] == 31337
    assert (p["mixed_precision"], p["save_precision"]) == ("fp16", "fp16")
    assert p["gradient_checkpointing"] is True and p["network_train_unet_only"] is False
    assert p["extra_args"] == [] and p["resolution"] is None


def test_all_logics_lists_the_sixteen_combinations():
    assert sorted(ALL_LOGICS) == sorted(f"{n}{a}-{o}" for n, a, o in COMBOS)


def test_original_misspelling_adafacotor_is_accepted_and_canonicalised():
    assert parse_logic("LohaA1-AdaFacotor") == Logic("Loha", "A1", "AdaFactor")
    p = resolve_variant("LohaA1-AdaFacotor", steps=1200)
    assert p.name == "LohaA1-AdaFacotor"  # the folder keeps the user's spelling
    assert p.logic == "LohaA1-AdaFactor"
    assert p.optimizer == "adafactor"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Lora3x3A50-AdamW8", ["did you mean 'Lora3x3A50p-AdamW8'", "alpha mode 'A50'"]),
        ("Lora3x3A50p-Adam", ["did you mean 'Lora3x3A50p-AdamW8'", "unknown optimizer 'Adam'"]),
        ("Lora3x3A50pAdamW8", ["needs a '-'"]),
        ("lora3x3a50p-adamw8", ["did you mean 'Lora3x3A50p-AdamW8'"]),
        ("Lorra3x3A1-AdamW8", ["did you mean 'Lora3x3A1-AdamW8'", "unknown network"]),
        ("LoKrA1-AdamW8", ["unknown network", "Lora3x3, Lora1x1, Locon, Loha"]),
        ("", ["unknown training preset"]),
        ("Lora3x3A50p-AdamW8 ", ["unknown training preset"]),
    ],
)
def test_bad_presets_say_what_is_wrong(text, expected):
    with pytest.raises(ValueError) as err:
        parse_logic(text)
    for part in expected:
        assert part in str(err.value)


def test_non_string_preset_is_refused():
    with pytest.raises(ValueError, match="must be a string"):
        parse_logic(128)


def test_precedence_preset_defaults_overrides_explicit():
    defaults = {"dim": 64, "seed": 1, "steps": 500, "scheduler": "constant"}
    overrides = {"dim": 16, "seed": 2}
    entry = {"name": "mine", "preset": "Lora3x3A50p-AdamW8", "dim": 8}
    p = resolve_variant(entry, defaults=defaults, overrides=overrides, steps=1000)
    assert p.name == "mine" and p.logic == "Lora3x3A50p-AdamW8"
    assert p.dim == 8  # explicit > overrides > defaults > preset
    assert p.alpha == 4 and p.conv_dim == 8 and p.conv_alpha == 4  # derived from the final dim
    assert p.seed == 2  # overrides > defaults
    assert p.steps == 500 and p.scheduler == "constant"  # defaults > kind/preset
    p = resolve_variant("Lora3x3A50p-AdamW8", defaults=defaults, overrides=overrides, steps=1000)
    assert (p.dim, p.alpha) == (16, 8)
    p = resolve_variant("Lora3x3A50p-AdamW8", defaults=defaults, overrides={}, steps=1000)
    assert (p.dim, p.alpha, p.seed) == (64, 32, 1)


def test_explicit_alpha_and_conv_values_beat_derivation():
    p = resolve_variant(
        {"preset": "LoconA1-AdamW8", "dim": 32, "alpha": 8, "conv_dim": 16, "conv_alpha": 2},
        steps=1000,
    )
    assert (p.dim, p.alpha, p.conv_dim, p.conv_alpha, p.algo) == (32, 8, 16, 2, "lora")
    p = resolve_variant({"preset": "Lora3x3A50p-AdamW8", "conv_dim": 0}, steps=1000)
    assert p.conv_dim is None and p.conv_alpha is None


def test_lora1x1_ignores_project_conv_dim_but_refuses_an_explicit_one():
    p = resolve_variant("Lora1x1A50p-AdamW8", defaults={"conv_dim": 64}, steps=1000)
    assert p.conv_dim is None and p.conv_alpha is None
    with pytest.raises(ValueError, match="Lora1x1 trains no conv layers"):
        resolve_variant({"preset": "Lora1x1A1-AdamW8", "conv_dim": 8}, steps=1000)


def test_learning_rates_as_floats_or_original_integer_units():
    p = resolve_variant("Lora3x3A1-AdamW8", defaults={"lr": 200}, steps=1000)
    assert p.lr == pytest.approx(2e-4) and p.lr_units == 200
    assert p.text_encoder_lr == pytest.approx(88e-6)  # floor(200 * 44 / 100)
    p = resolve_variant("Lora3x3A1-AdamW8", overrides={"lr": 5e-5}, steps=1000)
    assert p.lr == pytest.approx(5e-5) and p.lr_units == 50 and p.text_encoder_lr == pytest.approx(22e-6)
    p = resolve_variant({"preset": "Lora3x3A1-AdamW8", "lr": 2.5e-6, "text_encoder_lr": 1e-5}, steps=1000)
    assert p.lr_units is None and p.text_encoder_lr == pytest.approx(1e-5)
    p = resolve_variant("Lora3x3A1-AdamW8", defaults={"lr": 33}, steps=1000)
    assert p.text_encoder_lr == pytest.approx(14e-6)  # floor(14.52)


def test_adafactor_with_another_optimizer_gets_that_optimizers_defaults():
    p = resolve_variant({"preset": "LohaA1-AdaFactor", "optimizer": "AdamW"}, steps=1000)
    assert p.optimizer == "AdamW" and p.optimizer_args == () and p.lr_units == 100
    p = resolve_variant({"preset": "LohaA1-AdaFactor", "optimizer_args": ["relative_step=False"]}, steps=1000)
    assert p.optimizer_args == ("relative_step=False",)


def test_steps_come_from_the_kind_unless_set():
    assert [steps_for_kind(k) for k in ("face", "body", "group")] == [1000, 1200, 1600]
    assert resolve_variant("LohaA1-AdamW8", steps=steps_for_kind("group")).steps == 1600
    assert resolve_variant("LohaA1-AdamW8", overrides={"steps": 7}, steps=1600).steps == 7
    with pytest.raises(ValueError, match="did you mean 'face'"):
        steps_for_kind("fase")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "dims": 4}}, "unknown training setting 'dims' (did you mean 'dim'?)"),
        ({"defaults": {"learning_rate": 1e-4}}, "[training]: unknown training setting 'learning_rate'"),
        ({"overrides": {"sed": 3}}, "unknown training setting 'sed' (did you mean 'seed'?)"),
        ({"entry": {"name": "x"}}, "missing 'preset'"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "name": "a/b"}}, "variant name 'a/b'"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "lr": 0}}, "units of 1e-6"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "lr": "fast"}}, "learning rate"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "lr": 2.0}}, "too large"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "dim": -4}}, "dim = -4"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "dim": True}}, "dim = True"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "mixed_precision": "fp61"}}, "did you mean 'fp16'"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "optimizer": "adamw8bit"}}, "did you mean 'AdamW8bit'"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "extra_args": "--foo"}}, "list of strings"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "gradient_checkpointing": 1}}, "true or false"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "resolution": [512]}}, "resolution"),
        ({"entry": {"preset": "Lora3x3A1-AdamW8", "data_loader_workers": -1}}, "data_loader_workers = -1: must be >= 0"),
        ({"entry": {"preset": "Lora3x3A5-AdamW8"}}, "variant 'Lora3x3A5-AdamW8': unknown training preset"),
        ({"entry": 42}, "preset string or a table"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(kwargs, message):
    entry = kwargs.pop("entry", "Lora3x3A1-AdamW8")
    with pytest.raises(ValueError) as err:
        resolve_variant(entry, steps=1000, **kwargs)
    assert message in str(err.value)


def test_every_training_key_is_accepted_in_a_variant_table():
    values = {
        "dim": 8, "alpha": 2, "conv_dim": 4, "conv_alpha": 1, "lr": 1e-4, "text_encoder_lr": 5e-5,
        "steps": 10, "scheduler": "constant", "seed": 5, "optimizer": "AdamW", "optimizer_args": ["weight_decay=0.1"],
        "clip_skip": 1, "mixed_precision": "no", "save_precision": "float", "gradient_checkpointing": False,
        "network_train_unet_only": True, "resolution": [512, 768], "min_bucket_reso": 256,
        "max_bucket_reso": 1024, "extra_args": ["--noise_offset=0.05"], "data_loader_workers": 0,
        "noise_offset": 0.0357, "min_snr_gamma": 5.0, "v_prediction": True, "zero_terminal_snr": True,
        "cache_text_encoder_outputs": True, "no_half_vae": True, "sample_every": 100,
        "sample_prompts": ["1girl, smile"], "sample_size": 768, "sample_steps": 28, "validation_every": 50,
        "save_every": 200,
    }
    assert set(values) == set(TRAINING_KEYS)
    p = resolve_variant({"preset": "Lora3x3A1-AdamW8", **values}, steps=1000).to_dict()
    for key, value in values.items():
        assert p[key] == pytest.approx(value) if isinstance(value, float) else p[key] == value, key
    assert TrainParams.from_dict(p).to_dict() == p


def test_output_name_is_the_originals():
    p = resolve_variant("Lora3x3A50p-AdamW8", steps=1000)
    assert output_name("krnk", p) == "krnk-Lora3x3A50p-AdamW8-128-100-1000"
    assert output_name("krnk", p.to_dict()) == "krnk-Lora3x3A50p-AdamW8-128-100-1000"
    p = resolve_variant("LohaA1-AdaFacotor", steps=1200)
    assert output_name("krnksf", p) == "krnksf-LohaA1-AdaFactor-32-auto-1200"
    p = resolve_variant({"preset": "Lora1x1A1-AdamW8", "lr": 2.5e-6}, steps=5)
    assert output_name("x", p) == "x-Lora1x1A1-AdamW8-128-2.5e-06-5"


def test_every_training_key_has_its_one_checker_and_workers_default_as_sd_scripts():
    from charbuild.train.variants import TRAINING_CHECKS

    assert set(TRAINING_CHECKS) == set(TRAINING_KEYS)
    assert resolve_variant("Lora3x3A1-AdamW8", steps=10).data_loader_workers == 8  # --max_data_loader_n_workers


def test_the_readme_settings_table_is_the_declarations():
    import re

    from charbuild.train.settings import settings_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- training-settings:begin -->\n(.*?)<!-- training-settings:end -->", readme, re.S)
    assert m, "README.md lost its training-settings markers"
    assert m.group(1) == settings_table(), "README's training settings table is stale: run `python -m charbuild.train.settings`"


def test_every_setting_is_declared_with_a_checker_help_and_signature_policy():
    from dataclasses import fields

    from charbuild.train.settings import SIGNATURE_POLICIES, TRAINING_KEYS, TrainParams

    derived = {"name", "logic", "network", "network_module", "algo", "lr_units"}
    for f in fields(TrainParams):
        if f.name in derived:
            assert "check" not in f.metadata
            continue
        assert f.name in TRAINING_KEYS
        assert callable(f.metadata["check"]) and f.metadata["help"]
        assert f.metadata["signature"] in SIGNATURE_POLICIES
