"""Benchmark scores per run, min-max scaling, simple and relative aggregates (docs/study.md section 6),
and the per-dataset checks that decide what can be analysed. Pure functions on DataFrames.

- Simple aggregate: unweighted mean of a run's benchmark scores.
- Relative aggregate: each benchmark's scores min-max scaled within the training dataset (across
  PLW and PTLM, and seeds), then averaged per run.
Both are computed over all benchmarks and per group (mc, short_gen, long_gen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pipeline.analysis.collect import FACTOR_COLUMNS
from pipeline.analysis.common import GROUPS, IssueLog

SCORE_COLUMNS = FACTOR_COLUMNS + ["benchmark", "group", "metric", "value"]


def squeeze(y, n: Optional[int] = None):
    """Map [0, 1] into (0, 1): (y (n - 1) + 0.5) / n (Smithson & Verkuilen 2006); n = len(y)."""
    y = np.asarray(y, dtype=float)
    n = len(y) if n is None else int(n)
    if n < 1:
        return y
    return (y * (n - 1) + 0.5) / n


def select_primary(
    tidy: pd.DataFrame, primary_metrics: Dict[str, str], mechanism_prefix: str = "mech_"
) -> Tuple[pd.DataFrame, pd.DataFrame, IssueLog]:
    """One score per run x benchmark: the benchmark's primary metric.

    The metric is ``primary_metrics[benchmark]`` when given and reported, else the benchmark's
    only metric.
    A benchmark reporting several metrics and no configured choice is left out (reported).
    Benchmarks named ``<mechanism_prefix>*`` are mechanism metrics: returned separately, all metrics.
    Returns (scores, mechanisms, issues)."""
    log = IssueLog()
    is_mech = tidy["benchmark"].str.startswith(mechanism_prefix)
    mech = tidy[is_mech].copy()
    bench = tidy[~is_mech]
    keep = []
    substituted: List[str] = []
    for b, g in bench.groupby("benchmark", sort=True):
        metrics = sorted(g["metric"].unique())
        want = primary_metrics.get(b)
        if want is not None and want in metrics:
            chosen = want
        elif want is not None and len(metrics) == 1:
            chosen = metrics[0]
            substituted.append(f"{b} ({want!r} -> {chosen!r})")
        elif want is not None:
            log.add(
                "benchmark",
                b,
                f"configured primary metric {want!r} is not among the reported metrics {metrics}; benchmark left out",
            )
            continue
        elif len(metrics) == 1:
            chosen = metrics[0]
        else:
            log.add(
                "benchmark",
                b,
                f"reports several metrics {metrics} and none is configured "
                f"(analysis.primary_metrics.{b}); benchmark left out",
            )
            continue
        keep.append(g[g["metric"] == chosen])
    if substituted:
        log.add(
            "benchmark",
            ", ".join(s.split(" ")[0] for s in substituted),
            "configured primary metric not reported, the benchmark's only metric is used: " + ", ".join(substituted),
            level="warning",
        )
    scores = pd.concat(keep, ignore_index=True) if keep else bench.iloc[0:0]
    return scores[SCORE_COLUMNS].reset_index(drop=True), mech.reset_index(drop=True), log


def minmax_scale(
    scores: pd.DataFrame, by: Sequence[str] = ("dataset", "benchmark"), column: str = "value", out: str = "scaled"
) -> pd.DataFrame:
    """Add ``out`` = (value - min) / (max - min) within each ``by`` group (NaN when constant)."""
    df = scores.copy()
    g = df.groupby(list(by))[column]
    lo, hi = g.transform("min"), g.transform("max")
    rng = hi - lo
    df[out] = np.where(rng > 0, (df[column] - lo) / rng.where(rng > 0, 1.0), np.nan)
    return df


def run_aggregates(scaled: pd.DataFrame) -> pd.DataFrame:
    """Per run and group (all, mc, short_gen, long_gen): simple (mean of values) and relative
    (mean of min-max scaled values) aggregates, with the number of benchmarks averaged."""
    rows = []
    keys = FACTOR_COLUMNS
    for key, g in scaled.groupby(keys, sort=True, dropna=False):
        base = dict(zip(keys, key))
        for grp in ("all",) + GROUPS:
            sub = g if grp == "all" else g[g["group"] == grp]
            if sub.empty:
                continue
            rel = sub["scaled"].dropna()
            rows.append(
                {
                    **base,
                    "group": grp,
                    "simple": float(sub["value"].mean()),
                    "relative": float(rel.mean()) if len(rel) else np.nan,
                    "n_benchmarks": int(sub["benchmark"].nunique()),
                }
            )
    return pd.DataFrame(rows, columns=keys + ["group", "simple", "relative", "n_benchmarks"])


@dataclass
class DatasetStatus:
    dataset: str
    analysable: bool = True  # aggregates, GAM
    glmm: bool = True  # enough PLW levels for the quadratic
    benchmarks: List[str] = field(default_factory=list)  # used in the analysis
    dropped_benchmarks: Dict[str, str] = field(default_factory=dict)  # name -> reason
    reasons: List[str] = field(default_factory=list)  # why (part of) the analysis was skipped
    n_runs: int = 0
    plw_levels: List[float] = field(default_factory=list)
    models: List[str] = field(default_factory=list)
    r_g: float = float("nan")


def check_datasets(
    scores: pd.DataFrame, incomplete: str = "skip", min_plw_levels: int = 3
) -> Tuple[pd.DataFrame, Dict[str, DatasetStatus], IssueLog]:
    """Decide per training dataset what can be analysed; returns the usable scores (unusable
    datasets and benchmarks removed), a status per dataset, and the issues (one clear message per
    problem and dataset).

    - missing benchmarks (some runs lack benchmarks others have): ``incomplete='skip'`` leaves the
      dataset out; ``'intersect'`` keeps only the benchmarks every run has;
    - constant scores of a benchmark (min-max scaling undefined): that benchmark is left out of the
      dataset's relative aggregate and GLMM; all constant: the dataset is left out;
    - fewer than ``min_plw_levels`` PLW levels: aggregates only, no GLMM (one level: no PLW effect
      can be estimated at all).
    """
    if incomplete not in ("skip", "intersect"):
        raise ValueError(f"incomplete must be 'skip' or 'intersect', got {incomplete!r}")
    log = IssueLog()
    status: Dict[str, DatasetStatus] = {}
    keep = []
    for ds, g in scores.groupby("dataset", sort=True):
        st = DatasetStatus(
            ds,
            n_runs=g["run_id"].nunique(),
            plw_levels=sorted(g["plw"].unique().tolist()),
            models=sorted(g["model"].unique().tolist()),
            r_g=float(g["r_g"].iloc[0]),
        )
        status[ds] = st
        n_levels = len(st.plw_levels)
        if n_levels < min_plw_levels:
            what = (
                f"a single PLW level ({st.plw_levels[0]:g}): no PLW effect can be estimated"
                if n_levels == 1
                else f"only {n_levels} PLW levels ({', '.join(f'{x:g}' for x in st.plw_levels)}): "
                f"a quadratic in w_p needs at least {min_plw_levels}"
            )
            msg = f"{what}; no GLMM for this dataset"
            log.add("dataset", ds, msg)
            st.glmm = False
            st.reasons.append(msg)
        all_b = sorted(g["benchmark"].unique())
        per_run = g.groupby("run_id")["benchmark"].apply(set)
        lacking = {r: sorted(set(all_b) - s) for r, s in per_run.items() if set(all_b) - s}
        if lacking:
            detail = "; ".join(f"run {r} lacks {b}" for r, b in list(lacking.items())[:5])
            more = f" (and {len(lacking) - 5} more runs)" if len(lacking) > 5 else ""
            if incomplete == "skip":
                msg = (
                    f"missing benchmarks: {detail}{more}. Dataset not analysed "
                    f"(set analysis.incomplete=intersect to analyse the benchmarks every run has)"
                )
                log.add("dataset", ds, msg)
                st.analysable = st.glmm = False
                st.reasons.append(msg)
                continue
            common = sorted(set.intersection(*per_run.tolist()))
            for b in sorted(set(all_b) - set(common)):
                st.dropped_benchmarks[b] = "missing in some runs"
            log.add(
                "dataset",
                ds,
                f"missing benchmarks: {detail}{more}. Analysed on the {len(common)} benchmarks every run has",
                level="warning",
            )
            g = g[g["benchmark"].isin(common)]
            if g.empty:
                msg = "no benchmark is reported by every run; dataset not analysed"
                log.add("dataset", ds, msg)
                st.analysable = st.glmm = False
                st.reasons.append(msg)
                continue
        rng = g.groupby("benchmark")["value"].agg(lambda v: v.max() - v.min())
        const = sorted(rng[rng <= 0].index)
        if const and len(const) == len(rng):
            msg = (
                f"constant scores: every benchmark has the same score in every run "
                f"({', '.join(const)}); nothing to scale or fit, dataset not analysed"
            )
            log.add("dataset", ds, msg)
            st.analysable = st.glmm = False
            st.reasons.append(msg)
            continue
        for b in const:
            st.dropped_benchmarks[b] = "constant scores (min-max scaling undefined)"
        if const:
            log.add(
                "dataset",
                ds,
                f"constant scores on {const}: left out of the relative aggregate and the GLMM",
                level="warning",
            )
            g = g[~g["benchmark"].isin(const)]
        st.benchmarks = sorted(g["benchmark"].unique())
        keep.append(g)
    usable = pd.concat(keep, ignore_index=True) if keep else scores.iloc[0:0]
    return usable, status, log


def best_by_dataset(agg: pd.DataFrame, measure: str = "relative", group: str = "all") -> pd.DataFrame:
    """Best PLW per dataset and model by an aggregate (mean over seeds first)."""
    sub = agg[agg["group"] == group]
    m = sub.groupby(["dataset", "model", "plw"], as_index=False)[measure].mean()
    idx = m.groupby(["dataset", "model"])[measure].idxmax()
    return m.loc[idx.dropna().astype(int)].reset_index(drop=True)


def regularizer_type(label: str) -> str:
    """'weight_decay=0.1' -> 'weight_decay' (the label up to '=', ':' or '@')."""
    for sep in ("=", ":", "@"):
        label = label.split(sep)[0]
    return label.strip()


def regularizer_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Table 4: for every dataset with regularised runs, per PTLM and regularizer type, the best
    simple and relative aggregate (scaled within the dataset over all its runs, regularised ones
    included), beside PLW alone: the best fractional PLW (0 < PLW < 1) and PLW 0 / 1 without a
    regularizer."""
    rows = []
    for ds, g in scores.groupby("dataset", sort=True):
        if (g["regularizer"] == "none").all():
            continue
        agg = run_aggregates(minmax_scale(g))
        agg = agg[agg["group"] == "all"]
        for model, m in agg.groupby("model", sort=True):
            none = m[m["regularizer"] == "none"]
            cands = {
                f"{regularizer_type(r)}": m[m["regularizer"].map(regularizer_type) == regularizer_type(r)]
                for r in sorted(m.loc[m["regularizer"] != "none", "regularizer"].unique())
            }
            cands["PLW 0 (masking)"] = none[none["plw"] == 0]
            cands["PLW 1 (full loss)"] = none[none["plw"] == 1]
            cands["PLW fractional (ours)"] = none[(none["plw"] > 0) & (none["plw"] < 1)]
            for name, c in cands.items():
                if c.empty:
                    continue
                best = c.loc[c["relative"].idxmax()]
                rows.append(
                    {
                        "dataset": ds,
                        "model": model,
                        "regularization": name,
                        "simple": float(c["simple"].max()),
                        "relative": float(c["relative"].max()),
                        "best_run": best["run_id"],
                        "best_label": best["regularizer"],
                        "best_plw": float(best["plw"]),
                        "n_runs": int(c["run_id"].nunique()),
                    }
                )
    return pd.DataFrame(
        rows,
        columns=[
            "dataset",
            "model",
            "regularization",
            "simple",
            "relative",
            "best_run",
            "best_label",
            "best_plw",
            "n_runs",
        ],
    )
