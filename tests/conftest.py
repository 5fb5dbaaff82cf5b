"""Shared fixtures: small projects made on the fly (no model weights, no network), and the
``extras`` marker: a test that needs an optional part skips, saying what to install, where it is
missing (the README installs only ``[test]``; ``.ci/run`` then adds the extras and runs
``pytest -m extras``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
FAKE_SD = Path(__file__).resolve().parent / "fake_sd_scripts"
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
    "test_samples_target", "test_cli_errors", "test_explore_demo",
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


def make_train_job(root: Path, *, preset="Lora3x3A50p-AdamW8", variant: str | None = None, lora: str = "krnk",
                   steps: int = 2, base: str = "tiny", vae: str | None = None, arch: str | None = None,
                   clip_skip: int = 2, backend: str = "builtin", trainer: dict | None = None, keywords=("krnk",),
                   inputs=(), output: str | None = None, continue_from: str | None = None, **params):
    """The one training-job builder of the tests: a :class:`~charbuild.train.job.TrainJob` of
    ``lora``/``variant`` under ``root`` (build/loras/<lora>/), its params resolved from ``preset``
    and ``params`` exactly as a project's variant table would be, the model ``base`` (``arch``
    read from a tiny name), and ``trainer`` fields for the :class:`TrainerSpec`. ``preset`` may
    also be a variant table (dict) or resolved ``TrainParams``. Nothing is written: the dataset
    and pictures are the caller's (:func:`make_tiny_dataset`, :func:`fake_backend_job`)."""
    from charbuild.train.job import ModelSpec, TrainerSpec, TrainJob
    from charbuild.train.variants import TrainParams, resolve_variant

    if isinstance(preset, TrainParams):
        resolved = preset
    else:
        table = preset if isinstance(preset, dict) else {"preset": preset}
        resolved = resolve_variant({"name": variant or table["preset"], **table, **params}, steps=steps)
    variant = variant or resolved.name
    vdir = root / "build" / "loras" / lora / variant
    arch = arch or ("sdxl" if base.startswith("tiny-sdxl") else "sd15")
    return TrainJob(
        lora=lora, kind="face", variant=variant, project_root=str(root),
        dataset_toml=str(root / "build" / "loras" / lora / "dataset.toml"),
        output=output or str(vdir / "raw.safetensors"), variant_dir=str(vdir),
        params=resolved, model=ModelSpec(base=base, vae=vae, arch=arch, clip_skip=clip_skip),
        trainer=TrainerSpec(backend=backend, **(trainer or {})),
        keywords=tuple(keywords), inputs=tuple(str(i) for i in inputs), continue_from=continue_from,
    )


def builtin_job(root: Path, network: str, variant: str, *, base: str = "tiny", **over):
    """A builtin job of LoRA krnk on a tiny model (over :func:`make_tiny_dataset` or
    :func:`make_tiny_sdxl_dataset`): dim 4, lr 1e-3, 2 steps; gradient checkpointing for Lora3x3
    on SD1.5 only. ``over``: any training setting."""
    sdxl = base.startswith("tiny-sdxl")
    settings = {"steps": 2, "gradient_checkpointing": network == "Lora3x3" and not sdxl, "dim": 4, "lr": 1e-3, **over}
    return make_train_job(root, preset=f"{network}A50p-AdamW8", variant=variant, base=base,
                          keywords=("krnk",) if sdxl else ("krnk", "kuroneko"), **settings)


SDXL_CAPTIONS = ("krnk, 1girl, blue eyes", "krnk, smile", "krnk, 1girl, blue eyes")


def make_tiny_dataset(root: Path) -> Path:
    """Prepared pictures for builtin trainings on ``tiny``: six 64/128 px images in two size folders
    with captions (one without), and the LoRA krnk's dataset TOML."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for size in (64, 128):
        d = root / "build" / "images" / "krnk" / "face" / str(size)
        d.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            a = (rng.random((size, size, 3)) * 255).astype("uint8")
            a[size // 4 : size // 2, :, 0] = 255 * (i % 2)  # some structure to learn
            Image.fromarray(a).save(d / f"f0{i}.png")
            if i < 2:  # the third image has no caption: class_tokens is used
                (d / f"f0{i}.txt").write_text(f"krnk, 1girl, {'blue eyes' if i else 'Red Eyes'}\n", encoding="utf-8")
    toml = """[general]
