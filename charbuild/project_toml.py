"""``characters/project.toml``: its tables read, checked and defaulted (one ``_load_<table>`` each).

Every problem is collected with the line of its key (:class:`~charbuild.checks.Collector`); the
result is :class:`ProjectSettings`, which :func:`charbuild.config.load_project` turns into the
project. The key sets and defaults of project.toml live here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from . import layout
from .base_arch import DEMO_BASE, DEMO_TRAINING_DEFAULTS, base_arch, tiny_base_arch
from .block_weights import preset_values, resolve_merge_weights
from .checks import (Collector, Origin, is_bool, is_choice, is_fraction, is_int, is_number, is_str,
                     is_str_list, is_table, show_path)
from .errors import Problem
from .explore import DEFAULT_MAX_LEAK, resolve_candidates
from .fsutil import under_root
from .resolve import SDXL_NATIVE, lbw_notes
from .train import BACKENDS
from .train.executors.settings import (EXECUTOR_CHECKS, EXECUTOR_KEYS, missing_ray_message, normal_resources,
                                       ray_installed)
from .train.advice import settings_warnings
from .train.builtin.checkpoint import CheckpointError
from .train.variants import KIND_STEPS, TRAINING_CHECKS, TRAINING_KEYS

DEFAULT_SIZES = (128, 192, 256, 384, 512, 768)
#: SDXL's ladder: the SD1.5 one scaled by 2 for 1024-class training (docs/sdxl.md)
SDXL_DEFAULT_SIZES = (256, 384, 512, 768, 1024, 1536)


def default_sizes(arch: str) -> tuple[int, ...]:
    """The picture ladder of an ``arch`` project that sets no ``[dataset] sizes``."""
    return SDXL_DEFAULT_SIZES if arch == "sdxl" else DEFAULT_SIZES


KIND_DEFAULTS = {
    "face": {"repeats": 4, "steps": KIND_STEPS["face"], "merge": "FACE"},
    "body": {"repeats": 2, "steps": KIND_STEPS["body"], "merge": "BODY"},
    "group": {"repeats": 1, "steps": KIND_STEPS["group"], "merge": "BODY"},
}
DEFAULT_VARIANTS = ("Lora3x3A50p-AdamW8",)
# doit command names and our own task groups: a character or LoRA may not be called so.
RESERVED_NAMES = {
    "auto", "clean", "dumpdb", "forget", "help", "ignore", "info", "list", "reset-dep", "run",
    "strace", "tabcompletion", "image", "caption", "dataset", "preview", "train", "merge",
    "compress", "samples", "all", "default",
}
NAME_RE = re.compile(r"^[^\s,:=/\\@][^,:=/\\@]*$")
KEYWORD_RE = re.compile(r"^[^\s,]+$")


# --------------------------------------------------------------------------- project.toml

PROJECT_KEYS = {"model", "dataset", "training", "trainer", "merge", "compress", "captions"}
MODEL_KEYS = {"base", "vae", "clip_skip", "arch"}
DATASET_KEYS = {"sizes", "batch_sizes"}
# "extra": an opaque, backend-specific table (test knobs of the fake backend), passed through unchecked
TRAINER_KEYS = {"backend", "gpus", "cpu_trainings", "sd_scripts", "python", "accelerate", "xformers", "extra_args",
                "run_cache", "extra"} | EXECUTOR_KEYS
MERGE_KEYS = {"presets", "face", "body", "group", "explore", "explore_max_leak", "explore_blocks"}
COMPRESS_KEYS = {"method", "sv_ratio", "sv_fro", "sv_cumulative", "new_rank", "new_conv_rank", "save_precision"}
COMPRESS_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative", "rank")
COMPRESS_CHECKS = {"method": is_choice(*COMPRESS_METHODS), "sv_ratio": is_number(), "sv_fro": is_fraction,
                   "sv_cumulative": is_fraction, "new_rank": is_int(1), "new_conv_rank": is_int(1),
                   "save_precision": is_choice("fp16", "bf16", "float")}
LORA_KEYS = {"repeats", "steps", "variants", "training", "merge", "explore", "compress", "continue_from"}


@dataclass
class ProjectSettings:
    """The tables of project.toml, validated and defaulted, and where they were written."""

    model: dict = field(default_factory=lambda: {"base": "tiny", "vae": None, "clip_skip": 2, "arch": "sd15"})  # arch: the base model's unless given
    dataset: dict = field(default_factory=dict)
    training: dict = field(default_factory=lambda: {"variants": list(DEFAULT_VARIANTS)})
    trainer: dict = field(default_factory=lambda: {
        "backend": "builtin", "gpus": [0], "cpu_trainings": 1, "sd_scripts": None, "python": None,
        "accelerate": "accelerate",
        "xformers": False, "extra_args": [], "run_cache": True, "extra": {}})
    merge: dict = field(default_factory=lambda: {"presets": {}, "face": "FACE", "body": "BODY", "group": "BODY",
                                                  "explore": [], "explore_max_leak": DEFAULT_MAX_LEAK,
                                                  "explore_blocks": False})
    compress: dict = field(default_factory=lambda: {
        "method": "sv_ratio", "sv_ratio": 16.0, "sv_fro": 0.9, "sv_cumulative": 0.9, "new_rank": 128,
        "new_conv_rank": None, "save_precision": "fp16"})
    captions: dict = field(default_factory=dict)
    origin: Origin = field(default_factory=lambda: Origin("characters/project.toml"))
    readable: bool = True            # False: project.toml could not be parsed (skip checks needing it)
    broken_presets: set = field(default_factory=set)  # presets reported bad: not blamed again where used


def _dataset_defaults(arch: str) -> dict:
    from .dataset_toml import batch_size_tables

    return {"sizes": list(default_sizes(arch)), "batch_sizes": dict(batch_size_tables(arch)["default"])}


def load_project_toml(root: Path, chars_dir: Path, problems: list[Problem]) -> ProjectSettings:
    settings = ProjectSettings()
    settings.dataset = _dataset_defaults(settings.model["arch"])
    path = chars_dir / "project.toml"
    settings.origin = Origin(show_path(root, path))
    if not path.exists():
        return settings
    c = Collector(root, path, problems)
    data = c.load()
    settings.origin = c.origin
    if data is None:
        settings.readable = False
        return settings
    c.check_keys(data, PROJECT_KEYS)
    for name in PROJECT_KEYS & set(data):
        if not isinstance(data[name], dict):
            c.error(f"'{name}' must be a table ([{name}])", (name,))
            data[name] = {}
    _load_model(c, root, data.get("model", {}), settings)
    settings.dataset = _dataset_defaults(settings.model["arch"])
    _load_dataset(c, data.get("dataset", {}), settings)
    _load_training(c, data.get("training", {}), settings)
    _load_trainer(c, root, data.get("trainer", {}), data.get("model", {}), settings)
    for message, keypath in settings_warnings(settings.model, settings.trainer, data.get("training", {})):
        c.warning(message, keypath)
    _load_merge(c, data.get("merge", {}), settings)
    settings.compress.update(compress_table(c, data.get("compress", {}), ("compress",)))
    _load_captions(c, data.get("captions", {}), settings)
    return settings


def _load_model(c: Collector, root: Path, model: dict, settings: ProjectSettings) -> None:
    kp = ("model",)
    c.check_keys(model, MODEL_KEYS, kp)
    m = settings.model
    m["base"] = c.get(model, "base", is_str, m["base"], kp)
    m["vae"] = c.get(model, "vae", is_str, None, kp)
    m["clip_skip"] = c.get(model, "clip_skip", is_int(1, 12), m["clip_skip"], kp)
    given = c.get(model, "arch", is_choice("sd15", "sdxl"), None, kp)
    base_ok = True
    for key in ("base", "vae"):
        value = m[key]
        if value and not (key == "base" and tiny_base_arch(value)) and not under_root(root, value).exists():
            c.error(f"'model.{key}' file or folder {value!r} does not exist; give a path relative to "
                    f"{root.name}/ or an absolute path" + ("" if key == "vae" else ", or \"demo\" / \"tiny\" / \"tiny-sdxl\" for a built-in model"),
                    ("model", key))
            base_ok = base_ok and key != "base"
    m["arch"] = _model_arch(c, root, m["base"], given, model, base_ok)


def _model_arch(c: Collector, root: Path, base: str, given: str | None, model: dict, base_ok: bool) -> str:
    """``arch`` as given, checked against the base model; when not given, read from the model.

    A contradiction is reported at the ``arch`` line, an unreadable model at the ``base`` line.
    """
    fallback = given or "sd15"
    if not base_ok or not base:
        return fallback
    found = tiny_base_arch(base)
    where = f"model.base {base!r}"
    if found is None:
        path = under_root(root, base)
        try:
            found = base_arch(path, root / layout.CACHE)
        except CheckpointError as exc:
            c.error(f"'model.base' {show_path(root, path)}: {exc.message}", ("model", "base") if "base" in model else ("model",))
            return fallback
        where = show_path(root, path)
    if given is not None and given != found:
        c.error(f"'model.arch' = {given!r} but {where} is {'an SDXL' if found == 'sdxl' else 'an SD1.x'} model: "
                f"set arch = {found!r}, or leave arch out to take it from the model", ("model", "arch"))
        return given
    return found


def _load_dataset(c: Collector, ds: dict, settings: ProjectSettings) -> None:
    from .dataset_toml import BATCH_KEYS, batch_size_tables

    tables = batch_size_tables(settings.model["arch"])
    kp = ("dataset",)
    c.check_keys(ds, DATASET_KEYS, kp)
    sizes = c.get(ds, "sizes", _sizes_check, settings.dataset["sizes"], kp)
    settings.dataset["sizes"] = sorted(set(sizes))
    arch = settings.model["arch"]
    if arch == "sdxl" and "sizes" in ds and max(settings.dataset["sizes"]) < SDXL_NATIVE:
        c.warning(f"'dataset.sizes' tops out at {max(settings.dataset['sizes'])} px, but the base model is SDXL, "
                  f"which trains at {SDXL_NATIVE} px: add {SDXL_NATIVE} (and larger) sizes, or leave sizes out for "
                  f"the SDXL ladder {list(SDXL_DEFAULT_SIZES)}", kp + ("sizes",))
    if "batch_sizes" not in ds:
        return
    bs = ds["batch_sizes"]
    if isinstance(bs, str):
        if bs in tables:
            settings.dataset["batch_sizes"] = dict(tables[bs])
        else:
            c.error(f"'dataset.batch_sizes' names no table: {bs!r}; use one of the {settings.model['arch']} tables "
                    f"{', '.join(repr(k) for k in tables)} or a table of {BATCH_KEYS[0]}..", kp + ("batch_sizes",))
    elif isinstance(bs, dict):
        c.check_keys(bs, set(BATCH_KEYS), kp + ("batch_sizes",))
        table = dict(tables["default"])
        table.update(c.checked(bs, {k: is_int(1) for k in BATCH_KEYS}, kp + ("batch_sizes",)))
        settings.dataset["batch_sizes"] = table
    else:
        c.error(f"'dataset.batch_sizes' must be a table name ({', '.join(repr(k) for k in tables)}) or a table", kp + ("batch_sizes",))


def _load_training(c: Collector, tr: dict, settings: ProjectSettings) -> None:
    kp = ("training",)
    c.check_keys(tr, set(TRAINING_KEYS) | {"variants"}, kp)
    # each value is checked at its own line; a bad one is reported once here, not per LoRA
    settings.training.update(c.checked(tr, TRAINING_CHECKS, kp))
    if settings.model.get("base") == DEMO_BASE:  # the demo model shows what a LoRA learns: samples on
        for key, value in DEMO_TRAINING_DEFAULTS.items():
            settings.training.setdefault(key, value)
    if "variants" in tr:
        settings.training["variants"] = c.get(tr, "variants", variants_check, settings.training["variants"], kp)


def _load_trainer(c: Collector, root: Path, tn: dict, model: dict, settings: ProjectSettings) -> None:
    kp = ("trainer",)
    for key in [k for k in tn if k.startswith("fake_")]:  # the fake backend's test knobs left [trainer]
        c.error(f"'trainer.{key}' is a backend-specific setting: move it into the [trainer.extra] table", kp + (key,))
    c.check_keys({k: v for k, v in tn.items() if not k.startswith("fake_")}, TRAINER_KEYS, kp)
    t, m = settings.trainer, settings.model
    t["backend"] = c.get(tn, "backend", is_choice(*BACKENDS), t["backend"], kp)
    t["gpus"] = c.get(tn, "gpus", _gpus_check, t["gpus"], kp)
    t["cpu_trainings"] = c.get(tn, "cpu_trainings", is_int(1), t["cpu_trainings"], kp)
    t["sd_scripts"] = c.get(tn, "sd_scripts", is_str, None, kp)
    t["python"] = c.get(tn, "python", is_str, None, kp)
    if "accelerate" in tn and tn["accelerate"] is False:
        t["accelerate"] = None
    else:
        t["accelerate"] = c.get(tn, "accelerate", is_str, t["accelerate"], kp)
    t["xformers"] = c.get(tn, "xformers", is_bool, False, kp)
    t["extra_args"] = c.get(tn, "extra_args", is_str_list, [], kp)
    t["run_cache"] = c.get(tn, "run_cache", is_bool, True, kp)
    t["extra"] = dict(c.get(tn, "extra", is_table, {}, kp))
    _load_executor(c, tn, t)
    if t["backend"] == "sd-scripts":
        if not t["sd_scripts"]:
            c.error("backend 'sd-scripts' needs 'sd_scripts = \"<path to your kohya-ss/sd-scripts folder>\"'", kp + ("backend",))
        elif not (under_root(root, t["sd_scripts"]) / _sd_script(m["arch"])).exists():
            c.error(f"'trainer.sd_scripts' = {t['sd_scripts']!r} has no {_sd_script(m['arch'])}; point it at a kohya-ss/sd-scripts checkout", kp + ("sd_scripts",))
        if tiny_base_arch(m["base"]):
            c.error(f"sd-scripts cannot train the built-in {m['base']!r} model; set [model] base to a real checkpoint or use backend = \"builtin\"", ("model", "base") if "base" in model else kp + ("backend",))


def _sd_script(arch: str) -> str:
    return "sdxl_train_network.py" if arch == "sdxl" else "train_network.py"


def _load_executor(c: Collector, tn: dict, t: dict) -> None:
    """The executor keys of ``[trainer]`` (only those set: their defaults are TrainerSpec's)."""
    kp = ("trainer",)
    t.update(c.checked({k: v for k, v in tn.items() if k in EXECUTOR_CHECKS}, EXECUTOR_CHECKS, kp))
    if "resources" in t:
        t["resources"] = normal_resources(t["resources"])
    if t.get("executor") == "ray" and not ray_installed():
        c.error(missing_ray_message(), kp + ("executor",))


def _load_merge(c: Collector, mg: dict, settings: ProjectSettings) -> None:
    """``[merge]``: presets first (each checked at its own line), then the kinds' defaults."""
    kp = ("merge",)
    c.check_keys(mg, MERGE_KEYS, kp)
    arch = settings.model["arch"]
    presets = {}
    for name, value in c.get(mg, "presets", is_table, {}, kp).items():
        try:
            with lbw_notes(lambda note: c.warning(f"[merge.presets] {name}: {note}", kp + ("presets", name))):
                presets[name] = preset_values(value, arch)
        except ValueError as exc:
            c.error(f"[merge.presets] {name}: {exc}", kp + ("presets", name))
            settings.broken_presets.add(name)
    settings.merge["presets"] = presets
    for kind in ("face", "body", "group"):
        if kind not in mg:
            continue
        spec = mg[kind]
        settings.merge[kind] = spec
        if isinstance(spec, str) and spec.strip() in settings.broken_presets:
            continue
        try:
            with lbw_notes(lambda note: c.warning(f"'merge.{kind}': {note}", kp + (kind,))):
                resolve_merge_weights(spec, {"merge": settings.merge, "model": settings.model})
        except ValueError as exc:
            c.error(f"'merge.{kind}': {exc}", kp + (kind,))
    settings.merge["explore_max_leak"] = c.get(mg, "explore_max_leak", is_fraction, DEFAULT_MAX_LEAK, kp)  # None: relative
    settings.merge["explore_blocks"] = c.get(mg, "explore_blocks", is_bool, False, kp)
    if "explore" in mg:
        settings.merge["explore"] = mg["explore"]
        with lbw_notes(lambda note: c.warning(f"'merge.explore': {note}", kp + ("explore",))):
            _, problems = resolve_candidates(mg["explore"], {"merge": settings.merge, "model": settings.model})
        for message in problems:
            c.error(f"[merge] {message}", kp + ("explore",))


def _load_captions(c: Collector, caps: dict, settings: ProjectSettings) -> None:
    from .captions import rules_with_overrides

    good = {}
    for key, value in caps.items():  # one rule at a time: each complaint at its own line
        try:
            rules_with_overrides({key: value})
        except ValueError as exc:
            c.error(f"[captions]: {exc}", ("captions", key))
            continue
        good[key] = value
    settings.captions = good


def compress_table(c: Collector, table: dict, keypath: tuple) -> dict:
    c.check_keys(table, COMPRESS_KEYS, keypath)
    return c.checked(table, COMPRESS_CHECKS, keypath)


def _sizes_check(v):
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 32 for x in v):
        return "must be a non-empty list of sizes in pixels (whole numbers >= 32), e.g. [128, 256, 512]"
    return None


def _gpus_check(v):
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
        return "must be a non-empty list of GPU numbers, e.g. [0] or [0, 1]"
    return None




# --------------------------------------------------------------------------- character.toml


def variants_check(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, (str, dict)) for x in v):
        return "must be a non-empty list of variant presets (e.g. \"Lora3x3A50p-AdamW8\") or variant tables"
    return None
