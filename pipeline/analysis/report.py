"""The Markdown report (``<output_dir>/report.md``), readable top to bottom: data, grid, results,
regression tables, diagnostics, GAM, regularizers, recommendations, problems."""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import List

import pandas as pd

from pipeline.analysis.common import to_wp
from pipeline.analysis.glmm import attempts_text


def _f(x, nd: int = 3) -> str:
    if x is None:
        return "-"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return "-"
    if x != 0 and (abs(x) < 10**-nd or abs(x) >= 1e5):
        return f"{x:.{nd}g}"
    return f"{x:.{nd}f}"


def _p(p) -> str:
    if p is None or (isinstance(p, float) and not math.isfinite(p)):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def _md(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "_(empty)_"
    return df.to_markdown(index=False)


def _fig(o, key: str, caption: str) -> List[str]:
    paths = o.files.get(key) or []
    png = [p for p in paths if str(p).endswith(".png")]
    if not png:
        return []
    rel = Path(png[0]).relative_to(o.out_dir)
    others = ", ".join(
        f"[{Path(p).suffix[1:].upper()}]({Path(p).relative_to(o.out_dir)})"
        for p in paths
        if not str(p).endswith(".png")
    )
    return [f"![{caption}]({rel})", "", f"*{caption}* {('(' + others + ')') if others else ''}", ""]


def write_report(o, acfg) -> Path:
    L: List[str] = []
    alpha = float(acfg.glmm.alpha)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    L += [
        "# Prompt loss weight (PLW) study: analysis report",
        "",
        f"Generated {now} from the run store `{o.runs_dir}` by `python -m pipeline.analysis regress`.",
        "All tables are also written as CSV next to this file; `results.json` holds the same numbers for programs.",
        "",
    ]

    # ---------------------------------------------------------------- 1. data
    n_runs = o.tidy["run_id"].nunique() if len(o.tidy) else 0
    run_issues = [i for i in o.issues if i.scope == "run" and i.level == "error"]
    L += [
        "## 1. Data",
        "",
        f"{n_runs} run(s) collected; {len(run_issues)} run folder(s) skipped (see section 9). "
        f"Scores: one primary metric per benchmark (`analysis.primary_metrics`); benchmarks named "
        f"`{acfg.mechanism_prefix}*` are mechanism metrics.",
        "",
    ]
    rows = []
    for ds, st in o.status.items():
        state = (
            "analysed"
            if st.analysable and st.glmm
            else "aggregates only (no GLMM)"
            if st.analysable
            else "NOT analysed"
        )
        rows.append(
            {
                "dataset": ds,
                "R_g": _f(st.r_g),
                "runs": st.n_runs,
                "PTLMs": ", ".join(st.models),
                "PLW levels": len(st.plw_levels),
                "benchmarks used": len(st.benchmarks),
                "status": state,
                "why": " ".join(st.reasons) or "",
                "left-out benchmarks": "; ".join(f"{b} ({r})" for b, r in st.dropped_benchmarks.items()),
            }
        )
    L += [_md(pd.DataFrame(rows)), ""]
    if len(o.scores):
        b = (
            o.scores.groupby(["benchmark", "group", "metric"])["value"]
            .agg(scores="size", mean="mean", min="min", max="max")
            .reset_index()
            .sort_values(["group", "benchmark"])
        )
        for c in ("mean", "min", "max"):
            b[c] = b[c].map(_f)
        L += ["Benchmarks (all runs; the primary metric's mean, min and max over runs):", "", _md(b), ""]

    # ---------------------------------------------------------------- 2. grid
    L += ["## 2. Grid", ""]
    if len(o.tidy):
        runs = o.tidy.drop_duplicates("run_id")
        grid = (
            runs.groupby(["dataset", "model", "regularizer"])
            .agg(
                runs=("run_id", "nunique"),
                plw_levels=("plw", "nunique"),
                seeds=("seed", lambda s: ", ".join(map(str, sorted(set(s))))),
            )
            .reset_index()
        )
        L += [_md(grid), ""]
        levels = sorted(runs["plw"].unique())
        L += [
            "PLW levels and their transform w_p = PLW^" + f"{acfg.power:g}:",
            "",
            _md(pd.DataFrame({"PLW": [f"{x:g}" for x in levels], "w_p": [_f(to_wp(x, acfg.power)) for x in levels]})),
            "",
        ]
    else:
        L += ["No runs were collected.", ""]

    # ---------------------------------------------------------------- 3. results
    L += [
        "## 3. Results",
        "",
        "Simple aggregate: unweighted mean of a run's benchmark scores. Relative aggregate: each "
        "benchmark's scores min-max scaled within the training dataset (across PLW, PTLM and "
        "seeds), then averaged; the paper's analysis uses the relative aggregate.",
        "",
    ]
    L += _fig(o, "fig1_aggregates", "Fig. 1: aggregates by transformed PLW (black: GLMM fixed-effect curve).")
    if len(o.aggregates):
        a = o.aggregates[o.aggregates["group"] == "all"]
        best = a.groupby(["dataset", "model", "plw"], as_index=False)[["simple", "relative"]].mean()
        idx = best.groupby(["dataset", "model"])["relative"].idxmax()
        bt = best.loc[idx].rename(columns={"plw": "best PLW (relative)"})
        L += ["Best observed PLW by relative aggregate (mean over seeds):", "", _md(bt.round(3)), ""]
    L += _fig(o, "fig1_group_aggregates", "Relative aggregate per benchmark group (mean over PTLMs).")
    L += _fig(o, "fig5_benchmarks", "Figs. 5-7: every benchmark by transformed PLW.")
    if "fig2_mechanisms" in o.files:
        L += _fig(o, "fig2_mechanisms", "Fig. 2: mechanism metrics by transformed PLW.")
    else:
        L += [f"_Fig. 2 (mechanisms) skipped: no `{acfg.mechanism_prefix}*` rows in the results._", ""]

    # ---------------------------------------------------------------- 4. regression
    poly = "raw" if acfg.glmm.raw_poly else "orthogonal"
    L += [
        "## 4. Regression: beta GLMM per training dataset (Table 3)",
        "",
        f"Model (glmmTMB, beta family, logit link): `score ~ poly(w_p, 2, raw = "
        f"{'TRUE' if acfg.glmm.raw_poly else 'FALSE'}) + (0 + poly(w_p, 2, raw = "
        f"{'TRUE' if acfg.glmm.raw_poly else 'FALSE'}) | benchmark) + (1 | model)` on the min-max "
        f"scaled scores squeezed into (0, 1) with (y(n-1)+0.5)/n. Two p-values for the two w_p "
        f"terms: the paper's, a Wald chi-square test (car::Anova, type II), which rejects a true "
        f"null more often than its level with few benchmarks; and a small-sample-calibrated one, "
        f"the same statistic as F = chi-square / 2 on (2, benchmarks - 1) degrees of freedom (the "
        f"w_p effects vary by benchmark, so the number of benchmarks bounds the information about "
        f"them). \"Significant\" below rests on the calibrated p-value. Coefficients of the {poly} polynomial: a for "
        f"w_p^2, b for w_p (the paper's Table 3 coefficients are raw: its vertex -b/2a = 0.652 "
        f"and peak value 0.781 follow from them). Wald {int(round(acfg.glmm.conf_level * 100))}% CIs.",
        "",
    ]
    rows = []
    for ds, r in o.glmm.items():
        row = r.table_row()
        sig = r.status == "fitted" and row["p_value_calibrated"] < alpha
        pc = _p(row["p_value_calibrated"])
        rows.append(
            {
                "dataset": ds,
                "status": r.status,
                "p Wald chi2 (paper)": _p(row["p_value"]),
                "p calibrated (F)": ("**" + pc + "**") if sig else pc,
                "b (w_p)": f"{_f(row['b_wp'])} ({_f(row['b_wp_se'])})",
                "a (w_p^2)": f"{_f(row['a_wp2'])} ({_f(row['a_wp2_se'])})",
                "intercept": f"{_f(row['intercept'])} ({_f(row['intercept_se'])})",
                "converged": "yes" if r.converged else ("-" if r.status != "fitted" else "NO"),
                "critical PLW": _f(row["critical_plw"]) if row["critical_plw"] is not None else "none",
            }
        )
    L += [_md(pd.DataFrame(rows)), "", f"Estimates (standard errors); bold: calibrated p < {alpha}.", ""]
    for ds, r in o.glmm.items():
        L += [f"### {ds}", ""]
        if r.status == "skipped":
            L += ["Not fitted: " + " ".join(r.errors), ""]
            continue
        if r.status == "failed":
            L += ["The fit failed: " + "; ".join(r.errors), ""]
            if r.warnings:
                L += ["R warnings: " + "; ".join(f"`{w}`" for w in r.warnings), ""]
            continue
        L += [
            f"`{r.formula}` on {r.n_obs} observations ({len(r.benchmarks)} benchmarks, "
            f"{len(r.models)} PTLM(s)); optimizer {r.optimizer}"
            + (
                f" (the fit with the highest log-likelihood of {len(r.attempts)} attempts: {attempts_text(r.attempts)})"
                if len(r.attempts) > 1
                else ""
            )
            + ".",
            "",
        ]
        for n in r.notes:
            L += [f"- Note: {n}"]
        if r.notes:
            L += [""]
        c = r.coef.copy()
        L += [
            _md(
                c.assign(
                    **{k: c[k].map(_f) for k in ("estimate", "std_error", "z", "ci_low", "ci_high")}, p=c["p"].map(_p)
                )
            ),
            "",
        ]
        L += [
            f"Wald chi-square (w_p terms) = {_f(r.chisq)}, df = {_f(r.df, 0)}, p = {_p(r.p_value)} "
            f"(the paper's test); calibrated: F = {_f(r.f_stat)} on ({_f(r.df, 0)}, {_f(r.f_df2, 0)}) df, "
            f"p = {_p(r.p_value_calibrated)}. "
            f"Beta precision phi = {_f(r.precision_phi)}; log-likelihood {_f(r.loglik)}, AIC {_f(r.aic)}.",
            "",
        ]
        if r.re_sd is not None and len(r.re_sd):
            re = r.re_sd.copy()
            re["sd"] = re["sd"].map(_f)
            L += ["Random effects (SD):", "", _md(re), ""]
            if r.re_cor is not None and len(r.re_cor):
                L += [
                    "Correlations: "
                    + "; ".join(f"{x.group} {x.term1}-{x.term2}: {_f(x.corr)}" for x in r.re_cor.itertuples()),
                    "",
                ]
        if r.critical is not None:
            cr = r.critical
            extra = ""
            if cr.wp_ci:
                extra = (
                    f" Delta-method {int(round(acfg.glmm.conf_level * 100))}% CI of w_p*: "
                    f"[{_f(cr.wp_ci[0])}, {_f(cr.wp_ci[1])}]"
                    + (f", PLW [{_f(cr.plw_ci[0])}, {_f(cr.plw_ci[1])}]" if cr.plw_ci else "")
                    + "."
                )
            peak = f" Fitted peak (link scale) {_f(cr.peak_link)}." if cr.peak_link is not None else ""
            L += [f"Critical PLW: {cr.message}.{peak}{extra}", ""]

    # ---------------------------------------------------------------- 5. diagnostics
    L += [
        "## 5. Diagnostics",
        "",
        "Convergence: glmmTMB/TMB warnings are captured in R (withCallingHandlers) and listed "
        "here; a fit counts as converged when the optimizer reports success, the Hessian is "
        "positive definite and no convergence warning was raised.",
        "",
    ]
    rows = []
    for ds, r in o.glmm.items():
        if r.status == "skipped":
            continue
        rows.append(
            {
                "dataset": ds,
                "optimizer": r.optimizer,
                "message": r.optimizer_message,
                "pd Hessian": r.pd_hessian,
                "converged": r.converged,
                "warnings": "; ".join(r.warnings) or "none",
                "attempts": attempts_text(r.attempts),
            }
        )
    L += [_md(pd.DataFrame(rows)), ""]
    L += [
        f"Simulation-based residual checks (DHARMa's method, implemented with `simulate()`; "
        f"{acfg.glmm.n_sim} simulated responses, random effects re-simulated): scaled (PIT) "
        f"residuals; uniformity = KS test against U(0,1); dispersion = sd of (response - "
        f"population-level fitted) observed vs simulated (ratio > 1: overdispersion); outliers = "
        f"residuals outside the simulation envelope vs the binomial expectation 2/(n_sim+1).",
        "",
    ]
    rows = []
    for ds, r in o.glmm.items():
        if not r.residuals:
            continue
        x = r.residuals

        def flag(p):
            return _p(p) + (" (!)" if p is not None and p < 0.05 else "")

        rows.append(
            {
                "dataset": ds,
                "KS D": _f(x.get("uniformity_ks_d")),
                "uniformity p": flag(x.get("uniformity_p")),
                "dispersion ratio": _f(x.get("dispersion_ratio")),
                "dispersion p": flag(x.get("dispersion_p")),
                "outliers (expected)": f"{x.get('outliers')} ({_f(x.get('outliers_expected'), 1)})",
                "outlier p": flag(x.get("outlier_p")),
            }
        )
    L += [
        _md(pd.DataFrame(rows)) if rows else "_No residual checks (no fitted GLMM or n_sim = 0)._",
        "",
        "(!) marks p < 0.05: the model may misdescribe the data in that respect.",
        "",
    ]
    L += _fig(o, "fig_glmm_residuals", "Scaled residuals: QQ plot against U(0,1) and residual vs fitted.")

    # ---------------------------------------------------------------- 6. GAM
    g = acfg.gam
    L += [
        "## 6. Optimal PLW per generation ratio: GAM across datasets (Table 5)",
        "",
        f"`{g.formula}` (mgcv, method {g.method}) with w = untransformed PLW, r = dataset R_g, "
        f"b = benchmark; scores min-max scaled ({g.scaling.replace('_', ' ')}). Fitted on all "
        f"benchmarks, the MC benchmarks, and the generation benchmarks ({', '.join(g.gen_benchmarks)}). "
        f"Optimal PLW = argmax over w of the fitted te(w, r) term; * = flat (the te term varies "
        f"by less than {g.flat_fraction:.0%} of the score range over PLW at that R_g), "
        f"^ = R_g outside the fitted range (extrapolation). Near-optimal range: PLWs within "
        f"{g.tolerance:.0%} of the score range of the optimum.",
        "",
    ]
    rows = []
    for s, res in o.gam.items():
        sm = res.summary or {}
        te = sm.get("smooth")
        te_row = te.iloc[0] if isinstance(te, pd.DataFrame) and len(te) else None
        rows.append(
            {
                "subset": s,
                "status": res.status,
                "n": res.n,
                "datasets": len(res.datasets),
                "R^2 adj": _f((sm.get("r_sq") or [None])[0]),
                "deviance explained": _f((sm.get("dev_expl") or [None])[0]),
                "te edf": _f(te_row["edf"]) if te_row is not None else "-",
                "te p": _p(te_row["p"]) if te_row is not None else "-",
                "why not": "; ".join(res.errors),
            }
        )
    L += [_md(pd.DataFrame(rows)), ""]
    fitted = {s: r for s, r in o.gam.items() if r.optimum is not None}
    if fitted:
        r_all = sorted(set().union(*[set(r.optimum["r_g"]) for r in fitted.values()]))
        t = {"R_g": [_f(r) for r in r_all]}
        for s, res in fitted.items():
            op = res.optimum.set_index("r_g")
            col = []
            for r in r_all:
                x = op.loc[r]
                mark = ("*" if x["flat"] else "") + ("^" if x["extrapolated"] else "")
                col.append(f"{_f(x['optimal_plw'])}{mark} [{_f(x['near_opt_low'])}-{_f(x['near_opt_high'])}]")
            t[s] = col
        L += [_md(pd.DataFrame(t)), "", "Optimal PLW [near-optimal range] per R_g.", ""]
        L += _fig(o, "fig10_gam_contours", "Fig. 10: fitted te(w, r) surface; dashed: optimal PLW per R_g.")
        L += [
            "Fitted GAMs (R saveRDS bundles, used by `make suggest`): "
            + ", ".join(f"`{r.rds_path}`" for r in fitted.values() if r.rds_path),
            "",
        ]

    # ---------------------------------------------------------------- 7. regularizers
    if o.regularizers is not None and len(o.regularizers):
        t = o.regularizers.copy()
        for k in ("simple", "relative"):
            t[k] = t[k].map(_f)
        L += [
            "## 7. Alternative regularizers (Table 4)",
            "",
            "Best aggregate per regularizer type (over its strengths and PLW 0/1), beside PLW alone. "
            "Scores are min-max scaled over all runs of the dataset, regularised ones included.",
            "",
            _md(t[["dataset", "model", "regularization", "simple", "relative", "best_label", "best_plw", "n_runs"]]),
            "",
        ]
        L += _fig(o, "fig8_regularizers", "Fig. 8: regularizers at PLW 0 and 1 against PLW alone.")
    else:
        L += [
            "## 7. Alternative regularizers",
            "",
            "_No regularised runs (regularizer other than `none`) in the run store: Table 4 / Fig. 8 skipped._",
            "",
        ]

    # ---------------------------------------------------------------- 8. recommendations
    L += ["## 8. Recommendations", ""]
    for ds, r in o.glmm.items():
        if r.status != "fitted":
            st = o.status.get(ds)
            where = (
                "see its aggregates in section 3"
                if st is not None and st.analysable
                else "fix the input and rerun (section 9)"
            )
            L += [f"- **{ds}**: no regression result ({'; '.join(r.errors) or r.status}); {where}."]
            continue
        caveat = "" if r.converged else " (caution: the fit reported a convergence problem)"
        ps = f"calibrated p = {_p(r.p_value_calibrated)}, Wald p = {_p(r.p_value)}"
        if not (r.p_value_calibrated < alpha):
            L += [
                f"- **{ds}**: no significant PLW effect (calibrated p = {_p(r.p_value_calibrated)} >= "
                f"{alpha}; Wald p = {_p(r.p_value)}){caveat}; "
                f"PLW is not a critical hyperparameter for this dataset."
            ]
        elif r.critical is not None and r.critical.exists:
            ci = (
                f", {int(round(acfg.glmm.conf_level * 100))}% CI [{_f(r.critical.plw_ci[0])}, "
                f"{_f(r.critical.plw_ci[1])}]"
                if r.critical.plw_ci
                else ""
            )
            L += [
                f"- **{ds}**: significant PLW effect ({ps}){caveat}; use PLW about "
                f"{_f(r.critical.plw)} (critical PLW{ci})."
            ]
        else:
            L += [
                f"- **{ds}**: significant PLW effect ({ps}){caveat}; "
                f"{r.critical.message if r.critical else 'no critical PLW'}."
            ]
    if "all" in fitted:
        op = fitted["all"].optimum
        inside = op[op["in_data"]] if "in_data" in op.columns else op[~op["extrapolated"]]
        if len(inside):
            L += [
                "- Across datasets (GAM, all benchmarks), at the R_g of the analysed datasets: "
                "optimal PLW "
                + ", ".join(
                    f"{_f(x.optimal_plw)} at R_g {_f(x.r_g)}{'*' if x.flat else ''}" for x in inside.itertuples()
                )
                + " (* flat). Between datasets the surface is an interpolation: with few "
                "datasets, read Table 5 with care."
            ]
        L += [
            f"- For a new dataset: `make suggest DATA=my.jsonl TOKENIZER=<tokenizer>` computes its "
            f"R_g and reads the recommended PLW off the fitted GAM (`{fitted['all'].rds_path}`)."
        ]
    L += [""]

    # ---------------------------------------------------------------- 9. problems
    L += ["## 9. Problems found", ""]
    if len(o.issues):
        L += [_md(pd.DataFrame([vars(i) for i in o.issues])[["level", "scope", "where", "message"]]), ""]
    else:
        L += ["None.", ""]
    path = o.out_dir / "report.md"
    path.write_text("\n".join(L), encoding="utf-8")
    return path
