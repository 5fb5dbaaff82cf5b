"""Block weights in the "LoRA Block Weight" (LBW) convention: names, presets, stem mapping.

Block names: SD1.5 ``BASE, IN00…IN11, M00, OUT00…OUT11`` (26; 17 for the blocks a plain LoRA
touches), SDXL ``BASE, IN00…IN08, M00, OUT00…OUT08`` (20; 12). ``MID`` is accepted for ``M00``.

A weights spec (:func:`resolve_block_weights`) is one of

* a preset name: the user's ``presets`` first, then :data:`BUILTIN_PRESETS`;
* a list of 12/17/20/26 numbers, or the same as a comma string (``"0,1,1,…"``);
* a dict block name -> value; **blocks the dict does not name keep 1.0** (full strength);
* the same as a string of named entries (:func:`parse_named_weights`): ``"IN04:0.5, OUT03-OUT05:0"``,
  or in the LBW extension's own ``lbwe=`` form ``"IN04 IN05::0.5"`` (blocks, an empty element
  part, the ratio); later entries win, unnamed blocks keep 1.0, as in LBW.

A short list (17 for SD1.5, 12 for SDXL) maps into the full set by block name; blocks it does
not name get 0, as in the LBW extension. On SDXL a 17- or 26-value SD1.5 list is applied as LBW
applies it, by SD1.5 block names, with a warning (:func:`sd15_list_on_sdxl`); the presets FACE
and BODY by name mean their SDXL forms there (:func:`arch_presets`). The result always names
every block of the arch.

Modules that belong to no block (``conv_out``, the time embedding: :func:`block_of` returns
``None``) stay at ×1 whatever the weights, as the inference-time extension does.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from charbuild.checks import closest

SD15_26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
SD15_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
SDXL_20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
SDXL_12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]

_NAMES = {("sd15", 26): SD15_26, ("sd15", 17): SD15_17, ("sdxl", 20): SDXL_20, ("sdxl", 12): SDXL_12}
_FULL = {"sd15": 26, "sdxl": 20}
#: SD1.5 list lengths LBW also applies to an SDXL LoRA (by block name: :func:`sd15_list_on_sdxl`).
_SD15_ON_SDXL = {"sdxl": [17, 26]}


class SdxlListWarning(UserWarning):
    """An SD1.5 (17/26-value) list was applied to an SDXL LoRA the way LBW applies it."""


def _v(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


BUILTIN_PRESETS: dict[str, list[float]] = {
    # charframework-rules.md §7 (26 values, SD1.5)
    "FACE": _v("0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1,1,1,0,1,1,1,0,0,1"),
    "BODY": _v("0,1,1,1,0,1,0,0,0,1,0,0,0,0,0,0,1,1,1,1,1,1,1,0,0,1"),
    # shipped by the LBW extension (17 values)
    "NONE": [0.0] * 17,
    "ALL": [1.0] * 17,
    "INS": _v("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _v("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _v("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _v("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _v("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _v("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _v("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    "ALL0.5": [0.5] * 17,
}


def block_names(arch: str, n: int) -> list[str]:
    """The ``n`` block names of ``arch`` (SD1.5: 17 or 26; SDXL: 12 or 20), in list order."""
    try:
        return list(_NAMES[(arch, n)])
    except KeyError:
        valid = ", ".join(f"{a} {k}" for a, k in _NAMES)
        raise ValueError(f"no {n}-value block list for arch {arch!r}; valid: {valid}") from None


def all_blocks(arch: str) -> list[str]:
    """Every block name of ``arch`` (26 for SD1.5, 20 for SDXL)."""
    _check_arch(arch)
    return block_names(arch, _FULL[arch])


def _check_arch(arch: str) -> None:
    if arch not in _FULL:
        raise ValueError(f"unknown arch {arch!r}; valid: sd15, sdxl")


_SD15_RULES = [
    (re.compile(r"^lora_te\d?_"), lambda m: "BASE"),
    (re.compile(r"^lora_unet_down_blocks_(\d+)_(?:resnets|attentions)_(\d+)(?:_|$)"), lambda m: f"IN{3 * int(m[1]) + int(m[2]) + 1:02d}"),
    (re.compile(r"^lora_unet_down_blocks_(\d+)_downsamplers_0(?:_|$)"), lambda m: f"IN{3 * int(m[1]) + 3:02d}"),
    (re.compile(r"^lora_unet_mid_block(?:_|$)"), lambda m: "M00"),
    (re.compile(r"^lora_unet_up_blocks_(\d+)_(?:resnets|attentions)_(\d+)(?:_|$)"), lambda m: f"OUT{3 * int(m[1]) + int(m[2]):02d}"),
    (re.compile(r"^lora_unet_up_blocks_(\d+)_upsamplers_0(?:_|$)"), lambda m: f"OUT{3 * int(m[1]) + 2:02d}"),
    (re.compile(r"^lora_unet_conv_in(?:_|$)"), lambda m: "IN00"),
]
_SDXL_RULES = [
    (re.compile(r"^lora_te\d?_"), lambda m: "BASE"),
    (re.compile(r"^lora_unet_input_blocks_(\d+)(?:_|$)"), lambda m: f"IN{int(m[1]):02d}"),
    (re.compile(r"^lora_unet_middle_block(?:_|$)"), lambda m: "M00"),
    (re.compile(r"^lora_unet_output_blocks_(\d+)(?:_|$)"), lambda m: f"OUT{int(m[1]):02d}"),
]


def block_of(stem: str, arch: str) -> str | None:
    """The LBW block of a kohya stem, or ``None`` for block-less modules (always ×1).

    Block-less: ``conv_out``, ``time_embedding_*`` (SD1.5), ``out_*``, ``time_embed_*``,
    ``label_emb_*`` (SDXL), and any stem outside the known UNet/text-encoder layout.
    """
    _check_arch(arch)
    valid = set(all_blocks(arch))
    for rx, name in _SD15_RULES if arch == "sd15" else _SDXL_RULES:
        m = rx.match(stem)
        if m:
            block = name(m)
            return block if block in valid else None
    return None


def _canonical(name: str) -> str:
    n = name.strip().upper()
    return "M00" if n in ("MID", "M0", "M00") else n


def resolve_block_weights(
    spec: str | Sequence[float] | Mapping[str, float],
    arch: str = "sd15",
    presets: Mapping[str, Sequence[float] | str | Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """Turn a weights spec into ``{block: weight}`` over every block of ``arch``.

    ``spec``: a preset name (``presets`` override and extend :data:`BUILTIN_PRESETS` and, for
    SDXL, the SDXL forms of FACE and BODY; a preset is a list, or any string or table form
    below), a list of 12/17/20/26 numbers or a comma string of them (17/26 on SDXL: as LBW,
    :func:`sd15_list_on_sdxl`), or a dict block -> value (unnamed blocks 1.0). Raises
    ``ValueError`` naming the valid presets/lengths/blocks.
    """
    _check_arch(arch)
    table = {**BUILTIN_PRESETS, **arch_presets(arch),
             **{k: v if isinstance(v, (str, Mapping)) else list(v) for k, v in (presets or {}).items()}}
    full = all_blocks(arch)
    lengths = sorted(n for (a, n) in _NAMES if a == arch)
    if isinstance(spec, Mapping):
        out = {b: 1.0 for b in full}
        bad = []
        for name, value in spec.items():
            b = _canonical(str(name))
            if b not in out:
                bad.append(str(name))
            else:
                out[b] = _number(value, f"block {name}")
        if bad:
            raise ValueError(f"unknown block name(s) for {arch}: {', '.join(bad)}; valid: {', '.join(full)}")
        return out
    if isinstance(spec, str):
        text = spec.strip()
        if ":" in text:
            return parse_named_weights(text, arch)
        if "," in text or _is_number(text):
            values = [_number(x, "block weight") for x in text.split(",")]
        else:
            if text not in table:
                upper = {k.upper(): k for k in table}
                if text.upper() in upper:
                    text = upper[text.upper()]
                else:
                    close = closest(text, table)
                    hint = f" Did you mean {close[0]}?" if close else ""
                    raise ValueError(
                        f"unknown block-weight preset {spec!r}.{hint} Presets: {', '.join(sorted(table))}; "
                        f"or give {'/'.join(map(str, lengths))} comma-separated numbers"
                    )
            preset = table[text]
            if isinstance(preset, (str, Mapping)):  # a preset written as "0,1,…", "IN04:0.5,…" or a table
                others = {k: v for k, v in table.items() if k != text}  # no preset refers to itself
                try:
                    return resolve_block_weights(preset, arch, others)
                except ValueError as exc:
                    raise ValueError(f"preset {text}: {exc}") from None
            values = list(preset)
            if len(values) not in lengths + _SD15_ON_SDXL.get(arch, []):
                raise ValueError(
                    f"preset {text} has {len(values)} values, but {arch} takes {' or '.join(map(str, lengths))}"
                )
    else:
        values = [_number(x, "block weight") for x in spec]
    if arch == "sdxl" and len(values) in (17, 26):
        return sd15_list_on_sdxl(values)
    if len(values) not in lengths:
        raise ValueError(
            f"{len(values)} block weights given; {arch} takes {' or '.join(map(str, lengths))} values "
            f"({', '.join(f'{n}: {block_names(arch, n)[0]}…{block_names(arch, n)[-1]}' for n in lengths)})"
        )
    names = block_names(arch, len(values))
    out = {b: 0.0 for b in full}
    out.update(zip(names, values))
    return out


def sd15_list_on_sdxl(values: Sequence[float]) -> dict[str, float]:
    """A 17- or 26-value SD1.5 list applied to an SDXL LoRA exactly as the LBW extension does.

    LBW spreads any list over its 26 SD1.5 slots by block name (``to26``; slots the list does
    not name get 0) and gives an SDXL module of ``input_blocks_i`` slot IN(i), of
    ``output_blocks_i`` slot OUT(i). So a 17-value list gives IN00, IN03, IN06 and OUT00-OUT02
    0 on SDXL (``ALL`` is not every block there), and a 26-value list's IN09-IN11 and
    OUT09-OUT11 reach nothing. Warns (:class:`SdxlListWarning`) naming what that leaves out,
    since the 20-value form is the one that weighs every SDXL block.
    """
    names = block_names("sd15", len(values))
    slots = dict(zip(names, (float(v) for v in values)))
    out = {b: slots.get(b, 0.0) for b in SDXL_20}
    zeroed = [b for b in SDXL_20 if b not in slots]
    dropped = [b for b in names if b not in out and slots[b] != 0.0]
    if any(out.values()) and (zeroed or dropped):
        said = []
        if zeroed:
            said.append(f"{_span(zeroed)} get 0 (the list has no value for them)")
        if dropped:
            said.append(f"its values for {_span(dropped)} reach no SDXL block")
        import warnings

        warnings.warn(SdxlListWarning(
            f"a {len(values)}-value SD1.5 list on an SDXL LoRA is applied as the LBW extension applies it, by "
            f"SD1.5 block names: {'; '.join(said)}. To weigh every SDXL block, give 20 values (BASE, IN00-IN08, "
            f"M00, OUT00-OUT08), e.g. \"{','.join(['1'] * 20)}\" for all"), stacklevel=3)
    return out


def _span(blocks: list[str]) -> str:
    """``IN00, IN03, IN06, OUT00-OUT02``: runs of consecutive block names shortened."""
    order = SD15_26
    runs: list[list[str]] = []
    for b in blocks:
        if runs and order.index(b) == order.index(runs[-1][-1]) + 1 and b[:2] == runs[-1][-1][:2]:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(r[0] if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def parse_named_weights(text: str, arch: str = "sd15") -> dict[str, float]:
    """``{block: weight}`` over every block of ``arch`` from named entries; unnamed blocks 1.0.

    Entries are separated by commas or new lines; each is ``BLOCKS:RATIO`` or LBW's elemental
    ``BLOCKS:ELEMENTS:RATIO`` with an empty ELEMENTS part (and, in that form, no space before or
    after the block names: LBW reads one as an empty name that matches every module). BLOCKS is one or more block names
    separated by spaces, each a name (``IN04``, ``M00``/``MID``, ``OUT03``) or a range ``A-B``
    taken in LBW's 26-block order (``IN05-OUT05``; names the arch lacks are skipped). A block named
    by several entries takes the last one's ratio, as LBW's ``ratiodealer`` does.

    Not accepted, with a message: a non-empty ELEMENTS part (LBW's per-layer ``attn``/``proj``
    filters reach inside a block, which one weight per block cannot express) and ``NOT`` (in LBW
    it also reaches the modules outside every block, which a build keeps at ×1).
    """
    _check_arch(arch)
    full = all_blocks(arch)
    order = [_canonical(b) for b in SD15_26]  # LBW's BLOCKID26: the order ranges run in
    out = {b: 1.0 for b in full}
    for raw in text.replace("\n", ",").split(","):
        entry = raw.strip()
        if not entry:
            continue
        parts = [p.strip() for p in entry.split(":")]
        if len(parts) == 3:
            blocks_part = raw.split(":")[0]
            if blocks_part != blocks_part.strip(" ") or "  " in blocks_part:
                raise ValueError(
                    f"{raw!r}: in LBW's BLOCKS:ELEMENTS:RATIO form a space before, after or between the block "
                    "names is an empty name, which LBW matches against every module; remove the extra spaces "
                    f"({entry.split(':')[0].strip()}::{parts[2]}) or write BLOCKS:RATIO"
                )
            if parts[1]:
                raise ValueError(
                    f"{entry!r}: per-element weights ({parts[1]!r}, LBW's lbwe filter) are not supported; "
                    f"give whole blocks, e.g. {parts[0]}::{parts[2]}"
                )
            parts = [parts[0], parts[2]]
        if len(parts) != 2 or not parts[0]:
            raise ValueError(f"{entry!r}: expected BLOCKS:RATIO (e.g. IN04:0.5 or IN05-OUT05:0)")
        names = parts[0].split()
        if names[0].upper() == "NOT":
            raise ValueError(
                f"{entry!r}: NOT is not accepted (in LBW it also reaches conv_out and the time embedding, "
                "which a build keeps at ×1); list the blocks or give a range"
            )
        value = _number(parts[1], f"{entry!r}: ratio")
        chosen: list[str] = []
        for name in names:
            if "-" in name:
                lo, _, hi = name.partition("-")
                ends = [_canonical(lo), _canonical(hi)]
                bad = [e for e in ends if e not in order]
                if bad:
                    raise ValueError(f"{entry!r}: unknown block name(s) {', '.join(bad)}; valid: {', '.join(full)}")
                i, j = sorted(order.index(e) for e in ends)
                chosen += [b for b in order[i : j + 1] if b in out]
            elif _canonical(name) in out:
                chosen.append(_canonical(name))
            else:
                raise ValueError(f"{entry!r}: unknown block name for {arch}: {name}; valid: {', '.join(full)}")
        for b in chosen:
            out[b] = value
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(value: object, what: str) -> float:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: {value!r} is not a number") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise ValueError(f"{what}: {value!r} is not a finite number")
    return f


def parse_preset_file(text: str, source: str = "preset file") -> dict[str, list[float]]:
    """Parse the LBW preset file format: one ``NAME:v1,v2,…`` a line (12/17/20/26 values).

    Lines containing ``#`` and blank lines are ignored. ``R``, ``U`` and ``X`` (random values, plot
    variable) are rejected: a build needs fixed numbers. Raises ``ValueError`` naming the line.
    """
    presets: dict[str, list[float]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or "#" in line:
            continue
        where = f"{source}:{lineno}"
        if ":" not in line:
            raise ValueError(f"{where}: expected NAME:v1,v2,…, got {line!r}")
        name, _, rest = line.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"{where}: missing preset name before ':'")
        parts = [p.strip() for p in rest.split(",")]
        special = sorted({p.upper() for p in parts if p.upper() in ("R", "U", "X")})
        if special:
            raise ValueError(
                f"{where}: preset {name} uses {', '.join(special)} (random values / plot variable), "
                "which only make sense interactively; give fixed numbers"
            )
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{where}: preset {name}: values must be numbers, got {rest.strip()!r}") from None
        if len(values) not in (12, 17, 20, 26):
            raise ValueError(f"{where}: preset {name} has {len(values)} values; expected 12, 17, 20 or 26")
        presets[name] = values
    return presets


#: For each SDXL block, the SD1.5 block that does the same job: the same channel width at the
#: same fraction of the image (320 channels at 1/8, 640 at 1/16, 1280 at 1/32). SD1.5's
#: deepest level (IN09-IN11, OUT00-OUT02: 1280 channels at 1/64, no attention) has no SDXL
#: counterpart; its values are dropped.
SD15_BLOCK_OF_SDXL: dict[str, str] = {
    "BASE": "BASE", "IN00": "IN00",
    **{f"IN{i:02d}": f"IN{i:02d}" for i in range(1, 9)},  # 320: IN01-02, down IN03, 640: IN04-05, down IN06, 1280: IN07-08
    "M00": "M00",
    **{f"OUT{i:02d}": f"OUT{i + 3:02d}" for i in range(9)},  # 1280: OUT00-02 = SD OUT03-05, 640: OUT03-05, 320: OUT06-08
}
#: The built-in presets that have an SDXL form (the rest are uniform or LBW's own 17-value lists).
SDXL_FORM_PRESETS = ("FACE", "BODY")


def sdxl_form(sd15_weights: Mapping[str, float]) -> list[float]:
    """The 20 SDXL block weights (BASE, IN00-IN08, M00, OUT00-OUT08) for SD1.5 ``{block: weight}``."""
    return [float(sd15_weights[SD15_BLOCK_OF_SDXL[block]]) for block in SDXL_20]


def arch_presets(arch: str, presets: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The presets a weights spec of an ``arch`` project resolves with: for SDXL the SDXL forms of
    FACE and BODY, then the user's ``presets`` (which win)."""
    table: dict[str, Any] = {}
    if arch == "sdxl":
        for name in SDXL_FORM_PRESETS:
            table[name] = sdxl_form(resolve_block_weights(BUILTIN_PRESETS[name], arch="sd15"))
    table.update(presets or {})
    return table
