"""The typed training job, the backend registry and the build layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from charbuild import layout
from charbuild.errors import TrainingError
from charbuild.layout import Layout
from charbuild.train.backends import (
    Backend,
    Capabilities,
    PythonModuleBackend,
    backend_names,
    check_capabilities,
    get_backend,
    register,
)
from charbuild.train.job import ModelSpec, TrainerSpec, TrainJob, job_specs, scheduler_in_effect
from charbuild.train.variants import resolve_variant
from conftest import make_project

FAKE_SD = Path(__file__).resolve().parent / "fake_sd_scripts"


def make_job(root: Path, preset="Lora3x3A50p-AdamW8", **params) -> TrainJob:
    p = resolve_variant({"name": "V", "preset": preset, **params}, steps=100)
    vdir = root / "build" / "loras" / "krnk" / "V"
    return TrainJob(
        lora="krnk", kind="face", variant="V", project_root=str(root),
        dataset_toml=str(root / "build" / "loras" / "krnk" / "dataset.toml"),
        output=str(vdir / "raw.safetensors"), variant_dir=str(vdir), params=p,
        model=ModelSpec(base=str(root / "m.safetensors"), clip_skip=1),
        trainer=TrainerSpec(backend="sd-scripts", sd_scripts=str(FAKE_SD), accelerate=None, python="python"),
        keywords=("krnk", "girl"),
    )


# --------------------------------------------------------------------------- the job


def test_json_round_trip_is_exact(tmp_path):
    job = make_job(tmp_path).with_trainer(extra={"fake_seconds": 0.5})
    text = job.to_json()
    assert TrainJob.from_dict(json.loads(text)) == job
    (tmp_path / "job.json").write_text(text, encoding="utf-8")
    assert TrainJob.from_json(tmp_path / "job.json") == job


def test_clip_skip_comes_from_the_model_unless_the_variant_sets_one(tmp_path):
    assert make_job(tmp_path).params.clip_skip == 1
    assert make_job(tmp_path, clip_skip=3).params.clip_skip == 3


def test_unknown_and_missing_fields_are_named(tmp_path):
    d = make_job(tmp_path).to_dict()
    d["trainer"]["fake_seconds"] = 1  # a backend knob outside trainer.extra
    with pytest.raises(TrainingError, match="unknown trainer field.*fake_seconds"):
        TrainJob.from_dict(d)
    d = make_job(tmp_path).to_dict()
    del d["params"]
    with pytest.raises(TrainingError, match="no 'params'"):
        TrainJob.from_dict(d)
    with pytest.raises(TrainingError, match="cannot read the training job"):
        TrainJob.from_json(tmp_path / "missing.json")


def test_the_graph_builds_one_typed_job_with_absolute_paths(tmp_path):
    from charbuild.config import load_project
    from charbuild.tasks import Graph

    root = make_project(tmp_path / "p")
    g = Graph(load_project(root))
    lora = g.project.loras["alc"]
    (params,) = g.variants(lora)
    job = g.train_job(lora, params)
    assert isinstance(job, TrainJob) and job.backend == "fake"
    assert Path(job.output) == Layout(root).path(layout.raw_lora("alc", params.name))
    assert all(Path(p).is_absolute() for p in (job.output, job.variant_dir, job.dataset_toml, *job.inputs))
    assert job.trainer.lock_dir == str(Layout(root).locks_dir) and job.trainer.extra == {}
    assert job.params.clip_skip == 2  # the model's
    assert job.signature_extra["params"]["clip_skip"] is None  # the signature keeps what the user set
    assert TrainJob.from_dict(json.loads(job.to_json())) == job


def test_job_specs_make_model_and_trainer_paths_absolute(tmp_path):
    class P:
        model = {"base": "models/base.safetensors", "vae": None, "arch": "sd15", "clip_skip": 2}
        trainer = {"backend": "sd-scripts", "gpus": [1, 2], "sd_scripts": "sd", "python": None,
                   "accelerate": "accelerate", "xformers": True, "extra_args": ["--x"], "run_cache": False,
                   "extra": {"k": 1}}

    model, trainer = job_specs(P, Layout(tmp_path))
    root = tmp_path.resolve()
    assert model == ModelSpec(base=str(root / "models/base.safetensors"), vae=None, arch="sd15", clip_skip=2)
    assert trainer.sd_scripts == str(root / "sd") and trainer.gpus == (1, 2) and trainer.extra == {"k": 1}
    assert trainer.lock_dir == str(root / "build" / "locks") and not trainer.run_cache and trainer.xformers
    for demo in ("tiny", "tiny:3", "tiny-sdxl", "tiny-sdxl:2"):  # built-in model names stay names
        P.model = dict(P.model, base=demo)
        assert job_specs(P, Layout(tmp_path))[0].base == demo


# --------------------------------------------------------------------------- backends agree


def _sd_scripts_settings(job: TrainJob) -> dict:
    """What sd-scripts would train with, read back from its command line (its own defaults applied)."""
    from charbuild.train.sdscripts_command import build_command

    flags = dict(a[2:].split("=", 1) for a in build_command(job) if a.startswith("--") and "=" in a)
    i = build_command(job).index(f"--optimizer_type={job.params.optimizer}")
    args = build_command(job)[i + 2:] if build_command(job)[i + 1:i + 2] == ["--optimizer_args"] else []
    relative = flags["optimizer_type"].lower() == "adafactor" and "relative_step=False" not in args
    return {
        "seed": int(flags["seed"]),
        "mixed_precision": flags["mixed_precision"],
        "optimizer": flags["optimizer_type"].lower(),
        # sd-scripts: constant when --lr_scheduler is missing; adafactor's own under relative_step
        "scheduler": "adafactor" if relative else flags.get("lr_scheduler", "constant"),
    }


def _builtin_settings(job: TrainJob) -> dict:
    from charbuild.train.builtin.trainer import resolve_setup

    setup = resolve_setup(job)
    return {"seed": setup.seed, "mixed_precision": setup.mixed_precision, "optimizer": setup.optimizer,
            "scheduler": setup.scheduler}


def _fake_settings(job: TrainJob) -> dict:
    from charbuild.train.fake_trainer import fake_lora_metadata

    md = fake_lora_metadata(job.params.to_dict(), name=job.title)
    return {"seed": int(md["ss_seed"]), "mixed_precision": md["ss_mixed_precision"],
            "optimizer": md["ss_optimizer"].lower(), "scheduler": md["ss_lr_scheduler"]}


@pytest.mark.parametrize("variant", [
    {"preset": "Lora3x3A50p-AdamW8"},
    {"preset": "LohaA1-AdaFactor"},
    {"preset": "Lora1x1A1-AdaFactor", "optimizer_args": ["relative_step=False"], "lr": 1e-4},
    {"preset": "LoconA50p-AdamW8", "seed": 7, "mixed_precision": "bf16", "scheduler": "linear", "optimizer": "AdamW"},
], ids=["AdamW8", "AdaFactor", "AdaFactor-fixed-lr", "explicit"])
def test_every_backend_trains_a_job_with_the_same_seed_precision_optimizer_and_scheduler(tmp_path, variant):
    job = make_job(tmp_path, **variant)
    settings = {"sd-scripts": _sd_scripts_settings(job), "builtin": _builtin_settings(job), "fake": _fake_settings(job)}
    assert settings["builtin"] == settings["sd-scripts"] == settings["fake"], settings
    p = job.params
    assert settings["builtin"]["scheduler"] == scheduler_in_effect(p.optimizer, p.optimizer_args, p.scheduler)


# --------------------------------------------------------------------------- the registry


def test_registry_has_the_three_backends_and_names_unknown_ones():
    assert set(backend_names()) >= {"builtin", "sd-scripts", "fake"}
    assert all(isinstance(get_backend(n), Backend) for n in ("builtin", "sd-scripts", "fake"))
    with pytest.raises(TrainingError, match="unknown trainer backend 'fak'.*did you mean 'fake'"):
        get_backend("fak")


def test_capabilities_refuse_what_a_backend_cannot_train(tmp_path):
    job = make_job(tmp_path)
    sdxl = TrainJob.from_dict({**job.to_dict(), "model": {**job.model.to_dict(), "arch": "sdxl"}})
    check_capabilities(get_backend("sd-scripts"), sdxl)
    check_capabilities(get_backend("builtin"), sdxl)  # the builtin trains SDXL too
    sd3 = TrainJob.from_dict({**job.to_dict(), "model": {**job.model.to_dict(), "arch": "sd3"}})
    with pytest.raises(TrainingError, match="backend 'builtin' cannot train krnk/V: architecture 'sd3'"):
        check_capabilities(get_backend("builtin"), sd3)


def runnable_job(root: Path, **trainer) -> TrainJob:
    """:func:`make_job` under ``root`` as the runner runs it: one input file, the project's
    lock folder, and ``trainer`` (``backend=…``, ``executor=…``) set."""
    (root / "build" / "loras" / "krnk").mkdir(parents=True)
    inp = root / "a.txt"
    inp.write_text("krnk, girl", encoding="utf-8")
    job = make_job(root).with_trainer(lock_dir=str(root / "build" / "locks"), **trainer)
    return TrainJob.from_dict({**job.to_dict(), "inputs": [str(inp)]})


def test_a_new_backend_trains_through_the_runner_without_touching_the_graph(tmp_path):
    """A backend registered from outside: the runner starts it, moves its file, writes the sidecar."""
    from charbuild.train.runner import is_up_to_date, run_training

    script = tmp_path / "mytrainer.py"
    script.write_text(
        "import sys\nfrom charbuild.train.job import TrainJob\nfrom charbuild.train.fake_trainer import main\n"
        "job = TrainJob.from_json(sys.argv[1])\nprint('my trainer', job.label)\nsys.exit(main(sys.argv[1:]))\n",
        encoding="utf-8")

    class MyBackend(PythonModuleBackend):
        def command(self, job, job_file):
            return [sys.executable, str(script), str(job_file)]

    register(MyBackend("mine", "-", "a test backend", Capabilities(("sd15",), ("Lora3x3",), ("fp16",))))
    try:
        job = runnable_job(tmp_path / "p", backend="mine")
        run_training(job, echo=False)
        assert is_up_to_date(job).fresh
        assert "my trainer krnk/V" in (Path(job.variant_dir) / "train.log").read_text(encoding="utf-8")
    finally:
        from charbuild.train.backends import protocol

        protocol._REGISTRY.pop("mine", None)


# --------------------------------------------------------------------------- the layout


def test_layout_spells_every_build_path(tmp_path):
    lay = Layout(tmp_path / "." / "p")
    assert lay.root == (tmp_path / "p").resolve()
    assert layout.image_dir("黒猫", "制服 夏", 96) == "build/images/黒猫/制服 夏/96"
    assert layout.deliverable_lora("krnk", "V") == "build/loras/krnk/V/krnk-V.safetensors"
    assert layout.deliverable_stem("krnk", "V") == Path(layout.deliverable_lora("krnk", "V")).stem
    assert lay.path(layout.raw_lora("krnk", "V")) == lay.variant_dir("krnk", "V") / "raw.safetensors"
    assert lay.run_cache_dir == lay.cache_dir / "trained" and lay.locks_dir.parent == lay.build_dir
    assert lay.doit_db == lay.root / "build" / ".doit.db"


def test_no_other_module_spells_the_build_folder():
    """Every string constant in code (docstrings aside) that names build/ is layout.py's."""
    import ast

    pkg = Path(__file__).resolve().parents[1] / "charbuild"
    # owned elsewhere: they take their paths from charbuild.layout when the branches merge
    allowed = {"layout.py"}
    offenders = []
    for path in sorted(pkg.rglob("*.py")):
        if path.name in allowed:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                v = node.value
                if v == "build" or v.startswith("build/") or "/build/" in v or "build/locks" in v:
                    offenders.append(f"{path.relative_to(pkg)}:{node.lineno}: {v!r}")
    assert offenders == []


