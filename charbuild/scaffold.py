"""``charbuild new``: the commented ``character.toml`` of a new character (pure, but for reading
the project's base model name).

The scaffold's ``steps`` suit the project's model: the built-in demo models learn a character in
a few dozen steps (minutes on a CPU), a real SD1.5/SDXL checkpoint in the original's 1000 (face)
and 1200 (body); the comment says which it chose and the other value.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .base_arch import tiny_base_arch
from .train.variants import KIND_STEPS

#: Steps of a face/body LoRA on a built-in demo model (the example project's).
DEMO_STEPS = {"face": 40, "body": 40}
#: The base model of a project whose project.toml does not name one (config.py's default).
DEFAULT_BASE = "tiny"

CHARACTER_TEMPLATE = '''# Character "{name}". Pictures: face/f00.png ... (face images, nude upper body),
# outfits/<outfit>/b00.png ... (full body in that outfit). Codes: f/b, then 0 horizontal /
# 1 from above / 2 from below, then 0 front .. 4 behind (5-7: mirrored 3-1).
keyword = "{keyword}"        # trigger word, also the face LoRA's name
class = "girl"               # class_tokens = "{keyword} girl"
tags = []                    # extra caption tags after the keyword, e.g. ["short hair", "choker"]
background = "black"         # transparent areas filled "black" (dark hair) or "white" (light hair)
symmetric = true             # left-right symmetric: flip_aug; false needs the codes 5-7 too

[face]                       # the face LoRA
repeats = 4
steps = {face_steps:<20} # {steps_note}
# variants = ["Lora3x3A50p-AdamW8", "LohaA50p-AdamW8"]
# merge = "FACE"             # block weights: preset name, 17/26 values, or a block table
{outfit_block}'''

OUTFIT_TEMPLATE = '''
[outfits.{outfit}]            # a body LoRA: face pictures + outfits/{outfit}/b??.png
keyword = "{keyword}{short}"
tags = []
repeats = 2
steps = {body_steps}
'''


def project_base(root: Path) -> str:
    """The ``[model] base`` of the project at ``root`` (the default when project.toml does not
    say, or cannot be read: ``charbuild check`` reports that, not ``new``)."""
    try:
        data = tomllib.loads((root / "characters" / "project.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return DEFAULT_BASE
    model = data.get("model")
    base = model.get("base") if isinstance(model, dict) else None
    return base if isinstance(base, str) else DEFAULT_BASE


def scaffold_steps(base: str) -> tuple[dict[str, int], str]:
    """(steps per LoRA kind, the comment saying why) for a project training ``base``."""
    if tiny_base_arch(base):
        return DEMO_STEPS, (f"the built-in {base!r} model needs few; a real model: "
                            f"{KIND_STEPS['face']} (body {KIND_STEPS['body']})")
    return {k: KIND_STEPS[k] for k in ("face", "body")}, "the original's, for a real SD1.5/SDXL model"


def character_toml(name: str, keyword: str, outfits: list[str], base: str) -> str:
    """The text of a new ``character.toml`` (ends with a newline)."""
    steps, note = scaffold_steps(base)
    outfit_block = "".join(OUTFIT_TEMPLATE.format(outfit=o, keyword=keyword, short=o[:2], body_steps=steps["body"])
                           for o in outfits)
    return CHARACTER_TEMPLATE.format(name=name, keyword=keyword, face_steps=steps["face"], steps_note=note,
                                     outfit_block=outfit_block)
