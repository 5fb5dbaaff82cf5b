"""charbuild's SDXL path against the real kohya-ss sd-scripts (opt-in; see benchmarks/SD_SCRIPTS.md).

Run with the *project's* python; sd-scripts runs in its own venv as a subprocess, as in
``compare_sd_scripts.py`` (whose environment, worker runner and tokenizer trick this reuses):

    CHARBUILD_SD_SCRIPTS=/tmp/sd-scripts CHARBUILD_SD_PYTHON=/tmp/sdenv/bin/python \\
        python benchmarks/compare_sd_scripts_sdxl.py [--checks command,dataset,train]

Checks (PASS/FAIL lines; exit status 1 if any FAILs, 2 when sd-scripts is not configured):

* ``command``  charbuild's SDXL command (``charbuild.train.sdscripts_command.build_command``) for UNet-only
  training with every loss option, parsed by ``sdxl_train_network.setup_parser()`` itself and
  passed through ``train_util.verify_training_args`` and ``sdxl_train_util.verify_sdxl_training_args``;
  the values sd-scripts ends up with are compared with the job's. Seconds.
* ``dataset``  an SDXL copy of the example project (``base = "tiny-sdxl"``, the SDXL ladder and
  buckets) is built with ``charbuild build image caption dataset``; every dataset TOML is read as
  ``sdxl_train_network.py`` reads it (its parser, ``SdxlNetworkTrainer``'s tokenize and latents
  strategies, ``ConfigSanitizer`` + ``BlueprintGenerator`` + ``generate_dataset_group_by_blueprint``,
  ``verify_bucket_reso_steps(32)``), with every caption compared and batch 0 loaded. Seconds.
* ``train``  a random-weight checkpoint with the real SDXL shapes (sd-scripts' own
  ``SdxlUNet2DConditionModel``, CLIP-L, OpenCLIP-bigG and the SDXL VAE; 7 GB in bf16) is written,
  and charbuild's command runs ``sdxl_train_network.py`` on it for ``--steps`` steps on the CPU
  over 256 px pictures (bf16, UNet only, cached text-encoder outputs). PASS when it exits 0 and
  writes a LoRA whose keys are kohya SDXL UNet names with ``ss_base_model_version =
  sdxl_base_v1-0``. Needs ``--min-free-gb`` (default 14) of available memory and stops sd-scripts
  when the machine's available memory falls under ``--guard-gb``: the machine is shared. Reports
  seconds per step and the peak RSS. Tens of minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

import compare_sd_scripts as cmp  # noqa: E402  (a sibling script: benchmarks/ is sys.path[0])
Result, SdEnv, run_sd, sd_env_from_environ = cmp.Result, cmp.SdEnv, cmp.run_sd, cmp.sd_env_from_environ

# The SD1.5 worker's head (imports and the offline tokenizer), then SDXL's commands.
SDXL_WORKER = cmp.SD_WORKER.split("def cmd_dataset")[0] + r'''
SDXL_TOKENIZERS = ("openai/clip-vit-large-patch14", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")


def make_sdxl_tokenizers(tokdir):
    """Both tokenizers sd-scripts' SDXL strategy loads from --tokenizer_cache_dir (the same byte-level BPE)."""
    make_tokenizer(tokdir)
    src = os.path.join(tokdir, "openai_clip-vit-large-patch14")
    dst = os.path.join(tokdir, SDXL_TOKENIZERS[1].replace("/", "_"))
    if not os.path.exists(dst):
        import shutil
        shutil.copytree(src, dst)


def cmd_args():
    import sdxl_train_network
    from library import train_util, sdxl_train_util
    args = sdxl_train_network.setup_parser().parse_args(A["argv"])
    train_util.verify_training_args(args)
    sdxl_train_util.verify_sdxl_training_args(args)
    keys = ("network_train_unet_only", "cache_text_encoder_outputs", "clip_skip", "no_half_vae", "noise_offset",
            "min_snr_gamma", "v_parameterization", "zero_terminal_snr", "mixed_precision", "network_dim",
            "network_alpha", "max_train_steps", "output_name", "optimizer_type", "learning_rate", "seed")
    return {k: getattr(args, k, "<missing>") for k in keys}


