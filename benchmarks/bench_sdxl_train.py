"""SDXL training, builtin vs the real kohya-ss sd-scripts: seconds per step and peak memory.

Both trainers run, one after the other, on the **same** random-weight checkpoint with the real
SDXL shapes (sd-scripts' own ``SdxlUNet2DConditionModel``, CLIP-L, OpenCLIP-bigG, the SDXL VAE;
3.47 G parameters, written once in bf16 by ``compare_sd_scripts_sdxl.py``'s worker), the same
pictures, captions and dataset TOML, and the same job: UNet-only LoRA (linear, dim 4, alpha 1),
AdamW, lr 1e-4, batch size 1, cached latents and cached text-encoder outputs, the same seed.
sd-scripts runs ``sdxl_train_network.py`` through charbuild's own command
(``charbuild.train.sdscripts_command.build_command``) with ``--cache_latents --sdpa`` added (the builtin
always caches latents; ``--sdpa`` gives sd-scripts the attention kernel diffusers uses — without
it sd-scripts falls back to a slower plain attention, which would flatter us); the builtin runs
``charbuild.train.builtin.trainer.run_job`` in a child process.

Precision: on a GPU ``mixed_precision = "bf16"`` (frozen weights bf16, the LoRA fp32 under
autocast, on both sides) at 1024 px by default; on a CPU fp32 (``"no"``) at 256 px, because
the builtin trains in float32 on a CPU and bf16 without bf16 instructions is ~30x slower there.
Both use the same number of torch threads (``--threads``, default: all cores).

Measured per side: seconds per step over steps 2..N (the first is warm-up), from the builtin's
own step timings and from sd-scripts' progress bar (its elapsed time at each step, 1 s
resolution: the run's steps must be long against that); the training process's peak RSS
(``ru_maxrss``, loading the checkpoint included; it counts the pages of a memory-mapped
checkpoint file as well, which the kernel can drop) and its peak anonymous memory
(``RssAnon`` sampled every 0.1 s: what it really holds; Linux only); on a GPU the builtin's
peak CUDA memory (``torch.cuda.max_memory_allocated``; sd-scripts reports none). Targets
(issue 11): builtin ≥ 1.0x sd-scripts' speed and ≤ 1.0x its memory (both measures).

Usage (project python; sd-scripts as in benchmarks/SD_SCRIPTS.md)::

    CHARBUILD_SD_SCRIPTS=/tmp/sd-scripts CHARBUILD_SD_PYTHON=/tmp/sdenv/bin/python \\
        python benchmarks/bench_sdxl_train.py --work /tmp/sdxlbench [--steps 6] [--resolution 256]

``--sides builtin`` runs only ours (no sd-scripts needed). ``--work`` keeps the checkpoint
(6.5 GiB, ~4 min to write) for the next run. Needs ~20 GiB of available memory on a CPU in
fp32; each side is stopped when the machine's available memory falls under ``--guard-gb``.

Results, 2026-12-01, the 2-core 24 GB CPU machine (no GPU; load average 0.9 at the start),
sd-scripts 48d368fa (torch 2.14.1) vs charbuild (torch 2.13.0), ``python
benchmarks/bench_sdxl_train.py --work /tmp/sdxlbench`` (4 pictures at 256 px, 6 steps, fp32,
2 threads), three runs as the builtin's loading was mended between them:

    run                                   side        s/step  peak RSS GiB  peak anon GiB
    1. as it was                          sd-scripts   13.20         18.71              -
                                          builtin      12.29         19.80              -   1.07x speed, 1.06x RSS: FAIL
    2. half file loaded in its dtype,     sd-scripts   13.60         21.56              -
       text encoders released             builtin      11.33         22.10              -   1.20x speed, 1.02x RSS: FAIL
    3. + accelerate installed             sd-scripts   13.60         22.35          15.56
                                          builtin      11.75         19.83          13.36   1.16x speed, 0.89x RSS,
                                                                                            0.86x anon: PASS

Run 1's builtin spent 84 s loading the checkpoint and peaked there: without accelerate,
diffusers builds each model with a random float32 initialisation before it copies the file's
weights in. With accelerate (now a dependency) the models are built on the meta device and the
checkpoint is memory-mapped: it loads in 6 s, and the peak is the float32 training copy of the
weights. sd-scripts' peak RSS varies by 3.6 GiB between runs (the checkpoint's mapped pages);
its anonymous peak is the steadier measure. Not run on a GPU (none lent to this session): on a
GPU the script defaults to 1024 px and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

import compare_sd_scripts_sdxl as xl  # noqa: E402  (a sibling script: benchmarks/ is sys.path[0])

#: The job of both sides; ``mixed_precision`` is set per device.
BENCH_PARAMS = {"preset": "Lora1x1A1-AdamW8", "optimizer": "AdamW", "dim": 4, "alpha": 1, "lr": 1e-4,
                "network_train_unet_only": True, "cache_text_encoder_outputs": True, "save_precision": "fp16",
                "data_loader_workers": 0, "seed": 31337, "scheduler": "constant"}


def make_pictures(project: Path, n: int, size: int) -> Path:
    """``n`` smooth random ``size`` px pictures with distinct captions, and their dataset TOML."""
    import numpy as np
    from PIL import Image

    from charbuild.dataset_toml import Subset, render_dataset_toml

    folder = project / "pics" / str(size)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.random((8, 8, 3)) * 255
        img = Image.fromarray(low.astype("uint8")).resize((size, size), Image.BICUBIC)
        img.save(folder / f"f{i:02d}.png")
        (folder / f"f{i:02d}.txt").write_text(f"krnk, 1girl, solo, picture {i}", encoding="utf-8")
    text = render_dataset_toml(1, [Subset(f"pics/{size}", "krnk girl", False, ((size, size),) * n)], {}, arch="sdxl")
    # sd-scripts refuses cached latents with color_aug (the builtin ignores color_aug when caching)
    text = text.replace("color_aug = true", "color_aug = false")
    toml = project / "dataset.toml"
    toml.write_text(text, encoding="utf-8")
    return toml


def job_for(side: str, sd, work: Path, base: Path, toml: Path, project: Path, steps: int, mixed_precision: str,
            gradient_checkpointing: bool) -> dict:
    """The job dict of one side: ``compare_sd_scripts_sdxl.sdxl_job`` with the bench parameters."""
    params = dict(BENCH_PARAMS, mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing)
    job = xl.sdxl_job(sd, work / side, base, toml, project, steps, params=params,
                      extra_args=["--tokenizer_cache_dir", str(work / "tokenizer"), "--cache_latents", "--sdpa"])
    if side == "builtin":
        job["trainer"] = {"backend": "builtin"}
    return job


def measure(cmd: list[str], *, cwd: Path, env: dict, log: Path, guard_gb: float, timeout: float) -> dict:
    """Run ``cmd`` through this script's ``--measure`` wrapper: exit code, wall time, and the
    training process's peak RSS and peak anonymous memory."""
    mem_file = log.with_suffix(".mem.json")
    mem_file.unlink(missing_ok=True)
    wrapped = [sys.executable, str(Path(__file__).resolve()), "--measure", str(mem_file), "--", *cmd]
    t0 = time.time()
    rc, why = xl.run_guarded(wrapped, cwd=cwd, env=env, log=log, guard_gb=guard_gb, timeout=timeout)
    mem = json.loads(mem_file.read_text(encoding="utf-8")) if mem_file.is_file() else {}
    return {"rc": rc, "why": why, "wall_s": time.time() - t0, **mem}


