"""Caption tag rules (pure data + pure functions), folder-name keywords, and `charbuild tags`.

A caption is one line of tags joined by ``", "``: the keywords, then the rule tags that follow
from the image code (rules §2 of the original framework). What is visible in an image but NOT
tagged is what the keyword learns, so the tags that vary with the code are the point.

The *which tag when* facts (from front = h in {0,1,7} ...) are fixed by the code grammar; the
tag *strings* are data (:class:`TagRules`) that a project may override in ``project.toml``::

    [captions]
    expression = ["smile"]

Caption files are UTF-8 and hold exactly the joined tags with **no trailing newline** (the
original wrote a bare line; sd-scripts strips whitespace either way, and a fixed spelling keeps
the caption's hash stable).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable, Mapping

from charbuild.checks import did_you_mean
from charbuild.codes import CODE_RE, is_image_file, parse_code
from charbuild.errors import CharbuildError
from charbuild.fsutil import write_text_atomic

# --- which angles get which tags (rules §2, the derived flags) -------------------------------

#: Horizontal angles (3rd code character) seen from the front, side and behind.
FROM_FRONT_H = frozenset({0, 1, 7})
FROM_SIDE_H = frozenset({2, 6})
FROM_BEHIND_H = frozenset({3, 4, 5})
#: Horizontal angles showing the front / the back of the body.
FRONT_BODY_H = frozenset({0, 1, 2, 6, 7})
BACK_BODY_H = frozenset({3, 4, 5})
#: Horizontal angles where the face is visible (expression tags apply).
EXPRESSION_H = frozenset({0, 1, 2, 3, 5, 6, 7})

CAPTION_SEPARATOR = ", "


@dataclass(frozen=True)
class TagRules:
    """The tag strings of every caption rule; each field is a tuple of tags, in caption order.

    Field names are the override keys of ``project.toml`` ``[captions]``. An empty tuple drops
    that rule's tags.
    """

    background: tuple[str, ...] = ("white background", "black background", "simple background")
    from_horizontal: tuple[str, ...] = ("from horizontal",)  # v = 0
    from_above: tuple[str, ...] = ("from above",)  # v = 1
    from_below: tuple[str, ...] = ("from below",)  # v = 2
    from_front: tuple[str, ...] = ("from front",)
    from_side: tuple[str, ...] = ("from side",)
    from_behind: tuple[str, ...] = ("from behind",)
    face_framing: tuple[str, ...] = ("upper body",)  # face images (f..)
    body_framing: tuple[str, ...] = ("full body",)  # body images (b..)
    standing: tuple[str, ...] = ("standing", "straight standing")
    nude: tuple[str, ...] = ("nude", "completely nude", "bare shoulders")  # face images only
    front_body: tuple[str, ...] = ("nipples", "collarbone", "abs", "ribs")  # face, front-facing
    back_body: tuple[str, ...] = ("shoulder blades", "median furrow")  # face, back-facing
    navel: tuple[str, ...] = ("navel",)  # face, navel visible
    looking_at_viewer: tuple[str, ...] = ("looking at viewer",)
    looking_away: tuple[str, ...] = ("looking away",)
    expression: tuple[str, ...] = ("smile", "open mouth", "blush")


DEFAULT_RULES = TagRules()

#: The names a project may override (the fields of :class:`TagRules`), in caption order.
TAG_RULE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(TagRules))


def rules_with_overrides(overrides: Mapping[str, object], base: TagRules = DEFAULT_RULES) -> TagRules:
    """``base`` with the tag lists in ``overrides`` replaced (e.g. ``{"expression": ["smile"]}``).

    Each value must be a list of non-empty strings (an empty list drops the rule's tags).
    Raises ``ValueError`` listing every unknown key (with a did-you-mean) and every wrong value
    at once.
    """
    problems: list[str] = []
    changes: dict[str, tuple[str, ...]] = {}
    for key, value in overrides.items():
        if key not in TAG_RULE_KEYS:
            problems.append(f"unknown caption rule {key!r}{did_you_mean(key, TAG_RULE_KEYS)}; "
                            f"known rules: {', '.join(TAG_RULE_KEYS)}")
            continue
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            problems.append(
                f"caption rule {key!r} must be a list of tags, e.g. {key} = {_toml_list(getattr(base, key))}, "
                f"not {type(value).__name__} {value!r}"
            )
            continue
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        if bad:
            problems.append(f"caption rule {key!r} must hold non-empty strings only; bad items: {bad!r}")
            continue
        changes[key] = tuple(v.strip() for v in value)
    if problems:
        raise ValueError("; ".join(problems))
    return replace(base, **changes)


def _toml_list(tags: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{t}"' for t in tags) + "]"


def caption_tags(code: str, lead_tags: Iterable[str], rules: TagRules = DEFAULT_RULES) -> list[str]:
    """The caption's tags for an image ``code``: ``lead_tags`` (keyword, extra tags), then the rules.

    Face vs body rules follow the code's first letter. Blank lead tags are dropped and the
    rest stripped. Raises ``ValueError`` for a string that is not a code.
    """
    m = CODE_RE.fullmatch(code)
    if not m:
        raise ValueError(f"not an image code: {code!r} (expected [fb][0-2][0-7], e.g. f00)")
    kind, v, h = m.group(1).lower(), int(m.group(2)), int(m.group(3))
    is_face = kind == "f"
    tags = [t.strip() for t in lead_tags if t and t.strip()]
    tags += rules.background
    tags += (rules.from_horizontal, rules.from_above, rules.from_below)[v]
    if h in FROM_FRONT_H:
        tags += rules.from_front
    elif h in FROM_SIDE_H:
        tags += rules.from_side
    else:
        tags += rules.from_behind
    tags += rules.face_framing if is_face else rules.body_framing
    tags += rules.standing
    if is_face:
        tags += rules.nude
        if h in FRONT_BODY_H:
            tags += rules.front_body
        if h in BACK_BODY_H:
            tags += rules.back_body
        if (v == 1 and h in FRONT_BODY_H) or (v == 2 and h in FROM_FRONT_H):
            tags += rules.navel
    tags += rules.looking_at_viewer if h == 0 else rules.looking_away
    if h in EXPRESSION_H:
        tags += rules.expression
    return tags


def caption_text(code: str, lead_tags: Iterable[str], rules: TagRules = DEFAULT_RULES) -> str:
    """The caption file's content: :func:`caption_tags` joined by ``", "``, no trailing newline."""
    return CAPTION_SEPARATOR.join(caption_tags(code, lead_tags, rules))


# --- keywords from folder names (rules §3) ---------------------------------------------------


@dataclass(frozen=True)
class FolderKeywords:
    """What a folder name like ``kuronekomimi girl, shorthair, choker, ahoge_f0768`` says."""

    keyword: str  # kuronekomimi
    class_tokens: str  # kuronekomimi girl (the dataset's class_tokens)
    lead_tags: tuple[str, ...]  # (kuronekomimi, shorthair, choker, ahoge): the caption's start
    flip_aug: bool  # _flip_ forces True, _noflip_ False; default True


def parse_folder_name(name: str) -> FolderKeywords:
    """Parse a training-folder name per the original's rules.

    The part before the first ``_`` is the keyword section (the rest is free text); its comma
    items are stripped; the first item is ``keyword class`` and is the ``class_tokens`` whole;
    the keyword is its text before the first space; the captions start with the keyword and
    the remaining items. ``_flip_`` / ``_noflip_`` anywhere in the name force ``flip_aug``.
    Raises ``ValueError`` when the keyword section is empty or both flip markers are present.
    """
    section = name.split("_", 1)[0]
    items = [item.strip() for item in section.split(",")]
    items = [item for item in items if item]
    if not items:
        raise ValueError(
            f"folder name {name!r} has no keyword: name it like 'krnk girl, shorthair_f0768' "
            "(keyword, class word and extra tags before the first '_')"
        )
    first = items[0]
    keyword = first.split(" ", 1)[0]
    flip, noflip = "_flip_" in name, "_noflip_" in name
    if flip and noflip:
        raise ValueError(f"folder name {name!r} contains both '_flip_' and '_noflip_': keep one")
    return FolderKeywords(
        keyword=keyword,
        class_tokens=first,
        lead_tags=(keyword, *items[1:]),
        flip_aug=not noflip,
    )


# --- `charbuild tags FOLDER` -----------------------------------------------------------------


@dataclass
class CaptionFolderReport:
    """What :func:`caption_folder` did, file by file."""

    folder: Path
    lead_tags: tuple[str, ...]
    written: list[Path] = field(default_factory=list)  # .txt files created or replaced
    unchanged: list[Path] = field(default_factory=list)  # .txt files that already said the same
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)

    def lines(self) -> list[str]:
        """Human-readable report lines, one per skipped file, then a summary."""
        out = [f"{path}: skipped: {reason}" for path, reason in self.skipped]
        out.append(
            f"{self.folder}: {len(self.written)} caption(s) written, {len(self.unchanged)} unchanged, "
            f"{len(self.skipped)} skipped (keywords: {', '.join(self.lead_tags) or 'none'})"
        )
        return out


