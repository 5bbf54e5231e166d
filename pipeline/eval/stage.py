"""The evaluation driver: what to evaluate, in which order, resumable, every outcome recorded.

Entry points:

- :func:`evaluate_run` ``(run_dir, cfg) -> Path`` -- evaluate one finished run (its ``final/``) and
  return its ``results.csv``. This is the function the sweep launcher submits (one job per run).
- :func:`evaluate_pretrained` ``(cfg) -> Path`` -- evaluate the pre-trained model of ``cfg.model``
  (a baseline; results in ``eval.output_dir`` or ``<runs_dir>/_baselines/<model>/``).
- :func:`evaluate_all` ``(cfg)`` -- every finished run in ``paths.runs_dir`` that lacks results
  (in ``eval.workers`` processes: pipeline/eval/pool.py).

One evaluation (:class:`Evaluation`) plans every benchmark of ``eval.benchmarks`` and
``eval.mechanisms`` with its exact evaluator config -- each through the runner of its kind
(pipeline/eval/runner.py: the runners live in harness.py, alpacaeval.py, pandalm.py and
mechanisms.py; the benchmarks are YAML files, pipeline/eval/benchmarks.py) -- skips those already
finished with the same config (per-benchmark markers, see pipeline/eval/results.py), then runs the
rest in phases so that only one large model is in memory at a time:

1. ``model``: the evaluated model is loaded (lm-eval benchmarks, AlpacaEval generations and their
   length, PandaLM candidates, memorization generations);
2. ``judge``: judges and comparators (the PandaLM comparator's candidates, generated once per
   pre-trained model and cached; PandaLM; AlpacaEval);
3. ``files``: metrics from the run's files (training-loss RSD, weight distance).

A failure in one benchmark (missing checkpoint, data missing offline, an unparsable judge, an
exception) is recorded in results.csv (status error/skipped, with the message) and the others
still run; nothing finished is redone. A lock file (``eval/.lock``, ``pipeline.runs.file_lock``,
released when the process ends) keeps two processes from evaluating the same folder at once.

Per-process work done once (results are unaffected): heavy imports, lm-eval's ``TaskManager`` and
environment description (pipeline/eval/harness.py); after the first model phase's imports the
objects alive are frozen out of Python's cyclic garbage collector (``gc.freeze``: module-level
objects live for the whole process anyway), so that the ``gc.collect()`` after each model (and
Python's own full collections) no longer traverse the ~0.5 M objects of torch/transformers/lm-eval
(0.35 s each).
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pipeline import models
from pipeline.config import ConfigError
from pipeline.eval import alpacaeval, harness, mechanisms, pandalm  # noqa: F401  (they register the runners)
from pipeline.eval import benchmarks as B
from pipeline.trainer import lora
from pipeline.eval.generation import (
    ModelMissing,
    check_checkpoint,
    fast_causal_masks,
    release,
    resolve_device,
    torch_dtype,
)
from pipeline.eval.pool import evaluate_parallel
from pipeline.eval.runner import (
    BASELINES_DIR,
    EvalError,
    EvalPlan,
    EvalSession,
    Runner,
    Target,
    in_phase_order,
    model_identity,
    plain,
    runner_for,
)
from pipeline.runs import CORRUPT, RunDir, atomic_write_json, file_lock
from pipeline.trainer.reporting import log_run_results

log = logging.getLogger("pipeline.eval")

__all__ = [
    "BASELINES_DIR",
    "EvalError",
    "EvalPlan",
    "Evaluation",
    "Target",
    "check_names",
    "evaluate_all",
    "evaluate_pretrained",
    "evaluate_run",
    "finished_runs",
    "folder_lock",
    "eval_run_config",
    "pending_benchmarks",
]


def check_names(cfg: DictConfig) -> None:
    """The benchmark names of ``eval.benchmarks`` / ``eval.mechanisms`` / ``eval.shots`` /
    ``eval.metrics`` are in the registry (pipeline/eval/benchmarks.py): else a :class:`ConfigError`
    naming the key (the config schema leaves these names to the evaluation)."""
    e = cfg.eval
    try:
        known, mech = sorted(B.benchmarks()), sorted(B.mechanisms())
    except B.BenchmarkDeclarationError as ex:
        raise ConfigError(str(ex)) from None

    def one_of(value: Any, allowed: List[str], key: str) -> None:
        if value not in allowed:
            raise ConfigError(f"config key '{key}': must be one of {allowed}, got {value!r}")

    for i, b in enumerate(e.benchmarks):
        one_of(b, known, f"eval.benchmarks[{i}]")
    for i, m in enumerate(e.mechanisms):
        one_of(m, mech, f"eval.mechanisms[{i}]")
    for b in e.shots:
        one_of(b, known, "eval.shots")
    for b in e.metrics:
        one_of(b, known, "eval.metrics")


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/eval/.lock``; another process holding it is an :class:`EvalError`."""
    path = Path(folder) / "eval" / ".lock"
    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path))
        except BlockingIOError as e:
            raise EvalError(f"{folder} is being evaluated by another process (lock {path}: {e})") from None
        yield