# --------------------------------------------------------------------------- the name inside the file


def test_every_deliverable_carries_its_own_stem_as_its_name(tmp_path):
    """Issue 9 item 1: web UIs use ss_output_name/modelspec.title as the alias; it must be unique."""
    from safetensors import safe_open

    from graphtools import build

    root = make_project(tmp_path / "p")
    build(root)
    files = sorted((root / "build" / "loras").glob("*/*/*-*.safetensors"))
    assert len(files) >= 2
    names = []
    for f in files:
        for stage in (f, f.parent / "raw.safetensors", f.parent / "merged.safetensors"):  # survives merge, compress
            with safe_open(str(stage), "np") as fh:
                md = fh.metadata()
            assert md["ss_output_name"] == md["modelspec.title"] == f.stem, stage
        names.append(f.stem)
    assert len(set(names)) == len(names)


def test_a_raw_file_named_before_names_were_unique_is_renamed_by_the_merge(tmp_path):
    """A LoRA trained by an older charbuild carries the variant name inside; the merge (cheap,
    no retraining) stamps the deliverable's stem, which compress keeps."""
    from safetensors import safe_open

    from charbuild.lora.io import load_lora, save_lora
    from graphtools import build

    root = make_project(tmp_path / "p")
    build(root)
    raw = next((root / "build" / "loras").glob("*/*/raw.safetensors"))
    old = load_lora(raw)
    save_lora(raw, old.tensors, {**old.metadata, "ss_output_name": raw.parent.name, "modelspec.title": raw.parent.name})
    ran = build(root)
    assert not any(n.startswith("train:") for n in ran)
    final = raw.parent / f"{raw.parent.parent.name}-{raw.parent.name}.safetensors"
    for stage in (raw.parent / "merged.safetensors", final):
        with safe_open(str(stage), "np") as fh:
            md = fh.metadata()
        assert md["ss_output_name"] == md["modelspec.title"] == final.stem, stage


