"""Random character looks and the demo model's pretraining pictures (Pillow only, deterministic).

Each look is a random choice of hair colour and style, ears, eye and skin colour, and the
colours of both outfits (school uniform, plugsuit), named by a random keyword. A look is drawn
at every face and body template code (``f00``..``f24``, ``b00``..``b24``) with
:func:`draw_examples.draw_image` and flattened onto black and onto white, as charbuild's
image stage does. Captions follow charbuild's own caption rules
(:func:`charbuild.captions.caption_tags`) with the keyword and the look's attribute tags in
front; each attribute tag is dropped with probability ``ATTRIBUTE_DROP`` so that the model
also learns to draw a plausible look from a keyword alone (what a new LoRA's keyword is at
step 0).

Held out: no look has the hair and eye colours of either example character (black hair with
yellow eyes, brown hair with green eyes), so what their LoRAs learn is new to the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from draw_examples import CHANEKO, KURONEKO, Clothes, Look, draw_image

HAIR = {  # name: (colour, shade)
    "black": ((28, 28, 38), (12, 12, 18)),
    "brown": ((150, 92, 48), (112, 66, 32)),
    "blonde": ((238, 208, 112), (200, 166, 80)),
    "red": ((205, 52, 40), (150, 32, 25)),
    "blue": ((60, 100, 215), (40, 70, 160)),
    "pink": ((242, 150, 192), (205, 110, 150)),
    "white": ((236, 236, 242), (190, 190, 202)),
    "green": ((70, 165, 90), (45, 118, 60)),
    "purple": ((132, 80, 185), (95, 55, 140)),
}
EYES = {
    "yellow": (235, 185, 40), "green": (70, 165, 85), "blue": (60, 110, 225),
    "red": (205, 40, 40), "brown": (120, 70, 40), "purple": (155, 80, 205),
}  # fmt: skip
SKIN = {  # name: (skin, shade, line); light skin carries no tag, as on booru sites
    "light": ((250, 222, 200), (222, 186, 165), (150, 100, 90)),
    "tan": ((222, 175, 135), (190, 145, 110), (130, 85, 65)),
    "dark": ((140, 95, 65), (110, 72, 50), (80, 50, 35)),
}
SCHOOL = {  # sailor collar and skirt colour: (main, shade)
    "navy": ((35, 45, 100), (22, 28, 66)),
    "green": ((40, 95, 60), (25, 65, 40)),
    "maroon": ((110, 30, 45), (75, 20, 30)),
    "black": ((40, 40, 48), (22, 22, 28)),
    "grey": ((125, 125, 135), (92, 92, 102)),
}
PLUGSUIT = {  # name: (suit, panels, panel shade, seams)
    "red": ((246, 246, 250), (205, 35, 45), (150, 22, 32), (34, 34, 40)),
    "blue": ((246, 246, 250), (45, 90, 210), (30, 60, 150), (34, 34, 40)),
    "purple": ((40, 40, 48), (140, 70, 200), (100, 45, 150), (110, 200, 80)),
    "yellow": ((250, 225, 90), (34, 34, 40), (18, 18, 22), (200, 120, 30)),
    "pink": ((246, 246, 250), (240, 120, 170), (190, 80, 125), (34, 34, 40)),
}
EARS = ("cat", "fox", "none")
STYLES = ("short", "long")
RIBBONS = {"red": ((205, 35, 45), (150, 22, 32)), "blue": ((45, 90, 210), (30, 60, 150)),
           "yellow": ((240, 200, 50), (190, 150, 30))}
#: The example characters' (hair, eyes): never drawn for pretraining.
HELD_OUT = (("black", "yellow"), ("brown", "green"))
ATTRIBUTE_DROP = 0.35
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
FACE_CODES = tuple(f"f{v}{h}" for v in range(3) for h in range(5))
BODY_CODES = tuple(f"b{v}{h}" for v in range(3) for h in range(5))
#: The example characters' keywords: no random keyword may equal them.
RESERVED = {"krnk", "krnksf", "tyank", "tyankps"}
_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwyz", "aeiou"


@dataclass(frozen=True)
class DemoCharacter:
    """A random look with its keyword and attribute tags (face tags, and body tags per outfit)."""

    keyword: str
    look: Look
    tags: tuple[str, ...]  # hair, ears, eyes, skin
    outfit_tags: dict  # outfit -> its tags (name, colour)


def random_keyword(rng: random.Random) -> str:
    """A pronounceable-looking 4-7 letter keyword, sometimes with dropped vowels ("krnk")."""
    word = "".join(rng.choice(_CONSONANTS) + (rng.choice(_VOWELS) if rng.random() < 0.6 else "")
                   for _ in range(rng.randint(2, 4)))
    return word[:7] if len(word) >= 3 else word + "n"


def random_character(rng: random.Random, taken: set[str]) -> DemoCharacter:
    """One random look (never a held-out one) with a keyword not in ``taken``."""
    while True:
        hair, eyes = rng.choice(sorted(HAIR)), rng.choice(sorted(EYES))
        if (hair, eyes) not in HELD_OUT:
            break
    skin = rng.choices(sorted(SKIN), weights=[4 if s == "light" else 1 for s in sorted(SKIN)])[0]
    ears, style = rng.choice(EARS), rng.choice(STYLES)
    school, ribbon, suit = rng.choice(sorted(SCHOOL)), rng.choice(sorted(RIBBONS)), rng.choice(sorted(PLUGSUIT))
    (sk, sk_shade, line), (main, main_shade) = SKIN[skin], SCHOOL[school]
    light, accent, accent_shade, dark = PLUGSUIT[suit]
    look = Look(
        hair=HAIR[hair][0], hair_shade=HAIR[hair][1], eyes=EYES[eyes], skin=sk, skin_shade=sk_shade, line=line,
        ears=ears, hair_style=style,
        school=Clothes(main=main, main_shade=main_shade, accent=RIBBONS[ribbon][0], accent_shade=RIBBONS[ribbon][1]),
        plugsuit=Clothes(light=light, accent=accent, accent_shade=accent_shade, dark=dark, main=dark),
    )  # fmt: skip
    keyword = random_keyword(rng)
    while keyword in taken or keyword in RESERVED:
        keyword = random_keyword(rng)
    taken.add(keyword)
    tags = [f"{hair} hair", f"{style} hair", f"{eyes} eyes"]
    if ears != "none":
        tags += [f"{ears} ears"]
    if skin != "light":
        tags += [f"{skin} skin"]
    outfit_tags = {"school": ("school uniform", f"{school} sailor collar", f"{ribbon} ribbon"),
                   "plugsuit": ("plugsuit", f"{suit} plugsuit")}
    if ears != "none":
        outfit_tags = {k: v + (f"{ears} tail",) for k, v in outfit_tags.items()}
    return DemoCharacter(keyword, look, tuple(tags), outfit_tags)


def example_looks() -> dict[str, Look]:
    """The example characters' looks (for tests that check the hold-out)."""
    return {"kuroneko": KURONEKO, "chaneko": CHANEKO}


