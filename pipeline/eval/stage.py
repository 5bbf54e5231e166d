"""The evaluation driver: what to evaluate, in which order, resumable, every outcome recorded.

Entry points:

- :func:`evaluate_run` ``(run_dir, cfg) -> Path`` -- evaluate one finished run (its ``final/``) and
  return its ``results.csv``. This is the function the sweep launcher submits (one job per run).
- :func:`evaluate_pretrained` ``(cfg) -> Path`` -- evaluate the pre-trained model of ``cfg.model``
  (a baseline; results in ``eval.output_dir`` or ``<runs_dir>/_baselines/<model>/``).
- :func:`evaluate_all` ``(cfg)`` -- every finished run in ``paths.runs_dir`` that lacks results.

One evaluation (:class:`Evaluation`) plans every benchmark of ``eval.benchmarks`` and
``eval.mechanisms`` with its exact evaluator config, skips those already finished with the same
config (per-benchmark markers, see pipeline/eval/results.py), then runs the rest in phases so that
only one large model is in memory at a time:

1. the evaluated model: lm-eval benchmarks, AlpacaEval generations (and their length),
   PandaLM candidates, memorization generations;
2. the PandaLM comparator's candidates (generated once per pre-trained model and cached);
3. the judges: AlpacaEval (alpaca_eval), PandaLM;
4. metrics from files: training-loss RSD, weight distance.

A failure in one benchmark (missing checkpoint, data missing offline, an unparsable judge, an
exception) is recorded in results.csv (status error/skipped, with the message) and the others
still run; nothing finished is redone. A lock file (``eval/.lock``, released when the process
ends) keeps two processes from evaluating the same folder at once.

Parallel evaluation (``eval.workers`` > 1, :func:`evaluate_all` only): the runs are handed out one
at a time to that many worker processes (``spawn``; each imports torch/transformers/lm-eval once and
keeps its per-process caches for all the runs it evaluates), each with ``cpu_count // workers`` torch
threads; the parent prints one line per finished run and returns the same list as the sequential
loop. When a worker dies (killed, out of memory), what it finished is kept and the runs not yet
reported are retried once in fresh workers (a second death: an error entry for each). The
pre-trained model's PandaLM candidates (shared by the runs of one model) are generated under a file
lock, once.

Per-process work done once (results are unaffected): heavy imports, lm-eval's ``TaskManager`` and
environment description (pipeline/eval/harness.py); after the first model phase's imports the
objects alive are frozen out of Python's cyclic garbage collector (``gc.freeze``: module-level
objects live for the whole process anyway), so that the ``gc.collect()`` after each model (and
Python's own full collections) no longer traverse the ~0.5 M objects of torch/transformers/lm-eval
(0.35 s each).
"""
from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from pipeline.eval import benchmarks as B
from pipeline.eval.results import BenchmarkResult, ResultStore, Row, status_rows

log = logging.getLogger("pipeline.eval")

BASELINES_DIR = "_baselines"


class EvalError(RuntimeError):
    """The evaluation cannot start (not a run folder, run not finished, folder locked, ...)."""


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


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def model_identity(model_cfg: Any) -> Dict[str, Any]:
    from pipeline.runs import MODEL_RUNTIME_FIELDS

    d = _plain(model_cfg)
    return {k: v for k, v in sorted(d.items()) if k not in MODEL_RUNTIME_FIELDS}


