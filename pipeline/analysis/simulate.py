"""Synthetic data with known structure, for tests and for checking the analysis end to end.

- :func:`simulate_beta_glmm`: responses in (0, 1) from the paper's beta GLMM with known fixed
  effects (default truth: the paper's AlpacaDataShort fit), benchmark random slopes and a PTLM
  random intercept.
- :func:`simulate_gam_scores`: scores over (PLW, R_g) with a planted optimum PLW.
- :func:`write_run_folders`: a run store (run.json, train_summary.json with the R_g, results.csv
  per run) in the training and evaluation stages' format, from a long table of scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from pipeline.analysis.common import to_wp
from pipeline.config import PLW_LEVELS

# The paper's AlpacaDataShort fixed effects (Table 3): intercept, w_p, w_p^2.
PAPER_SHORT = (-1.043, 5.590, -4.284)

MC = ["arc_challenge", "piqa", "truthfulqa_mc2", "winogrande"]
SHORT_GEN = ["truthfulqa_gen", "wmt14_en_fr", "wmt14_fr_en", "wmt16_en_de", "wmt16_de_en", "wmt16_en_ro", "wmt16_ro_en"]
LONG_GEN = ["alpaca_eval", "pandalm"]
BENCHMARKS = MC + SHORT_GEN + LONG_GEN
GROUP_OF = {**{b: "mc" for b in MC}, **{b: "short_gen" for b in SHORT_GEN}, **{b: "long_gen" for b in LONG_GEN}}


def _expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def simulate_beta_glmm(
    coef: Tuple[float, float, float] = PAPER_SHORT,
    *,
    benchmarks: Sequence[str] = tuple(BENCHMARKS),
    models: Sequence[str] = ("llama1_7b", "llama2_7b"),
    plw_levels: Sequence[float] = tuple(PLW_LEVELS),
    phi: float = 12.0,
    slope_sd: Tuple[float, float] = (1.5, 1.5),
    slope_corr: float = -0.6,
    model_sd: float = 0.3,
    model_effects: Optional[Sequence[float]] = None,
    seed: int = 0,
) -> pd.DataFrame:
    """One observation per (PLW, benchmark, model) from
    logit(mu) = c + v_m + (b + u_1k) w_p + (a + u_2k) w_p^2,  y ~ Beta(mu phi, (1 - mu) phi),
    with (u_1k, u_2k) ~ N(0, Sigma) per benchmark and v_m ~ N(0, model_sd^2) per PTLM, or the
    given ``model_effects`` (e.g. +-0.25: with two PTLMs a drawn pair mostly shifts the intercept,
    which no fit can tell apart from the fixed intercept).
    ``coef`` = (intercept c, b for w_p, a for w_p^2)."""
    rng = np.random.default_rng(seed)
    c, b, a = coef
    s1, s2 = slope_sd
    cov = np.array([[s1 * s1, slope_corr * s1 * s2], [slope_corr * s1 * s2, s2 * s2]])
    u = rng.multivariate_normal([0.0, 0.0], cov, size=len(benchmarks))
    v = rng.normal(0.0, model_sd, size=len(models))
    if model_effects is not None:
        v = np.asarray(model_effects, dtype=float)
        if len(v) != len(models):
            raise ValueError("model_effects needs one value per model")
    rows = []
    for k, bench in enumerate(benchmarks):
        for m, model in enumerate(models):
            for plw in plw_levels:
                w = to_wp(plw)
                eta = c + v[m] + (b + u[k, 0]) * w + (a + u[k, 1]) * w * w
                mu = _expit(eta)
                y = rng.beta(mu * phi, (1 - mu) * phi)
                rows.append((bench, model, float(plw), float(w), float(np.clip(y, 1e-6, 1 - 1e-6))))
    return pd.DataFrame(rows, columns=["benchmark", "model", "plw", "w_p", "score"])


def planted_surface(plw, r_g, peak: float = 0.2, r_scale: float = 1.0, amplitude: float = 1.0):
    """A w-r surface with its maximum over PLW at ``peak`` for every R_g; the effect size decays
    with R_g (strong for short-completion data, nearly flat for long-completion data).
    ``amplitude`` = 0 gives no PLW effect at all."""
    plw = np.asarray(plw, dtype=float)
    amp = amplitude / (1.0 + np.asarray(r_g, dtype=float) / r_scale)
    return -amp * (plw - peak) ** 2


def simulate_gam_scores(
    r_values: Sequence[float] = (0.04, 0.08, 0.2, 0.5, 1.0, 1.8, 3.3, 7.8),
    *,
    peak: float = 0.2,
    plw_levels: Sequence[float] = tuple(PLW_LEVELS),
    benchmarks: Sequence[str] = tuple(BENCHMARKS[:6]),
    models: Sequence[str] = ("llama1_7b", "llama2_7b"),
    noise_sd: float = 0.02,
    amplitude: float = 1.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Raw scores: benchmark level + model offset + planted_surface(PLW, R_g) + noise.
    Dataset names are ``ds_r<R_g>``."""
    rng = np.random.default_rng(seed)
    level = dict(zip(benchmarks, rng.uniform(0.3, 0.7, size=len(benchmarks))))
    moff = dict(zip(models, rng.normal(0, 0.02, size=len(models))))
    rows = []
    for r in r_values:
        ds = f"ds_r{r:g}"
        for bench in benchmarks:
            for model in models:
                for plw in plw_levels:
                    s = (
                        level[bench]
                        + moff[model]
                        + float(planted_surface(plw, r, peak, amplitude=amplitude))
                        + rng.normal(0, noise_sd)
                    )
                    rows.append((ds, float(r), bench, GROUP_OF.get(bench, "mc"), model, float(plw), s))
    return pd.DataFrame(rows, columns=["dataset", "r_g", "benchmark", "group", "model", "plw", "value"])