# --------------------------------------------------------------------------- continue a training

V = "Lora1x1A1-AdamW8"


#: The character folder of each LoRA of make_project's project that the tests below continue.
_FOLDER = {"alc": "alice", "bbo": "bob"}


def _set_continue_from(root: Path, **continue_from) -> None:
    """Write ``continue_from = …`` into the [face] table of the LoRAs named (their character.toml)."""
    for name, value in continue_from.items():
        toml = root / "characters" / _FOLDER[name] / "character.toml"
        text = toml.read_text(encoding="utf-8")
        toml.write_text(text.replace("[face]\n", f"[face]\ncontinue_from = {value!r}\n".replace("'", '"'), 1),
                        encoding="utf-8")


def _graph(root: Path, **continue_from):
    """The graph of ``root`` with ``continue_from`` set on LoRAs in their character.toml."""
    from charbuild.config import load_project
    from charbuild.tasks import Graph

    _set_continue_from(root, **continue_from)
    return Graph(load_project(root))


def test_continue_from_a_variant_depends_on_its_training_and_hashes_its_file(tmp_path):
    root = make_project(tmp_path / "p")
    g = _graph(root, bbo=f"alc/{V}")
    lora = g.project.loras["bbo"]
    (params,) = g.variants(lora)
    job = g.train_job(lora, params)
    raw = str(Layout(root).path(layout.raw_lora("alc", V)))
    assert job.continue_from == raw and raw in job.inputs  # the file's content is in the signature
    assert f"train:alc/{V}" in g.train_deps(lora)
    assert g.train_job(g.project.loras["alc"], params).continue_from is None


