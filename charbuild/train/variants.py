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

This module is pure: no I/O, no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, NamedTuple

from ..checks import Checker, closest, did_you_mean, is_bool, is_choice, is_int, is_number, is_str, require

NETWORKS = ("Lora3x3", "Lora1x1", "Locon", "Loha")
ALPHA_MODES = ("A1", "A50p")
OPTIMIZER_PRESETS = ("AdamW8", "AdaFactor")
#: Optimizer part spellings accepted in a logic string -> canonical spelling.
_OPTIMIZER_SPELLINGS = {"AdamW8": "AdamW8", "AdaFactor": "AdaFactor", "AdaFacotor": "AdaFactor"}

#: Values accepted for the ``optimizer`` field (sd-scripts ``--optimizer_type`` spellings).
OPTIMIZERS = ("AdamW8bit", "AdamW", "adafactor")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "float")

#: Default ``max_train_steps`` per LoRA kind (charframework-rules.md §5).
KIND_STEPS = {"face": 1000, "body": 1200, "group": 1600}

#: Sample network dim per network type (charframework-rules.md §6; Lora1x1 has no sample: 128).
DEFAULT_DIMS = {"Lora3x3": 128, "Lora1x1": 128, "Locon": 128, "Loha": 32}
#: Base learning rate in 1e-6 units, and the text encoder's share of it in percent.
DEFAULT_LR_UNITS = 100
TEXT_ENCODER_PERCENT = 44
DEFAULT_SCHEDULER = "cosine_with_restarts"
DEFAULT_SEED = 31337
#: sd-scripts' ``--max_data_loader_n_workers`` default; 0 loads the data in the training process.
DEFAULT_DATA_LOADER_WORKERS = 8
ADAFACTOR_ARGS = ("relative_step=True", "scale_parameter=True", "warmup_init=False")

_LOGIC_RE = re.compile(r"^(Lora3x3|Lora1x1|Locon|Loha)(A1|A50p)-(AdamW8|AdaFactor|AdaFacotor)$")

#: Keys a variant dict, the project's ``[training]`` table or a LoRA's overrides may set.
TRAINING_KEYS = (
    "dim",
    "alpha",
    "conv_dim",
    "conv_alpha",
    "lr",
    "text_encoder_lr",
    "steps",
    "scheduler",
    "seed",
    "optimizer",
    "optimizer_args",
    "clip_skip",
    "mixed_precision",
    "save_precision",
    "gradient_checkpointing",
    "network_train_unet_only",
    "resolution",
    "min_bucket_reso",
    "max_bucket_reso",
    "extra_args",
    "data_loader_workers",
    # how the loss is formed (SDXL users rely on these; sd-scripts flags of the same names)
    "noise_offset",
    "min_snr_gamma",
    "v_prediction",
    "zero_terminal_snr",
    "cache_text_encoder_outputs",
    "no_half_vae",
    # what a training shows while it runs (never part of what is trained)
    "sample_every",
    "sample_prompts",
    "sample_size",
    "sample_steps",
    "validation_every",
    "save_every",
)
#: Training keys added after the first release: a field at its default is left out of a
#: training's signature, so a LoRA trained before the key existed does not become stale.
LATER_KEYS = ("data_loader_workers", "noise_offset", "min_snr_gamma", "v_prediction", "zero_terminal_snr",
              "cache_text_encoder_outputs", "no_half_vae")
#: Training keys that only observe a training (samples, validation loss): never in its signature.
OBSERVING_KEYS = ("sample_every", "sample_prompts", "sample_size", "sample_steps", "validation_every", "save_every")
#: Keys of a variant dict beside the training keys.
VARIANT_KEYS = ("name", "preset")


class Logic(NamedTuple):
    """A parsed logic string: network type, alpha mode and optimizer preset (canonical spellings)."""

    network: str  # Lora3x3 | Lora1x1 | Locon | Loha
    alpha_mode: str  # A1 | A50p
    optimizer: str  # AdamW8 | AdaFactor

    def __str__(self) -> str:
        return f"{self.network}{self.alpha_mode}-{self.optimizer}"


