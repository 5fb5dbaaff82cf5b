"""The builtin trainer end to end on the tiny model (CPU, a few steps each).

Runs are in-process (``run_job``/``main``) so the imports are paid once; one run per network
kind is shared between the tests through module-scoped fixtures.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from charbuild.train.builtin import main  # noqa: E402
from conftest import builtin_job, make_tiny_dataset  # noqa: E402
from charbuild.train.builtin.tiny import ensure_tiny_model, tiny_model_dir  # noqa: E402

STEPS = 6


_make_project = make_tiny_dataset


def _job(root: Path, network: str, out_name: str, **over):
    over.setdefault("steps", STEPS)
    return builtin_job(root, network, out_name, **over)


def _train(root: Path, job) -> dict:
    from charbuild.train.builtin.trainer import run_job

    return run_job(job)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("proj")
    _make_project(root)
    return root


@pytest.fixture(scope="module", autouse=True)
def _reproducible(reproducible_training):
    """Every training of this module repeats byte for byte (conftest.reproducible_training)."""


@pytest.fixture(scope="module")
def lora3x3(project):
    job = _job(project, "Lora3x3", "l3")
    summary = _train(project, job)
    return job, summary


@pytest.fixture(scope="module")
def lora1x1(project):
    job = _job(project, "Lora1x1", "l1", network_train_unet_only=True, save_precision="float")
    summary = _train(project, job)
    return job, summary


# ------------------------------------------------------------------------ the tiny model


def test_tiny_model_is_cached_and_deterministic(tmp_path, project, lora3x3):
    first = tiny_model_dir(project)
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (first / "tokenizer").is_dir() and (first / "model_index.json").is_file()
    stamp = (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(project) == first
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp  # reused
    other = ensure_tiny_model(tmp_path)  # generated afresh elsewhere: the same weights
    for sub in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):
        a, b = load_file(str(first / sub)), load_file(str(other / sub))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    seed1 = load_file(str(ensure_tiny_model(tmp_path, seed=1) / "unet/diffusion_pytorch_model.safetensors"))
    a = load_file(str(first / "unet/diffusion_pytorch_model.safetensors"))
    assert not all(torch.equal(a[k], seed1[k]) for k in a)


def test_tiny_tokenizer_is_byte_level(project, lora3x3):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model_dir(project) / "tokenizer")
    ids = tok("krnk, 1girl", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == 512 and ids[1:5] == [74, 81, 77, 330]  # k r n k</w>
    assert ids[-1] == 513


# ------------------------------------------------------------------------ the LoRA file


def test_lora3x3_keys_shapes_alpha(lora3x3):
    job, summary = lora3x3
    sd = load_file(job.output)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    for stem in stems:
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= sd.keys()
    for stem in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_mid_block_attentions_0_proj_out",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_3_mlp_fc2",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_mid_block_resnets_1_conv2",
        "lora_unet_up_blocks_1_resnets_2_time_emb_proj",
    ):
        assert stem in stems, stem
    # shapes: linear, 1x1 conv (proj_in), 3x3 conv (kohya Lora3x3)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{q}.lora_down.weight"].shape == (4, 32) and sd[f"{q}.lora_up.weight"].shape == (32, 4)
    p = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert sd[f"{p}.lora_down.weight"].shape == (4, 32, 1, 1) and sd[f"{p}.lora_up.weight"].shape == (32, 4, 1, 1)
    c = "lora_unet_down_blocks_1_resnets_0_conv1"
    assert sd[f"{c}.lora_down.weight"].shape == (4, 32, 3, 3)
    assert sd[f"{c}.lora_up.weight"].shape == (64, 4, 1, 1)
    assert all(sd[f"{s}.alpha"].shape == () and float(sd[f"{s}.alpha"]) == 2.0 for s in stems)
    assert all(t.dtype == torch.float16 for t in sd.values())
    assert not any(k.startswith("lora_unet_conv_in") or "time_embedding" in k for k in sd)


def test_lora3x3_metadata(lora3x3):
    job, _ = lora3x3
    with safe_open(job.output, "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2"}
    assert md["ss_base_model_version"] == "sd_v1"
    assert md["ss_output_name"] == "krnk-l3" and md["modelspec.title"] == "krnk-l3"  # <lora>-<variant>
    assert md["modelspec.trigger_phrase"] == "krnk, kuroneko"
    assert md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.date"] == "2023-11-14T22:13:20"
    assert md["ss_steps"] == str(STEPS) and md["ss_seed"] == "31337" and md["ss_clip_skip"] == "2"
    assert md["ss_num_train_images"] == "12"  # 6 images x 2 repeats
    assert md["ss_learning_rate"] == "0.001" and md["ss_text_encoder_lr"] == "0.00044"
    freq = json.loads(md["ss_tag_frequency"])
    # sd-scripts: per image-dir basename, lower-cased tags, once per image (not per repeat)
    assert freq == {
        "64": {"krnk": 3, "1girl": 2, "red eyes": 1, "blue eyes": 1},
        "128": {"krnk": 3, "1girl": 2, "red eyes": 1, "blue eyes": 1},
    }
    assert all(isinstance(v, str) for v in md.values())


def test_sshs_hashes_match_sd_scripts_method(lora3x3):
    """sd-scripts hashes the file it would write with only the ss_ metadata."""
    from safetensors.torch import save

    job, _ = lora3x3
    with safe_open(job.output, "pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    data = save(tensors, {k: v for k, v in md.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(data[8 + n :]).hexdigest()
    assert md["sshs_legacy_hash"] == hashlib.sha256(data[0x100000 : 0x110000]).hexdigest()[:8]
    # the model hash covers the tensor bytes of the written file too
    raw = Path(job.output).read_bytes()
    m = int.from_bytes(raw[:8], "little")
    assert hashlib.sha256(raw[8 + m :]).hexdigest() == md["sshs_model_hash"]


def test_training_learns(lora3x3):
    job, summary = lora3x3
    assert summary["steps"] == STEPS
    assert all(torch.isfinite(torch.tensor(summary["losses"])))
    sd = load_file(job.output)
    ups = {k: v for k, v in sd.items() if k.endswith("lora_up.weight")}
    # clip_skip 2: the text encoder's last layer (3 of 0..3) is not used, so it cannot learn
    # (sd-scripts' files show the same zeros); every other module moved off its zero init
    skipped = {k for k in ups if k.startswith("lora_te_text_model_encoder_layers_3_")}
    assert len(skipped) == 6
    assert all(ups[k].abs().max() == 0 for k in skipped)
    assert all(v.abs().max() > 0 for k, v in ups.items() if k not in skipped)
    logs = list((Path(job.variant_dir) / "logs").rglob("events.out.tfevents.*"))
    assert logs, "no TensorBoard log"


def test_lora1x1_has_no_conv_and_unet_only(lora1x1):
    job, _ = lora1x1
    sd = load_file(job.output)
    assert sd and not any(k.startswith("lora_te") for k in sd)
    assert not any("resnets" in k or "samplers" in k for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())  # save_precision float
    downs = [v for k, v in sd.items() if k.endswith("lora_down.weight")]
    assert all(v.ndim == 2 or v.shape[2:] == (1, 1) for v in downs)
    with safe_open(job.output, "pt") as f:
        md = f.metadata()
    assert json.loads(md["ss_network_args"]) == {}


def test_same_seed_same_bytes(project, lora1x1):
    job, summary = lora1x1
    again = _job(project, "Lora1x1", "l1", network_train_unet_only=True, save_precision="float")
    again = again.with_output(Path(again.variant_dir).with_name("l1-again") / "raw.safetensors")
    summary2 = _train(project, again)
    assert summary2["losses"] == summary["losses"]
    assert Path(again.output).read_bytes() == Path(job.output).read_bytes()
    other_seed = _job(project, "Lora1x1", "l1-seed", network_train_unet_only=True, save_precision="float", seed=1)
    _train(project, other_seed)
    assert Path(other_seed.output).read_bytes() != Path(job.output).read_bytes()


def test_loha_and_adafactor(project):
    job = _job(project, "Loha", "loha", steps=3, optimizer="adafactor", lr=None, text_encoder_lr=None,
               optimizer_args=["relative_step=True", "scale_parameter=True", "warmup_init=False"])
    summary = _train(project, job)
    sd = load_file(job.output)
    c = "lora_unet_down_blocks_1_resnets_0_conv1"
    assert sd[f"{c}.hada_w1_a"].shape == (64, 4) and sd[f"{c}.hada_w1_b"].shape == (4, 32 * 9)
    assert sd[f"{c}.hada_w2_a"].abs().max() > 0  # zero-initialised factor moved
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.hada_w2_b" in sd
    with safe_open(job.output, "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "lycoris.kohya"
    assert json.loads(md["ss_network_args"])["algo"] == "loha"
    assert all(torch.isfinite(torch.tensor(summary["losses"])))


def test_continue_from_starts_at_the_given_weights(project, lora1x1):
    job, _ = lora1x1
    cont = _job(project, "Lora1x1", "l1-cont", network_train_unet_only=True, save_precision="float", steps=1, lr=1e-12)
    cont = dataclasses.replace(cont, continue_from=job.output)
    summary = _train(project, cont)
    a, b = load_file(job.output), load_file(cont.output)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # "steps" of a continued training are the steps it adds (sd-scripts' --network_weights),
    # never the total: one step here, on top of the STEPS already in the file
    assert summary["steps"] == 1 and len(summary["losses"]) == 1
    with safe_open(cont.output, "pt") as f:
        md = f.metadata()
    assert md["ss_steps"] == md["ss_max_train_steps"] == "1"
    assert md["charbuild.total_steps"] == str(STEPS + 1)
    assert md["charbuild.continue_from"] == Path(job.output).name


# ------------------------------------------------------------------------ the entry point


def test_main_errors_are_one_line(project, tmp_path, capsys):
    job = _job(project, "Lora1x1", "bad")
    job = job.with_model(arch="sd3")  # an architecture the builtin does not train (exit 2, "use sd-scripts")
    f = tmp_path / "job.json"
    f.write_text(job.to_json(), encoding="utf-8")
    assert main([str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("charbuild.train.builtin: error: ") and "sd-scripts" in err[-1]
    job = _job(project, "Lora1x1", "bad2")
    job = job.with_model(base=str(tmp_path / "nope"))
    f.write_text(job.to_json(), encoding="utf-8")
    assert main([str(f)]) == 1
    assert "base model not found" in capsys.readouterr().err
    assert not Path(job.output).exists()
    assert main([str(tmp_path / "missing.json")]) == 1
    assert main([]) == 2


def test_package_import_does_not_load_torch():
    code = "import sys, charbuild.train.builtin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_buckets_no_upscale_and_batches(tmp_path):
    from charbuild.train.builtin.data import choose_bucket, make_batches, read_dataset_toml
    import random

    ds = {"enable_bucket": True, "bucket_no_upscale": True, "bucket_reso_steps": 64,
          "min_bucket_reso": 256, "max_bucket_reso": 1024}
    assert choose_bucket((384, 512), ds, (512, 512)) == ((384, 512), (384, 512))
    assert choose_bucket((200, 130), ds, (512, 512)) == ((192, 128), (200, 130))  # crop, no resize
    bucket, resized = choose_bucket((1024, 1024), ds, (512, 512))  # too large: shrunk to the area
    assert bucket == (512, 512) and resized == (512, 512)
    up = dict(ds, bucket_no_upscale=False)
    assert choose_bucket((300, 600), up, (512, 512))[0][0] < choose_bucket((300, 600), up, (512, 512))[0][1]
    root = tmp_path
    _make_project(root)
    dataset = read_dataset_toml(root / "build/loras/krnk/dataset.toml", root)
    batches = make_batches(dataset, random.Random(0))
    assert sum(len(b) for b in batches) == 12
    for b in batches:
        assert len(b) <= 2 and len({dataset.items[i].bucket for i, _ in b}) == 1
        assert all(not flip or dataset.items[i].flip_aug for i, flip in b)
    no_cap = [it for it in dataset.items if it.path.stem == "f02"]
    assert no_cap and all(it.caption == "krnk" for it in no_cap)


def test_file_applied_as_webui_merge_equals_trained_network(project, lora3x3):
    """W + (alpha / r) · up @ down (lora-formats.md §1), merged into a fresh UNet, gives the
    output of the UNet with the trained adapters hooked in: the saved file means what it did
    in training (scales, conv shapes, key names)."""
    from diffusers import UNet2DConditionModel

    from charbuild.train.builtin.network import LoRANetwork, NetworkSpec

    job, _ = lora3x3
    sd = {k: v.float() for k, v in load_file(job.output).items() if k.startswith("lora_unet")}
    folder = tiny_model_dir(project) / "unet"
    hooked = UNet2DConditionModel.from_pretrained(folder)
    net = LoRANetwork(hooked, None, NetworkSpec("lora", 4, 2.0, 4, 2.0))
    missing, unexpected = net.load_kohya_state_dict(sd)
    assert not missing and not unexpected
    net.apply_to()
    merged = UNet2DConditionModel.from_pretrained(folder)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in merged.named_modules()}
    with torch.no_grad():
        for key in [k for k in sd if k.endswith(".lora_down.weight")]:
            stem = key[: -len(".lora_down.weight")]
            down, up, alpha = sd[key], sd[f"{stem}.lora_up.weight"], float(sd[f"{stem}.alpha"])
            r = down.shape[0]
            w = modules[stem].weight
            delta = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(w.shape) * (alpha / r)
            w += delta
        torch.manual_seed(0)
        x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([400]), torch.randn(1, 77, 32)
        a = hooked(x, t, cond).sample
        b = merged(x, t, cond).sample
        base = UNet2DConditionModel.from_pretrained(folder)(x, t, cond).sample
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (a - base).abs().max() > 1e-4  # the LoRA changes the output at all

