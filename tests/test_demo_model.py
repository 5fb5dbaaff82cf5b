"""The shipped demo model (``base = "demo"``): loading, hash check, tokenizer, and a LoRA that learns on it."""

from __future__ import annotations

import dataclasses

import shutil
from pathlib import Path

import pytest

from charbuild.errors import TrainingError
from charbuild.train.builtin import demo

ROOT = Path(__file__).resolve().parent.parent
HAVE_MODEL = (demo.DEMO_DIR / demo.WEIGHTS_FILE).is_file()
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="the demo model's weights are not in this checkout")


def test_bpe_makes_every_known_word_one_token_and_spells_others_in_bytes(tmp_path):
    pytest.importorskip("transformers")
    merges = demo.train_bpe({"black": 5, "background": 3, "hair": 4, "blonde": 1})
    n = demo.write_tokenizer_files(tmp_path, merges)
    tok = demo.load_tokenizer(tmp_path)
    assert n == len(tok.get_vocab())
    pieces = tok.convert_ids_to_tokens(tok("krnk, black hair, blonde background").input_ids)
    assert pieces[1:5] == ["k", "r", "n", "k</w>"]  # a new keyword: byte pieces
    assert pieces[5:] == [",</w>", "black</w>", "hair</w>", ",</w>", "blonde</w>", "background</w>", "<|endoftext|>"]
    assert demo.train_bpe({"black": 5, "hair": 4}) == demo.train_bpe({"hair": 4, "black": 5})  # deterministic


@needs_model
def test_the_shipped_model_loads_offline_and_fits_a_whole_caption():
    pytest.importorskip("diffusers")
    from charbuild.captions import caption_text
    from charbuild.train.builtin.models import load_base_model

    base = load_base_model({"base": "demo", "arch": "sd15"}, ROOT)
    assert base.arch == "sd15" and base.name.startswith("demo-")
    assert base.unet.config.block_out_channels == (32, 64, 96, 96) or list(base.unet.config.block_out_channels) == [32, 64, 96, 96]
    caption = caption_text("f10", ["krnksf", "krnk", "school uniform"])
    ids = base.tokenizer(caption).input_ids
    assert len(caption) > 250 and len(ids) < base.tokenizer.model_max_length  # no truncation
    assert (demo.DEMO_DIR / demo.WEIGHTS_FILE).stat().st_size <= 25 * 2**20
    names = {n for n, _ in base.unet.named_modules()}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names  # SD1.5's module names


@needs_model
def test_a_corrupt_weights_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "demo_model"
    shutil.copytree(demo.DEMO_DIR, folder)
    data = bytearray((folder / demo.WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (folder / demo.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="corrupt or replaced") as info:
        demo.verify_weights(folder)
    assert str(folder / demo.WEIGHTS_FILE) in str(info.value) and "pretrain_demo.py" in str(info.value)
    (folder / demo.WEIGHTS_FILE).unlink()
    with pytest.raises(TrainingError, match="missing"):
        demo.verify_weights(folder)
    (folder / demo.MANIFEST_FILE).unlink()
    with pytest.raises(TrainingError, match="not installed"):
        demo.read_manifest(folder)


@needs_model
def test_demo_is_a_builtin_base_with_samples_on_and_its_hash_in_signatures(tmp_path):
    from charbuild.base_arch import DEMO_TRAINING_DEFAULTS, tiny_base_arch
    from charbuild.signature import model_signature

    assert tiny_base_arch("demo") == "sd15" and tiny_base_arch("demo:3") is None
    assert model_signature("demo", tmp_path, tmp_path) == {"demo": demo.demo_identity()}
    assert len(demo.demo_identity()) == 64
    from charbuild.config import load_project

    project = load_project(ROOT)
    assert project.model["base"] == "demo"
    for key, value in DEMO_TRAINING_DEFAULTS.items():
        assert project.training[key] == value


# --- a LoRA learns its character on the demo model -----------------------------------------


def _kuroneko_face_project(root: Path, size: int = 64) -> list[Path]:
    """kuroneko's face pictures on black at ``size`` px with charbuild's captions, and a dataset TOML."""
    from PIL import Image

    from charbuild.captions import caption_text

    folder = root / "build" / "images" / "kuroneko" / "face" / str(size)
    folder.mkdir(parents=True)
    pictures = []
    for src in sorted((ROOT / "characters" / "kuroneko" / "face").glob("*.png")):
        with Image.open(src) as img:
            rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (0, 0, 0))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        canvas.resize((size, size), Image.Resampling.LANCZOS).save(folder / src.name)
        (folder / f"{src.stem}.txt").write_text(caption_text(src.stem, ["krnk"]), encoding="utf-8")
        pictures.append(folder / src.name)
    (root / "build" / "loras" / "krnk").mkdir(parents=True)
    (root / "build" / "loras" / "krnk" / "dataset.toml").write_text(
        "[general]\nenable_bucket = true\nbucket_no_upscale = true\ncaption_extension = '.txt'\nnum_repeats = 4\n\n"
        f"[[datasets]]\nresolution = [{size}, {size}]\nbatch_size = 4\n\n  [[datasets.subsets]]\n"
        f"  image_dir = 'build/images/kuroneko/face/{size}'\n  class_tokens = 'krnk girl'\n  flip_aug = true\n",
        encoding="utf-8")  # fmt: skip
    return pictures


@needs_model
def test_a_lora_on_the_demo_model_learns_its_character(tmp_path, reproducible_training):
    """One small LoRA (kuroneko's face, held out of the demo model's pretraining): its last samples
    must be clearly closer to her pictures than the base model's step-0 samples. A trainer change
    that stops learning fails here."""
    pytest.importorskip("diffusers")
    from conftest import builtin_job

    from charbuild.identity import identity_gain
    from charbuild.report.metrics import read_metrics
    from charbuild.train.builtin.trainer import run_job

    pictures = _kuroneko_face_project(tmp_path)
    job = builtin_job(tmp_path, "Lora3x3", "v", base="demo", steps=LORA_STEPS, lr=LORA_LR, text_encoder_lr=LORA_LR / 2,
                      dim=8, alpha=8, conv_dim=4, conv_alpha=2, sample_every=LORA_STEPS, sample_steps=10, mixed_precision="no",
                      gradient_checkpointing=False, scheduler="constant")  # fmt: skip
    job = dataclasses.replace(job, keywords=("krnk",), inputs=tuple(str(p) for p in pictures))
    run_job(job)
    log = read_metrics(Path(job.variant_dir) / "metrics.jsonl")
    codes = log.identity_codes["kuroneko/face"]
    gain = identity_gain(codes[0], codes[LORA_STEPS])
    assert gain["codes"] == 15
    assert gain["drop"] >= MIN_DROP and gain["closer"] >= MIN_CLOSER, gain


#: Measured on the shipped model (3200 steps, offset noise; 2-core CPU, one thread): the mean distance
#: fell 16 % (0.457 -> 0.384) and 10 of the 15 codes got closer. With lr = 1e-12 (0 is refused) the
#: LoRA stays zero: drop 0, no code closer. The bounds sit about halfway, leaving room for other
#: machines' float sums.
LORA_STEPS = 40
LORA_LR = 3e-3
MIN_DROP = 0.08
MIN_CLOSER = 0.35
