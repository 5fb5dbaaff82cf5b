"""Samples and loss logs of a training, without torch: the prompt rules, the fake trainer's
files, the runner landing them in the variant folder, the run cache, and sd-scripts' samples."""

from __future__ import annotations

import dataclasses

import sys
from pathlib import Path

import pytest

from charbuild.captions import TagRules, caption_text
from charbuild.codes import TEMPLATE_CODES
from charbuild.report.metrics import read_metrics
from charbuild.sample_prompts import (
    SamplePrompt,
    sample_set,
    sample_steps_due,
    sd_scripts_prompt_file,
    sd_scripts_sample_name,
)
from charbuild.train.job import TrainJob
from charbuild.train.runner import run_training
from charbuild.train.sdscripts_command import build_command, collect_samples, sample_args, sample_prompts_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import fake_backend_job as make_job  # noqa: E402


# ------------------------------------------------------------------ prompt rules (pure)


def test_face_loras_sample_the_face_template_with_the_caption_rules():
    samples = sample_set("face", ["krnk", "girl"])
    assert [s.name for s in samples] == list(TEMPLATE_CODES["f"])
    assert [s.index for s in samples] == list(range(15))
    assert samples[0].prompt == caption_text("f00", ["krnk", "girl"])
    assert "from above" in samples[5].prompt and "from behind" in samples[8].prompt


@pytest.mark.parametrize("kind", ["body", "group"])
def test_body_and_group_loras_sample_the_body_codes(kind):
    assert [s.name for s in sample_set(kind, ["k"])] == list(TEMPLATE_CODES["b"])


def test_a_group_lora_samples_each_member_with_its_own_trigger_words():
    """One picture per body code per member, prompted as the member's own captions (its body
    LoRA's samples) are; seeds run on, so no two samples share one."""
    members = [("kuro/school", ["krnksf", "krnk"]), ("cha/suit", ["tyankps", "tyank"])]
    samples = sample_set("group", ["krnksf", "tyankps", "krnk", "tyank"], extra=["krnksf, tyankps"], members=members)
    codes = list(TEMPLATE_CODES["b"])
    assert [s.name for s in samples] == [f"kuro/school/{c}" for c in codes] + [f"cha/suit/{c}" for c in codes] + ["p1"]
    assert [s.index for s in samples] == list(range(31))
    body = sample_set("body", ["tyankps", "tyank"])
    assert [s.prompt for s in samples[15:30]] == [s.prompt for s in body]
    assert samples[0].prompt.startswith("krnksf, krnk, ") and "tyank" not in samples[0].prompt


def test_user_prompts_follow_and_project_rules_apply():
    rules = TagRules(expression=("smile",))
    samples = sample_set("face", ["k"], rules, extra=["k, sitting", "  ", "k, running"])
    assert [(s.name, s.prompt, s.index) for s in samples[-2:]] == [("p1", "k, sitting", 15), ("p2", "k, running", 16)]
    assert samples[0].prompt.endswith("looking at viewer, smile")
    assert samples[16].seed(100) == 116
    with pytest.raises(ValueError, match="unknown LoRA kind"):
        sample_set("hand", ["k"])


def test_sample_steps_are_every_n_and_the_last():
    assert [s for s in range(1, 11) if sample_steps_due(s, 4, 10)] == [4, 8, 10]
    assert not any(sample_steps_due(s, None, 10) for s in range(1, 11))


def test_sd_scripts_prompt_file_and_its_file_names():
    samples = (SamplePrompt("f00", "k, line\nbreak --n sneaky", 0), SamplePrompt("p1", "k, smile", 1))
    text = sd_scripts_prompt_file(samples, seed=7, width=512, height=768, steps=20)
    assert text.splitlines() == ["k, line break -n sneaky --w 512 --h 768 --d 7 --s 20 --l 7.5",
                                 "k, smile --w 512 --h 768 --d 8 --s 20 --l 7.5"]
    assert sd_scripts_sample_name("k-v_000100_01_20260101120000_8.png", "k-v", samples) == (100, "p1")
    assert sd_scripts_sample_name("k-v_000100_00_20260101120000.png", "k-v", samples) == (100, "f00")
    assert sd_scripts_sample_name("k-v_000100_05_20260101120000_8.png", "k-v", samples) is None  # no such line
    assert sd_scripts_sample_name("other_000100_00_20260101120000.png", "k-v", samples) is None


