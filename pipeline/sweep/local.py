"""launcher=local: the runs of a sweep on this machine, ``launcher.max_parallel`` at a time.

Each run is a subprocess (:mod:`pipeline.sweep.worker`, which calls :func:`pipeline.train.run`)
with its log in ``<run>/logs/attempt-<n>.log``. A progress bar counts finished runs and shows the
running ones' steps; one line per finished run says how it ended. A failed run never stops the
others. Ctrl-C (or SIGTERM to the sweep) asks every running run to checkpoint and stop (SIGTERM),
waits for them, and exits: the next sweep resumes them.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, List

from omegaconf import DictConfig
from tqdm import tqdm

from pipeline.sweep.plan import PlannedRun
from pipeline.sweep.supervise import Supervisor, describe


class _Stop(Exception):
    pass


def run_local(runs: List[PlannedRun], launcher: DictConfig, poll_s: float = 0.5,
              stop_grace_s: float = 300.0) -> Dict[str, str]:
    """Execute ``runs`` (already prepared); returns run_id -> outcome (done, failed, interrupted, busy)."""
    max_parallel = int(launcher.max_parallel)
    python = launcher.get("python")
    threads = max(1, (os.cpu_count() or 1) // max_parallel)
    queue = list(runs)
    active: Dict[str, tuple] = {}
    outcomes: Dict[str, str] = {}
    bar = tqdm(total=len(runs), desc="sweep", unit="run", dynamic_ncols=True, mininterval=1.0)

    def on_term(signum, frame):  # SIGTERM to the sweep: stop cleanly, like Ctrl-C
        raise _Stop()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        while queue or active:
            while queue and len(active) < max_parallel:
                pr = queue.pop(0)
                sup = Supervisor(pr.rd, python=python, threads=threads).start()
                active[pr.run_id] = (pr, sup)
                bar.write(f"[start] {pr.point.label()}  ({pr.action}; log {sup.log_path})")
            for rid, (pr, sup) in list(active.items()):
                if sup.poll() is not None:
                    outcome = sup.finalize()
                    outcomes[rid] = outcome
                    del active[rid]
                    bar.update(1)
                    bar.write(f"[{outcome}] {pr.point.label()}: {describe(outcome, pr.rd)}")
            post = _running(active)
            if post != bar.postfix:
                bar.set_postfix_str(post, refresh=False)
            if queue or active:
                time.sleep(poll_s)
    except (KeyboardInterrupt, _Stop):
        bar.write(f"stopping {len(active)} running run(s): each checkpoints and stops (next sweep resumes)")
        for rid, (pr, sup) in active.items():
            sup.send(signal.SIGTERM)
        for rid, (pr, sup) in active.items():
            sup.stop(signal.SIGTERM, stop_grace_s)
            outcomes[rid] = sup.finalize()
        raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGTERM, old)
        bar.close()
    return outcomes


def _running(active: Dict[str, tuple]) -> str:
    parts = []
    for pr, sup in active.values():
        prog = pr.rd.progress()
        step = "" if prog["step"] is None else f" {prog['step']}/{prog['total'] or '?'}"
        parts.append(f"{pr.point.model}/{pr.point.dataset}/plw={pr.point.plw:g}{step}")
    return "; ".join(parts)[:200]
