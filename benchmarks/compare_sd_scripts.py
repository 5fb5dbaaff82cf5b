"""Check charbuild's outputs against the real kohya-ss sd-scripts (opt-in; see benchmarks/SD_SCRIPTS.md).

Run with the *project's* python; the sd-scripts side runs in sd-scripts' own venv as a subprocess:

    CHARBUILD_SD_SCRIPTS=/tmp/sd-scripts CHARBUILD_SD_PYTHON=/tmp/sdenv/bin/python \\
        python benchmarks/compare_sd_scripts.py [--checks dataset,compress,load] [--real-weights]

Checks (each prints PASS/FAIL lines, exit status 1 if any FAILs):

* ``dataset``  build the dataset TOMLs of a copy of the example project, then read each one in
  sd-scripts exactly as train_network.py does (``train_network.setup_parser`` +
  ``ConfigSanitizer(True, True, False, True)`` + ``BlueprintGenerator`` +
  ``generate_dataset_group_by_blueprint``), count images per subset, compare every caption
  sd-scripts read with our ``.txt``, and fetch one batch item (images decoded, captions tokenized).
* ``compress`` a random kohya LoRA (SD1.5 names/shapes; linear, 1x1 and 3x3 conv, a module
  without alpha, an all-zero module) resized by sd-scripts ``networks/resize_lora.py`` and by
  ``charbuild.lora.compress.compress_file`` for sv_ratio 16, sv_fro 0.9 and fixed rank 4:
  same keys, ranks, alphas, dtypes, full deltas, ``ss_*`` metadata, and sshs hashes valid by
  sd-scripts' own definition.
* ``load``  load charbuild-written LoRAs with ``networks.lora.create_network_from_weights``
  (for_inference=True) into sd-scripts' SD1.5 U-Net (``library.original_unet``) and CLIP text
  encoder built from sd-scripts' own configs (weights on the meta device unless
  ``--real-weights``): every key maps to a module, ``load_state_dict`` strict, and each
  module's LoRA output equals our delta formula. A LoRA trained by the builtin trainer on the
  tiny model is checked for names against SD1.5 and loaded fully into the tiny model itself.

Nothing here is imported by charbuild; the test module ``tests/test_sd_scripts_real.py`` reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


@dataclass
class SdEnv:
    sd_scripts: Path
    python: Path

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.sd_scripts)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("PYTHONWARNINGS", "ignore")
        return env


def sd_env_from_environ(sd_scripts: str | None = None, sd_python: str | None = None) -> tuple[SdEnv | None, str]:
    """The sd-scripts checkout and venv python from CHARBUILD_SD_SCRIPTS / CHARBUILD_SD_PYTHON;
    ``sd_scripts``/``sd_python`` (a script's ``--sd-scripts``/``--sd-python``) set them first."""
    for var, value in (("CHARBUILD_SD_SCRIPTS", sd_scripts), ("CHARBUILD_SD_PYTHON", sd_python)):
        if value:
            os.environ[var] = value
    root = os.environ.get("CHARBUILD_SD_SCRIPTS")
    py = os.environ.get("CHARBUILD_SD_PYTHON")
    if not root or not py:
        return None, "set CHARBUILD_SD_SCRIPTS (an sd-scripts checkout) and CHARBUILD_SD_PYTHON (a python with its deps)"
    root_p, py_p = Path(root), Path(py)
    if not (root_p / "networks" / "lora.py").is_file() or not (root_p / "library" / "config_util.py").is_file():
        return None, f"CHARBUILD_SD_SCRIPTS={root} has no networks/lora.py and library/config_util.py"
    if not py_p.exists():
        return None, f"CHARBUILD_SD_PYTHON={py} does not exist"
    return SdEnv(root_p, py_p), ""


@dataclass
class Result:
    name: str
    lines: list[tuple[bool | None, str]] = field(default_factory=list)  # (ok, text); None = info
    data: dict = field(default_factory=dict)

    def check(self, ok: bool, text: str) -> bool:
        self.lines.append((bool(ok), text))
        return bool(ok)

    def info(self, text: str) -> None:
        self.lines.append((None, text))

    @property
    def ok(self) -> bool:
        return all(ok is not False for ok, _ in self.lines) and any(ok for ok, _ in self.lines)

    def failures(self) -> list[str]:
        return [t for ok, t in self.lines if ok is False]

    def render(self) -> str:
        out = []
        for ok, text in self.lines:
            tag = "INFO" if ok is None else ("PASS" if ok else "FAIL")
            out.append(f"  {tag}  {text}")
        out.append(f"{'PASS' if self.ok else 'FAIL'}: {self.name}")
        return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The sd-scripts side: one script run with sd-scripts' python, cwd and PYTHONPATH set
# --------------------------------------------------------------------------------------------

SD_WORKER = r'''
import json, os, sys, time, logging
logging.disable(logging.WARNING)
cmd, args_file, out_file = sys.argv[1], sys.argv[2], sys.argv[3]
A = json.load(open(args_file, encoding="utf-8"))
import torch


def make_tokenizer(tokdir):
    """The offline tokenizer trick: a byte-level CLIP BPE where sd-scripts' --tokenizer_cache_dir looks."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    path = os.path.join(tokdir, "openai_clip-vit-large-patch14")
    if not os.path.exists(path):
        os.makedirs(tokdir, exist_ok=True)
        syms = list(bytes_to_unicode().values())
        vocab = {s: i for i, s in enumerate(syms)}
        vocab.update({s + "</w>": 256 + i for i, s in enumerate(syms)})
        vocab["<|startoftext|>"] = 512
        vocab["<|endoftext|>"] = 513
        with open(os.path.join(tokdir, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(os.path.join(tokdir, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        CLIPTokenizer(os.path.join(tokdir, "vocab.json"), os.path.join(tokdir, "merges.txt"),
                      model_max_length=77).save_pretrained(path)


def cmd_dataset():
    import train_network
    from library import train_util, config_util, strategy_base
    make_tokenizer(A["tokenizer_dir"])
    results = []
    for toml_path in A["tomls"]:
        t0 = time.time()
        parser = train_network.setup_parser()
        args = parser.parse_args(["--dataset_config", toml_path, "--tokenizer_cache_dir", A["tokenizer_dir"],
                                  "--pretrained_model_name_or_path", "unused", "--seed", "1"])
        train_util.prepare_dataset_args(args, True)
        if strategy_base.TokenizeStrategy.get_strategy() is None:  # process-wide, set once
            trainer = train_network.NetworkTrainer()
            strategy_base.TokenizeStrategy.set_strategy(trainer.get_tokenize_strategy(args))
            strategy_base.LatentsCachingStrategy.set_strategy(trainer.get_latents_caching_strategy(args))
        # as train_network.NetworkTrainer.train does
        generator = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, args.masked_loss, True))
        user_config = config_util.load_user_config(args.dataset_config)
        blueprint = generator.generate(user_config, args)
        group, val_group = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
        group.set_current_strategies()
        datasets = []
        for ds in group.datasets:
            subsets = [dict(image_dir=s.image_dir, img_count=s.img_count, num_repeats=s.num_repeats,
                            class_tokens=getattr(s, "class_tokens", None), caption_extension=getattr(s, "caption_extension", None),
                            flip_aug=s.flip_aug, color_aug=s.color_aug, shuffle_caption=s.shuffle_caption,
                            keep_tokens=s.keep_tokens, is_reg=getattr(s, "is_reg", None)) for s in ds.subsets]
            captions = {os.path.abspath(info.absolute_path): info.caption for info in ds.image_data.values()}
            datasets.append(dict(type=type(ds).__name__, batch_size=ds.batch_size, resolution=[ds.width, ds.height],
                                 enable_bucket=ds.enable_bucket, bucket_no_upscale=ds.bucket_no_upscale,
                                 num_train_images=ds.num_train_images, num_reg_images=getattr(ds, "num_reg_images", None),
                                 buckets=sorted({tuple(i.bucket_reso) for i in ds.image_data.values()}),
                                 subsets=subsets, captions=captions))
        item = group[0]
        sample = dict(captions=list(item["captions"]), images=list(item["images"].shape) if item["images"] is not None else None,
                      input_ids=[list(t.shape) for t in item["input_ids_list"]] if item.get("input_ids_list") else None)
        results.append(dict(toml=toml_path, batches=len(group), num_train_images=group.num_train_images,
                            datasets=datasets, sample=sample, seconds=time.time() - t0))
    return dict(results=results)


def cmd_hash():
    from safetensors.torch import load_file
    from safetensors import safe_open
    from library import train_util
    out = {}
    for f in A["files"]:
        tensors = load_file(f)
        with safe_open(f, framework="pt") as h:
            meta = h.metadata() or {}
        mh, lh = train_util.precalculate_safetensors_hashes(tensors, meta)
        out[f] = dict(expected_model_hash=mh, expected_legacy_hash=lh,
                      stored_model_hash=meta.get("sshs_model_hash"), stored_legacy_hash=meta.get("sshs_legacy_hash"))
    return out


def sd15_models(real):
    """sd-scripts' own SD1.5 classes and configs (library.model_util), weights random or on meta."""
    from library import model_util
    from library.original_unet import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-05, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         model_type="clip_text_model", projection_dim=768)
    unet_cfg = model_util.create_unet_diffusers_config(False)
    if real:
        unet = UNet2DConditionModel(**unet_cfg)
        te = CLIPTextModel._from_config(cfg)
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_cfg)
            te = CLIPTextModel._from_config(cfg)
    return te, unet


def diffusers_models(folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"))
    te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"))
    return te, unet


def file_delta(sd, stem):
    up = sd[stem + ".lora_up.weight"].double()
    down = sd[stem + ".lora_down.weight"].double()
    r = down.shape[0]
    alpha = float(sd[stem + ".alpha"].double()) if stem + ".alpha" in sd else float(r)
    d = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * (alpha / r)
    return d.reshape((up.shape[0],) + tuple(down.shape[1:]))


def cmd_load():
    from safetensors.torch import load_file
    import networks.lora as lora_mod
    import torch.nn.functional as F
    model = A["model"]
    t0 = time.time()
    if model == "sd15-meta":
        te, unet = sd15_models(False)
    elif model == "sd15-real":
        te, unet = sd15_models(True)
    else:
        te, unet = diffusers_models(model)
    model_seconds = time.time() - t0
    real = not any(p.is_meta for p in unet.parameters())
    # every module sd-scripts can adapt (linear, 1x1 and 3x3 conv), to tell "name unknown" from "not in file"
    full = lora_mod.LoRANetwork(te, unet, lora_dim=1, alpha=1, conv_lora_dim=1, conv_alpha=1)
    all_names = {l.lora_name: list(l.lora_down.weight.shape[1:]) for l in full.text_encoder_loras + full.unet_loras}
    del full
    out = dict(model=model, model_seconds=model_seconds, real_weights=real, adaptable=len(all_names), files={})
    g = torch.Generator().manual_seed(0)
    for f in A["files"]:
        sd = load_file(f)
        stems = sorted({k.split(".")[0] for k in sd if "." in k})
        network, weights_sd = lora_mod.create_network_from_weights(1.0, f, None, te, unet, for_inference=True)
        loras = network.text_encoder_loras + network.unet_loras
        created = {l.lora_name for l in loras}
        res = dict(stems=len(stems), created=len(created),
                   unmapped=[s for s in stems if s not in created],
                   unknown_names=[s for s in stems if s not in all_names],
                   te_modules=len(network.text_encoder_loras), unet_modules=len(network.unet_loras))
        # as inference does (gen_img.py): patch the modules, then load the weights into the network
        network.apply_to(te, unet, True, True)
        worst = (0.0, None)
        checked = 0
        try:
            try:
                network.load_state_dict(weights_sd, strict=True)
                res["load_state_dict"] = "ok"
            except Exception as e:  # size mismatch or missing/unexpected keys
                res["load_state_dict"] = f"{type(e).__name__}: {str(e)[:2000]}"
            # each module: sd-scripts' LoRA output against (alpha / r) * up @ down from the file
            if res["load_state_dict"] == "ok":
                dt = torch.float32
                if real:  # in float64: the LoRA part is tiny next to the module's output (cancellation)
                    dt = torch.float64
                    te.to(dt), unet.to(dt), network.to(dt)
                with torch.no_grad():
                    for l in loras:
                        org = l.org_module_ref[0]
                        d = file_delta(weights_sd, l.lora_name).to(dt)
                        if org.__class__.__name__ == "Conv2d":
                            x = torch.randn(1, org.in_channels, 12, 12, generator=g).to(dt)
                            ref = F.conv2d(x, d, None, org.stride, org.padding)
                        else:
                            x = torch.randn(3, org.in_features, generator=g).to(dt)
                            ref = F.linear(x, d)
                        if real:  # the patched forward, as inference runs it, minus the original
                            got = org.forward(x) - l.org_forward(x)
                        else:
                            got = l.lora_up(l.lora_down(x)) * l.multiplier * l.scale
                        den = float(ref.norm())
                        err = float((got - ref).norm()) / den if den > 0 else float(got.norm())
                        if err >= worst[0]:
                            worst = (err, l.lora_name)
                        checked += 1
        finally:  # un-patch, so the next file starts from the plain model
            for l in loras:
                l.org_module_ref[0].forward = l.org_forward
        res["delta_checked"] = checked
        res["delta_worst_rel_err"] = worst[0]
        res["delta_worst_module"] = worst[1]
        out["files"][f] = res
    return out


result = {"dataset": cmd_dataset, "hash": cmd_hash, "load": cmd_load}[cmd]()
with open(out_file, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=str)
'''


def run_sd(sd: SdEnv, work: Path, cmd: str, args: dict, *, cwd: Path | None = None, timeout: float = 1800) -> dict:
    """Run one SD_WORKER command with sd-scripts' python; return its JSON result."""
    work.mkdir(parents=True, exist_ok=True)
    worker = work / "sd_worker.py"
    worker.write_text(SD_WORKER, encoding="utf-8")
    args_file = work / f"{cmd}.args.json"
    out_file = work / f"{cmd}.out.json"
    args_file.write_text(json.dumps(args), encoding="utf-8")
    if out_file.exists():
        out_file.unlink()
    proc = subprocess.run([str(sd.python), str(worker), cmd, str(args_file), str(out_file)], cwd=str(cwd or sd.sd_scripts),
                          env=sd.env(), capture_output=True, text=True, timeout=timeout)
    (work / f"{cmd}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0 or not out_file.exists():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"sd-scripts worker {cmd!r} failed (exit {proc.returncode}); log {work / (cmd + '.log')}:\n{tail}")
    return json.loads(out_file.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# a. dataset TOMLs
# --------------------------------------------------------------------------------------------


def build_example_project(dest: Path, source: Path | None = None) -> Path:
    """A copy of the repo's example project with its images, captions and dataset TOMLs built.

    Falls back to a tiny generated project (tests/conftest.py make_project) when the example has
    no pictures.
    """
    source = source or REPO / "characters"
    if dest.exists():
        shutil.rmtree(dest)
    if any(source.glob("*/face/*.png")):
        shutil.copytree(source, dest / "characters")
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import make_project  # noqa: E402

        make_project(dest)
    proc = subprocess.run([sys.executable, "-m", "charbuild.cli", "build", "image", "caption", "dataset", "--root", str(dest)],
                          capture_output=True, text=True, cwd=str(dest))
    if proc.returncode != 0:
        raise RuntimeError(f"charbuild build failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dest


def check_dataset(sd: SdEnv, work: Path, project: Path | None = None) -> Result:
    import tomllib

    res = Result("a. dataset TOMLs read by sd-scripts library.config_util")
    t0 = time.time()
    project = project or build_example_project(work / "project")
    tomls = sorted((project / "build" / "loras").glob("*/dataset.toml"))
    res.info(f"built {len(tomls)} dataset TOML(s) in {time.time() - t0:.1f}s under {project}")
    if not res.check(len(tomls) > 0, "charbuild wrote dataset TOMLs"):
        return res
    rel = [str(t.relative_to(project)) for t in tomls]
    out = run_sd(sd, work / "sd_dataset", "dataset", {"tomls": rel, "tokenizer_dir": str(work / "tokenizer")}, cwd=project)
    res.data = out
    for entry, toml_path in zip(out["results"], tomls):
        ours = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        lora = toml_path.parent.name
        n_sub_ours = sum(len(d.get("subsets", [])) for d in ours.get("datasets", []))
        subsets = [s for d in entry["datasets"] for s in d["subsets"]]
        counts = {}
        mism = []
        n_caps = 0
        missing_txt = []
        for s in subsets:
            img_dir = project / s["image_dir"]
            pngs = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
            counts[s["image_dir"]] = (s["img_count"], len(pngs))
        for d in entry["datasets"]:
            for path, cap in d["captions"].items():
                txt = Path(path).with_suffix(".txt")
                if not txt.exists():
                    missing_txt.append(path)
                    continue
                ours_cap = txt.read_text(encoding="utf-8").splitlines()[0].strip()
                n_caps += 1
                if cap != ours_cap:
                    mism.append((path, ours_cap, cap))
        bad_counts = {k: v for k, v in counts.items() if v[0] != v[1]}
        total = sum(v[0] for v in counts.values())
        ds0 = entry["datasets"][0]
        res.check(len(subsets) == n_sub_ours and not bad_counts,
                  f"{lora}: {len(entry['datasets'])} dataset(s), {len(subsets)} subset(s), {total} image(s) "
                  f"({', '.join('/'.join(Path(k).parts[-3:]) + f':{v[0]}' for k, v in counts.items())}); "
                  f"{entry['num_train_images']} train images with repeats, {entry['batches']} batches, "
                  f"resolution {ds0['resolution']}, batch {ds0['batch_size']}, buckets {ds0['buckets']}"
                  + (f"; image count differs from the folder: {bad_counts}" if bad_counts else ""))
        res.check(not mism and not missing_txt and n_caps == total,
                  f"{lora}: {n_caps}/{total} captions sd-scripts read equal our .txt"
                  + (f"; first mismatch {mism[0][0]}: ours {mism[0][1]!r} vs sd-scripts {mism[0][2]!r}" if mism else "")
                  + (f"; no .txt for {missing_txt[:3]}" if missing_txt else ""))
        first = next(iter(ds0["captions"].items()))
        res.info(f"{lora}: e.g. {Path(first[0]).relative_to(project)} -> {first[1][:90]!r}...")
        sample = entry["sample"]
        res.check(sample["images"] is not None and sample["input_ids"],
                  f"{lora}: batch 0 loads: images {sample['images']}, input_ids {sample['input_ids']}, "
                  f"{len(sample['captions'])} caption(s)")
    return res


# --------------------------------------------------------------------------------------------
# b. compression against networks/resize_lora.py
# --------------------------------------------------------------------------------------------

#: (stem, out, in, kernel, rank, alpha or None, spectrum decay per rank component; 0 = all-zero up)
RANDOM_LORA_MODULES = [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768, 0, 8, 4.0, 0.6),
    ("lora_te_text_model_encoder_layers_11_mlp_fc1", 3072, 768, 0, 8, 4.0, 0.5),
    ("lora_te_text_model_encoder_layers_5_self_attn_out_proj", 768, 768, 0, 8, 4.0, 0.0),   # untrained: up = 0
    ("lora_unet_down_blocks_0_attentions_0_proj_in", 320, 320, 1, 8, 4.0, 0.7),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768, 0, 8, None, 0.6),  # no alpha
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj", 10240, 1280, 0, 16, 8.0, 0.75),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0", 320, 320, 0, 8, 1.0, 0.95),  # flat
    ("lora_unet_down_blocks_0_downsamplers_0_conv", 320, 320, 3, 8, 4.0, 0.6),
    ("lora_unet_down_blocks_1_resnets_0_conv1", 640, 320, 3, 8, 4.0, 0.55),
    ("lora_unet_up_blocks_1_resnets_2_conv2", 1280, 1280, 3, 8, 4.0, 0.65),
    ("lora_unet_up_blocks_2_resnets_0_conv_shortcut", 640, 1920, 1, 8, 4.0, 0.6),
    ("lora_unet_up_blocks_3_attentions_0_proj_out", 320, 320, 1, 8, 8.0, 0.5),
]

SOURCE_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "8",
    "ss_network_alpha": "4.0",
    "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"}),
    "ss_base_model_version": "sd_v1",
    "ss_output_name": "randomlora",
    "ss_training_comment": "charbuild compare_sd_scripts random LoRA",
    "ss_tag_frequency": json.dumps({"1_rnd": {"rnd": 3}}),
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": "stable-diffusion-v1/lora",
    "modelspec.title": "randomlora",
}


