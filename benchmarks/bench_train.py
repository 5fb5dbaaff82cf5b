"""Benchmark of the builtin LoRA trainer: steps per second and peak memory.

Usage::

    python benchmarks/bench_train.py                 # tiny model, CPU (or GPU if present)
    python benchmarks/bench_train.py --steps 30      # more steps
    python benchmarks/bench_train.py --full          # + full-size SD1.5-shaped random model, fp16,
                                                     #   with and without gradient checkpointing
                                                     #   (GPU; on a CPU skipped unless --force)

Every configuration runs in a fresh child process (``--child``) so that its peak RSS
(``ru_maxrss``) is its own. The dataset: 4 random 512x512 PNGs with captions, one
``[[datasets]]`` of resolution 512 and batch size 2, 1 repeat, Lora3x3 dim 8 / conv_dim 8,
AdamW, text encoder trained, clip skip 2. steps/s excludes the first 2 (warm-up) steps.
The full model (UNet 320/640/1280/1280, cross-attention 768, CLIP-L-shaped 12-layer text
encoder, SD VAE shape; random weights, 4 GB) is generated once under ``benchmarks/out/``.

Results (2-core CPU shared with other jobs, load average ~3.5, torch 2.13 CPU; the trainer
picked 1 torch thread because of that load; ``python benchmarks/bench_train.py --steps 12``),
2026-11-25:

    config                                 device  steps/s  s/step  peak RSS MiB  peak CUDA MiB
    tiny 512px b2                          cpu/1t     1.56   0.641           702              -
    tiny 512px b2 +grad-ckpt               cpu/1t     1.06   0.944           650              -

(The whole example project's face LoRA, 75 images at 128-512 px, 40 steps: model load 8 s,
latent cache 11 s, training 27 s, under the same load.)

``--full`` was not run here (no GPU in this session; on this CPU sd-scripts needs ~31 s a
step for the same shapes, see docs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"


def make_dataset(root: Path, n: int = 4, size: int = 512) -> Path:
    """``n`` random ``size`` px PNGs with captions and a one-dataset TOML (batch 2)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    d = root / "build" / "images" / "bench" / "face" / str(size)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(d / f"f{i:02d}.png")
        (d / f"f{i:02d}.txt").write_text("bench, 1girl, solo", encoding="utf-8")
    toml = root / "build" / "loras" / "bench" / "dataset.toml"
    toml.parent.mkdir(parents=True, exist_ok=True)
    toml.write_text(
        "[general]\nenable_bucket = true\nbucket_no_upscale = true\ncaption_extension = '.txt'\nnum_repeats = 1\n\n"
        f"[[datasets]]\nresolution = [{size}, {size}]\nbatch_size = 2\n\n  [[datasets.subsets]]\n"
        f"  image_dir = 'build/images/bench/face/{size}'\n  class_tokens = 'bench'\n  flip_aug = false\n",
        encoding="utf-8",
    )
    return toml


def build_full_model(folder: Path) -> Path:
    """A random-weight diffusers folder with SD1.5's shapes (created once)."""
    if (folder / "done").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from charbuild.train.builtin.tiny import SD15_SCHEDULER_CONFIG, _write_tokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    ).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )).save_pretrained(folder / "text_encoder")
    _write_tokenizer(folder / "tokenizer")
    DDPMScheduler(**SD15_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "done").write_text("1")
    return folder


