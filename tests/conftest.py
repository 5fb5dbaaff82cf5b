"""Shared fixtures: small projects made on the fly (no model weights, no network), and the
``extras`` marker: a test that needs an optional part skips, saying what to install, where it is
missing (the README installs only ``[test]``; ``.ci/run`` then adds the extras and runs
``pytest -m extras``)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _chromium_installed() -> bool:
    from chromium_cdp import find_chromium

    return find_chromium() is not None


#: ``@pytest.mark.extras(name)``: the optional parts tests may need, each with its check and how to get it
EXTRAS = {
    "ray": (lambda: importlib.util.find_spec("ray") is not None, "pip install -e \".[ray]\""),
    "chromium": (_chromium_installed, "Debian: apt-get install chromium; or set CHROMIUM=/path/to/chromium"),
}


#: Test modules that build projects, train on the CPU, sleep on purpose or start services:
#: marked ``slow``, so ``pytest -m "not slow"`` is the quick loop (about a minute and a half on
#: 2 cores) and plain ``pytest`` runs everything.
SLOW_MODULES = {
    "test_end_to_end", "test_graph", "test_report_graph", "test_stop", "test_gpulock", "test_train_runner",
    "test_observed", "test_builtin_trainer", "test_builtin_observe", "test_builtin_sdxl_train",
    "test_builtin_sdxl_step", "test_builtin_sdxl_network", "test_builtin_single_file", "test_builtin_precision",
    "test_ray_executor",
    "test_report_browser", "test_sd_scripts_real", "test_sd_scripts_sdxl_real", "test_lora_compress",
}


def missing_extras(names) -> list[str]:
    """The names of ``EXTRAS`` that are not installed here (KeyError for an unknown name)."""
    return [name for name in names if not EXTRAS[name][0]()]


def pytest_collection_modifyitems(config, items):
    """Mark the tests of ``SLOW_MODULES`` slow; skip, with what to install, every test marked
    ``extras(name, ...)`` whose extra is missing."""
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        for mark in item.iter_markers("extras"):
            for name in missing_extras(mark.args):
                item.add_marker(pytest.mark.skip(reason=f"needs the optional {name!r}, which is not installed "
                                                        f"({EXTRAS[name][1]})"))


def draw_picture(path: Path, code: str, size=(96, 96), seed: int = 0, mode: str = "RGBA") -> Path:
    """A small coded test picture: a shape that differs per code and seed, transparent around."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    h = int(code[2]) if code[2].isdigit() else 0
    v = int(code[1]) if code[1].isdigit() else 0
    w, ht = size
    d.ellipse([w * 0.2 + h * 2, ht * 0.1 + v * 3, w * 0.8, ht * 0.9], fill=(200 - seed * 10, 150, 120 + h * 10, 255))
    d.rectangle([w * 0.4, ht * 0.3, w * 0.4 + 4 + h, ht * 0.5], fill=(20, 20, 20 + seed, 255))
    if mode == "RGB":
        img = img.convert("RGB")
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        img.convert("RGB").save(path, quality=90)
    else:
        img.save(path)
    return path


def make_project(root: Path, *, sizes=(64, 96), characters=None, groups=None, project_extra: str = "") -> Path:
    """Write a small project: characters = {folder: {"keyword":..., "face": [codes], "outfits": {o: (kw, [codes])}}}."""
    characters = characters or {
        "alice": {"keyword": "alc", "face": ["f00", "f01", "f02"], "outfits": {"dress": ("alcdr", ["b00", "b01"])}},
        "bob": {"keyword": "bbo", "face": ["f00", "f03"], "outfits": {}},
    }
    chars = root / "characters"
    chars.mkdir(parents=True, exist_ok=True)
    (chars / "project.toml").write_text(
        "[dataset]\n"
        f"sizes = [{', '.join(str(s) for s in sizes)}]\n"
        "[training]\nvariants = [\"Lora1x1A1-AdamW8\"]\ndim = 4\n"
        "[trainer]\nbackend = \"fake\"\n" + project_extra,
        encoding="utf-8",
    )
    for name, spec in characters.items():
        folder = chars / name
        folder.mkdir(parents=True, exist_ok=True)
        text = f'keyword = "{spec["keyword"]}"\nclass = "girl"\ntags = {spec.get("tags", [])!r}\n'.replace("'", '"')
        text += f'background = "{spec.get("background", "black")}"\n[face]\nsteps = 5\n'
        for outfit, (kw, _codes) in spec.get("outfits", {}).items():
            text += f'[outfits."{outfit}"]\nkeyword = "{kw}"\nsteps = 5\n'
        (folder / "character.toml").write_text(text, encoding="utf-8")
        for i, code in enumerate(spec["face"]):
            draw_picture(folder / "face" / f"{code}.png", code, seed=i)
        for outfit, (kw, codes) in spec.get("outfits", {}).items():
            for i, code in enumerate(codes):
                draw_picture(folder / "outfits" / outfit / f"{code}.png", code, seed=i)
    if groups:
        text = ""
        for g, members in groups.items():
            text += f"[{g}]\nmembers = {members!r}\nsteps = 5\n".replace("'", '"')
        (chars / "groups.toml").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def reproducible_training():
    """A module's trainings repeat byte for byte: fixed metadata timestamps (``SOURCE_DATE_EPOCH``),
    one CPU thread (the trainer would take its threads from the load, and float sums with them),
    and the CPU even where a GPU is (``CHARBUILD_DEVICE``: GPU kernels need not repeat bit for bit)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SOURCE_DATE_EPOCH", "1700000000")
    mp.setenv("CHARBUILD_TORCH_THREADS", "1")
    mp.setenv("CHARBUILD_DEVICE", "cpu")
    yield
    mp.undo()


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project(tmp_path / "proj")


@pytest.fixture
def built(tmp_path) -> tuple[Path, set]:
    """(root, the tasks the first build ran) of :func:`make_project` with a group "duo", built once."""
    from graphtools import build

    root = make_project(tmp_path / "proj", groups={"duo": ["alice/dress"]})
    return root, build(root)


@pytest.fixture
def example_copy(tmp_path) -> Path:
    """A copy of the repo's example project (characters/ only)."""
    dst = tmp_path / "example"
    shutil.copytree(REPO / "characters", dst / "characters")
    return dst

