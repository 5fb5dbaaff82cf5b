"""Training variants: the original preset grammar and the parameters it stands for.

A variant is named by the original framework's *logic* string,
``(Lora3x3|Lora1x1|Locon|Loha)(A1|A50p)-(AdamW8|AdaFactor)`` (the original
script's misspelling ``AdaFacotor`` is accepted too), and turned into one
:class:`TrainParams` by the rules of charframework-rules.md §6:

==========  ==============================================================
part        values
==========  ==============================================================
Lora3x3     networks.lora, conv_dim = dim (3x3 conv layers trained too)
Lora1x1     networks.lora, no conv layers
Locon       lycoris.kohya, algo=lora, conv_dim = dim
Loha        lycoris.kohya, algo=loha, conv_dim = dim
A1          alpha = conv_alpha = 1
A50p        alpha = dim // 2, conv_alpha = conv_dim // 2
AdamW8      AdamW8bit, lr 100e-6, text encoder lr floor(lr*44/100)e-6,
            scheduler cosine_with_restarts
AdaFactor   adafactor with relative_step=True scale_parameter=True
            warmup_init=False, no learning rates
==========  ==============================================================

Sample dims of the original: Lora3x3 and Locon 128, Loha 32. The original gave
no sample for Lora1x1; charbuild uses 128 (the same as Lora3x3).

The grammar is :mod:`charbuild.train.logic`'s, the settings and their defaults
:mod:`charbuild.train.settings`'. This module is pure: no I/O, no torch.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from ..checks import did_you_mean, require
from .logic import ALL_LOGICS, NETWORKS, Logic, parse_logic
from .settings import (
    DEFAULT_DATA_LOADER_WORKERS,
    DEFAULT_SCHEDULER,
    DERIVED_KEYS,
    LATER_KEYS,
    OBSERVING_KEYS,
    TRAINING_CHECKS,
    TRAINING_KEYS,
    TrainParams,
    declared,
    default_of,
    is_learning_rate,
    no_half_vae_in_effect,
)

__all__ = ["ALL_LOGICS", "DEFAULT_DATA_LOADER_WORKERS", "DEFAULT_SCHEDULER", "KIND_STEPS", "LATER_KEYS", "Logic",
           "NETWORKS", "OBSERVING_KEYS", "TRAINING_CHECKS", "TRAINING_KEYS", "TrainParams", "canonical_params_text",
           "format_lr", "lr_to_units", "no_half_vae_in_effect", "output_name", "parse_logic", "resolve_variant", "steps_for_kind",
           "training_defaults", "variant_entries"]

#: Default ``max_train_steps`` per LoRA kind (charframework-rules.md §5).
KIND_STEPS = {"face": 1000, "body": 1200, "group": 1600}

#: Sample network dim per network type (charframework-rules.md §6; Lora1x1 has no sample: 128).
DEFAULT_DIMS = {"Lora3x3": 128, "Lora1x1": 128, "Locon": 128, "Loha": 32}
#: Base learning rate in 1e-6 units, and the text encoder's share of it in percent.
DEFAULT_LR_UNITS = 100
TEXT_ENCODER_PERCENT = 44
ADAFACTOR_ARGS = ("relative_step=True", "scale_parameter=True", "warmup_init=False")

#: Keys of a variant table beside the training keys.
VARIANT_KEYS = ("name", "preset")


def steps_for_kind(kind: str) -> int:
    """Default ``max_train_steps`` of a LoRA kind (face 1000, body 1200, group 1600)."""
    try:
        return KIND_STEPS[kind]
    except KeyError:
        raise ValueError(f"unknown LoRA kind {kind!r}{did_you_mean(kind, KIND_STEPS)}") from None


def lr_to_units(value: float | int) -> int | None:
    """``value`` (a float lr) in whole 1e-6 units, or None when it is not a whole number of them."""
    units = value * 1e6
    r = round(units)
    if r >= 1 and abs(units - r) <= 1e-6 * max(1.0, abs(units)):
        return int(r)
    return None


def _check_keys(d: Mapping[str, Any], allowed, where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        msgs = [f"unknown training setting {k!r}{did_you_mean(k, allowed)}" for k in unknown]
        raise ValueError(f"{where}: " + "; ".join(msgs))


def _get(s: Mapping[str, Any], key: str, default: Any) -> Any:
    """``s[key]`` (or ``default``) checked by the key's checker; None stays None."""
    value = s.get(key, default)
    return None if value is None else require(value, key, TRAINING_CHECKS[key])


