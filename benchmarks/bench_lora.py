"""Benchmark of the LoRA toolkit on a synthetic SD1.5 Lora3x3 file (rank 128, fp16).

Usage: ``python benchmarks/bench_lora.py [--quick] [--keep DIR]``

The file holds every module a kohya Lora3x3 adapts (attention, resnet/up/down-sampler 3x3,
shortcuts, time-embedding projections, text encoder): 350 modules, about 311 MB. Each
measurement runs in its own subprocess; peak memory is that process's ``ru_maxrss`` (which
includes the ~interpreter + torch import, shown separately as "idle").

* ``load+save``: plain ``safetensors`` load_file + save_file of the file (the I/O floor).
* ``compress``: ``compress_file`` (sv_ratio 16, cap 128, fp16): float32 Grams + r×r core per module.
* ``reference``: the same algorithm with the full SVD of each (out × in·k·k) delta, as
  resize_lora.py does it (``full_matrices=False``, which is faster than resize_lora.py's
  default), timed on every 10th module (35 of 350, all kinds) and extrapolated by module
  count × per-module mean of the sample.
* ``merge``: ``merge_file`` with the FACE preset.

Targets: compress ≥ 50× faster than the reference; compress ≤ 3× load+save; compress peak
memory ≤ 3× file size; merge ≤ 1.5× load+save.

Every measurement runs with torch's thread count (one per core; ``--threads N`` sets it):
compress resizes modules side by side on that many worker threads, load+save is single-threaded
I/O. ``--only loadsave compress`` skips the rest; ``--keep DIR`` reuses the file built there.

``lora_io`` (charbuild's validated ``load_lora`` + ``save_lora`` with its sshs hashes, of the
full 312 MB; compress writes 183 MB) and ``products`` (only the float32 matrix products compress
cannot avoid: both Grams and both new factors, 2·r·(r+k)·(out+in) flops per module) are floors,
not targets. load+save, lora_io and compress alternate, 5 runs each, medians; "cpu s" is the
process's user+sys time.

Results, 2026-11-25 (2-core AMD EPYC (AVX-512), load average ~0.9, torch 2.13 CPU, 2 threads):

    file: 350 modules, 311.6 MB (full)
    measurement    seconds   cpu s  peak RSS MB  over idle MB
    idle              0.00    0.00          232             0
    loadsave          0.44    0.31          551           319
    lora_io           0.58    0.62          555           322
    compress          1.65    2.77          644           411
    products          0.52    1.13          605           372
    merge             0.36    0.41          554           321
    reference       299.95  593.15         1016           784
    products: 63.3 GFLOP (float32 Grams + new factors) at 122 GFLOP/s
    compressed: 182.8 MB, mean retained fro 99.8% sum(S) 94.6%
    PASS  compress >= 50x faster than full-SVD reference: 182.10 (>= 50.0)
    FAIL  compress <= 3x load+save: 3.74 (<= 3.0)
    PASS  compress peak memory <= 3x file size: 2.07 (<= 3.0)
    PASS  merge <= 1.5x load+save: 0.82 (<= 1.5)

Against charbuild's own validated load + hashed save of the same file (``lora_io``, printed as
information) compress takes 2.8-3.0x. Repeated runs the same day: compress/load+save 3.6-4.2x (load+save 0.36-0.45 s, compress
1.44-1.88 s), full-SVD reference 180-245x, memory 2.0-2.1x since compress_file streams its output
(2.5-2.6x before). The same box measured 6.5-8.6x with one thread before these changes.

Where compress's time goes (one thread, per-section timers over the 350 modules, core-seconds):
matrix products 0.87 (Grams 0.46, new factors 0.41), 128×128 eigh 0.42, Cholesky + condition
estimate 0.27, other r×r work 0.19, rank rules and stats 0.12, fp16<->fp32 0.08; plus the
validated load 0.1, and the write 0.17 with its sha256 0.13, which run while the modules compute.
That is ~2.3 core-seconds; on two cores the wall-clock floor is ~1.2 s, i.e. ≥ 2.8x a 0.43 s
load+save before any overhead. The products run at ~90 GFLOP/s per core (near this CPU's fp32
peak); LAPACK's 128×128 eigh takes 1.2 ms here (MKL and OpenBLAS alike, batched or not); bf16
products (2x faster here) lose too much precision for the ≤ 1e-4 delta error the tests ask.
So ≤ 3x needs more cores than this box has: the module work scales with cores (workers),
load+save does not. The synthetic spectrum (logspace 1…0.01) is gentler than a trained LoRA's,
so sv_ratio 16 keeps more rank here than the ~40 MB real files end at.

Tried and not kept: the r×r work batched across all modules (1.3 s vs 1.0 s: batched
cholesky_solve is slower), Grams from symmetric 2×2 blocks (within noise), scipy's syrk/eigh
(syrk 30% faster on a Gram, eigh not; not worth a second BLAS). Streaming the output while
modules compute cut peak memory by a fifth; its time gain is within this box's noise.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 5
sys.path.insert(0, str(ROOT))


def module_list(quick: bool) -> list:
    """The benchmark file's modules: every SD1.5 Lora3x3 module (every 6th with ``quick``)."""
    from charbuild.lora.keysets import sd15_modules

    mods = sd15_modules(conv=True, te=True)
    return mods[::6] if quick else mods