RG_LOCATIONS = ("summary", "run.json")


def write_run_folders(
    runs_dir: Path,
    scores: pd.DataFrame,
    *,
    metric: str = "score",
    r_g: Optional[Dict[str, float]] = None,
    rg_in: str = "summary",
) -> Dict[str, Path]:
    """Write one folder per (dataset, model, plw, seed, regularizer) combination of ``scores``
    (columns dataset, model, plw, benchmark, value [, group, seed, regularizer, r_g, metric]) in
    the evaluation stage's format. R_g goes where training puts it (``rg_in="summary"``:
    ``train_summary.json`` ``data.dataset_rg``) or, as the analysis of earlier versions left it,
    into run.json (``rg_in="run.json"``). Returns run_id -> folder."""
    if rg_in not in RG_LOCATIONS:
        raise ValueError(f"rg_in must be one of {RG_LOCATIONS}, got {rg_in!r}")
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    df = scores.copy()
    for col, default in (("seed", 42), ("regularizer", "none"), ("metric", metric)):
        if col not in df.columns:
            df[col] = default
    if "group" not in df.columns:
        df["group"] = df["benchmark"].map(lambda b: GROUP_OF.get(b, "mc"))
    if "r_g" not in df.columns:
        df["r_g"] = df["dataset"].map(r_g or {})
    out = {}
    keys = ["dataset", "model", "plw", "seed", "regularizer"]
    for i, (key, g) in enumerate(df.groupby(keys, sort=True)):
        ds, model, plw, seed, reg = key
        run_id = f"run{i:04d}_{ds}_{model}_{plw:g}_{reg}".replace("=", "-")
        folder = runs_dir / run_id
        folder.mkdir(exist_ok=True)
        meta = {
            "run_id": run_id,
            "model": model,
            "dataset": ds,
            "plw": float(plw),
            "regularizer": reg,
            "seed": int(seed),
        }
        rg = float(g["r_g"].iloc[0])
        if rg_in == "run.json":
            meta["r_g"] = rg
        else:
            summary = {"run_id": run_id, "dataset": ds, "data": {"dataset_rg": rg, "dataset_dir": None}}
            (folder / "train_summary.json").write_text(json.dumps(summary, indent=1))
        (folder / "run.json").write_text(json.dumps(meta, indent=1))
        res = pd.DataFrame(
            {
                "run_id": run_id,
                "benchmark": g["benchmark"],
                "metric": g["metric"],
                "value": g["value"],
                "stderr": 0.01,
                "n": 100,
                "group": g["group"],
            }
        )
        res.to_csv(folder / "results.csv", index=False)
        out[run_id] = folder
    return out