def _anon_gib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return None


def measure_child(mem_file: str, cmd: list[str]) -> int:
    """The ``--measure`` wrapper: run ``cmd``; write its peak RSS (``ru_maxrss``: it counts the
    pages of a memory-mapped checkpoint too, which the kernel can drop) and its peak anonymous
    memory (``RssAnon`` sampled every 0.1 s: what it really holds) to ``mem_file`` in GiB."""
    proc = subprocess.Popen(cmd)
    peak_anon = None
    while proc.poll() is None:
        anon = _anon_gib(proc.pid)
        if anon is not None:
            peak_anon = max(peak_anon or 0.0, anon)
        time.sleep(0.1)
    Path(mem_file).write_text(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                                          "peak_anon_gib": peak_anon}), encoding="utf-8")
    return proc.returncode


def builtin_child(job_file: str, result_file: str) -> None:
    """The builtin side's process: run the job, write its step timings."""
    from charbuild.train.builtin.trainer import run_job
    from charbuild.train.job import TrainJob

    summary = run_job(TrainJob.from_json(job_file))
    Path(result_file).write_text(json.dumps({"step_durations": summary["step_durations"],
                                             "peak_cuda_bytes": summary.get("peak_cuda_bytes"),
                                             "final_loss": summary.get("final_loss")}), encoding="utf-8")


