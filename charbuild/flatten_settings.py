"""The ``[flatten]`` table of a character.toml: how opaque pictures lose their background.

::

    background = "black"                 # the fill colour, as before

    [flatten]
    method = "auto"                      # auto | keep | flood | model
    tolerance = 10                       # ΔE (CIELAB) a background pixel may differ by
    model = "models/isnet-anime.onnx"    # method "model": a rembg model file (never downloaded)

    [flatten.pictures]                   # per picture, by its path under the character folder
    "face/f03.png" = "keep"
    "outfits/school/b02.png" = { method = "flood", tolerance = 18 }

Why a table of its own and not ``background = "auto"``: ``background`` has always been the
fill colour (``"black"``/``"white"``), and every existing character.toml says so; giving it
a second meaning would break them or make one key mean two things. The fill colour is what
the flattened picture is composited onto, the ``[flatten]`` method is how its old
background is found: two settings, two keys.

Methods: ``auto`` (the default) leaves pictures with an alpha channel as they always were
(their transparency is filled) and flattens opaque ones when the border is a simple
background (``charbuild.background``), keeping them as they are, with a warning, when it
is not; ``keep`` never flattens; ``flood`` always uses the built-in method (warning when it
was unsure); ``model`` uses the segmentation model (the ``rembg`` extra). A picture whose
alpha channel holds real transparency always keeps its own alpha.

Pure apart from the existence checks of the model file and the optional extra.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .checks import Collector, closest, is_choice, is_number, is_str, is_table
from .errors import Problem

METHODS = ("auto", "keep", "flood", "model")
#: The default tolerance: a ΔE (CIELAB) a little above what an eye calls "the same colour".
DEFAULT_TOLERANCE = 10.0
FLATTEN_KEYS = {"method", "tolerance", "model", "pictures"}
PICTURE_KEYS = {"method", "tolerance"}
REMBG_HINT = "install the extra: pip install 'charbuild[rembg]'"


@dataclass(frozen=True)
class FlattenRule:
    """How one picture is flattened: the method, the tolerance (ΔE) and the model file."""

    method: str = "auto"
    tolerance: float = DEFAULT_TOLERANCE
    model: str | None = None    # absolute path of the model file (method "model")

    def signature(self) -> dict:
        """What a mask depends on besides the picture's pixels (the model by size and mtime)."""
        sig: dict = {"method": self.method, "tolerance": float(self.tolerance)}
        if self.method == "model" and self.model:
            try:
                st = Path(self.model).stat()
                sig["model"] = [self.model, st.st_size, st.st_mtime_ns]
            except OSError:
                sig["model"] = [self.model]
        return sig


@dataclass(frozen=True)
class FlattenSettings:
    """A character's ``[flatten]`` table: its rule and the per-picture rules by folded path."""

    rule: FlattenRule = field(default_factory=FlattenRule)
    pictures: Mapping[str, FlattenRule] = field(default_factory=dict)
    lines: Mapping[str, int | None] = field(default_factory=dict)  # folded key -> its line
    keys: Mapping[str, str] = field(default_factory=dict)           # folded key -> as written

    def rule_for(self, rel_to_character: str) -> FlattenRule:
        """The rule of the picture at ``rel_to_character`` (``face/f03.png``), case-insensitively."""
        return self.pictures.get(fold(rel_to_character), self.rule)


def fold(rel: str) -> str:
    """A picture key as compared: POSIX slashes, no leading ``./``, case folded (Windows, macOS)."""
    text = rel.replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text.casefold()


def _rule(c: Collector, root: Path, table: Mapping, keypath: tuple, base: FlattenRule) -> FlattenRule:
    method = c.get(table, "method", is_choice(*METHODS), base.method, keypath)
    tolerance = c.get(table, "tolerance", is_number(), base.tolerance, keypath)
    model = base.model
    if "model" in table:
        given = c.get(table, "model", is_str, None, keypath)
        model = str((root / given).resolve()) if given else None
    return FlattenRule(method, float(tolerance), model)


def load_flatten(c: Collector, root: Path, data: Mapping) -> FlattenSettings:
    """The ``[flatten]`` table of one character.toml, every problem reported at its line."""
    table = c.get(data, "flatten", is_table, {})
    if not table:
        return FlattenSettings()
    kp = ("flatten",)
    c.check_keys(table, FLATTEN_KEYS, kp)
    rule = _rule(c, root, table, kp, FlattenRule())
    pictures, lines, keys = {}, {}, {}
    for key, value in c.get(table, "pictures", is_table, {}, kp).items():
        pkp = kp + ("pictures", key)
        if isinstance(value, str):
            value = {"method": value}
        elif isinstance(value, dict):
            c.check_keys(value, PICTURE_KEYS, pkp)
        else:
            c.error(f"'flatten.pictures.\"{key}\"' must be a method ({', '.join(map(repr, METHODS))}) or a table "
                    "{ method = ..., tolerance = ... }", pkp)
            continue
        pictures[fold(key)] = _rule(c, root, value, pkp, rule)
        lines[fold(key)] = c.origin.line(*pkp)
        keys[fold(key)] = key
    settings = FlattenSettings(rule, pictures, lines, keys)
    _check_model(c, settings)
    return settings


def _check_model(c: Collector, settings: FlattenSettings) -> None:
    """``method = "model"`` needs the extra and an existing model file: said at the line."""
    uses = [(("flatten",), settings.rule)] if settings.rule.method == "model" else []
    uses += [(("flatten", "pictures", settings.keys[k]), r) for k, r in settings.pictures.items() if r.method == "model"]
    for keypath, rule in uses:
        if rule.model is None:
            c.error("method = \"model\" needs the model file: add model = \"path/to/isnet-anime.onnx\" to [flatten] "
                    "(charbuild never downloads one)", keypath)
        elif not Path(rule.model).is_file():
            c.error(f"the model file {rule.model} does not exist: download it yourself (e.g. rembg's "
                    "isnet-anime.onnx) and give its path", keypath + ("model",) if c.origin.has(*keypath, "model") else keypath)
        if not rembg_available():
            c.error(f"method = \"model\" needs the rembg extra, which is not installed: {REMBG_HINT}", keypath)
            break


def rembg_available() -> bool:
    """Whether the optional ``rembg`` package can be imported (without importing it)."""
    return importlib.util.find_spec("rembg") is not None


def picture_key_problems(settings: FlattenSettings, shown_toml: str, character_dir: Path,
                         pictures: list[Path]) -> list[Problem]:
    """One error per ``[flatten.pictures]`` key that names no picture of the character."""
    have = {fold(p.relative_to(character_dir).as_posix()): p.relative_to(character_dir).as_posix() for p in pictures}
    problems = []
    for folded, written in settings.keys.items():
        if folded not in have:
            near = closest(written, have.values())
            hint = f" (did you mean '{near[0]}'?)" if near else "; keys are paths under the character folder, e.g. \"face/f03.png\""
            problems.append(Problem(shown_toml, f"[flatten.pictures] names {written!r}, which is no picture of this "
                                    f"character{hint}", settings.lines.get(folded)))
    return problems