color_aug = true
enable_bucket = true
bucket_no_upscale = true
caption_extension = '.txt'
num_repeats = 2

[[datasets]]
resolution = [512, 512]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'build/images/krnk/face/64'
  class_tokens = 'krnk'
  flip_aug = true

  [[datasets.subsets]]
  image_dir = 'build/images/krnk/face/128'
  class_tokens = 'krnk'
  flip_aug = false
"""
    path = root / "build" / "loras" / "krnk" / "dataset.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml, encoding="utf-8")
    return path


def make_tiny_sdxl_dataset(root: Path) -> None:
    """Prepared pictures for builtin trainings on ``tiny-sdxl``: three small pictures (one 64x75:
    its crop ids differ when flipped), two distinct captions, and the LoRA krnk's dataset TOML."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    d = root / "build" / "images" / "krnk" / "face" / "64"
    d.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(((64, 64), (64, 75), (64, 64))):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(d / f"f0{i}.png")
        (d / f"f0{i}.txt").write_text(SDXL_CAPTIONS[i] + "\n", encoding="utf-8")
    toml = """[general]
enable_bucket = true
bucket_no_upscale = true
caption_extension = '.txt'

[[datasets]]
resolution = [512, 512]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'build/images/krnk/face/64'
  flip_aug = true
"""
    (root / "build" / "loras" / "krnk").mkdir(parents=True, exist_ok=True)
    (root / "build" / "loras" / "krnk" / "dataset.toml").write_text(toml, encoding="utf-8")


def fake_backend_job(root: Path, *, backend="fake", lora="k", variant="Lora3x3A50p-AdamW8", dim=4, gpus=(0,), **trainer):
    """A job for the fake backend (or sd-scripts' fake scripts) over a tiny project under ``root``
    (stand-in inputs and dataset TOML are created);
    ``fake_*`` knobs go into the fake backend's opaque ``trainer.extra``."""
    face = root / "characters" / lora / "face"
    face.mkdir(parents=True, exist_ok=True)
    inputs = []
    for stem in ("f00", "f01"):
        png, txt = face / f"{stem}.png", face / f"{stem}.txt"
        if not png.exists():
            png.write_bytes(b"\x89PNG fake " + stem.encode())
            txt.write_text(f"{lora}, white background, from front", encoding="utf-8")
        inputs += [str(png), str(txt)]
    lora_dir = root / "build" / "loras" / lora
    lora_dir.mkdir(parents=True, exist_ok=True)
    (lora_dir / "dataset.toml").write_text("[general]\nnum_repeats = 4\n", encoding="utf-8")
    model = root / "model.safetensors"
    model.touch()
    extra = {k: v for k, v in trainer.items() if k.startswith("fake_")}
    spec = {"gpus": tuple(gpus), "sd_scripts": str(FAKE_SD), "python": sys.executable, "accelerate": None,
            "lock_dir": str(root / "build" / "locks"), "kill_grace": 3, "extra": extra,
            **{k: v for k, v in trainer.items() if not k.startswith("fake_")}}
    job = make_train_job(root, lora=lora, variant=variant, steps=10, base=str(model), backend=backend, trainer=spec,
                         keywords=(lora, "girl"), inputs=inputs, dim=dim)
    return dataclasses.replace(job, signature_extra={"params": job.params.to_dict(), "backend": backend})


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, imported with benchmarks/ on ``sys.path`` as when the
    script is run, so that it imports its sibling scripts by name."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(name)


def wait_for(predicate, timeout=15.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out waiting")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``charbuild ARGS`` in this process: (exit code, stdout, stderr)."""
    from charbuild.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


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



@pytest.fixture
def with_gpus(monkeypatch):
    """This machine has NVIDIA GPUs as far as the runner's slots go (``[trainer] gpus`` are locked
    and shown to the trainer): for the fake trainers, which use none, on any machine."""
    from charbuild.train import hardware

    monkeypatch.setattr(hardware, "has_cuda_gpu", lambda: True)


@pytest.fixture
def without_gpu(monkeypatch):
    """No GPU, 4 cores and no thread count in the environment, as far as the runner's slots go."""
    from charbuild.train import hardware

    monkeypatch.setattr(hardware, "has_cuda_gpu", lambda: False)
    for var in hardware.THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hardware, "cpu_cores", lambda: 4)
