"""A stand-in for kohya-ss sd-scripts' training scripts, for charbuild's tests.

It parses its arguments strictly (an unknown or malformed flag exits with status 2,
as argparse does in sd-scripts), checks what charbuild must pass, and writes
``<output_dir>/<output_name>.safetensors``: a small valid LoRA (via
``charbuild.train.fake_trainer.write_fake_lora``). Environment knobs for tests:
``FAKE_SD_SECONDS`` (sleep, printing progress), ``FAKE_SD_FAIL`` (exit 1 after
printing an error), ``FAKE_SD_ARGV`` (append argv and cwd as one JSON line to this file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def parser(sdxl: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdxl_train_network.py" if sdxl else "train_network.py", allow_abbrev=False)
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--vae")
    p.add_argument("--dataset_config", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--output_name", required=True)
    p.add_argument("--network_module", required=True, choices=["networks.lora", "lycoris.kohya"])
    p.add_argument("--network_dim", type=int, required=True)
    p.add_argument("--network_alpha", type=float, required=True)
    p.add_argument("--network_args", nargs="*")
    p.add_argument("--network_weights")
    p.add_argument("--network_train_unet_only", action="store_true")
    p.add_argument("--optimizer_type", required=True, choices=["AdamW8bit", "AdamW", "adafactor"])
    p.add_argument("--optimizer_args", nargs="*")
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--text_encoder_lr", type=float)
    p.add_argument("--lr_scheduler")
    p.add_argument("--max_train_steps", type=int, required=True)
    if not sdxl:
        p.add_argument("--clip_skip", type=int, required=True)
    p.add_argument("--logging_dir", required=True)
    p.add_argument("--log_prefix", required=True)
    p.add_argument("--xformers", action="store_true")
    p.add_argument("--sdpa", action="store_true")
    p.add_argument("--cache_latents", action="store_true")
    p.add_argument("--save_model_as", required=True, choices=["safetensors"])
    p.add_argument("--mixed_precision", required=True, choices=["no", "fp16", "bf16"])
    p.add_argument("--save_precision", required=True, choices=["fp16", "bf16", "float"])
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--persistent_data_loader_workers", action="store_true")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--resolution")
    p.add_argument("--min_bucket_reso", type=int)
    p.add_argument("--max_bucket_reso", type=int)
    p.add_argument("--max_data_loader_n_workers", type=int)
    p.add_argument("--sample_prompts")
    p.add_argument("--sample_every_n_steps", type=int)
    p.add_argument("--sample_sampler", choices=["ddim", "euler_a", "k_euler_a", "dpmsolver++"])
    p.add_argument("--sample_at_first", action="store_true")
    p.add_argument("--noise_offset", type=float)
    p.add_argument("--min_snr_gamma", type=float)
    p.add_argument("--v_parameterization", action="store_true")
    p.add_argument("--zero_terminal_snr", action="store_true")
    p.add_argument("--no_half_vae", action="store_true")
    p.add_argument("--cache_text_encoder_outputs", action="store_true")
    return p


def write_samples(args) -> int:
    """Sample files as sd-scripts names them: ``<output_dir>/sample/<name>_<step:06d>_<line:02d>_<time>_<seed>.png``
    at every multiple of --sample_every_n_steps, one per prompt line (``#`` lines and blank ones skipped)."""
    import re
    import time as _time

    from charbuild.train.fake_trainer import _png

    if not args.sample_prompts:
        return 0
    if not Path(args.sample_prompts).is_file():
        fail(f"--sample_prompts: {args.sample_prompts} does not exist")
    lines = [ln for ln in Path(args.sample_prompts).read_text(encoding="utf-8").splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    folder = Path(args.output_dir) / "sample"
    folder.mkdir(exist_ok=True)
    stamp = _time.strftime("%Y%m%d%H%M%S", _time.localtime())
    n = 0
    first = 0 if args.sample_at_first else args.sample_every_n_steps
    for step in range(first, args.max_train_steps + 1, args.sample_every_n_steps):
        for i, line in enumerate(lines):
            seed = re.search(r" --d (\d+)", line)
            suffix = f"_{seed.group(1)}" if seed else ""
            (folder / f"{args.output_name}_{step:06d}_{i:02d}_{stamp}{suffix}.png").write_bytes(_png((i, step % 256, 0)))
            n += 1
    return n


def write_tensorboard(args) -> None:
    """sd-scripts' TensorBoard log: ``<logging_dir>/<log_prefix><time>/network_train/``, a
    ``loss/current`` and ``lr/unet`` scalar per step (made-up values)."""
    from torch.utils.tensorboard import SummaryWriter

    run = Path(args.logging_dir) / f"{args.log_prefix}{time.strftime('%Y%m%d%H%M%S')}" / "network_train"
    writer = SummaryWriter(str(run))
    for step in range(1, args.max_train_steps + 1):
        writer.add_scalar("loss/current", 1.0 / (1 + step), step)
        writer.add_scalar("lr/unet", args.learning_rate or 1e-4, step)
    writer.close()


def fail(msg: str) -> None:
    print(f"fake sd-scripts: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(3)


def _color_aug(dataset_config: str) -> bool:
    """Whether the dataset TOML turns color_aug on anywhere (sd-scripts' is_latent_cacheable)."""
    import tomllib

    data = tomllib.loads(Path(dataset_config).read_text(encoding="utf-8"))
    tables = [data.get("general", {})] + [d for d in data.get("datasets", [])]
    tables += [s for d in data.get("datasets", []) for s in d.get("subsets", [])]
    return any(t.get("color_aug") for t in tables)


def main(sdxl: bool) -> int:
    if os.environ.get("FAKE_SD_ARGV"):
        with open(os.environ["FAKE_SD_ARGV"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"argv": sys.argv, "cwd": os.getcwd(),
                                 "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
    args = parser(sdxl).parse_args()
    for name in ("pretrained_model_name_or_path", "dataset_config"):
        if not Path(getattr(args, name)).exists():
            fail(f"--{name}: {getattr(args, name)} does not exist (cwd {os.getcwd()})")
    if args.vae and not Path(args.vae).exists():
        fail(f"--vae: {args.vae} does not exist")
    if args.network_weights and not Path(args.network_weights).is_file():
        fail(f"--network_weights: {args.network_weights} does not exist")
    if not Path(args.output_dir).is_dir():
        fail(f"--output_dir {args.output_dir} is not a folder")
    workers = 8 if args.max_data_loader_n_workers is None else args.max_data_loader_n_workers  # sd-scripts' default
    if args.persistent_data_loader_workers and workers == 0:  # as torch's DataLoader refuses it
        fail("persistent_workers option needs num_workers > 0")
    if args.log_prefix != args.output_name:
        fail("--log_prefix differs from --output_name")
    net = dict(a.split("=", 1) for a in args.network_args or [])
    if args.network_module == "lycoris.kohya" and net.get("algo") not in ("lora", "loha"):
        fail("lycoris.kohya needs network_args algo=lora|loha")
    if "preset" in net and net["preset"] not in ("full", "full-lin", "attn-mlp", "attn-only", "unet-only") \
            and not Path(net["preset"]).is_file():  # LyCORIS reads any other preset as a TOML file
        fail(f"Error: cannot read preset file. {net['preset']} (LyCORIS: assert preset is not None)")
    if ("conv_dim" in net) != ("conv_alpha" in net):
        fail("conv_dim and conv_alpha come together")
    if args.optimizer_type == "adafactor":
        if sorted(args.optimizer_args or []) != ["relative_step=True", "scale_parameter=True", "warmup_init=False"]:
            fail(f"adafactor optimizer_args {args.optimizer_args}")
    elif args.learning_rate is None:
        fail("AdamW needs --learning_rate")
    if args.cache_latents and _color_aug(args.dataset_config):  # train_network.py's assert
        fail("when caching latents, either color_aug or random_crop cannot be used")
    if sdxl and args.cache_text_encoder_outputs and not args.network_train_unet_only:  # sdxl_train_network.py's assert
        fail("network for Text Encoder cannot be trained with caching Text Encoder outputs")
    if not sdxl and args.cache_text_encoder_outputs:  # accepted but ignored by train_network.py: charbuild never passes it
        fail("train_network.py has no text-encoder cache")
    print(f"fake sd-scripts: {Path(sys.argv[0]).name} steps={args.max_train_steps}", flush=True)

    seconds = float(os.environ.get("FAKE_SD_SECONDS", "0") or 0)
    start = time.time()
    while time.time() - start < seconds:
        print(f"\rsteps: {int(100 * (time.time() - start) / seconds)}%", end="", flush=True)
        time.sleep(0.05)
    print("\rsteps: 100%", flush=True)
    if os.environ.get("FAKE_SD_FAIL"):
        print("RuntimeError: CUDA out of memory (fake)", file=sys.stderr, flush=True)
        return 1

    from charbuild.train.fake_trainer import write_fake_lora

    params = {
        "network_module": args.network_module,
        "algo": net.get("algo"),
        "dim": args.network_dim,
        "alpha": args.network_alpha,
        "conv_dim": int(net["conv_dim"]) if "conv_dim" in net else None,
        "conv_alpha": float(net["conv_alpha"]) if "conv_alpha" in net else None,
        "optimizer": args.optimizer_type,
        "lr": args.learning_rate,
        "text_encoder_lr": args.text_encoder_lr,
        "steps": args.max_train_steps,
        "seed": args.seed,
        "save_precision": args.save_precision,
        "mixed_precision": args.mixed_precision,
        "clip_skip": getattr(args, "clip_skip", None),
    }
    out = Path(args.output_dir) / f"{args.output_name}.safetensors"
    write_fake_lora(out, params, arch="sdxl" if sdxl else "sd15", name=args.output_name,
                    seed_material=Path(args.dataset_config).read_text(encoding="utf-8"))
    print(f"fake sd-scripts: saved {out}", flush=True)
    write_tensorboard(args)
    if args.sample_prompts:
        print(f"fake sd-scripts: wrote {write_samples(args)} samples", flush=True)
    return 0