def cmd_dataset():
    import sdxl_train_network
    from library import train_util, config_util, strategy_base
    make_sdxl_tokenizers(A["tokenizer_dir"])
    results = []
    for toml_path in A["tomls"]:
        t0 = time.time()
        args = sdxl_train_network.setup_parser().parse_args(
            ["--dataset_config", toml_path, "--tokenizer_cache_dir", A["tokenizer_dir"],
             "--pretrained_model_name_or_path", "unused", "--seed", "1"])
        train_util.prepare_dataset_args(args, True)
        if strategy_base.TokenizeStrategy.get_strategy() is None:  # process-wide, set once
            trainer = sdxl_train_network.SdxlNetworkTrainer()
            strategy_base.TokenizeStrategy.set_strategy(trainer.get_tokenize_strategy(args))
            strategy_base.LatentsCachingStrategy.set_strategy(trainer.get_latents_caching_strategy(args))
        generator = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, args.masked_loss, True))
        blueprint = generator.generate(config_util.load_user_config(args.dataset_config), args)
        group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
        group.verify_bucket_reso_steps(32)  # as SdxlNetworkTrainer.assert_extra_args
        group.set_current_strategies()
        datasets = []
        for ds in group.datasets:
            captions = {os.path.abspath(i.absolute_path): i.caption for i in ds.image_data.values()}
            datasets.append(dict(resolution=[ds.width, ds.height], batch_size=ds.batch_size,
                                 min_bucket_reso=ds.min_bucket_reso, max_bucket_reso=ds.max_bucket_reso,
                                 bucket_reso_steps=ds.bucket_reso_steps, bucket_no_upscale=ds.bucket_no_upscale,
                                 subsets=[dict(image_dir=s.image_dir, img_count=s.img_count) for s in ds.subsets],
                                 buckets=sorted({tuple(i.bucket_reso) for i in ds.image_data.values()}),
                                 captions=captions))
        item = group[0]
        sample = dict(images=list(item["images"].shape) if item["images"] is not None else None,
                      input_ids=[list(t.shape) for t in item["input_ids_list"]] if item.get("input_ids_list") else None)
        results.append(dict(toml=toml_path, datasets=datasets, sample=sample, seconds=time.time() - t0))
    return dict(results=results)


def cmd_make_model():
    """A random-weight SDXL checkpoint in the original (Stability) layout, built without fp32 copies."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from library import model_util, sdxl_model_util, sdxl_original_unet
    dtype = getattr(torch, A["dtype"])
    t0 = time.time()
    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-05, pad_token_id=1, bos_token_id=0,
                  eos_token_id=2, model_type="clip_text_model")
    with init_empty_weights():
        unet = sdxl_original_unet.SdxlUNet2DConditionModel()
        te1 = CLIPTextModel._from_config(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                        num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                         num_attention_heads=20, hidden_act="gelu", projection_dim=1280, **common))
        vae = AutoencoderKL(**model_util.create_vae_diffusers_config())
    gen = torch.Generator().manual_seed(A["seed"])
    n = 0
    for model in (unet, te1, te2, vae):
        model.to_empty(device="cpu")
        model.to(dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "layer_norm.weight",
                                  "layer_norm1.weight", "layer_norm2.weight", "final_layer_norm.weight", "norm_out.weight")):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype))
                n += p.numel()
            for name, b in model.named_buffers():
                if "position_ids" in name:
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    logit_scale = torch.tensor(4.6052, dtype=dtype)
    sdxl_model_util.save_stable_diffusion_checkpoint(A["path"], te1, te2, unet, 0, 0, None, vae, logit_scale, None, dtype)
    return dict(parameters=n, seconds=time.time() - t0, bytes=os.path.getsize(A["path"]))


result = {"args": cmd_args, "dataset": cmd_dataset, "make_model": cmd_make_model}[cmd]()
with open(out_file, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=str)
'''


def run_sdxl(sd: SdEnv, work: Path, cmd: str, args: dict, *, cwd: Path | None = None, timeout: float = 1800) -> dict:
    """Run one SDXL_WORKER command with sd-scripts' python (``compare_sd_scripts.run_sd`` with our worker)."""
    saved = cmp.SD_WORKER
    cmp.SD_WORKER = SDXL_WORKER
    try:
        return run_sd(sd, work, cmd, args, cwd=cwd, timeout=timeout)
    finally:
        cmp.SD_WORKER = saved


