"""Load and validate a character project: TOML files and source pictures → ``Project``.

Every problem found is collected, never just the first: the user fixes a whole
list in one go. Each problem names the file and, for TOML, the line of the
offending key, and says what to do (``path:line: error: message``).

This module is the loader; the objects it builds are in :mod:`charbuild.model`, the
checkers and the did-you-mean in :mod:`charbuild.checks`. One ``_load_<table>``
function per table of ``project.toml``.

Layout (see README): ``<root>/characters/project.toml`` (optional),
``<root>/characters/groups.toml`` (optional),
``<root>/characters/<name>/character.toml`` with ``face/`` and
``outfits/<outfit>/`` picture folders beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import codes, layout
from .base_arch import DEMO_BASE, DEMO_TRAINING_DEFAULTS, base_arch, tiny_base_arch
from .block_weights import merge_spec, preset_values, resolve_merge_weights
from .checks import (Collector, Origin, closest, is_bool, is_choice, is_fraction, is_int, is_number, is_str,
                     is_str_list, is_table, show_path)
from .errors import CharbuildError, ConfigError, Problem
from .fsutil import under_root
from .model import Character, Lora, LoraTable, Part, Project, SourceImage
from .prepared import image_dir, prepared_sizes, subset_for
from .train import BACKENDS
from .train.executors.settings import (EXECUTOR_CHECKS, EXECUTOR_KEYS, missing_ray_message, normal_resources,
                                       ray_installed)
from .train.builtin.checkpoint import CheckpointError
from .train.variants import KIND_STEPS, TRAINING_CHECKS, TRAINING_KEYS, training_defaults, variant_entries

__all__ = [
    # the loader
    "load_project", "find_root",
    # the model and the stage helpers, re-exported where tasks.py imports them today
    "Character", "Lora", "LoraTable", "Part", "Project", "SourceImage", "image_dir", "merge_spec",
    "prepared_sizes", "resolve_merge_weights", "subset_for", "training_defaults", "variant_entries",
]

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
    "compress", "all", "default",
}
_NAME_RE = re.compile(r"^[^\s,:=/\\@][^,:=/\\@]*$")
_KEYWORD_RE = re.compile(r"^[^\s,]+$")


# --------------------------------------------------------------------------- project.toml

PROJECT_KEYS = {"model", "dataset", "training", "trainer", "merge", "compress", "captions"}
MODEL_KEYS = {"base", "vae", "clip_skip", "arch"}
DATASET_KEYS = {"sizes", "batch_sizes"}
# "extra": an opaque, backend-specific table (test knobs of the fake backend), passed through unchecked
TRAINER_KEYS = {"backend", "gpus", "sd_scripts", "python", "accelerate", "xformers", "extra_args",
                "run_cache", "extra"} | EXECUTOR_KEYS
MERGE_KEYS = {"presets", "face", "body", "group"}
COMPRESS_KEYS = {"method", "sv_ratio", "sv_fro", "sv_cumulative", "new_rank", "new_conv_rank", "save_precision"}
COMPRESS_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative", "rank")
COMPRESS_CHECKS = {"method": is_choice(*COMPRESS_METHODS), "sv_ratio": is_number(), "sv_fro": is_fraction,
                   "sv_cumulative": is_fraction, "new_rank": is_int(1), "new_conv_rank": is_int(1),
                   "save_precision": is_choice("fp16", "bf16", "float")}
LORA_KEYS = {"repeats", "steps", "variants", "training", "merge", "compress", "continue_from"}


@dataclass
class _Settings:
    """The tables of project.toml, validated and defaulted, and where they were written."""

    model: dict = field(default_factory=lambda: {"base": "tiny", "vae": None, "clip_skip": 2, "arch": "sd15"})  # arch: the base model's unless given
    dataset: dict = field(default_factory=dict)
    training: dict = field(default_factory=lambda: {"variants": list(DEFAULT_VARIANTS)})
    trainer: dict = field(default_factory=lambda: {
        "backend": "builtin", "gpus": [0], "sd_scripts": None, "python": None, "accelerate": "accelerate",
        "xformers": False, "extra_args": [], "run_cache": True, "extra": {}})
    merge: dict = field(default_factory=lambda: {"presets": {}, "face": "FACE", "body": "BODY", "group": "BODY"})
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


def _load_project_toml(root: Path, chars_dir: Path, problems: list[Problem]) -> _Settings:
    settings = _Settings()
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
    _load_merge(c, data.get("merge", {}), settings)
    settings.compress.update(_compress_table(c, data.get("compress", {}), ("compress",)))
    _load_captions(c, data.get("captions", {}), settings)
    return settings


def _load_model(c: Collector, root: Path, model: dict, settings: _Settings) -> None:
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


def _load_dataset(c: Collector, ds: dict, settings: _Settings) -> None:
    from .dataset_toml import BATCH_KEYS, batch_size_tables

    tables = batch_size_tables(settings.model["arch"])
    kp = ("dataset",)
    c.check_keys(ds, DATASET_KEYS, kp)
    sizes = c.get(ds, "sizes", _sizes_check, settings.dataset["sizes"], kp)
    settings.dataset["sizes"] = sorted(set(sizes))
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


def _load_training(c: Collector, tr: dict, settings: _Settings) -> None:
    kp = ("training",)
    c.check_keys(tr, set(TRAINING_KEYS) | {"variants"}, kp)
    # each value is checked at its own line; a bad one is reported once here, not per LoRA
    settings.training.update(c.checked(tr, TRAINING_CHECKS, kp))
    if settings.model.get("base") == DEMO_BASE:  # the demo model shows what a LoRA learns: samples on
        for key, value in DEMO_TRAINING_DEFAULTS.items():
            settings.training.setdefault(key, value)
    if "variants" in tr:
        settings.training["variants"] = c.get(tr, "variants", _variants_check, settings.training["variants"], kp)


def _load_trainer(c: Collector, root: Path, tn: dict, model: dict, settings: _Settings) -> None:
    kp = ("trainer",)
    for key in [k for k in tn if k.startswith("fake_")]:  # the fake backend's test knobs left [trainer]
        c.error(f"'trainer.{key}' is a backend-specific setting: move it into the [trainer.extra] table", kp + (key,))
    c.check_keys({k: v for k, v in tn.items() if not k.startswith("fake_")}, TRAINER_KEYS, kp)
    t, m = settings.trainer, settings.model
    t["backend"] = c.get(tn, "backend", is_choice(*BACKENDS), t["backend"], kp)
    t["gpus"] = c.get(tn, "gpus", _gpus_check, t["gpus"], kp)
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


def _load_merge(c: Collector, mg: dict, settings: _Settings) -> None:
    """``[merge]``: presets first (each checked at its own line), then the kinds' defaults."""
    kp = ("merge",)
    c.check_keys(mg, MERGE_KEYS, kp)
    arch = settings.model["arch"]
    presets = {}
    for name, value in c.get(mg, "presets", is_table, {}, kp).items():
        try:
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
            resolve_merge_weights(spec, {"merge": settings.merge, "model": settings.model})
        except ValueError as exc:
            c.error(f"'merge.{kind}': {exc}", kp + (kind,))


