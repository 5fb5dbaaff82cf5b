"""Does the example learn its characters? The example project's build on the demo model, timed and scored.

From a fresh clone of this repository (``git clone`` of HEAD into a temp folder: the committed
example, no ``build/``), runs ``python -m doit`` in it (the example's ``dodo.py``, every task:
images, captions, datasets, previews, trainings with samples, merges, compressions, the
report) and then reads each LoRA variant's ``metrics.jsonl``: the identity distance of every
template code's sample at step 0 (the base model without the LoRA) and at the last sample
step (:mod:`charbuild.identity`), per member for a group LoRA.

Targets (issue 17):

- the whole ``doit`` in <= 6 minutes on a 2-core CPU;
- for every LoRA (and every member of a group LoRA): the last sample closer to the
  character's own picture than step 0's for >= 90 % of the template codes, and the mean
  distance down by >= 30 %.

Usage::

    python benchmarks/bench_demo.py            # clone, build, score (prints a table; exit 1 with --strict on a miss)
    python benchmarks/bench_demo.py --dir /tmp/demo-bench --keep
    python benchmarks/bench_demo.py --score-only PROJECT   # score an already built project

Wall and CPU seconds and the load average are printed: on a shared machine the wall clock is
noise, read the CPU seconds too.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charbuild.identity import identity_gain  # noqa: E402
from charbuild.report.metrics import read_metrics  # noqa: E402

BUILD_TARGET_S = 6 * 60
CLOSER_TARGET = 0.9
DROP_TARGET = 0.3


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
    return dest


def build(project: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, exit status) of ``python -m doit`` in ``project``."""
    cpu0, t0 = children_cpu(), time.time()
    with open(project / "bench-doit.log", "wb") as log:
        rc = subprocess.run([sys.executable, "-m", "doit"], cwd=project, stdout=log, stderr=subprocess.STDOUT).returncode
    return time.time() - t0, children_cpu() - cpu0, rc


def score(project: Path) -> list[dict]:
    """One row per (LoRA variant, member): step-0 vs last identity of every code."""
    rows = []
    for metrics in sorted((project / "build" / "loras").glob("*/*/metrics.jsonl")):
        log = read_metrics(metrics)
        variant = f"{metrics.parent.parent.name}/{metrics.parent.name}"
        for member, per_step in sorted(log.identity_codes.items()):
            steps = sorted(per_step)
            if len(steps) < 2:
                continue
            gain = identity_gain(per_step[steps[0]], per_step[steps[-1]])
            ok = gain["closer"] >= CLOSER_TARGET and gain["drop"] >= DROP_TARGET
            trigger = log.trigger[-1][1] if log.trigger else None
            rows.append({"lora": variant, "member": member, "last_step": steps[-1], **gain, "trigger": trigger, "ok": ok})
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'LoRA':42} {'member':22} {'codes':>5} {'step 0':>7} {'last':>7} {'drop':>6} {'closer':>7} {'trigger':>8}  result")
    for r in rows:
        trig = "—" if r["trigger"] is None else f"{r['trigger']:.3f}"
        print(f"{r['lora']:42} {r['member']:22} {r['codes']:>5} {r['before']:>7.3f} {r['after']:>7.3f} "
              f"{r['drop'] * 100:>5.0f}% {r['closer'] * 100:>6.0f}% {trig:>8}  {'PASS' if r['ok'] else 'FAIL'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, help="work here (kept)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--score-only", type=Path, metavar="PROJECT", help="score a built project, build nothing")
    args = ap.parse_args(argv)
    ok = True
    if args.score_only:
        project = args.score_only
    else:
        work = args.dir or Path(tempfile.mkdtemp(prefix="bench-demo-"))
        if work.exists() and any(work.iterdir()):
            shutil.rmtree(work)
        project = clone(work)
        load0 = os.getloadavg()[0]
        wall, cpu, rc = build(project)
        fits = rc == 0 and wall <= BUILD_TARGET_S
        ok &= fits
        print(f"example doit from a fresh clone: {wall:.0f} s wall, {cpu:.0f} s CPU, exit {rc}, load average "
              f"{load0:.1f} -> {os.getloadavg()[0]:.1f}   target <= {BUILD_TARGET_S} s  {'PASS' if fits else 'FAIL'}")
        if rc != 0:
            print((project / "bench-doit.log").read_text(encoding="utf-8", errors="replace")[-3000:])
    rows = score(project)
    print_rows(rows)
    if not rows:
        print("no identity scores: did the trainings render samples?")
    ok &= bool(rows) and all(r["ok"] for r in rows)
    print(f"report: {project / 'build' / 'report' / 'index.html'}")
    if not args.score_only and not (args.keep or args.dir):
        shutil.rmtree(project, ignore_errors=True)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
