"""The GAM across datasets (mgcv through rpy2): a planted optimum is found, no effect reads as
flat, too few R_g values are refused, and the saved bundle gives the same answer to `suggest`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis import rbridge as rb
from pipeline.analysis.gam import fit_gam, gam_data_problems, optimal_plw_table, prepare_gam_data, save_bundle, surface
from pipeline.analysis.simulate import simulate_gam_scores
from pipeline.analysis.suggest import generation_ratio, recommend, token_counts

R_VALUES = (0.04, 0.08, 0.2, 0.5, 1.0, 1.8, 3.3, 7.8)


@pytest.fixture(autouse=True, scope="module")
def _need_r():
    reason = rb.r_unavailable_reason()
    if reason is not None:
        pytest.skip(f"R analysis stack unavailable (R, glmmTMB, mgcv, car, rpy2): {reason}")


def _scores(**kw) -> pd.DataFrame:
    df = simulate_gam_scores(R_VALUES, **kw)
    return df.assign(w_p=df["plw"] ** 0.30103, run_id="r", regularizer="none", seed=42, metric="s")


def _fit(scores, subset="all"):
    data = prepare_gam_data(scores, subset)
    res = fit_gam(data, subset)
    assert res.status == "fitted", res.errors
    surf = surface(res.fit, np.linspace(0, 1, 201), list(R_VALUES))
    srange = res.score_range[1] - res.score_range[0]
    return res, optimal_plw_table(surf, srange, r_range=res.r_range)


@pytest.fixture(scope="module")
def planted():
    # score = benchmark level + PTLM offset - (PLW - 0.2)^2 / (1 + R_g) + N(0, 0.02)
    return _fit(_scores(peak=0.2, seed=0))


def test_planted_optimum_is_found_for_low_rg(planted):
    res, opt = planted
    low = opt[opt["r_g"] <= 1.0]
    assert len(low) == 5
    assert (low["optimal_plw"] - 0.2).abs().max() <= 0.05, low
    assert not low["flat"].any() and not opt["extrapolated"].any()
    # near-optimal ranges contain the optimum
    assert ((opt["near_opt_low"] <= opt["optimal_plw"]) & (opt["optimal_plw"] <= opt["near_opt_high"])).all()


def test_effect_fades_with_rg(planted):
    _, opt = planted
    gain = opt.set_index("r_g")["range_over_plw"]
    assert gain[0.04] > 2 * gain[7.8]


def test_another_planted_optimum():
    _, opt = _fit(_scores(peak=0.5, seed=1))
    low = opt[opt["r_g"] <= 1.0]
    assert (low["optimal_plw"] - 0.5).abs().max() <= 0.08, low


def test_one_benchmark_drops_the_benchmark_term_and_still_finds_the_optimum():
    sc = _scores(peak=0.2, seed=0)
    one = sc[sc["benchmark"] == sc["benchmark"].iloc[0]]
    data = prepare_gam_data(one, "all")
    res = fit_gam(data, "all")
    assert res.status == "fitted", res.errors
    assert any("factor(b) term was dropped" in w for w in res.notes)
    assert "factor(b)" not in res.summary["formula"]
    surf = surface(res.fit, np.linspace(0, 1, 201), list(R_VALUES))
    opt = optimal_plw_table(surf, res.score_range[1] - res.score_range[0], r_range=res.r_range)
    assert (opt[opt["r_g"] <= 0.2]["optimal_plw"] - 0.2).abs().max() <= 0.1, opt


def test_no_effect_reads_as_flat():
    _, opt = _fit(_scores(amplitude=0.0, seed=2))
    assert opt["flat"].all(), opt


def test_subsets():
    sc = _scores(seed=0)
    sc.loc[sc["benchmark"] == "truthfulqa_gen", "group"] = "short_gen"
    assert set(prepare_gam_data(sc, "mc")["b"]) == {"arc_challenge", "piqa", "truthfulqa_mc2", "winogrande"}
    assert set(prepare_gam_data(sc, "gen")["b"]) == {"truthfulqa_gen"}
    d = prepare_gam_data(sc, "all")
    assert d["score"].between(0, 1).all() and set(d.columns) >= {"score", "w", "r", "b"}


def test_too_few_generation_ratios_are_refused():
    sc = _scores(seed=0)
    two = sc[sc["r_g"].isin([0.04, 7.8])]
    data = prepare_gam_data(two, "all")
    assert any("only 2 distinct R_g" in p for p in gam_data_problems(data))
    res = fit_gam(data, "all")
    assert res.status == "skipped" and "at least 3 datasets" in res.errors[0]


def test_bundle_round_trip_gives_the_table_answer(planted, tmp_path):
    res, opt = planted
    path = save_bundle(res, tmp_path / "gam_all.rds", scaling="across_datasets")
    rec = recommend(path, 0.08, w_grid=201)
    row = opt.set_index("r_g").loc[0.08]
    assert rec.plw == pytest.approx(row["optimal_plw"])
    assert rec.near_low <= rec.plw <= rec.near_high and not rec.extrapolated
    far = recommend(path, 50.0)
    assert far.extrapolated and "extrapolation" in far.text()


def test_optimal_table_by_hand():
    w = np.linspace(0, 1, 101)
    surf = pd.concat(
        [
            pd.DataFrame({"w": w, "r": 0.1, "term": -((w - 0.3) ** 2)}),
            pd.DataFrame({"w": w, "r": 5.0, "term": 0.001 * w}),
        ]
    )
    t = optimal_plw_table(surf, 1.0, flat_fraction=0.05, tolerance=0.01, r_range=(0.05, 2.0)).set_index("r_g")
    assert t.loc[0.1, "optimal_plw"] == pytest.approx(0.3) and not t.loc[0.1, "flat"]
    assert t.loc[0.1, "near_opt_low"] == pytest.approx(0.2) and t.loc[0.1, "near_opt_high"] == pytest.approx(0.4)
    assert t.loc[5.0, "optimal_plw"] == pytest.approx(1.0) and t.loc[5.0, "flat"]
    assert t.loc[5.0, "extrapolated"] and not t.loc[0.1, "extrapolated"]


class _CharTokenizer:
    """One token per character (no special tokens)."""

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [list(t) for t in texts]}


def test_generation_ratio_counts_fields_alone():
    recs = [
        {"instruction": "abcd", "input": "", "output": "ab"},
        {"instruction": "ab", "input": "cdef", "output": "abcdefghijkl"},
    ]
    c = token_counts(recs, _CharTokenizer())
    assert c["prompt"].tolist() == [4, 6] and c["completion"].tolist() == [2, 12]
    g = generation_ratio(c["prompt"], c["completion"])
    assert g["r_g"] == pytest.approx(14 / 10)
    assert g["mean_ratio"] == pytest.approx((0.5 + 2.0) / 2)
    assert g["geomean_ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        generation_ratio(np.array([0, 0]), np.array([1, 2]))
