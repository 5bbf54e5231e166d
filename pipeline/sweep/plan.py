"""From an experiment config to planned runs: composition, run ids, states, estimates, launch files.

:func:`make_plan` composes the grid once per (model, dataset, variant) and sets ``plw``/``seed`` on
copies (a compose takes ~0.5 s here; the paper's 60-run grid needs 6), computes each run's id
(:func:`pipeline.runs.run_id`, so the same folder as ``python -m pipeline.train`` with the same
overrides), reads its state from the store and decides what to do (:mod:`pipeline.sweep.store`).

Per-run overrides, in order (a later value of the same key wins):
``experiment.overrides`` (e.g. ``train=cpu_small``), the command line's non-``experiment``
overrides, then the grid point's (``model=``, ``dataset=``, ``plw=``, ``seed=``, the variant's).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from pipeline import lifecycle
from pipeline.config import ConfigError, load_config, merge_overrides
from pipeline.data import store as dstore
from pipeline.data.build import prepare
from pipeline.data.records import load_records
from pipeline.eval import benchmarks as B
from pipeline.runs import RunDir, atomic_write_json, atomic_write_text, create_run, run_id
from pipeline.sweep import estimate as est
from pipeline.sweep.grid import GridPoint, enumerate_grid, split_overrides
from pipeline.sweep.store import Liveness, classify, decide, liveness

log = logging.getLogger(__name__)


@dataclass
class PlannedRun:
    point: GridPoint
    cfg: DictConfig
    run_id: str
    rd: RunDir
    overrides: List[str]
    status: Dict[str, Any] = field(default_factory=dict)
    effective: str = "pending"
    action: str = "launch"
    estimate: Optional[est.Estimate] = None
    stats_source: str = ""
    eval_estimate: Optional[est.EvalEstimate] = None

    @property
    def resources(self) -> Tuple[int, int, int, int, int]:
        r = self.cfg.model.resources
        return (int(r.nodes), int(r.gpus_per_node), int(r.cpus_per_task), int(r.mem_gb), int(r.timeout_min))


@dataclass
class Plan:
    root: DictConfig  # the composed sweep config (experiment, launcher, paths)
    experiment: str
    runs: List[PlannedRun]
    grid_overrides: List[str]
    run_overrides: List[str]

    @property
    def runs_dir(self) -> Path:
        return Path(self.root.paths.runs_dir)


def compose_runs(
    experiment: Mapping[str, Any], run_overrides: Sequence[str], points: Sequence[GridPoint]
) -> List[Tuple[GridPoint, DictConfig, List[str]]]:
    """A composed, validated config per grid point (composing once per model/dataset/variant)."""
    base = list(experiment.get("overrides") or [])
    cache: Dict[Tuple[str, str, str], DictConfig] = {}
    out = []
    for p in points:
        ov = merge_overrides(base, run_overrides, p.overrides())
        key = (p.model, p.dataset, p.variant)
        if key not in cache:
            cache[key] = load_config(ov)
        cfg = copy.deepcopy(cache[key])
        cfg.plw = float(p.plw)
        cfg.seed = int(p.seed)
        out.append((p, cfg, ov))
    return out


# ------------------------------------------------------------------------------------------------
# token statistics for the estimates
# ------------------------------------------------------------------------------------------------
def dataset_token_stats(cfg: DictConfig) -> Tuple[Optional[est.TokenStats], str]:
    """Size of ``cfg.dataset``: from the processed dataset if built, else the raw file (characters
    / 4), else the paper's Table 1; ``(None, reason)`` when none is available. Never builds."""
    name = cfg.dataset.name
    max_len = int(cfg.train.model_max_length)
    try:
        p = prepare(cfg)
        if dstore.is_done(p.folder, verify=False):
            records, _ = dstore.read(p.folder)
            return _stats_from_records(records, max_len, "processed"), "processed"
        ds = cfg.dataset
        loaded = load_records(p.raw.path, ds.source.format, ds.empty_output, ds.max_records)
        return _stats_from_records(loaded.records, max_len, "raw"), "raw"
    except Exception as e:  # noqa: BLE001 - no data here (offline, not downloaded): fall back
        reason = f"{type(e).__name__}: {e}"
    stats = est.table1_stats(name)
    if stats is not None:
        mr = cfg.dataset.get("max_records")
        if mr:
            stats = est.TokenStats(min(stats.n_records, int(mr)), stats.mean_tokens, stats.source)
        return stats, "table1"
    return None, reason


def _stats_from_records(records: Sequence[Mapping[str, Any]], max_len: int, source: str) -> est.TokenStats:
    lengths = []
    for r in records:
        t = r.get("tokens")
        if t:  # LLaMA token counts measured by the prompt-inversion transform
            lengths.append(est.example_tokens(int(t["instruction"]), int(t["input"]), int(t["output"])))
        else:
            n_in = len(r.get("input") or "")
            lengths.append(
                est.example_tokens(
                    est.chars_to_tokens(len(r.get("instruction") or "")),
                    est.chars_to_tokens(n_in),
                    est.chars_to_tokens(len(r.get("output") or "")),
                )
            )
    return est.TokenStats(len(records), est.capped_mean(lengths, max_len), source)


def run_estimate(
    cfg: DictConfig, stats: Optional[est.TokenStats], peak_tflops: float, mfu: float
) -> Optional[est.Estimate]:
    if stats is None:
        return None
    t = cfg.train
    return est.estimate(
        stats,
        float(cfg.model.params_billion),
        float(t.epochs),
        int(t.max_steps),
        int(t.global_batch_size),
        peak_tflops,
        mfu,
        gpus=int(cfg.model.resources.gpus_per_node) * int(cfg.model.resources.nodes),
        eval_fraction=float(t.eval_fraction),
    )