def job_for(root: Path, toml: Path, base: str, steps: int, gc: bool, mp: str) -> dict:
    """A job dict (docs/architecture.md) for one benchmark configuration."""
    vdir = root / "build" / "loras" / "bench" / f"v-{'gc' if gc else 'nogc'}-{mp}"
    params = {
        "name": "bench", "logic": "Lora3x3A50p-AdamW8", "network": "Lora3x3", "network_module": "networks.lora",
        "algo": None, "dim": 8, "alpha": 4, "conv_dim": 8, "conv_alpha": 4, "optimizer": "AdamW",
        "optimizer_args": [], "lr": 1e-4, "text_encoder_lr": 4.4e-5, "steps": steps,
        "scheduler": "cosine_with_restarts", "seed": 31337, "clip_skip": 2, "mixed_precision": mp,
        "save_precision": "fp16", "gradient_checkpointing": gc, "network_train_unet_only": False,
        "resolution": None, "min_bucket_reso": None, "max_bucket_reso": None, "extra_args": [],
    }
    return {
        "lora": "bench", "kind": "face", "variant": vdir.name, "project_root": str(root),
        "dataset_toml": str(toml), "output": str(vdir / "raw.safetensors"), "variant_dir": str(vdir),
        "params": params, "model": {"base": base, "vae": None, "arch": "sd15", "clip_skip": 2},
        "trainer": {"backend": "builtin"}, "keywords": ["bench"], "inputs": [], "signature_extra": {},
        "continue_from": None,
    }


def child(job_file: str) -> None:
    """Run one job in this process and print one JSON line of measurements."""
    from charbuild.train.builtin.trainer import run_job
    from charbuild.train.job import TrainJob

    summary = run_job(TrainJob.from_json(job_file))
    durs = summary["step_durations"][2:] or summary["step_durations"]
    print("BENCH " + json.dumps({
        "s_per_step": sum(durs) / len(durs),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": (summary["peak_cuda_bytes"] or 0) / 2**20 or None,
        "final_loss": summary["final_loss"],
    }), flush=True)


def run_config(label: str, job: dict, tmp: Path) -> dict | None:
    """Run ``job`` in a child process; return its measurements (or None on failure)."""
    jf = tmp / f"{label.replace(' ', '_')}.json"
    jf.write_text(json.dumps(job), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--child", str(jf)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            res = json.loads(line[6:])
            import re

            m = re.search(r"CPU training with (\d+) thread", proc.stdout)
            res["device"] = "cuda" if "device cuda" in proc.stdout else (f"cpu/{m.group(1)}t" if m else "cpu")
            return res
    print(f"{label}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
    return None


def main(argv=None) -> int:
    """Parse arguments, run the configurations, print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--full", action="store_true", help="also the full-size SD1.5-shaped model (GPU)")
    ap.add_argument("--force", action="store_true", help="run --full even without a GPU")
    ap.add_argument("--child", metavar="JOB.json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    import torch

    has_gpu = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as t:
        tmp = Path(t)
        toml = make_dataset(tmp)
        configs = [
            ("tiny 512px b2", job_for(tmp, toml, "tiny", args.steps, False, "fp16")),
            ("tiny 512px b2 +grad-ckpt", job_for(tmp, toml, "tiny", args.steps, True, "fp16")),
        ]
        if args.full:
            if has_gpu or args.force:
                base = str(build_full_model(OUT / "sd15-random"))
                configs += [
                    ("full SD1.5 512px b2 fp16", job_for(tmp, toml, base, args.steps, False, "fp16")),
                    ("full SD1.5 512px b2 fp16 +grad-ckpt", job_for(tmp, toml, base, args.steps, True, "fp16")),
                ]
            else:
                print("--full skipped: no GPU (add --force to run it on the CPU: ~30 s a step)", file=sys.stderr)
        for label, job in configs:
            res = run_config(label, job, tmp)
            if res:
                rows.append((label, res))
                print(f"{label}: {res}", file=sys.stderr, flush=True)
    print(f"{'config':<38} device  steps/s  s/step  peak RSS MiB  peak CUDA MiB")
    for label, r in rows:
        cuda = f"{r['peak_cuda_mib']:.0f}" if r["peak_cuda_mib"] else "-"
        print(f"{label:<38} {r['device']:<7} {1 / r['s_per_step']:7.2f} {r['s_per_step']:7.3f} "
              f"{r['peak_rss_mib']:12.0f}  {cuda:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