def _load_captions(c: Collector, caps: dict, settings: _Settings) -> None:
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


def _compress_table(c: Collector, table: dict, keypath: tuple) -> dict:
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

CHARACTER_KEYS = {"keyword", "class", "tags", "background", "symmetric", "face", "outfits"}
OUTFIT_KEYS = LORA_KEYS | {"keyword", "tags"}


def _lora_table(c: Collector, table: dict, keypath: tuple, kind: str) -> LoraTable:
    """The LoRA settings of one table (``[face]``, ``[outfits.<o>]``, a group), checked key by key."""
    d = KIND_DEFAULTS[kind]
    training = c.get(table, "training", is_table, {}, keypath)
    if training:
        c.check_keys(training, TRAINING_KEYS, keypath + ("training",))
        training = c.checked(training, TRAINING_CHECKS, keypath + ("training",))
    steps = c.get(table, "steps", is_int(1), d["steps"], keypath)
    if "steps" in table:
        # the LoRA's own steps beat a project-wide [training] steps
        training = {**training}
        training.setdefault("steps", steps)
    return LoraTable(
        repeats=c.get(table, "repeats", is_int(1), d["repeats"], keypath),
        steps=steps,
        variants=c.get(table, "variants", _variants_check, None, keypath),
        training=training,
        merge=table.get("merge"),
        compress=_compress_table(c, c.get(table, "compress", is_table, {}, keypath), keypath + ("compress",)),
        continue_from=c.get(table, "continue_from", is_str, None, keypath),
        origin=c.origin.at(*keypath),
    )