def eval_generations(cfg: DictConfig, stats: Optional[est.TokenStats]) -> List[Tuple[str, int, int]]:
    """``(benchmark, generations, new tokens at most)`` that ``make eval`` generates for one run of
    ``cfg`` (``eval.benchmarks`` and ``eval.mechanisms``; ``eval.limit``, ``eval.gen_kwargs.max_gen_toks``
    for lm-eval tasks, and the training set's size for the memorization prompts applied)."""
    e = cfg.eval
    limit = e.get("limit")
    max_gen = (OmegaConf.to_container(e.gen_kwargs) or {}).get("max_gen_toks") if e.get("gen_kwargs") else None
    out = []
    for name in [*list(e.benchmarks or []), *list(e.mechanisms or [])]:
        try:
            b = B.get(str(name))
        except KeyError:
            continue
        if b.generations is None:
            continue
        n = b.generations if isinstance(b.generations, int) else int(e[b.generations])
        if b.generations == "memorization_prompts" and stats is not None:
            n = min(n, int(stats.n_records))
        if limit:
            n = min(n, int(limit))
        t = b.new_tokens if isinstance(b.new_tokens, int) else int(e[b.new_tokens])
        if b.kind == "harness" and max_gen:
            t = int(max_gen)
        out.append((str(name), int(n), int(t)))
    return out


def eval_cost(cfg: DictConfig, stats: Optional[est.TokenStats], tokens_per_s: float) -> est.EvalEstimate:
    return est.eval_estimate([(n, t) for _, n, t in eval_generations(cfg, stats)], tokens_per_s)


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------
def make_plan(
    overrides: Sequence[str], estimates: bool = False, slurm_states: Optional[Mapping[str, str]] = None
) -> Plan:
    """Compose the sweep (``overrides`` must select an experiment) and plan every run."""
    grid_ov, run_ov = split_overrides(overrides)
    root = load_config(list(overrides))
    if root.get("experiment") is None:
        raise ConfigError(
            "config key 'experiment': a sweep needs an experiment, e.g. experiment=demo "
            "(make sweep EXPERIMENT=demo); options: conf/experiment/*.yaml"
        )
    exp = OmegaConf.to_container(root.experiment, resolve=True)
    points = enumerate_grid(exp)
    lcfg = root.launcher
    composed = compose_runs(exp, run_ov, points)
    stats_cache: Dict[str, Tuple[Optional[est.TokenStats], str]] = {}
    runs: List[PlannedRun] = []
    for p, cfg, ov in composed:
        rid = run_id(cfg, p.variant)
        rd = RunDir(Path(cfg.paths.runs_dir) / rid)
        pr = PlannedRun(point=p, cfg=cfg, run_id=rid, rd=rd, overrides=ov)
        refresh(pr, int(lcfg.max_retries), float(lcfg.stale_after_s), slurm_states)
        if estimates:
            dkey = OmegaConf.to_yaml(cfg.dataset, resolve=True) + str(cfg.train.model_max_length)
            if dkey not in stats_cache:
                stats_cache[dkey] = dataset_token_stats(cfg)
            stats, src = stats_cache[dkey]
            pr.estimate = run_estimate(cfg, stats, float(lcfg.gpu_peak_tflops), float(lcfg.mfu))
            pr.stats_source = src
            vllm = str(OmegaConf.select(cfg, "eval.backend", default="hf")) == "vllm"
            rate = lcfg.eval_tokens_per_s_vllm if vllm else lcfg.eval_tokens_per_s
            pr.eval_estimate = eval_cost(cfg, stats, float(rate))
        runs.append(pr)
    return Plan(root=root, experiment=str(exp["name"]), runs=runs, grid_overrides=grid_ov, run_overrides=run_ov)


def refresh(
    pr: PlannedRun, max_retries: int, stale_after_s: float, slurm_states: Optional[Mapping[str, str]] = None
) -> None:
    """Re-read the run's status and decide again."""
    rd = pr.rd
    pr.status = rd.status() if rd.status_file.exists() else {"state": "pending", "attempts": 0}
    live = liveness(rd, pr.status, slurm_states) if rd.path.exists() else Liveness()
    pr.effective = classify(pr.status, live, stale_after_s)
    pr.action = decide(pr.effective, int(pr.status.get("failures", 0)), max_retries)


def mark_stale(pr: PlannedRun) -> None:
    """A stale run (status running, process gone) is recorded as a failed attempt."""
    lifecycle.mark_stale(pr.rd, pr.status)


def prepare_launch(pr: PlannedRun, launcher: DictConfig) -> None:
    """Create the run folder (config.yaml, run.json once) and write this launch's files."""
    create_run(pr.cfg, pr.point.variant)
    atomic_write_text(pr.rd.launch_config, OmegaConf.to_yaml(pr.cfg, resolve=True))
    atomic_write_json(
        pr.rd.launch_json,
        {
            "variant": pr.point.variant,
            "overrides": pr.overrides,
            "launcher": str(launcher.name),
            "heartbeat_s": float(launcher.heartbeat_s),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    lifecycle.mark_prepared(pr.rd)


def manifest_entries(plan: Plan) -> List[Dict[str, Any]]:
    return [
        {
            "run_id": r.run_id,
            "model": r.point.model,
            "dataset": r.point.dataset,
            "plw": r.point.plw,
            "variant": r.point.variant,
            "seed": r.point.seed,
            "gpu_hours": None if r.estimate is None else r.estimate.gpu_hours,
        }
        for r in plan.runs
    ]
