"""Load and validate a character project: TOML files and source pictures → ``Project``.

Every problem found is collected, never just the first: the user fixes a whole
list in one go. Each problem names the file and, for TOML, the line of the
offending key, and says what to do (``path:line: error: message``).

Layout (see README): ``<root>/characters/project.toml`` (optional),
``<root>/characters/groups.toml`` (optional),
``<root>/characters/<name>/character.toml`` with ``face/`` and
``outfits/<outfit>/`` picture folders beside it.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import codes
from .errors import ConfigError, Problem
from .tomllines import key_lines, line_of, syntax_error_line, unclosed_construct

DEFAULT_SIZES = (128, 192, 256, 384, 512, 768)
KIND_DEFAULTS = {
    "face": {"repeats": 4, "steps": 1000, "merge": "FACE"},
    "body": {"repeats": 2, "steps": 1200, "merge": "BODY"},
    "group": {"repeats": 1, "steps": 1600, "merge": "BODY"},
}
DEFAULT_VARIANTS = ("Lora3x3A50p-AdamW8",)
BACKENDS = ("builtin", "sd-scripts", "fake")
# doit command names and our own task groups: a character or LoRA may not be called so.
RESERVED_NAMES = {
    "auto", "clean", "dumpdb", "forget", "help", "ignore", "info", "list", "reset-dep", "run",
    "strace", "tabcompletion", "image", "caption", "dataset", "preview", "train", "merge",
    "compress", "all", "default",
}
_NAME_RE = re.compile(r"^[^\s,:=/\\@][^,:=/\\@]*$")
_KEYWORD_RE = re.compile(r"^[^\s,]+$")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class SourceImage:
    """One source picture of a character part."""

    path: Path          # absolute
    rel: str            # relative to the project root, POSIX
    code: str           # e.g. "f00"
    stem: str           # file name without extension
    width: int
    height: int


@dataclass
class Part:
    """A character's face, or one outfit: a folder of pictures with its keyword."""

    character: str
    name: str           # "face" or the outfit name
    kind: str           # "face" | "body"
    keyword: str
    class_token: str
    lead_tags: list[str]  # keyword then extra tags: the start of every caption
    flip_aug: bool
    background: str
    images: list[SourceImage] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # its LoRA table: repeats, steps, variants, ...

    @property
    def class_tokens(self) -> str:
        return f"{self.keyword} {self.class_token}"

    @property
    def key(self) -> str:
        return f"{self.character}/{self.name}"


@dataclass
class Lora:
    """One LoRA to build: face, body or group, from one or more parts."""

    name: str
    kind: str                       # face | body | group
    parts: list[Part]
    repeats: int
    steps: int
    variants: list[Any]             # preset strings or variant tables
    training: dict                  # per-LoRA training overrides
    merge: Any                      # preset name, list of values or block table
    compress: dict                  # per-LoRA compression overrides
    keywords: list[str]             # trigger words
    characters: list[str]
    source: str                     # file that defines it (for messages)
    line: int | None = None


@dataclass
class Character:
    name: str
    dir: Path
    keyword: str
    class_token: str
    tags: list[str]
    background: str
    symmetric: bool
    face: Part
    outfits: dict[str, Part]
    source: str = ""                # its character.toml, as shown in messages


@dataclass
class Project:
    root: Path
    characters_dir: Path
    build_dir: Path
    model: dict
    dataset: dict                   # {"sizes": [...], "batch_sizes": {...}}
    training: dict                  # project training defaults (incl. "variants")
    trainer: dict
    merge: dict                     # {"presets": {...}, "face": ..., "body": ..., "group": ...}
    compress: dict
    captions: dict                  # tag-rule overrides
    characters: dict[str, Character]
    loras: dict[str, Lora]
    warnings: list[Problem]

    def rel(self, path: Path) -> str:
        """A path under the root as the POSIX string doit sees."""
        return path.relative_to(self.root).as_posix()


# --------------------------------------------------------------------------- checking helpers


