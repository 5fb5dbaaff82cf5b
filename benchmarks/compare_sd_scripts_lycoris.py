"""charbuild's Locon/Loha variants trained by the real sd-scripts + LyCORIS, as a user runs them (opt-in).

Run with the *project's* python; sd-scripts runs in its own venv, where ``lycoris-lora`` must be
installed (see benchmarks/SD_SCRIPTS.md):

    CHARBUILD_SD_SCRIPTS=/tmp/sd-scripts CHARBUILD_SD_PYTHON=/tmp/sdenv/bin/python \\
        python benchmarks/compare_sd_scripts_lycoris.py [--variants LohaA1-AdamW8,LoconA1-AdamW8] [--work DIR]

What it does: a random-weight SD1.5 checkpoint (sd-scripts' own classes and configs, bf16,
1.1 GB, about a minute), a small project of four 64 px pictures whose ``[trainer]`` is the
sd-scripts backend with that python, one training step per variant with ``charbuild build train``
(charbuild writes the command, its files and the LyCORIS preset exactly as for a user). PASS when
each variant's ``raw.safetensors`` is written and its modules are exactly the ones the builtin
trainer's network adapts for the same variant (``charbuild.lora.keysets.sd15_modules``: kohya's
module choice), with LyCORIS's keys for the algorithm (``lora_down``/``lora_up`` or
``hada_w1_a`` …, no Tucker). fp32 (``mixed_precision = "no"``: a CPU); sd-scripts' ``--full_bf16`` stops in
the text encoder's LayerNorm on a CPU ("mixed dtype (CPU)").

Nothing here is imported by charbuild; ``tests/test_sd_scripts_lycoris_real.py`` reuses it.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

import compare_sd_scripts as cmp  # noqa: E402  (a sibling script: benchmarks/ is sys.path[0])
Result, SdEnv, run_sd, sd_env_from_environ = cmp.Result, cmp.SdEnv, cmp.run_sd, cmp.sd_env_from_environ

VARIANTS = ("LohaA1-AdamW8", "LoconA1-AdamW8")

MODEL_WORKER = cmp.SD_WORKER.split("def cmd_dataset")[0] + r'''
def cmd_make_model():
    """A random-weight SD1.5 checkpoint (original layout) from sd-scripts' own classes, no fp32 copy."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    from library import model_util
    from library.original_unet import UNet2DConditionModel
    dtype = getattr(torch, A["dtype"])
    t0 = time.time()
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-05, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         model_type="clip_text_model", projection_dim=768)
    with init_empty_weights():
        unet = UNet2DConditionModel(**model_util.create_unet_diffusers_config(False))
        te = CLIPTextModel._from_config(cfg)
        vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    gen = torch.Generator().manual_seed(A["seed"])
    for model in (unet, te, vae):
        model.to_empty(device="cpu")
        model.to(dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype))
            for name, b in model.named_buffers():
                if "position_ids" in name:
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    make_tokenizer(A["tokenizer_dir"])
    model_util.save_stable_diffusion_checkpoint(False, A["path"], te, unet, None, 0, 0, None, dtype, vae)
    return dict(seconds=time.time() - t0, bytes=os.path.getsize(A["path"]))


