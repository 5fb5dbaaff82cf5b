"""One training step of the builtin equals sd-scripts': the loss and every LoRA gradient, in one process.

Both sides load the same random full-size SD1.5 model (``gpu_check.make_model``: a diffusers
folder with the real shapes and charbuild's CLIP tokenizer) in fp32, and start from the same
LoRA (the builtin's initial weights, loaded into sd-scripts' own ``networks.lora`` network: LoRA
dim 8 alpha 4 with 3x3 convs, on the UNet and the text encoder). For each case the same batch
(two cached latents, their captions) goes through

- charbuild: ``trainer.batch_loss`` (conditioning, noise, timestep, target, min-SNR weights), and
- sd-scripts: ``NetworkTrainer.process_batch`` of ``train_network.py`` with the args of the case
  (its tokenizer and text-encoding strategy, noise scheduler, ``get_noise_noisy_latents_and_timesteps``,
  ``post_process_loss``),

each after ``torch.manual_seed(SEED)``: the same draws give the same noise and timesteps only if
both draw in the same order. Then ``backward`` on both, and the loss and every gradient are
compared (max |a-b| / max |b| per tensor, the denominator at least 1e-6 of the case's largest
gradient). Cases: plain eps (clip skip 2), v-prediction with zero terminal SNR, min-SNR γ=5,
noise offset 0.0357, clip skip 1.

Runs where charbuild and sd-scripts import together (sd-scripts' pins: diffusers 0.32.1,
transformers 4.54.1), e.g.::

    PYTHONPATH=$PWD:SD_SCRIPTS SDVENV/bin/python benchmarks/compare_one_step.py --work /tmp/onestep

(``gpu_check.make_model`` needs transformers >= 5 for charbuild's tokenizer: under sd-scripts'
4.54 pins, make ``<work>/model-sd15`` first with the project's python, e.g.
``python -c "...gpu_check.make_model('sd15', Path('<work>/model-sd15'), 'cpu')"``.)

With ``--algo loha`` the network is LoHa (``LohaA50p``: dim 8 alpha 4, conv dim 8 alpha 4) and
sd-scripts' side is what charbuild's sd-scripts backend runs for it, LyCORIS
(``--network_module lycoris.kohya --network_args algo=loha conv_dim=8 conv_alpha=4``; the
``lycoris-lora`` package in sd-scripts' venv). The builtin's initial ``hada_w2_a`` is zero (as
LyCORIS'), which leaves every other factor without a gradient: the shared initial weights get
``hada_w2_a`` ~ N(0, 0.01) (seeded) first. LyCORIS' default preset ("full") also adapts
``conv_in``, ``conv_out`` and ``time_embedding.linear_1/2``, which the builtin does not: those
modules keep LyCORIS' own initial weights (ΔW = 0, so the forward is unchanged) and their
gradients are listed as on one side only.

SDXL: ``compare_one_step_sdxl.py``. Results: benchmarks/SD_SCRIPTS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
SEED = 1234
BATCH = [(0, False), (1, False)]
CASES = {
    "eps (clip skip 2)": {},
    "v-pred + zero terminal SNR": {"v_prediction": True, "zero_terminal_snr": True},
    "min-SNR gamma 5": {"min_snr_gamma": 5.0},
    "noise offset 0.0357": {"noise_offset": 0.0357},
    "clip skip 1": {"clip_skip": 1},
}
LOHA_PRESET = "LohaA50p-AdamW8"
#: LyCORIS' default ("full") preset adapts these UNet modules by name; the builtin (kohya's module choice) does not
LYCORIS_ONLY = ("lora_unet_conv_in.", "lora_unet_conv_out.", "lora_unet_time_embedding_linear_1.",
                "lora_unet_time_embedding_linear_2.")
LORA = {"preset": "Lora3x3A50p-AdamW8", "optimizer": "AdamW", "dim": 8, "alpha": 4, "lr": 1e-4,
        "scheduler": "constant", "mixed_precision": "no", "gradient_checkpointing": False, "data_loader_workers": 0}


def _gpu_check():
    import gpu_check  # a sibling script: benchmarks/ is sys.path[0]

    return gpu_check


def charbuild_steps(work: Path, model: Path, toml: Path) -> tuple[dict, dict, dict]:
    """(init LoRA, batch, {case: (loss, grads)}) from the builtin's own functions."""
    import torch

    from charbuild.train.builtin import trainer
    from charbuild.train.builtin.trainer import _loss_scheduler, batch_loss, prepare, resolve_setup
    from charbuild.train.job import TrainJob
    from charbuild.train.variants import resolve_variant

    def job(over: dict) -> dict:
        params = resolve_variant({**LORA, "clip_skip": 2, **over}, steps=1)
        return TrainJob.from_dict({
            "lora": "one", "kind": "face", "variant": "step", "project_root": str(toml.parent),
            "dataset_toml": str(toml), "output": str(work / "charbuild" / "out.safetensors"),
            "variant_dir": str(work / "charbuild"), "params": params.to_dict(),
            "model": {"base": str(model), "vae": None, "arch": "sd15", "clip_skip": 2},
            "trainer": {"backend": "builtin"}, "keywords": ["one"], "inputs": [], "signature_extra": {},
            "continue_from": None})

    prep = prepare(resolve_setup(job({})))
    base = SimpleNamespace(noise_scheduler=prep.noise_scheduler, zero_terminal_snr=False)
    if LORA["preset"] == LOHA_PRESET:  # hada_w2_a = 0 would leave w1a, w1b, w2b without a gradient
        gen = torch.Generator().manual_seed(SEED + 1)
        with torch.no_grad():
            for m in list(prep.network.unet_loras) + list(prep.network.te_loras):
                m.hada_w2_a.copy_(torch.randn(m.hada_w2_a.shape, generator=gen) * 0.01)
    init = prep.network.kohya_state_dict(torch.float32)
    batch = {"latents": torch.stack([prep.latents[k] for k in BATCH]),
             "captions": [prep.dataset.items[i].caption for i, _ in BATCH]}
    out = {}
    for case, over in CASES.items():
        setup = resolve_setup(job(over))
        sched, loss_setup = _loss_scheduler(setup, base)
        p = trainer.Prepared(**{**prep.__dict__, "noise_scheduler": sched, "loss": loss_setup, "text_cache": {}})
        prep.network.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)
        loss = batch_loss(setup, p, BATCH)
        loss.backward()
        grads = {f"{m.stem}.{n}": q.grad.detach().clone() for m in list(prep.network.unet_loras) + list(prep.network.te_loras)
                 for n, q in m.named_parameters() if q.grad is not None}
        out[case] = (float(loss), grads)
        print(f"  charbuild  {case}: loss {float(loss):.6f}, {len(grads)} gradients", flush=True)
    del prep
    gc.collect()
    return init, batch, out


