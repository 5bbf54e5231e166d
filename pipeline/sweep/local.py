"""launcher=local: the runs of a sweep on this machine, ``launcher.max_parallel`` at a time.

Each worker is a subprocess (:mod:`pipeline.sweep.worker`, which calls :func:`pipeline.train.run`)
executing one run (``launcher.runs_per_worker=1``, the default) or a chunk of up to
``launcher.runs_per_worker`` runs one after another, so that the start-up cost (imports of torch and
transformers, ~10 s on a small CPU) is paid once per worker instead of once per run. A chunk has
``min(runs_per_worker, ceil(runs left in the queue / max_parallel))`` runs, so every slot stays busy
to the end of the sweep; each worker gets ``cpu_count // max_parallel`` threads.

Every run keeps its own log (``<run>/logs/attempt-<n>.log``), lock, heartbeat and status. A progress
bar counts finished runs (it advances per run, while a several-run worker goes on) and shows each
worker's current run and step; one line per finished run says how it ended. A failed run never
stops the others (a several-run worker goes on with its next run; the runs a crashed worker never
started go back to the queue). Ctrl-C (or SIGTERM to the sweep) asks every worker to stop
(SIGTERM): its current run checkpoints and stops, the runs it has not started are left as they
were (reported ``not started``), and the sweep exits; the next sweep resumes them.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Dict, List, Optional, Tuple, Union

from omegaconf import DictConfig
from tqdm import tqdm

from pipeline.sweep.plan import PlannedRun
from pipeline.sweep.supervise import NOT_STARTED, GroupSupervisor, Supervisor, describe


class _Stop(Exception):
    pass


def chunk_size(remaining: int, runs_per_worker: int, max_parallel: int) -> int:
    """How many of the ``remaining`` queued runs the next worker takes (at least 1)."""
    return max(1, min(int(runs_per_worker), math.ceil(remaining / max(1, int(max_parallel)))))


class _Slot:
    """One worker and the planned runs it was given."""

    def __init__(self, runs: List[PlannedRun], sup: Union[Supervisor, GroupSupervisor]) -> None:
        self.runs = runs
        self.sup = sup
        self.by_id = {pr.run_id: pr for pr in runs}

    @property
    def group(self) -> bool:
        return isinstance(self.sup, GroupSupervisor)

    def current(self) -> Optional[PlannedRun]:
        if not self.group:
            return self.runs[0]
        cur = self.sup.current
        return None if cur is None else self.by_id.get(cur.run_id)

    def events(self, ended: bool) -> List[Tuple[str, PlannedRun, object]]:
        """Events since the last call; ``ended``: the worker has exited (finalize)."""
        if not self.group:
            return [("end", self.runs[0], self.sup.finalize())] if ended else []
        evs = self.sup.finalize() if ended else self.sup.events()
        return [(kind, self.by_id[rd.run_id], x) for kind, rd, x in evs]


def run_local(
    runs: List[PlannedRun], launcher: DictConfig, poll_s: float = 0.5, stop_grace_s: float = 300.0
) -> Dict[str, str]:
    """Execute ``runs`` (already prepared); returns run_id -> outcome (done, failed, interrupted,
    busy, not started)."""
    max_parallel = int(launcher.max_parallel)
    per_worker = int(launcher.get("runs_per_worker", 1) or 1)
    python = launcher.get("python")
    threads = max(1, (os.cpu_count() or 1) // max_parallel)
    queue = list(runs)
    requeued: set = set()
    active: List[_Slot] = []
    outcomes: Dict[str, str] = {}
    bar = tqdm(total=len(runs), desc="sweep", unit="run", dynamic_ncols=True, mininterval=1.0)

    def on_term(signum, frame):  # SIGTERM to the sweep: stop cleanly, like Ctrl-C
        raise _Stop()

    def report(slot: _Slot, ended: bool, stopping: bool = False) -> None:
        for kind, pr, x in slot.events(ended):
            if kind == "start":
                bar.write(f"[start] {pr.point.label()}  ({pr.action}; log {x})")
                continue
            outcome = str(x)
            if outcome == NOT_STARTED and not stopping and slot.sup.started_any and pr.run_id not in requeued:
                requeued.add(pr.run_id)  # its worker died on another run: it goes back to the queue
                queue.insert(0, pr)
                bar.write(
                    f"[requeued] {pr.point.label()}: its worker ended before starting it (log {slot.sup.worker_log})"
                )
                continue
            outcomes[pr.run_id] = outcome
            bar.update(1)
            bar.write(f"[{outcome}] {pr.point.label()}: {describe(outcome, pr.rd)}")

    def launch() -> None:
        n = chunk_size(len(queue), per_worker, max_parallel) if per_worker > 1 else 1
        chunk, queue[:n] = queue[:n], []
        if per_worker == 1 or len(chunk) == 1:  # one process per run: exactly the one-run worker
            pr = chunk[0]
            sup = Supervisor(pr.rd, python=python, threads=threads).start()
            bar.write(f"[start] {pr.point.label()}  ({pr.action}; log {sup.log_path})")
            active.append(_Slot(chunk, sup))
            return
        sup = GroupSupervisor([pr.rd for pr in chunk], python=python, threads=threads).start()
        bar.write(f"[worker] {len(chunk)} runs in one process (log {sup.worker_log})")
        active.append(_Slot(chunk, sup))

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        while queue or active:
            while queue and len(active) < max_parallel:
                launch()
            for slot in list(active):
                ended = slot.sup.poll() is not None
                report(slot, ended)
                if ended:
                    active.remove(slot)
            post = _running(active)
            if post != bar.postfix:
                bar.set_postfix_str(post, refresh=False)
            if queue or active:
                time.sleep(poll_s)
    except (KeyboardInterrupt, _Stop):
        n_runs = sum(len(s.runs) for s in active)
        bar.write(
            f"stopping {len(active)} worker(s) ({n_runs} run(s)): a running run checkpoints and stops, "
            "one not started is left as it was (next sweep resumes them)"
        )
        for slot in active:
            slot.sup.send(signal.SIGTERM)
        for slot in active:
            slot.sup.stop(signal.SIGTERM, stop_grace_s)
            report(slot, True, stopping=True)
        raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGTERM, old)
        bar.close()
    return outcomes


def _running(active: List[_Slot]) -> str:
    parts = []
    for slot in active:
        pr = slot.current()
        if pr is None:
            parts.append("(starting)")
            continue
        prog = pr.rd.progress()
        step = "" if prog["step"] is None else f" {prog['step']}/{prog['total'] or '?'}"
        parts.append(f"{pr.point.model}/{pr.point.dataset}/plw={pr.point.plw:g}{step}")
    return "; ".join(parts)[:200]