def test_the_graphs_sample_set_travels_in_the_job(tmp_path):
    job = make_job(tmp_path)
    j = dataclasses.replace(job, sample_set=(("f00", "k, custom rule"),))
    assert j.sample_set == (("f00", "k, custom rule"),)
    assert TrainJob.from_dict(j.to_dict()) == j


# ------------------------------------------------------------------ fake trainer + runner


def _with(job, **params):
    """``job`` with some params changed, and its signature as the graph makes it."""
    from charbuild.train.job import signature_params

    job = job.with_params(**params)
    return dataclasses.replace(job, signature_extra={**job.signature_extra, "params": signature_params(job.params)})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fake_training_lands_samples_and_metrics_and_the_run_cache_keeps_them(tmp_path):
    job = _with(make_job(tmp_path), sample_every=4, validation_every=5)
    vdir = Path(job.variant_dir)
    run_training(job, echo=False)
    samples = _files(vdir / "samples")
    assert sorted({k.split("/")[0] for k in samples}) == ["10", "4", "8"]  # every 4 steps and the last
    assert sorted(k.split("/")[1] for k in samples if k.startswith("4/")) == [f"{c}.png" for c in sorted(TEMPLATE_CODES["f"])]
    log = read_metrics(vdir / "metrics.jsonl")
    assert [s for s, _ in log.loss] == list(range(1, 11)) and [s for s, _ in log.val_loss] == [0, 5, 10]
    assert not list(vdir.glob(".train-*")) and not list(vdir.glob(".samples-old-*"))

    # a training without samples replaces the old ones: they showed another LoRA
    plain = _with(make_job(tmp_path), steps=3)
    run_training(plain, echo=False)
    assert not (vdir / "samples").exists()
    assert [s for s, _ in read_metrics(vdir / "metrics.jsonl").loss] == [1, 2, 3]

    # the first settings again: the run cache restores the LoRA and what it showed
    run_training(job, echo=False)
    assert _files(vdir / "samples") == samples
    assert [s for s, _ in read_metrics(vdir / "metrics.jsonl").val_loss] == [0, 5, 10]


def test_a_run_cache_entry_without_observations_says_so_and_removes_the_old(tmp_path, capsys):
    job = _with(make_job(tmp_path), sample_every=5)
    run_training(job, echo=False)
    cache = tmp_path / "build" / "cache" / "trained"
    for folder in cache.glob("*.observed"):
        import shutil

        shutil.rmtree(folder)  # as a cache filled before it kept them
    run_training(_with(job, steps=2), echo=False)
    run_training(job, echo=True)
    vdir = Path(job.variant_dir)
    assert "samples and loss log were not kept" in capsys.readouterr().out
    assert not (vdir / "samples").exists() and not (vdir / "metrics.jsonl").exists()


def test_samples_are_not_in_the_signature(tmp_path):
    from charbuild.train.job import signature_params
    from charbuild.train.variants import resolve_variant

    a = resolve_variant("Lora3x3A50p-AdamW8", steps=10)
    b = a.with_values(sample_every=5, sample_prompts=("x",), sample_size=256, sample_steps=8, validation_every=2)
    assert signature_params(a) == signature_params(b)


# ------------------------------------------------------------------ sd-scripts


def test_sd_scripts_command_samples_through_a_prompt_file(tmp_path):
    job = _with(make_job(tmp_path, backend="sd-scripts"), sample_every=3, sample_steps=12)
    assert sample_args(make_job(tmp_path, backend="sd-scripts")) == []
    cmd = build_command(job)
    assert f"--sample_prompts={sample_prompts_path(job)}" in cmd
    assert "--sample_every_n_steps=3" in cmd and "--sample_sampler=ddim" in cmd and "--sample_at_first" in cmd


def test_sd_scripts_samples_are_collected_into_samples_step_code(tmp_path):
    """The fake sd-scripts reads the prompt file and names its files as sd-scripts does."""
    job = _with(make_job(tmp_path, backend="sd-scripts"), sample_every=4, sample_prompts=["k, smile"])
    run_training(job, echo=False)
    vdir = Path(job.variant_dir)
    names = sorted(_files(vdir / "samples"))
    assert names == sorted(f"{step}/{n}.png" for step in (0, 4, 8) for n in (*TEMPLATE_CODES["f"], "p1"))
    assert not (vdir / "sample").exists()