def loss_flags(over: dict) -> list[str]:
    """sd-scripts' flags of a case's loss options (v-prediction, zero terminal SNR, min-SNR, noise offset)."""
    flags = []
    if over.get("v_prediction"):
        flags.append("--v_parameterization")
    if over.get("zero_terminal_snr"):
        flags.append("--zero_terminal_snr")
    if over.get("min_snr_gamma"):
        flags += ["--min_snr_gamma", str(over["min_snr_gamma"])]
    if over.get("noise_offset"):
        flags += ["--noise_offset", str(over["noise_offset"])]
    return flags


def sd_scripts_args(model: Path, tokdir: Path, over: dict):
    import train_network

    loha = LORA["preset"] == LOHA_PRESET
    argv = ["--pretrained_model_name_or_path", str(model), "--tokenizer_cache_dir", str(tokdir),
            "--network_module", "lycoris.kohya" if loha else "networks.lora", "--network_dim", "8", "--network_alpha", "4",
            "--network_args", "conv_dim=8", "conv_alpha=4", *(["algo=loha"] if loha else []), "--mixed_precision", "no",
            "--clip_skip", str(over.get("clip_skip", 2)), "--output_dir", "unused", "--seed", str(SEED)]
    argv += loss_flags(over)
    return train_network.setup_parser().parse_args(argv)


def sd_scripts_steps(model: Path, tokdir: Path, init: dict, batch: dict) -> dict:
    """{case: (loss, grads)} from sd-scripts' own network, model loading, batch processing and loss."""
    import torch
    import train_network
    from library import strategy_base, train_util
    from networks import lora

    args = sd_scripts_args(model, tokdir, {})
    trainer = train_network.NetworkTrainer()
    trainer.vae_scale_factor = 0.18215  # train() sets it
    accelerator = train_util.prepare_accelerator(args)
    _, text_encoder, vae, unet = trainer.load_target_model(args, torch.float32, accelerator)
    tokenize_strategy = trainer.get_tokenize_strategy(args)
    strategy_base.TokenizeStrategy.set_strategy(tokenize_strategy)
    if LORA["preset"] == LOHA_PRESET:
        from lycoris import kohya as lycoris_kohya

        network = lycoris_kohya.create_network(1.0, 8, 4, vae, text_encoder, unet, conv_dim=8, conv_alpha=4, algo="loha")
        network.apply_to(text_encoder, unet, True, True)
    else:
        network = lora.create_network(1.0, 8, 4, vae, [text_encoder], unet, conv_dim=8, conv_alpha=4)
        network.apply_to([text_encoder], unet, True, True)
    missing, unexpected = network.load_state_dict(init, strict=False)
    extra = [k for k in missing if k.startswith(LYCORIS_ONLY)]
    if extra:
        print(f"  sd-scripts: {len(extra)} LyCORIS tensors the builtin does not train (kept at LyCORIS' init, ΔW = 0): "
              f"{sorted({k.split('.')[0] for k in extra})}", flush=True)
    missing = [k for k in missing if k not in extra]
    if missing or unexpected:
        raise SystemExit(f"the LoRA does not fit sd-scripts' network: missing {missing[:5]}, unexpected {unexpected[:5]}")
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    network.requires_grad_(True)
    text_encoder.train()  # as train_network.py when the text encoder's LoRA trains
    unet.train()
    out = {}
    for case, over in CASES.items():
        a = sd_scripts_args(model, tokdir, over)
        text_encoding_strategy = trainer.get_text_encoding_strategy(a)
        noise_scheduler = trainer.get_noise_scheduler(a, accelerator.device)
        b = {"latents": batch["latents"] / trainer.vae_scale_factor, "captions": batch["captions"],
             "input_ids_list": tokenize_strategy.tokenize(batch["captions"]),  # [(batch, 1, 77)]
             "loss_weights": torch.ones(len(batch["captions"]))}
        network.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)
        loss = trainer.process_batch(b, [text_encoder], unet, network, vae, noise_scheduler, torch.float32, torch.float32,
                                     accelerator, a, text_encoding_strategy, tokenize_strategy)
        loss.backward()
        grads = {n: q.grad.detach().clone() for n, q in network.named_parameters() if q.grad is not None}
        out[case] = (float(loss), grads)
        print(f"  sd-scripts {case}: loss {float(loss):.6f}, {len(grads)} gradients", flush=True)
    return out


