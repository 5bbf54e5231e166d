"""The runner contract: what the evaluation driver (pipeline/eval/stage.py) and the benchmark runners
agree on. It sits below the runners (it imports none of them), so no import cycle forms.

A **runner** computes every benchmark of one ``kind`` (the ``kind`` of the benchmark's YAML
declaration, pipeline/eval/benchmarks.py). Runners live beside their code and register themselves
with :func:`register` when their module is imported:

========================  ===============================  ================================================
kind                      runner                           benchmarks (YAML in pipeline/eval/tasks/)
========================  ===============================  ================================================
``harness``               pipeline/eval/harness.py         lm-eval tasks: ARC, PIQA, TruthfulQA, WinoGrande, WMT
``alpaca_eval``           pipeline/eval/alpacaeval.py      ``alpaca_eval``, ``mech_alpacaeval_length``
``pandalm``               pipeline/eval/pandalm.py         ``pandalm``
``mechanism``             pipeline/eval/mechanisms.py      ``mech_loss_rsd``, ``mech_weight_distance``,
                                                           ``mech_memorization_bleu``
========================  ===============================  ================================================

A runner has :meth:`Runner.plan` (the exact evaluator config of one benchmark, or why it is skipped)
and up to three phase methods, called by the driver in this order so that one large model is in
memory at a time: :meth:`Runner.model_phase` (the evaluated model is loaded), :meth:`Runner.judge_phase`
(judges and comparators, each loading its own model), :meth:`Runner.files_phase` (from the run's
files). Within a phase, runners go by their ``order`` for it. Each phase method gets the
:class:`EvalSession` (the evaluation's target, config, result store and state shared between
phases) and the names of its own benchmarks still to do; it records each benchmark's rows with
:meth:`EvalSession.attempt` (an exception becomes an error row) or :meth:`EvalSession.fail`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.eval import benchmarks as B
from pipeline.eval.results import BenchmarkResult, ResultRow, ResultStore, status_rows
from pipeline.runs import MODEL_RUNTIME_FIELDS

log = logging.getLogger("pipeline.eval")

BASELINES_DIR = "_baselines"
PHASES = ("model", "judge", "files")


class EvalError(RuntimeError):
    """The evaluation cannot start (not a run folder, run not finished, folder locked, ...)."""


# --------------------------------------------------------------------------------------------
# helpers shared by the driver and the runners
# --------------------------------------------------------------------------------------------
def plain(node: Any) -> Any:
    """A config node as plain Python (resolved); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_identity(model_cfg: Any) -> Dict[str, Any]:
    """The fields of a model config that define the pre-trained model (not where it is stored)."""
    d = plain(model_cfg)
    return {k: v for k, v in sorted(d.items()) if k not in MODEL_RUNTIME_FIELDS}


@dataclass
class Target:
    """What is evaluated and where its results go."""

    folder: Path  # results.csv and eval/ live here
    run_id: str
    model_dir: Optional[Path]  # the checkpoint (None: a hub model loaded through model_cfg)
    model_cfg: Any  # the pre-trained model's config (a run's own, from its config.yaml)
    run_cfg: Optional[DictConfig] = None  # the run's config (runs only)
    is_run: bool = True
    notes: List[str] = field(default_factory=list)


@dataclass
class EvalPlan:
    """One benchmark's plan: its exact evaluator config (recorded, compared on resume) and whether
    it can run."""

    name: str
    evaluator: Dict[str, Any]
    skip: Optional[str] = None  # status=skipped with this message (nothing to run)
    spec: Any = None  # what the runner prepared (e.g. the harness TaskSpec)
    error: Optional[str] = None  # the plan itself failed (e.g. a bad judge config): status=error