ALL_LOGICS = tuple(str(Logic(n, a, o)) for n in NETWORKS for a in ALPHA_MODES for o in OPTIMIZER_PRESETS)


def parse_logic(text: str) -> Logic:
    """Parse a logic string such as ``"Lora3x3A50p-AdamW8"``.

    Accepts the original misspelling ``AdaFacotor`` (returned as ``AdaFactor``).
    Raises ValueError naming the wrong part and the closest valid logic.
    """
    if not isinstance(text, str):
        raise ValueError(f"a training preset must be a string like 'Lora3x3A50p-AdamW8', not {text!r}")
    m = _LOGIC_RE.match(text)
    if m:
        return Logic(m.group(1), m.group(2), _OPTIMIZER_SPELLINGS[m.group(3)])
    close = closest(text, ALL_LOGICS)
    head, sep, opt = text.partition("-")
    if not sep:
        detail = "it needs a '-' before the optimizer (AdamW8 or AdaFactor)"
    elif opt not in _OPTIMIZER_SPELLINGS:
        detail = f"unknown optimizer {opt!r}, expected AdamW8 or AdaFactor"
    else:
        net = next((n for n in NETWORKS if head.startswith(n)), None)
        if net is None:
            detail = f"unknown network in {head!r}, expected one of {', '.join(NETWORKS)}"
        else:
            detail = f"unknown alpha mode {head[len(net):]!r}, expected A1 or A50p"
    hint = ""
    if close:
        hint = f" (did you mean {close[0]!r}?)"
    raise ValueError(
        f"unknown training preset {text!r}{hint}: {detail}; the grammar is "
        "(Lora3x3|Lora1x1|Locon|Loha)(A1|A50p)-(AdamW8|AdaFactor)"
    )


