"""Every training setting, declared once: :class:`TrainParams` and its fields' metadata.

A training setting (a key of ``[training]``, of a LoRA's ``training = {…}`` or of a variant
table) is one field of :class:`TrainParams` declared with :func:`setting`: its default, its
checker, one line of help, and how it enters a training's signature:

- ``"always"``: part of what is trained (a change retrains);
- ``"later"``: added after the first release; left out of the signature while at its
  default, so a LoRA trained before the key existed does not become stale;
- ``"never"``: only observes a training (samples, validation loss).

The key lists (:data:`TRAINING_KEYS`, :data:`LATER_KEYS`, :data:`OBSERVING_KEYS`), the
checkers (:data:`TRAINING_CHECKS`), the plain defaults of
:func:`charbuild.train.variants.resolve_variant` and the README's settings table
(:func:`settings_table`, checked by a test) all come from these declarations. Adding a setting
is one field here plus the backends that pass it on. Pure: no I/O, no torch.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from ..checks import Checker, is_bool, is_choice, is_int, is_number, is_str

#: Values accepted for the ``optimizer`` setting (sd-scripts ``--optimizer_type`` spellings).
OPTIMIZERS = ("AdamW8bit", "AdamW", "adafactor")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "float")
SIGNATURE_POLICIES = ("always", "later", "never")

DEFAULT_SCHEDULER = "cosine_with_restarts"
DEFAULT_SEED = 31337
#: sd-scripts' ``--max_data_loader_n_workers`` default; 0 loads the data in the training process.
DEFAULT_DATA_LOADER_WORKERS = 8


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


def setting(check: Checker, help: str, *, default: Any = MISSING, signature: str = "always",
            shown: str | None = None) -> Any:
    """A :class:`TrainParams` field that users set: its checker, help and signature policy.

    ``default`` MISSING: derived by :func:`~charbuild.train.variants.resolve_variant` from the
    logic and other settings (``shown`` says how, for the docs). A tuple default is a list
    in TOML. ``signature``: one of :data:`SIGNATURE_POLICIES` (see the module docstring).
    """
    assert signature in SIGNATURE_POLICIES, signature
    meta = {"check": check, "help": help, "signature": signature, "shown": shown}
    if default is MISSING:
        return field(metadata=meta)
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainParams:
    """Everything one training needs besides data and model: the derived fields, then the settings.

    The first six fields follow from the variant's logic (:mod:`charbuild.train.logic`);
    every other field is a setting declared with :func:`setting` (its help says what it is).
    :meth:`to_dict` is the job's ``params``.
    """

    name: str  # the variant's name (its folder)
    logic: str  # canonical logic string
    network: str  # Lora3x3 | Lora1x1 | Locon | Loha
    network_module: str  # networks.lora | lycoris.kohya
    algo: str | None  # None | "lora" | "loha"
    dim: int = setting(is_int(1), "network dim (rank)", shown="128 (Loha 32)")
    alpha: float = setting(is_number(), "network alpha", shown="1 (A1) or dim // 2 (A50p)")
    conv_dim: int | None = setting(is_conv_dim, "rank of the 3x3 conv layers; 0: none",
                                   shown="dim (Lora1x1: none)")
    conv_alpha: float | None = setting(is_number(), "alpha of the conv layers", shown="as alpha, from conv_dim")
    optimizer: str = setting(is_choice(*OPTIMIZERS), "AdamW8bit | AdamW | adafactor",
                             shown="AdamW8bit (AdaFactor logic: adafactor)")
    optimizer_args: tuple[str, ...] = setting(is_string_list, "optimizer arguments, \"k=v\" strings",
                                              shown="none (adafactor: relative_step=True …)")
    lr: float | None = setting(is_learning_rate, "learning rate: 1e-4, or 100 in 1e-6 units as the original",
                               shown="100e-6 (adafactor: none)")
    lr_units: int | None  # lr in whole 1e-6 units, else None (derived)
    text_encoder_lr: float | None = setting(is_learning_rate, "text encoder learning rate",
                                            shown="floor(44 % of lr)")
    steps: int = setting(is_int(1), "max train steps", shown="face 1000, body 1200, group 1600")
    scheduler: str = setting(is_str, "learning-rate scheduler (sd-scripts' names)", default=DEFAULT_SCHEDULER)
    seed: int = setting(is_int(0), "random seed", default=DEFAULT_SEED)
    clip_skip: int | None = setting(is_int(1), "CLIP skip", default=None, shown="the model's clip_skip")
    mixed_precision: str = setting(is_choice(*MIXED_PRECISIONS), "no | fp16 | bf16 (fp32 on a CPU)", default="fp16")
    save_precision: str = setting(is_choice(*SAVE_PRECISIONS), "fp16 | bf16 | float", default="fp16")
    gradient_checkpointing: bool = setting(is_bool, "trade compute for memory", default=True)
    network_train_unet_only: bool = setting(is_bool, "train no text encoder", default=False)
    resolution: int | tuple[int, int] | None = setting(is_resolution, "training resolution, or [w, h]", default=None,
                                                       shown="the dataset's")
    min_bucket_reso: int | None = setting(is_int(1), "smallest bucket side", default=None, shown="the dataset's")
    max_bucket_reso: int | None = setting(is_int(1), "largest bucket side", default=None, shown="the dataset's")
    extra_args: tuple[str, ...] = setting(is_string_list, "extra trainer arguments (sd-scripts)", default=())
    data_loader_workers: int = setting(is_int(0), "data loader processes; 0: load in the training process",
                                       default=DEFAULT_DATA_LOADER_WORKERS, signature="later")
    noise_offset: float = setting(is_number(False), "noise offset; 0: off", default=0.0, signature="later")
    min_snr_gamma: float | None = setting(is_number(), "min-SNR weighting gamma", default=None, signature="later",
                                          shown="off")
    v_prediction: bool = setting(is_bool, "the model predicts v (as NoobAI-XL v-pred)", default=False,
                                 signature="later")
    zero_terminal_snr: bool = setting(is_bool, "rescale the noise schedule to zero terminal SNR", default=False,
                                      signature="later")
    cache_text_encoder_outputs: bool = setting(is_bool, "UNet-only: encode every caption once", default=False,
                                               signature="later")
    no_half_vae: bool | None = setting(is_bool, "keep the VAE in fp32 under fp16/bf16", default=None, signature="later",
                                       shown="true for SDXL, false for SD1.5")
    sample_every: int | None = setting(is_int(1), "steps between sample images", default=None, signature="never",
                                       shown="off")
    sample_prompts: tuple[str, ...] = setting(is_string_list, "extra sample prompts", default=(), signature="never")
    sample_size: int | None = setting(is_int(64), "sample side in px", default=None, signature="never",
                                      shown="training size (CPU: 128)")
    sample_steps: int | None = setting(is_int(1), "denoising steps of a sample", default=None, signature="never",
                                       shown="20 (CPU: 4)")
    validation_every: int | None = setting(is_int(1), "steps between validation-loss evaluations", default=None,
                                           signature="never", shown="off")
    save_every: int | None = setting(is_int(1), "builtin: save the LoRA every N steps into <variant>/saves/ "
                                     "(to continue_from)", default=None, signature="never", shown="off")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tuples as lists): the job's ``params``."""
        d = asdict(self)
        for f in declared():
            if isinstance(d[f.name], tuple):
                d[f.name] = list(d[f.name])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainParams":
        """The inverse of :meth:`to_dict`."""
        d = dict(d)
        for f in declared():
            if isinstance(d.get(f.name), list):
                d[f.name] = tuple(d[f.name])
        return cls(**d)

    def with_values(self, **changes: Any) -> "TrainParams":
        """A copy with some fields replaced (no re-derivation)."""
        return replace(self, **changes)