# --------------------------------------------------------------------------------------------
# one evaluation's state, as the runners see it
# --------------------------------------------------------------------------------------------
class EvalSession:
    """The target, the config, the result store and what the phases hand each other
    (:attr:`shared`: e.g. the AlpacaEval generations for the judge phase). The driver
    (pipeline/eval/stage.py ``Evaluation``) adds model loading and the phases."""

    def __init__(self, target: Target, cfg: DictConfig):
        self.t = target
        self.cfg = cfg
        self.e = cfg.eval
        self.store = ResultStore(target.folder, target.run_id)
        self.names = list(dict.fromkeys(list(self.e.benchmarks) + list(self.e.mechanisms)))
        self.shared: Dict[str, Any] = {}
        self.failed: Dict[str, str] = {}  # benchmark -> message (a failed step fails its dependants)
        self.saved: List[BenchmarkResult] = []

    # ---------------------------------------------------------------- config accessors
    def metrics(self, name: str) -> List[str]:
        return B.metrics_for(name, plain(self.e.metrics) or {})

    def shots(self, name: str) -> int:
        return B.shots_for(name, plain(self.e.shots))

    @property
    def eval_dir(self) -> Path:
        return self.store.eval_dir

    @property
    def dtype(self) -> Optional[str]:
        if self.e.dtype:
            return str(self.e.dtype)
        m = self.t.model_cfg
        d = m.get("dtype") if isinstance(m, dict) else getattr(m, "dtype", None)
        return str(d) if d else None

    def model_name(self) -> str:
        m = self.t.model_cfg
        return str(getattr(m, "name", None) or plain(m).get("name"))

    # ---------------------------------------------------------------- model loading (the driver's)
    def load_model(self, model_dir: Optional[Path], model_cfg: Any):
        """lm-eval's HFLM on a checkpoint folder (or a hub model); the driver implements it."""
        raise NotImplementedError

    def pretrained_source(self):
        """(local folder or None, model config) of the run's pre-trained model; the driver implements it."""
        raise NotImplementedError

    # ---------------------------------------------------------------- recording
    def save(self, name: str, evaluator: Dict[str, Any], rows: List[ResultRow]) -> None:
        res = BenchmarkResult(name, evaluator, rows)
        self.store.save(res, order=self.names)
        self.saved.append(res)
        log.info(
            "  %s: %s%s", name, res.status, "" if res.status == "ok" else f" ({rows[0].message[:200] if rows else ''})"
        )

    def fail(self, plan: EvalPlan, status: str, message: str) -> None:
        self.save(plan.name, plan.evaluator, status_rows(plan.name, self.metrics(plan.name), status, message))

    def fail_all(self, plans: Dict[str, EvalPlan], names: Sequence[str], message: str) -> None:
        """Record ``message`` as the error of each of ``names`` and mark them failed (their later
        phases do not run)."""
        for n in names:
            self.fail(plans[n], "error", message)
            self.failed[n] = message

    def attempt(self, plan: EvalPlan, fn: Callable[[], List[ResultRow]]) -> bool:
        """Run one benchmark; any exception becomes an error row (traceback in the log)."""
        t0 = time.time()
        log.info("[%s] %s ...", self.t.run_id, plan.name)
        try:
            rows = fn()
        except Exception as ex:  # recorded, never swallowed silently
            log.error("%s failed:\n%s", plan.name, traceback.format_exc())
            self.fail(plan, "error", f"{type(ex).__name__}: {ex}")
            return False
        for r in rows:
            if r.status == "ok" and self.t.notes:
                r.message = "; ".join([r.message] + self.t.notes) if r.message else "; ".join(self.t.notes)
        self.save(plan.name, plan.evaluator, rows)
        log.info("  (%.1f s)", time.time() - t0)
        return True


# --------------------------------------------------------------------------------------------
# runners and their registry
# --------------------------------------------------------------------------------------------
class Runner:
    """Computes the benchmarks of one kind (see the module docstring). Phase methods get only the
    runner's own benchmarks still to do (never empty), in the order of ``eval.benchmarks`` /
    ``eval.mechanisms``."""

    kind: str = ""
    order: Dict[str, int] = {}  # phase -> position among the runners (lower first)

    def plan(self, ev: EvalSession, bench: B.Benchmark) -> EvalPlan:
        raise NotImplementedError

    def prepare(self, ev: EvalSession) -> None:
        """Import what this runner's phases will need, before the driver freezes the objects alive
        (pipeline/eval/stage.py); called once per model load when some benchmark of this kind is asked for."""

    def model_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str], lm) -> None:
        """With the evaluated model (lm-eval's HFLM: ``lm.model``, ``lm.tokenizer``) loaded."""

    def judge_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str]) -> None:
        """After the evaluated model is released (judges, comparators); failed benchmarks excluded."""

    def files_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str]) -> None:
        """From the run's files (no model)."""


RUNNERS: Dict[str, Runner] = {}


def register(cls):
    """Class decorator: register one instance of a :class:`Runner` subclass under its ``kind``."""
    if not cls.kind:
        raise ValueError(f"runner {cls.__name__} has no kind")
    RUNNERS[cls.kind] = cls()
    return cls


def runner_for(kind: str) -> Runner:
    try:
        return RUNNERS[kind]
    except KeyError:
        raise KeyError(
            f"no runner for benchmark kind {kind!r} (registered: {sorted(RUNNERS)}; see pipeline/eval/runner.py)"
        ) from None


def in_phase_order(phase: str) -> List[Runner]:
    return sorted(RUNNERS.values(), key=lambda r: (r.order.get(phase, 1000), r.kind))
