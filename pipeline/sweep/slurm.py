"""launcher=slurm: one SLURM array task per run, through submitit.

Why submitit directly and not Hydra's submitit launcher (hydra-submitit-launcher): Hydra's launcher
submits every job of a ``--multirun`` sweep; it cannot leave out the runs that are done, running or
queued (a resumable multi-day sweep needs exactly that filter before submission), it would run Hydra
inside every job, and its grid is Hydra's sweeper syntax rather than the experiment configs (named
variants, per-run identities). Here Hydra composes every run's config on the submitting machine;
each task only reads ``<run>/launch.yaml``.

Submission: the runs to (re)launch are grouped by their resource request (``model.resources``:
nodes, GPUs, CPUs, memory, time) and each group becomes one job array (``%launcher.max_parallel``
running at a time), with partition/account/QoS from ``launcher.*`` and extra sbatch keys from
``launcher.additional_parameters``. Submitit's files go to a folder unique to this invocation
(``<launcher.submitit_dir>/<time>-<random>/``): job ids restart at 1 after a SLURM state purge.
Each run's status records its job (``pending`` + ``slurm_job_id``), so a re-run of the sweep sees
it queued and does not submit it again.

In the job, :class:`SlurmTask` starts the worker (:mod:`pipeline.sweep.supervise`). Before the
time limit (``--signal=USR2@launcher.signal_delay_s``) or on preemption, submitit calls
:meth:`SlurmTask.checkpoint`: it sends SIGUSR1 to the worker, which checkpoints at the next step
boundary and exits, and returns a new submission: submitit requeues the job
(``scontrol requeue``), which resumes from that checkpoint. A SIGTERM (scancel, preemption with
requeue by SLURM) also makes the run checkpoint and stop.

Liveness: :func:`job_states` asks ``squeue -r`` (live jobs, array tasks expanded) and ``sacct``
(ended jobs: accounting is what lets the sweep see a cancelled or crashed job as ended).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline import lifecycle
from pipeline.config import ConfigError
from pipeline.runs import RunDir
from pipeline.sweep.plan import PlannedRun
from pipeline.sweep.supervise import Supervisor, describe


class SlurmUnavailable(RuntimeError):
    pass


def available() -> Optional[str]:
    """None when sbatch/squeue/sacct are usable, else the reason."""
    for tool in ("sbatch", "squeue", "sacct", "srun"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: not on a SLURM cluster (start one here with `make slurm-up`)"
    try:
        subprocess.run(["squeue", "-h", "-o", "%i"], check=True, capture_output=True, timeout=30)
    except (subprocess.SubprocessError, OSError) as e:
        return f"squeue failed ({e}): is slurmctld up? (`make slurm-up` starts one here)"
    return None


# ------------------------------------------------------------------------------------------------
# the task that runs inside the job
# ------------------------------------------------------------------------------------------------
class SlurmTask:
    """A submitit callable executing one run; checkpointable (requeue on time limit/preemption)."""

    def __init__(self, run_dir: str, python: Optional[str] = None, stop_wait_s: float = 100.0) -> None:
        self.run_dir = str(run_dir)
        self.python = python
        self.stop_wait_s = float(stop_wait_s)
        self._sup: Optional[Supervisor] = None

    def __getstate__(self) -> Dict[str, Any]:
        d = dict(self.__dict__)
        d["_sup"] = None  # a running process does not pickle (and must not travel with a requeue)
        return d

    def __call__(self) -> str:
        rd = RunDir(Path(self.run_dir))
        threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0) or None
        self._sup = Supervisor(rd, python=self.python, threads=threads).start()
        while self._sup.poll() is None:
            time.sleep(1.0)
        outcome = self._sup.finalize()
        print(f"[pipeline.sweep] {rd.run_id}: {describe(outcome, rd)}", flush=True)
        if outcome == "failed":
            # the job ends FAILED in sacct; the error is in status.json
            raise RuntimeError(f"run {rd.run_id} {describe(outcome, rd)}")
        return outcome

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on the warning signal: stop the run at a checkpoint, then requeue."""
        import submitit

        sup = self._sup
        if sup is not None and sup.poll() is None:
            print(f"[pipeline.sweep] signal: asking {self.run_dir} to checkpoint and stop", flush=True)
            sup.send(signal.SIGUSR1)
            sup.wait(self.stop_wait_s)
        if sup is not None and sup.poll() is not None:
            outcome = sup.finalize()
            if outcome in ("done", "failed"):
                print(f"[pipeline.sweep] {outcome}: not requeued", flush=True)
                return None
        return submitit.helpers.DelayedSubmission(SlurmTask(self.run_dir, self.python, self.stop_wait_s))