def build_file(path: Path, quick: bool) -> int:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    mods = module_list(quick)
    rank = 64 if quick else 128
    tensors = {}
    for stem, o, i, k in mods:
        kk = max(k, 1)
        shape_d = (rank, i) if k == 0 else (rank, i, kk, kk)
        shape_u = (o, rank) if k == 0 else (o, rank, 1, 1)
        # decaying spectrum, like a trained LoRA: sv_ratio 16 keeps a fraction of the rank
        decay = torch.logspace(0, -2, rank).reshape(1, rank, *([1] * (len(shape_u) - 2)))
        tensors[f"{stem}.lora_down.weight"] = (torch.randn(shape_d, generator=gen) * 0.02).half()
        tensors[f"{stem}.lora_up.weight"] = (torch.randn(shape_u, generator=gen) * 0.02 * decay).half()
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank) / 2).half()
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2),
            "ss_network_args": json.dumps({"conv_dim": rank, "conv_alpha": rank / 2}), "ss_base_model_version": "sd_v1"}
    save_file(tensors, str(path), meta)
    return len(mods)


def measure(kind: str, src: Path, out_dir: Path, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from charbuild.lora import compress, io, merge  # noqa: F401

    c0, t0 = _cpu(), time.perf_counter()
    extra: dict = {}
    if kind == "idle":
        pass
    elif kind == "loadsave":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(src), "pt") as f:
            meta = f.metadata()
        save_file(load_file(str(src)), str(out_dir / "copy.safetensors"), meta)
    elif kind == "lora_io":  # compress_file's own I/O: validated load_lora + save_lora (sshs hashes)
        lora = io.load_lora(src)
        io.save_lora(out_dir / "lora_io.safetensors", lora.tensors, lora.metadata)
    elif kind == "products":  # the matrix products compress cannot avoid (float32 Grams + new factors)
        from safetensors import safe_open

        lora = io.load_lora(src)
        with safe_open(str(out_dir / "small.safetensors"), "pt") as f:
            ranks = {k.rsplit(".", 2)[0]: f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_down.weight")}
        t0 = time.perf_counter()
        flops = 0
        for stem, m in lora.modules.items():
            up = m.params["lora_up.weight"].float().reshape(m.params["lora_up.weight"].shape[0], -1)
            down = m.params["lora_down.weight"].float().reshape(m.rank, -1)
            k = ranks[stem]
            _ = up.T @ up, down @ down.T, torch.ones(k, m.rank) @ down, up @ torch.ones(m.rank, k)
            flops += 2 * m.rank * (m.rank + k) * (up.shape[0] + down.shape[1])
        extra = {"gflop": flops / 1e9}
    elif kind == "compress":
        rep = compress.compress_file(src, out_dir / "small.safetensors", method="sv_ratio", param=16.0, new_rank=128)
        extra = {"size_out": rep["size_out"], "mean_fro": rep["mean_fro_retained"], "mean_sum": rep["mean_sum_retained"]}
    elif kind == "merge":
        merge.merge_file(src, out_dir / "merged.safetensors", "FACE")
    elif kind == "reference":
        lora = io.load_lora(src)
        stems = sorted(lora.modules)
        sample = stems[::10]
        c0, t0 = _cpu(), time.perf_counter()
        for stem in sample:
            m = lora.modules[stem]
            up = m.params["lora_up.weight"].float()
            down = m.params["lora_down.weight"].float()
            full = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            u, s, vh = torch.linalg.svd(full, full_matrices=False)
            k = compress.choose_rank(s, "sv_ratio", 16.0, 128)
            _ = (u[:, :k] * s[:k]).half(), vh[:k].half()
        sampled = time.perf_counter() - t0
        extra = {"sampled_modules": len(sample), "sampled_seconds": sampled}
        cpu = (_cpu() - c0) / len(sample) * len(stems)
        return {"seconds": sampled / len(sample) * len(stems), "cpu": cpu, "maxrss": _rss(), "threads": torch.get_num_threads(), **extra}
    return {"seconds": time.perf_counter() - t0, "cpu": _cpu() - c0, "maxrss": _rss(), "threads": torch.get_num_threads(), **extra}


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_sub(kind: str, src: Path, out_dir: Path, threads: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, str(src), str(out_dir), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller file (every 6th module, rank 64)")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep the files")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per measurement (default: torch's, one per core)")
    ap.add_argument("--only", nargs="+", help="run only these measurements (e.g. loadsave compress)")
    ap.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        kind, src, out = args.measure
        if kind == "build":
            print(json.dumps({"modules": build_file(Path(src), out == "quick")}))
        else:
            print(json.dumps(measure(kind, Path(src), Path(out), args.threads)))
        return
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_lora_"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "lora3x3.safetensors"
    # built in a subprocess: ru_maxrss survives exec, so this process must stay small
    if args.keep and src.exists():  # reuse the file of an earlier run in the same folder
        n = len(module_list(args.quick))
    else:
        n = run_sub("build", src, Path("quick" if args.quick else "full"))["modules"]
    size = src.stat().st_size
    print(f"file: {n} modules, {size / 1e6:.1f} MB ({'quick' if args.quick else 'full'})")
    # load+save and compress alternate, 3 runs each, median (the box is shared: one run can be 2x off)
    wanted = set(args.only or ("loadsave", "lora_io", "compress", "products", "merge", "reference"))
    runs: dict[str, list[dict]] = {k: [] for k in ("loadsave", "lora_io", "compress") if k in wanted}
    for _ in range(REPEATS):
        for k in runs:
            runs[k].append(run_sub(k, src, work, args.threads))
    res = {"idle": run_sub("idle", src, work, args.threads)}
    for k, rs in runs.items():
        res[k] = dict(sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2])
        res[k]["cpu"] = sorted(r["cpu"] for r in rs)[len(rs) // 2]
        res[k]["maxrss"] = max(r["maxrss"] for r in rs)
    for k in ("products", "merge", "reference"):
        if k in wanted:
            res[k] = run_sub(k, src, work, args.threads)
    print(f"torch threads per measurement: {res['idle']['threads']}; load+save, lora_io and compress: median of {REPEATS}")
    print(f"{'measurement':12} {'seconds':>9} {'cpu s':>7} {'peak RSS MB':>12} {'over idle MB':>13}")
    idle = res["idle"]["maxrss"]
    for k, r in res.items():
        print(f"{k:12} {r['seconds']:9.2f} {r['cpu']:7.2f} {r['maxrss'] / 1e6:12.0f} {(r['maxrss'] - idle) / 1e6:13.0f}")
    if "products" in res:
        p = res["products"]
        print(f"products: {p['gflop']:.1f} GFLOP (float32 Grams + new factors) at {p['gflop'] / p['seconds']:.0f} GFLOP/s")
    c = res.get("compress")
    if c:
        print(f"compressed: {c['size_out'] / 1e6:.1f} MB, mean retained fro {c['mean_fro']:.1%} sum(S) {c['mean_sum']:.1%}")
    if "reference" in res:
        print(f"reference sampled {res['reference']['sampled_modules']} modules in {res['reference']['sampled_seconds']:.1f} s")
    checks = []
    if c and "reference" in res:
        checks.append(("compress >= 50x faster than full-SVD reference", res["reference"]["seconds"] / c["seconds"], ">=", 50.0))
    if c and "loadsave" in res:
        ls = res["loadsave"]
        checks.append(("compress <= 3x load+save", c["seconds"] / ls["seconds"], "<=", 3.0))
        print(f"cpu seconds, compress / load+save: {c['cpu'] / ls['cpu']:.2f} (compress uses every core, load+save one)")
        if "lora_io" in res:
            print(f"compress / lora_io (charbuild's validated load + hashed save of the same file): "
                  f"{c['seconds'] / res['lora_io']['seconds']:.2f} (information)")
    if c:
        checks.append(("compress peak memory <= 3x file size", c["maxrss"] / size, "<=", 3.0))
    if "merge" in res and "loadsave" in res:
        checks.append(("merge <= 1.5x load+save", res["merge"]["seconds"] / res["loadsave"]["seconds"], "<=", 1.5))
    for name, value, op, limit in checks:
        ok = value >= limit if op == ">=" else value <= limit
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f} ({op} {limit})")


if __name__ == "__main__":
    main()