def caption_folder(
    folder: Path,
    *,
    keyword: str | None = None,
    tags: Iterable[str] = (),
    overwrite: bool = False,
    rules: TagRules = DEFAULT_RULES,
) -> CaptionFolderReport:
    """Write ``<stem>.txt`` beside every coded image in ``folder`` (the original drag-and-drop tool).

    Keywords: ``keyword`` then ``tags`` when a keyword is given; otherwise the folder name's
    keywords (:func:`parse_folder_name`) followed by ``tags``. An existing caption whose content
    differs (e.g. edited by hand) is kept and reported as skipped unless ``overwrite``. Image
    files without a code are reported as skipped. Other files are ignored.
    Raises :class:`CharbuildError` when ``folder`` is not a directory or its name has no keyword.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CharbuildError("not a folder: give the folder that holds the coded images", path=folder)
    if keyword is not None and keyword.strip():
        lead = (keyword.strip(), *tags)
    else:
        try:
            lead = (*parse_folder_name(folder.resolve().name).lead_tags, *tags)
        except ValueError as exc:
            raise CharbuildError(f"{exc}; or give the keyword with --keyword", path=folder) from None
    lead = tuple(t.strip() for t in lead if t and t.strip())
    report = CaptionFolderReport(folder=folder, lead_tags=lead)
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if not is_image_file(path.name):
            continue
        code = parse_code(path.name)
        if code is None:
            report.skipped.append(
                (path, "file name does not start with an image code [fb][0-2][0-7] (e.g. f00.png); rename it to caption it")
            )
            continue
        target = path.with_suffix(".txt")
        text = caption_text(code, lead, rules)
        if target.exists():
            old = target.read_text(encoding="utf-8", errors="replace")
            if old.rstrip("\r\n") == text:
                report.unchanged.append(target)
                continue
            if not overwrite:
                report.skipped.append(
                    (target, "caption exists with different content (edited?); kept it — use --overwrite to replace it")
                )
                continue
        write_text_atomic(target, text)
        report.written.append(target)
    return report
