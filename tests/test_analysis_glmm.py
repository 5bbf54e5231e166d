"""The beta GLMM in R (glmmTMB through rpy2; no mocks): recovery of planted effects, the nominal
false-positive rate, captured convergence warnings, model simplification, residual checks, and
agreement of the rpy2 path with a plain Rscript run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis import rbridge as rb
from pipeline.analysis.glmm import fit_glmm, prepare_glmm_data
from pipeline.analysis.simulate import PAPER_SHORT, simulate_beta_glmm


@pytest.fixture(autouse=True, scope="module")
def _need_r():
    reason = rb.r_unavailable_reason()
    if reason is not None:
        pytest.skip(f"R analysis stack unavailable (R, glmmTMB, mgcv, car, rpy2): {reason}")


TRUTH = dict(zip(("intercept", "w_p", "w_p2"), PAPER_SHORT))  # -1.043, 5.590, -4.284
# Two PTLMs with symmetric offsets: with two levels a drawn pair would mostly shift the intercept.
MODEL_FX = (-0.25, 0.25)


def _covered(res) -> dict:
    c = res.coef.set_index("term")
    return {t: bool(c.loc[t, "ci_low"] <= v <= c.loc[t, "ci_high"]) for t, v in TRUTH.items()}


def test_recovers_the_paper_alpacadatashort_fit():
    # 10 PLW levels x 13 benchmarks x 2 PTLMs, benchmark random slopes (sd 1.5, corr -0.6),
    # beta precision 12 (sd of a scaled score about 0.12 at mu = 0.5).
    d = simulate_beta_glmm(seed=0, model_effects=MODEL_FX)
    assert len(d) == 260
    res = fit_glmm(d, "sim", n_sim=250, seed=1)
    assert res.status == "fitted" and res.converged, (res.warnings, res.errors)
    assert all(_covered(res).values()), res.coef
    assert res.p_value < 1e-6 and res.df == 2
    assert res.estimate("w_p2") < 0 and res.critical.exists
    # the critical PLW of the fit is near the truth's 0.242
    assert abs(res.critical.plw - 0.242) < 0.15
    # residual checks of a correctly specified model do not alarm
    r = res.residuals
    assert r["n_sim"] == 250 and len(r["scaled_residuals"]) == 260
    assert r["uniformity_p"] > 0.01 and r["dispersion_p"] > 0.01 and r["outlier_p"] > 0.01


def _null_rejections(n: int, alpha: float = 0.05, seed0: int = 500):
    rej, ps = 0, []
    for s in range(n):
        d = simulate_beta_glmm(coef=(0.0, 0.0, 0.0), seed=seed0 + s, model_effects=MODEL_FX)
        res = fit_glmm(d, f"null{s}", n_sim=0)
        assert res.status == "fitted", res.errors
        ps.append(res.p_value)
        rej += bool(res.p_value < alpha)
    return rej, ps


def test_no_effect_is_rarely_significant_short():
    # 10 null datasets (random slopes still vary by benchmark, their mean is zero). At the
    # nominal 5% the expected count is 0.5; P(X >= 4) < 0.002 even at a true rate of 7%.
    rej, ps = _null_rejections(10)
    assert rej <= 3, ps


@pytest.mark.slow
def test_no_effect_rejection_rate_is_nominal_long():
    # 40 null datasets: expected 2 rejections at 5%; <= 6 passes a true rate up to ~8% with
    # probability > 0.9 and fails an anti-conservative test (e.g. one ignoring the random slopes).
    rej, ps = _null_rejections(40, seed0=900)
    assert rej <= 6, sorted(ps)[:10]


@pytest.mark.slow
def test_confidence_intervals_cover_the_truth_long():
    cover = {t: 0 for t in TRUTH}
    n = 30
    for s in range(n):
        res = fit_glmm(simulate_beta_glmm(seed=100 + s, model_effects=MODEL_FX), f"t{s}", n_sim=0)
        assert res.status == "fitted"
        for t, ok in _covered(res).items():
            cover[t] += ok
    # nominal 95%; Wald intervals with 13 benchmark groups are a little narrow (~90% observed)
    assert all(c >= 0.8 * n for c in cover.values()), cover


def test_convergence_warnings_are_captured_not_printed(capfd):
    d = simulate_beta_glmm(seed=0, model_effects=MODEL_FX)
    first = d[d["benchmark"] == d["benchmark"].iloc[0]]
    # every benchmark identical: the random-slope variance is zero, the Hessian is singular
    same = pd.concat([first.assign(benchmark=b) for b in d["benchmark"].unique()], ignore_index=True)
    capfd.readouterr()
    res = fit_glmm(same, "degenerate", n_sim=50, fallback_optimizer=None)
    out = capfd.readouterr()
    assert any("convergence problem" in w.lower() for w in res.warnings), res.warnings
    assert not res.converged and not res.pd_hessian
    assert res.coef is not None and np.isfinite(res.estimate("w_p"))  # still reported
    assert "Warning" not in out.out + out.err and "convergence" not in out.out + out.err


def test_fallback_optimizer_is_recorded():
    d = simulate_beta_glmm(seed=0, model_effects=MODEL_FX)
    first = d[d["benchmark"] == d["benchmark"].iloc[0]]
    same = pd.concat([first.assign(benchmark=b) for b in d["benchmark"].unique()], ignore_index=True)
    res = fit_glmm(same, "degenerate", n_sim=0, fallback_optimizer="BFGS")
    assert [a["optimizer"] for a in res.attempts] == ["nlminb", "BFGS"]
    assert any("BFGS" in n for n in res.notes)


def test_r_capture_returns_warnings_messages_and_errors():
    env = rb.r_env()
    import rpy2.robjects as ro

    f = ro.r("function(cap) cap({message('hello'); warning('first'); warning('second'); 42})")
    out = rb.to_py(f(env["plw_capture"]))
    assert out["value"] == [42.0] and out["warnings"] == ["first", "second"]
    assert out["messages"] == ["hello"] and out["error"] is None
    g = ro.r("function(cap) cap(stop('broken'))")
    out = rb.to_py(g(env["plw_capture"]))
    assert out["value"] is None and out["error"] == ["broken"]


def test_one_ptlm_drops_the_model_term_and_says_so():
    d = simulate_beta_glmm(seed=0, models=("llama2_7b",), model_effects=(0.0,))
    res = fit_glmm(d, "one_model", n_sim=0)
    assert res.status == "fitted"
    assert "(1 | model)" not in res.formula and "| benchmark)" in res.formula
    assert any("one PTLM only" in n and "(1 | model)" in n for n in res.notes)


def test_residual_checks_flag_contaminated_data():
    d = simulate_beta_glmm(seed=0, model_effects=MODEL_FX)
    rng = np.random.default_rng(3)
    bad = rng.random(len(d)) < 0.15
    d.loc[bad, "score"] = rng.choice([0.001, 0.999], bad.sum())
    res = fit_glmm(d, "contaminated", n_sim=250)
    r = res.residuals
    assert r["uniformity_p"] < 0.01 and r["outlier_p"] < 0.01 and r["outliers"] > r["outliers_expected"]


def test_prepare_scales_per_benchmark_and_squeezes():
    scores = pd.DataFrame(
        {
            "dataset": "d",
            "benchmark": ["a"] * 3 + ["b"] * 3,
            "model": "m",
            "w_p": [0, 0.5, 1] * 2,
            "plw": [0, 0.1, 1] * 2,
            "value": [0.2, 0.4, 0.6, 10, 30, 20],
            "run_id": list("xyzxyz"),
        }
    )
    g = prepare_glmm_data(scores)
    n = len(g)
    np.testing.assert_allclose(g["scaled"], [0, 0.5, 1, 0, 1, 0.5])
    np.testing.assert_allclose(g["score"], (g["scaled"] * (n - 1) + 0.5) / n)
    assert g["score"].between(0, 1, inclusive="neither").all()


def test_response_outside_open_interval_is_refused():
    d = simulate_beta_glmm(seed=0, model_effects=MODEL_FX)
    d.loc[0, "score"] = 1.0
    res = fit_glmm(d, "unsqueezed", n_sim=0)
    assert res.status == "failed" and "strictly inside (0, 1)" in res.errors[0]


def test_rpy2_and_rscript_agree():
    d = simulate_beta_glmm(seed=4, model_effects=MODEL_FX)[["score", "w_p", "benchmark", "model"]]
    emb = fit_glmm(d, "x", n_sim=0, fallback_optimizer=None)
    cli = rb.glmm_rscript(d)
    assert cli["error"] is None
    a = emb.coef.set_index("term")
    b = cli["coef"].set_index("term")
    for col in ("estimate", "std_error", "ci_low", "ci_high"):
        np.testing.assert_allclose(
            a.loc[["intercept", "w_p", "w_p2"], col], b.loc[["intercept", "w_p", "w_p2"], col], rtol=0, atol=1e-6
        )
    assert abs(emb.chisq - float(cli["anova"]["chisq"].iloc[0])) < 1e-6
    assert abs(emb.precision_phi - float(cli["scalars"]["precision_phi"])) < 1e-6


def test_starting_r_leaves_child_processes_environment_alone():
    """rpy2 puts R's library path in LD_LIBRARY_PATH; children (e.g. SLURM jobs submitted later in the
    same process) would then load the system's libpython instead of their own. Checked in a fresh
    process, where R starts for the first time."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    code = (
        "import os; from pipeline.analysis.rbridge import r_env; r_env(); "
        "print(repr(os.environ.get('LD_LIBRARY_PATH')))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "None"
