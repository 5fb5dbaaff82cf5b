"""Identity and trigger scores of a training's samples (torch-free): what ``metrics.jsonl`` records.

At every sample step the trainer scores each template-code sample against the LoRA's own
training picture of that code (:mod:`charbuild.identity`); a group LoRA is scored against each
member's pictures separately. Step 0 is the base model without the LoRA, so the curve starts
at the baseline. The metrics lines::

    {"step": 0, "identity": {"kuroneko/face": 0.41}, "identity_codes": {"kuroneko/face": {"f00": 0.39, ...}}}
    {"step": 40, "trigger": 0.05}

``trigger``: the mean distance between the samples of the same prompts *without* the trigger
words, rendered with the LoRA after the last step and by the base model at step 0
(``samples/<step>/notrigger/<code>.png``): near 0 when the keyword, not the rest of the
prompt, carries the character.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from charbuild import identity
from charbuild.codes import parse_code
from charbuild.sample_prompts import (NOTRIGGER_DIR, SAMPLE_CODE_KIND, code_sample_name, split_sample_name,
                                      without_triggers)

__all__ = ["NOTRIGGER_DIR", "code_distances", "files_by_name", "identity_line", "member_of", "member_samples",
           "references", "trigger_line", "without_triggers"]

if TYPE_CHECKING:  # pragma: no cover
    from charbuild.train.job import TrainJob



def member_of(path: Path) -> tuple[str, int] | None:
    """(``character/part``, size) of a prepared picture ``.../<character>/<part>/<size>/<code>.png``."""
    parts = path.parts
    if len(parts) < 4 or not parts[-2].isdigit():
        return None
    return f"{parts[-4]}/{parts[-3]}", int(parts[-2])


def references(job: "TrainJob") -> dict[str, dict[str, Path]]:
    """member -> code -> the training picture a sample of that code is scored against.

    Only codes of the LoRA's sample kind (face codes for a face LoRA, body codes otherwise);
    of several prepared sizes the largest.
    """
    kind = SAMPLE_CODE_KIND.get(job.kind, "b")
    best: dict[str, dict[str, tuple[int, Path]]] = {}
    for raw in job.inputs:
        path = Path(raw)
        code = parse_code(path.name)
        found = member_of(path)
        if path.suffix.lower() != ".png" or not code or code[0] != kind or path.stem.lower() != code or not found:
            continue
        member, size = found
        held = best.setdefault(member, {}).get(code)
        if held is None or size > held[0]:
            best[member][code] = (size, path)
    return {m: {c: p for c, (_, p) in sorted(codes.items())} for m, codes in sorted(best.items())}


def code_distances(samples: Mapping[str, Path], refs: Mapping[str, Path]) -> dict[str, float]:
    """code -> distance of the sample of that code to its reference (codes both have)."""
    return {code: round(identity.distance(samples[code], refs[code]), 4) for code in sorted(refs) if code in samples}


def member_samples(samples: Mapping[str, Path], member: str) -> dict[str, Path]:
    """code -> sample of ``member``, of the samples by name: its own ``<member>/<code>`` (a group
    LoRA's), else the plain ``<code>`` ones (a face or body LoRA's, one member)."""
    own, plain = {}, {}
    for name, path in samples.items():
        owner, code = split_sample_name(name)
        if code and owner == member:
            own[code] = path
        elif code and owner is None:
            plain[code] = path
    return own or plain


def identity_line(step: int, samples: Mapping[str, Path], refs: Mapping[str, Mapping[str, Path]]) -> dict | None:
    """The metrics line of one sample step (None when no sample has a reference); ``samples``
    by name (:func:`files_by_name`)."""
    per_code = {member: code_distances(member_samples(samples, member), codes) for member, codes in refs.items()}
    per_code = {m: d for m, d in per_code.items() if d}
    if not per_code:
        return None
    means = {m: round(identity.mean(d.values()), 4) for m, d in per_code.items()}
    return {"step": int(step), "identity": means, "identity_codes": per_code}


def trigger_line(step: int, with_lora: Mapping[str, Path], base: Mapping[str, Path]) -> dict | None:
    """The trigger score line: mean distance of the LoRA's no-trigger samples to the base model's."""
    codes = sorted(set(with_lora) & set(base))
    if not codes:
        return None
    value = identity.mean(identity.distance(with_lora[c], base[c]) for c in codes)
    return {"step": int(step), "trigger": round(value, 4)}


def files_by_name(paths: Iterable[Path], folder: str | Path) -> dict[str, Path]:
    """The template-code sample files among ``paths`` by their name relative to ``folder``
    (``folder/f00.png`` -> ``f00``, ``folder/kuroneko/school/b00.png`` -> ``kuroneko/school/b00``)."""
    out = {}
    for p in paths:
        p = Path(p)
        try:
            name = p.relative_to(folder).with_suffix("").as_posix()
        except ValueError:
            continue
        code_name = code_sample_name(name)
        if code_name:
            out[code_name] = p
    return out