_FROZEN = False


def freeze_imported_objects() -> None:
    """Once per process, after the heavy imports: collect garbage, then move every object alive to
    the garbage collector's permanent generation (``gc.freeze``), so later full collections skip
    them. Frozen objects are still freed by reference counting; only a reference cycle among them
    would outlive its use, and what is alive here (modules, the config, the plans) lives as long."""
    global _FROZEN
    if not _FROZEN:
        gc.collect()
        gc.freeze()
        _FROZEN = True


def eval_run_config(run_dir: Path, cfg: DictConfig) -> Tuple[DictConfig, List[str]]:
    """The config the run was created with (:meth:`pipeline.runs.RunDir.load_config`; a run made
    under an older schema is read as is, with a note), with this machine's ``paths`` (runs move
    between clusters)."""
    notes: List[str] = []
    try:
        run_cfg = RunDir(Path(run_dir)).load_config(latest=False, notes=notes)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    return OmegaConf.merge(run_cfg, {"paths": plain(cfg.paths)}), notes


# --------------------------------------------------------------------------------------------
# one evaluation
# --------------------------------------------------------------------------------------------
class Evaluation(EvalSession):
    """One evaluation: plans through the runners, then the three phases (module docstring)."""

    # ---------------------------------------------------------------- model loading
    def load_model(self, model_dir: Optional[Path], model_cfg: Any):
        """lm-eval's HFLM on the checkpoint folder (a hub model: its hub id and pinned revision; a
        LoRA run's adapter-only ``final/``: the pre-trained model with the adapter merged in)."""
        tokenizer = None
        if model_dir is not None and lora.is_adapter_folder(model_dir) and self.e.backend == "vllm":
            raise ModelMissing(
                f"{model_dir} holds a LoRA adapter alone (train.peft.merge=false): eval.backend=vllm loads "
                f"merged models only; use eval.backend=hf"
            )
        if model_dir is not None and lora.is_adapter_folder(model_dir):
            pretrained, tokenizer = lora.load_for_eval(model_dir, model_cfg, self.cfg.paths, torch_dtype(self.dtype))
            revision = None
        elif model_dir is not None:
            pretrained, revision = check_checkpoint(model_dir), None
        else:
            hub_id = plain(model_cfg).get("hub_id")
            if not hub_id:
                raise ModelMissing(f"model '{plain(model_cfg).get('name')}' has neither a local folder nor a hub id")
            pretrained, revision = hub_id, plain(model_cfg).get("revision")
        harness.import_model_class()
        for runner in self.runners():
            runner.prepare(self)
        freeze_imported_objects()  # before any model exists (see the module docstring)
        return harness.make_lm(
            pretrained,
            batch_size=self.e.batch_size,
            device=resolve_device(self.e.device),
            dtype=self.dtype,
            revision=revision,
            add_bos_token=self.e.add_bos_token,
            attn_implementation=plain(model_cfg).get("attn_implementation"),  # None for older runs' configs
            tokenizer=tokenizer,
            backend=str(self.e.backend),
            vllm_args=plain(self.e.vllm_args),
        )

    def pretrained_source(self) -> Tuple[Optional[Path], Any]:
        return models.pretrained_dir(self.t.model_cfg, self.cfg.paths), self.t.model_cfg

    # ---------------------------------------------------------------- planning
    def runners(self) -> List[Runner]:
        """The runners of the benchmarks asked for (kinds without a runner left out)."""
        kinds = []
        for n in self.names:
            try:
                kinds.append(B.get(n).kind)
            except KeyError:
                continue
        return [r for r in in_phase_order("model") if r.kind in kinds]

    def plan_one(self, name: str) -> EvalPlan:
        b = B.get(name)
        return runner_for(b.kind).plan(self, b)

    def _by_runner(self, phase: str, names: List[str]) -> Iterator[Tuple[Runner, List[str]]]:
        for runner in in_phase_order(phase):
            mine = [n for n in names if B.get(n).kind == runner.kind]
            if mine:
                yield runner, mine

    # ---------------------------------------------------------------- the run
    def run(self) -> Path:
        e = self.e
        log.info("evaluating %s -> %s", self.t.run_id, self.store.results_csv)
        plans: Dict[str, EvalPlan] = {}
        for n in self.names:
            try:
                plans[n] = self.plan_one(n)
            except Exception as ex:  # e.g. an unknown judge config: recorded, the others go on
                log.error("%s: cannot plan: %s", n, ex)
                plans[n] = EvalPlan(n, {"plan_error": f"{type(ex).__name__}: {ex}"}, error=f"{type(ex).__name__}: {ex}")
        pending = [n for n in self.names if e.force or not self.store.is_finished(n, plans[n].evaluator)]
        done = [n for n in self.names if n not in pending]
        if done:
            log.info("  finished before (skipped): %s", ", ".join(done))
        for n in list(pending):
            if plans[n].error:
                self.fail(plans[n], "error", plans[n].error)
                pending.remove(n)
            elif plans[n].skip:
                self.fail(plans[n], "skipped", plans[n].skip)
                pending.remove(n)
        if not pending:
            return self.store.write_table(self.names)
        log.info("  to do: %s", ", ".join(pending))

        # phase 1: the evaluated model
        model_steps = [n for n in pending if B.get(n).needs_model]
        if model_steps:
            try:
                lm = self.load_model(self.t.model_dir, self.t.model_cfg)
            except Exception as ex:  # ModelMissing, or transformers/lm-eval failing to load it
                msg = f"cannot load the model to evaluate: {type(ex).__name__}: {ex}"
                log.error(msg)
                self.fail_all(plans, model_steps, msg)
                lm = None
            if lm is not None:
                with fast_causal_masks():  # lm-eval's generate_until too (the same masks, see generation.py)
                    for runner, mine in self._by_runner("model", model_steps):
                        runner.model_phase(self, plans, mine, lm)
            del lm
            release()
        # phase 2: judges and comparators; phase 3: from files
        for runner, mine in self._by_runner("judge", [n for n in pending if n not in self.failed]):
            runner.judge_phase(self, plans, mine)
        for runner, mine in self._by_runner("files", [n for n in pending if n not in self.failed]):
            runner.files_phase(self, plans, mine)
        return self.store.write_table(self.names)


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
def _run_json(run_dir: Path) -> Dict[str, Any]:
    p = Path(run_dir) / "run.json"
    if not p.is_file():
        raise EvalError(f"{run_dir}: no run.json (not a run folder)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{p}: not valid JSON ({e})") from e


