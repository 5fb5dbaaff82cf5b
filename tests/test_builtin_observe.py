"""Samples and validation loss of the builtin trainer on the tiny model (CPU).

Two short trainings (with and without both) and one prepared model: what is observed must not
change what is trained, and must be the same on every run.
"""

from __future__ import annotations

import dataclasses

import hashlib
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import builtin_job as _job, make_tiny_dataset as _make_project  # noqa: E402

from charbuild.codes import TEMPLATE_CODES  # noqa: E402
from charbuild.report.metrics import read_metrics  # noqa: E402

OBSERVE = {"sample_every": 2, "sample_steps": 1, "validation_every": 2}


@pytest.fixture(scope="module")
def project(tmp_path_factory, reproducible_training):
    root = tmp_path_factory.mktemp("observe")
    _make_project(root)
    return root


def _small(root: Path, folder: str, **over):
    """A 3-step UNet-only job of variant "v" whose files go to ``<root>/<folder>`` (the same
    name inside every file, so two runs can be compared byte for byte)."""
    job = _job(root, "Lora1x1", "v", steps=3, network_train_unet_only=True, **over)
    job = dataclasses.replace(job, variant_dir=str(root / folder), output=str(root / folder / "raw.safetensors"),
                              inputs=tuple(sorted(str(p) for p in (root / "build" / "images").rglob("*.png"))))  # the identity's references
    return job


@pytest.fixture(scope="module")
def trained(project):
    from charbuild.train.builtin.trainer import run_job

    runs = {}
    for name, over in (("observed", OBSERVE), ("plain", {})):
        job = _small(project, name, **over)
        runs[name] = (run_job(job), Path(job.variant_dir))
    return runs


def test_samples_and_validation_do_not_change_the_trained_bytes(trained):
    (obs, obs_dir), (plain, plain_dir) = trained["observed"], trained["plain"]
    assert obs["losses"] == plain["losses"]  # the training's random stream is untouched
    assert (obs_dir / "raw.safetensors").read_bytes() == (plain_dir / "raw.safetensors").read_bytes()


def test_metrics_hold_every_step_and_the_validations(trained):
    (obs, obs_dir), (_, plain_dir) = trained["observed"], trained["plain"]
    log = read_metrics(obs_dir / "metrics.jsonl")
    assert log.loss == [(i + 1, pytest.approx(v)) for i, v in enumerate(obs["losses"])]
    assert [s for s, _ in log.lr] == [1, 2, 3]
    assert [s for s, _ in log.val_loss] == [0, 2, 3]  # before training, every 2 steps, the end
    assert read_metrics(plain_dir / "metrics.jsonl").val_loss == []
    assert list((obs_dir / "logs").rglob("events.out.tfevents.*"))  # TensorBoard beside it


def test_samples_every_n_steps_and_at_the_end_one_per_face_code(trained):
    from PIL import Image

    _, obs_dir = trained["observed"]
    found = sorted(p.relative_to(obs_dir / "samples").as_posix() for p in (obs_dir / "samples").rglob("*.png"))
    # step 0 is the base model; at step 0 and the end also the prompts without trigger words
    assert found == sorted([f"{step}/{code}.png" for step in (0, 2, 3) for code in TEMPLATE_CODES["f"]]
                           + [f"{step}/notrigger/{code}.png" for step in (0, 3) for code in TEMPLATE_CODES["f"]])
    nt = Image.open(obs_dir / "samples" / "0" / "notrigger" / "f00.png").text["parameters"]
    assert "krnk" not in nt and "kuroneko" not in nt and "upper body" in nt and "Seed: 31337" in nt
    im = Image.open(obs_dir / "samples" / "3" / "f00.png")
    assert im.size == (128, 128) and "Seed: 31337" in im.text["parameters"]
    assert not (trained["plain"][1] / "samples").exists()


def test_identity_at_step_0_every_sample_step_and_the_trigger_score(trained):
    _, obs_dir = trained["observed"]
    log = read_metrics(obs_dir / "metrics.jsonl")
    assert list(log.identity) == ["krnk/face"]  # the largest size's pictures f00-f02 are the references
    assert [s for s, _ in log.identity["krnk/face"]] == [0, 2, 3]
    assert all(0 <= v <= 1 for _, v in log.identity["krnk/face"])
    assert sorted(log.identity_codes["krnk/face"][0]) == ["f00", "f01", "f02"]
    assert [s for s, _ in log.trigger] == [3] and 0 <= log.trigger[0][1] <= 1
    assert log.identity_change("krnk/face") == (log.identity["krnk/face"][0][1], log.identity["krnk/face"][-1][1])


def test_adapters_off_is_the_base_model_and_restores_the_multipliers(project):
    from charbuild.train.builtin.identity_watch import adapters_off
    from charbuild.train.builtin.trainer import prepare, resolve_setup

    prep = prepare(resolve_setup(_small(project, "off")))
    modules = list(prep.network.unet_loras)
    for m in modules:
        torch.nn.init.normal_(m.lora_up.weight)  # a LoRA that changes the output
    x = torch.randn(1, 4, 4, 4)
    cond = torch.randn(1, 77, prep.text_encoder.config.hidden_size)
    with torch.no_grad():
        with_lora = prep.unet(x, 10, cond).sample
        with adapters_off(prep.network):
            assert all(m.multiplier == 0 for m in modules)
            bare = prep.unet(x, 10, cond).sample
        for m in modules:
            m.multiplier = 0.0
        expected = prep.unet(x, 10, cond).sample
    assert not torch.equal(with_lora, bare) and torch.equal(bare, expected)
    for m in modules:
        m.multiplier = 1.0


