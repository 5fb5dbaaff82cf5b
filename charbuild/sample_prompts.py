"""Sample prompts of a LoRA (pure): one prompt per template angle code, plus the user's own.

The natural sample set of a character LoRA is the original framework's template: one picture
per angle code, prompted with the LoRA's trigger words and the caption rules of that code
(:func:`charbuild.captions.caption_tags`) — exactly what the training captions of a picture at
that angle say, so a grid of samples shows at a glance which angles a LoRA has learned. Face
LoRAs use the face codes (``f00``..``f24``), body and group LoRAs the body codes.

Each sample has a *name* (its file stem under ``samples/<step>/``: the code, or ``p1``, ``p2``
… for the user's ``sample_prompts``), a prompt and a fixed seed (``seed + index``): two
samples of the same step and name are the same picture, and a name keeps its seed from step
to step, so a column of the grid shows one picture changing as the LoRA learns.

A group LoRA is sampled per member: each member's body codes prompted with that member's own
trigger words (as its training captions and its body LoRA's samples are), named
``<character>/<part>/<code>``, so each member's samples are scored against that member's
pictures. (One prompt with every member's keywords draws one figure on a small model, a mix
that is close to neither.)

Also here: which steps get samples (:func:`sample_steps_due`) and the sd-scripts prompt file
(``--sample_prompts``; its syntax: ``prompt --n negative --w W --h H --d seed --s steps --l cfg``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from charbuild.captions import CAPTION_SEPARATOR, DEFAULT_RULES, TagRules, caption_tags
from charbuild.codes import CODE_RE, TEMPLATE_CODES

#: The code kind whose template a LoRA kind samples.
SAMPLE_CODE_KIND = {"face": "f", "body": "b", "group": "b"}
#: sd-scripts' default classifier-free guidance scale (``--l``); used by the builtin too.
GUIDANCE_SCALE = 7.5
#: Steps and size when a job says none: on a GPU (and for sd-scripts) and on a CPU (small, few).
DEFAULT_SAMPLE_STEPS = 20
CPU_SAMPLE_STEPS = 4
CPU_SAMPLE_SIZE = 128
#: sd-scripts' sample size when ``sample_size`` is not set: the architecture's native size.
NATIVE_SIZE = {"sd15": 512, "sdxl": 1024}
#: Names of the user's own prompts: ``p1``, ``p2`` …
USER_PROMPT_PREFIX = "p"
#: The folder (under ``samples/<step>/``) of the prompts without trigger words.
NOTRIGGER_DIR = "notrigger"


@dataclass(frozen=True)
class SamplePrompt:
    """One sample: file stem ``name``, its ``prompt`` and the seed offset ``index`` (seed + index)."""

    name: str
    prompt: str
    index: int

    def seed(self, base_seed: int) -> int:
        """The fixed seed of this sample for a training seeded with ``base_seed``."""
        return int(base_seed) + self.index


def sample_set(kind: str, keywords: Iterable[str], rules: TagRules = DEFAULT_RULES,
               extra: Sequence[str] = (), members: Sequence[tuple[str, Sequence[str]]] = ()) -> tuple[SamplePrompt, ...]:
    """The samples of a LoRA of ``kind`` (face | body | group): its template codes, then ``extra``.

    ``members`` (a group LoRA): ``(member, its trigger words)`` pairs, ``member`` as
    ``character/part``; the template codes are then rendered once per member with its words,
    named ``<member>/<code>``.

    >>> [s.name for s in sample_set("face", ["krnk"])][:3]
    ['f00', 'f01', 'f02']
    >>> sample_set("body", ["krnk"], extra=["krnk, smile"])[-1]
    SamplePrompt(name='p1', prompt='krnk, smile', index=15)
    >>> [s.name for s in sample_set("group", [], members=[("a/x", ["ax"]), ("b/y", ["by"])])][14:16]
    ['a/x/b24', 'b/y/b00']
    """
    if kind not in SAMPLE_CODE_KIND:
        raise ValueError(f"unknown LoRA kind {kind!r}: expected one of {', '.join(SAMPLE_CODE_KIND)}")
    codes = TEMPLATE_CODES[SAMPLE_CODE_KIND[kind]]
    leads = [(f"{member}/", tuple(words)) for member, words in members] or [("", tuple(keywords))]
    out = []
    for prefix, lead in leads:
        out += [SamplePrompt(prefix + code, CAPTION_SEPARATOR.join(caption_tags(code, lead, rules)), len(out) + i)
                for i, code in enumerate(codes)]
    for j, prompt in enumerate(p.strip() for p in extra if p and p.strip()):
        out.append(SamplePrompt(f"{USER_PROMPT_PREFIX}{j + 1}", prompt, len(out)))
    return tuple(out)


def split_sample_name(name: str) -> tuple[str | None, str | None]:
    """(member or None, code or None) of a sample name: ``f00`` -> (None, "f00"),
    ``kuroneko/school/b00`` -> ("kuroneko/school", "b00"), ``p1`` -> (None, None)."""
    member, _, last = name.rpartition("/")
    return (member or None), (last.lower() if CODE_RE.fullmatch(last) else None)


def code_sample_name(name: str) -> str | None:
    """A template-code sample's name with its code in lower case (``F00`` -> ``f00``,
    ``kuroneko/school/B00`` -> ``kuroneko/school/b00``); None for any other name."""
    member, code = split_sample_name(name)
    if code is None:
        return None
    return f"{member}/{code}" if member else code


def without_triggers(samples: Iterable[SamplePrompt], keywords: Iterable[str]) -> tuple[SamplePrompt, ...]:
    """The template-code samples with the trigger words taken out of their prompts (same seeds),
    named ``notrigger/<name>``."""
    words = {k.strip().lower() for k in keywords if k and k.strip()}
    out = []
    for s in samples:
        if split_sample_name(s.name)[1] is None:
            continue
        tags = [t for t in s.prompt.split(CAPTION_SEPARATOR.strip()) if t.strip() and t.strip().lower() not in words]
        out.append(SamplePrompt(f"{NOTRIGGER_DIR}/{s.name}", CAPTION_SEPARATOR.join(t.strip() for t in tags), s.index))
    return tuple(out)


def sample_steps_due(step: int, every: int | None, total: int) -> bool:
    """Whether samples are rendered after ``step`` (1-based): every ``every`` steps and at the end."""
    if not every:
        return False
    return step % int(every) == 0 or step == total


def round_size(size: int, multiple: int) -> int:
    """``size`` rounded down to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, int(size) // multiple * multiple)