def _run_target(rd: RunDir, cfg: DictConfig) -> Target:
    meta = _run_json(rd.path)
    run_cfg, notes = eval_run_config(rd.path, cfg)
    return Target(
        folder=rd.path,
        run_id=str(meta.get("run_id") or rd.path.name),
        model_dir=rd.final,
        model_cfg=run_cfg.model,
        run_cfg=run_cfg,
        is_run=True,
        notes=notes,
    )


def evaluate_run(run_dir, cfg: DictConfig) -> Path:
    """Evaluate one finished run (see the module docstring); returns ``run_dir/results.csv``.

    Raises :class:`EvalError` when ``run_dir`` is not a finished run or is being evaluated elsewhere;
    everything that goes wrong inside a benchmark is recorded in results.csv instead.
    """
    check_names(cfg)
    harness.check_backend(str(cfg.eval.backend))
    rd = RunDir(Path(run_dir).expanduser().resolve())
    _run_json(rd.path)
    state = rd.status().get("state")
    if state != "done":
        raise EvalError(f"run {rd.path.name} is '{state}', not 'done' (status.json): train it before evaluating")
    target = _run_target(rd, cfg)
    with folder_lock(rd.path):
        csv_path = Evaluation(target, cfg).run()
    log_results_to_trackers(rd, target.run_cfg, csv_path)
    return csv_path


def log_results_to_trackers(rd: RunDir, run_cfg, csv_path: Path) -> Dict[str, float]:
    """When the run was trained with ``train.report_to``, its results (status ok) go to the same
    tracker runs as ``results/<benchmark>/<metric>`` at the run's last step. A tracker failing does not
    fail the evaluation (a warning says so). Returns what was logged."""
    report_to = list(OmegaConf.select(run_cfg, "train.report_to", default=None) or []) if run_cfg is not None else []
    if not report_to:
        return {}
    values: Dict[str, float] = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("status") == "ok" and row.get("value") not in (None, ""):
                values[f"results/{row['benchmark']}/{row['metric']}"] = float(row["value"])
    try:
        summary = json.loads((rd.path / "train_summary.json").read_text(encoding="utf-8"))
        step = int(summary.get("steps") or summary.get("total_steps") or 0)
    except (OSError, ValueError, TypeError):
        step = 0
    try:
        log_run_results(report_to, rd.logs, rd.path.name, values, step)
    except Exception as ex:  # the results are in results.csv whatever the tracker does
        log.warning("results of %s not logged to %s: %s: %s", rd.path.name, report_to, type(ex).__name__, ex)
        return {}
    return values


