"""The incremental contract, through doit's API: which tasks run after each kind of edit."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import draw_picture, make_project
from graphtools import build, groups

V = "Lora1x1A1-AdamW8"


def file_digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted((root / "build").rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and "/locks/" not in rel and not p.name.startswith(".doit") and p.suffix in (".png", ".txt", ".toml", ".safetensors"):
            out[rel] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


def bump(path: Path) -> None:
    """Give ``path`` a new mtime (a later second) without changing its bytes."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_first_build_makes_every_target_and_second_runs_nothing(built):
    root, first = built
    g = groups(first)
    # alice: 3 face × 2 sizes, 2 body × 2 sizes; bob 2 face × 2 sizes
    assert len(g["image"]) == 14 and g["caption"] == g["image"]
    assert g["dataset"] == {"alc", "alcdr", "bbo", "duo"}
    assert g["preview"] == g["dataset"]
    assert g["train"] == {f"{n}/{V}" for n in ("alc", "alcdr", "bbo", "duo")}
    assert g["merge"] == g["train"] and g["compress"] == g["train"]
    assert (root / "build/images/alice/face/96/f00.png").exists()
    assert (root / "build/images/alice/face/96/f00.txt").read_text(encoding="utf-8").startswith("alc, white background")
    assert (root / f"build/loras/alcdr/{V}/alcdr-{V}.safetensors").exists()
    assert build(root) == set()


def test_touch_rebuilds_nothing(built):
    root, _ = built
    for p in (root / "characters").rglob("*.png"):
        bump(p)
    bump(root / "build/images/alice/face/96/f00.png")
    assert build(root) == set()


def test_editing_one_picture_rebuilds_only_what_uses_it(built):
    root, _ = built
    draw_picture(root / "characters/bob/face/f03.png", "f03", seed=7)
    ran = groups(build(root))
    assert ran["image"] == {"bob/face/f03@64", "bob/face/f03@96"}
    assert "caption" not in ran  # the caption comes from the code, not the pixels
    assert ran["preview"] == {"bbo"}
    assert ran["train"] == {f"bbo/{V}"} and ran["merge"] == ran["train"] and ran["compress"] == ran["train"]
    assert "dataset" not in ran


def test_editing_a_face_picture_retrains_face_body_and_group(built):
    root, _ = built
    draw_picture(root / "characters/alice/face/f01.png", "f01", seed=9)
    ran = groups(build(root))
    assert ran["train"] == {f"alc/{V}", f"alcdr/{V}", f"duo/{V}"}
    assert ran["preview"] == {"alc", "alcdr", "duo"}


def test_changing_tags_rebuilds_that_characters_captions(built):
    root, _ = built
    toml = root / "characters/bob/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("tags = []", 'tags = ["short hair"]'), encoding="utf-8")
    ran = groups(build(root))
    assert ran["caption"] == {"bob/face/f00@64", "bob/face/f00@96", "bob/face/f03@64", "bob/face/f03@96"}
    assert "image" not in ran and "dataset" not in ran
    assert ran["preview"] == {"bbo"} and ran["train"] == {f"bbo/{V}"}
    assert (root / "build/images/bob/face/64/f00.txt").read_text(encoding="utf-8").startswith("bbo, short hair, white background")


def test_changing_the_ladder(built):
    root, _ = built
    proj = root / "characters/project.toml"
    proj.write_text(proj.read_text(encoding="utf-8").replace("sizes = [64, 96]", "sizes = [48, 64, 96]"), encoding="utf-8")
    ran = groups(build(root))
    assert all(name.endswith("@48") for name in ran["image"]) and len(ran["image"]) == 7
    assert ran["caption"] == ran["image"]
    assert ran["dataset"] == {"alc", "alcdr", "bbo", "duo"}
    assert "[[datasets.subsets]]" in (root / "build/loras/alc/dataset.toml").read_text(encoding="utf-8")
    assert "build/images/alice/face/48" in (root / "build/loras/alc/dataset.toml").read_text(encoding="utf-8")


def test_deleting_one_target_rebuilds_just_it(built):
    root, _ = built
    (root / "build/images/alice/face/64/f00.png").unlink()
    assert build(root) == {"image:alice/face/f00@64"}
    (root / "build/loras/alc/dataset.toml").unlink()
    assert build(root) == {"dataset:alc"}