def sd_scripts_step_times(log_text: str) -> list[float]:
    """Elapsed seconds at each step from sd-scripts' progress bar (``steps: … | k/N [mm:ss<…``)."""
    at: dict[int, float] = {}
    for m in re.finditer(r"steps:[^|]*\|[^|]*\|\s*(\d+)/\d+ \[(?:(\d+):)?(\d+):(\d+)<", log_text):
        k = int(m.group(1))
        h, mnt, s = int(m.group(2) or 0), int(m.group(3)), int(m.group(4))
        if k > 0:
            at.setdefault(k, h * 3600 + mnt * 60 + s)
    return [at[k] for k in sorted(at)]


def per_step(durations: list[float]) -> float | None:
    """Mean of steps 2..N (step 1 is warm-up); None for fewer than 2 steps."""
    rest = durations[1:]
    return sum(rest) / len(rest) if rest else None


def run_builtin(work: Path, job: dict, env: dict, guard_gb: float, timeout: float) -> dict:
    side = work / "builtin"
    side.mkdir(parents=True, exist_ok=True)
    jf, rf = side / "job.json", side / "result.json"
    jf.write_text(json.dumps(job), encoding="utf-8")
    rf.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--builtin-child", str(jf), str(rf)]
    out = measure(cmd, cwd=Path(job["project_root"]), env=env, log=side / "train.log", guard_gb=guard_gb, timeout=timeout)
    if rf.is_file():
        res = json.loads(rf.read_text(encoding="utf-8"))
        out.update(step_s=res["step_durations"], s_per_step=per_step(res["step_durations"]),
                   peak_cuda_gib=(res["peak_cuda_bytes"] or 0) / 2**30 or None, final_loss=res["final_loss"])
    out["log"] = str(side / "train.log")
    return out


