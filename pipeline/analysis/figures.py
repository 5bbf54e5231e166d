"""Figures of the analysis (matplotlib, PNG and PDF). Each function takes tables and writes files;
it returns the written paths (empty when there is nothing to draw)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline.analysis.common import P_EXP

PLW_TICKS = [0.0, 5e-4, 1e-2, 1e-1, 5e-1, 1.0]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_dir: Path, name: str, formats: Sequence[str], dpi: int) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out_dir / f"{name}.{fmt}"
        fig.savefig(p, dpi=dpi, bbox_inches="tight")
        paths.append(p)
    _plt().close(fig)
    return paths


def _wp_axis(ax, p: float = P_EXP, top: bool = True):
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel("$w_p$ = PLW$^{%.5g}$" % p)
    if top:
        sec = ax.secondary_xaxis("top")
        sec.set_xticks([t**p for t in PLW_TICKS])
        sec.set_xticklabels([f"{t:g}" for t in PLW_TICKS], fontsize=6)
        sec.tick_params(length=2)


def _grid(n: int, ncol: int = 4, w: float = 3.2, h: float = 2.6):
    plt = _plt()
    ncol = max(1, min(ncol, n))
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, h * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _styles(datasets: Sequence[str], models: Sequence[str]):
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    colors = {d: cmap(i % 10) for i, d in enumerate(datasets)}
    ls = ["-", "--", ":", "-."]
    lines = {m: ls[i % len(ls)] for i, m in enumerate(models)}
    return colors, lines


def fig_aggregates(
    agg: pd.DataFrame,
    out_dir: Path,
    glmm_curves: Optional[Dict[str, tuple]] = None,
    formats=("png", "pdf"),
    dpi: int = 150,
    p: float = P_EXP,
) -> List[Path]:
    """Fig. 1: (a) simple aggregate by w_p for every dataset and PTLM; then per dataset the
    relative aggregate per PTLM, with the GLMM's fixed-effect curve (population level, inverse
    logit of c + b w_p + a w_p^2) where one was fitted."""
    a = agg[agg["group"] == "all"]
    if a.empty:
        return []
    datasets = sorted(a["dataset"].unique())
    models = sorted(a["model"].unique())
    colors, lines = _styles(datasets, models)
    fig, axes = _grid(1 + len(datasets), ncol=4, w=3.4, h=2.8)
    m = a.groupby(["dataset", "model", "w_p"], as_index=False)[["simple", "relative"]].mean()
    ax = axes[0]
    for (ds, mo), g in m.groupby(["dataset", "model"]):
        ax.plot(g["w_p"], g["simple"], lines[mo], marker="o", ms=3, color=colors[ds], label=f"{ds} / {mo}")
    ax.set_title("(a) simple aggregate", fontsize=9)
    ax.set_ylabel("mean benchmark score")
    _wp_axis(ax, p)
    ax.legend(fontsize=5, loc="best")
    for i, ds in enumerate(datasets):
        ax = axes[i + 1]
        for mo, g in m[m["dataset"] == ds].groupby("model"):
            ax.plot(g["w_p"], g["relative"], lines[mo], marker="o", ms=3, color=colors[ds], label=mo)
        if glmm_curves and ds in glmm_curves:
            c, b, aa = glmm_curves[ds]
            w = np.linspace(0, 1, 101)
            ax.plot(w, 1 / (1 + np.exp(-(c + b * w + aa * w * w))), color="k", lw=1, label="GLMM fixed effects")
        ax.set_title(f"({chr(ord('b') + i)}) relative aggregate: {ds}", fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        _wp_axis(ax, p)
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return _save(fig, out_dir, "fig1_aggregates", formats, dpi)


def fig_group_aggregates(
    agg: pd.DataFrame, out_dir: Path, formats=("png", "pdf"), dpi: int = 150, p: float = P_EXP
) -> List[Path]:
    """Relative aggregate per benchmark group (mc, short_gen, long_gen), one panel per dataset
    (mean over PTLMs and seeds)."""
    g = agg[agg["group"] != "all"]
    if g.empty:
        return []
    datasets = sorted(g["dataset"].unique())
    fig, axes = _grid(len(datasets), ncol=4, w=3.4, h=2.8)
    m = g.groupby(["dataset", "group", "w_p"], as_index=False)["relative"].mean()
    for ax, ds in zip(axes, datasets):
        for grp, gg in m[m["dataset"] == ds].groupby("group"):
            ax.plot(gg["w_p"], gg["relative"], marker="o", ms=3, label=grp)
        ax.set_title(ds, fontsize=9)
        ax.set_ylim(-0.02, 1.02)
        _wp_axis(ax, p)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, out_dir, "fig1_group_aggregates", formats, dpi)


def fig_benchmarks(
    scores: pd.DataFrame, out_dir: Path, formats=("png", "pdf"), dpi: int = 150, p: float = P_EXP
) -> List[Path]:
    """Figs. 5-7: one panel per benchmark, score by w_p, a line per dataset and PTLM."""
    if scores.empty:
        return []
    benches = list(scores.sort_values(["group", "benchmark"])["benchmark"].unique())
    datasets = sorted(scores["dataset"].unique())
    models = sorted(scores["model"].unique())
    colors, lines = _styles(datasets, models)
    fig, axes = _grid(len(benches), ncol=4)
    m = scores.groupby(["benchmark", "dataset", "model", "w_p"], as_index=False)["value"].mean()
    for ax, b in zip(axes, benches):
        sub = m[m["benchmark"] == b]
        for (ds, mo), g in sub.groupby(["dataset", "model"]):
            ax.plot(g["w_p"], g["value"], lines[mo], marker=".", ms=3, color=colors[ds], label=f"{ds} / {mo}")
        grp = scores.loc[scores["benchmark"] == b, "group"].iloc[0]
        metric = scores.loc[scores["benchmark"] == b, "metric"].iloc[0]
        ax.set_title(f"{b} [{grp}]", fontsize=8)
        ax.set_ylabel(metric, fontsize=7)
        _wp_axis(ax, p, top=False)
    axes[0].legend(fontsize=5)
    fig.tight_layout()
    return _save(fig, out_dir, "fig5_benchmarks", formats, dpi)


def fig_mechanisms(
    mech: pd.DataFrame, out_dir: Path, formats=("png", "pdf"), dpi: int = 150, p: float = P_EXP
) -> List[Path]:
    """Fig. 2: mechanism metrics (benchmarks named mech_*) by w_p; skipped when there are none."""
    if mech is None or mech.empty:
        return []
    keys = sorted(set(map(tuple, mech[["benchmark", "metric"]].values)))
    datasets = sorted(mech["dataset"].unique())
    models = sorted(mech["model"].unique())
    colors, lines = _styles(datasets, models)
    fig, axes = _grid(len(keys), ncol=4)
    for ax, (b, met) in zip(axes, keys):
        sub = mech[(mech["benchmark"] == b) & (mech["metric"] == met) & (mech["regularizer"] == "none")]
        sub = sub.groupby(["dataset", "model", "w_p"], as_index=False)["value"].mean()
        for (ds, mo), g in sub.groupby(["dataset", "model"]):
            ax.plot(g["w_p"], g["value"], lines[mo], marker="o", ms=3, color=colors[ds], label=f"{ds} / {mo}")
        ax.set_title(f"{b[len('mech_') :] if b.startswith('mech_') else b} ({met})", fontsize=8)
        _wp_axis(ax, p, top=False)
    axes[0].legend(fontsize=5)
    fig.tight_layout()
    return _save(fig, out_dir, "fig2_mechanisms", formats, dpi)


def fig_regularizers(reg_agg: pd.DataFrame, out_dir: Path, formats=("png", "pdf"), dpi: int = 150) -> List[Path]:
    """Fig. 8: relative aggregate (scaled over all runs of the dataset) of every regularised run at
    PLW 0 and 1, beside PLW alone; one panel per dataset and PTLM."""
    if reg_agg is None or reg_agg.empty:
        return []
    a = reg_agg[reg_agg["group"] == "all"]
    panels = sorted(set(map(tuple, a[["dataset", "model"]].values)))
    fig, axes = _grid(len(panels), ncol=2, w=6.0, h=3.2)
    for ax, (ds, mo) in zip(axes, panels):
        sub = a[(a["dataset"] == ds) & (a["model"] == mo)]
        none = sub[sub["regularizer"] == "none"].groupby("plw")["relative"].mean()
        labels = sorted(sub.loc[sub["regularizer"] != "none", "regularizer"].unique())
        x = np.arange(len(labels))
        for j, plw in enumerate(sorted(sub.loc[sub["regularizer"] != "none", "plw"].unique())):
            vals = [sub[(sub["regularizer"] == lab) & (sub["plw"] == plw)]["relative"].mean() for lab in labels]
            ax.bar(x + (j - 0.5) * 0.38, vals, width=0.38, label=f"regularizer, PLW {plw:g}")
        if len(none):
            frac = none[(none.index > 0) & (none.index < 1)]
            if len(frac):
                ax.axhline(frac.max(), color="k", lw=1, label=f"best fractional PLW ({frac.idxmax():g})")
            for plw, ls in ((0.0, ":"), (1.0, "--")):
                if plw in none.index:
                    ax.axhline(none[plw], color="grey", ls=ls, lw=1, label=f"no regularizer, PLW {plw:g}")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("relative aggregate")
        ax.set_title(f"{ds} / {mo}", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, out_dir, "fig8_regularizers", formats, dpi)


def fig_gam_contours(
    surfaces: Dict[str, pd.DataFrame],
    optima: Dict[str, pd.DataFrame],
    out_dir: Path,
    formats=("png", "pdf"),
    dpi: int = 150,
) -> List[Path]:
    """Fig. 10: contour of the fitted te(w, r) term per subset, with the optimal PLW per R_g."""
    subsets = [s for s in surfaces if surfaces[s] is not None and not surfaces[s].empty]
    if not subsets:
        return []
    _plt()
    fig, axes = _grid(len(subsets), ncol=3, w=4.2, h=3.6)
    for ax, s in zip(axes, subsets):
        surf = surfaces[s]
        ws = np.sort(surf["w"].unique())
        rs = np.sort(surf["r"].unique())
        Z = surf.pivot(index="r", columns="w", values="term").loc[rs, ws].to_numpy()
        cs = ax.contourf(ws, rs, Z, levels=15, cmap="viridis")
        ax.contour(ws, rs, Z, levels=15, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, fraction=0.046)
        opt = surf.loc[surf.groupby("r")["term"].idxmax()].sort_values("r")
        ax.plot(opt["w"], opt["r"], "w--", lw=1.2, label="optimal PLW")
        o = optima.get(s)
        if o is not None and not o.empty:
            ax.plot(o["optimal_plw"], o["r_g"], "wo", ms=3)
        ax.set_yscale("log")
        ax.set_xlabel("PLW (untransformed)")
        ax.set_ylabel("$R_g$")
        ax.set_title(f"GAM te(w, r): {s}", fontsize=9)
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return _save(fig, out_dir, "fig10_gam_contours", formats, dpi)


def fig_glmm_residuals(
    results: Dict[str, "object"], out_dir: Path, formats=("png", "pdf"), dpi: int = 150
) -> List[Path]:
    """Simulated (PIT) residual diagnostics per dataset: QQ plot against U(0,1) and residuals
    against the fitted (population-level) response, as DHARMa plots them."""
    items = [
        (ds, r.residuals)
        for ds, r in results.items()
        if getattr(r, "residuals", None) is not None and isinstance(r.residuals.get("scaled_residuals"), np.ndarray)
    ]
    if not items:
        return []
    plt = _plt()
    fig, axes = plt.subplots(len(items), 2, figsize=(7, 2.8 * len(items)), squeeze=False)
    for (ds, rr), (a1, a2) in zip(items, axes):
        res = np.sort(rr["scaled_residuals"])
        n = len(res)
        a1.plot((np.arange(1, n + 1) - 0.5) / n, res, ".", ms=3)
        a1.plot([0, 1], [0, 1], "r-", lw=1)
        a1.set_title(f"{ds}: QQ uniform (KS p = {rr['uniformity_p']:.3g})", fontsize=8)
        a1.set_xlabel("expected")
        a1.set_ylabel("observed")
        a2.plot(rr["fitted"], rr["scaled_residuals"], ".", ms=3)
        for q in (0.25, 0.5, 0.75):
            a2.axhline(q, color="grey", lw=0.6, ls="--")
        a2.set_title(f"{ds}: residual vs fitted (dispersion p = {rr['dispersion_p']:.3g})", fontsize=8)
        a2.set_xlabel("fitted (population level)")
        a2.set_ylabel("scaled residual")
    fig.tight_layout()
    return _save(fig, out_dir, "fig_glmm_residuals", formats, dpi)
