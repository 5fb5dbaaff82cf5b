"""One SDXL training step of the builtin equals sd-scripts': the loss and every LoRA gradient.

The SDXL counterpart of ``compare_one_step.py``. A full-size random SDXL model in fp32 is about
10 GiB for the UNet alone, so the two sides run in **separate processes**, each loading only
what it needs at a time, and write their loss and gradients to disk; ``compare`` reads both:

1. ``make``  (any python with charbuild): a random SDXL diffusers folder with the real shapes
   (UNet, CLIP-L, OpenCLIP bigG, VAE; built part by part in fp16 and saved in 2 GB shards, so
   that making it stays under 8 GiB), the tokenizers sd-scripts reads from
   ``--tokenizer_cache_dir``, and two pictures (1365 x 768 and 832 x 1248) with captions and a
   dataset TOML at resolution 1024 with buckets;
2. ``charbuild`` (charbuild's own venv: diffusers/transformers as charbuild runs them): the
   dataset through ``read_dataset_toml`` (buckets, original sizes), both text encoders through
   ``conditioning.frozen_conditioning`` (UNet-only training with cached text-encoder outputs,
   what charbuild trains SDXL with), then the text encoders are freed and the UNet loaded; the
   LoRA network (dim 8 alpha 4, 3x3 convs at dim 8 alpha 4; 722 UNet modules) is built, its
   ``lora_up`` weights are set to small random values (so that every ``lora_down`` gradient is
   non-zero too) and saved as the shared initial weights; then per case ``trainer.batch_loss``
   on the batch [(picture 0, not flipped), (picture 1, flipped)] with random latents of
   ``--latent`` size (the size ids say 1024 px; the UNet does not care, and a small latent keeps
   a CPU step short), ``backward``, and the loss and gradients are saved;
3. ``sd-scripts`` (sd-scripts' venv and pins, ``PYTHONPATH`` = the sd-scripts folder):
   ``SdxlNetworkTrainer``'s tokenize and text-encoding strategies on its own text encoders
   (the cached-output path of ``--cache_text_encoder_outputs``), its ``BucketManager`` and
   ``trim_and_resize_if_required`` for the size ids (mirrored for the flipped picture as its
   dataset does), the UNet converted to its own ``SdxlUNet2DConditionModel`` as
   ``sdxl_train_util`` does for a diffusers folder, ``networks.lora`` loaded strictly with the
   shared initial weights, and per case ``SdxlNetworkTrainer.process_batch`` (with
   ``--network_train_unet_only --cache_text_encoder_outputs`` and the case's flags);
4. ``compare``: the conditioning (text-encoder outputs, size ids) and, per case, the loss and
   every gradient (max |a-b| / max |b| per tensor, the denominator at least 1e-6 of the case's
   largest gradient).

Both sides call ``torch.manual_seed`` (SEED, or the case's ``STEP_SEEDS``) before each case's step: the noise and timesteps
are equal only because both draw in the same order. Cases: plain eps, v-prediction with zero
terminal SNR, min-SNR gamma 5, noise offset 0.0357 (SDXL has no clip skip), each with the
size/crop conditioning of the two pictures. Usage (``all`` runs the four steps, the sides as
children with their pythons, and prints the table)::

    python benchmarks/compare_one_step_sdxl.py all --work /tmp/onestep-sdxl \\
        --sd-scripts SD_SCRIPTS --sd-python SDVENV/bin/python

Results: benchmarks/SD_SCRIPTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEED = 1234
#: (picture size (w, h), flipped in the batch)
PICTURES = [((1365, 768), False), ((832, 1248), True)]
CAPTIONS = ["krnk, 1girl, solo, long hair, smile", "krnk, 1girl, standing, from side, outdoors"]
CASES = {
    "eps": {},
    "v-pred + zero terminal SNR": {"v_prediction": True, "zero_terminal_snr": True},
    "min-SNR gamma 5": {"min_snr_gamma": 5.0},
    "noise offset 0.0357": {"noise_offset": 0.0357},
}
#: the seed before a case's step where SEED is not it: at SEED both timesteps (595, 383) have an SNR under 5,
#: so min-SNR's weights would all be 1; at 1236 they are 361 (SNR 0.95) and 37 (SNR 27.5, weight 5/27.5)
STEP_SEEDS = {"min-SNR gamma 5": 1236}
LORA = {"preset": "Lora3x3A50p-AdamW8", "optimizer": "AdamW", "dim": 8, "alpha": 4, "lr": 1e-4,
        "scheduler": "constant", "mixed_precision": "no", "gradient_checkpointing": False, "data_loader_workers": 0,
        "network_train_unet_only": True, "cache_text_encoder_outputs": True}
UP_STD = 0.01  # the random lora_up of the shared initial weights
SDXL_VAE_SCALE = 0.13025


def _gpu_check():
    import gpu_check  # a sibling script: benchmarks/ is sys.path[0]

    return gpu_check


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------- 1. model and data


def make(work: Path) -> None:
    """The random SDXL folder (part by part, fp16), the tokenizers and the pictures."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    gpu_check = _gpu_check()
    folder = work / "model-sdxl"
    configs = REPO / "charbuild" / "train" / "builtin" / "configs" / "sdxl"
    load = lambda name, file="config.json": json.loads((configs / name / file).read_text(encoding="utf-8"))  # noqa: E731
    if not (folder / "model_index.json").is_file():
        t0 = time.time()
        torch.manual_seed(0)
        parts = {"unet": lambda: UNet2DConditionModel.from_config(load("unet")),
                 "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**load("text_encoder"))),
                 "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**load("text_encoder_2"))),
                 "vae": lambda: AutoencoderKL.from_config(load("vae"))}
        n = 0
        default = torch.get_default_dtype()
        for sub, build in parts.items():
            torch.set_default_dtype(torch.float16)  # made in fp16: the fp32 UNet alone is 10 GiB
            try:
                m = build()
            finally:
                torch.set_default_dtype(default)
            n += sum(p.numel() for p in m.parameters())
            m.save_pretrained(folder / sub, safe_serialization=True, max_shard_size="2GB")
            del m
            gc.collect()
            if sub.startswith("text_encoder"):
                for f in (folder / sub).glob("*.safetensors"):
                    gpu_check.hf_text_model_keys(f)
        DDPMScheduler.from_config(load("scheduler", "scheduler_config.json")).save_pretrained(folder / "scheduler")
        gpu_check.save_tokenizer(folder / "tokenizer")
        gpu_check.save_tokenizer(folder / "tokenizer_2", pad_token="!")
        (folder / "model_index.json").write_text((configs / "model_index.json").read_text(encoding="utf-8"), encoding="utf-8")
        print(f"  sdxl: {n / 1e9:.2f} G parameters made and saved in {time.time() - t0:.0f} s, peak RSS {_peak_gib():.1f} GiB",
              flush=True)
    gpu_check.sd_tokenizers("sdxl", work / "tokenizers")
    pics = work / "project" / "pics"
    pics.mkdir(parents=True, exist_ok=True)
    for i, ((w, h), _) in enumerate(PICTURES):
        Image.new("RGB", (w, h), (40 * i, 90, 160)).save(pics / f"p{i}.png")
        (pics / f"p{i}.txt").write_text(CAPTIONS[i], encoding="utf-8")
    (work / "project" / "dataset.toml").write_text(
        "[general]\nenable_bucket = true\nresolution = 1024\nmin_bucket_reso = 256\nmax_bucket_reso = 2048\n"
        "bucket_reso_steps = 64\nbucket_no_upscale = false\ncaption_extension = \".txt\"\n\n"
        "[[datasets]]\nbatch_size = 2\n\n[[datasets.subsets]]\nimage_dir = \"pics\"\nnum_repeats = 1\n", encoding="utf-8")