def run_sd_scripts(work: Path, sd, job: dict, guard_gb: float, timeout: float) -> dict:
    from charbuild.train.sdscripts_command import build_command
    from charbuild.train.job import TrainJob

    side = work / "sd-scripts"
    side.mkdir(parents=True, exist_ok=True)
    Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)
    cmd = build_command(TrainJob.from_dict(job))
    env = sd.env()
    out = measure(cmd, cwd=Path(job["project_root"]), env=env, log=side / "train.log", guard_gb=guard_gb, timeout=timeout)
    text = (side / "train.log").read_text(encoding="utf-8", errors="replace")
    at = sd_scripts_step_times(text)
    steps = [b - a for a, b in zip([0.0] + at, at)]
    out.update(step_s=steps, s_per_step=(at[-1] - at[0]) / (len(at) - 1) if len(at) > 1 else None,
               loss=(re.findall(r"avr_loss=([0-9.e+-]+)", text) or [None])[-1], command=" ".join(cmd))
    out["log"] = str(side / "train.log")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--measure"]:
        return measure_child(argv[1], argv[3:])
    if argv[:1] == ["--builtin-child"]:
        builtin_child(argv[1], argv[2])
        return 0
    import torch

    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sd-scripts", default=os.environ.get("CHARBUILD_SD_SCRIPTS"))
    ap.add_argument("--sd-python", default=os.environ.get("CHARBUILD_SD_PYTHON"))
    ap.add_argument("--sides", default="sd-scripts,builtin", help="comma list of sd-scripts,builtin (run in this order)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pictures", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=1024 if gpu else 256)
    ap.add_argument("--mixed-precision", default="bf16" if gpu else "no")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ap.add_argument("--guard-gb", type=float, default=1.0)
    ap.add_argument("--timeout", type=float, default=5400)
    ap.add_argument("--work", help="working folder, kept (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    sd, why = xl.sd_env_from_environ(a.sd_scripts, a.sd_python)
    if sd is None:
        print(f"cannot run: {why} (sd-scripts also writes the shared checkpoint)", file=sys.stderr)
        return 2
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="charbuild-sdxlbench-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "sdxl-random.safetensors"
    if not base.is_file():
        print("writing the random SDXL checkpoint (bf16, ~4 min) ...", flush=True)
        made = xl.run_sdxl(sd, work / "sd_model", "make_model", {"path": str(base), "dtype": "bfloat16", "seed": 0}, timeout=3600)
        print(f"  {made['parameters'] / 1e9:.2f} G parameters, {made['bytes'] / 2**30:.1f} GiB, {made['seconds']:.0f} s", flush=True)
    project = work / "project"
    toml = make_pictures(project, a.pictures, a.resolution)
    # the dataset worker writes the offline tokenizer files sd-scripts reads (--tokenizer_cache_dir)
    xl.run_sdxl(sd, work / "sd_tok", "dataset", {"tomls": [str(toml)], "tokenizer_dir": str(work / "tokenizer")}, cwd=project)
    threads = str(a.threads)
    print(f"{a.pictures} pictures at {a.resolution} px, {a.steps} steps, batch 1, mixed_precision {a.mixed_precision}, "
          f"gradient checkpointing {a.gradient_checkpointing}, {threads} thread(s), device {'cuda' if gpu else 'cpu'}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for side in sides:
        job = job_for(side, sd, work, base, toml, project, a.steps, a.mixed_precision, a.gradient_checkpointing)
        print(f"{side}: training ...", flush=True)
        if side == "builtin":
            env = dict(os.environ, OMP_NUM_THREADS=threads, CHARBUILD_TORCH_THREADS=threads,
                       PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            res = run_builtin(work, job, env, a.guard_gb, a.timeout)
        else:
            os.environ["OMP_NUM_THREADS"] = threads
            res = run_sd_scripts(work, sd, job, a.guard_gb, a.timeout)
        res["load_average_after"] = os.getloadavg()[0]
        results[side] = res
        steps = ", ".join(f"{s:.1f}" for s in res.get("step_s") or [])
        print(f"  exit {res['rc']}{' (' + res['why'] + ')' if res['why'] else ''}; wall {res['wall_s']:.0f} s; "
              f"steps [{steps}] s; s/step (2..N) {res.get('s_per_step')}; peak RSS {res.get('peak_rss_gib')} GiB, "
              f"peak anonymous {res.get('peak_anon_gib')} GiB; log {res['log']}", flush=True)
    print()

    def num(value) -> str:
        return f"{value:.2f}" if value else "-"

    print(f"{'side':<11} {'s/step':>8} {'peak RSS GiB':>13} {'peak anon GiB':>14} {'peak CUDA GiB':>14}")
    for side, r in results.items():
        print(f"{side:<11} {num(r.get('s_per_step')):>8} {num(r.get('peak_rss_gib')):>13} "
              f"{num(r.get('peak_anon_gib')):>14} {num(r.get('peak_cuda_gib')):>14}")
    ok = True
    if {"builtin", "sd-scripts"} <= results.keys() and all(results[s].get("s_per_step") for s in results):
        ours, theirs = results["builtin"], results["sd-scripts"]
        speed = theirs["s_per_step"] / ours["s_per_step"]
        rss = ours["peak_rss_gib"] / theirs["peak_rss_gib"]
        anon = ours["peak_anon_gib"] / theirs["peak_anon_gib"] if ours.get("peak_anon_gib") and theirs.get("peak_anon_gib") else None
        ok = speed >= 1.0 and rss <= 1.0 and (anon is None or anon <= 1.0)
        print(f"builtin: {speed:.2f}x sd-scripts' speed (target >= 1.0), {rss:.2f}x its peak RSS and "
              f"{num(anon)}x its peak anonymous memory (targets <= 1.0): {'PASS' if ok else 'FAIL'}")
    elif not all(r["rc"] == 0 for r in results.values()):
        ok = False
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