def no_half_vae_in_effect(no_half_vae: bool | None, arch: str) -> bool:
    """Whether the VAE stays in fp32 under fp16/bf16: as set, else (None) for SDXL, whose VAE
    overflows in fp16. sd-scripts then replaces the NaN latents with zeros and trains on them;
    in fp32 the latents are right, and cached once they cost no time per step."""
    return no_half_vae if no_half_vae is not None else arch == "sdxl"


def declared() -> tuple[Field, ...]:
    """The fields of :class:`TrainParams` that are settings, in declaration order."""
    return tuple(f for f in fields(TrainParams) if "check" in f.metadata)


def default_of(f: Field) -> Any:
    """A setting's plain default (MISSING for a derived one)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


#: Keys a variant table, the project's ``[training]`` table or a LoRA's overrides may set.
TRAINING_KEYS: tuple[str, ...] = tuple(f.name for f in declared())
#: The checker of every training key: the one place its type and range are defined.
TRAINING_CHECKS: dict[str, Checker] = {f.name: f.metadata["check"] for f in declared()}
#: Training keys added after the first release (left out of a signature at their default).
LATER_KEYS: tuple[str, ...] = tuple(f.name for f in declared() if f.metadata["signature"] == "later")
#: Training keys that only observe a training (samples, validation loss): never in its signature.
OBSERVING_KEYS: tuple[str, ...] = tuple(f.name for f in declared() if f.metadata["signature"] == "never")
#: Settings derived from the logic and other settings when not set (the rest have plain defaults).
DERIVED_KEYS: tuple[str, ...] = tuple(f.name for f in declared() if default_of(f) is MISSING)


def _toml(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return "`[]`" if not value else f"`{list(value)!r}`"
    return f"`{value}`"


def settings_table() -> str:
    """The README's table of training settings (markdown), made from the declarations."""
    rows = ["| key | default | what | a change |", "|---|---|---|---|"]
    effect = {"always": "retrains", "later": "retrains (left out while at its default)", "never": "no retraining"}
    for f in declared():
        meta = f.metadata
        default = meta["shown"] or _toml(default_of(f))
        cells = [f"`{f.name}`", default, meta["help"], effect[meta["signature"]]]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m charbuild.train.settings: the README's table
    print(settings_table(), end="")
