"""Time per stage of `make demo`: a cold run against a warm re-run, measured in the same invocation.

    .venv/bin/python benchmarks/demo_stages.py [--experiment demo] [--keep DIR] [--warm-data] [-- overrides]

Runs ``python -m pipeline.demo`` twice into a fresh folder (temporary unless --keep): the first (cold)
run does what a newcomer's first ``make demo`` does after ``make setup`` -- builds the processed
datasets and pre-trains the tiny models (a fresh ``paths.data_dir`` and ``PLW_CACHE_DIR``), trains,
evaluates and fits; the second (warm) must reuse everything. ``--warm-data`` uses the repository's
``data/`` instead (datasets and models already built: the cold column then times the grid alone).
Prints one row per stage (pretrain, sweep, eval, regress, total) with the cold and warm seconds and
the ratio cold/warm, read from each run's demo_summary.json, then PASS/FAIL against the targets:
the full ``demo`` cold under 10 min on this 2-core CPU, the warm re-run under 30 s.
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
COLD_TARGET_S = 10 * 60
WARM_TARGET_S = 30.0
STAGES = ("pretrain", "sweep", "eval", "regress")


def run_demo(experiment: str, base: Path, extra, warm_data: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    paths = [f"paths.runs_dir={base / 'runs'}", f"paths.reports_dir={base / 'reports'}"]
    if not warm_data:
        env["PLW_CACHE_DIR"] = str(base / "cache")
        paths.append(f"paths.data_dir={base / 'data'}")
    t0 = time.monotonic()
    rc = subprocess.call(
        [sys.executable, "-m", "pipeline.demo", "--experiment", experiment, *paths, *extra], cwd=ROOT, env=env
    )
    wall = time.monotonic() - t0
    s = json.loads((base / "reports" / "analysis" / "demo_summary.json").read_text())
    s["wall"], s["rc"] = wall, rc
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="demo")
    ap.add_argument("--keep", help="use this folder for data/, runs/ and reports/ (kept afterwards)")
    ap.add_argument("--warm-data", action="store_true", help="reuse the repository's data/ (datasets, models)")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="plw_demo_bench_"))
    cold = run_demo(args.experiment, base, extra, args.warm_data)
    warm = run_demo(args.experiment, base, extra, args.warm_data)

    def sec(s, name):
        return next((st["seconds"] for st in s["stages"] if st["name"] == name), float("nan"))

    print(
        f"\nmake demo stage times, experiment {args.experiment} ({cold['runs_total']} runs), cold run "
        f"({'repository data/' if args.warm_data else 'fresh data/ and caches'}) vs warm re-run, same "
        f"invocation; folder {base}"
    )
    print(f"{'stage':<10}{'cold s':>10}{'warm s':>10}{'cold/warm':>11}")
    for name in STAGES:
        c, w = sec(cold, name), sec(warm, name)
        print(f"{name:<10}{c:>10.1f}{w:>10.1f}{(c / w if w > 0 else float('inf')):>11.1f}")
    print(f"{'total':<10}{cold['wall']:>10.1f}{warm['wall']:>10.1f}{cold['wall'] / warm['wall']:>11.1f}")
    ok_cold = cold["rc"] == 0 and (args.experiment != "demo" or cold["wall"] < COLD_TARGET_S)
    ok_warm = warm["rc"] == 0 and warm["wall"] < WARM_TARGET_S
    print(
        f"cold run ok{' and < 10 min' if args.experiment == 'demo' else ''}: {'PASS' if ok_cold else 'FAIL'}; "
        f"warm re-run < {WARM_TARGET_S:.0f} s: {'PASS' if ok_warm else 'FAIL'}"
    )
    return 0 if ok_cold and ok_warm else 1


if __name__ == "__main__":
    sys.exit(main())
