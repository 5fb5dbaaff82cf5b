"""``[model] arch``: read from the base model when left out; a contradiction is an error at its line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charbuild.base_arch import base_arch, diffusers_folder_arch, tiny_base_arch
from charbuild.config import load_project
from charbuild.project_toml import SDXL_DEFAULT_SIZES
from charbuild.dataset_toml import SDXL_BATCH_SIZE_TABLES
from charbuild.errors import ConfigError
from charbuild.train.builtin.checkpoint import CheckpointError

from checkpoint_files import write_layout_checkpoint
from conftest import make_project


def _project(tmp_path: Path, model_lines: str, extra: str = "") -> Path:
    root = make_project(tmp_path / "p")
    proj = root / "characters" / "project.toml"
    text = proj.read_text(encoding="utf-8").replace("[dataset]\nsizes = [64, 96]\n", "")
    proj.write_text("[model]\n" + model_lines + text + extra, encoding="utf-8")
    return root


def _errors(root: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_project(root)
    return [str(p) for p in info.value.problems()]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_arch_is_read_from_a_single_file(tmp_path, kind):
    root = _project(tmp_path, 'base = "base.safetensors"\n')
    write_layout_checkpoint(root / "base.safetensors", kind)
    assert load_project(root).model["arch"] == kind


def test_a_contradicting_arch_is_an_error_at_its_line_naming_the_file(tmp_path):
    root = _project(tmp_path, 'base = "models/xl.safetensors"\narch = "sd15"\n')
    write_layout_checkpoint(root / "models" / "xl.safetensors", "sdxl")
    msgs = _errors(root)
    assert any(m.startswith("characters/project.toml:3: error: 'model.arch' = 'sd15' but models/xl.safetensors is an SDXL model")
               and "set arch = 'sdxl'" in m for m in msgs), msgs


def test_a_matching_arch_passes(tmp_path):
    root = _project(tmp_path, 'base = "xl.safetensors"\narch = "sdxl"\n')
    write_layout_checkpoint(root / "xl.safetensors", "sdxl")
    assert load_project(root).model["arch"] == "sdxl"


@pytest.mark.parametrize("kind, words", [("sd2", "SD2.x"), ("lora", "LoRA")])
def test_an_unsupported_file_is_an_error_at_the_base_line(tmp_path, kind, words):
    root = _project(tmp_path, 'base = "m.safetensors"\n')
    write_layout_checkpoint(root / "m.safetensors", kind)
    msgs = _errors(root)
    assert any(m.startswith("characters/project.toml:2: error: 'model.base' m.safetensors: this file is") and words in m
               for m in msgs), msgs


def test_a_broken_file_is_an_error_at_the_base_line(tmp_path):
    root = _project(tmp_path, 'base = "m.safetensors"\n')
    (root / "m.safetensors").write_bytes(b"0" * 64)
    msgs = _errors(root)
    assert any(m.startswith("characters/project.toml:2: error: 'model.base' m.safetensors: not a safetensors file") for m in msgs), msgs


def _diffusers(folder: Path, index: dict | None, unet: dict | None) -> Path:
    folder.mkdir(parents=True)
    if index is not None:
        (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    if unet is not None:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text(json.dumps(unet), encoding="utf-8")
    return folder


def test_diffusers_folders(tmp_path):
    assert diffusers_folder_arch(_diffusers(tmp_path / "a", {"_class_name": "StableDiffusionXLPipeline"}, None)) == "sdxl"
    assert diffusers_folder_arch(_diffusers(tmp_path / "b", None, {"addition_embed_type": "text_time"})) == "sdxl"
    assert diffusers_folder_arch(_diffusers(tmp_path / "c", {"_class_name": "StableDiffusionPipeline"},
                                            {"cross_attention_dim": 768})) == "sd15"
    with pytest.raises(CheckpointError, match="SD2"):
        diffusers_folder_arch(_diffusers(tmp_path / "d", {"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 1024}))
    with pytest.raises(CheckpointError, match="neither model_index.json nor unet/config.json"):
        diffusers_folder_arch(_diffusers(tmp_path / "e", None, None))


def test_a_diffusers_folder_in_the_config(tmp_path):
    root = _project(tmp_path, 'base = "xl"\narch = "sd15"\n')
    _diffusers(root / "xl", {"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "X"]}, None)
    assert any("characters/project.toml:3: error: 'model.arch' = 'sd15' but xl is an SDXL model" in m for m in _errors(root))


def test_tiny_names():
    assert tiny_base_arch("tiny") == "sd15" and tiny_base_arch("tiny:3") == "sd15"
    assert tiny_base_arch("tiny-sdxl") == "sdxl" and tiny_base_arch("tiny-sdxl:7") == "sdxl"
    assert tiny_base_arch("tiny:x") is None and tiny_base_arch("tinyxl") is None


def test_tiny_sdxl_project_gets_the_sdxl_defaults(tmp_path):
    root = _project(tmp_path, 'base = "tiny-sdxl"\n')
    p = load_project(root)
    assert p.model["arch"] == "sdxl"
    assert p.dataset["sizes"] == list(SDXL_DEFAULT_SIZES) == [256, 384, 512, 768, 1024, 1536]
    assert p.dataset["batch_sizes"] == SDXL_BATCH_SIZE_TABLES["default"]


def test_tiny_with_arch_sdxl_contradicts(tmp_path):
    root = _project(tmp_path, 'arch = "sdxl"\n')  # base defaults to "tiny" (SD1.5)
    assert any("'model.arch' = 'sdxl' but model.base 'tiny' is an SD1.x model" in m for m in _errors(root))


def test_user_sizes_and_tables_win_for_sdxl(tmp_path):
    root = _project(tmp_path, 'base = "tiny-sdxl"\n', '[dataset]\nsizes = [64, 96]\nbatch_sizes = "24GB"\n')
    p = load_project(root)
    assert p.dataset["sizes"] == [64, 96] and p.dataset["batch_sizes"]["LOW_LOW"] == 2


def test_sd15_table_names_are_not_sdxl_ones(tmp_path):
    root = _project(tmp_path, 'base = "tiny"\n', '[dataset]\nbatch_sizes = "24GB"\n')
    assert any("'dataset.batch_sizes' names no table: '24GB'; use one of the sd15 tables 'default', '12GB'" in m
               for m in _errors(root))


def test_ckpt_answer_is_cached_by_file_signature(tmp_path, monkeypatch):
    import torch

    from charbuild import base_arch as mod

    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
                               "cond_stage_model.transformer.x": torch.zeros(1)}}, path)
    cache = tmp_path / "cache"
    assert base_arch(path, cache) == "sd15"
    saved = json.loads((cache / "base-arch.json").read_text(encoding="utf-8"))
    assert list(saved.values())[0][2] == "sd15"
    mod._MEMO.clear()
    monkeypatch.setattr(mod, "check_checkpoint_arch", lambda p: pytest.fail("read again"))
    assert base_arch(path, cache) == "sd15"  # from the cache file, torch not needed
    path.write_bytes(path.read_bytes() + b"\0")  # a changed file is read again
    mod._MEMO.clear()
    with pytest.raises(pytest.fail.Exception):
        base_arch(path, cache)


# --------------------------------------------------------------------------- SDXL merge defaults

XL_FACE = "0,1,1,1,1,1,0,0,0,1,0,1,1,0,1,1,1,0,0,1"  # derived by hand from the SD1.5 FACE (docs/sdxl.md)
XL_BODY = "0,1,1,1,0,1,0,0,0,1,0,1,1,1,1,1,1,0,0,1"


def test_sdxl_forms_of_face_and_body():
    from charbuild.block_weights import arch_presets

    presets = arch_presets("sdxl")
    assert presets["FACE"] == [float(x) for x in XL_FACE.split(",")]
    assert presets["BODY"] == [float(x) for x in XL_BODY.split(",")]
    assert arch_presets("sd15") == {}
    assert arch_presets("sdxl", {"FACE": [1.0] * 20})["FACE"] == [1.0] * 20  # the user's preset wins


def test_sdxl_project_without_merge_table_uses_the_sdxl_forms(tmp_path):
    from charbuild.block_weights import resolve_merge_weights
    from charbuild.lora.blocks import SDXL_20

    root = _project(tmp_path, 'base = "tiny-sdxl"\n')
    p = load_project(root)  # the SD1.5 26-value FACE/BODY would fail here
    face = resolve_merge_weights("FACE", p)
    assert list(face) == SDXL_20 and list(face.values()) == [float(x) for x in XL_FACE.split(",")]
    body = resolve_merge_weights(p.merge["body"], p)
    assert list(body.values()) == [float(x) for x in XL_BODY.split(",")]


def test_sdxl_user_presets_named_face_win(tmp_path):
    from charbuild.block_weights import resolve_merge_weights

    root = _project(tmp_path, 'base = "tiny-sdxl"\n', '[merge.presets]\nFACE = "IN04:0.5,OUT00:0"\n')
    face = resolve_merge_weights("FACE", load_project(root))
    assert face["IN04"] == 0.5 and face["BASE"] == 1.0


def test_an_sd15_list_on_sdxl_is_applied_as_lbw_does_with_one_warning(tmp_path):
    from charbuild.lora.blocks import sd15_list_on_sdxl

    face26 = "0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1,1,1,0,1,1,1,0,0,1"
    root = _project(tmp_path, 'base = "tiny-sdxl"\n', f'[merge]\nface = "{face26}"\nbody = "ALL"\n')
    project = load_project(root)
    warned = [str(w) for w in project.warnings if "SD1.5 list on an SDXL LoRA" in w.message]
    assert len(warned) == 2 and all("project.toml:" in w for w in warned)  # once per setting, at its line
    assert "IN00, IN03, IN06, OUT00-OUT02 get 0" in warned[1]
    lora = next(lo for lo in project.loras.values() if lo.kind == "face")
    with pytest.warns(UserWarning):
        assert lora.merge_weights == sd15_list_on_sdxl([float(x) for x in face26.split(",")])


def test_a_weight_list_of_neither_arch_is_still_an_error(tmp_path):
    root = _project(tmp_path, 'base = "tiny-sdxl"\n', '[merge]\nface = "0,1,1,1,1,1,0,0,0,1,0,0,0,0,1"\n')
    assert any("'merge.face': 15 block weights given; sdxl takes 12 or 20" in m for m in _errors(root))


def test_switching_the_example_to_sdxl_takes_only_its_base(example_copy):
    """arch from the model, the project's SD1.5 presets applied as LBW does, and the ladder the
    example writes for the demo model (64 px) kept with a warning that SDXL trains at 1024 px."""
    from charbuild.lora.blocks import sd15_list_on_sdxl

    sd15 = load_project(example_copy)
    toml = example_copy / "characters/project.toml"
    text = toml.read_text(encoding="utf-8")
    assert 'base = "demo"\n' in text
    toml.write_text(text.replace('base = "demo"\n', 'base = "tiny-sdxl"\n'), encoding="utf-8")
    project = load_project(example_copy)
    assert (sd15.model["arch"], project.model["arch"]) == ("sd15", "sdxl")
    assert sd15.dataset["sizes"] == project.dataset["sizes"] == [64]  # written in the example: kept
    soft = project.merge["presets"]["BODY_SOFT"]
    with pytest.warns(UserWarning):
        assert len(soft) == 20 and soft == list(sd15_list_on_sdxl(sd15.merge["presets"]["BODY_SOFT"]).values())
    assert [w for w in project.warnings if "BODY_SOFT" in w.message and "SD1.5 list on an SDXL LoRA" in w.message]
    sizes = [str(w) for w in project.warnings if "'dataset.sizes'" in w.message]
    assert sizes and "tops out at 64 px, but the base model is SDXL" in sizes[0], sizes
    assert not [w for w in sd15.warnings if "SDXL" in w.message]
    toml.write_text(text.replace('base = "demo"\n', 'base = "tiny-sdxl"\n').replace("sizes = [64]", "# sizes"),
                    encoding="utf-8")
    ladder = load_project(example_copy)  # no ladder written: SDXL's
    assert ladder.dataset["sizes"] == [256, 384, 512, 768, 1024, 1536]
    small = [str(w) for w in ladder.warnings if "prepared at 512 px at most" in w.message]  # 512 px sources
    assert small and small[0].startswith("characters/chaneko/face: warning: the base model is SDXL"), small


def test_an_sdxl_project_whose_ladder_stays_below_1024_is_warned(tmp_path):
    root = make_project(tmp_path / "p", sizes=(128, 256, 512), project_extra='[model]\nbase = "tiny-sdxl"\n')
    project = load_project(root)
    warned = [w for w in project.warnings if "'dataset.sizes'" in w.message]
    assert len(warned) == 1 and "tops out at 512 px, but the base model is SDXL" in warned[0].message
    assert str(warned[0]).startswith("characters/project.toml:2: warning:")
    root = make_project(tmp_path / "q", sizes=(64, 1024), project_extra='[model]\nbase = "tiny-sdxl"\n')
    warnings = [w.message for w in load_project(root).warnings]
    assert not [w for w in warnings if "'dataset.sizes'" in w]
    assert [w for w in warnings if "prepared at 64 px at most" in w]  # make_project's pictures are 96 px



def test_an_sd15_weight_list_in_an_sdxl_project_is_applied_as_lbw_does(tmp_path):
    weights = "0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1,1,1,0,1,1,1,0,0,1"
    root = make_project(tmp_path / "p", sizes=(512, 1024), project_extra=f'[model]\nbase = "tiny-sdxl"\n[merge]\nface = "{weights}"\n')
    project = load_project(root)
    from charbuild.lora.blocks import sd15_list_on_sdxl

    with pytest.warns(UserWarning, match="reach no SDXL block"):
        expected = sd15_list_on_sdxl([float(w) for w in weights.split(",")])
    assert next(lo for lo in project.loras.values() if lo.kind == "face").merge_weights == expected

def test_sdxl_explore_candidates_take_the_sdxl_forms_and_warn_for_sd15_lists(tmp_path):
    from charbuild.lora.blocks import SDXL_20

    root = _project(tmp_path, 'base = "tiny-sdxl"\n', '[merge]\nexplore = ["FACE", "ALL", "IN04:0.5"]\n')
    project = load_project(root)
    lora = next(lo for lo in project.loras.values() if lo.kind == "face")
    face, all17, named = lora.explore_candidates
    assert list(face.weights) == SDXL_20 and list(face.weights.values()) == [float(x) for x in XL_FACE.split(",")]
    assert all17.weights["IN00"] == 0.0 and all17.weights["IN04"] == 1.0  # as LBW applies a 17-value list
    assert named.weights["IN04"] == 0.5 and named.weights["OUT08"] == 1.0
    warned = [str(w) for w in project.warnings if "SD1.5 list on an SDXL LoRA" in w.message]
    assert len(warned) == 1 and "project.toml:" in warned[0] and "'merge.explore'" in warned[0]