def flatten(img: Image.Image, background: str, size: int) -> Image.Image:
    """``img`` (RGBA) on ``background`` and resized to ``size`` px with Lanczos, as charbuild's image stage."""
    canvas = Image.new("RGB", img.size, BACKGROUNDS[background])
    canvas.paste(img, mask=img.getchannel("A"))
    return canvas.resize((size, size), Image.Resampling.LANCZOS) if canvas.size != (size, size) else canvas


def pretraining_items(seed: int, characters: int):
    """Yield (character, code, outfit) of the pretraining set: every template code of each character,
    the body codes in one of its two outfits (chosen at random per code)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    for _ in range(characters):
        ch = random_character(rng, taken)
        for code in FACE_CODES:
            yield ch, code, "nude"
        for code in BODY_CODES:
            yield ch, code, rng.choice(("school", "plugsuit"))


def caption_for(ch: DemoCharacter, code: str, outfit: str, rng: random.Random) -> str:
    """The pretraining caption: keyword, attribute tags (each kept with 1 - ATTRIBUTE_DROP), then
    charbuild's caption rules of ``code``."""
    from charbuild.captions import CAPTION_SEPARATOR, caption_tags

    attrs = list(ch.tags) + (list(ch.outfit_tags[outfit]) if outfit != "nude" else [])
    kept = [t for t in attrs if rng.random() >= ATTRIBUTE_DROP]
    if outfit != "nude" and ch.outfit_tags[outfit][0] not in kept and rng.random() < 0.5:
        kept.insert(0, ch.outfit_tags[outfit][0])
    return CAPTION_SEPARATOR.join(caption_tags(code, [ch.keyword, *kept]))


def draw_item(ch: DemoCharacter, code: str, outfit: str, draw_size: int) -> Image.Image:
    """The RGBA picture of ``ch`` at ``code`` in ``outfit``, drawn at ``draw_size`` px."""
    return draw_image(code, ch.look, outfit, draw_size)