def test_continue_from_a_file_relative_to_the_root(tmp_path):
    root = make_project(tmp_path / "p")
    (root / "old").mkdir()
    (root / "old" / "face.safetensors").write_bytes(b"x")
    g = _graph(root, bbo="old/face.safetensors")
    (params,) = g.variants(g.project.loras["bbo"])
    assert g.train_job(g.project.loras["bbo"], params).continue_from == str(Layout(root).root / "old/face.safetensors")


@pytest.mark.parametrize("value, message", [
    ("alc/Nope", "'continue_from' = 'alc/Nope': LoRA 'alc' has no variant 'Nope'; its variants: Lora1x1A1-AdamW8"),
    ("zzz/V", "'continue_from' = 'zzz/V' names no LoRA of this project"),
    ("gone.safetensors", "'continue_from' file 'gone.safetensors' does not exist"),
    (f"bbo/{V}", "'continue_from' makes LoRA 'bbo' continue from itself"),
], ids=["no-such-variant", "no-such-lora", "no-such-file", "itself"])
def test_bad_continue_from_names_the_file_and_the_setting(tmp_path, value, message):
    from charbuild.errors import ConfigError

    root = make_project(tmp_path / "p")
    with pytest.raises(ConfigError) as err:
        _graph(root, bbo=value)
    (problem,) = err.value.problems()
    assert problem.path.endswith("bob/character.toml") and problem.line is not None and message in problem.message


def test_loras_that_continue_from_each_other_are_an_error(tmp_path):
    from charbuild.errors import ConfigError

    root = make_project(tmp_path / "p")
    with pytest.raises(ConfigError, match="error"):
        _graph(root, bbo=f"alc/{V}", alc=f"bbo/{V}")


def test_a_continued_training_runs_after_its_source_and_follows_its_content(tmp_path):
    from graphtools import build, groups

    root = make_project(tmp_path / "p")
    _set_continue_from(root, bbo=f"alc/{V}")
    assert {f"alc/{V}", f"bbo/{V}"} <= groups(build(root, f"train:bbo/{V}"))["train"]
    build(root)
    assert build(root) == set()  # a continued training is fresh while its source is unchanged
    raw = root / layout.raw_lora("alc", V)
    # the source LoRA is retrained (another step count): the continued one is stale with it
    toml = root / "characters/alice/character.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("[face]\nsteps = 5", "[face]\nsteps = 6"), "utf-8")
    before = raw.read_bytes()
    ran = groups(build(root))["train"]
    assert raw.read_bytes() != before and ran == {f"alc/{V}", f"bbo/{V}"}