def _variants_check(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, (str, dict)) for x in v):
        return "must be a non-empty list of variant presets (e.g. \"Lora3x3A50p-AdamW8\") or variant tables"
    return None


def _load_character(root: Path, folder: Path, problems: list[Problem]) -> Character | None:
    path = folder / "character.toml"
    c = Collector(root, path, problems)
    data = c.load()
    if data is None:
        return None
    name = folder.name
    c.check_keys(data, CHARACTER_KEYS)
    if not _NAME_RE.match(name) or name in RESERVED_NAMES:
        c.error(f"the folder name {name!r} cannot be a character name (it may not contain , : = / \\ @, "
                f"start with a space, or be one of doit's commands); rename the folder")
    keyword = c.get(data, "keyword", _keyword_check, None)
    if "keyword" not in data:
        c.error("missing 'keyword': add e.g. keyword = \"krnk\" (the trigger word of this character)")
    class_token = c.get(data, "class", is_str, "girl")
    tags = c.get(data, "tags", is_str_list, [])
    background = c.get(data, "background", is_choice("black", "white"), "black")
    symmetric = c.get(data, "symmetric", is_bool, True)
    face_table = c.get(data, "face", is_table, {})
    c.check_keys(face_table, LORA_KEYS, ("face",))
    face_settings = _lora_table(c, face_table, ("face",), "face")
    if keyword is None:
        return None
    face = Part(name, "face", "face", keyword, class_token, [keyword, *tags], symmetric, background)
    # without a [face] table, the face LoRA's messages point at the keyword
    face.settings = face_settings if c.origin.has("face") else replace(
        face_settings, origin=Origin(c.shown, ("keyword",), c.lines))
    outfits: dict[str, Part] = {}
    outfit_tables = c.get(data, "outfits", is_table, {})
    for outfit, table in outfit_tables.items():
        kp = ("outfits", outfit)
        if not isinstance(table, dict):
            c.error(f"'outfits.{outfit}' must be a table: [outfits.{outfit}]", kp)
            continue
        c.check_keys(table, OUTFIT_KEYS, kp)
        if outfit == "face" or not _NAME_RE.match(outfit):
            c.error(f"{outfit!r} cannot be an outfit name (not 'face', no , : = / \\ @); rename it", kp)
            continue
        okw = c.get(table, "keyword", _keyword_check, None, kp)
        if "keyword" not in table:
            c.error(f"[outfits.{outfit}] has no 'keyword': add e.g. keyword = \"{keyword}{outfit[:2]}\" (the body LoRA's trigger word)", kp)
            continue
        if okw is None:
            continue
        otags = c.get(table, "tags", is_str_list, [], kp)
        part = Part(name, outfit, "body", okw, class_token, [okw, *otags], symmetric, background)
        part.settings = _lora_table(c, table, kp, "body")
        outfits[outfit] = part
    return Character(name, folder, keyword, class_token, tags, background, symmetric, face, outfits, c.shown)


