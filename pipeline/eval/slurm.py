"""``python -m pipeline.eval launcher=slurm``: one SLURM array task per finished run lacking results.

Reuses the sweep's launcher (:mod:`pipeline.sweep.slurm`): the same sbatch parameters from each
run's ``model.resources`` (with any ``model.resources.*`` override of this command on top), the same
partition/account/QoS/setup from ``launcher.*``, a submitit folder unique to this invocation. Runs
whose results are complete (:func:`pipeline.eval.stage.pending_benchmarks` is empty) are not
submitted. Each task calls :func:`pipeline.eval.stage.evaluate_run` with the config composed here
(the job does not run Hydra). With ``launcher.wait=true`` this waits for the jobs and reports each
run's outcome.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.eval.results import read_results
from pipeline.eval.stage import evaluate_run, finished_runs, eval_run_config, pending_benchmarks
from pipeline.sweep.slurm import available, sbatch_parameters, submitit_folder

log = logging.getLogger(__name__)


class EvalTask:
    """A picklable submitit callable: evaluate one run in the job; returns a short outcome dict."""

    def __init__(self, run_dir: str, cfg: DictConfig) -> None:
        self.run_dir = str(run_dir)
        self.cfg = cfg

    def __call__(self) -> Dict[str, Any]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads:
            torch.set_num_threads(threads)
        path = evaluate_run(self.run_dir, self.cfg)
        rows = read_results(path)
        errors = sorted({r["benchmark"] for r in rows if r["status"] == "error"})
        print(f"[pipeline.eval] {Path(self.run_dir).name}: {path} ({len(errors)} benchmark(s) failed)", flush=True)
        return {"results": str(path), "errors": errors}


def _portable(cfg: DictConfig) -> DictConfig:
    """The config resolved here (interpolations may need Hydra, which the job does not run)."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # an unresolvable key elsewhere: send as is
        return cfg


def _resources(run_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> Tuple[int, int, int, int, int]:
    run_cfg, _ = eval_run_config(run_dir, cfg)
    r = OmegaConf.merge(
        OmegaConf.create(OmegaConf.to_container(run_cfg.model.resources, resolve=True)),
        OmegaConf.from_dotlist([o[len("model.resources.") :] for o in overrides if o.startswith("model.resources.")]),
    )
    return (int(r.nodes), int(r.gpus_per_node), int(r.cpus_per_task), int(r.mem_gb), int(r.timeout_min))


def runs_to_submit(cfg: DictConfig) -> List[Path]:
    """Finished runs of ``paths.runs_dir`` with some benchmark left to evaluate."""
    out = []
    for p in finished_runs(Path(str(cfg.paths.runs_dir))):
        try:
            todo = pending_benchmarks(p, cfg)
        except Exception as e:  # not readable here: let the job report it
            log.warning("%s: %s", p.name, e)
            todo = ["?"]
        if todo:
            out.append(p)
        else:
            log.info("%s: results complete, not submitted", p.name)
    return out


def submit(runs: List[Path], cfg: DictConfig, overrides: Sequence[str] = ()) -> List[Tuple[str, Any]]:
    """One job array per distinct resource request; returns (run folder name, submitit job)."""
    import submitit

    launcher = cfg.launcher
    folder = submitit_folder(cfg)
    groups: "OrderedDict[tuple, List[Path]]" = OrderedDict()
    for p in runs:
        groups.setdefault(_resources(p, cfg, overrides), []).append(p)
    job_cfg = _portable(cfg)
    out: List[Tuple[str, Any]] = []
    for res, group in groups.items():
        ex = submitit.SlurmExecutor(
            folder=str(folder / "%j"), max_num_timeout=int(launcher.max_num_timeout), python=launcher.get("python")
        )
        ex.update_parameters(**sbatch_parameters(res, launcher, "plw-eval"))
        with ex.batch():
            jobs = [ex.submit(EvalTask(str(p), job_cfg)) for p in group]
        out += [(p.name, job) for p, job in zip(group, jobs)]
    return out


def wait(jobs: List[Tuple[str, Any]], poll_s: float) -> Dict[str, Optional[str]]:
    """Wait for every job; run folder name -> None (evaluated, no benchmark error) or the problem."""
    outcome: Dict[str, Optional[str]] = {}
    pending = list(jobs)
    while pending:
        still = []
        for name, job in pending:
            if not job.done():
                still.append((name, job))
                continue
            try:
                res = job.result()
                outcome[name] = f"benchmark(s) failed: {', '.join(res['errors'])}" if res["errors"] else None
            except Exception as e:  # the job failed, was cancelled, or evaluate_run raised
                outcome[name] = f"job {job.job_id} {type(e).__name__}: {str(e).strip()[-600:]}"
            print(
                f"[{'ok' if outcome[name] is None else 'failed'}] {name} (job {job.job_id})"
                + ("" if outcome[name] is None else f": {outcome[name]}"),
                flush=True,
            )
        pending = still
        if pending:
            time.sleep(float(poll_s))
    return outcome


def main(cfg: DictConfig, overrides: Sequence[str]) -> int:
    """The ``launcher=slurm`` branch of ``python -m pipeline.eval`` (every finished run lacking results)."""
    why = available()
    if why is not None:
        print(f"error: launcher=slurm: {why}", file=sys.stderr)
        return 2
    runs = runs_to_submit(cfg)
    if not runs:
        print(f"nothing to submit: no finished run lacking results in {cfg.paths.runs_dir}")
        return 0
    jobs = submit(runs, cfg, overrides)
    for name, job in jobs:
        print(f"submitted {name}: job {job.job_id}")
    if not cfg.launcher.get("wait"):
        return 0
    outcome = wait(jobs, float(cfg.launcher.get("poll_s") or 30))
    bad = [n for n, o in outcome.items() if o is not None]
    print(f"{len(outcome) - len(bad)} run(s) evaluated, {len(bad)} failed")
    return 1 if bad else 0