@dataclass(frozen=True)
class TrainParams:
    """Everything one training needs besides data and model; see :meth:`to_dict`."""

    name: str
    logic: str
    network: str
    network_module: str
    algo: str | None
    dim: int
    alpha: float
    conv_dim: int | None
    conv_alpha: float | None
    optimizer: str
    optimizer_args: tuple[str, ...]
    lr: float | None
    lr_units: int | None
    text_encoder_lr: float | None
    steps: int
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = DEFAULT_SEED
    clip_skip: int | None = None
    mixed_precision: str = "fp16"
    save_precision: str = "fp16"
    gradient_checkpointing: bool = True
    network_train_unet_only: bool = False
    resolution: int | tuple[int, int] | None = None
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    data_loader_workers: int = DEFAULT_DATA_LOADER_WORKERS
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    v_prediction: bool = False
    zero_terminal_snr: bool = False
    cache_text_encoder_outputs: bool = False
    no_half_vae: bool | None = None  # None: the architecture's default (no_half_vae_in_effect)
    sample_every: int | None = None
    sample_prompts: tuple[str, ...] = field(default_factory=tuple)
    sample_size: int | None = None
    sample_steps: int | None = None
    validation_every: int | None = None
    save_every: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with exactly the documented keys (the job's ``params``).

        ``name`` variant name (folder name); ``logic`` canonical logic string;
        ``network`` Lora3x3|Lora1x1|Locon|Loha; ``network_module`` networks.lora|lycoris.kohya;
        ``algo`` None|"lora"|"loha"; ``dim``/``alpha``; ``conv_dim`` (None: no conv layers)
        and ``conv_alpha``; ``optimizer`` AdamW8bit|AdamW|adafactor; ``optimizer_args``
        list of "k=v"; ``lr`` float or None (AdaFactor: None); ``lr_units`` the lr in 1e-6
        units when it is a whole number of them, else None; ``text_encoder_lr`` float or
        None; ``steps``; ``scheduler``; ``seed``; ``clip_skip`` (None: the model's clip
        skip; the runner fills it in before a backend sees the job); ``mixed_precision``;
        ``save_precision``; ``gradient_checkpointing``; ``network_train_unet_only``;
        ``resolution`` (None, int or [w, h]); ``min_bucket_reso``; ``max_bucket_reso``;
        ``extra_args`` list of extra trainer arguments; ``data_loader_workers`` the data
        loader's worker processes (0: none, load in the training process); ``noise_offset``
        (0: off); ``min_snr_gamma`` (None: off); ``v_prediction`` (the model predicts v, as
        NoobAI-XL v-pred); ``zero_terminal_snr`` (rescale the noise schedule to zero terminal
        SNR); ``cache_text_encoder_outputs`` (UNet-only: encode every caption once);
        ``no_half_vae`` (keep the VAE in fp32 under fp16/bf16; None: true for SDXL, see
        :func:`no_half_vae_in_effect`); ``sample_every`` (steps between
        sample images; None: off); ``sample_prompts`` (extra sample prompts); ``sample_size``
        (px, square; None: the training resolution on a GPU, 128 on a CPU, sd-scripts 512/1024);
        ``sample_steps`` (denoising steps; None: 20, 4 on a CPU);
        ``validation_every`` (steps between validation-loss evaluations; None: off);
        ``save_every`` (steps between saves of the LoRA before the end, to continue from; None: off).
        """
        d = asdict(self)
        d["optimizer_args"] = list(self.optimizer_args)
        d["extra_args"] = list(self.extra_args)
        d["sample_prompts"] = list(self.sample_prompts)
        if isinstance(self.resolution, tuple):
            d["resolution"] = list(self.resolution)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainParams":
        """The inverse of :meth:`to_dict`."""
        d = dict(d)
        d["optimizer_args"] = tuple(d.get("optimizer_args") or ())
        d["extra_args"] = tuple(d.get("extra_args") or ())
        d["sample_prompts"] = tuple(d.get("sample_prompts") or ())
        if isinstance(d.get("resolution"), list):
            d["resolution"] = tuple(d["resolution"])
        return cls(**d)

    def with_values(self, **changes: Any) -> "TrainParams":
        """A copy with some fields replaced (no re-derivation)."""
        return replace(self, **changes)


def no_half_vae_in_effect(no_half_vae: bool | None, arch: str) -> bool:
    """Whether the VAE stays in fp32 under fp16/bf16: as set, else (None) for SDXL, whose VAE
    overflows in fp16. sd-scripts then replaces the NaN latents with zeros and trains on them;
    in fp32 the latents are right, and cached once they cost no time per step."""
    return no_half_vae if no_half_vae is not None else arch == "sdxl"


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


def _is_whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_learning_rate(v: Any) -> str | None:
    """A float learning rate in (0, 1), or an integer number of 1e-6 units (>= 1)."""
    if _is_whole(v):
        return None if v >= 1 else f"must be >= 1 as an integer: an integer learning rate is in units of 1e-6, not {v}"
    if isinstance(v, float):
        if not (v > 0 and math.isfinite(v)):
            return f"must be a positive number: a learning rate, not {v}"
        if v >= 1:
            return f"is too large for a learning rate ({v}); write 1e-4, or 100 for 100e-6"
        return None
    return f"must be a learning rate: a float like 1e-4 or an integer number of 1e-6 units, not {v!r}"


def is_string_list(v: Any) -> str | None:
    """A list (or tuple) of strings."""
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return None
    return f"must be a list of strings, not {v!r}"


def is_resolution(v: Any) -> str | None:
    """A positive integer, or ``[width, height]`` of positive integers."""
    if _is_whole(v) and v > 0:
        return None
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_whole(x) and x > 0 for x in v):
        return None
    return "must be an integer or [width, height]"


def is_conv_dim(v: Any) -> str | None:
    """A positive integer, or 0 for no conv layers."""
    return None if _is_whole(v) and v == 0 else is_int(1)(v)


#: The checker of every training key: the one place its type and range are defined (the
#: config loader reports a failing value at its own line; :func:`resolve_variant` raises).
TRAINING_CHECKS: dict[str, Checker] = {
    "dim": is_int(1),
    "alpha": is_number(),
    "conv_dim": is_conv_dim,
    "conv_alpha": is_number(),
    "lr": is_learning_rate,
    "text_encoder_lr": is_learning_rate,
    "steps": is_int(1),
    "scheduler": is_str,
    "seed": is_int(0),
    "optimizer": is_choice(*OPTIMIZERS),
    "optimizer_args": is_string_list,
    "clip_skip": is_int(1),
    "mixed_precision": is_choice(*MIXED_PRECISIONS),
    "save_precision": is_choice(*SAVE_PRECISIONS),
    "gradient_checkpointing": is_bool,
    "network_train_unet_only": is_bool,
    "resolution": is_resolution,
    "min_bucket_reso": is_int(1),
    "max_bucket_reso": is_int(1),
    "extra_args": is_string_list,
    "data_loader_workers": is_int(0),
    "noise_offset": is_number(False),
    "min_snr_gamma": is_number(),
    "v_prediction": is_bool,
    "zero_terminal_snr": is_bool,
    "cache_text_encoder_outputs": is_bool,
    "no_half_vae": is_bool,
    "sample_every": is_int(1),
    "sample_prompts": is_string_list,
    "sample_size": is_int(64),
    "sample_steps": is_int(1),
    "validation_every": is_int(1),
    "save_every": is_int(1),
}


def _get(s: Mapping[str, Any], key: str, default: Any) -> Any:
    """``s[key]`` (or ``default``) checked by the key's checker; None stays None."""
    value = s.get(key, default)
    return None if value is None else require(value, key, TRAINING_CHECKS[key])


def _lr_value(v: Any, key: str) -> tuple[float | None, int | None]:
    """(lr float, lr units) from a setting: a float lr, or an int number of 1e-6 units (>= 1)."""
    if v is None:
        return None, None
    require(v, key, is_learning_rate)
    if _is_whole(v):
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

    steps = _get(s, "steps", kind_steps)
    scheduler = _get(s, "scheduler", DEFAULT_SCHEDULER)
    seed = _get(s, "seed", DEFAULT_SEED)
    clip_skip = _get(s, "clip_skip", None)
    mixed = _get(s, "mixed_precision", "fp16")
    save = _get(s, "save_precision", "fp16")
    flags = {key: _get(s, key, default) for key, default in (("gradient_checkpointing", True),
                                                              ("network_train_unet_only", False))}
    res = _get(s, "resolution", None)
    if isinstance(res, list):
        res = tuple(res)
    min_b = _get(s, "min_bucket_reso", None)
    max_b = _get(s, "max_bucket_reso", None)
    extra = tuple(_get(s, "extra_args", ()))
    workers = _get(s, "data_loader_workers", DEFAULT_DATA_LOADER_WORKERS)
    loss = {key: _get(s, key, default) for key, default in (
        ("noise_offset", 0.0), ("min_snr_gamma", None), ("v_prediction", False), ("zero_terminal_snr", False),
        ("cache_text_encoder_outputs", False), ("no_half_vae", None))}
    observing = {"sample_every": _get(s, "sample_every", None),
                 "sample_prompts": tuple(_get(s, "sample_prompts", ())),
                 "sample_size": _get(s, "sample_size", None),
                 "sample_steps": _get(s, "sample_steps", None),
                 "validation_every": _get(s, "validation_every", None),
                 "save_every": _get(s, "save_every", None)}

    return TrainParams(
        name=name,
        logic=str(logic),
        network=network,
        network_module=module,
        algo=algo,
        dim=dim,
        alpha=alpha,
        conv_dim=conv_dim,
        conv_alpha=conv_alpha,
        optimizer=optimizer,
        optimizer_args=optimizer_args,
        lr=lr,
        lr_units=lr_units,
        text_encoder_lr=te,
        steps=steps,
        scheduler=scheduler,
        seed=seed,
        clip_skip=clip_skip,
        mixed_precision=mixed,
        save_precision=save,
        gradient_checkpointing=flags["gradient_checkpointing"],
        network_train_unet_only=flags["network_train_unet_only"],
        resolution=res,
        min_bucket_reso=min_b,
        max_bucket_reso=max_b,
        extra_args=extra,
        data_loader_workers=workers,
        **loss,
        **observing,
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