def _config_has_continue_from() -> bool:
    from dataclasses import fields as dc_fields

    from charbuild.config import Lora

    return "continue_from" in {f.name for f in dc_fields(Lora)}


@pytest.mark.skipif(not _config_has_continue_from(), reason="the config side (Lora.continue_from) comes with the merge")
def test_continue_from_in_a_character_toml(tmp_path):
    from charbuild.config import load_project
    from charbuild.errors import ConfigError
    from charbuild.tasks import Graph

    root = make_project(tmp_path / "p")
    toml = root / "characters/bob/character.toml"
    text = toml.read_text(encoding="utf-8")
    toml.write_text(text.replace("[face]\n", f'[face]\ncontinue_from = "alc/{V}"\n'), encoding="utf-8")
    g = Graph(load_project(root))
    assert f"train:alc/{V}" in g.train_deps(g.project.loras["bbo"])
    toml.write_text(text.replace("[face]\n", '[face]\ncontinue_from = "alc/Nope"\n'), encoding="utf-8")
    with pytest.raises(ConfigError) as err:  # the loader knows the variants and says so first
        Graph(load_project(root))
    (problem,) = err.value.problems()
    assert problem.path.endswith("character.toml") and problem.line is not None


# --------------------------------------------------------------------------- the launcher seam


def test_a_registered_launcher_runs_the_training_somewhere_else(tmp_path):
    """What a cluster executor plugs into: it gets the job (output in the temp folder) and the
    log, hands back the raw file and an exit status; the runner does the rest."""
    from charbuild.train import runner
    from charbuild.train.fake_trainer import write_fake_lora

    seen = []

    def remote(launch: runner.Launch) -> int:
        seen.append((launch, TrainJob.from_json(launch.job_file)))  # the temp folder goes afterwards
        launch.log.write(b"remote: trained\n")
        write_fake_lora(launch.job.output, launch.job.params.to_dict(), name=launch.job.title)
        return 0

    runner.register_launcher("remote-test", remote)
    try:
        job = runnable_job(tmp_path / "p", executor="remote-test")
        runner.run_training(job, echo=False)
        ((launch, from_file),) = seen
        assert Path(launch.job.output).parent.name.startswith(".train-") and from_file == launch.job
        assert runner.is_up_to_date(job).fresh
        assert "remote: trained" in (Path(job.variant_dir) / "train.log").read_text(encoding="utf-8")
        with pytest.raises(TrainingError, match="unknown trainer executor 'nowhere'"):
            runner.run_training(job.with_trainer(executor="nowhere"), echo=False)
    finally:
        runner._LAUNCHERS.pop("remote-test", None)


def test_later_keys_at_their_default_and_observing_keys_stay_out_of_the_signature():
    """A setting added after a LoRA was trained leaves it fresh at its default; samples and
    validation settings never make a LoRA stale."""
    from charbuild.train.job import signature_params
    from charbuild.train.variants import LATER_KEYS, OBSERVING_KEYS, resolve_variant

    plain = signature_params(resolve_variant("Lora3x3A1-AdamW8", steps=10))
    assert not set(plain) & (set(LATER_KEYS) | set(OBSERVING_KEYS))
    watched = signature_params(resolve_variant({"preset": "Lora3x3A1-AdamW8", "sample_every": 5,
                                                "sample_prompts": ["x"], "validation_every": 5}, steps=10))
    assert watched == plain
    offset = signature_params(resolve_variant({"preset": "Lora3x3A1-AdamW8", "noise_offset": 0.05}, steps=10))
    assert offset["noise_offset"] == 0.05 and {k: v for k, v in offset.items() if k != "noise_offset"} == plain


def test_the_example_s_group_samples_each_member_with_its_body_lora_s_prompts(example_copy):
    """The group job renders kuroneko's school uniform with krnksf's prompts and chaneko's
    plugsuit with tyankps's (what each member's own samples are scored on)."""
    from charbuild.config import load_project
    from charbuild.tasks import Graph

    g = Graph(load_project(example_copy))
    loras = g.project.loras
    assert loras["krnksf_tyankps"].sample_members() == [("kuroneko/school", ["krnksf", "krnk"]),
                                                        ("chaneko/plugsuit", ["tyankps", "tyank"])]
    assert loras["krnksf"].sample_members() == []
    group = dict(g.sample_set(loras["krnksf_tyankps"], g.variants(loras["krnksf_tyankps"])[0]))
    body = dict(g.sample_set(loras["tyankps"], g.variants(loras["tyankps"])[0]))
    assert {f"chaneko/plugsuit/{code}": prompt for code, prompt in body.items()}.items() <= group.items()
    assert len(group) == 2 * len(body)