def _one_line(text: str) -> str:
    # a newline would start another prompt, and " --x" another option, in sd-scripts' file
    return re.sub(r"\s+--", " -", " ".join(text.split()))


def sd_scripts_prompt_file(samples: Sequence[SamplePrompt], *, seed: int, width: int, height: int,
                           steps: int, scale: float = GUIDANCE_SCALE, negative: str = "") -> str:
    """The text of sd-scripts' ``--sample_prompts`` file: one line per sample, in ``samples`` order.

    sd-scripts numbers its sample files by line (``<output_name>_<step:06d>_<line:02d>_<time>_<seed>.png``),
    which :func:`sd_scripts_sample_name` turns back into the sample's name.
    """
    lines = []
    for s in samples:
        line = f"{_one_line(s.prompt)} --w {int(width)} --h {int(height)} --d {s.seed(seed)} --s {int(steps)} --l {scale:g}"
        if negative.strip():
            line += f" --n {_one_line(negative)}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def sd_scripts_sample_name(filename: str, output_name: str,
                           samples: Sequence[SamplePrompt]) -> tuple[int, str] | None:
    """(step, sample name) of an sd-scripts sample file name, or None for any other file."""
    m = re.fullmatch(re.escape(output_name) + r"_(\d{6,})_(\d{2,})_\d{14}(?:_\d+)?\.png", filename)
    if not m:
        return None
    line = int(m.group(2))
    if line >= len(samples):
        return None
    return int(m.group(1)), samples[line].name
