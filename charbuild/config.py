"""Load and validate a character project: TOML files and source pictures → ``Project``.

Every problem found is collected, never just the first: the user fixes a whole
list in one go. Each problem names the file and, for TOML, the line of the
offending key, and says what to do (``path:line: error: message``).

This module is the loader; the objects it builds are in :mod:`charbuild.model`, the
checkers and the did-you-mean in :mod:`charbuild.checks`. One ``_load_<table>``
function per table of ``project.toml`` in :mod:`charbuild.project_toml`.

Layout (see README): ``<root>/characters/project.toml`` (optional),
``<root>/characters/groups.toml`` (optional),
``<root>/characters/<name>/character.toml`` with ``face/`` and
``outfits/<outfit>/`` picture folders beside it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from . import codes, layout
from .block_weights import merge_spec, resolve_merge_weights
from .checks import (Collector, Origin, closest, is_bool, is_choice, is_int, is_str,
                     is_str_list, is_table, show_path)
from .errors import CharbuildError, ConfigError, Problem
from .flatten_settings import load_flatten, picture_key_problems
from .model import Character, Lora, LoraTable, Part, Project, SourceImage
from .prepared import image_dir, prepared_sizes, subset_for
from .project_toml import (KEYWORD_RE, KIND_DEFAULTS, LORA_KEYS, NAME_RE, RESERVED_NAMES,
                           compress_table, load_project_toml, variants_check)
from .resolve import resolve_loras
from .train.job import job_specs
from .train.variants import TRAINING_CHECKS, TRAINING_KEYS, training_defaults, variant_entries

__all__ = [
    # the loader
    "load_project", "find_root",
    # the model and the stage helpers, re-exported where tasks.py imports them today
    "Character", "Lora", "LoraTable", "Part", "Project", "SourceImage", "image_dir", "merge_spec",
    "prepared_sizes", "resolve_merge_weights", "subset_for", "training_defaults", "variant_entries",
]

CHARACTER_KEYS = {"keyword", "class", "tags", "background", "flatten", "symmetric", "face", "outfits"}
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
        variants=c.get(table, "variants", variants_check, None, keypath),
        training=training,
        merge=table.get("merge"),
        explore=table.get("explore"),
        compress=compress_table(c, c.get(table, "compress", is_table, {}, keypath), keypath + ("compress",)),
        continue_from=c.get(table, "continue_from", is_str, None, keypath),
        origin=c.origin.at(*keypath),
    )


def _load_character(root: Path, folder: Path, problems: list[Problem]) -> Character | None:
    path = folder / "character.toml"
    c = Collector(root, path, problems)
    data = c.load()
    if data is None:
        return None
    name = folder.name
    c.check_keys(data, CHARACTER_KEYS)
    if not NAME_RE.match(name) or name in RESERVED_NAMES:
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
        if outfit == "face" or not NAME_RE.match(outfit):
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
    return Character(name, folder, keyword, class_token, tags, background, symmetric, face, outfits, c.shown,
                     load_flatten(c, root, data))


def _keyword_check(v):
    if not isinstance(v, str) or not KEYWORD_RE.match(v):
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
        same = stems.get(f.stem.casefold())  # F01.png and f01.png are one file on Windows and macOS
        if same is not None:
            why = "" if same.stem == f.stem else " on case-insensitive file systems (Windows, macOS)"
            problems.append(Problem(shown, f"two pictures named {f.stem!r} ({same.name} and {f.name}); "
                                    f"they would produce the same prepared file{why}: rename one"))
            continue
        stems[f.stem.casefold()] = f
        if codes.looks_like_a_copy(f.name):
            problems.append(Problem(shown, f"looks like a file manager's copy of a {code} picture: it trains as one "
                                    f"more {code} picture; delete it, or name it for what it shows ({code}-smile.png)",
                                    None, "warning"))
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
        if ch.symmetric:
            for img in part.images:
                if img.code[2] in "567":
                    problems.append(Problem(img.rel, f"a mirrored-angle code ({img.code}) on a symmetric character: "
                                            "flip_aug already mirrors every picture; set symmetric = false in "
                                            f"{ch.source} if the character is not symmetric, else rename the picture",
                                            None, "warning"))
        # the codes of every coded picture, also of those with errors (reported already, not as missing)
        have = {img.code for img in part.images} | {
            code for f in folder.iterdir() if f.suffix.lower() in codes.IMAGE_EXTENSIONS
            and (code := codes.parse_code(f.name))}
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
        if not NAME_RE.match(gname) or gname in RESERVED_NAMES:
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
    settings = load_project_toml(root, chars_dir, problems)

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
        problems += picture_key_problems(ch.flatten, ch.source, folder, [i.path for p in ch.parts() for i in p.images])

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

    resolve_loras(root, settings, characters, loras, problems)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise ConfigError(problems)
    return _project(root, settings, characters, loras, [p for p in problems if p.severity != "error"])


def _project(root: Path, settings, characters: dict, loras: dict, warnings: list[Problem]) -> Project:
    """The loaded project, with the model and trainer as every training job gets them (paths absolute)."""
    project = Project(root, root / "characters", root / layout.BUILD, settings.model, settings.dataset,
                      settings.training, settings.trainer, settings.merge, settings.compress, settings.captions,
                      characters, loras, warnings, settings.origin)
    project.model_spec, project.trainer_spec = job_specs(project, layout.Layout(root))
    return project


def _make_lora(name: str, kind: str, parts: list[Part], t: LoraTable, keywords: list[str], chars: list[str]) -> Lora:
    return Lora(name, kind, parts, t.repeats, t.steps, t.variants, t.training, t.merge, t.compress, keywords, chars,
                t.origin.file, t.origin.line(), t.continue_from, t.explore, t.origin)