def _keyword_check(v):
    if not isinstance(v, str) or not _KEYWORD_RE.match(v):
        return "must be one word without spaces or commas (the trigger word), e.g. \"krnk\""
    return None


# --------------------------------------------------------------------------- pictures


def _scan_part(root: Path, part: Part, folder: Path, expected: str, problems: list[Problem], verify: bool) -> None:
    """Fill ``part.images`` from ``folder``; report misplaced, uncoded and unreadable pictures."""
    from .images import read_size, verify_image

    other = {"f": "b", "b": "f"}[expected]
    where = {"f": "face folder", "b": "outfit folder"}
    stems: dict[str, Path] = {}
    if not folder.is_dir():
        return
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        if f.name.startswith(".") or not f.is_file() or f.suffix.lower() not in codes.IMAGE_EXTENSIONS:
            continue
        shown = show_path(root, f)
        code = codes.parse_code(f.name)
        if code is None:
            problems.append(Problem(shown, "the file name does not start with an image code [fb][0-2][0-7] "
                                    f"(e.g. {expected}00.png); rename it or move it out of the folder"))
            continue
        if code[0] == other:
            problems.append(Problem(shown, f"a '{other}' picture in a {where[expected]}: {other}-codes belong in "
                                    f"{'face/' if other == 'f' else 'outfits/<outfit>/'}; move or rename it"))
            continue
        if f.stem in stems:
            problems.append(Problem(shown, f"two pictures named {f.stem!r} ({stems[f.stem].name} and {f.name}); "
                                    "they would produce the same prepared file: rename one"))
            continue
        stems[f.stem] = f
        try:
            width, height = read_size(f)
        except CharbuildError as exc:
            problems.append(Problem(shown, exc.message))
            continue
        if verify:
            complaint = verify_image(f)
            if complaint:
                problems.append(Problem(shown, complaint))
                continue
        part.images.append(SourceImage(f, show_path(root, f), code, f.stem, width, height))


def _template_warnings(root: Path, ch: Character, problems: list[Problem]) -> None:
    for part, letter, folder in [(ch.face, "f", ch.dir / "face")] + [
        (p, "b", ch.dir / "outfits" / p.name) for p in ch.outfits.values()
    ]:
        if not part.images:
            continue
        have = {img.code for img in part.images}
        missing = [code for code in codes.TEMPLATE_CODES[letter] if code not in have]
        if missing:
            problems.append(Problem(show_path(root, folder), f"angle codes missing from the template set: "
                                    f"{', '.join(missing)} (the LoRA learns those angles less well)", None, "warning"))
        if not ch.symmetric:
            mirrors = [code for code in codes.ALL_CODES if code[0] == letter and code[2] in "567"]
            if not have & set(mirrors):
                problems.append(Problem(show_path(root, folder), "the character is not symmetric (symmetric = false) "
                                        f"but has no mirrored-angle pictures ({letter}05-{letter}07, {letter}15-...): "
                                        "add them, or set symmetric = true", None, "warning"))


# --------------------------------------------------------------------------- groups.toml

GROUP_KEYS = LORA_KEYS | {"members"}