PAPER_DATASETS = {
    "alpaca_data_tiny": 0.042,
    "alpaca_data_short": 0.082,
    "alpaca_data_medium": 1.0,
    "alpaca_data": 3.27,
    "alpaca_data_cleaned": 7.83,
}


def simulate_run_store(
    runs_dir: Path,
    *,
    datasets: Optional[Dict[str, float]] = None,
    peak: float = 0.2,
    benchmarks: Sequence[str] = tuple(BENCHMARKS),
    models: Sequence[str] = ("llama1_7b", "llama2_7b"),
    plw_levels: Sequence[float] = tuple(PLW_LEVELS),
    noise_sd: float = 0.02,
    mechanisms: bool = True,
    regularizers: Sequence[str] = (),
    seed: int = 0,
    rg_in: str = "summary",
) -> Dict[str, Path]:
    """A complete synthetic run store: every dataset x PTLM x PLW with scores from
    :func:`planted_surface` (optimum at ``peak`` for every R_g, effect fading with R_g), optional
    mechanism metrics (``mech_*``) and regularised runs at PLW 0 and 1 on the first dataset."""
    datasets = dict(datasets or PAPER_DATASETS)
    rng = np.random.default_rng(seed)
    frames = []
    for ds, r in datasets.items():
        d = simulate_gam_scores(
            [r],
            peak=peak,
            plw_levels=plw_levels,
            benchmarks=benchmarks,
            models=models,
            noise_sd=noise_sd,
            seed=int(rng.integers(1 << 30)),
        )
        d["dataset"] = ds
        frames.append(d)
    df = pd.concat(frames, ignore_index=True)
    if mechanisms:
        runs = df.drop_duplicates(["dataset", "model", "plw"])[["dataset", "r_g", "model", "plw"]]
        mech = []
        for row in runs.itertuples(index=False):
            w = to_wp(row.plw)
            vals = {
                "mech_loss_rsd": 0.05 + 0.1 * w * (1 - w) + rng.normal(0, 0.005),
                "mech_weight_distance": 1.0 + (w - 0.5) ** 2 + rng.normal(0, 0.02),
                "mech_memorization_bleu": 80 - 40 * max(0.0, w - 0.5) + rng.normal(0, 1),
                "mech_alpacaeval_length": 100 + 200 * w + rng.normal(0, 5),
            }
            for b, v in vals.items():
                mech.append((row.dataset, row.r_g, b, "mechanism", row.model, row.plw, v))
        df = pd.concat([df, pd.DataFrame(mech, columns=df.columns)], ignore_index=True)
    if regularizers:
        first = next(iter(datasets))
        base = df[(df["dataset"] == first) & df["plw"].isin([0.0, 1.0]) & ~df["benchmark"].str.startswith("mech_")]
        regs = []
        for reg in regularizers:
            x = base.copy()
            x["regularizer"] = reg
            x["value"] = x["value"] + rng.normal(0.005, 0.01, size=len(x))
            regs.append(x)
        df["regularizer"] = "none"
        df = pd.concat([df] + regs, ignore_index=True)
    df.loc[df["benchmark"].str.startswith("mech_"), "group"] = "mechanism"
    return write_run_folders(runs_dir, df, rg_in=rg_in)