# --------------------------------------------------------------------------- 2. charbuild


def _job(work: Path, over: dict):
    from charbuild.train.job import TrainJob
    from charbuild.train.variants import resolve_variant

    params = resolve_variant({**LORA, **over}, steps=1)
    return TrainJob.from_dict({
        "lora": "one", "kind": "face", "variant": "step", "project_root": str(work / "project"),
        "dataset_toml": str(work / "project" / "dataset.toml"), "output": str(work / "charbuild" / "out.safetensors"),
        "variant_dir": str(work / "charbuild"), "params": params.to_dict(),
        "model": {"base": str(work / "model-sdxl"), "vae": None, "arch": "sdxl", "clip_skip": None},
        "trainer": {"backend": "builtin"}, "keywords": ["one"], "inputs": [], "signature_extra": {},
        "continue_from": None})


def charbuild_side(work: Path, latent: tuple[int, int]) -> None:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from types import SimpleNamespace

    from charbuild.train.builtin.conditioning import frozen_conditioning
    from charbuild.train.builtin.data import read_dataset_toml, sdxl_size_conditioning
    from charbuild.train.builtin.models import _bigg_padding
    from charbuild.train.builtin.network import LoRANetwork
    from charbuild.train.builtin.setup import Prepared
    from charbuild.train.builtin.trainer import _loss_scheduler, batch_loss, resolve_setup

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = work / "model-sdxl"
    setup0 = resolve_setup(_job(work, {}))
    dataset = read_dataset_toml(setup0.job.dataset_toml, setup0.root, setup0.dataset_overrides)
    by_name = {it.path.name: i for i, it in enumerate(dataset.items)}
    batch = [(by_name[f"p{i}.png"], flipped) for i, (_, flipped) in enumerate(PICTURES)]
    captions = [dataset.items[i].caption for i, _ in batch]
    sizes = [sdxl_size_conditioning(dataset.items[i], f) for i, f in batch]
    buckets = [list(dataset.items[i].bucket) for i, _ in batch]

    t0 = time.time()
    prep_text = SimpleNamespace(
        arch="sdxl", device=torch.device("cpu"), text_cache={},
        text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
        tokenizer_2=_bigg_padding(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")))
    prep_text.text_encoder.requires_grad_(False)
    prep_text.text_encoder_2.requires_grad_(False)
    cond = frozen_conditioning(setup0, prep_text, captions)
    text_cache = prep_text.text_cache
    del prep_text
    gc.collect()
    print(f"  charbuild: text encoders' outputs in {time.time() - t0:.0f} s", flush=True)

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    unet.requires_grad_(False)
    torch.manual_seed(SEED)
    network = LoRANetwork(unet, None, setup0.network, arch="sdxl")
    network.apply_to()
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for m in network.unet_loras:
            m.lora_up.weight.normal_(0.0, UP_STD, generator=gen)
    network.to(torch.device("cpu"), torch.float32)
    network.requires_grad_(True)
    save_file(network.kohya_state_dict(torch.float32), str(work / "init.safetensors"))
    lat = torch.randn((len(batch), 4, *latent), generator=torch.Generator().manual_seed(SEED + 2))
    base = SimpleNamespace(noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler"), zero_terminal_snr=False)
    out = {"captions": captions, "sizes": sizes, "buckets": buckets, "latents": lat,
           "hidden": cond.hidden_states, "pooled": cond.pooled, "cases": {}}
    for case, over in CASES.items():
        setup = resolve_setup(_job(work, over))
        sched, loss_setup = _loss_scheduler(setup, base)
        p = Prepared(device=torch.device("cpu"), weight_dtype=torch.float32, model_name="sdxl", dataset=dataset,
                     latents={key: lat[k] for k, key in enumerate(batch)}, unet=unet, text_encoder=None,
                     tokenizer=None, noise_scheduler=sched, network=network, optimizer=None, lr_scheduler=None,
                     optimizer_desc="", arch="sdxl", loss=loss_setup, text_cache=text_cache)
        network.zero_grad(set_to_none=True)
        t1 = time.time()
        torch.manual_seed(STEP_SEEDS.get(case, SEED))
        loss = batch_loss(setup, p, batch)
        loss.backward()
        grads = {f"{m.stem}.{n}": q.grad.detach().clone() for m in network.unet_loras
                 for n, q in m.named_parameters() if q.grad is not None}
        out["cases"][case] = (float(loss), grads)
        print(f"  charbuild  {case}: loss {float(loss):.6f}, {len(grads)} gradients, {time.time() - t1:.0f} s", flush=True)
    out["peak_gib"] = _peak_gib()
    torch.save(out, work / "charbuild.pt")


# --------------------------------------------------------------------------- 3. sd-scripts


def sd_scripts_args(work: Path, over: dict):
    import compare_one_step  # a sibling script: benchmarks/ is sys.path[0]
    import sdxl_train_network

    argv = ["--pretrained_model_name_or_path", str(work / "model-sdxl"), "--tokenizer_cache_dir", str(work / "tokenizers"),
            "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "4",
            "--network_args", "conv_dim=8", "conv_alpha=4", "--mixed_precision", "no", "--network_train_unet_only",
            "--cache_text_encoder_outputs", "--output_dir", "unused", "--seed", str(SEED)]
    argv += compare_one_step.loss_flags(over)
    return sdxl_train_network.setup_parser().parse_args(argv)


def sd_scripts_size_ids(ours_buckets):
    """sd-scripts' (original hw, crop top-left, target hw) of each picture, as its dataset gives them
    for cached latents (``BucketManager``, ``trim_and_resize_if_required``, the flip rule)."""
    import numpy as np
    from library import train_util

    bm = train_util.BucketManager(False, (1024, 1024), 256, 2048, 64)
    bm.make_buckets()
    rows, buckets = [], []
    for (w, h), flipped in PICTURES:
        reso, resized, _ = bm.select_bucket(w, h)
        _, original_size, crop_ltrb = train_util.trim_and_resize_if_required(False, np.zeros((h, w, 3), np.uint8), reso, resized)
        crop_left_top = (reso[0] - crop_ltrb[2], crop_ltrb[1]) if flipped else (crop_ltrb[0], crop_ltrb[1])
        rows.append(((int(original_size[1]), int(original_size[0])), (int(crop_left_top[1]), int(crop_left_top[0])),
                     (int(reso[1]), int(reso[0]))))
        buckets.append([int(reso[0]), int(reso[1])])
    return rows, buckets


def sd_scripts_side(work: Path) -> None:
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    import sdxl_train_network
    from library import sdxl_model_util, sdxl_original_unet, strategy_base, train_util
    from networks import lora

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = work / "model-sdxl"
    ours = torch.load(work / "charbuild.pt", weights_only=False)
    captions = ours["captions"]
    args = sd_scripts_args(work, {})
    trainer = sdxl_train_network.SdxlNetworkTrainer()
    accelerator = train_util.prepare_accelerator(args)
    tokenize_strategy = trainer.get_tokenize_strategy(args)
    strategy_base.TokenizeStrategy.set_strategy(tokenize_strategy)
    text_encoding_strategy = trainer.get_text_encoding_strategy(args)

    # --cache_text_encoder_outputs: the encoders' outputs once, without gradients (as the caching strategy)
    t0 = time.time()
    te1 = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=torch.float32)
    te2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", torch_dtype=torch.float32)
    te1.requires_grad_(False)
    te2.requires_grad_(False)
    tokens = tokenize_strategy.tokenize(captions)
    with torch.no_grad():
        h1, h2, pool2 = text_encoding_strategy.encode_tokens(
            tokenize_strategy, trainer.get_models_for_text_encoding(args, accelerator, [te1, te2]), tokens)
    del te1, te2
    gc.collect()
    print(f"  sd-scripts: text encoders' outputs in {time.time() - t0:.0f} s", flush=True)

    # the UNet as sdxl_train_util._load_target_model makes it from a diffusers folder
    dunet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    state_dict = sdxl_model_util.convert_diffusers_unet_state_dict_to_sdxl(dunet.state_dict())
    del dunet
    with init_empty_weights():
        unet = sdxl_original_unet.SdxlUNet2DConditionModel()
    print("  sd-scripts: UNet", sdxl_model_util._load_state_dict_on_device(unet, state_dict, device="cpu"), flush=True)
    del state_dict
    gc.collect()
    train_util.replace_unet_modules(unet, args.mem_eff_attn, args.xformers, args.sdpa)

    network = lora.create_network(1.0, 8, 4, None, [], unet, conv_dim=8, conv_alpha=4)
    network.apply_to([], unet, False, True)
    init = load_file(str(work / "init.safetensors"))
    missing, unexpected = network.load_state_dict(init, strict=False)
    if missing or unexpected:
        raise SystemExit(f"the LoRA does not fit sd-scripts' network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    unet.requires_grad_(False)
    network.requires_grad_(True)
    unet.train()

    size_ids, buckets = sd_scripts_size_ids(ours["buckets"])
    long = lambda k: torch.stack([torch.LongTensor(r[k]) for r in size_ids])  # noqa: E731
    out = {"hidden": torch.cat([h1, h2], dim=2), "pooled": pool2, "sizes": size_ids, "buckets": buckets, "cases": {}}
    for case, over in CASES.items():
        a = sd_scripts_args(work, over)
        noise_scheduler = trainer.get_noise_scheduler(a, accelerator.device)
        b = {"latents": ours["latents"] / trainer.vae_scale_factor, "captions": captions, "input_ids_list": tokens,
             "text_encoder_outputs_list": [h1, h2, pool2], "original_sizes_hw": long(0), "crop_top_lefts": long(1),
             "target_sizes_hw": long(2), "loss_weights": torch.ones(len(captions))}
        network.zero_grad(set_to_none=True)
        t1 = time.time()
        torch.manual_seed(STEP_SEEDS.get(case, SEED))
        loss = trainer.process_batch(b, [None, None], unet, network, None, noise_scheduler, torch.float32, torch.float32,
                                     accelerator, a, text_encoding_strategy, tokenize_strategy, train_text_encoder=False)
        loss.backward()
        grads = {n: q.grad.detach().clone() for n, q in network.named_parameters() if q.grad is not None}
        out["cases"][case] = (float(loss), grads)
        print(f"  sd-scripts {case}: loss {float(loss):.6f}, {len(grads)} gradients, {time.time() - t1:.0f} s", flush=True)
    out["peak_gib"] = _peak_gib()
    torch.save(out, work / "sd-scripts.pt")


# --------------------------------------------------------------------------- 4. compare


def rel(a, b) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def compare(work: Path, tolerance: float, worst: int = 0) -> tuple[str, bool]:
    import torch

    ours = torch.load(work / "charbuild.pt", weights_only=False)
    theirs = torch.load(work / "sd-scripts.pt", weights_only=False)
    sizes_equal = [list(map(list, r)) for r in ours["sizes"]] == [list(map(list, r)) for r in theirs["sizes"]]
    lines = [f"size ids (original hw, crop top-left, target hw): charbuild {ours['sizes']}, sd-scripts {theirs['sizes']}: "
             f"{'equal' if sizes_equal else 'DIFFER'}; buckets charbuild {ours['buckets']}, sd-scripts {theirs['buckets']}",
             f"text encoders' outputs: hidden states max rel. diff {rel(ours['hidden'], theirs['hidden']):.1e}, "
             f"pooled {rel(ours['pooled'], theirs['pooled']):.1e}", "",
             "| case | loss charbuild | loss sd-scripts | loss rel. diff | gradients | max rel. diff | median rel. diff |",
             "|---|---|---|---|---|---|---|"]
    ok = sizes_equal and ours["buckets"] == theirs["buckets"]
    for case in CASES:
        (l1, g1), (l2, g2) = ours["cases"][case], theirs["cases"][case]
        keys = sorted(set(g1) | set(g2))
        floor = 1e-6 * max(float(g.abs().max()) for g in g2.values())
        r = [float((g1[k] - g2[k]).abs().max()) / max(float(g2[k].abs().max()), floor) for k in keys if k in g1 and k in g2]
        one = len([k for k in keys if not (k in g1 and k in g2)])
        loss_rel = abs(l1 - l2) / abs(l2)
        ok &= loss_rel <= tolerance and one == 0 and max(r) <= tolerance
        lines.append(f"| {case} | {l1:.6f} | {l2:.6f} | {loss_rel:.1e} | {len(keys)} ({one} on one side) | "
                     f"{max(r):.1e} | {sorted(r)[len(r) // 2]:.1e} |")
        if worst:
            diffs = sorted(((float((g1[k] - g2[k]).abs().max()), float(g2[k].abs().max()), k) for k in keys
                            if k in g1 and k in g2), reverse=True)
            lines += [f"    {case}: {k}: max|diff| {d:.3e}, max|theirs| {m:.3e}" for d, m, k in diffs[:worst]]
    lines += ["", f"peak RSS: charbuild {ours['peak_gib']:.1f} GiB, sd-scripts {theirs['peak_gib']:.1f} GiB",
              f"{'PASS' if ok else 'FAIL'} (tolerance {tolerance:g})"]
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["all", "make", "charbuild", "sd-scripts", "compare"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--latent", default="16x24", help="latent height x width (default 16x24: 128 x 192 px)")
    ap.add_argument("--sd-scripts", help="the sd-scripts folder (for 'all')")
    ap.add_argument("--sd-python", help="the python of sd-scripts' venv (for 'all')")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--cases", help="comma list of case names (default: all)")
    ap.add_argument("--worst", type=int, default=0, help="list the N gradients that differ most")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.cases:
        for name in [c for c in CASES if c not in a.cases.split(",")]:
            del CASES[name]
    latent = tuple(int(x) for x in a.latent.split("x"))
    if a.step == "make":
        make(work)
    elif a.step == "charbuild":
        charbuild_side(work, latent)
    elif a.step == "sd-scripts":
        sd_scripts_side(work)
    elif a.step == "compare":
        text, ok = compare(work, a.tolerance, a.worst)
        print(text)
        return 0 if ok else 1
    else:
        if not (a.sd_scripts and a.sd_python):
            ap.error("'all' needs --sd-scripts and --sd-python")
        me = [str(Path(__file__).resolve())]
        rest = ["--work", str(work), "--latent", a.latent] + (["--cases", a.cases] if a.cases else [])
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        sd_env = dict(env, PYTHONPATH=os.pathsep.join(p for p in (a.sd_scripts, str(REPO)) if p))
        for step, python, e in (("make", sys.executable, env), ("charbuild", sys.executable, env),
                                ("sd-scripts", a.sd_python, sd_env)):
            t0 = time.time()
            subprocess.run([python] + me + [step] + rest, env=e, check=True, cwd=a.sd_scripts if step == "sd-scripts" else None)
            print(f"{step}: {time.time() - t0:.0f} s", flush=True)
        text, ok = compare(work, a.tolerance, a.worst)
        print(f"\nSDXL full size (random), latents {a.latent}, batch 2, fp32\n\n{text}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
