"""The analysis stage end to end (``python -m pipeline.analysis regress``): collect the run store,
aggregate, fit the GLMM per dataset and the GAMs across datasets, draw the figures, write the
tables and the Markdown report. Every problem is collected in an :class:`IssueLog` and reported;
one bad dataset never stops the others."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from pipeline.analysis import figures as F
from pipeline.analysis.aggregates import (
    DatasetStatus,
    check_datasets,
    minmax_scale,
    regularizer_table,
    run_aggregates,
    select_primary,
)
from pipeline.analysis.collect import collect_runs, provenance, write_collected
from pipeline.analysis.common import IssueLog
from pipeline.analysis.gam import GamResult, fit_gam, optimal_plw_table, prepare_gam_data, save_bundle, surface
from pipeline.analysis.glmm import GlmmResult, fit_glmm, prepare_glmm_data, residual_tests_row, skipped
from pipeline.analysis.rbridge import r_unavailable_reason
from pipeline.analysis.report import write_report
from pipeline.trainer.reporting import log_run_results


@dataclass
class AnalysisOutput:
    out_dir: Path
    runs_dir: Path
    tidy: pd.DataFrame
    scores: pd.DataFrame  # primary metric per run x benchmark (all runs)
    mechanisms: pd.DataFrame
    usable: pd.DataFrame  # main runs (no regularizer) of analysable datasets, usable benchmarks
    aggregates: pd.DataFrame
    status: Dict[str, DatasetStatus]
    glmm: Dict[str, GlmmResult]
    gam: Dict[str, GamResult]
    regularizers: pd.DataFrame
    regularizer_aggregates: pd.DataFrame
    issues: IssueLog
    files: Dict[str, List[Path]] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)


def _glmm_stage(usable: pd.DataFrame, status: Dict[str, DatasetStatus], acfg, log: IssueLog):
    g = acfg.glmm
    out: Dict[str, GlmmResult] = {}
    for ds, st in status.items():
        if not (st.analysable and st.glmm):
            out[ds] = skipped(ds, st.reasons)
            continue
        data = prepare_glmm_data(usable[usable["dataset"] == ds], do_squeeze=g.squeeze)
        try:
            res = fit_glmm(
                data,
                ds,
                raw=g.raw_poly,
                conf_level=g.conf_level,
                n_sim=g.n_sim,
                seed=g.seed,
                optimizer=g.optimizer,
                fallback_optimizer=g.fallback_optimizer,
                p=acfg.power,
            )
        except Exception as e:  # R itself failed in an unexpected way: report, continue
            res = GlmmResult(dataset=ds, status="failed", errors=[f"{type(e).__name__}: {e}"])
        for note in res.notes:
            log.add("glmm", ds, note, level="warning")
        if res.status != "fitted":
            log.add("glmm", ds, "GLMM could not be fitted: " + "; ".join(res.errors))
        elif not res.converged:
            log.add(
                "glmm",
                ds,
                "convergence problem: " + ("; ".join(res.warnings) or "non-positive-definite Hessian"),
                level="warning",
            )
        out[ds] = res
    return out


def _gam_stage(
    usable: pd.DataFrame, acfg, log: IssueLog, run_dirs: Optional[Dict[str, str]] = None
) -> Dict[str, GamResult]:
    g = acfg.gam
    out: Dict[str, GamResult] = {}
    w_grid = np.linspace(0.0, 1.0, int(g.w_grid))
    for subset in g.subsets:
        data = prepare_gam_data(usable, subset, gen_benchmarks=list(g.gen_benchmarks), scaling=g.scaling)
        try:
            res = fit_gam(data, subset, formula=g.formula, method=g.method, k=g.k)
        except Exception as e:
            res = GamResult(subset=subset, status="failed", errors=[f"{type(e).__name__}: {e}"])
        if res.status != "fitted":
            log.add("gam", subset, "GAM not fitted: " + "; ".join(res.errors))
            out[subset] = res
            continue
        for w in res.notes:
            log.add("gam", subset, w, level="warning")
        for w in res.warnings:
            log.add("gam", subset, f"R warning: {w}", level="warning")
        srange = res.score_range[1] - res.score_range[0]
        r_vals = sorted(set(float(r) for r in g.r_values) | set(float(r) for r in data["r"].unique()))
        opt_surf = surface(res.fit, w_grid, r_vals)
        res.optimum = optimal_plw_table(
            opt_surf, srange, flat_fraction=g.flat_fraction, tolerance=g.tolerance, r_range=res.r_range
        )
        res.optimum["in_data"] = res.optimum["r_g"].isin(set(float(r) for r in data["r"].unique()))
        lo, hi = res.r_range
        r_cont = np.geomspace(lo, hi, 60) if lo > 0 else np.linspace(lo, hi, 60)
        res.surface = surface(res.fit, np.linspace(0.0, 1.0, 101), r_cont)
        fitted = usable[usable["benchmark"].isin(set(data["b"])) & usable["dataset"].isin(set(data["dataset"]))]
        res.provenance = provenance(fitted.assign(run_dir=fitted["run_id"].map(run_dirs or {})))
        try:
            path = save_bundle(res, Path(g.rds_dir) / f"gam_{subset}.rds", scaling=g.scaling)
            res.rds_path = str(path)
        except Exception as e:
            log.add("gam", subset, f"could not save the fitted GAM: {e}", level="warning")
        out[subset] = res
    return out


def run_analysis(
    acfg, *, runs_dir: Optional[Path] = None, out_dir: Optional[Path] = None, figures: bool = True, report: bool = True
) -> AnalysisOutput:
    """The whole stage. ``acfg`` is the (validated) ``analysis`` config node or AnalysisConfig."""
    runs_dir = Path(runs_dir or acfg.runs_dir)
    out_dir = Path(out_dir or acfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: Dict[str, List[Path]] = {}

    tidy, log = collect_runs(runs_dir, p=acfg.power)
    files["collected"] = write_collected(tidy, out_dir)
    scores, mech, l2 = select_primary(tidy, dict(acfg.primary_metrics), acfg.mechanism_prefix)
    log.extend(l2)
    main = scores[scores["regularizer"] == "none"]
    usable, status, l3 = check_datasets(main, incomplete=acfg.incomplete, min_plw_levels=acfg.glmm.min_plw_levels)
    log.extend(l3)
    scaled = minmax_scale(usable) if len(usable) else usable.assign(scaled=[])
    agg = (
        run_aggregates(scaled)
        if len(scaled)
        else pd.DataFrame(columns=["dataset", "model", "plw", "w_p", "group", "simple", "relative", "n_benchmarks"])
    )
    scaled.to_csv(out_dir / "scores.csv", index=False)
    agg.to_csv(out_dir / "aggregates.csv", index=False)
    files["tables"] = [out_dir / "scores.csv", out_dir / "aggregates.csv"]

    no_r = r_unavailable_reason() if len(usable) else None
    if no_r is not None:  # aggregates, figures and report still come out
        log.add("R", "analysis", f"R is unavailable, no GLMM and no GAM: {no_r}")
        glmm = {ds: skipped(ds, [f"R unavailable: {no_r}"]) for ds in status}
        gam = {}
    else:
        glmm = _glmm_stage(usable, status, acfg, log) if len(usable) or status else {}
        run_dirs = dict(tidy[["run_id", "run_dir"]].drop_duplicates().itertuples(index=False)) if len(tidy) else {}
        gam = _gam_stage(usable, acfg, log, run_dirs) if len(usable) else {}

    # Regularizers: datasets with regularised runs, scaled over all of their runs.
    reg_ds = sorted(scores.loc[scores["regularizer"] != "none", "dataset"].unique())
    reg_scores = scores[scores["dataset"].isin(reg_ds)]
    keep = [
        reg_scores[
            (reg_scores["dataset"] == d)
            & reg_scores["benchmark"].isin(status[d].benchmarks if d in status else reg_scores["benchmark"].unique())
        ]
        for d in reg_ds
    ]
    reg_scores = pd.concat(keep, ignore_index=True) if keep else scores.iloc[0:0]
    reg_table = regularizer_table(reg_scores) if len(reg_scores) else pd.DataFrame()
    reg_agg = run_aggregates(minmax_scale(reg_scores)) if len(reg_scores) else pd.DataFrame()

    _write_tables(out_dir, glmm, gam, reg_table, log, files)
    outp = AnalysisOutput(
        out_dir,
        runs_dir,
        tidy,
        scores,
        mech,
        usable,
        agg,
        status,
        glmm,
        gam,
        reg_table,
        reg_agg,
        log,
        files,
        config=_plain(acfg),
    )
    if figures:
        _figures(outp, acfg)
    if report:
        files["report"] = [write_report(outp, acfg)]
    _write_json(outp)
    _log_to_trackers(outp, acfg)
    return outp


def analysis_trackers(acfg, tidy: pd.DataFrame) -> List[str]:
    """``analysis.report_to``, or (null) the trackers the analysed runs were trained with."""
    chosen = acfg.report_to
    if chosen is not None:
        return [str(x) for x in chosen]
    names: List[str] = []
    for run_dir in sorted(set(tidy["run_dir"].astype(str))) if len(tidy) else []:
        try:
            run_cfg = OmegaConf.load(Path(run_dir) / "config.yaml")
        except Exception:  # no or unreadable config: no trackers from that run
            continue
        names += [str(x) for x in (OmegaConf.select(run_cfg, "train.report_to", default=None) or [])]
    return list(dict.fromkeys(names))


def analysis_tracker_values(o: AnalysisOutput) -> Dict[str, Any]:
    """What the analysis logs to a tracker: the GLMM tests and critical PLW per dataset, the GAM optima
    per R_g (numbers), and the report (text)."""
    v: Dict[str, Any] = {}
    for ds, r in o.glmm.items():
        if r.status != "fitted":
            continue
        v[f"glmm/{ds}/p_value"] = float(r.p_value)
        v[f"glmm/{ds}/p_value_calibrated"] = float(r.p_value_calibrated)
        if r.critical is not None and r.critical.plw is not None:
            v[f"glmm/{ds}/critical_plw"] = float(r.critical.plw)
    for subset, g in o.gam.items():
        if g.optimum is None:
            continue
        for row in g.optimum.itertuples(index=False):
            v[f"gam/{subset}/optimal_plw/R_g={row.r_g:g}"] = float(row.optimal_plw)
    v = {k: x for k, x in v.items() if isinstance(x, float) and np.isfinite(x)}
    for p in o.files.get("report") or []:
        v["report"] = Path(p).read_text(encoding="utf-8")
    return v


def _log_to_trackers(o: AnalysisOutput, acfg) -> None:
    names = analysis_trackers(acfg, o.tidy)
    if not names:
        return
    try:
        log_run_results(names, o.out_dir, "analysis", analysis_tracker_values(o), 0)
    except Exception as e:  # the tables are on disk whatever the tracker does
        o.issues.add("trackers", "analysis", f"not logged to {names}: {type(e).__name__}: {e}", level="warning")


def _plain(acfg) -> Dict[str, Any]:
    try:
        if OmegaConf.is_config(acfg):
            return OmegaConf.to_container(acfg, resolve=True)
        return OmegaConf.to_container(OmegaConf.structured(acfg), resolve=True)
    except Exception:
        return {}


def _write_tables(out_dir: Path, glmm, gam, reg_table, log: IssueLog, files) -> None:
    t = []
    rows = [r.table_row() for r in glmm.values()]
    if rows:
        pd.DataFrame(rows).to_csv(out_dir / "glmm_table3.csv", index=False)
        t.append(out_dir / "glmm_table3.csv")
        coefs = [r.coef.assign(dataset=ds) for ds, r in glmm.items() if r.coef is not None]
        if coefs:
            pd.concat(coefs).to_csv(out_dir / "glmm_coefficients.csv", index=False)
            t.append(out_dir / "glmm_coefficients.csv")
        res_rows = [residual_tests_row(r) for r in glmm.values() if r.residuals]
        if res_rows:
            pd.DataFrame(res_rows).to_csv(out_dir / "glmm_residual_checks.csv", index=False)
            t.append(out_dir / "glmm_residual_checks.csv")
    opt = [g.optimum.assign(subset=s) for s, g in gam.items() if g.optimum is not None]
    if opt:
        pd.concat(opt).to_csv(out_dir / "gam_optimal_plw.csv", index=False)
        t.append(out_dir / "gam_optimal_plw.csv")
    if reg_table is not None and len(reg_table):
        reg_table.to_csv(out_dir / "regularizers_table4.csv", index=False)
        t.append(out_dir / "regularizers_table4.csv")
    pd.DataFrame([vars(i) for i in log], columns=["scope", "where", "message", "level"]).to_csv(
        out_dir / "issues.csv", index=False
    )
    t.append(out_dir / "issues.csv")
    files["tables"] = files.get("tables", []) + t


def _figures(o: AnalysisOutput, acfg) -> None:
    fig_dir = o.out_dir / "figures"
    kw = dict(formats=tuple(acfg.figure_formats), dpi=int(acfg.dpi))
    curves = {
        ds: (r.estimate("intercept"), r.estimate("w_p"), r.estimate("w_p2"))
        for ds, r in o.glmm.items()
        if r.status == "fitted" and acfg.glmm.raw_poly
    }
    jobs = {
        "fig1_aggregates": lambda: F.fig_aggregates(o.aggregates, fig_dir, curves, p=acfg.power, **kw),
        "fig1_group_aggregates": lambda: F.fig_group_aggregates(o.aggregates, fig_dir, p=acfg.power, **kw),
        "fig2_mechanisms": lambda: F.fig_mechanisms(o.mechanisms, fig_dir, p=acfg.power, **kw),
        "fig5_benchmarks": lambda: F.fig_benchmarks(o.usable, fig_dir, p=acfg.power, **kw),
        "fig8_regularizers": lambda: F.fig_regularizers(o.regularizer_aggregates, fig_dir, **kw),
        "fig10_gam_contours": lambda: F.fig_gam_contours(
            {s: g.surface for s, g in o.gam.items()},
            {s: g.optimum for s, g in o.gam.items() if g.optimum is not None},
            fig_dir,
            **kw,
        ),
        "fig_glmm_residuals": lambda: F.fig_glmm_residuals(o.glmm, fig_dir, **kw),
    }
    for name, job in jobs.items():
        try:
            paths = job()
        except Exception as e:  # a figure never stops the report
            o.issues.add("figure", name, f"not drawn: {type(e).__name__}: {e}", level="warning")
            paths = []
        if paths:
            o.files[name] = paths


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.ndarray):
        return None  # arrays (residuals) stay out of the summary
    if isinstance(x, Path):
        return str(x)
    return x


def _write_json(o: AnalysisOutput) -> None:
    summary = {
        "runs_dir": str(o.runs_dir),
        "n_runs": int(o.tidy["run_id"].nunique()) if len(o.tidy) else 0,
        "datasets": {ds: vars(st) for ds, st in o.status.items()},
        "glmm": {
            ds: {
                **r.table_row(),
                "notes": r.notes,
                "warnings": r.warnings,
                "errors": r.errors,
                "residual_checks": residual_tests_row(r) if r.residuals else None,
                "critical": r.critical.as_dict() if r.critical else None,
            }
            for ds, r in o.glmm.items()
        },
        "gam": {
            s: {
                "status": g.status,
                "errors": g.errors,
                "warnings": g.warnings,
                "datasets": g.datasets,
                "r_range": list(g.r_range),
                "rds": g.rds_path,
                "summary": {k: v for k, v in (g.summary or {}).items() if not isinstance(v, pd.DataFrame)},
                "optimum": g.optimum.to_dict(orient="records") if g.optimum is not None else None,
            }
            for s, g in o.gam.items()
        },
        "issues": [vars(i) for i in o.issues],
        "files": {k: [str(p) for p in v] for k, v in o.files.items()},
    }
    (o.out_dir / "results.json").write_text(json.dumps(_jsonable(summary), indent=1))