def test_adding_and_removing_pictures(built):
    root, _ = built
    draw_picture(root / "characters/bob/face/f12.png", "f12")
    ran = groups(build(root))
    assert {"bob/face/f12@64", "bob/face/f12@96"} <= ran["image"]
    assert "dataset" not in ran  # same folders: the TOML text is unchanged
    assert (root / "build/images/bob/face/64/f12.txt").exists()
    (root / "characters/bob/face/f12.png").unlink()
    ran = groups(build(root))
    assert not (root / "build/images/bob/face/64/f12.png").exists()
    assert not (root / "build/images/bob/face/64/f12.txt").exists()
    assert ran["train"] == {f"bbo/{V}"}


def test_removing_all_pictures_of_a_size_drops_it_from_the_toml(tmp_path):
    root = make_project(tmp_path / "p", sizes=(64, 128), characters={
        "a": {"keyword": "aa", "face": ["f00", "f01"], "outfits": {}}})
    draw_picture(root / "characters/a/face/f02.png", "f02", size=(160, 160))
    build(root)
    assert "build/images/a/face/128" in (root / "build/loras/aa/dataset.toml").read_text(encoding="utf-8")
    (root / "characters/a/face/f02.png").unlink()
    ran = groups(build(root))
    assert ran["dataset"] == {"aa"}
    assert "build/images/a/face/128" not in (root / "build/loras/aa/dataset.toml").read_text(encoding="utf-8")
    assert not (root / "build/images/a/face/128").exists()


def test_training_settings_retrain_only_that_lora(built):
    root, _ = built
    toml = root / "characters/bob/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\nsteps = 5", "[face]\nsteps = 6"), encoding="utf-8")
    ran = groups(build(root))
    assert ran.pop("report") == {""}  # the report page shows these settings and files
    assert ran == {"train": {f"bbo/{V}"}, "merge": {f"bbo/{V}"}, "compress": {f"bbo/{V}"}}


def test_merge_weights_never_retrain(built):
    root, _ = built
    proj = root / "characters/project.toml"
    proj.write_text(proj.read_text(encoding="utf-8") + '[merge]\nface = "ALL"\n', encoding="utf-8")
    ran = groups(build(root))
    assert ran.pop("report") == {""}  # the report page shows these settings and files
    assert ran == {"merge": {f"alc/{V}", f"bbo/{V}"}, "compress": {f"alc/{V}", f"bbo/{V}"}}


def test_compression_ratio_only_recompresses(built):
    root, _ = built
    proj = root / "characters/project.toml"
    proj.write_text(proj.read_text(encoding="utf-8") + "[compress]\nsv_ratio = 8\n", encoding="utf-8")
    ran = groups(build(root))
    assert ran.pop("report") == {""}  # the report page shows these settings and files
    assert ran == {"compress": {f"alc/{V}", f"alcdr/{V}", f"bbo/{V}", f"duo/{V}"}}


def test_moving_the_project_does_not_retrain(built, tmp_path):
    root, _ = built
    moved = tmp_path / "moved"
    shutil.move(str(root), str(moved))
    ran = groups(build(moved))
    assert "train" not in ran


def test_lost_database_does_not_retrain(built):
    root, _ = built
    for db in (root / "build").glob(".doit.db*"):
        db.unlink()
    ran = groups(build(root))
    assert "train" not in ran


def test_aliases_build_one_character_or_lora(tmp_path):
    root = make_project(tmp_path / "p")
    ran = groups(build(root, "bob"))
    assert {n.split("/")[0] for n in ran["image"]} == {"bob"}
    assert ran["train"] == {f"bbo/{V}"}
    ran = groups(build(root, "alcdr"))
    assert ran["train"] == {f"alcdr/{V}"} and ran["dataset"] == {"alcdr"}


def run_cli(root: Path, *args: str) -> list[str]:
    """Run ``charbuild build`` in a fresh process; return the names of the tasks that ran.

    A fresh process matters for ``-n``: doit forks its workers, and forking a process
    that already runs torch's thread pool (as pytest's does after a serial build) can hang.
    """
    proc = subprocess.run([sys.executable, "-m", "charbuild.cli", "build", "--root", str(root), *args],
                          capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line[3:] for line in proc.stdout.splitlines() if line.startswith(".  ")]


