"""Time per stage of `make demo`: a cold run against a warm re-run, measured in the same invocation.

    .venv/bin/python benchmarks/demo_stages.py [--experiment demo_ci] [--keep DIR] [-- extra overrides]

Runs ``python -m pipeline.demo`` twice into a fresh run store and report folder (temporary unless
--keep): the first (cold) run trains, evaluates and fits; the second (warm) must reuse everything.
Prints one row per stage (sweep, eval, regress, total) with the cold and warm seconds and the ratio
cold/warm, read from each run's demo_summary.json. The processed datasets and the cached scratch
models under paths.data_dir are shared with the normal pipeline (they are built once on a fresh
clone; that one-off cost is not part of either column). Targets: the full demo cold under 15 min
on a 2-core CPU; the warm total under 30 s (printed as PASS/FAIL).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLD_TARGET_S = 15 * 60
WARM_TARGET_S = 30.0


def run_demo(experiment: str, runs: Path, reports: Path, extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    t0 = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", "pipeline.demo", "--experiment", experiment,
                          f"paths.runs_dir={runs}", f"paths.reports_dir={reports}", *extra], cwd=ROOT, env=env)
    wall = time.monotonic() - t0
    s = json.loads((reports / "analysis" / "demo_summary.json").read_text())
    s["wall"], s["rc"] = wall, rc
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="demo_ci")
    ap.add_argument("--keep", help="use this folder for runs/ and reports/ (kept afterwards)")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="plw_demo_bench_"))
    runs, reports = base / "runs", base / "reports"
    cold = run_demo(args.experiment, runs, reports, extra)
    warm = run_demo(args.experiment, runs, reports, extra)
    sec = lambda s, name: next((st["seconds"] for st in s["stages"] if st["name"] == name), float("nan"))
    print(f"\nmake demo stage times, experiment {args.experiment} ({cold['runs_total']} runs), "
          f"cold run vs warm re-run in the same invocation; store {base}")
    print(f"{'stage':<10}{'cold s':>10}{'warm s':>10}{'cold/warm':>11}")
    for name in ("sweep", "eval", "regress"):
        c, w = sec(cold, name), sec(warm, name)
        print(f"{name:<10}{c:>10.1f}{w:>10.1f}{(c / w if w > 0 else float('inf')):>11.1f}")
    print(f"{'total':<10}{cold['wall']:>10.1f}{warm['wall']:>10.1f}{cold['wall'] / warm['wall']:>11.1f}")
    ok_cold = cold["rc"] == 0 and (args.experiment != "demo" or cold["wall"] < COLD_TARGET_S)
    ok_warm = warm["rc"] == 0 and warm["wall"] < WARM_TARGET_S
    print(f"cold run ok{' and < 15 min' if args.experiment == 'demo' else ''}: {'PASS' if ok_cold else 'FAIL'}; "
          f"warm re-run < {WARM_TARGET_S:.0f} s: {'PASS' if ok_warm else 'FAIL'}")
    return 0 if ok_cold and ok_warm else 1


if __name__ == "__main__":
    sys.exit(main())
