"""What block-weight exploration costs on the example project, and what it finds.

From a clone of this repository (or ``--project``, an already built copy of the example: its
trainings are then up to date), builds the example once without exploring (untimed unless it
had to train), then sets ``[merge] explore`` to four candidates for every LoRA (``--candidates``)
and times the second ``doit``: the candidate files, the rows rendered (base model, chosen
weights, each candidate) and their scores — what exploring adds to a build. With ``--blocks
LORA`` it then times ``charbuild explore LORA --blocks`` (the per-block analysis) too.

Target (issue 21): <= 3 minutes added on a 2-core CPU with 4 candidates.

Usage::

    python benchmarks/bench_explore.py                     # clone, build, explore, print the tables
    python benchmarks/bench_explore.py --project /tmp/ex    # reuse a built copy of the example
    python benchmarks/bench_explore.py --project /tmp/ex --blocks krnk

Wall and CPU seconds and the load average are printed: on a shared machine read the CPU seconds.
"""

from __future__ import annotations

import argparse
import json
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

from charbuild import explore  # noqa: E402

CANDIDATES = ["ALL", "BODY_SOFT", "0,1,1,1,1,1,0,0,0,1,0,0,0,0,1,0,1", "IN04:0.5,OUT03-OUT05:0"]
TARGET_S = 3 * 60


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall s, CPU s of the children) of ``cmd`` in ``cwd``; its output goes to a log beside it."""
    cpu0, t0 = children_cpu(), time.perf_counter()
    with open(cwd / "bench-explore.log", "a", encoding="utf-8") as log:
        rc = subprocess.call(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - t0, children_cpu() - cpu0
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {rc}); see {cwd / 'bench-explore.log'}")
    return wall, cpu


def set_candidates(project: Path, candidates: list[str]) -> None:
    toml = project / "characters/project.toml"
    lines = [line for line in toml.read_text(encoding="utf-8").splitlines() if not line.startswith("explore =")]
    at = lines.index("[merge]") + 1
    lines.insert(at, "explore = " + json.dumps(candidates))
    toml.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, help="a built copy of the example (default: a fresh clone)")
    ap.add_argument("--candidates", nargs="+", default=CANDIDATES)
    ap.add_argument("--blocks", metavar="LORA", help="also time the per-block analysis of this LoRA")
    args = ap.parse_args()
    project = args.project
    if project is None:
        project = Path(tempfile.mkdtemp(prefix="bench-explore-")) / "example"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(project)], check=True)
    doit = [sys.executable, "-m", "doit"]
    set_candidates(project, [])
    wall, cpu = run(doit, project)
    print(f"build without exploring: {wall:.0f} s wall, {cpu:.0f} s CPU")
    for old in project.glob("build/loras/*/*/explore"):  # an earlier exploration: start from nothing
        shutil.rmtree(old)
    set_candidates(project, args.candidates)
    wall, cpu = run(doit, project)
    load = os.getloadavg()[0]
    verdict = "met" if wall <= TARGET_S else "missed"
    print(f"exploring {len(args.candidates)} candidates added {wall:.0f} s wall, {cpu:.0f} s CPU "
          f"(target <= {TARGET_S} s: {verdict}; load {load:.1f})")
    for scores_file in sorted(project.glob("build/loras/*/*/explore/scores.json")):
        scores = json.loads(scores_file.read_text(encoding="utf-8"))
        print(f"\n{scores['lora']}/{scores['variant']}")
        for line in explore.table_lines(scores):
            print(line)
    if args.blocks:
        wall, cpu = run([sys.executable, "-m", "charbuild.cli", "explore", args.blocks, "--blocks"], project)
        print(f"\nper-block analysis of {args.blocks}: {wall:.0f} s wall, {cpu:.0f} s CPU")
        for blocks_file in sorted(project.glob(f"build/loras/{args.blocks}/*/explore/blocks.json")):
            for line in explore.blocks_lines(json.loads(blocks_file.read_text(encoding="utf-8"))):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