result = {"make_model": cmd_make_model}[cmd]()
with open(out_file, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=str)
'''


def make_model(sd: SdEnv, work: Path) -> Path:
    """The random SD1.5 checkpoint (made once per work folder) and the offline tokenizer beside it."""
    base = work / "sd15-random.safetensors"
    if not base.exists():
        saved = cmp.SD_WORKER
        cmp.SD_WORKER = MODEL_WORKER
        try:
            run_sd(sd, work / "sd_model", "make_model",
                   {"path": str(base), "dtype": "bfloat16", "seed": 0, "tokenizer_dir": str(work / "tokenizer")}, timeout=1800)
        finally:
            cmp.SD_WORKER = saved
    return base


def make_project(root: Path, sd: SdEnv, base: Path, tokenizer_dir: Path, variants: tuple[str, ...]) -> Path:
    """Four 64 px pictures of one character; sd-scripts backend, one step per variant, CPU settings."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import draw_picture  # noqa: E402

    if root.exists():
        shutil.rmtree(root)
    chars = root / "characters"
    (chars / "alice").mkdir(parents=True)
    vlist = ", ".join(f'{{ name = "{v.split("-")[0]}", preset = "{v}" }}' for v in variants)
    (chars / "project.toml").write_text(
        f'[model]\nbase = "{base.as_posix()}"\narch = "sd15"\n[dataset]\nsizes = [64]\n'
        f'[training]\nvariants = [{vlist}]\ndim = 4\noptimizer = "AdamW"\nmixed_precision = "no"\n'
        'save_precision = "fp16"\ndata_loader_workers = 0\n'
        f'[trainer]\nbackend = "sd-scripts"\nsd_scripts = "{sd.sd_scripts.as_posix()}"\npython = "{sd.python.as_posix()}"\n'
        f'accelerate = false\nextra_args = ["--tokenizer_cache_dir", "{tokenizer_dir.as_posix()}", '
        '"--min_bucket_reso", "64", "--bucket_reso_steps", "64"]\nrun_cache = false\n', encoding="utf-8")
    (chars / "alice" / "character.toml").write_text(
        'keyword = "alc"\nclass = "girl"\ntags = []\nbackground = "black"\n[face]\nrepeats = 1\nsteps = 1\n', encoding="utf-8")
    for i, code in enumerate(["f00", "f01", "f02", "f10"]):
        draw_picture(chars / "alice" / "face" / f"{code}.png", code, seed=i)
    return root


def expected_modules(algo: str) -> set[str]:
    """The builtin trainer's module stems for a Locon/Loha variant (conv_dim set): kohya's choice."""
    from charbuild.lora.keysets import sd15_modules

    return {stem for stem, *_ in sd15_modules(conv=True, te=True)}


def check_train(sd: SdEnv, work: Path, variants: tuple[str, ...] = VARIANTS, timeout: float = 3600) -> Result:
    from safetensors import safe_open

    res = Result("sd-scripts + LyCORIS trains charbuild's " + ", ".join(variants) + " (random SD1.5, 1 step, CPU)")
    ver = subprocess.run([str(sd.python), "-c", "import importlib.metadata as m; print(m.version('lycoris-lora'))"],
                         capture_output=True, text=True, env=sd.env())
    if not res.check(ver.returncode == 0, f"lycoris-lora {ver.stdout.strip() or 'is not installed in ' + str(sd.python)}"):
        return res
    res.data["lycoris"] = ver.stdout.strip()
    t0 = time.time()
    base = make_model(sd, work)
    res.info(f"random SD1.5 checkpoint {base} ({base.stat().st_size / 2**30:.1f} GiB, {time.time() - t0:.0f} s)")
    root = make_project(work / "project", sd, base, work / "tokenizer", variants)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "charbuild.cli", "build", "train", "--continue", "--root", str(root)],
                          capture_output=True, text=True, cwd=str(root), timeout=timeout)
    (work / "build.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    res.info(f"charbuild build train: exit {proc.returncode}, {time.time() - t0:.0f} s, peak RSS {peak:.1f} GiB; log {work / 'build.log'}")
    for v in variants:
        name = v.split("-")[0]
        algo = "loha" if v.startswith("Loha") else "lora"
        found = sorted((root / "build" / "loras").glob(f"*/{name}"))
        vdir = found[0] if found else root / "build" / "loras" / "?" / name
        raw = vdir / "raw.safetensors"
        if not res.check(raw.is_file(), f"{v}: {raw.relative_to(root)} " + ("written" if raw.is_file() else "missing")):
            log = vdir / "train.log"
            text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else proc.stdout + proc.stderr
            errors = [ln for ln in text.splitlines() if "Error" in ln or "error:" in ln]
            res.info(f"{v}: " + (errors[-1] if errors else " | ".join(text.strip().splitlines()[-5:])))
            res.data.setdefault("errors", {})[v] = errors[-1] if errors else text[-2000:]
            continue
        with safe_open(str(raw), "pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
        got = {k.split(".")[0] for k in keys}
        want = expected_modules(algo)
        extra, missing = sorted(got - want), sorted(want - got)
        res.check(not extra and not missing, f"{v}: {len(got)} modules, the builtin's {len(want)}"
                  + (f"; extra {extra[:4]}" if extra else "") + (f"; missing {missing[:4]}" if missing else ""))
        suffixes = {k.split(".", 1)[1] for k in keys}
        want_keys = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} if algo == "loha" \
            else {"lora_down.weight", "lora_up.weight", "alpha"}
        res.check(suffixes == want_keys, f"{v}: key suffixes {sorted(suffixes)}; ss_network_args {meta.get('ss_network_args')}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sd-scripts")
    ap.add_argument("--sd-python")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", help="keep everything here (default: a temporary folder, removed)")
    a = ap.parse_args(argv)
    sd, why = sd_env_from_environ(a.sd_scripts, a.sd_python)
    if sd is None:
        print(why)
        return 2
    import tempfile

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="cmp_lycoris_"))
    work.mkdir(parents=True, exist_ok=True)
    res = check_train(sd, work, tuple(v for v in a.variants.split(",") if v))
    print(res.render())
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
