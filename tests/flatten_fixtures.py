"""Pictures and projects for the opaque-picture (background flattening) tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, ImageDraw

from conftest import make_project

GREY = (226, 226, 230)


def opaque_picture(path: Path, seed: int = 0, background=GREY, figure=(200, 60, 50), fmt: str = "PNG") -> Path:
    """A figure (a head and a body running off the bottom edge) on a flat opaque background."""
    img = Image.new("RGB", (96, 96), background)
    d = ImageDraw.Draw(img)
    d.ellipse([28 + seed, 10, 68 + seed, 50], fill=figure)
    d.rectangle([22, 52, 74, 95], fill=tuple(max(0, c - 40) for c in figure))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return path


def digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def flatten_project(tmp_path, flatten_table: str = "") -> Path:
    """alice: two opaque face pictures (f00.png, f01.jpg) and an RGBA one (f02); bob: RGBA only."""
    root = make_project(tmp_path / "proj")
    face = root / "characters/alice/face"
    opaque_picture(face / "f00.png")
    (face / "f01.png").unlink()
    opaque_picture(face / "f01.jpg", seed=4, fmt="JPEG")
    if flatten_table:
        toml = root / "characters/alice/character.toml"
        toml.write_text(toml.read_text(encoding="utf-8") + flatten_table, encoding="utf-8")
    return root


def set_flatten(root: Path, table: str) -> None:
    toml = root / "characters/alice/character.toml"
    text = toml.read_text(encoding="utf-8").split("[flatten]")[0]
    toml.write_text(text + table, encoding="utf-8")