def _load_groups(root: Path, chars_dir: Path, characters: dict[str, Character], unreadable: set[str],
                 problems: list[Problem]) -> list[tuple[str, list[Part], LoraTable]]:
    """The groups of groups.toml; ``unreadable`` names the character folders whose
    character.toml had errors: their members are not blamed on groups.toml."""
    path = chars_dir / "groups.toml"
    if not path.exists():
        return []
    c = Collector(root, path, problems)
    data = c.load()
    if data is None:
        return []
    groups = []
    known = sorted(f"{ch}/{o}" for ch, char in characters.items() for o in char.outfits)
    for gname, table in data.items():
        kp = (gname,)
        if not isinstance(table, dict):
            c.error(f"'{gname}' must be a table: [{gname}] with members = [...]", kp)
            continue
        c.check_keys(table, GROUP_KEYS, kp)
        if not _NAME_RE.match(gname) or gname in RESERVED_NAMES:
            c.error(f"{gname!r} cannot be a group name (no , : = / \\ @, not a doit command); rename it", kp)
            continue
        members = c.get(table, "members", is_str_list, None, kp)
        if "members" not in table:
            c.error(f"[{gname}] has no 'members': add members = [\"<character>/<outfit>\", ...]", kp)
        if not members:
            continue
        parts: list[Part] = []
        for member in members:
            ch_name, _, outfit = member.partition("/")
            ch = characters.get(ch_name)
            if ch is None and ch_name in unreadable:
                c.warning(f"[{gname}] member {member!r} not checked: its character could not be read "
                          f"(fix {show_path(root, chars_dir / ch_name / 'character.toml')} first)", kp + ("members",))
                continue
            if ch is None or outfit not in ch.outfits:
                close = closest(member, known)
                hint = f"; did you mean '{close[0]}'?" if close else (f"; known: {', '.join(known)}" if known else "")
                c.error(f"[{gname}] member {member!r} is no character outfit (write \"<character>/<outfit>\"){hint}", kp + ("members",))
                continue
            parts.append(ch.outfits[outfit])
        if parts:
            groups.append((gname, parts, _lora_table(c, table, kp, "group")))
    return groups


# --------------------------------------------------------------------------- putting it together