def make_random_lora(path: Path, seed: int = 1234, dtype: str = "fp16") -> Path:
    """A kohya LoRA with SD1.5 names and shapes and decaying singular values, saved with safetensors."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tdtype = {"fp16": torch.float16, "float": torch.float32}[dtype]
    sd = {}
    for stem, out_c, in_c, k, r, alpha, decay in RANDOM_LORA_MODULES:
        kk = max(k, 1)
        down = (torch.rand(r, in_c * kk * kk, generator=g) * 2 - 1) / (in_c * kk * kk) ** 0.5
        if decay == 0:
            up = torch.zeros(out_c, r)
        else:
            up = torch.randn(out_c, r, generator=g) * 0.01 * torch.tensor([decay**i for i in range(r)])
        if k:
            sd[f"{stem}.lora_down.weight"] = down.reshape(r, in_c, kk, kk).to(tdtype).contiguous()
            sd[f"{stem}.lora_up.weight"] = up.reshape(out_c, r, 1, 1).to(tdtype).contiguous()
        else:
            sd[f"{stem}.lora_down.weight"] = down.to(tdtype).contiguous()
            sd[f"{stem}.lora_up.weight"] = up.to(tdtype).contiguous()
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha).to(tdtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=dict(SOURCE_METADATA))
    return path


def _read(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


def _delta(sd: dict, stem: str):
    up = sd[stem + ".lora_up.weight"].float()
    down = sd[stem + ".lora_down.weight"].float()
    r = down.shape[0]
    alpha = float(sd[stem + ".alpha"].float()) if stem + ".alpha" in sd else float(r)
    return (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)) * (alpha / r)


#: name -> (resize_lora.py args, compress_file kwargs)
COMPRESS_CASES = {
    "sv_ratio16": (["--new_rank", "128", "--dynamic_method", "sv_ratio", "--dynamic_param", "16"],
                   dict(method="sv_ratio", param=16.0, new_rank=128)),
    "sv_fro0.9": (["--new_rank", "128", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"],
                  dict(method="sv_fro", param=0.9, new_rank=128)),
    "rank4": (["--new_rank", "4"], dict(method=None, param=0.0, new_rank=4)),
    "rank4conv2": (["--new_rank", "4", "--new_conv_rank", "2"], dict(method=None, param=0.0, new_rank=4, new_conv_rank=2)),
    "sv_cumulative0.9conv3": (["--new_rank", "128", "--new_conv_rank", "3", "--dynamic_method", "sv_cumulative",
                               "--dynamic_param", "0.9"],
                              dict(method="sv_cumulative", param=0.9, new_rank=128, new_conv_rank=3)),
}


def run_resize_lora(sd: SdEnv, src: Path, dst: Path, extra: list[str], timeout: float = 3600) -> float:
    cmd = [str(sd.python), "networks/resize_lora.py", "--save_to", str(dst), "--model", str(src), *extra,
           "--save_precision", "fp16", "--device", "cpu"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=str(sd.sd_scripts), env=sd.env(), capture_output=True, text=True, timeout=timeout)
    dt = time.time() - t0
    (dst.parent / (dst.stem + ".log")).write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0 or not dst.exists():
        raise RuntimeError(f"resize_lora.py failed (exit {proc.returncode}):\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
    return dt


def import_compress_file(wait_s: float = 0.0):
    """charbuild.lora.compress.compress_file, retrying for ``wait_s`` seconds (it may be in progress)."""
    import importlib

    deadline = time.time() + wait_s
    while True:
        try:
            mod = importlib.import_module("charbuild.lora.compress")
            return mod.compress_file
        except (ImportError, AttributeError) as e:
            if time.time() >= deadline:
                raise ImportError(f"charbuild.lora.compress.compress_file not importable: {e}") from e
            time.sleep(30)


def compare_lora_files(ours_p: Path, theirs_p: Path, src_p: Path, res: Result, label: str, *, rel_tol: float = 1e-2) -> dict:
    """Per-module comparison of a charbuild output with sd-scripts' output of the same source."""
    ours, om = _read(ours_p)
    theirs, tm = _read(theirs_p)
    src, sm = _read(src_p)
    ok_keys = res.check(set(ours) == set(theirs),
                        f"{label}: same key set ({len(theirs)} keys)" if set(ours) == set(theirs) else
                        f"{label}: key sets differ: only ours {sorted(set(ours) - set(theirs))[:6]}, "
                        f"only sd-scripts {sorted(set(theirs) - set(ours))[:6]}")
    common_stems = sorted({k.split(".")[0] for k in set(ours) & set(theirs)})
    rank_diff, alpha_diff, shape_diff, dtype_diff, above_own = [], [], [], [], []
    worst_err, worst_stem = 0.0, None
    ranks = {}
    for stem in common_stems:
        dk, uk, ak = stem + ".lora_down.weight", stem + ".lora_up.weight", stem + ".alpha"
        if dk not in ours or dk not in theirs:
            continue
        r_o, r_t = ours[dk].shape[0], theirs[dk].shape[0]
        ranks[stem] = (r_t, r_o)
        r_src = src[dk].shape[0] if dk in src else None
        if r_src is not None and r_t > r_src and r_o == r_src:
            # charbuild's one deviation (compress.py): never above the module's own rank, where
            # resize_lora.py's + 1 pads a zero direction in; the delta must still be equal
            above_own.append(f"{stem}: sd-scripts {r_t}, ours {r_o} (its own rank)")
        elif r_o != r_t:
            rank_diff.append(f"{stem}: sd-scripts {r_t}, ours {r_o}")
        continue_shapes = r_o == r_t  # shapes and alphas are comparable only at equal ranks
        for k in (dk, uk, ak) if continue_shapes else ():
            if k in ours and k in theirs:
                if tuple(ours[k].shape) != tuple(theirs[k].shape):
                    shape_diff.append(f"{k}: sd-scripts {tuple(theirs[k].shape)}, ours {tuple(ours[k].shape)}")
                if ours[k].dtype != theirs[k].dtype:
                    dtype_diff.append(f"{k}: sd-scripts {theirs[k].dtype}, ours {ours[k].dtype}")
        a_o = float(ours[ak].float()) if ak in ours else None
        a_t = float(theirs[ak].float()) if ak in theirs else None
        if a_o != a_t and continue_shapes:  # alpha = old alpha / r · k follows the rank k
            alpha_diff.append(f"{stem}: sd-scripts {a_t}, ours {a_o}")
        d_t, d_o = _delta(theirs, stem), _delta(ours, stem)
        if d_t.shape != d_o.shape:
            continue
        n = float(d_t.norm())
        err = float((d_o - d_t).norm()) / n if n > 0 else float(d_o.norm())
        if err >= worst_err:
            worst_err, worst_stem = err, stem
    res.check(not rank_diff, f"{label}: ranks equal per module "
              + (f"(sd-scripts ranks {sorted({r for r, _ in ranks.values()})})" if not rank_diff else f"{rank_diff}"))
    if above_own:
        res.info(f"{label}: ranks capped at the module's own rank where resize_lora.py goes above it: {above_own}")
    res.check(not shape_diff, f"{label}: tensor shapes equal" + (f": {shape_diff[:4]}" if shape_diff else ""))
    res.check(not dtype_diff, f"{label}: dtypes equal ({next(iter(theirs.values())).dtype})" + (f": {dtype_diff[:4]}" if dtype_diff else ""))
    res.check(not alpha_diff, f"{label}: alphas equal" + (f": {alpha_diff}" if alpha_diff else ""))
    res.check(worst_err < rel_tol, f"{label}: full deltas (alpha/r)·up@down match, worst relative error "
              f"{worst_err:.2e} ({worst_stem}; tolerance {rel_tol:g})")
    # how much of the source each keeps (info)
    fro = []
    for stem in common_stems:
        s = _delta(src, stem)
        n = float(s.norm())
        if n > 0 and stem + ".lora_down.weight" in ours:
            fro.append((float((_delta(ours, stem) - s).norm()) / n, float((_delta(theirs, stem) - s).norm()) / n))
    if fro:
        res.info(f"{label}: mean relative error against the source delta: ours {sum(a for a, _ in fro) / len(fro):.3e}, "
                 f"sd-scripts {sum(b for _, b in fro) / len(fro):.3e}")
    # metadata
    for key in ("ss_network_dim", "ss_network_alpha", "ss_training_comment"):
        res.check(om.get(key) == tm.get(key), f"{label}: metadata {key} equal ({tm.get(key)!r})"
                  if om.get(key) == tm.get(key) else f"{label}: metadata {key}: sd-scripts {tm.get(key)!r}, ours {om.get(key)!r}")
    kept_by_them = {k for k in sm if k in tm and tm[k] == sm[k]}
    lost = sorted(k for k in kept_by_them if om.get(k) != sm[k])
    res.check(not lost, f"{label}: other source metadata kept as sd-scripts keeps it ({len(kept_by_them)} keys)"
              + (f"; ours changed/dropped {lost}" if lost else ""))
    extra = sorted(set(om) - set(tm))
    if extra:
        res.info(f"{label}: metadata keys only in ours: {extra}")
    return dict(ranks=ranks, worst_err=worst_err, keys_equal=ok_keys)


