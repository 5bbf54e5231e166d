"""Per-dataset beta GLMM (docs/study.md section 6; paper 5.2), fitted in R (glmmTMB) through rpy2.

Model: ``score ~ poly(w_p, 2, raw = TRUE) + (0 + poly(w_p, 2, raw = TRUE) | benchmark) + (1 | model)``
on the dataset's min-max scaled scores squeezed into (0, 1). The R side is ``R/glmm.R``;
this module prepares the data, calls it, retries with a second optimizer when the first reports a
convergence problem (keeping the fit with the higher log-likelihood), adds the small-sample-calibrated
test of the w_p terms beside the paper's Wald chi-square, and turns the result into a :class:`GlmmResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.analysis import rbridge as rb
from pipeline.analysis.aggregates import minmax_scale, squeeze
from pipeline.analysis.critical import CriticalPLW, critical_plw
from pipeline.analysis.common import P_EXP

GLMM_COLUMNS = ["score", "w_p", "benchmark", "model"]


def prepare_glmm_data(scores: pd.DataFrame, do_squeeze: bool = True) -> pd.DataFrame:
    """One dataset's scores -> the GLMM's data: min-max scaled per benchmark (within the dataset,
    across PLW, PTLM and seeds), then squeezed into (0, 1) with (y (n - 1) + 0.5) / n, n = rows."""
    if scores["dataset"].nunique() > 1:
        raise ValueError("prepare_glmm_data takes one dataset at a time")
    df = minmax_scale(scores, by=("benchmark",))
    df = df[df["scaled"].notna()].copy()
    df["score"] = squeeze(df["scaled"].to_numpy(), len(df)) if do_squeeze else df["scaled"]
    cols = GLMM_COLUMNS + [c for c in ("plw", "run_id", "value", "scaled") if c in df.columns]
    return df[cols].reset_index(drop=True)


@dataclass
class GlmmResult:
    dataset: str
    status: str = "fitted"  # fitted | failed | skipped
    formula: str = ""
    optimizer: str = "nlminb"
    n_obs: int = 0
    benchmarks: List[str] = field(default_factory=list)
    models: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # model simplifications, optimizer retries
    coef: Optional[pd.DataFrame] = None  # term, estimate, std_error, z, p, ci_low, ci_high
    chisq: float = float("nan")  # Wald chi-square of the w_p terms (car::Anova)
    df: float = float("nan")
    p_value: float = float("nan")  # the paper's p-value: chisq against chi-square(df)
    # small-sample-calibrated test of the same terms: F = chisq / df against F(df, f_df2), f_df2 from
    # the number of benchmarks (calibrated_test); the report's "significant" rests on this one
    f_stat: float = float("nan")
    f_df2: float = float("nan")
    p_value_calibrated: float = float("nan")
    re_sd: Optional[pd.DataFrame] = None
    re_cor: Optional[pd.DataFrame] = None
    vcov: Optional[pd.DataFrame] = None
    precision_phi: float = float("nan")
    loglik: float = float("nan")
    aic: float = float("nan")
    pd_hessian: bool = False
    optimizer_convergence: Optional[int] = None
    optimizer_message: str = ""
    warnings: List[str] = field(default_factory=list)  # R warnings, captured (fit, summary, residuals)
    messages: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    residuals: Optional[Dict[str, Any]] = None  # simulation-based residual checks
    critical: Optional[CriticalPLW] = None
    attempts: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return (
            self.status == "fitted"
            and self.pd_hessian
            and self.optimizer_convergence == 0
            and not any("convergence" in w.lower() or "nan function" in w.lower() for w in self.warnings)
        )

    def estimate(self, term: str) -> float:
        if self.coef is None or term not in set(self.coef["term"]):
            return float("nan")
        return float(self.coef.set_index("term").loc[term, "estimate"])

    def table_row(self) -> Dict[str, Any]:
        c = self.coef.set_index("term") if self.coef is not None else None

        def get(t, k):
            return float(c.loc[t, k]) if c is not None and t in c.index else float("nan")

        cr = self.critical
        return {
            "dataset": self.dataset,
            "status": self.status,
            "n_obs": self.n_obs,
            "n_benchmarks": len(self.benchmarks),
            "n_models": len(self.models),
            "p_value": self.p_value,
            "chisq": self.chisq,
            "df": self.df,
            "p_value_calibrated": self.p_value_calibrated,
            "f_stat": self.f_stat,
            "f_df1": self.df,
            "f_df2": self.f_df2,
            "b_wp": get("w_p", "estimate"),
            "b_wp_se": get("w_p", "std_error"),
            "a_wp2": get("w_p2", "estimate"),
            "a_wp2_se": get("w_p2", "std_error"),
            "intercept": get("intercept", "estimate"),
            "intercept_se": get("intercept", "std_error"),
            "converged": self.converged,
            "pd_hessian": self.pd_hessian,
            "optimizer": self.optimizer,
            "loglik": self.loglik,
            "optimizer_attempts": attempts_text(self.attempts),
            "n_warnings": len(self.warnings),
            "wp_star": cr.wp_star if cr else None,
            "critical_plw": cr.plw if cr else None,
            "critical_note": cr.message if cr else "",
            "formula": self.formula,
        }


def _clean(r: Dict[str, Any]) -> bool:
    s = r.get("summary") or {}
    return (
        r.get("error") is None
        and not rb.as_list(r.get("fit_warnings"))
        and bool(rb.scalar(s.get("pd_hessian"), False))
        and rb.scalar(s.get("optimizer_convergence"), 1) == 0
    )


def _loglik(r: Dict[str, Any]) -> float:
    s = r.get("summary") or {}
    v = rb.scalar(s.get("loglik_optimum"), None)  # defined also without a positive-definite Hessian
    try:
        return float(v) if v is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


# Log-likelihoods closer than this count as the same optimum (then a clean fit is preferred).
LOGLIK_TIE = 1e-4


def choose_fit(attempts: List[Tuple[str, Dict[str, Any]]]) -> Tuple[int, str]:
    """Index of the attempt to report, and why. Among the attempts with a summary and a finite
    log-likelihood, the one with the highest log-likelihood (the maximum-likelihood fit, whichever
    optimizer found it); within ``LOGLIK_TIE`` of it a clean attempt is preferred, then the earlier
    one. With no log-likelihood at all, the first attempt with a summary (else the first)."""
    ll = [_loglik(a) for _, a in attempts]
    usable = [i for i, v in enumerate(ll) if np.isfinite(v)]
    if not usable:  # the first attempt with a summary, else the first
        fitted = [i for i, (_, a) in enumerate(attempts) if a.get("summary") is not None]
        return (fitted or [0])[0], "no attempt gave a log-likelihood"
    best = max(ll[i] for i in usable)
    near = [i for i in usable if ll[i] >= best - LOGLIK_TIE]
    clean = [i for i in near if _clean(attempts[i][1])]
    i = (clean or near)[0]
    others = ", ".join(
        f"{attempts[j][0]} {ll[j]:.4f}" if j in usable else f"{attempts[j][0]} failed"
        for j in range(len(attempts))
        if j != i
    )
    return i, f"log-likelihood {ll[i]:.4f}, the highest; {others}; {'clean' if _clean(attempts[i][1]) else 'not clean'}"


def calibrated_test(chisq: float, df: float, n_benchmarks: int, n_obs: int) -> Tuple[float, float, float]:
    """The small-sample-calibrated test of the w_p terms: the Wald statistic referred to an F
    distribution, F = chisq / df on (df, df2) degrees of freedom (docs/analysis.md, "Significance").
    df2 = n_benchmarks - 1 when the w_p effects vary by benchmark (random slopes: the number of
    benchmarks bounds the information about the fixed w_p effects); with one benchmark (no random
    slopes) the observations are the replicates, df2 = n_obs - 3 (three fixed effects).
    Returns (F, df2, p); NaN where undefined."""
    df2 = float(n_benchmarks - 1) if n_benchmarks > 1 else float(n_obs - 3)
    if not (np.isfinite(chisq) and np.isfinite(df) and df > 0 and df2 > 0):
        return float("nan"), df2 if df2 > 0 else float("nan"), float("nan")
    f = chisq / df
    return float(f), df2, float(stats.f.sf(f, df, df2))


def attempts_text(attempts: List[Dict[str, Any]]) -> str:
    """One line for tables: each optimizer, its log-likelihood, clean or not, and which is reported."""
    return "; ".join(
        f"{a['optimizer']}: loglik {a.get('loglik', float('nan')):.4f}, "
        f"{'clean' if a['clean'] else 'problem'}{' (reported)' if a.get('reported') else ''}"
        for a in attempts
    )


def _analyse(data: pd.DataFrame, **kw) -> Dict[str, Any]:
    return rb.to_py(rb.r_call("plw_glmm_analyse", data[GLMM_COLUMNS], **kw))


def fit_glmm(
    data: pd.DataFrame,
    dataset: str = "",
    *,
    raw: bool = True,
    conf_level: float = 0.95,
    n_sim: int = 250,
    seed: int = 1,
    optimizer: str = "nlminb",
    fallback_optimizer: Optional[str] = "BFGS",
    p: float = P_EXP,
) -> GlmmResult:
    """Fit the GLMM on prepared data (columns score, w_p, benchmark, model; score in (0, 1)).

    With one PTLM the ``(1 | model)`` term is dropped, with one benchmark the random slopes; the
    result's ``notes`` say so. When the fit errors or reports a convergence problem and
    ``fallback_optimizer`` is set, it is refitted with that optim() method; the fit with the higher
    log-likelihood is reported (:func:`choose_fit`), and both attempts are recorded (``attempts``
    with their log-likelihoods, ``notes`` saying which fit is reported)."""
    res = GlmmResult(
        dataset=dataset,
        n_obs=len(data),
        benchmarks=sorted(data["benchmark"].unique().tolist()),
        models=sorted(data["model"].unique().tolist()),
    )
    y = data["score"].to_numpy(dtype=float)
    if len(data) == 0 or np.any(~np.isfinite(y)) or np.any((y <= 0) | (y >= 1)):
        res.status = "failed"
        res.errors.append("the response must be finite and strictly inside (0, 1) (squeeze it)")
        return res
    random_model = len(res.models) > 1
    random_slopes = len(res.benchmarks) > 1
    if not random_model:
        res.notes.append(f"one PTLM only ({res.models[0]}): the (1 | model) term was dropped")
    if not random_slopes:
        res.notes.append(f"one benchmark only ({res.benchmarks[0]}): the benchmark random slopes were dropped")
    kw = dict(
        random_slopes=random_slopes,
        random_model=random_model,
        raw=raw,
        conf_level=conf_level,
        n_sim=int(n_sim),
        seed=int(seed),
    )
    r = _analyse(data, optimizer=optimizer, **kw)
    attempts = [(optimizer, r)]
    if fallback_optimizer and not _clean(r):
        attempts.append((fallback_optimizer, _analyse(data, optimizer=fallback_optimizer, **kw)))
        chosen, why = choose_fit(attempts)
        first = (
            "; ".join(rb.as_list(r.get("fit_warnings")) + rb.as_list(r.get("error"))) or "non-positive-definite Hessian"
        )
        res.notes.append(
            f"{optimizer} reported a problem ({first}); refitted with optim {fallback_optimizer}; "
            f"the {attempts[chosen][0]} fit is reported ({why})"
        )
        r = attempts[chosen][1]
    res.attempts = [
        {
            "optimizer": o,
            "clean": _clean(a),
            "loglik": _loglik(a),
            "reported": a is r,
            "error": rb.scalar(a.get("error")),
            "warnings": rb.as_list(a.get("fit_warnings")),
        }
        for o, a in attempts
    ]
    res.optimizer = rb.scalar(r.get("optimizer"), optimizer)
    res.formula = rb.scalar(r.get("formula"), "")
    res.warnings = (
        rb.as_list(r.get("fit_warnings"))
        + rb.as_list(r.get("summary_warnings"))
        + rb.as_list(r.get("residual_warnings"))
    )
    res.messages = rb.as_list(r.get("fit_messages"))
    if r.get("error") is not None:
        res.errors.append(rb.scalar(r["error"]))
    s = r.get("summary")
    if s is None:
        res.status = "failed"
        return res
    res.errors += rb.as_list(s.get("errors"))
    res.coef = s["coef"].drop(columns=["r_term"])
    an = s.get("anova")
    if isinstance(an, pd.DataFrame) and len(an):
        row = an.iloc[0]
        res.chisq, res.df, res.p_value = float(row["chisq"]), float(row["df"]), float(row["p"])
        res.f_stat, res.f_df2, res.p_value_calibrated = calibrated_test(
            res.chisq, res.df, n_benchmarks=len(res.benchmarks), n_obs=res.n_obs
        )
    res.re_sd, res.re_cor, res.vcov = s.get("re_sd"), s.get("re_cor"), s.get("vcov")
    res.precision_phi = float(rb.scalar(s.get("precision_phi"), np.nan))
    res.loglik = float(rb.scalar(s.get("loglik"), np.nan))
    if not np.isfinite(res.loglik):  # logLik() is NA without a positive-definite Hessian
        res.loglik = _loglik(r)
    res.aic = float(rb.scalar(s.get("aic"), np.nan))
    res.pd_hessian = bool(rb.scalar(s.get("pd_hessian"), False))
    res.optimizer_convergence = rb.scalar(s.get("optimizer_convergence"))
    res.optimizer_message = rb.scalar(s.get("optimizer_message"), "")
    if r.get("residuals") is not None:
        res.residuals = {
            k: (np.asarray(v) if isinstance(v, list) and len(v) > 1 else rb.scalar(v))
            for k, v in r["residuals"].items()
        }
    elif r.get("residual_error") is not None:
        res.errors.append(f"residual simulation: {rb.scalar(r['residual_error'])}")
    if raw:
        res.critical = critical_from(res, p=p, conf_level=conf_level)
    return res


def critical_from(res: GlmmResult, p: float = P_EXP, conf_level: float = 0.95) -> CriticalPLW:
    a, b, c = res.estimate("w_p2"), res.estimate("w_p"), res.estimate("intercept")
    kw = {}
    if isinstance(res.vcov, pd.DataFrame) and {"w_p", "w_p2"} <= set(res.vcov["term"]):
        V = res.vcov.set_index("term")
        kw = dict(
            var_a=float(V.loc["w_p2", "w_p2"]), var_b=float(V.loc["w_p", "w_p"]), cov_ab=float(V.loc["w_p2", "w_p"])
        )
    return critical_plw(a, b, p=p, intercept=c, conf_level=conf_level, **kw)


def skipped(dataset: str, reasons: List[str]) -> GlmmResult:
    return GlmmResult(dataset=dataset, status="skipped", errors=list(reasons))


def residual_tests_row(res: GlmmResult) -> Dict[str, Any]:
    r = res.residuals or {}
    return {
        "dataset": res.dataset,
        "n_sim": r.get("n_sim"),
        "n_obs": r.get("n_obs"),
        "uniformity_ks_d": r.get("uniformity_ks_d"),
        "uniformity_p": r.get("uniformity_p"),
        "dispersion_ratio": r.get("dispersion_ratio"),
        "dispersion_p": r.get("dispersion_p"),
        "outliers": r.get("outliers"),
        "outliers_expected": r.get("outliers_expected"),
        "outlier_p": r.get("outlier_p"),
    }