def find_root(start: Path | None = None) -> Path:
    """The project root: the nearest folder from ``start`` upwards holding ``characters/``."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "characters").is_dir():
            return folder
    raise ConfigError([Problem(str(start), "no characters/ folder here or above: run in a charbuild project "
                               "(or create one with `charbuild new <name>`)")])


def load_project(root: str | Path, *, verify_images: bool = False) -> Project:
    """Load and validate the project at ``root``; raise ``ConfigError`` listing every error.

    Warnings are returned in ``Project.warnings``. ``verify_images`` decodes every
    picture fully (slow: for ``charbuild check``); otherwise only headers are read.
    """
    root = Path(root).resolve()
    chars_dir = root / "characters"
    problems: list[Problem] = []
    if not chars_dir.is_dir():
        raise ConfigError([Problem(show_path(root, chars_dir), "no characters/ folder: create it, one folder per character")])
    settings = _load_project_toml(root, chars_dir, problems)

    characters: dict[str, Character] = {}
    unreadable: set[str] = set()  # folders whose character.toml has errors
    for folder in sorted(p for p in chars_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if not (folder / "character.toml").exists():
            if any(folder.iterdir()):
                problems.append(Problem(show_path(root, folder), "a folder without character.toml: add one "
                                        f"(`charbuild new {folder.name}`) or move the folder out of characters/", None, "warning"))
            continue
        ch = _load_character(root, folder, problems)
        if ch is None:
            unreadable.add(folder.name)
            continue
        characters[ch.name] = ch
        _scan_part(root, ch.face, folder / "face", "f", problems, verify_images)
        for outfit in ch.outfits.values():
            _scan_part(root, outfit, folder / "outfits" / outfit.name, "b", problems, verify_images)
        outfits_dir = folder / "outfits"
        if outfits_dir.is_dir():
            for sub in sorted(outfits_dir.iterdir()):
                if sub.is_dir() and sub.name not in ch.outfits and not sub.name.startswith("."):
                    problems.append(Problem(show_path(root, sub), f"outfit folder without an [outfits.{sub.name}] table in "
                                            f"{ch.source}: add the table or move the folder", None, "warning"))
        _template_warnings(root, ch, problems)

    loras: dict[str, Lora] = {}
    defined_at: dict[str, str] = {}

    def add(lora: Lora, where: str) -> None:
        if lora.name in loras or lora.name in characters and characters[lora.name].keyword != lora.name:
            first = defined_at.get(lora.name, "a character folder name")
            problems.append(Problem(lora.source, f"the name {lora.name!r} is used twice (also in {first}): "
                                    "keywords and group names must be unique; rename one", lora.line))
            return
        loras[lora.name] = lora
        defined_at[lora.name] = where

    for ch in characters.values():
        if not ch.face.images:
            problems.append(Problem(show_path(root, ch.dir / "face"), "no face pictures: every character needs "
                                    "face pictures f00.png ... (the face LoRA and body LoRAs train on them)"))
        add(_make_lora(ch.keyword, "face", [ch.face], ch.face.settings, [ch.keyword], [ch.name]), f"{ch.source}")
        for outfit in ch.outfits.values():
            if not outfit.images:
                problems.append(Problem(show_path(root, ch.dir / "outfits" / outfit.name), f"outfit {outfit.name!r} has no "
                                        "body pictures (b00.png ...): add some or remove its table"))
            add(_make_lora(outfit.keyword, "body", [ch.face, outfit], outfit.settings, [outfit.keyword, ch.keyword], [ch.name]),
                f"{ch.source} [outfits.{outfit.name}]")
    for gname, parts, table in _load_groups(root, chars_dir, characters, unreadable, problems):
        all_parts: list[Part] = []
        for part in parts:
            face = characters[part.character].face
            for p in (face, part):
                if p not in all_parts:
                    all_parts.append(p)
        keywords = [p.keyword for p in parts] + list(dict.fromkeys(characters[p.character].keyword for p in parts))
        chars = list(dict.fromkeys(p.character for p in parts))
        add(_make_lora(gname, "group", all_parts, table, keywords, chars), f"{table.origin.file} [{gname}]")

    _check_loras(root, settings, characters, loras, problems)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(problems)
    return Project(root, chars_dir, root / layout.BUILD, settings.model, settings.dataset, settings.training,
                   settings.trainer, settings.merge, settings.compress, settings.captions, characters,
                   loras, [p for p in problems if p.severity != "error"], settings.origin)


def _make_lora(name: str, kind: str, parts: list[Part], t: LoraTable, keywords: list[str], chars: list[str]) -> Lora:
    return Lora(name, kind, parts, t.repeats, t.steps, t.variants, t.training, t.merge, t.compress, keywords, chars,
                t.origin.file, t.origin.line(), t.continue_from, t.origin)


def _check_loras(root: Path, settings: _Settings, characters: dict, loras: dict[str, Lora], problems: list[Problem]) -> None:
    """Cross-checks that need the whole project: variants, merge weights, continue_from, size classes."""
    from .dataset_toml import MixedSizeClassError, folder_class

    variant_names: dict[str, list[str]] = {}
    if settings.readable:  # else every LoRA would be blamed for what project.toml may have said
        for lora in loras.values():
            variant_names[lora.name] = _check_variants(lora, settings, problems)
            _check_merge(lora, settings, problems)
        _check_continue_from(root, loras, variant_names, problems)
    # every prepared folder's images must share one size class (the original's rule)
    for ch in characters.values():
        for part in [ch.face, *ch.outfits.values()]:
            for size in settings.dataset["sizes"]:
                subset = subset_for(part, size)
                if subset is None:
                    continue
                try:
                    folder_class(subset, settings.model["arch"])
                except MixedSizeClassError as exc:
                    problems.append(Problem(show_path(root, ch.dir / ("face" if part.kind == "face" else f"outfits/{part.name}")),
                                            f"{exc}; crop the pictures to similar proportions"))


def _check_variants(lora: Lora, settings: _Settings, problems: list[Problem]) -> list[str]:
    """Resolve ``lora``'s variants; report each failure at the line of the list it comes from
    (once: a bad entry of the project's list is not repeated for every LoRA). Its variant names."""
    from .train.variants import resolve_variant

    defaults = training_defaults(settings.training)
    if lora.variants:
        where = (lora.source, lora.origin.line("variants") if lora.origin else lora.line)
    else:
        where = (settings.origin.file, settings.origin.line("training", "variants"))
    names: list[str] = []
    for entry in variant_entries(lora, settings.training):
        try:
            params = resolve_variant(entry, defaults=defaults, overrides=lora.training, steps=lora.steps)
        except (ValueError, TypeError) as exc:
            _add_once(problems, Problem(where[0], f"LoRA {lora.name!r}: {exc}", where[1]))
            continue
        if params.name in names:
            problems.append(Problem(where[0], f"LoRA {lora.name!r}: variant {params.name!r} listed twice; give one a \"name\"", where[1]))
        names.append(params.name)
    return names


def _add_once(problems: list[Problem], problem: Problem) -> None:
    """Add ``problem`` unless the same complaint (whatever LoRA it names) is already there."""
    same = problem.message.split(": ", 1)[-1]
    for p in problems:
        if p.path == problem.path and p.line == problem.line and p.message.split(": ", 1)[-1] == same:
            return
    problems.append(problem)


def _check_merge(lora: Lora, settings: _Settings, problems: list[Problem]) -> None:
    """A LoRA's own ``merge`` weights, at the line of its ``merge`` key (the project's kind
    defaults and presets were checked at their own lines when project.toml was read)."""
    if lora.merge is None:
        return
    if isinstance(lora.merge, str) and lora.merge.strip() in settings.broken_presets:
        return
    try:
        resolve_merge_weights(lora.merge, {"merge": settings.merge, "model": settings.model})
    except ValueError as exc:
        line = lora.origin.line("merge") if lora.origin else lora.line
        problems.append(Problem(lora.source, f"LoRA {lora.name!r} merge weights: {exc}", line))


def _check_continue_from(root: Path, loras: dict[str, Lora], variant_names: dict[str, list[str]],
                         problems: list[Problem]) -> None:
    """``continue_from``: an existing .safetensors file, or ``<lora>/<variant>`` of this project
    (no LoRA may, through such references, continue from itself)."""
    targets: dict[str, str] = {}  # lora -> the lora it continues from
    for lora in loras.values():
        value = lora.continue_from
        if value is None:
            continue
        line = lora.origin.line("continue_from") if lora.origin else lora.line
        if value.strip().lower().endswith(".safetensors"):
            if not under_root(root, value.strip()).is_file():
                problems.append(Problem(lora.source, f"'continue_from' file {value!r} does not exist; give a .safetensors "
                                        f"LoRA relative to {root.name}/ or an absolute path, or \"<lora>/<variant>\"", line))
            continue
        name, sep, variant = value.partition("/")
        if not sep or name not in loras:
            close = closest(name, loras)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(Problem(lora.source, f"'continue_from' = {value!r} names no LoRA of this project{hint}; write "
                                    "\"<lora>/<variant>\" or the path of a .safetensors file", line))
            continue
        known = variant_names.get(name, [])
        if variant not in known:
            close = closest(variant, known)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; its variants: {', '.join(known) or 'none'}"
            problems.append(Problem(lora.source, f"'continue_from' = {value!r}: LoRA {name!r} has no variant {variant!r}{hint}", line))
            continue
        targets[lora.name] = name
    for start in targets:
        seen = [start]
        while seen[-1] in targets:
            nxt = targets[seen[-1]]
            if nxt in seen:
                if nxt == start:
                    lora = loras[start]
                    chain = " -> ".join(seen + [nxt])
                    problems.append(Problem(lora.source, f"'continue_from' makes LoRA {start!r} continue from itself "
                                            f"({chain}); continue from another LoRA or a file",
                                            lora.origin.line("continue_from") if lora.origin else lora.line))
                break
            seen.append(nxt)
