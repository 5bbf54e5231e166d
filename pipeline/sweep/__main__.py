"""``python -m pipeline.sweep [run|status] [--dry-run] [hydra overrides]`` (make sweep / make status).

run (default)
    Compose the experiment's grid (``experiment=<name>`` and any ``experiment.*`` override change the
    grid; every other override applies to each run), read each run's state from the store, and
    launch what is not done: never-started runs, interrupted or stale ones (resumed from their last
    checkpoint) and failed ones with retries left (``launcher.max_retries``). Done, running and
    queued runs are left alone. ``--dry-run`` prints the grid (run id, state, estimated GPU-hours)
    and launches nothing; it writes nothing either (a read-only store is fine). A run whose
    ``status.json`` is corrupt is reported (state ``corrupt``, with the file) and left alone; the
    others go on. Exit status: 0 when every run is done (or, on SLURM without
    ``launcher.wait``, when the submission worked), 1 when some run is not done, 2 on a bad config.
status
    The table of the grid (``experiment=<name>``) or of every run in the store, from the store
    alone (the grid from the sweep's manifest; before any sweep, from the experiment's config):
    state, progress (step/total), loss, attempts, SLURM job, last error.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from pipeline import cli
from pipeline.config import load_config
from pipeline.runs import RunDir, list_runs
from pipeline.sweep import slurm
from pipeline.sweep import store as st
from pipeline.sweep.estimate import Estimate
from pipeline.sweep.local import run_local
from pipeline.sweep.plan import make_plan, manifest_entries, mark_stale, prepare_launch, refresh

log = logging.getLogger("pipeline.sweep")


def _row(pr) -> st.Row:
    row = st.row_of(
        pr.rd,
        pr.effective,
        {
            "model": pr.point.model,
            "dataset": pr.point.dataset,
            "plw": pr.point.plw,
            "variant": pr.point.variant,
            "seed": pr.point.seed,
        },
        pr.status if pr.rd.status_file.exists() else {},
    )
    row.run_id = pr.run_id
    if pr.estimate is not None:
        row.gpu_hours = pr.estimate.gpu_hours
    return row


def _slurm_refresh(plan) -> None:
    """Re-decide runs that have a SLURM job, with the job states from squeue/sacct."""
    ids = slurm.status_job_ids(plan.runs)
    if not ids or slurm.available() is not None:
        return
    states = slurm.job_states(ids)
    lc = plan.root.launcher
    for pr in plan.runs:
        if pr.status.get("slurm_job_id"):
            refresh(pr, int(lc.max_retries), float(lc.stale_after_s), states)


def _header(plan) -> str:
    lc = plan.root.launcher
    exp = plan.root.experiment
    return (
        f"experiment {plan.experiment}: {len(plan.runs)} runs ({exp.get('description', '')}); "
        f"launcher {lc.name}; store {plan.runs_dir}"
    )


def _cost_lines(plan) -> str:
    known = [pr for pr in plan.runs if pr.estimate is not None]
    total = sum(pr.estimate.gpu_hours for pr in known)
    left = sum(pr.estimate.gpu_hours for pr in known if pr.effective != "done")
    lc = plan.root.launcher
    srcs = sorted({pr.stats_source for pr in plan.runs if pr.stats_source})
    missing = len(plan.runs) - len(known)
    out = (
        f"estimated GPU-hours: {total:.4g} in all, {left:.4g} not done "
        f"(6 x params x trained tokens at {lc.gpu_peak_tflops:g} TFLOPs x MFU {lc.mfu:g}; "
        f"token counts from: {', '.join(s if len(s) < 40 else 'unavailable' for s in srcs)})"
    )
    if missing:
        out += f"\n{missing} run(s) without an estimate (no dataset statistics here): GPU-h '?'"
    ev = [pr.eval_estimate for pr in plan.runs if pr.eval_estimate is not None]
    if ev:
        worst = max(ev, key=lambda x: x.gpu_hours)
        out += (
            f"\nevaluation, at most: {sum(x.gpu_hours for x in ev):.4g} GPU-hours in all; per run up to "
            f"{worst.generations:,} generations, {worst.new_tokens:,} new tokens, {worst.gpu_hours:.3g} GPU-h "
            f"(at {lc.eval_tokens_per_s:g} generated tokens/s per GPU with eval.backend=hf, "
            f"{lc.eval_tokens_per_s_vllm:g} with vllm, launcher.eval_tokens_per_s[_vllm]; generation "
            f"stops earlier at EOS or a newline; loglikelihood benchmarks and judges not counted)"
        )
    return out


def cmd_run(overrides: List[str], dry_run: bool) -> int:
    plan = make_plan(overrides, estimates=dry_run)
    _slurm_refresh(plan)
    lc = plan.root.launcher
    print(_header(plan), flush=True)
    if dry_run:  # writes nothing (the store may be read-only); `make status` composes the grid itself
        print(st.format_table([_row(pr) for pr in plan.runs], show_cost=True))
        print(_cost_lines(plan))
        _report_corrupt(plan)
        todo = [pr for pr in plan.runs if pr.action in ("launch", "resume", "retry")]
        print(f"dry run: would launch {len(todo)} run(s); nothing launched, nothing written")
        return 0

    # stale runs become failed attempts, then are re-decided
    for pr in plan.runs:
        if pr.effective == "stale":
            mark_stale(pr)
            refresh(pr, int(lc.max_retries), float(lc.stale_after_s))
            pr.action = "resume" if pr.action == "retry" else pr.action
    _keep_costs(plan)
    st.write_manifest(plan.runs_dir, plan.experiment, manifest_entries(plan), overrides)
    todo = [pr for pr in plan.runs if pr.action in ("launch", "resume", "retry")]
    given_up = [pr for pr in plan.runs if pr.action == "give_up"]
    waiting = [pr for pr in plan.runs if pr.action == "wait"]
    done = [pr for pr in plan.runs if pr.action == "skip"]
    corrupt = [pr for pr in plan.runs if pr.action == "report"]
    print(
        f"{len(done)} done, {len(waiting)} running or queued elsewhere, {len(given_up)} failed with no "
        f"retries left (launcher.max_retries={lc.max_retries}), "
        + (f"{len(corrupt)} with a corrupt status.json, " if corrupt else "")
        + f"{len(todo)} to launch",
        flush=True,
    )
    for pr in given_up:
        print(f"  not retried: {pr.point.label()}: {pr.status.get('error', '')}"[:400])
    _report_corrupt(plan)
    if not todo:
        print("nothing to launch")
        print(st.format_table([_row(pr) for pr in plan.runs]))
        return 0 if len(done) == len(plan.runs) else 1
    for pr in todo:
        prepare_launch(pr, lc)

    if lc.kind == "local":
        try:
            run_local(todo, lc)
        except KeyboardInterrupt:
            print("sweep interrupted: the runs checkpointed; `make sweep` resumes them", file=sys.stderr)
            return 130
    else:
        why = slurm.available()
        if why is not None:
            print(f"error: launcher=slurm: {why}", file=sys.stderr)
            return 2
        folder = slurm.submitit_folder(plan.root)
        ids = slurm.submit(todo, plan.root, folder)
        jobs = sorted({j.split("_")[0] for j in ids.values()})
        print(
            f"submitted {len(ids)} run(s) as SLURM job array(s) {', '.join(jobs)} (submitit folder {folder})",
            flush=True,
        )
        if not lc.wait:
            print(
                f"follow with `make status EXPERIMENT={plan.experiment}`; re-run `make sweep` at any time "
                "(done and queued runs are left alone)"
            )
            return 0
        _wait_slurm(plan, todo)

    for pr in plan.runs:
        refresh(pr, int(lc.max_retries), float(lc.stale_after_s))
    _slurm_refresh(plan)
    print(st.format_table([_row(pr) for pr in plan.runs]))
    return 0 if all(pr.effective == "done" for pr in plan.runs) else 1


def _report_corrupt(plan) -> None:
    """One line per run whose status.json is corrupt (never launched; the others go on)."""
    for pr in plan.runs:
        if pr.action == "report":
            print(f"  corrupt, left alone: {pr.point.label()}: {pr.status.get('error', '')}", file=sys.stderr)


def _keep_costs(plan) -> None:
    """Carry GPU-hour estimates of an earlier dry run into the manifest."""
    old = st.read_manifest(plan.runs_dir, plan.experiment) or {}
    costs = {e["run_id"]: e.get("gpu_hours") for e in old.get("runs", [])}
    for pr in plan.runs:
        gh = costs.get(pr.run_id)
        if pr.estimate is None and gh is not None:
            pr.estimate = Estimate(examples=0, tokens=0, flops=0, gpu_hours=float(gh), wall_hours=None)


def _wait_slurm(plan, submitted) -> None:
    lc = plan.root.launcher
    bar = tqdm(total=len(submitted), desc="sweep (slurm)", unit="run", dynamic_ncols=True)
    reported = set()
    try:
        while True:
            states = slurm.job_states(
                slurm.status_job_ids(submitted) + [str(pr.rd.status().get("slurm_job_id")) for pr in submitted]
            )
            active = []
            for pr in submitted:
                refresh(pr, int(lc.max_retries), float(lc.stale_after_s), states)
                if pr.effective in ("running", "queued"):
                    active.append(pr)
                elif pr.run_id not in reported:
                    reported.add(pr.run_id)
                    bar.update(1)
                    err = f": {pr.status.get('error', '')}"[:300] if pr.effective != "done" else ""
                    bar.write(f"[{pr.effective}] {pr.point.label()}{err}")
            bar.set_postfix_str(
                f"{sum(pr.effective == 'running' for pr in active)} running, "
                f"{sum(pr.effective == 'queued' for pr in active)} queued"
            )
            if not active:
                return
            time.sleep(float(lc.poll_s))
    finally:
        bar.close()


def cmd_status(overrides: List[str]) -> int:
    cfg = load_config(list(overrides))
    runs_dir = Path(cfg.paths.runs_dir)
    exp = cfg.experiment.name if cfg.get("experiment") is not None else None
    states = None
    if slurm.available() is None:
        ids = []
        if exp is not None:
            man = st.read_manifest(runs_dir, exp) or {"runs": []}
            dirs = [RunDir(runs_dir / e["run_id"]) for e in man["runs"]]
        else:
            dirs = list_runs(runs_dir)
        for rd in dirs:
            if rd.status_file.exists():
                j = rd.status().get("slurm_job_id")
                if j:
                    ids.append(str(j))
        states = slurm.job_states(ids) if ids else None
    if exp is not None and st.read_manifest(runs_dir, exp) is None:
        # no sweep has run yet (a dry run writes nothing): the grid from the experiment's config
        plan = make_plan(list(overrides))
        rows = [_row(pr) for pr in plan.runs]
    else:
        rows = st.store_rows(runs_dir, exp, states, float(cfg.launcher.stale_after_s))
    where = f"experiment {exp}" if exp else "all runs"
    print(f"{where} in {runs_dir}")
    if not rows:
        print("no runs yet")
        return 0
    print(st.format_table(rows, show_cost=any(r.gpu_hours is not None for r in rows)))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.parser("python -m pipeline.sweep", __doc__, commands=("run", "status"), default_command="run")
    ap.add_argument("--dry-run", action="store_true", help="run: print the grid, its state and cost; start nothing")
    args, argv = cli.parse(ap, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_status(argv) if args.command == "status" else cmd_run(argv, args.dry_run)
    except (*cli.CONFIG_ERRORS, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