# --------------------------------------------------------------------------------------------
# the job charbuild would run
# --------------------------------------------------------------------------------------------

#: UNet-only SDXL training with every option the sd-scripts backend turns into a flag.
SDXL_PARAMS = {"preset": "Lora1x1A1-AdamW8", "optimizer": "AdamW", "dim": 4, "network_train_unet_only": True,
               "noise_offset": 0.0357, "min_snr_gamma": 5, "v_prediction": True, "zero_terminal_snr": True,
               "no_half_vae": True, "mixed_precision": "bf16", "save_precision": "fp16", "data_loader_workers": 0}


def sdxl_job(sd: SdEnv, work: Path, base: Path, dataset_toml: Path, project: Path, steps: int, params: dict | None = None,
             extra_args: list[str] | None = None) -> dict:
    """A training job (the dict form of :class:`charbuild.train.job.TrainJob`) for sd-scripts on SDXL."""
    from charbuild.train.variants import resolve_variant

    p = resolve_variant(params or SDXL_PARAMS, steps=steps)
    vdir = work / "out" / "V"
    return {
        "lora": "krnk", "kind": "face", "variant": "V", "project_root": str(project),
        "dataset_toml": str(dataset_toml), "output": str(vdir / ".train" / "raw.safetensors"), "variant_dir": str(vdir),
        "params": p.to_dict(), "model": {"base": str(base), "vae": None, "arch": "sdxl", "clip_skip": 2},
        "trainer": {"backend": "sd-scripts", "gpus": [0], "sd_scripts": str(sd.sd_scripts), "python": str(sd.python),
                    "accelerate": None, "xformers": False, "lock_dir": str(work / "locks"), "extra_args": extra_args or []},
        "keywords": ["krnk"], "inputs": [], "signature_extra": {}, "continue_from": None,
    }


def check_command(sd: SdEnv, work: Path) -> Result:
    from charbuild.train.sdscripts_command import build_command
    from charbuild.train.job import TrainJob

    res = Result("a. the SDXL command parsed and verified by sdxl_train_network.py")
    job = sdxl_job(sd, work, Path("/m/xl.safetensors"), Path("/d/dataset.toml"), work, 1000)
    cmd = build_command(TrainJob.from_dict(job))
    res.check(Path(cmd[1]).name == "sdxl_train_network.py", f"script {Path(cmd[1]).name}")
    got = run_sdxl(sd, work / "sd_args", "args", {"argv": cmd[2:]})
    want = {"network_train_unet_only": True, "cache_text_encoder_outputs": True, "clip_skip": None, "no_half_vae": True,
            "noise_offset": 0.0357, "min_snr_gamma": 5.0, "v_parameterization": True, "zero_terminal_snr": True,
            "mixed_precision": "bf16", "network_dim": 4, "network_alpha": 1.0, "max_train_steps": 1000,
            "output_name": "krnk-V", "optimizer_type": "AdamW"}
    for key, value in want.items():
        res.check(got.get(key) == value, f"{key} = {got.get(key)!r} (job: {value!r})")
    res.info("command: " + " ".join(cmd[2:]))
    return res


# --------------------------------------------------------------------------------------------
# dataset TOMLs of an SDXL project
# --------------------------------------------------------------------------------------------