def check_compress(sd: SdEnv, work: Path, cases: list[str] | None = None, wait_for_charbuild_s: float = 0.0) -> Result:
    res = Result("b. compression vs sd-scripts networks/resize_lora.py")
    work.mkdir(parents=True, exist_ok=True)
    src = make_random_lora(work / "random_lora.safetensors")
    res.info(f"source: {len(RANDOM_LORA_MODULES)} modules (linear, 1x1, 3x3 conv; one without alpha, one all-zero), fp16, {src}")
    try:
        compress_file = import_compress_file(wait_for_charbuild_s)
    except ImportError as e:
        res.check(False, str(e))
        return res
    hash_files = []
    for name in cases or list(COMPRESS_CASES):
        sd_args, cb_kwargs = COMPRESS_CASES[name]
        theirs = work / f"sdscripts_{name}.safetensors"
        ours = work / f"charbuild_{name}.safetensors"
        t_sd = run_resize_lora(sd, src, theirs, sd_args)
        t0 = time.time()
        try:
            compress_file(src, ours, save_precision="fp16", **cb_kwargs)
        except Exception as e:  # report, go on with the other cases
            res.check(False, f"{name}: charbuild compress_file raised {type(e).__name__}: {e}")
            continue
        t_cb = time.time() - t0
        res.info(f"{name}: resize_lora.py {t_sd:.1f}s (process, incl. imports), charbuild compress_file {t_cb:.2f}s")
        res.data[name] = compare_lora_files(ours, theirs, src, res, name)
        hash_files += [str(ours), str(theirs)]
    if hash_files:
        hashes = run_sd(sd, work / "sd_hash", "hash", {"files": hash_files})
        for f in hash_files:
            h = hashes[f]
            who = "sd-scripts" if Path(f).name.startswith("sdscripts_") else "charbuild"
            ok = h["stored_model_hash"] == h["expected_model_hash"] and h["stored_legacy_hash"] == h["expected_legacy_hash"]
            res.check(ok, f"{Path(f).stem}: sshs_model_hash/sshs_legacy_hash equal sd-scripts' "
                      f"precalculate_safetensors_hashes of the file" + ("" if ok else
                      f": stored {h['stored_model_hash']}/{h['stored_legacy_hash']}, expected "
                      f"{h['expected_model_hash']}/{h['expected_legacy_hash']}") + (" (control)" if who == "sd-scripts" else ""))
    return res


