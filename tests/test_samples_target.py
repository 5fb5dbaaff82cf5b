"""Samples on demand: ``samples:<lora>/<variant>`` renders the last row of samples of a trained
LoRA without retraining it, and ``charbuild train --force`` retrains an up-to-date LoRA.

A real builtin training on the tiny model (CPU, a few steps), then the real renderer.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from conftest import make_project  # noqa: E402
from graphtools import build, groups  # noqa: E402

from charbuild.codes import TEMPLATE_CODES  # noqa: E402

V = "Lora1x1A1-AdamW8"
STEPS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory, reproducible_training):
    """A one-LoRA project trained by the builtin trainer with sampling off."""
    root = make_project(tmp_path_factory.mktemp("samples") / "p", sizes=(64,),
                        characters={"bob": {"keyword": "bbo", "face": ["f00", "f01"], "outfits": {}}})
    toml = root / "characters/project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace('backend = "fake"', 'backend = "builtin"')
                    .replace("dim = 4", f"dim = 4\nsteps = {STEPS}\nsample_steps = 1\nsample_size = 64"),
                    encoding="utf-8")
    (root / "characters/bob/character.toml").write_text(
        'keyword = "bbo"\n[face]\n', encoding="utf-8")  # the project's steps
    ran = groups(build(root))
    assert ran["train"] == {f"bbo/{V}"} and "samples" not in ran
    return root


def _turn_sampling_on(root, prompts: str = "") -> None:
    toml = root / "characters/project.toml"
    text = toml.read_text(encoding="utf-8").replace("sample_every = 1\n", "").replace("sample_prompts = ", "#")
    toml.write_text(text.replace("[training]\n", f"[training]\nsample_every = 1\n{prompts}"), encoding="utf-8")


def test_turning_sampling_on_renders_samples_of_the_trained_lora_without_retraining(trained, capsys):
    from charbuild.status import stale_tasks

    root = trained
    raw = root / f"build/loras/bbo/{V}/raw.safetensors"
    before = raw.read_bytes()
    _turn_sampling_on(root)
    stale = [name for name, _ in stale_tasks(root)]
    assert stale == [f"samples:bbo/{V}"], stale  # nothing else: the training is up to date
    ran = groups(build(root))
    assert ran == {"samples": {f"bbo/{V}"}, "report": {""}}  # and the page that shows them
    assert raw.read_bytes() == before
    row = root / f"build/loras/bbo/{V}/samples/{STEPS}"
    assert sorted(p.stem for p in row.iterdir()) == sorted(TEMPLATE_CODES["f"])
    with Image.open(row / "f00.png") as im:
        assert im.size[0] == im.size[1] and im.text["parameters"].startswith("bbo, ")
        assert "Seed: 31337," in im.text["parameters"]
    assert build(root) == set()  # up to date now


def test_new_prompts_render_again_and_the_training_s_own_samples_are_kept(trained):
    root = trained
    _turn_sampling_on(root, 'sample_prompts = ["bbo, sitting"]\n')
    assert groups(build(root)) == {"samples": {f"bbo/{V}"}, "report": {""}}
    row = root / f"build/loras/bbo/{V}/samples/{STEPS}"
    with Image.open(row / "p1.png") as im:
        assert im.text["parameters"].startswith("bbo, sitting\n")
    stamp = (row / "f00.png").stat().st_mtime_ns
    # a training that samples writes this row itself: the samples task then keeps it
    ran = groups(build_forced(root))
    assert ran["train"] == {f"bbo/{V}"}  # the same bytes (a reproducible training): samples: is up to date
    assert build(root, f"samples:bbo/{V}") == set()
    from charbuild.dodo import project_graph, forget_loaded_projects
    from charbuild.train.samples_action import current

    forget_loaded_projects()
    g = project_graph(root)
    lora = g.project.loras["bbo"]
    assert current(g.train_job(lora, g.variants(lora)[0]))  # what the action keeps instead of rendering again
    assert (row / "f00.png").stat().st_mtime_ns != stamp  # the training's own, not the old file
    assert (root / f"build/loras/bbo/{V}/samples/1").is_dir()  # and every sample point of it


def build_forced(root):
    """``charbuild train --force bbo`` as the command runs it, recording what ran."""
    import io

    from graphtools import EXECUTED, RecordingReporter

    from charbuild.dodo import run_doit

    EXECUTED.clear()
    code = run_doit(root, ["run", f"train:bbo/{V}", f"samples:bbo/{V}"], force_train=frozenset({f"bbo/{V}"}),
                    extra_config={"reporter": RecordingReporter, "outfile": io.StringIO()})
    assert code == 0
    return set(EXECUTED)


def test_train_force_retrains_an_up_to_date_lora_and_not_from_the_run_cache(trained, capsys):
    from charbuild.cli import main

    root = trained
    build(root)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--root", str(root), "bbo"])  # up to date: nothing to do, and how to train anyway
    assert exit_.value.code == 0
    said = capsys.readouterr().out
    assert "nothing to do: everything is up to date" in said and "`charbuild train --force LORA`" in said, said
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--force", "--root", str(root), "bbo"])
    assert exit_.value.code == 0
    out = capsys.readouterr()
    assert f"training bbo/{V}" in out.out + out.err and "restored" not in out.out + out.err


def test_the_fake_backend_s_stand_in_loras_get_stand_in_samples(tmp_path):
    root = make_project(tmp_path / "p")
    assert "samples" not in groups(build(root))  # sampling off: no samples targets
    toml = root / "characters/project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("dim = 4\n", "dim = 4\nsample_every = 5\n"), encoding="utf-8")
    ran = groups(build(root))
    assert "train" not in ran and ran["samples"] == {f"alc/{V}", f"alcdr/{V}", f"bbo/{V}"}
    with Image.open(root / f"build/loras/bbo/{V}/samples/5/f00.png") as im:
        assert im.text["parameters"].startswith("bbo, ") and "Seed: 31337," in im.text["parameters"]
    assert build(root) == set()