class _Collector:
    """Collects problems for one TOML file, with line numbers for key paths."""

    def __init__(self, root: Path, path: Path, problems: list[Problem]):
        self.path = path
        self.shown = _show(root, path)
        self.problems = problems
        self.lines: dict = {}

    def error(self, message: str, keypath: tuple = ()) -> None:
        self.problems.append(Problem(self.shown, message, line_of(self.lines, keypath) if keypath else None))

    def warning(self, message: str, keypath: tuple = ()) -> None:
        self.problems.append(
            Problem(self.shown, message, line_of(self.lines, keypath) if keypath else None, "warning")
        )

    def load(self) -> dict | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            self.error(f"not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8")
            return None
        except OSError as exc:
            self.error(f"cannot read: {exc.strerror}")
            return None
        self.lines = key_lines(text)
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.problems.append(Problem(self.shown, _syntax_message(exc, text), syntax_error_line(exc, text)))
            return None

    def check_keys(self, table: dict, allowed: dict[str, Any], keypath: tuple = (), what: str = "") -> None:
        """Report unknown keys of ``table`` with a did-you-mean."""
        for key in table:
            if key not in allowed:
                self.error(_unknown(key, allowed, what or _table_name(keypath)), keypath + (key,))

    def get(self, table: dict, key: str, check: Callable[[Any], str | None], default: Any, keypath: tuple = ()) -> Any:
        """``table[key]`` if it passes ``check`` (which returns a complaint or None), else ``default``."""
        if key not in table:
            return default
        value = table[key]
        complaint = check(value)
        if complaint:
            self.error(f"'{_dotted(keypath + (key,))}' {complaint}", keypath + (key,))
            return default
        return value


def _syntax_message(exc: Exception, text: str) -> str:
    """``tomllib``'s message without its position (the line goes in front), said for the line shown."""
    message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
    if "(at end of document)" in message:
        message = message.replace(" (at end of document)", "")
        unclosed = unclosed_construct(text)
        if unclosed:
            message = f"the {unclosed[1]} that starts on this line is never closed ({message} at the end of the file)"
        else:
            message += " at the end of the file"
    return f"TOML syntax error: {message}; fix the syntax"


def _show(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _dotted(keypath: tuple) -> str:
    return ".".join(str(k) for k in keypath)


def _table_name(keypath: tuple) -> str:
    return f"[{_dotted(keypath)}]" if keypath else "the top level"


def _unknown(key: str, allowed, where: str) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(sorted(allowed))}"
    return f"unknown key '{key}' in {where}{hint}"