def sdxl_example_project(dest: Path) -> Path:
    """A copy of the example project made SDXL (``tiny-sdxl``, no ``arch``/``sizes``: the defaults), built."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(REPO / "characters", dest / "characters")
    proj = dest / "characters" / "project.toml"
    lines = []
    for line in proj.read_text(encoding="utf-8").splitlines():
        if line.startswith(("arch =", "sizes =", "BODY_SOFT =")):  # the SD1.5 preset has 26 values
            continue
        lines.append('base = "tiny-sdxl"' if line.startswith("base =") else line)
    proj.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "charbuild.cli", "build", "image", "caption", "dataset", "--root", str(dest)],
                          capture_output=True, text=True, cwd=str(dest))
    if proc.returncode != 0:
        raise RuntimeError(f"charbuild build failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dest


def check_dataset(sd: SdEnv, work: Path) -> Result:
    import tomllib

    res = Result("b. SDXL dataset TOMLs read by sd-scripts (sdxl_train_network.py's parser and strategies)")
    project = sdxl_example_project(work / "project")
    tomls = sorted((project / "build" / "loras").glob("*/dataset.toml"))
    if not res.check(len(tomls) > 0, f"charbuild wrote {len(tomls)} dataset TOML(s)"):
        return res
    out = run_sdxl(sd, work / "sd_dataset", "dataset",
                   {"tomls": [str(t.relative_to(project)) for t in tomls], "tokenizer_dir": str(work / "tokenizer")}, cwd=project)
    res.data = out
    for entry, toml_path in zip(out["results"], tomls):
        ours = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        lora = toml_path.parent.name
        n_ours = sum(len(d["subsets"]) for d in ours["datasets"])
        subsets = [s for d in entry["datasets"] for s in d["subsets"]]
        bad = [s["image_dir"] for s in subsets
               if s["img_count"] != sum(1 for p in (project / s["image_dir"]).iterdir() if p.suffix == ".png")]
        mism = [(p, c) for d in entry["datasets"] for p, c in d["captions"].items()
                if c != Path(p).with_suffix(".txt").read_text(encoding="utf-8").splitlines()[0].strip()]
        ds0 = entry["datasets"][0]
        res.check(len(subsets) == n_ours and not bad and not mism,
                  f"{lora}: {len(entry['datasets'])} dataset(s), {len(subsets)} subset(s), "
                  f"{sum(s['img_count'] for s in subsets)} image(s), captions equal our .txt; resolution {ds0['resolution']}, "
                  f"buckets {ds0['min_bucket_reso']}..{ds0['max_bucket_reso']} step {ds0['bucket_reso_steps']}, "
                  f"no upscale {ds0['bucket_no_upscale']}, sizes {ds0['buckets']}"
                  + (f"; counts differ in {bad}" if bad else "") + (f"; caption differs: {mism[0]}" if mism else ""))
        res.check(ds0["resolution"] == ours["datasets"][0]["resolution"] and ds0["max_bucket_reso"] == 2048,
                  f"{lora}: sd-scripts took resolution {ds0['resolution']} and max_bucket_reso {ds0['max_bucket_reso']} from the TOML")
        res.check(entry["sample"]["images"] is not None and entry["sample"]["input_ids"],
                  f"{lora}: batch 0 loads: images {entry['sample']['images']}, input_ids {entry['sample']['input_ids']} (two tokenizers)")
    check_large_classes(sd, work / "large", res)
    return res


def check_large_classes(sd: SdEnv, work: Path, res: Result) -> None:
    """The 1536 and 2048 buckets: read with charbuild's bucket lines, refused by sd-scripts without them."""
    from PIL import Image

    from charbuild.dataset_toml import Subset, render_dataset_toml

    sizes = {"mid": (1200, 1536), "high": (2048, 1100)}
    subsets = []
    for name, (w, h) in sizes.items():
        folder = work / "pics" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (w, h), (40 * i, 90, 160)).save(folder / f"f0{i}.png")
            (folder / f"f0{i}.txt").write_text(f"krnk, {name} {i}", encoding="utf-8")
        subsets.append(Subset(f"pics/{name}", "krnk girl", True, ((w, h), (w, h))))
    text = render_dataset_toml(1, subsets, {}, arch="sdxl")
    (work / "large.toml").write_text(text, encoding="utf-8")
    out = run_sdxl(sd, work / "sd", "dataset", {"tomls": ["large.toml"], "tokenizer_dir": str(work / "tokenizer")}, cwd=work)
    got = [(d["resolution"], d["buckets"]) for d in out["results"][0]["datasets"]]
    res.check(got == [([1536, 1536], [[1152, 1536]]), ([2048, 1536], [[2048, 1088]])],
              f"1200x1536 and 2048x1100 pictures: datasets (resolution, buckets) {got}")
    bare = "\n".join(line for line in text.splitlines() if "bucket_reso" not in line) + "\n"
    (work / "bare.toml").write_text(bare, encoding="utf-8")
    try:
        run_sdxl(sd, work / "sd-bare", "dataset", {"tomls": ["bare.toml"], "tokenizer_dir": str(work / "tokenizer")}, cwd=work)
        refused = ""
    except RuntimeError as exc:
        refused = str(exc)
    res.check("max_bucket_reso must be equal or greater than resolution" in refused,
              "control: the same TOML without the bucket lines is refused by sd-scripts"
              + (" (max_bucket_reso must be equal or greater than resolution)" if refused else ": it was read"))