# --------------------------------------------------------------------------------------------
# c. loading in sd-scripts
# --------------------------------------------------------------------------------------------


def train_builtin_lora(work: Path, timeout: float = 1500) -> Path | None:
    """A LoRA trained by charbuild's builtin trainer (tiny model) on a small generated project.

    Returns the raw trained file, or None when the pipeline cannot train yet.
    """
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import draw_picture  # noqa: E402

    root = work / "trainproj"
    if root.exists():
        shutil.rmtree(root)
    chars = root / "characters"
    (chars / "alice").mkdir(parents=True)
    (chars / "project.toml").write_text(
        '[model]\nbase = "tiny"\n[dataset]\nsizes = [64]\n'
        '[training]\nvariants = ["Lora3x3A50p-AdamW8"]\ndim = 4\n[trainer]\nbackend = "builtin"\n', encoding="utf-8")
    (chars / "alice" / "character.toml").write_text(
        'keyword = "alc"\nclass = "girl"\ntags = []\nbackground = "black"\n[face]\nrepeats = 1\nsteps = 3\n', encoding="utf-8")
    for i, code in enumerate(["f00", "f01", "f02", "f10"]):
        draw_picture(chars / "alice" / "face" / f"{code}.png", code, seed=i)
    proc = subprocess.run([sys.executable, "-m", "charbuild.cli", "build", "--continue", "--root", str(root)],
                          capture_output=True, text=True, cwd=str(root), timeout=timeout)
    (work / "trainproj.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    files = sorted((root / "build" / "loras").glob("*/*/raw.safetensors"))
    return files[0] if files else None


def check_loading(sd: SdEnv, work: Path, files: list[Path], *, real_weights: bool = False,
                  tiny_files: list[Path] | None = None, tiny_model: Path | None = None) -> Result:
    res = Result("c. charbuild LoRAs load in sd-scripts networks.lora.create_network_from_weights")
    tiny_files = tiny_files or []
    model = "sd15-real" if real_weights else "sd15-meta"
    all_files = [str(f) for f in files + tiny_files]
    out = run_sd(sd, work / "sd_load", "load", {"files": all_files, "model": model})
    res.info(f"sd-scripts SD1.5 U-Net (library.original_unet) + CLIP ViT-L text encoder, "
             f"{'random weights' if out['real_weights'] else 'meta device (no weights)'}, built in {out['model_seconds']:.1f}s; "
             f"{out['adaptable']} adaptable modules (linear, 1x1 and 3x3 conv)")
    res.data["sd15"] = out
    for f in files:
        r = out["files"][str(f)]
        label = Path(f).name
        res.check(not r["unmapped"] and r["created"] == r["stems"],
                  f"{label}: all {r['stems']} module(s) map to sd-scripts modules ({r['te_modules']} text encoder, "
                  f"{r['unet_modules']} U-Net)" + (f"; unmapped {r['unmapped'][:6]}" if r["unmapped"] else ""))
        res.check(r["load_state_dict"] == "ok", f"{label}: network.load_state_dict(strict=True): {r['load_state_dict'][:600]}")
        if r["load_state_dict"] == "ok":
            res.check(r["delta_worst_rel_err"] < 1e-3,
                      f"{label}: {r['delta_checked']} module outputs equal (alpha/r)·up@down applied to random input "
                      f"(worst relative error {r['delta_worst_rel_err']:.1e}, {r['delta_worst_module']})")
    for f in tiny_files:
        r = out["files"][str(f)]
        label = f"{Path(f).parent.name}/{Path(f).name} (builtin trainer, tiny model)"
        res.check(not r["unknown_names"],
                  f"{label}: all {r['stems']} module names are SD1.5 module names in sd-scripts"
                  + (f"; unknown {r['unknown_names'][:6]}" if r["unknown_names"] else ""))
        res.info(f"{label}: widths differ from SD1.5 by design; loading into the tiny model itself below")
    if tiny_files and tiny_model is not None:
        out2 = run_sd(sd, work / "sd_load_tiny", "load", {"files": [str(f) for f in tiny_files], "model": str(tiny_model)})
        res.data["tiny"] = out2
        for f in tiny_files:
            r = out2["files"][str(f)]
            label = f"{Path(f).parent.name}/{Path(f).name} in the tiny diffusers model"
            res.check(not r["unmapped"] and r["load_state_dict"] == "ok",
                      f"{label}: {r['created']}/{r['stems']} modules created, load_state_dict(strict=True): "
                      f"{r['load_state_dict'][:600]}" + (f"; unmapped {r['unmapped'][:6]}" if r["unmapped"] else ""))
            if r["load_state_dict"] == "ok":
                res.check(r["delta_worst_rel_err"] < 1e-3,
                          f"{label}: {r['delta_checked']} module outputs (real forward) equal (alpha/r)·up@down "
                          f"(worst relative error {r['delta_worst_rel_err']:.1e})")
    return res


# --------------------------------------------------------------------------------------------


def finish(results: list[Result], json_path: str | None, work: Path, remove: bool) -> int:
    """Print one PASS/FAIL line per check, write them all to ``json_path`` (if given), remove the
    working folder when asked; the exit status (0: every check passed)."""
    print()
    for r in results:
        print(f"{'PASS' if r.ok else 'FAIL'}  {r.name}")
    if json_path:
        Path(json_path).write_text(json.dumps([dict(name=r.name, ok=r.ok, lines=r.lines, data=r.data) for r in results],
                                              indent=1, default=str), encoding="utf-8")
    if remove:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd-scripts", default=os.environ.get("CHARBUILD_SD_SCRIPTS"), help="sd-scripts checkout")
    ap.add_argument("--sd-python", default=os.environ.get("CHARBUILD_SD_PYTHON"), help="python of sd-scripts' venv")
    ap.add_argument("--checks", default="dataset,compress,load", help="comma list of dataset,compress,load")
    ap.add_argument("--cases", default=",".join(COMPRESS_CASES), help=f"compression cases: {','.join(COMPRESS_CASES)}")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--real-weights", action="store_true", help="load into a random-weight SD1.5 (4 GB, ~1 min) instead of meta")
    ap.add_argument("--no-train", action="store_true", help="skip training a LoRA with the builtin trainer for the load check")
    ap.add_argument("--wait-compress", type=float, default=0.0, help="seconds to wait for charbuild.lora.compress to appear")
    ap.add_argument("--json", help="write all results as JSON here")
    a = ap.parse_args(argv)
    sd, why = sd_env_from_environ(a.sd_scripts, a.sd_python)
    if sd is None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="charbuild-sdcmp-"))
    work.mkdir(parents=True, exist_ok=True)
    checks = [c.strip() for c in a.checks.split(",") if c.strip()]
    results: list[Result] = []
    print(f"sd-scripts: {sd.sd_scripts} (python {sd.python}); work: {work}", flush=True)

    def run(name, fn):
        t0 = time.time()
        try:
            r = fn()
        except Exception as e:
            r = Result(name)
            r.check(False, f"{type(e).__name__}: {e}")
        r.info(f"took {time.time() - t0:.1f}s")
        results.append(r)
        print(r.render(), flush=True)
        return r

    if "dataset" in checks:
        run("a. dataset TOMLs", lambda: check_dataset(sd, work / "a"))
    if "compress" in checks:
        cases = [c for c in a.cases.split(",") if c]
        run("b. compression", lambda: check_compress(sd, work / "b", cases, a.wait_compress))
    if "load" in checks:
        def load():
            files = sorted((work / "b").glob("charbuild_*.safetensors"))
            if not files:  # compress check not run: compress one file now
                compress_file = import_compress_file(a.wait_compress)
                src = make_random_lora(work / "c" / "random_lora.safetensors")
                dst = work / "c" / "charbuild_sv_ratio16.safetensors"
                compress_file(src, dst, method="sv_ratio", param=16.0, new_rank=128, save_precision="fp16")
                files = [dst]
            tiny_files, tiny_model = [], None
            trained_note = None
            if not a.no_train:
                raw = train_builtin_lora(work / "c")
                if raw is None:
                    trained_note = f"no LoRA from the builtin trainer (see {work / 'c' / 'trainproj.log'})"
                else:
                    tiny_files = [raw] + sorted(p for p in raw.parent.glob("*.safetensors") if p != raw)
                    models = sorted((work / "c" / "trainproj" / "build" / "models").glob("tiny-*"))
                    tiny_model = models[0] if models else None
            r = check_loading(sd, work / "c", files, real_weights=a.real_weights, tiny_files=tiny_files, tiny_model=tiny_model)
            if trained_note:
                r.info(trained_note)
            return r
        run("c. loading", load)
    return finish(results, a.json, work, remove=not a.work and not a.keep)


if __name__ == "__main__":
    sys.exit(main())