def is_int(minimum: int = 1, maximum: int | None = None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be a whole number, not {_type(v)}"
        if v < minimum or (maximum is not None and v > maximum):
            rng = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
            return f"must be {rng}, not {v}"
        return None
    return check


def is_number(positive: bool = True):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, not {_type(v)}"
        if positive and not v > 0:
            return f"must be greater than 0, not {v}"
        return None
    return check


def is_bool(v):
    return None if isinstance(v, bool) else f"must be true or false, not {_type(v)}"


def is_str(v):
    return None if isinstance(v, str) and v.strip() else f"must be a non-empty string, not {_type(v)}"


def is_choice(*choices):
    def check(v):
        if v in choices:
            return None
        return f"must be one of {', '.join(repr(c) for c in choices)}, not {v!r}"
    return check


def is_str_list(v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return f"must be a list of strings, not {_type(v)}"
    return None


def is_table(v):
    return None if isinstance(v, dict) else f"must be a table, not {_type(v)}"


def _type(v) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: f"the string {v!r}",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


# --------------------------------------------------------------------------- project.toml

PROJECT_KEYS = {"model", "dataset", "training", "trainer", "merge", "compress", "captions"}
MODEL_KEYS = {"base", "vae", "clip_skip", "arch"}
DATASET_KEYS = {"sizes", "batch_sizes"}
TRAINER_KEYS = {"backend", "gpus", "sd_scripts", "python", "accelerate", "xformers", "extra_args",
                "run_cache", "fake_seconds", "fake_record", "fake_fail"}
MERGE_KEYS = {"presets", "face", "body", "group"}
COMPRESS_KEYS = {"method", "sv_ratio", "sv_fro", "sv_cumulative", "new_rank", "new_conv_rank", "save_precision"}
COMPRESS_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative", "rank")
LORA_KEYS = {"repeats", "steps", "variants", "training", "merge", "compress"}


def _training_keys() -> set[str]:
    from .train.variants import TRAINING_KEYS
    return set(TRAINING_KEYS)


def _load_project_toml(root: Path, chars_dir: Path, problems: list[Problem]) -> dict:
    from .dataset_toml import BATCH_KEYS, BATCH_SIZE_TABLES

    path = chars_dir / "project.toml"
    settings = {
        "model": {"base": "tiny", "vae": None, "clip_skip": 2, "arch": "sd15"},
        "dataset": {"sizes": list(DEFAULT_SIZES), "batch_sizes": dict(BATCH_SIZE_TABLES["default"])},
        "training": {"variants": list(DEFAULT_VARIANTS)},
        "trainer": {"backend": "builtin", "gpus": [0], "sd_scripts": None, "python": None,
                    "accelerate": "accelerate", "xformers": False, "extra_args": []},
        "merge": {"presets": {}, "face": "FACE", "body": "BODY", "group": "BODY"},
        "compress": {"method": "sv_ratio", "sv_ratio": 16.0, "sv_fro": 0.9, "sv_cumulative": 0.9,
                     "new_rank": 128, "new_conv_rank": None, "save_precision": "fp16"},
        "captions": {},
    }
    if not path.exists():
        return settings
    c = _Collector(root, path, problems)
    data = c.load()
    if data is None:
        return settings
    c.check_keys(data, PROJECT_KEYS)
    for name in PROJECT_KEYS & set(data):
        if not isinstance(data[name], dict):
            c.error(f"'{name}' must be a table ([{name}])", (name,))
            data[name] = {}

    model = data.get("model", {})
    c.check_keys(model, MODEL_KEYS, ("model",))
    m = settings["model"]
    m["base"] = c.get(model, "base", is_str, m["base"], ("model",))
    m["vae"] = c.get(model, "vae", is_str, None, ("model",))
    m["clip_skip"] = c.get(model, "clip_skip", is_int(1, 12), m["clip_skip"], ("model",))
    m["arch"] = c.get(model, "arch", is_choice("sd15", "sdxl"), m["arch"], ("model",))
    for key in ("base", "vae"):
        value = m[key]
        if value and value != "tiny" and not _abs(root, value).exists():
            c.error(f"'model.{key}' file or folder {value!r} does not exist; give a path relative to "
                    f"{root.name}/ or an absolute path" + ("" if key == "vae" else ", or \"tiny\" for the built-in demo model"),
                    ("model", key))

    ds = data.get("dataset", {})
    c.check_keys(ds, DATASET_KEYS, ("dataset",))
    sizes = c.get(ds, "sizes", _sizes_check, settings["dataset"]["sizes"], ("dataset",))
    settings["dataset"]["sizes"] = sorted(set(sizes))
    if "batch_sizes" in ds:
        bs = ds["batch_sizes"]
        if isinstance(bs, str):
            if bs in BATCH_SIZE_TABLES:
                settings["dataset"]["batch_sizes"] = dict(BATCH_SIZE_TABLES[bs])
            else:
                c.error(f"'dataset.batch_sizes' names no table: {bs!r}; use one of "
                        f"{', '.join(repr(k) for k in BATCH_SIZE_TABLES)} or a table of {BATCH_KEYS[0]}..", ("dataset", "batch_sizes"))
        elif isinstance(bs, dict):
            c.check_keys(bs, set(BATCH_KEYS), ("dataset", "batch_sizes"))
            table = dict(BATCH_SIZE_TABLES["default"])
            for k in set(BATCH_KEYS) & set(bs):
                table[k] = c.get(bs, k, is_int(1), table[k], ("dataset", "batch_sizes"))
            settings["dataset"]["batch_sizes"] = table
        else:
            c.error("'dataset.batch_sizes' must be a table name (\"default\", \"12GB\") or a table", ("dataset", "batch_sizes"))

    tr = data.get("training", {})
    allowed = _training_keys() | {"variants"}
    c.check_keys(tr, allowed, ("training",))
    settings["training"].update({k: v for k, v in tr.items() if k in allowed})
    settings["training"]["_line"] = line_of(c.lines, ("training",))
    settings["training"]["_file"] = c.shown

    tn = data.get("trainer", {})
    c.check_keys(tn, TRAINER_KEYS, ("trainer",))
    t = settings["trainer"]
    t["backend"] = c.get(tn, "backend", is_choice(*BACKENDS), t["backend"], ("trainer",))
    t["gpus"] = c.get(tn, "gpus", _gpus_check, t["gpus"], ("trainer",))
    t["sd_scripts"] = c.get(tn, "sd_scripts", is_str, None, ("trainer",))
    t["python"] = c.get(tn, "python", is_str, None, ("trainer",))
    if "accelerate" in tn and tn["accelerate"] is False:
        t["accelerate"] = None
    else:
        t["accelerate"] = c.get(tn, "accelerate", is_str, t["accelerate"], ("trainer",))
    t["xformers"] = c.get(tn, "xformers", is_bool, False, ("trainer",))
    t["extra_args"] = c.get(tn, "extra_args", is_str_list, [], ("trainer",))
    t["run_cache"] = c.get(tn, "run_cache", is_bool, True, ("trainer",))
    for key, check in (("fake_seconds", is_number(False)), ("fake_record", is_str), ("fake_fail", is_bool)):
        if key in tn:
            t[key] = c.get(tn, key, check, None, ("trainer",))
    if t["backend"] == "sd-scripts":
        if not t["sd_scripts"]:
            c.error("backend 'sd-scripts' needs 'sd_scripts = \"<path to your kohya-ss/sd-scripts folder>\"'", ("trainer", "backend"))
        elif not (_abs(root, t["sd_scripts"]) / "train_network.py").exists():
            c.error(f"'trainer.sd_scripts' = {t['sd_scripts']!r} has no train_network.py; point it at a kohya-ss/sd-scripts checkout", ("trainer", "sd_scripts"))
        if m["base"] == "tiny":
            c.error("sd-scripts cannot train the built-in \"tiny\" model; set [model] base to a real checkpoint or use backend = \"builtin\"", ("model", "base") if "base" in model else ("trainer", "backend"))

    mg = data.get("merge", {})
    c.check_keys(mg, MERGE_KEYS, ("merge",))
    presets = c.get(mg, "presets", is_table, {}, ("merge",))
    settings["merge"]["presets"] = presets
    for kind in ("face", "body", "group"):
        if kind in mg:
            settings["merge"][kind] = mg[kind]
    settings["merge"]["_lines"] = {k: line_of(c.lines, ("merge",) + k) for k in [("presets", p) for p in presets] + [(k,) for k in ("face", "body", "group")]}
    settings["merge"]["_file"] = c.shown

    cp = data.get("compress", {})
    settings["compress"].update(_compress_table(c, cp, ("compress",), settings["compress"]))

    caps = data.get("captions", {})
    if caps:
        from .captions import rules_with_overrides
        try:
            rules_with_overrides(caps)
            settings["captions"] = caps
        except ValueError as exc:
            c.error(f"[captions]: {exc}", ("captions",))
    return settings


def _compress_table(c: _Collector, table: dict, keypath: tuple, base: dict) -> dict:
    c.check_keys(table, COMPRESS_KEYS, keypath)
    out = {}
    checks = {"method": is_choice(*COMPRESS_METHODS), "sv_ratio": is_number(), "sv_fro": _fraction,
              "sv_cumulative": _fraction, "new_rank": is_int(1), "new_conv_rank": is_int(1),
              "save_precision": is_choice("fp16", "bf16", "float")}
    for key, check in checks.items():
        if key in table:
            out[key] = c.get(table, key, check, base.get(key), keypath)
    return out


def _fraction(v):
    bad = is_number()(v)
    if bad:
        return bad
    return None if v <= 1 else f"must be a fraction in (0, 1], not {v}"


def _sizes_check(v):
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 32 for x in v):
        return "must be a non-empty list of sizes in pixels (whole numbers >= 32), e.g. [128, 256, 512]"
    return None


def _gpus_check(v):
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
        return "must be a non-empty list of GPU numbers, e.g. [0] or [0, 1]"
    return None


def _abs(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


# --------------------------------------------------------------------------- character.toml

CHARACTER_KEYS = {"keyword", "class", "tags", "background", "symmetric", "face", "outfits"}
OUTFIT_KEYS = LORA_KEYS | {"keyword", "tags"}


def _lora_settings(c: _Collector, table: dict, keypath: tuple, kind: str) -> dict:
    d = KIND_DEFAULTS[kind]
    out = {
        "repeats": c.get(table, "repeats", is_int(1), d["repeats"], keypath),
        "steps": c.get(table, "steps", is_int(1), d["steps"], keypath),
        "variants": c.get(table, "variants", _variants_check, None, keypath),
        "training": c.get(table, "training", is_table, {}, keypath),
        "merge": table.get("merge"),
        "compress": _compress_table(c, c.get(table, "compress", is_table, {}, keypath), keypath + ("compress",), {}),
        "line": line_of(c.lines, keypath) if keypath else None,
    }
    if out["training"]:
        c.check_keys(out["training"], _training_keys(), keypath + ("training",))
    if "steps" in table:
        # the LoRA's own steps beat a project-wide [training] steps
        out["training"] = {**out["training"]}
        out["training"].setdefault("steps", out["steps"])
    return out


def _variants_check(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, (str, dict)) for x in v):
        return "must be a non-empty list of variant presets (e.g. \"Lora3x3A50p-AdamW8\") or variant tables"
    return None


def _load_character(root: Path, folder: Path, problems: list[Problem]) -> Character | None:
    path = folder / "character.toml"
    c = _Collector(root, path, problems)
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
    face_settings = _lora_settings(c, face_table, ("face",), "face")
    if keyword is None:
        return None
    face = Part(name, "face", "face", keyword, class_token, [keyword, *tags], symmetric, background)
    face.settings = face_settings
    face.settings["line"] = line_of(c.lines, ("face",)) or line_of(c.lines, ("keyword",))
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
        part.settings = _lora_settings(c, table, kp, "body")
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
    from .errors import CharbuildError

    other = {"f": "b", "b": "f"}[expected]
    where = {"f": "face folder", "b": "outfit folder"}
    stems: dict[str, Path] = {}
    if not folder.is_dir():
        return
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        if f.name.startswith(".") or not f.is_file() or f.suffix.lower() not in codes.IMAGE_EXTENSIONS:
            continue
        shown = _show(root, f)
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
        part.images.append(SourceImage(f, _show(root, f), code, f.stem, width, height))


def _template_warnings(root: Path, ch: Character, problems: list[Problem]) -> None:
    for part, letter, folder in [(ch.face, "f", ch.dir / "face")] + [
        (p, "b", ch.dir / "outfits" / p.name) for p in ch.outfits.values()
    ]:
        if not part.images:
            continue
        have = {img.code for img in part.images}
        missing = [code for code in codes.TEMPLATE_CODES[letter] if code not in have]
        if missing:
            problems.append(Problem(_show(root, folder), f"angle codes missing from the template set: "
                                    f"{', '.join(missing)} (the LoRA learns those angles less well)", None, "warning"))
        if not ch.symmetric:
            mirrors = [code for code in codes.ALL_CODES if code[0] == letter and code[2] in "567"]
            if not have & set(mirrors):
                problems.append(Problem(_show(root, folder), "the character is not symmetric (symmetric = false) "
                                        f"but has no mirrored-angle pictures ({letter}05-{letter}07, {letter}15-...): "
                                        "add them, or set symmetric = true", None, "warning"))


# --------------------------------------------------------------------------- groups.toml

GROUP_KEYS = LORA_KEYS | {"members"}


def _load_groups(root: Path, chars_dir: Path, characters: dict[str, Character], unreadable: set[str],
                 problems: list[Problem]) -> list[tuple[str, list[Part], dict, str]]:
    """The groups of groups.toml; ``unreadable`` names the character folders whose
    character.toml had errors: their members are not blamed on groups.toml."""
    path = chars_dir / "groups.toml"
    if not path.exists():
        return []
    c = _Collector(root, path, problems)
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
                          f"(fix {_show(root, chars_dir / ch_name / 'character.toml')} first)", kp + ("members",))
                continue
            if ch is None or outfit not in ch.outfits:
                close = difflib.get_close_matches(member, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else (f"; known: {', '.join(known)}" if known else "")
                c.error(f"[{gname}] member {member!r} is no character outfit (write \"<character>/<outfit>\"){hint}", kp + ("members",))
                continue
            parts.append(ch.outfits[outfit])
        if parts:
            groups.append((gname, parts, _lora_settings(c, table, kp, "group"), c.shown))
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
        raise ConfigError([Problem(_show(root, chars_dir), "no characters/ folder: create it, one folder per character")])
    settings = _load_project_toml(root, chars_dir, problems)

    characters: dict[str, Character] = {}
    unreadable: set[str] = set()  # folders whose character.toml has errors
    for folder in sorted(p for p in chars_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if not (folder / "character.toml").exists():
            if any(folder.iterdir()):
                problems.append(Problem(_show(root, folder), "a folder without character.toml: add one "
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
                    problems.append(Problem(_show(root, sub), f"outfit folder without an [outfits.{sub.name}] table in "
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
        s = ch.face.settings
        if not ch.face.images:
            problems.append(Problem(_show(root, ch.dir / "face"), "no face pictures: every character needs "
                                    "face pictures f00.png ... (the face LoRA and body LoRAs train on them)"))
        add(_make_lora(ch.keyword, "face", [ch.face], s, [ch.keyword], [ch.name], ch.source), f"{ch.source}")
        for outfit in ch.outfits.values():
            s = outfit.settings
            if not outfit.images:
                problems.append(Problem(_show(root, ch.dir / "outfits" / outfit.name), f"outfit {outfit.name!r} has no "
                                        "body pictures (b00.png ...): add some or remove its table"))
            add(_make_lora(outfit.keyword, "body", [ch.face, outfit], s, [outfit.keyword, ch.keyword], [ch.name], ch.source),
                f"{ch.source} [outfits.{outfit.name}]")
    for gname, parts, s, shown in _load_groups(root, chars_dir, characters, unreadable, problems):
        all_parts: list[Part] = []
        for part in parts:
            face = characters[part.character].face
            for p in (face, part):
                if p not in all_parts:
                    all_parts.append(p)
        keywords = [p.keyword for p in parts] + list(dict.fromkeys(characters[p.character].keyword for p in parts))
        chars = list(dict.fromkeys(p.character for p in parts))
        add(_make_lora(gname, "group", all_parts, s, keywords, chars, shown), f"{shown} [{gname}]")

    _check_loras(root, settings, characters, loras, problems)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(problems)
    return Project(root, chars_dir, root / "build", settings["model"], settings["dataset"], settings["training"],
                   settings["trainer"], settings["merge"], settings["compress"], settings["captions"], characters,
                   loras, [p for p in problems if p.severity != "error"])


def _make_lora(name, kind, parts, s, keywords, chars, shown) -> Lora:
    return Lora(name, kind, parts, s["repeats"], s["steps"], s["variants"], s["training"], s["merge"],
                s["compress"], keywords, chars, shown, s["line"])


def _check_loras(root: Path, settings: dict, characters: dict, loras: dict[str, Lora], problems: list[Problem]) -> None:
    """Cross-checks that need the whole project: variants, merge weights, size classes."""
    from .dataset_toml import MixedSizeClassError, folder_class
    from .train.variants import resolve_variant

    defaults = training_defaults(settings["training"])
    for lora in loras.values():
        names = set()
        for entry in variant_entries(lora, settings["training"]):
            try:
                params = resolve_variant(entry, defaults=defaults, overrides=lora.training, steps=lora.steps)
            except (ValueError, TypeError) as exc:
                where = (lora.source, lora.line) if (lora.variants or lora.training) else (settings["training"]["_file"], settings["training"]["_line"])
                problems.append(Problem(where[0], f"LoRA {lora.name!r}: {exc}", where[1]))
                continue
            if params.name in names:
                problems.append(Problem(lora.source, f"LoRA {lora.name!r}: variant {params.name!r} listed twice; give one a \"name\"", lora.line))
            names.add(params.name)
        try:
            resolve_merge_weights(merge_spec(lora, settings["merge"]), settings)
        except ValueError as exc:
            problems.append(Problem(lora.source if lora.merge is not None else settings["merge"].get("_file", "characters/project.toml"),
                                    f"LoRA {lora.name!r} merge weights: {exc}", lora.line))
    # every prepared folder's images must share one size class (the original's rule)
    for ch in characters.values():
        for part in [ch.face, *ch.outfits.values()]:
            for size in settings["dataset"]["sizes"]:
                subset = subset_for(part, size)
                if subset is None:
                    continue
                try:
                    folder_class(subset)
                except MixedSizeClassError as exc:
                    problems.append(Problem(_show(root, ch.dir / ("face" if part.kind == "face" else f"outfits/{part.name}")),
                                            f"{exc}; crop the pictures to similar proportions"))


def resolve_merge_weights(spec, settings_or_project) -> dict[str, float]:
    """Block weights for a merge spec, with the project's own presets."""
    from .lora.blocks import resolve_block_weights

    merge = settings_or_project["merge"] if isinstance(settings_or_project, dict) else settings_or_project.merge
    model = settings_or_project["model"] if isinstance(settings_or_project, dict) else settings_or_project.model
    return resolve_block_weights(spec, arch=model["arch"], presets=merge.get("presets") or None)


def prepared_sizes(part: Part, size: int) -> list[tuple[SourceImage, tuple[int, int]]]:
    """The pictures of ``part`` that exist at ladder ``size``, with their prepared dimensions."""
    from .images import fitted_size

    out = []
    for img in part.images:
        dims = fitted_size(img.width, img.height, size)
        if dims is not None:
            out.append((img, dims))
    return out


def image_dir(part: Part, size: int) -> str:
    """The prepared-image folder of a part at a size, relative to the project root."""
    return f"build/images/{part.character}/{part.name}/{size}"


def subset_for(part: Part, size: int):
    """The dataset subset of ``part``'s prepared folder at ``size``, or None when it is empty."""
    from .dataset_toml import Subset

    dims = prepared_sizes(part, size)
    if not dims:
        return None
    return Subset(image_dir(part, size), part.class_tokens, part.flip_aug, tuple(d for _, d in dims))


def training_defaults(training: dict) -> dict:
    """The project's ``[training]`` values that apply to every variant (no list, no bookkeeping)."""
    return {k: v for k, v in training.items() if k != "variants" and not k.startswith("_")}


def variant_entries(lora: Lora, training: dict) -> list:
    """The variant entries of ``lora``: its own list, else the project's."""
    return lora.variants or training["variants"]


def merge_spec(lora: Lora, merge: dict):
    """The block-weight spec of ``lora``: its own ``merge``, else its kind's project default."""
    return lora.merge if lora.merge is not None else merge[lora.kind]