def _lr_value(v: Any, key: str) -> tuple[float | None, int | None]:
    """(lr float, lr units) from a setting: a float lr, or an int number of 1e-6 units (>= 1)."""
    if v is None:
        return None, None
    require(v, key, is_learning_rate)
    if isinstance(v, int):
        return v / 1e6, v
    return v, lr_to_units(v)


def resolve_variant(
    entry: str | Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    steps: int,
) -> TrainParams:
    """Turn one entry of a ``variants`` list into :class:`TrainParams`.

    ``entry`` is a logic string (``"Lora3x3A50p-AdamW8"``; it is also the variant's
    name) or a dict ``{"name": ..., "preset": <logic>, <training keys>}`` (``name``
    defaults to the preset). Values are taken, lowest precedence first, from the
    preset, the project ``defaults`` (the ``[training]`` table without ``variants``),
    the LoRA's ``overrides``, and the variant dict's own keys. ``steps`` is the
    LoRA kind's default (see :func:`steps_for_kind`).

    Values that follow from others are derived after merging, unless set: ``alpha``
    from ``dim`` and the alpha mode, ``conv_dim`` = ``dim`` (none for Lora1x1;
    ``conv_dim = 0`` turns conv layers off), ``conv_alpha`` from ``conv_dim``,
    ``text_encoder_lr`` = floor(lr_units * 44 / 100) * 1e-6, ``optimizer_args`` the
    AdaFactor arguments when the optimizer is adafactor.

    Learning rates are floats (``1e-4``) or, as in the original scripts, integers
    in units of 1e-6 (``100`` means 1e-4). Unknown keys raise ValueError naming the
    key with a suggestion; so do wrong types and values.
    """
    defaults = dict(defaults or {})
    overrides = dict(overrides or {})
    defaults.pop("variants", None)
    _check_keys(defaults, TRAINING_KEYS, "[training]")
    _check_keys(overrides, TRAINING_KEYS, "training overrides")
    if isinstance(entry, str):
        name, preset, explicit = entry, entry, {}
    elif isinstance(entry, Mapping):
        _check_keys(entry, TRAINING_KEYS + VARIANT_KEYS, f"variant {entry.get('name', entry.get('preset', '?'))!r}")
        if "preset" not in entry:
            raise ValueError(
                f"variant {entry.get('name', '?')!r}: missing 'preset' (a logic like 'Lora3x3A50p-AdamW8')"
            )
        preset = entry["preset"]
        name = entry.get("name", preset)
        explicit = {k: v for k, v in entry.items() if k not in VARIANT_KEYS}
    else:
        raise ValueError(f"a variant is a preset string or a table with 'preset', not {entry!r}")
    if not isinstance(name, str) or not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"variant name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    try:
        logic = parse_logic(preset)
    except ValueError as e:
        raise ValueError(f"variant {name!r}: {e}") from None

    merged: dict[str, Any] = {}
    for layer in (defaults, overrides):
        merged.update(layer)
    if logic.network == "Lora1x1":
        # A project-wide conv_dim must not turn a 1x1 LoRA into a 3x3 one.
        merged.pop("conv_dim", None)
        merged.pop("conv_alpha", None)
        if explicit.get("conv_dim"):
            raise ValueError(f"variant {name!r}: Lora1x1 trains no conv layers; use Lora3x3 for conv_dim")
    merged.update(explicit)
    try:
        return _derive(name, logic, merged, steps)
    except ValueError as e:
        raise ValueError(f"variant {name!r}: {e}") from None