# --------------------------------------------------------------------------------------------
# one real training
# --------------------------------------------------------------------------------------------


def mem_available_gb() -> float:
    """The machine's available memory (``MemAvailable``), in GiB; inf where /proc/meminfo is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def run_guarded(cmd: list[str], *, cwd: Path, env: dict, log: Path, guard_gb: float, timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; stop it when available memory falls below ``guard_gb``."""
    why = ""
    with log.open("w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=str(cwd), env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        done = threading.Event()

        def watch():
            nonlocal why
            while not done.wait(0.5):
                if mem_available_gb() < guard_gb:
                    why = f"stopped: the machine's available memory fell under {guard_gb} GiB"
                    os.killpg(proc.pid, signal.SIGKILL)
                    return

        threading.Thread(target=watch, daemon=True).start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, why = proc.wait(), f"stopped: over {timeout:.0f} s"
        done.set()
    return rc, why


def check_train(sd: SdEnv, work: Path, steps: int, min_free_gb: float, guard_gb: float, project: Path | None) -> Result:
    from safetensors import safe_open

    from charbuild.train.sdscripts_command import build_command, raw_output_path

    from charbuild.train.job import TrainJob

    res = Result("c. sdxl_train_network.py trains through charbuild's command (random SDXL weights, CPU)")
    free = mem_available_gb()
    if free < min_free_gb:
        res.check(False, f"not run: {free:.1f} GiB available, {min_free_gb} GiB needed (others share this machine)")
        return res
    res.info(f"{free:.1f} GiB available at the start")
    base = work / "sdxl-random.safetensors"
    if not base.exists():
        made = run_sdxl(sd, work / "sd_model", "make_model", {"path": str(base), "dtype": "bfloat16", "seed": 0}, timeout=3600)
        res.info(f"random SDXL checkpoint: {made['parameters'] / 1e9:.2f} G parameters, {made['bytes'] / 2**30:.1f} GiB, "
                 f"{made['seconds']:.0f} s")
    # small pictures: the 256 px rung of the SDXL ladder of one face LoRA
    project = project or sdxl_example_project(work / "project")
    toml = work / "train-dataset.toml"
    first = sorted((project / "build" / "loras").glob("*/dataset.toml"))[0].read_text(encoding="utf-8")
    blocks = [b for b in first.split("\n\n") if not b.startswith("[[datasets.subsets]]") or "/256'" in b]
    toml.write_text("\n\n".join(blocks), encoding="utf-8")
    job = sdxl_job(sd, work, base, toml, project, steps,
                   extra_args=["--tokenizer_cache_dir", str(work / "tokenizer"), "--full_bf16"])
    cmp_tok = run_sdxl(sd, work / "sd_tok", "dataset", {"tomls": [str(toml)], "tokenizer_dir": str(work / "tokenizer")}, cwd=project)
    res.info(f"training on {sum(s['img_count'] for d in cmp_tok['results'][0]['datasets'] for s in d['subsets'])} pictures "
             f"of {toml.name} (256 px), {steps} steps")
    Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)
    cmd = build_command(TrainJob.from_dict(job))
    res.info("command: " + " ".join(cmd))
    t0 = time.time()
    rc, why = run_guarded(cmd, cwd=project, env=sd.env(), log=work / "train.log", guard_gb=guard_gb, timeout=5400)
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    log = (work / "train.log").read_text(encoding="utf-8", errors="replace")
    its = re.findall(r"(\d+\.\d+)s/it", log)
    res.info(f"wall {wall:.0f} s, peak RSS {peak:.1f} GiB" + (f", last {its[-1]} s/step (sd-scripts' progress bar)" if its else ""))
    out = raw_output_path(job)
    if not res.check(rc == 0 and out.is_file(), f"exit {rc}{' (' + why + ')' if why else ''}, LoRA {out.name} "
                     f"{'written' if out.is_file() else 'missing'}; log {work / 'train.log'}"):
        res.info("log tail: " + " | ".join(log.strip().splitlines()[-8:]))
        return res
    with safe_open(str(out), "pt") as f:
        keys, meta = list(f.keys()), f.metadata() or {}
    modules = {k.split(".")[0] for k in keys}
    bad = [m for m in modules if not m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))]
    res.check(not bad and modules, f"{len(modules)} modules, all kohya SDXL UNet names (UNet only)" + (f"; other: {bad[:3]}" if bad else ""))
    res.check(meta.get("ss_base_model_version") == "sdxl_base_v1-0",
              f"ss_base_model_version = {meta.get('ss_base_model_version')!r}, "
              f"ss_zero_terminal_snr {meta.get('ss_zero_terminal_snr')!r}, ss_noise_offset {meta.get('ss_noise_offset')!r}")
    res.data = {"wall_s": wall, "peak_rss_gib": peak, "s_per_step": its[-1] if its else None, "modules": len(modules)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sd-scripts", default=os.environ.get("CHARBUILD_SD_SCRIPTS"), help="sd-scripts checkout")
    ap.add_argument("--sd-python", default=os.environ.get("CHARBUILD_SD_PYTHON"), help="python of sd-scripts' venv")
    ap.add_argument("--checks", default="command,dataset", help="comma list of command,dataset,train (train: opt-in, heavy)")
    ap.add_argument("--steps", type=int, default=2, help="training steps of the train check")
    ap.add_argument("--min-free-gb", type=float, default=14.0, help="available memory the train check needs to start")
    ap.add_argument("--guard-gb", type=float, default=1.5, help="stop sd-scripts when available memory falls under this")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder")
    ap.add_argument("--json", help="write all results as JSON here")
    a = ap.parse_args(argv)
    sd, why = sd_env_from_environ(a.sd_scripts, a.sd_python)
    if sd is None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="charbuild-sdxlcmp-"))
    work.mkdir(parents=True, exist_ok=True)
    checks = [c.strip() for c in a.checks.split(",") if c.strip()]
    print(f"sd-scripts: {sd.sd_scripts} (python {sd.python}); work: {work}", flush=True)
    results: list = []

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

    if "command" in checks:
        run("a. command", lambda: check_command(sd, work / "a"))
    if "dataset" in checks:
        run("b. dataset", lambda: check_dataset(sd, work / "b"))
    if "train" in checks:
        built = work / "b" / "project"
        run("c. train", lambda: check_train(sd, work / "c", a.steps, a.min_free_gb, a.guard_gb,
                                            built if (built / "build" / "loras").is_dir() else None))
    return cmp.finish(results, a.json, work, remove=not a.work and not a.keep)


if __name__ == "__main__":
    sys.exit(main())
