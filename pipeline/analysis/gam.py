"""GAM across datasets for the optimal PLW per R_g (paper appendix D; docs/study.md section 6).

``score ~ te(w, r, k = 3) + factor(b)`` (R mgcv), w = untransformed PLW, r = dataset R_g,
b = benchmark; fitted separately on all benchmarks, the MC benchmarks, and the generation
benchmarks (TruthfulQA-Gen, AlpacaEval, PandaLM by default). The optimal PLW at a given R_g is the
argmax over w of the fitted te(w, r) term (the benchmark term does not depend on w or r).

Fitted GAMs are saved with R's ``saveRDS`` as a bundle ``list(gam = <mgcv fit>, subset,
score_range, r_range, w_range, datasets, benchmarks, scaling, created, mgcv_version)``;
``suggest`` reads it back (see :func:`load_bundle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.analysis import rbridge as rb

SUBSETS = ("all", "mc", "gen")


def prepare_gam_data(
    scores: pd.DataFrame,
    subset: str = "all",
    gen_benchmarks: Sequence[str] = ("truthfulqa_gen", "alpaca_eval", "pandalm"),
    scaling: str = "across_datasets",
) -> pd.DataFrame:
    """Scores of the main runs of all datasets -> GAM data (score, w, r, b, m, dataset).

    subset: 'all' (every benchmark), 'mc' (group mc), 'gen' (``gen_benchmarks``).
    scaling: 'across_datasets' (min-max per benchmark over all datasets: keeps differences in
    effect size between datasets), 'within_dataset' (per dataset and benchmark, as the relative
    aggregate), or 'none' (raw values)."""
    if subset == "all":
        df = scores
    elif subset == "mc":
        df = scores[scores["group"] == "mc"]
    elif subset == "gen":
        df = scores[scores["benchmark"].isin(list(gen_benchmarks))]
    else:
        raise ValueError(f"unknown GAM subset {subset!r} (expected one of {SUBSETS})")
    df = df.copy()
    if scaling == "none":
        df["score"] = df["value"].astype(float)
    elif scaling in ("across_datasets", "within_dataset"):
        by = ["benchmark"] if scaling == "across_datasets" else ["dataset", "benchmark"]
        g = df.groupby(by)["value"]
        lo, hi = g.transform("min"), g.transform("max")
        rng = (hi - lo).where(hi > lo)
        df["score"] = (df["value"] - lo) / rng
        df = df[df["score"].notna()]
    else:
        raise ValueError(f"unknown GAM scaling {scaling!r}")
    out = pd.DataFrame(
        {
            "score": df["score"].astype(float),
            "w": df["plw"].astype(float),
            "r": df["r_g"].astype(float),
            "b": df["benchmark"].astype(str),
            "m": df["model"].astype(str),
            "dataset": df["dataset"].astype(str),
        }
    )
    return out.reset_index(drop=True)


def gam_data_problems(data: pd.DataFrame, k: int = 3) -> List[str]:
    """Why a te(w, r, k) GAM cannot be fitted on ``data`` (empty list: it can)."""
    probs = []
    if data.empty:
        return ["no scores in this subset"]
    nr, nw = data["r"].nunique(), data["w"].nunique()
    if nr < k:
        probs.append(
            f"only {nr} distinct R_g value(s) ({sorted(data['r'].unique().tolist())}); "
            f"te(w, r, k = {k}) needs at least {k} datasets with different R_g"
        )
    if nw < k:
        probs.append(f"only {nw} distinct PLW value(s); te(w, r, k = {k}) needs at least {k}")
    if data["score"].nunique() < 2:
        probs.append("constant scores")
    n_coef = k * k + data["b"].nunique()
    if len(data) <= n_coef:
        probs.append(f"{len(data)} observations for about {n_coef} coefficients")
    return probs


@dataclass
class GamResult:
    subset: str
    status: str = "fitted"  # fitted | failed | skipped
    n: int = 0
    datasets: List[str] = field(default_factory=list)
    benchmarks: List[str] = field(default_factory=list)
    r_range: tuple = (float("nan"), float("nan"))
    score_range: tuple = (float("nan"), float("nan"))
    summary: Dict[str, Any] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)  # R's warnings
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # what the fit changed (e.g. a dropped term)
    surface: Optional[pd.DataFrame] = None  # w, r, term, term_se, prediction (contour grid)
    optimum: Optional[pd.DataFrame] = None  # Table 5 rows
    rds_path: Optional[str] = None
    fit: Any = None  # the R object (not serialised)
    # collect.provenance of the fitted rows: models, test-double-judged benchmarks, scratch models
    provenance: Dict[str, List[str]] = field(default_factory=dict)


def fit_gam(
    data: pd.DataFrame,
    subset: str = "all",
    *,
    formula: str = "score ~ te(w, r, k = 3) + factor(b)",
    method: str = "GCV.Cp",
    k: int = 3,
) -> GamResult:
    res = GamResult(
        subset=subset,
        n=len(data),
        datasets=sorted(data["dataset"].unique().tolist()),
        benchmarks=sorted(data["b"].unique().tolist()),
    )
    probs = gam_data_problems(data, k=k)
    if probs:
        res.status = "skipped"
        res.errors = probs
        return res
    res.r_range = (float(data["r"].min()), float(data["r"].max()))
    res.score_range = (float(data["score"].min()), float(data["score"].max()))
    dropped = []
    if "factor(b)" in formula and data["b"].nunique() < 2:
        # a one-level factor has no contrasts (mgcv fails): the term is a constant, drop it
        formula = formula.replace("+ factor(b)", "").replace("factor(b) +", "")
        dropped.append(f"one benchmark only ({data['b'].iloc[0]}): the factor(b) term was dropped")
    cols = [c for c in ("score", "w", "r", "b", "m") if c in data.columns]
    cap = rb.r_call("plw_gam_fit", data[cols], formula=formula, method=method)
    names = list(cap.names)
    fit = cap[names.index("value")]
    res.notes = dropped
    res.warnings = rb.as_list(rb.to_py(cap[names.index("warnings")]))
    err = rb.to_py(cap[names.index("error")])
    if err is not None:
        res.status = "failed"
        res.errors.append(rb.scalar(err))
        return res
    res.fit = fit
    res.summary = rb.to_py(rb.r_call("plw_gam_summary", fit))
    return res


def surface(fit, w: Sequence[float], r: Sequence[float]) -> pd.DataFrame:
    """The fitted te(w, r) term (and full prediction at the reference benchmark) on a grid."""
    return rb.to_py(rb.r_call("plw_gam_surface", fit, w=list(map(float, w)), r=list(map(float, r))))


def optimal_plw_table(
    surf: pd.DataFrame,
    score_range: float,
    *,
    flat_fraction: float = 0.05,
    tolerance: float = 0.01,
    r_range: Optional[Sequence[float]] = None,
) -> pd.DataFrame:
    """Per R_g on the surface grid: the PLW maximising the te(w, r) term (Table 5), the predicted
    gain over PLW 0, whether the curve is flat (max - min < flat_fraction x score range, the
    paper's asterisk), and the near-optimal PLW range: the interval around the optimum where the
    prediction is within tolerance x score range of the maximum. Pure function."""
    rows = []
    for r, g in surf.groupby("r", sort=True):
        g = g.sort_values("w")
        w = g["w"].to_numpy(float)
        t = g["term"].to_numpy(float)
        i = int(np.nanargmax(t))
        tmax, tmin = float(t[i]), float(np.nanmin(t))
        tol = tolerance * score_range + 1e-12 * max(1.0, abs(tmax))  # float round-off at the edge
        lo = hi = i
        while lo > 0 and t[lo - 1] >= tmax - tol:
            lo -= 1
        while hi < len(t) - 1 and t[hi + 1] >= tmax - tol:
            hi += 1
        at0 = float(t[np.argmin(np.abs(w - 0.0))])
        extrap = bool(r_range is not None and not (r_range[0] - 1e-12 <= r <= r_range[1] + 1e-12))
        rows.append(
            {
                "r_g": float(r),
                "optimal_plw": float(w[i]),
                "near_opt_low": float(w[lo]),
                "near_opt_high": float(w[hi]),
                "range_over_plw": tmax - tmin,
                "gain_over_plw0": tmax - at0,
                "flat": bool((tmax - tmin) < flat_fraction * score_range),
                "extrapolated": extrap,
            }
        )
    return pd.DataFrame(rows)


def save_bundle(res: GamResult, path: Path, scaling: str) -> Path:
    """Write the fitted GAM and its facts with R's saveRDS (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    b = rb.r_call(
        "plw_gam_bundle",
        res.fit,
        subset=res.subset,
        score_min=res.score_range[0],
        score_max=res.score_range[1],
        r_min=res.r_range[0],
        r_max=res.r_range[1],
        w_min=0.0,
        w_max=1.0,
        datasets=list(res.datasets) or [""],
        benchmarks=list(res.benchmarks) or [""],
        scaling=scaling,
        models=list(res.provenance.get("models", [])) or [""],
        test_double_benchmarks=list(res.provenance.get("test_double_benchmarks", [])) or [""],
        scratch_models=list(res.provenance.get("scratch_models", [])) or [""],
    )
    import rpy2.robjects as ro

    ro.r["saveRDS"](b, file=str(path))
    return path


def load_bundle(path: Path):
    """Read a GAM bundle written by :func:`save_bundle`; returns (R fit object, facts dict)."""
    rb.r_env()  # R started (first: it keeps R's LD_LIBRARY_PATH out of child processes), mgcv loaded
    import rpy2.robjects as ro

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no fitted GAM at {path}: run `make regress` first (it writes "
            f"the GAMs), or point analysis.suggest.gam_file at one"
        )
    obj = ro.r["readRDS"](str(path))
    names = list(obj.names)
    if "gam" not in names:
        raise ValueError(f"{path} is not a GAM bundle written by the analysis stage")
    facts = {n: rb.to_py(obj[names.index(n)]) for n in names if n != "gam"}
    facts = {k: (v if not isinstance(v, list) or len(v) != 1 else v[0]) for k, v in facts.items()}
    return obj[names.index("gam")], facts