def test_rendering_and_validation_are_deterministic_and_leave_the_random_state(project, tmp_path):
    from charbuild.train.builtin.samples import SampleRenderer
    from charbuild.train.builtin.trainer import prepare, resolve_setup
    from charbuild.train.builtin.validation import ValidationSet, training_predict
    from charbuild.train.observed import samples_of

    setup = resolve_setup(_small(project, "det", **OBSERVE))
    prep = prepare(setup)
    samples = samples_of(setup.job)[:3]
    state = torch.get_rng_state()
    a = SampleRenderer(setup, prep, samples, tmp_path / "a").render(5)
    b = SampleRenderer(setup, prep, samples, tmp_path / "b").render(5)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert len({hashlib.md5(p.read_bytes()).hexdigest() for p in a}) == 3  # one picture per prompt and seed

    captions = [it.caption for it in prep.dataset.items]
    predict = training_predict(setup, prep)
    values = [ValidationSet.build(prep.latents, captions, 1000, setup.seed).evaluate(predict, prep.noise_scheduler, prep.device)
              for _ in range(2)]
    assert values[0] == values[1] and values[0] > 0
    assert torch.equal(torch.get_rng_state(), state)
    other = ValidationSet.build(prep.latents, captions, 1000, setup.seed + 1)
    assert other.evaluate(predict, prep.noise_scheduler, prep.device) != values[0]  # the noise is the seed's


def test_fixed_timesteps_spread_over_the_schedule():
    from charbuild.train.builtin.validation import fixed_timesteps

    assert fixed_timesteps(1000) == [125, 375, 625, 875]
    assert fixed_timesteps(10, 2) == [2, 7]


def test_sdxl_samples_and_validation_on_tiny_sdxl(tmp_path):
    """The SDXL path (StableDiffusionXLPipeline; both encoders and size ids for validation) on the
    real tiny-sdxl modules. The namespaces stand in for the Setup/Prepared of an SDXL training,
    whose loop is wired elsewhere; the renderer and the validation read only these fields."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer on a busy machine (choose_cpu_threads)
    try:
        _sdxl_checks(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _sdxl_checks(tmp_path):
    from types import SimpleNamespace

    from charbuild.sample_prompts import sample_set
    from charbuild.train.builtin.models import load_base_model
    from charbuild.train.builtin.samples import SampleRenderer
    from charbuild.train.builtin.validation import ValidationSet, training_predict
    from charbuild.train.variants import resolve_variant

    base = load_base_model({"base": "tiny-sdxl"}, tmp_path, supported_archs=("sd15", "sdxl"))
    params = resolve_variant("Lora1x1A1-AdamW8", steps=3).with_values(sample_every=1, sample_steps=2)
    setup = SimpleNamespace(job=SimpleNamespace(params=params), seed=5, clip_skip=None)
    prep = SimpleNamespace(device=torch.device("cpu"), weight_dtype=torch.float32, vae=base.vae, unet=base.unet,
                           text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                           tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2,
                           noise_scheduler=base.noise_scheduler, dataset=None, arch="sdxl",
                           train_text_encoder=False, text_cache={})
    samples = sample_set("face", ["k"])[:2]
    a = SampleRenderer(setup, prep, samples, tmp_path / "a").render(1)
    b = SampleRenderer(setup, prep, samples, tmp_path / "b").render(1)
    assert [p.name for p in a] == ["f00.png", "f01.png"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]

    latents = {(0, False): torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))}
    predict = training_predict(setup, prep)
    values = [ValidationSet.build(latents, ["k, smile"], 1000, 1, sizes_hw=[(128, 128)])
              .evaluate(predict, base.noise_scheduler, prep.device) for _ in range(2)]
    assert values[0] == values[1] and values[0] > 0


def test_a_group_s_member_samples_render_into_member_folders_and_score_per_member(project):
    """Samples named ``<member>/<code>`` (a group LoRA's) are written under ``samples/<step>/<member>/``
    by the real renderer, scored against that member's pictures only (another member's samples
    are not its), and their prompts without trigger words give the trigger score."""
    from charbuild.identity import distance
    from charbuild.train.builtin.trainer import run_job
    from charbuild.train.scoring import references

    job = _small(project, "group", sample_every=1, sample_steps=1)
    prompts = {"krnk/face/f00": "krnk, upper body", "krnk/face/f01": "krnk, from side",
               "other/suit/f00": "krnk, full body"}
    job = dataclasses.replace(job, params=job.params.with_values(steps=1), sample_set=tuple(prompts.items()))
    run_job(job)
    folder = Path(job.variant_dir) / "samples"
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert found == sorted(f"{step}/{pre}{name}.png" for step in (0, 1) for name in prompts for pre in ("", "notrigger/"))
    log = read_metrics(Path(job.variant_dir) / "metrics.jsonl")
    assert list(log.identity) == ["krnk/face"]
    assert sorted(log.identity_codes["krnk/face"][0]) == ["f00", "f01"]  # its own two, not other/suit's f00
    ref = references(job)["krnk/face"]["f00"]
    for step in (0, 1):
        own, other = (distance(folder / str(step) / f"{m}/f00.png", ref) for m in ("krnk/face", "other/suit"))
        assert own != other and log.identity_codes["krnk/face"][step]["f00"] == round(own, 4)
    assert [s for s, _ in log.trigger] == [1]