def compare(ours: dict, theirs: dict) -> list[dict]:
    rows = []
    for case in CASES:
        (l1, g1), (l2, g2) = ours[case], theirs[case]
        keys = sorted(set(g1) | set(g2))
        # per tensor: max |a - b| over max |b|, the latter at least 1e-6 of the case's largest gradient
        # (a gradient that is exactly 0 on one side, such as the 1-token mid-block self-attention's q/k
        # at 64 px, is 1e-12 on the other through a different attention kernel)
        floor = 1e-6 * max(float(g.abs().max()) for g in g2.values())
        rel = [float((g1[k] - g2[k]).abs().max()) / max(float(g2[k].abs().max()), floor) for k in keys if k in g1 and k in g2]
        one = [k for k in keys if not (k in g1 and k in g2)]
        rows.append({"case": case, "loss_charbuild": l1, "loss_sd_scripts": l2, "loss_rel": abs(l1 - l2) / abs(l2),
                     "gradients": len(keys), "only_one_side": len([k for k in one if not k.startswith(LYCORIS_ONLY)]),
                     "lycoris_only": len([k for k in one if k.startswith(LYCORIS_ONLY)]),
                     "grad_rel_max": max(rel) if rel else None,
                     "grad_rel_median": sorted(rel)[len(rel) // 2] if rel else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference that passes (fp32)")
    ap.add_argument("--json")
    ap.add_argument("--cases", help="comma list of case names (default: all)")
    ap.add_argument("--worst", type=int, default=0, help="print the N gradients that differ most")
    ap.add_argument("--algo", choices=["lora", "loha"], default="lora", help="loha: the builtin's LoHa against LyCORIS'")
    a = ap.parse_args(argv)
    if a.algo == "loha":
        LORA["preset"] = LOHA_PRESET
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.cases:
        for name in [c for c in CASES if c not in a.cases.split(",")]:
            del CASES[name]
    gpu_check = _gpu_check()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = gpu_check.make_model("sd15", work / "model-sd15", "cuda" if torch.cuda.is_available() else "cpu")
    gpu_check.sd_tokenizers("sd15", work / "tokenizers")
    toml = gpu_check.make_data(work / "project", "sd15", 64, n=2)
    print("charbuild ...", flush=True)
    init, batch, ours = charbuild_steps(work, model, toml)
    print("sd-scripts ...", flush=True)
    theirs = sd_scripts_steps(model, work / "tokenizers", init, batch)
    rows = compare(ours, theirs)
    if a.worst:
        torch.save({"ours": ours, "theirs": theirs}, work / "grads.pt")
        for case in CASES:
            g1, g2 = ours[case][1], theirs[case][1]
            diffs = sorted(((float((g1[k] - g2[k]).abs().max()), float(g1[k].abs().max()), float(g2[k].abs().max()), k)
                            for k in g1 if k in g2), reverse=True)
            for d, m1, m2, k in diffs[:a.worst]:
                print(f"  {case}: {k}: max|diff| {d:.3e}, max|ours| {m1:.3e}, max|theirs| {m2:.3e}")
    print(f"\nSD1.5 full size (random), {a.algo}, 64 px, batch 2, fp32, torch {torch.__version__}, {time.time() - t0:.0f} s\n")
    print("| case | loss charbuild | loss sd-scripts | loss rel. diff | gradients | max rel. diff | median rel. diff |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        ok &= r["loss_rel"] <= a.tolerance and r["only_one_side"] == 0 and (r["grad_rel_max"] or 0) <= a.tolerance
        print(f"| {r['case']} | {r['loss_charbuild']:.6f} | {r['loss_sd_scripts']:.6f} | {r['loss_rel']:.1e} | "
              f"{r['gradients']} ({r['only_one_side']} on one side"
              + (f", {r['lycoris_only']} LyCORIS-only" if r["lycoris_only"] else "") + f") | {r['grad_rel_max']:.1e} | {r['grad_rel_median']:.1e} |")
    print(f"\n{'PASS' if ok else 'FAIL'} (tolerance {a.tolerance:g})")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