def _hash(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextmanager
def _flock(path: Path, on_busy: Callable[[Any], None]) -> Iterator[Any]:
    """An exclusive ``flock`` on ``path`` (released when the block or the process ends, even by a
    crash); when another process holds it, ``on_busy(file)`` either raises or takes the lock waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            on_busy(f)
        yield f
    finally:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            f.close()


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/eval/.lock``; another process holding it is an :class:`EvalError`."""
    path = folder / "eval" / ".lock"

    def busy(_f) -> None:
        raise EvalError(f"{folder} is being evaluated by another process (lock {path})")

    with _flock(path, busy) as f:
        f.seek(0)
        f.truncate()
        f.write(f"{os.uname().nodename} pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        yield


@contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` that waits for its holder (e.g. a cache another process is
    writing)."""
    def wait(f) -> None:
        log.info("waiting for %s (another process holds it)", path)
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)

    with _flock(path, wait):
        yield


_SCHEMA: Optional[DictConfig] = None


def _schema() -> DictConfig:
    """The config schema as a DictConfig (built once per process; merges copy it)."""
    global _SCHEMA
    if _SCHEMA is None:
        from pipeline.config import Config

        _SCHEMA = OmegaConf.structured(Config)
    return _SCHEMA


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


def load_run_config(run_dir: Path, cfg: DictConfig) -> Tuple[DictConfig, List[str]]:
    """The run's config.yaml on the schema, with this machine's ``paths`` (runs move between clusters)."""
    notes: List[str] = []
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise EvalError(f"{run_dir}: no config.yaml (not a run folder written by pipeline.runs.create_run)")
    raw = OmegaConf.load(path)
    try:
        run_cfg = OmegaConf.merge(_schema(), raw)
    except Exception as e:  # schema changed since the run was made
        notes.append(f"{path} does not fit the current schema ({type(e).__name__}: {e}); read as is")
        run_cfg = raw
    run_cfg = OmegaConf.merge(run_cfg, {"paths": _plain(cfg.paths)})
    return run_cfg, notes


# --------------------------------------------------------------------------------------------
# one evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    name: str
    evaluator: Dict[str, Any]
    skip: Optional[str] = None  # status=skipped with this message (nothing to run)
    spec: Any = None  # harness TaskSpec
    error: Optional[str] = None  # the plan itself failed (e.g. a bad judge config): status=error


class Evaluation:
    def __init__(self, target: Target, cfg: DictConfig):
        self.t = target
        self.cfg = cfg
        self.e = cfg.eval
        self.store = ResultStore(target.folder, target.run_id)
        self.names = list(dict.fromkeys(list(self.e.benchmarks) + list(self.e.mechanisms)))
        self.alpaca_outputs: Optional[List[Dict[str, Any]]] = None
        self.alpaca_reference: Optional[List[Dict[str, str]]] = None
        self.pandalm_items: Optional[List[Dict[str, str]]] = None
        self.pandalm_model_out: Optional[List[str]] = None
        self.failed: Dict[str, str] = {}  # step -> message (a failed step fails its dependants)
        self.saved: List[BenchmarkResult] = []

    # ---------------------------------------------------------------- config accessors
    def metrics(self, name: str) -> List[str]:
        return B.metrics_for(name, _plain(self.e.metrics) or {})

    @property
    def eval_dir(self) -> Path:
        return self.store.eval_dir

    @property
    def dtype(self) -> Optional[str]:
        if self.e.dtype:
            return str(self.e.dtype)
        d = getattr(self.t.model_cfg, "dtype", None) if not isinstance(self.t.model_cfg, dict) else self.t.model_cfg.get("dtype")
        return str(d) if d else None

    # ---------------------------------------------------------------- planning
    def plan_one(self, name: str) -> Plan:
        from pipeline.eval import alpacaeval, harness, mechanisms, pandalm

        b = B.get(name)
        e = self.e
        limit = e.limit
        if b.kind == "harness":
            spec = harness.materialize(
                name, e.data_dir, self.eval_dir / "lm_eval" / "tasks", shots=B.shots_for(name, _plain(e.shots)),
                metrics=self.metrics(name), limit=limit, fewshot_seed=e.fewshot_seed,
                add_bos_token=e.add_bos_token)
            ev = dict(spec.evaluator)
            if _plain(e.gen_kwargs) and b.group == "short_gen":  # generate_until tasks only
                ev["gen_kwargs"] = _plain(e.gen_kwargs)
            return Plan(name, ev or {"framework": "lm-eval", "task": spec.task}, spec.skip, spec)
        if b.kind == "alpaca_eval" or name == "mech_alpacaeval_length":
            gen = alpacaeval.generation_settings(e.max_new_tokens, limit)
            try:
                ref = alpacaeval.reference_path(e.alpaca_eval_reference, e.data_dir)
            except alpacaeval.DataUnavailable as ex:
                return Plan(name, {"framework": "alpaca_eval", "generation": gen}, str(ex))
            if name == "mech_alpacaeval_length":
                return Plan(name, {"kind": "mechanism", "source": "AlpacaEval generations", "generation": gen,
                                   "reference_file": ref.name})
            return Plan(name, alpacaeval.evaluator_info(e.judge, e.judge_model, ref, max_new_tokens=e.max_new_tokens,
                                                        limit=limit))
        if b.kind == "pandalm":
            try:
                ts = pandalm.testset_path(e.pandalm_testset, e.data_dir)
            except pandalm.DataUnavailable as ex:
                return Plan(name, {"framework": "pandalm"}, str(ex))
            comp = self.comparator_id()
            ev = pandalm.evaluator_info(e.pandalm_judge, e.pandalm_judge_model, ts, comp,
                                        max_new_tokens=e.max_new_tokens, limit=limit, unparsable=e.pandalm_unparsable)
            if comp.startswith("pretrained") and not self.t.is_run:
                return Plan(name, ev, "the comparator (the pre-trained model) is the evaluated model itself")
            return Plan(name, ev)
        # mechanisms
        if not self.t.is_run:
            return Plan(name, {"kind": "mechanism"}, f"{name} needs a training run (this is a pre-trained model)")
        if name == "mech_loss_rsd":
            return Plan(name, {"kind": "mechanism", "source": "metrics.jsonl", "window": e.rsd_window,
                               "windows": e.rsd_windows, "ddof": 1, "statistic": "mean over windows of sd/mean"})
        if name == "mech_weight_distance":
            return Plan(name, {"kind": "mechanism", "definitions": "pipeline.trainer.distance",
                               "source": "train_summary.json, else final/ vs the pre-trained checkpoint",
                               "pretrained": _hash(model_identity(self.t.model_cfg))})
        if name == "mech_memorization_bleu":
            ds = self.t.run_cfg.dataset.name if self.t.run_cfg is not None else "?"
            return Plan(name, {"kind": "mechanism", "signature": mechanisms.BLEU_SIGNATURE,
                               "prompts": int(e.memorization_prompts), "seed": int(e.memorization_seed),
                               "dataset": ds, "decoding": "greedy", "max_new_tokens": int(e.max_new_tokens),
                               "template": "alpaca (pipeline.preprocess.render_source)"})
        raise ValueError(f"no plan for benchmark {name!r}")

    def comparator_id(self) -> str:
        c = str(self.e.pandalm_comparator)
        if c == "pretrained":
            return f"pretrained ({getattr(self.t.model_cfg, 'name', None) or _plain(self.t.model_cfg).get('name')})"
        return c

    # ---------------------------------------------------------------- recording
    def save(self, name: str, evaluator: Dict[str, Any], rows: List[Row]) -> None:
        res = BenchmarkResult(name, evaluator, rows)
        self.store.save(res, order=self.names)
        self.saved.append(res)
        log.info("  %s: %s%s", name, res.status,
                 "" if res.status == "ok" else f" ({rows[0].message[:200] if rows else ''})")

    def fail(self, plan: Plan, status: str, message: str) -> None:
        self.save(plan.name, plan.evaluator, status_rows(plan.name, self.metrics(plan.name), status, message))

    def attempt(self, plan: Plan, fn: Callable[[], List[Row]]) -> bool:
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

    # ---------------------------------------------------------------- model loading
    def load_model(self, model_dir: Optional[Path], model_cfg: Any):
        """lm-eval's HFLM on the checkpoint folder (a hub model: its hub id and pinned revision)."""
        from pipeline.eval import harness
        from pipeline.eval.generation import ModelMissing, check_checkpoint, resolve_device

        if model_dir is not None:
            pretrained, revision = check_checkpoint(model_dir), None
        else:
            hub_id = _plain(model_cfg).get("hub_id")
            if not hub_id:
                raise ModelMissing(f"model '{_plain(model_cfg).get('name')}' has neither a local folder nor a hub id")
            pretrained, revision = hub_id, _plain(model_cfg).get("revision")
        harness.import_model_class()
        self.import_judges()
        freeze_imported_objects()  # before any model exists (see the module docstring)
        return harness.make_lm(pretrained, batch_size=self.e.batch_size, device=resolve_device(self.e.device),
                               dtype=self.dtype, revision=revision, add_bos_token=self.e.add_bos_token)

    def import_judges(self) -> None:
        """Import the judging frameworks this evaluation will use (before the objects are frozen)."""
        if "alpaca_eval" in self.names:
            os.environ.setdefault("IS_ALPACA_EVAL_2", "False")
            try:
                import alpaca_eval.main  # noqa: F401
            except Exception:  # reported by the benchmark itself
                pass

    def pretrained_source(self) -> Tuple[Optional[Path], Any]:
        from pipeline import models

        return models.pretrained_dir(self.t.model_cfg, self.cfg.paths), self.t.model_cfg

    # ---------------------------------------------------------------- the run
    def run(self) -> Path:
        from pipeline.eval.generation import release

        e = self.e
        log.info("evaluating %s -> %s", self.t.run_id, self.store.results_csv)
        plans: Dict[str, Plan] = {}
        for n in self.names:
            try:
                plans[n] = self.plan_one(n)
            except Exception as ex:  # e.g. an unknown judge config: recorded, the others go on
                log.error("%s: cannot plan: %s", n, ex)
                plans[n] = Plan(n, {"plan_error": f"{type(ex).__name__}: {ex}"}, error=f"{type(ex).__name__}: {ex}")
        pending = [n for n in self.names
                   if e.force or not self.store.is_finished(n, plans[n].evaluator)]
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
                for n in model_steps:
                    self.fail(plans[n], "error", msg)
                    self.failed[n] = msg
                lm = None
            if lm is not None:
                self.phase_model(plans, pending, lm)
            del lm
            release()
        # phase 2+3: PandaLM comparator and the judges
        if "pandalm" in pending and "pandalm" not in self.failed:
            self.step_pandalm(plans["pandalm"])
        if "alpaca_eval" in pending and "alpaca_eval" not in self.failed:
            self.step_alpaca_judge(plans["alpaca_eval"])
        # phase 4: from files
        if "mech_loss_rsd" in pending:
            self.attempt(plans["mech_loss_rsd"], self.step_loss_rsd)
        if "mech_weight_distance" in pending:
            self.attempt(plans["mech_weight_distance"], self.step_weight_distance)
        return self.store.write_table(self.names)

    def phase_model(self, plans: Dict[str, Plan], pending: List[str], lm) -> None:
        from pipeline.eval.generation import fast_causal_masks

        with fast_causal_masks():  # lm-eval's generate_until too (the same masks, see generation.py)
            self._phase_model(plans, pending, lm)

    def _phase_model(self, plans: Dict[str, Plan], pending: List[str], lm) -> None:
        from pipeline.eval import harness

        e = self.e
        model, tok = lm.model, lm.tokenizer
        gk = _plain(e.gen_kwargs) or None
        for n in [n for n in pending if B.get(n).kind == "harness"]:
            p = plans[n]
            self.attempt(p, lambda p=p, n=n: harness.run_task(
                lm, p.spec, metrics=self.metrics(n), limit=e.limit,
                gen_kwargs=gk if B.get(n).group == "short_gen" else None,
                raw_dir=self.eval_dir / "lm_eval", bootstrap_iters=e.bootstrap_iters,
                fewshot_seed=e.fewshot_seed))
        if "alpaca_eval" in pending or "mech_alpacaeval_length" in pending:
            self.step_alpaca_generate(plans, pending, model, tok)
        if "pandalm" in pending:
            self.step_pandalm_candidates(plans["pandalm"], model, tok)
        if "mech_memorization_bleu" in pending:
            self.attempt(plans["mech_memorization_bleu"], lambda: self.step_memorization(model, tok))

    # ---------------------------------------------------------------- AlpacaEval
    def step_alpaca_generate(self, plans, pending, model, tok) -> None:
        from pipeline.eval import alpacaeval

        e = self.e
        try:
            path = alpacaeval.reference_path(e.alpaca_eval_reference, e.data_dir)
            self.alpaca_reference = alpacaeval.load_reference(path)
            self.alpaca_outputs = alpacaeval.generate_outputs(
                model, tok, self.alpaca_reference, out_file=self.eval_dir / "alpaca_eval" / "model_outputs.json",
                generator=self.t.run_id, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, limit=e.limit)
        except Exception as ex:
            log.error("AlpacaEval generation failed:\n%s", traceback.format_exc())
            msg = f"AlpacaEval generation failed: {type(ex).__name__}: {ex}"
            for n in ("alpaca_eval", "mech_alpacaeval_length"):
                if n in pending:
                    self.fail(plans[n], "error", msg)
                    self.failed[n] = msg
            return
        if "mech_alpacaeval_length" in pending:
            self.attempt(plans["mech_alpacaeval_length"], self.rows_alpaca_length)

    def rows_alpaca_length(self) -> List[Row]:
        import statistics

        outs = self.alpaca_outputs or []
        vals = {"mean_chars": [len(o["output"]) for o in outs], "mean_tokens": [o["n_tokens"] for o in outs]}
        unfinished = sum(1 for o in outs if not o.get("finished", True))
        msg = (f"{unfinished} of {len(outs)} generations stopped at max_new_tokens={self.e.max_new_tokens}"
               if unfinished else "")
        rows = []
        for m in self.metrics("mech_alpacaeval_length"):
            v = vals.get(m)
            if v is None:
                rows.append(Row("mech_alpacaeval_length", m, None, None, None, "skipped", f"unknown metric {m!r}"))
                continue
            se = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else None
            rows.append(Row("mech_alpacaeval_length", m, sum(v) / len(v), se, len(v), "ok", msg))
        return rows

    def step_alpaca_judge(self, plan: Plan) -> None:
        from pipeline.eval import alpacaeval

        e = self.e

        def fn() -> List[Row]:
            if self.alpaca_outputs is None:  # generations of an earlier attempt
                cached = self.eval_dir / "alpaca_eval" / "model_outputs.json"
                raise RuntimeError(f"no AlpacaEval generations ({cached})")
            board, ann = alpacaeval.annotate(
                self.alpaca_outputs, self.alpaca_reference, judge=e.judge, judge_model=e.judge_model,
                out_dir=self.eval_dir / "alpaca_eval", name=self.t.run_id, chunksize=e.judge_chunksize)
            return alpacaeval.rows_from(board, ann, self.alpaca_outputs, self.metrics("alpaca_eval"), e.judge)

        self.attempt(plan, fn)

    # ---------------------------------------------------------------- PandaLM
    def step_pandalm_candidates(self, plan: Plan, model, tok) -> None:
        from pipeline.eval import pandalm

        e = self.e
        try:
            ts = pandalm.testset_path(e.pandalm_testset, e.data_dir)
            items = pandalm.load_testset(ts)
            self.pandalm_items = items[: e.limit] if e.limit else items
            self.pandalm_model_out = pandalm.generate_candidates(
                model, tok, self.pandalm_items, out_file=self.eval_dir / "pandalm" / "candidates.json",
                who=self.t.run_id, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
        except Exception as ex:
            log.error("PandaLM candidates failed:\n%s", traceback.format_exc())
            msg = f"PandaLM candidate generation failed: {type(ex).__name__}: {ex}"
            self.fail(plan, "error", msg)
            self.failed["pandalm"] = msg

    def comparator_outputs(self) -> List[str]:
        from pipeline.eval import pandalm
        from pipeline.eval.generation import release

        e = self.e
        items = self.pandalm_items or []
        c = str(e.pandalm_comparator)
        if c == "pretrained":
            if not self.t.is_run:
                raise pandalm.PandaLMError("the comparator (pretrained) is the evaluated model itself")
            name = str(getattr(self.t.model_cfg, "name", "model"))
            cache = (Path(self.cfg.paths.runs_dir) / BASELINES_DIR / name / "eval" / "pandalm"
                     / f"candidates-{_hash(model_identity(self.t.model_cfg))}.json")
            who = f"pretrained {name} {_hash(model_identity(self.t.model_cfg))}"
            folder, mcfg = self.pretrained_source()
        else:
            p = Path(c).expanduser()
            if p.is_file():
                return pandalm.load_outputs_file(p, len(items))
            if not p.is_dir():
                raise pandalm.PandaLMError(
                    f"config key 'eval.pandalm_comparator': {c!r} is neither 'pretrained', a model folder nor "
                    f"a JSON/JSONL file of outputs")
            cache = self.eval_dir / "pandalm" / f"comparator-{_hash(str(p.resolve()))}.json"
            who, folder, mcfg = str(p.resolve()), p, None
        # one process generates a shared cache, the others wait for it (parallel workers)
        with waiting_lock(cache.parent / f".{cache.name}.lock"):
            if cache.is_file():  # cheap check before loading a model
                try:
                    got = json.loads(cache.read_text(encoding="utf-8"))
                    if got.get("settings", {}).get("who") == who and len(got.get("outputs", [])) >= len(items) \
                            and got["settings"].get("max_new_tokens") == int(e.max_new_tokens):
                        n_prompts = pandalm._sha(json.dumps(pandalm.candidate_prompts(items)).encode())
                        if got["settings"].get("prompts") == n_prompts:
                            return got["outputs"]
                except (ValueError, KeyError):
                    pass
            lm = self.load_model(folder, mcfg)
            try:
                return pandalm.generate_candidates(lm.model, lm.tokenizer, items, out_file=cache, who=who,
                                                   max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
            finally:
                del lm
                release()

    def step_pandalm(self, plan: Plan) -> None:
        from pipeline.eval import pandalm
        from pipeline.eval.generation import release

        e = self.e

        def fn() -> List[Row]:
            if self.pandalm_items is None or self.pandalm_model_out is None:
                raise RuntimeError("no PandaLM candidates for the evaluated model")
            comp = self.comparator_outputs()
            conf = pandalm.judge_config(e.pandalm_judge, e.pandalm_judge_model)
            judge = pandalm.make_judge(conf, e.device)
            try:
                pairs, records = pandalm.judge_pairs(
                    judge, self.pandalm_items, self.pandalm_model_out, comp, style=conf.get("prompt", "pandalm"),
                    cache=self.eval_dir / "pandalm" / f"judgments-{e.pandalm_judge}.jsonl")
            finally:
                del judge
                release()
            from pipeline.runs import atomic_write_json

            atomic_write_json(self.eval_dir / "pandalm" / "judgments.json", records)
            t = pandalm.tally(pairs, e.pandalm_unparsable)
            return pandalm.rows_from(t, self.metrics("pandalm"), e.pandalm_judge, self.comparator_id())

        self.attempt(plan, fn)

    # ---------------------------------------------------------------- mechanisms
    def step_loss_rsd(self) -> List[Row]:
        import statistics

        from pipeline.eval import mechanisms

        losses, steps = mechanisms.read_losses(self.t.folder / "metrics.jsonl")
        mean, per = mechanisms.loss_rsd(losses, self.e.rsd_window, self.e.rsd_windows)
        se = statistics.stdev(per) / len(per) ** 0.5 if len(per) > 1 else None
        msg = f"{len(steps)} optimizer steps, {len(per)} {self.e.rsd_windows} windows of {self.e.rsd_window}"
        return [Row("mech_loss_rsd", m, mean if m == "rsd_mean" else None, se if m == "rsd_mean" else None,
                    len(per), "ok" if m == "rsd_mean" else "skipped",
                    msg if m == "rsd_mean" else f"unknown metric {m!r}")
                for m in self.metrics("mech_loss_rsd")]

    def step_weight_distance(self) -> List[Row]:
        from pipeline.eval import mechanisms

        s = mechanisms.summary_distance(self.t.folder)
        if s is not None:
            vals, n, msg = s, s.get("tensors"), f"from the trainer's summary {s['source']}"
        else:
            final = self.t.model_dir
            if final is None or not Path(final).is_dir():
                raise mechanisms.MechanismError(f"missing checkpoint {final} (and no train_summary.json with "
                                                f"weight_distance)")
            folder, _ = self.pretrained_source()
            if folder is None:
                raise mechanisms.MechanismError(
                    f"the pre-trained model '{getattr(self.t.model_cfg, 'name', '?')}' has no local folder "
                    f"(hub cache only): set model.local_path to compute the weight distance")
            d = mechanisms.weight_distance(Path(final), Path(folder))
            vals, n = d.values, d.n_tensors
            msg = "; ".join([f"computed from the saved checkpoint {final} vs {folder} (no train_summary.json)"]
                            + d.notes)
        return [Row("mech_weight_distance", m, vals.get(m), None, n, "ok" if m in vals else "skipped",
                    msg if m in vals else f"metric {m!r} not available (available: {list(mechanisms.DISTANCE_METRICS)})")
                for m in self.metrics("mech_weight_distance")]

    def step_memorization(self, model, tok) -> List[Row]:
        from pipeline.data.build import load_dataset
        from pipeline.eval import mechanisms
        from pipeline.eval.generation import generate

        e = self.e
        if self.t.run_cfg is None:
            raise mechanisms.MechanismError("no run config (config.yaml): cannot find the training data")
        records, meta = load_dataset(self.t.run_cfg)
        pairs = mechanisms.select_prompts(records, int(e.memorization_prompts), int(e.memorization_seed))
        if not pairs:
            raise mechanisms.MechanismError(f"dataset {self.t.run_cfg.dataset.name}: no training prompts")
        gens = generate(model, tok, [p for p, _ in pairs], max_new_tokens=e.max_new_tokens,
                        batch_size=e.batch_size, desc="memorization")
        hyps = [g.text for g in gens]
        from pipeline.runs import atomic_write_json

        atomic_write_json(self.eval_dir / "memorization" / "generations.json",
                          [{"prompt": p, "reference": r, "generation": h} for (p, r), h in zip(pairs, hyps)])
        score, sig = mechanisms.corpus_bleu(hyps, [r for _, r in pairs])
        msg = f"sacreBLEU {sig}; {len(pairs)} unique training prompts of {len(records)} records"
        return [Row("mech_memorization_bleu", m, score if m == "bleu" else None, None, len(pairs),
                    "ok" if m == "bleu" else "skipped", msg if m == "bleu" else f"unknown metric {m!r}")
                for m in self.metrics("mech_memorization_bleu")]


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


def evaluate_run(run_dir, cfg: DictConfig) -> Path:
    """Evaluate one finished run (see the module docstring); returns ``run_dir/results.csv``.

    Raises :class:`EvalError` when ``run_dir`` is not a finished run or is being evaluated elsewhere;
    everything that goes wrong inside a benchmark is recorded in results.csv instead.
    """
    from pipeline.runs import RunDir

    rd = RunDir(Path(run_dir).expanduser().resolve())
    meta = _run_json(rd.path)
    state = rd.status().get("state")
    if state != "done":
        raise EvalError(f"run {rd.path.name} is '{state}', not 'done' (status.json): train it before evaluating")
    run_cfg, notes = load_run_config(rd.path, cfg)
    target = Target(folder=rd.path, run_id=str(meta.get("run_id") or rd.path.name), model_dir=rd.final,
                    model_cfg=run_cfg.model, run_cfg=run_cfg, is_run=True, notes=notes)
    with folder_lock(rd.path):
        return Evaluation(target, cfg).run()


def pending_benchmarks(run_dir, cfg: DictConfig) -> List[str]:
    """The benchmarks of ``cfg.eval`` that ``evaluate_run(run_dir, cfg)`` would (re)evaluate: not
    finished with this evaluator setting (all of them with ``eval.force``); benchmarks planned as
    skipped (nothing to run) do not count. Empty: the results are complete."""
    from pipeline.runs import RunDir

    rd = RunDir(Path(run_dir).expanduser().resolve())
    meta = _run_json(rd.path)
    run_cfg, notes = load_run_config(rd.path, cfg)
    target = Target(folder=rd.path, run_id=str(meta.get("run_id") or rd.path.name), model_dir=rd.final,
                    model_cfg=run_cfg.model, run_cfg=run_cfg, is_run=True, notes=notes)
    ev = Evaluation(target, cfg)
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
    from pipeline import models
    from pipeline.runs import atomic_write_json

    folder = baseline_folder(cfg).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = models.pretrained_dir(cfg.model, cfg.paths)
    ident = model_identity(cfg.model)
    atomic_write_json(folder / "baseline.json", {"run_id": f"baseline__{cfg.model.name}", "model": cfg.model.name,
                                                 "model_dir": str(model_dir) if model_dir else None,
                                                 "identity": ident})
    target = Target(folder=folder, run_id=f"baseline__{cfg.model.name}", model_dir=model_dir,
                    model_cfg=cfg.model, run_cfg=None, is_run=False)
    with folder_lock(folder):
        return Evaluation(target, cfg).run()


def finished_runs(runs_dir: Path) -> List[Path]:
    """Run folders (with run.json) whose status is done, in name order."""
    from pipeline.runs import RunDir

    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    out = []
    for p in sorted(x for x in runs_dir.iterdir() if x.is_dir() and not x.name.startswith((".", "_"))):
        rd = RunDir(p)
        if rd.run_json.is_file() and rd.status().get("state") == "done":
            out.append(p)
    return out


def evaluate_all(cfg: DictConfig) -> List[Tuple[str, Optional[Path], Optional[str]]]:
    """Every finished run in ``paths.runs_dir`` (finished benchmarks are skipped inside each run),
    in ``eval.workers`` processes when that is > 1 (see the module docstring).

    Returns ``(run folder name, results.csv or None, error or None)`` per run, in name order.
    """
    from tqdm.auto import tqdm

    runs = finished_runs(Path(str(cfg.paths.runs_dir)))
    log.info("%d finished run(s) in %s", len(runs), cfg.paths.runs_dir)
    workers = int(cfg.eval.get("workers") or 1)
    if workers > 1 and len(runs) > 1:
        return _evaluate_parallel(runs, cfg, min(workers, len(runs)))
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


# --------------------------------------------------------------------------------------------
# parallel evaluation (eval.workers > 1)
# --------------------------------------------------------------------------------------------
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
    import tqdm.std

    init = tqdm.std.tqdm.__init__
    if getattr(init, "plw_quiet", False):
        return

    def quiet(self, *args, **kwargs):
        if len(args) > 10:  # disable passed by position (the 11th parameter)
            args = args[:10] + (True,) + args[11:]
        else:
            kwargs["disable"] = True
        init(self, *args, **kwargs)

    quiet.plw_quiet = True
    tqdm.std.tqdm.__init__ = quiet


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
    import torch

    torch.set_num_threads(threads)


def _evaluate_in_worker(run_dir: str, cfg: DictConfig) -> Tuple[str, Optional[str], Optional[str], float, List[str]]:
    """One run in a worker: ``(name, results.csv or None, error or None, seconds, failed benchmarks)``."""
    global _WORKER_RUN
    from pipeline.eval.results import read_results

    p = Path(run_dir)
    _WORKER_RUN = p.name
    t0 = time.time()
    try:
        path = evaluate_run(p, cfg)
        failed = sorted({r["benchmark"] for r in read_results(path) if r["status"] == "error"})
        return p.name, str(path), None, time.time() - t0, failed
    except Exception as e:  # the same outcome as in the sequential loop
        if not isinstance(e, EvalError):
            log.error("%s:\n%s", p.name, traceback.format_exc())
        log.error("%s", e)
        return p.name, None, f"{type(e).__name__}: {e}", time.time() - t0, []
    finally:
        _WORKER_RUN = "-"


def _evaluate_parallel(runs: List[Path], cfg: DictConfig, n: int) -> List[Tuple[str, Optional[Path], Optional[str]]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    threads = max(1, cpu_count() // n)
    log.info("evaluating %d run(s) in %d worker processes, %d torch thread(s) each", len(runs), n, threads)
    job_cfg = portable_config(cfg)
    levels = (logging.getLogger().getEffectiveLevel(), logging.getLogger("pipeline").getEffectiveLevel())
    done: Dict[str, Tuple[str, Optional[Path], Optional[str]]] = {}
    bar = tqdm(total=len(runs), desc="runs")
    todo = list(runs)
    for attempt in (1, 2):
        died: List[Path] = []
        with ProcessPoolExecutor(max_workers=min(n, len(todo)), mp_context=mp.get_context("spawn"),
                                 initializer=_worker_init, initargs=(threads, *levels)) as ex:
            with _worker_environment(threads):  # the workers start within submit()
                futures = {ex.submit(_evaluate_in_worker, str(p), job_cfg): p for p in todo}
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
                    state = (f"error: {err}" if err else
                             f"{len(failed)} benchmark(s) failed ({', '.join(failed)})" if failed else "ok")
                    log.info("[%d/%d] %s: %s (%.1f s)", len(done), len(runs), name, state, secs)
            except BaseException:  # Ctrl-C: what finished is on disk; stop handing out runs
                ex.shutdown(wait=False, cancel_futures=True)
                raise
        if not died:
            break
        todo = sorted(died)
        if attempt == 1:
            log.warning("a worker process died; %d unfinished run(s) are retried in fresh processes: %s",
                        len(todo), ", ".join(p.name for p in todo))
    else:
        for p in todo:
            msg = ("BrokenProcessPool: a worker process died while this run was pending, twice (killed, out of "
                   "memory, a crash); what was finished is kept: run `python -m pipeline.eval` again to resume")
            log.error("%s: %s", p.name, msg)
            done[p.name] = (p.name, None, msg)
            bar.update(1)
    bar.close()
    return [done[p.name] for p in runs]