# ------------------------------------------------------------------------------------------------
# submission
# ------------------------------------------------------------------------------------------------
def submitit_folder(root: DictConfig) -> Path:
    base = root.launcher.get("submitit_dir") or str(Path(root.paths.runs_dir) / "_submitit")
    return Path(base) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def sbatch_parameters(resources: tuple, launcher: DictConfig, job_name: str) -> Dict[str, Any]:
    nodes, gpus, cpus, mem_gb, timeout_min = resources
    if nodes != 1:
        raise ConfigError(
            f"config key 'model.resources.nodes': {nodes} nodes; the sweep launches "
            "single-node runs (one array task per run, torchrun over the node's GPUs)"
        )
    params: Dict[str, Any] = dict(
        job_name=job_name,
        time=int(timeout_min),
        nodes=1,
        ntasks_per_node=1,
        cpus_per_task=int(cpus),
        mem=f"{int(mem_gb)}GB",
        signal_delay_s=int(launcher.signal_delay_s),
        array_parallelism=int(launcher.max_parallel),
        stderr_to_stdout=True,
    )
    if gpus:
        params["gpus_per_node"] = int(gpus)
    for k in ("partition", "account", "qos"):
        if launcher.get(k):
            params[k] = str(launcher[k])
    if launcher.get("setup"):
        params["setup"] = [str(s) for s in launcher.setup]
    extra = (
        OmegaConf.to_container(launcher.additional_parameters, resolve=True)
        if launcher.get("additional_parameters")
        else {}
    )
    if extra:
        params["additional_parameters"] = extra
    return params


def submit(runs: List[PlannedRun], root: DictConfig, folder: Path) -> Dict[str, str]:
    """Submit ``runs`` (already prepared) as job arrays; returns run_id -> SLURM job id."""
    import submitit

    launcher = root.launcher
    groups: "OrderedDict[tuple, List[PlannedRun]]" = OrderedDict()
    for pr in runs:
        groups.setdefault(pr.resources, []).append(pr)
    exp = root.experiment.name if root.get("experiment") is not None else "run"
    ids: Dict[str, str] = {}
    for res, group in groups.items():
        params = sbatch_parameters(res, launcher, f"plw-{exp}")
        ex = submitit.SlurmExecutor(
            folder=str(folder / "%j"), max_num_timeout=int(launcher.max_num_timeout), python=launcher.get("python")
        )
        ex.update_parameters(**params)
        stop_wait = max(5.0, float(launcher.signal_delay_s) - 20.0)
        with ex.batch():
            jobs = [ex.submit(SlurmTask(str(pr.rd.path), launcher.get("python"), stop_wait)) for pr in group]
        for pr, job in zip(group, jobs):
            ids[pr.run_id] = str(job.job_id)
            lifecycle.mark_queued(pr.rd, str(job.job_id), str(folder))
    return ids


# ------------------------------------------------------------------------------------------------
# job states
# ------------------------------------------------------------------------------------------------
_ARRAY = re.compile(r"^(\d+)_\[(.+)\]$")


def expand_job_ids(job_id: str) -> List[str]:
    """``123_[0-2,5%4]`` -> ``123_0 123_1 123_2 123_5``; other ids unchanged."""
    m = _ARRAY.match(job_id)
    if not m:
        return [job_id]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += [f"{base}_{i}" for i in range(int(a), int(b) + 1)]
        elif part:
            out.append(f"{base}_{part}")
    return out


def parse_state_lines(text: str) -> Dict[str, str]:
    """``JobID|State`` lines (squeue/sacct -P) -> id -> state (array ranges expanded)."""
    out: Dict[str, str] = {}
    for line in text.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        jid, state = jid.strip(), state.strip()
        if not jid or "." in jid:  # job steps (123.batch) are not jobs
            continue
        for j in expand_job_ids(jid):
            out[j] = state
    return out


def job_states(job_ids: Iterable[str]) -> Dict[str, str]:
    """Current state of each job id (live ones from squeue, ended ones from sacct)."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    states: Dict[str, str] = {}
    try:
        r = subprocess.run(
            ["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobID,State"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode == 0:
            states.update(parse_state_lines(r.stdout))
    except (subprocess.SubprocessError, OSError):
        pass
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            live = parse_state_lines(r.stdout)
            states.update({j: s for j, s in live.items() if j in ids or j.split("_")[0] in ids})
            # squeue is the authority on live jobs: a job sacct still calls running but squeue no
            # longer lists is not alive (node failure before accounting caught up)
    except (subprocess.SubprocessError, OSError):
        pass
    return {j: s for j, s in states.items() if j in ids}


def status_job_ids(runs: Iterable[PlannedRun]) -> List[str]:
    return [str(pr.status.get("slurm_job_id")) for pr in runs if pr.status.get("slurm_job_id")]
