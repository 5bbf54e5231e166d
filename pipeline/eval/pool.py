"""Parallel evaluation (``eval.workers`` > 1): runs evaluated in a pool of worker processes.

The runs are handed out one at a time to that many worker processes (``spawn``; each imports
torch/transformers/lm-eval once and keeps its per-process caches for all the runs it evaluates),
each with ``cpu_count // workers`` torch threads; the parent prints one line per finished run and
returns the same list as the sequential loop (:func:`pipeline.eval.stage.evaluate_all`). When a
worker dies (killed, out of memory), what it finished is kept and the runs not yet reported are
retried once in fresh workers (a second death: an error entry for each).

The function evaluating one run is passed in (``evaluate``: :func:`pipeline.eval.stage.evaluate_run`,
sent to the workers by reference), so this module does not import the driver.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import std as tqdm_std
from tqdm.auto import tqdm

from pipeline.eval.results import read_results
from pipeline.eval.runner import EvalError

log = logging.getLogger("pipeline.eval")

Outcome = Tuple[str, Optional[Path], Optional[str]]  # (run folder name, results.csv or None, error or None)


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM or container allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def portable_config(cfg: DictConfig) -> DictConfig:
    """The config resolved here, to be sent to another process (which does not run Hydra)."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except Exception:  # an unresolvable key elsewhere: send as is
        return cfg


_WORKER_RUN = "-"


class _RunTag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run = _WORKER_RUN
        return True


@contextmanager
def _worker_environment(threads: int) -> Iterator[None]:
    """The environment worker processes start with (``spawn`` copies it when a worker starts, before
    any import): their thread count, and no progress bars of their own (tqdm reads ``TQDM_DISABLE``
    when imported; the parent prints one line per finished run). Restored afterwards."""
    want = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    before = {k: os.environ.get(k) for k in want}
    os.environ.update(want)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quiet_progress_bars() -> None:
    """No tqdm bar in this process, even where a library asks for one explicitly (lm-eval passes
    ``disable=False``): bars of parallel workers would overwrite each other's lines."""
    init = tqdm_std.tqdm.__init__
    if getattr(init, "plw_quiet", False):
        return

    def quiet(self, *args, **kwargs):
        if len(args) > 10:  # disable passed by position (the 11th parameter)
            args = args[:10] + (True,) + args[11:]
        else:
            kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet.plw_quiet = True
    tqdm_std.tqdm.__init__ = quiet


def _worker_init(threads: int, root_level: int, pipeline_level: int) -> None:
    """A worker process: its torch threads, its log lines tagged with the run being evaluated, no
    progress bars (the parent prints one line per finished run)."""
    _quiet_progress_bars()
    handler = logging.StreamHandler()
    handler.addFilter(_RunTag())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(run)s]: %(message)s"))
    logging.basicConfig(level=root_level, handlers=[handler], force=True)
    logging.getLogger("pipeline").setLevel(pipeline_level)
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root_level))
    torch.set_num_threads(threads)


def _evaluate_in_worker(
    evaluate: Callable[[Path, DictConfig], Path], run_dir: str, cfg: DictConfig
) -> Tuple[str, Optional[str], Optional[str], float, List[str]]:
    """One run in a worker: ``(name, results.csv or None, error or None, seconds, failed benchmarks)``."""
    global _WORKER_RUN
    p = Path(run_dir)
    _WORKER_RUN = p.name
    t0 = time.time()
    try:
        path = evaluate(p, cfg)
        failed = sorted({r["benchmark"] for r in read_results(path) if r["status"] == "error"})
        return p.name, str(path), None, time.time() - t0, failed
    except Exception as e:  # the same outcome as in the sequential loop
        if not isinstance(e, EvalError):
            log.error("%s:\n%s", p.name, traceback.format_exc())
        log.error("%s", e)
        return p.name, None, f"{type(e).__name__}: {e}", time.time() - t0, []
    finally:
        _WORKER_RUN = "-"


def evaluate_parallel(
    runs: List[Path], cfg: DictConfig, n: int, evaluate: Callable[[Path, DictConfig], Path]
) -> List[Outcome]:
    """``evaluate(run, cfg)`` for every run in ``n`` worker processes (see the module docstring);
    one outcome per run, in the order of ``runs``."""
    threads = max(1, cpu_count() // n)
    log.info("evaluating %d run(s) in %d worker processes, %d torch thread(s) each", len(runs), n, threads)
    job_cfg = portable_config(cfg)
    levels = (logging.getLogger().getEffectiveLevel(), logging.getLogger("pipeline").getEffectiveLevel())
    done: Dict[str, Outcome] = {}
    bar = tqdm(total=len(runs), desc="runs")
    todo = list(runs)
    for attempt in (1, 2):
        died: List[Path] = []
        with ProcessPoolExecutor(
            max_workers=min(n, len(todo)),
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(threads, *levels),
        ) as ex:
            with _worker_environment(threads):  # the workers start within submit()
                futures = {ex.submit(_evaluate_in_worker, evaluate, str(p), job_cfg): p for p in todo}
            try:
                for f in as_completed(futures):
                    p = futures[f]
                    try:
                        name, path, err, secs, failed = f.result()
                    except BrokenProcessPool:
                        died.append(p)
                        continue
                    except Exception as e:  # e.g. a result that could not be sent back
                        name, path, err, secs, failed = p.name, None, f"{type(e).__name__}: {e}", 0.0, []
                    done[p.name] = (name, Path(path) if path else None, err)
                    bar.update(1)
                    state = (
                        f"error: {err}"
                        if err
                        else f"{len(failed)} benchmark(s) failed ({', '.join(failed)})"
                        if failed
                        else "ok"
                    )
                    log.info("[%d/%d] %s: %s (%.1f s)", len(done), len(runs), name, state, secs)
            except BaseException:  # Ctrl-C: what finished is on disk; stop handing out runs
                ex.shutdown(wait=False, cancel_futures=True)
                raise
        if not died:
            break
        todo = sorted(died)
        if attempt == 1:
            log.warning(
                "a worker process died; %d unfinished run(s) are retried in fresh processes: %s",
                len(todo),
                ", ".join(p.name for p in todo),
            )
    else:
        for p in todo:
            msg = (
                "BrokenProcessPool: a worker process died while this run was pending, twice (killed, out of "
                "memory, a crash); what was finished is kept: run `python -m pipeline.eval` again to resume"
            )
            log.error("%s: %s", p.name, msg)
            done[p.name] = (p.name, None, msg)
            bar.update(1)
    bar.close()
    return [done[p.name] for p in runs]