def test_parallel_build_gives_the_same_files(tmp_path):
    serial = make_project(tmp_path / "serial", groups={"duo": ["alice/dress"]})
    parallel = make_project(tmp_path / "parallel", groups={"duo": ["alice/dress"]})
    build(serial)
    ran = run_cli(parallel, "-n", "4")
    assert len([n for n in ran if n.startswith("train:")]) == 4
    assert file_digests(serial) == file_digests(parallel)
    assert run_cli(parallel, "-n", "2") == []


def test_japanese_and_spaced_names_build(tmp_path):
    root = make_project(tmp_path / "プロジェクト dir", characters={
        "黒猫 ちゃん": {"keyword": "krnk", "face": ["f00", "f12"], "outfits": {"制服 夏": ("krnksf", ["b00"])}},
    })
    ran = groups(build(root))
    assert "黒猫 ちゃん/制服 夏/b00@96" in ran["image"]
    toml = (root / "build/loras/krnksf/dataset.toml").read_text(encoding="utf-8")
    assert "build/images/黒猫 ちゃん/制服 夏/96" in toml
    assert build(root) == set()


def test_reverting_a_setting_restores_the_earlier_training(tmp_path):
    root = make_project(tmp_path / "p", project_extra='[trainer.extra]\nfake_record = "record.jsonl"\n')
    build(root)
    record = root / "record.jsonl"
    trained = len(record.read_text(encoding="utf-8").splitlines())
    raw = root / f"build/loras/bbo/{V}/raw.safetensors"
    first = raw.read_bytes()
    toml = root / "characters/bob/character.toml"
    original = toml.read_text(encoding="utf-8")
    toml.write_text(original.replace("[face]\nsteps = 5", "[face]\nsteps = 6"), encoding="utf-8")
    build(root)
    assert len(record.read_text(encoding="utf-8").splitlines()) == trained + 1
    toml.write_text(original, encoding="utf-8")
    ran = groups(build(root))
    assert ran["train"] == {f"bbo/{V}"}  # the task ran ...
    assert len(record.read_text(encoding="utf-8").splitlines()) == trained + 1  # ... but trained nothing
    assert raw.read_bytes() == first
    assert "compress" in ran or "merge" in ran


#: ``python -m doit train`` with the workers of ``doit -n`` started by ``start_method``: "spawn"
#: is Windows' and macOS's, where each worker imports the project's dodo.py again.
DOIT_WITH_START_METHOD = """import multiprocessing, sys
if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    sys.argv = ["doit", "train"]
    from doit.__main__ import main
    sys.exit(main())
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"] if sys.platform != "win32" else ["spawn"])
def test_plain_doit_without_a_gpu_trains_cpu_trainings_side_by_side(tmp_path, start_method):
    """``[trainer] cpu_trainings = 2`` on a machine with no GPU: a plain ``doit`` (no ``-n``) runs
    two tasks at once and two trainings overlap, each told its share of the cores; with spawned
    workers too (they once each tried to take the build's lock and stopped the build)."""
    import json

    root = make_project(tmp_path / "p", project_extra='cpu_trainings = 2\n[trainer.extra]\nfake_seconds = 1.5\n'
                                                      'fake_record = "record.jsonl"\n')
    (root / "dodo.py").write_text("from charbuild.dodo import *  # noqa\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("CHARBUILD_TORCH_THREADS", "OMP_NUM_THREADS")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU here, on any machine
    (root / "run_doit.py").write_text(DOIT_WITH_START_METHOD, encoding="utf-8")
    proc = subprocess.run([sys.executable, "run_doit.py", start_method], cwd=root, env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)  # a stuck build (the spawn bug hung) fails
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = sorted((json.loads(line) for line in (root / "record.jsonl").read_text().splitlines()),
                  key=lambda r: r["start"])
    assert len(recs) == 3 and all(r["ok"] for r in recs)
    assert recs[1]["start"] < recs[0]["end"]  # two at once
    assert recs[2]["start"] >= min(r["end"] for r in recs[:2])  # never three
    logs = "".join(p.read_text(encoding="utf-8") for p in (root / "build/loras").glob("*/*/train.log"))
    assert logs.count("of [trainer] cpu_trainings = 2") == 3