def pending_benchmarks(run_dir, cfg: DictConfig) -> List[str]:
    """The benchmarks of ``cfg.eval`` that ``evaluate_run(run_dir, cfg)`` would (re)evaluate: not
    finished with this evaluator setting (all of them with ``eval.force``); benchmarks planned as
    skipped (nothing to run) do not count. Empty: the results are complete."""
    check_names(cfg)
    harness.check_backend(str(cfg.eval.backend))
    rd = RunDir(Path(run_dir).expanduser().resolve())
    ev = Evaluation(_run_target(rd, cfg), cfg)
    out = []
    for n in ev.names:
        try:
            plan = ev.plan_one(n)
        except Exception:
            out.append(n)
            continue
        if plan.skip and not cfg.eval.force:  # nothing to run (e.g. data not in the mirror)
            continue
        if cfg.eval.force or plan.error or not ev.store.is_finished(n, plan.evaluator):
            out.append(n)
    return out


def baseline_folder(cfg: DictConfig) -> Path:
    if cfg.eval.output_dir:
        return Path(str(cfg.eval.output_dir)).expanduser()
    return Path(str(cfg.paths.runs_dir)) / BASELINES_DIR / str(cfg.model.name)


def evaluate_pretrained(cfg: DictConfig) -> Path:
    """Evaluate the pre-trained model of ``cfg.model`` (a baseline); returns its results.csv."""
    check_names(cfg)
    harness.check_backend(str(cfg.eval.backend))
    folder = baseline_folder(cfg).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = models.pretrained_dir(cfg.model, cfg.paths)
    ident = model_identity(cfg.model)
    atomic_write_json(
        folder / "baseline.json",
        {
            "run_id": f"baseline__{cfg.model.name}",
            "model": cfg.model.name,
            "model_dir": str(model_dir) if model_dir else None,
            "identity": ident,
        },
    )
    target = Target(
        folder=folder,
        run_id=f"baseline__{cfg.model.name}",
        model_dir=model_dir,
        model_cfg=cfg.model,
        run_cfg=None,
        is_run=False,
    )
    with folder_lock(folder):
        return Evaluation(target, cfg).run()


def finished_runs(runs_dir: Path) -> List[Path]:
    """Run folders (with run.json) whose status is done, in name order; a run whose status.json is
    corrupt is logged (with the file) and left out, the others go on."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    out = []
    for p in sorted(x for x in runs_dir.iterdir() if x.is_dir() and not x.name.startswith((".", "_"))):
        rd = RunDir(p)
        if not rd.run_json.is_file():
            continue
        status = rd.status()
        if status.get("state") == "done":
            out.append(p)
        elif status.get("state") == CORRUPT:
            log.warning("not evaluated: %s", status["error"])
    return out


def evaluate_all(cfg: DictConfig) -> List[Tuple[str, Optional[Path], Optional[str]]]:
    """Every finished run in ``paths.runs_dir`` (finished benchmarks are skipped inside each run),
    in ``eval.workers`` processes when that is > 1 (pipeline/eval/pool.py).

    Returns ``(run folder name, results.csv or None, error or None)`` per run, in name order.
    """
    check_names(cfg)
    harness.check_backend(str(cfg.eval.backend))
    runs = finished_runs(Path(str(cfg.paths.runs_dir)))
    log.info("%d finished run(s) in %s", len(runs), cfg.paths.runs_dir)
    workers = int(cfg.eval.get("workers") or 1)
    if workers > 1 and len(runs) > 1:
        return evaluate_parallel(runs, cfg, min(workers, len(runs)), evaluate_run)
    out = []
    for p in tqdm(runs, desc="runs", disable=len(runs) < 2):
        try:
            out.append((p.name, evaluate_run(p, cfg), None))
        except Exception as e:  # one run's problem never stops the others
            if not isinstance(e, EvalError):
                log.error("%s:\n%s", p.name, traceback.format_exc())
            log.error("%s", e)
            out.append((p.name, None, f"{type(e).__name__}: {e}"))
    return out