def _derive(name: str, logic: Logic, s: dict[str, Any], kind_steps: int) -> TrainParams:
    """The variant's TrainParams: the derived settings from the logic, the rest from their declarations."""
    network = logic.network
    module = "networks.lora" if network in ("Lora3x3", "Lora1x1") else "lycoris.kohya"
    algo = {"Locon": "lora", "Loha": "loha"}.get(network)

    dim = require(s.get("dim", DEFAULT_DIMS[network]), "dim", TRAINING_CHECKS["dim"])
    half = logic.alpha_mode == "A50p"
    alpha = _get(s, "alpha", None) if "alpha" in s else (max(1, dim // 2) if half else 1)

    if network == "Lora1x1":
        conv_dim = None
    else:
        cd = _get(s, "conv_dim", dim)
        conv_dim = None if cd in (0, None) else cd
    if conv_dim is None:
        conv_alpha = None
    elif s.get("conv_alpha") is not None:
        conv_alpha = _get(s, "conv_alpha", None)
    else:
        conv_alpha = max(1, conv_dim // 2) if half else 1

    default_opt = "adafactor" if logic.optimizer == "AdaFactor" else "AdamW8bit"
    optimizer = _get(s, "optimizer", default_opt)
    if "optimizer_args" in s:
        optimizer_args = tuple(_get(s, "optimizer_args", ()))
    else:
        optimizer_args = ADAFACTOR_ARGS if optimizer == "adafactor" else ()

    if "lr" in s:
        lr, lr_units = _lr_value(s["lr"], "lr")
    elif optimizer == "adafactor":
        lr, lr_units = None, None
    else:
        lr, lr_units = DEFAULT_LR_UNITS / 1e6, DEFAULT_LR_UNITS
    if "text_encoder_lr" in s:
        te, _ = _lr_value(s["text_encoder_lr"], "text_encoder_lr")
    elif lr is None:
        te = None
    else:
        units = lr_units if lr_units is not None else lr * 1e6
        te = math.floor(units * TEXT_ENCODER_PERCENT / 100) / 1e6 or None

    plain = {}
    for f in declared():
        if f.name not in DERIVED_KEYS:
            value = _get(s, f.name, default_of(f))
            plain[f.name] = tuple(value) if isinstance(value, list) else value
    return TrainParams(
        name=name, logic=str(logic), network=network, network_module=module, algo=algo,
        dim=dim, alpha=alpha, conv_dim=conv_dim, conv_alpha=conv_alpha,
        optimizer=optimizer, optimizer_args=optimizer_args, lr=lr, lr_units=lr_units, text_encoder_lr=te,
        steps=_get(s, "steps", kind_steps), **plain,
    )


def format_lr(value: float) -> str:
    """A learning rate as the original wrote it: ``100e-6`` when it is whole 1e-6 units, else ``repr``."""
    units = lr_to_units(value)
    return f"{units}e-6" if units is not None else repr(float(value))


def output_name(lora: str, params: TrainParams | Mapping[str, Any]) -> str:
    """``<lora>-<logic>-<dim>-<lr>-<steps>``, the original's output name.

    ``<lr>`` is the learning rate in 1e-6 units (``100``); a learning rate that is
    not a whole number of units is written like ``1.5e-05``; none (AdaFactor) is
    written ``auto``.
    """
    p = params.to_dict() if isinstance(params, TrainParams) else dict(params)
    if p.get("lr_units") is not None:
        lr = str(p["lr_units"])
    elif p.get("lr") is not None:
        lr = repr(float(p["lr"]))
    else:
        lr = "auto"
    return f"{lora}-{p['logic']}-{p['dim']}-{lr}-{p['steps']}"


def canonical_params_text(params: TrainParams | Mapping[str, Any]) -> str:
    """A stable JSON spelling of the params (sorted keys), for hashing."""
    import json

    p = params.to_dict() if isinstance(params, TrainParams) else dict(params)
    return json.dumps(p, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def training_defaults(training: Mapping[str, Any]) -> dict[str, Any]:
    """The project's ``[training]`` values that apply to every variant (its ``variants`` list left out)."""
    return {k: v for k, v in training.items() if k != "variants"}


def variant_entries(lora: Any, training: Mapping[str, Any]) -> list:
    """The variant entries of ``lora`` (anything with ``.variants``): its own list, else the project's."""
    return lora.variants or training["variants"]