def test_an_sd_scripts_training_gets_metrics_from_its_tensorboard_log_and_samples(tmp_path):
    """sd-scripts logs to TensorBoard only: its losses and the identity of its samples (step 0
    included) become metrics.jsonl, so the report draws its curves and its identity before -> after."""
    from PIL import Image

    job = _with(make_job(tmp_path, backend="sd-scripts"), sample_every=4)
    pictures = tmp_path / "build/images/k/face/64"
    pictures.mkdir(parents=True)
    for i, code in enumerate(("f00", "f01")):  # prepared pictures: what a sample is scored against
        img = Image.new("RGB", (64, 64), (0, 0, 0))
        img.paste((200, 40 * i, 90), (16, 8, 48, 60))
        img.save(pictures / f"{code}.png")
    job = dataclasses.replace(job, inputs=(str(pictures / "f00.png"), str(pictures / "f01.png")))
    run_training(job, echo=False)
    log = read_metrics(Path(job.variant_dir) / "metrics.jsonl")
    assert [s for s, _ in log.loss] == list(range(1, int(job.params.steps) + 1))
    assert abs(log.loss[0][1] - 0.5) < 1e-6  # the fake's loss at step 1: 1 / (1 + 1)
    assert sorted(log.identity_codes["k/face"]) == [0, 4, 8]
    assert set(log.identity_codes["k/face"][0]) == {"f00", "f01"}


def test_collect_samples_ignores_other_files(tmp_path):
    job = _with(make_job(tmp_path, backend="sd-scripts"), sample_every=4)
    out = Path(job.output).parent
    (out / "sample").mkdir(parents=True)
    (out / "sample" / f"{job.title}_000004_00_20260101000000_1.png").write_bytes(b"png")
    (out / "sample" / "notes.txt").write_text("x", encoding="utf-8")
    assert collect_samples(job) == [out / "samples" / "4" / "f00.png"]


# ------------------------------------------------------------------ the graph


def test_a_project_samples_with_its_caption_rules_and_samples_never_retrain(tmp_path):
    from conftest import make_project
    from graphtools import build

    from charbuild.config import load_project
    from charbuild.tasks import Graph

    root = make_project(tmp_path / "proj", project_extra='[captions]\nexpression = ["smile"]\n')
    first = build(root)
    assert any(name.startswith("train:") for name in first)
    toml = root / "characters" / "project.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("dim = 4\n", "dim = 4\nsample_every = 2\n"
                                                               "sample_prompts = [\"alc, sitting\"]\n"), encoding="utf-8")
    graph = Graph(load_project(root))
    job = next(graph.train_job(lora, p) for lora in graph.project.loras.values() if lora.name == "alc"
               for p in graph.variants(lora))
    names = [n for n, _ in job.sample_set]
    assert names == [*TEMPLATE_CODES["f"], "p1"]
    assert dict(job.sample_set)["f00"].endswith("looking at viewer, smile")  # the project's rule
    assert dict(job.sample_set)["p1"] == "alc, sitting"

    ran = build(root)
    assert not any(name.startswith("train:") for name in ran)  # samples never make a LoRA stale
    assert build(root) == set()


# ------------------------------------------------------------------ metrics writer, landing


def test_metrics_writer_lines_are_what_the_report_reads_and_skip_non_finite_values(tmp_path):
    from charbuild.train.metrics import MetricsWriter

    with MetricsWriter(tmp_path) as m:
        m.validation(0, 0.5)
        m.step(1, 0.25, 1e-4)
        m.step(2, float("nan"), 1e-4)  # a NaN would make the whole log unreadable: left out
        m.step(3, 0.125, float("inf"))
    log = read_metrics(tmp_path / "metrics.jsonl")
    assert log.loss == [(1, 0.25), (3, 0.125)] and log.val_loss == [(0, 0.5)] and log.lr == [(1, 1e-4)]
    with MetricsWriter(tmp_path) as m:  # a new training starts a new log
        m.step(1, 0.3)
    assert read_metrics(tmp_path / "metrics.jsonl").loss == [(1, 0.3)]


def test_land_swaps_the_samples_folder_and_leaves_nothing_behind(tmp_path):
    from charbuild.train.observed import land

    vdir, temp = tmp_path / "v", tmp_path / "v" / ".train-x"
    (vdir / "samples" / "5").mkdir(parents=True)
    (vdir / "samples" / "5" / "f00.png").write_bytes(b"old")
    (temp / "samples" / "10").mkdir(parents=True)
    (temp / "samples" / "10" / "f00.png").write_bytes(b"new")
    (temp / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n', encoding="utf-8")
    assert land(temp, vdir) == ["metrics.jsonl", "samples"]
    assert _files(vdir / "samples") == {"10/f00.png": b"new"}
    assert sorted(p.name for p in vdir.iterdir()) == [".train-x", "metrics.jsonl", "samples"]
    assert not (temp / "samples").exists()
