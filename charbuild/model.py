"""The project model: typed characters, parts and LoRAs, as ``charbuild.config`` loads them.

The objects hold the user's values only. Where each value was written (file and line)
travels beside them in an :class:`~charbuild.checks.Origin`, for messages; no bookkeeping
key is ever mixed into a settings dict.

Pure: no I/O. ``Project.model``, ``Project.trainer`` and the other project tables stay
plain dicts of the user's (validated, defaulted) values for now; the graph builds typed
job specs from them. What follows from a LoRA's settings (its variants' training parameters,
its merge weights, the file it continues from) is resolved once by the loader and kept on
the :class:`Lora`; nothing downstream resolves it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import Origin
from .errors import Problem
from .flatten_settings import FlattenSettings


@dataclass(frozen=True)
class SourceImage:
    """One source picture of a character part."""

    path: Path          # absolute
    rel: str            # relative to the project root, POSIX
    code: str           # e.g. "f00"
    stem: str           # file name without extension
    width: int
    height: int


@dataclass(frozen=True)
class LoraTable:
    """The LoRA settings of a ``[face]``, ``[outfits.<o>]`` or group table, validated."""

    repeats: int
    steps: int
    variants: list[Any] | None          # preset strings or variant tables; None: the project's
    training: dict                      # training overrides (the table's own steps included)
    merge: Any                          # None: the kind's project default
    explore: Any                        # None: the project's [merge] explore
    compress: dict                      # compression overrides
    continue_from: str | None           # raw user string: a .safetensors path or "<lora>/<variant>"
    origin: Origin                      # the table: its file, key path and lines


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
    settings: LoraTable | None = None   # its LoRA table

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
    variants: list[Any]             # preset strings or variant tables ([] : the project's)
    training: dict                  # per-LoRA training overrides
    merge: Any                      # preset name, comma string, list of values or block table
    compress: dict                  # per-LoRA compression overrides
    keywords: list[str]             # trigger words
    characters: list[str]
    source: str                     # file that defines it (for messages)
    line: int | None = None         # line of its table in ``source``
    continue_from: str | None = None  # raw user string: a .safetensors path or "<lora>/<variant>"
    explore: Any = None             # candidate block weights to compare (None: the project's list)
    origin: Origin | None = field(default=None, compare=False, repr=False)  # its table's key lines
    # resolved once by the loader (config.py); the graph, the report and the backends read these
    variant_params: tuple = field(default=(), compare=False, repr=False)  # TrainParams of each variant
    merge_weights: dict | None = field(default=None, compare=False, repr=False)  # {block: weight}
    merge_label: str = field(default="", compare=False, repr=False)  # preset name, or "custom block weights"
    explore_candidates: tuple = field(default=(), compare=False, repr=False)  # charbuild.explore.Candidate
    continue_path: str | None = field(default=None, compare=False, repr=False)  # absolute LoRA file to start from
    continue_task: str | None = field(default=None, compare=False, repr=False)  # train task that makes it, if any

    def sample_members(self) -> list[tuple[str, list[str]]]:
        """A group LoRA's members as its samples show them: ``(character/outfit, [outfit keyword,
        face keyword])``, the trigger words of the member's own body LoRA; [] for a face or body LoRA."""
        if self.kind != "group":
            return []
        faces = {p.character: p.keyword for p in self.parts if p.kind == "face"}
        return [(p.key, [p.keyword, *([faces[p.character]] if p.character in faces else [])])
                for p in self.parts if p.kind == "body"]


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
    flatten: FlattenSettings = field(default_factory=FlattenSettings)  # its [flatten] table

    def parts(self) -> list[Part]:
        """The face, then the outfits."""
        return [self.face, *self.outfits.values()]


@dataclass
class Project:
    root: Path
    characters_dir: Path
    build_dir: Path
    model: dict                     # {"base", "vae", "clip_skip", "arch"}
    dataset: dict                   # {"sizes": [...], "batch_sizes": {...}}
    training: dict                  # project training defaults (incl. "variants")
    trainer: dict                   # backend settings; "extra": the backend-specific table
    merge: dict                     # {"presets": {name: [floats]}, "face": ..., "body": ..., "group": ...}
    compress: dict
    captions: dict                  # tag-rule overrides
    characters: dict[str, Character]
    loras: dict[str, Lora]
    warnings: list[Problem]
    origin: Origin | None = field(default=None, compare=False, repr=False)  # project.toml's key lines
    # the model and trainer as every training job gets them (paths absolute), made once by the loader
    model_spec: Any = field(default=None, compare=False, repr=False)     # charbuild.train.job.ModelSpec
    trainer_spec: Any = field(default=None, compare=False, repr=False)   # charbuild.train.job.TrainerSpec

    def rel(self, path: Path) -> str:
        """A path under the root as the POSIX string doit sees."""
        return path.relative_to(self.root).as_posix()
