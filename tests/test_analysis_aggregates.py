"""Collection of the run store, score selection, aggregates and per-dataset checks (pure Python)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.aggregates import (
    check_datasets,
    minmax_scale,
    regularizer_table,
    run_aggregates,
    select_primary,
    squeeze,
)
from pipeline.analysis.collect import collect_runs
from pipeline.analysis.common import P_EXP
from pipeline.analysis.simulate import write_run_folders


def _scores(rows):
    """rows: (dataset, model, plw, benchmark, group, value) -> a table like select_primary's."""
    df = pd.DataFrame(rows, columns=["dataset", "model", "plw", "benchmark", "group", "value"])
    df["run_id"] = df["dataset"] + "_" + df["model"] + "_" + df["plw"].astype(str)
    df["w_p"] = df["plw"] ** P_EXP
    df["regularizer"] = "none"
    df["seed"] = 42
    df["r_g"] = 1.0
    df["metric"] = "acc"
    return df


def _grid(
    datasets=("d1",),
    models=("m1", "m2"),
    plws=(0.0, 0.1, 1.0),
    benches=(("b1", "mc"), ("b2", "long_gen")),
    value=lambda ds, m, p, b: p + (0.1 if m == "m2" else 0) + (0.5 if b == "b2" else 0),
):
    return _scores(
        [(ds, m, p, b, g, value(ds, m, p, b)) for ds in datasets for m in models for p in plws for b, g in benches]
    )


# ------------------------------------------------------------------------------ collection
def _store(tmp_path):
    rows = []
    for ds, r in (("d1", 0.1), ("d2", 3.0)):
        for p in (0.0, 0.1, 1.0):
            for b in ("arc_challenge", "alpaca_eval"):
                rows.append((ds, r, b, "m1", p, p + 0.1))
    df = pd.DataFrame(rows, columns=["dataset", "r_g", "benchmark", "model", "plw", "value"])
    return write_run_folders(tmp_path / "runs", df, metric="acc")


def test_collect_joins_factors_and_adds_wp(tmp_path):
    folders = _store(tmp_path)
    df, log = collect_runs(tmp_path / "runs")
    assert len(log) == 0
    assert df["run_id"].nunique() == len(folders) == 6
    assert set(df.columns) >= {
        "run_id",
        "dataset",
        "model",
        "plw",
        "w_p",
        "regularizer",
        "seed",
        "r_g",
        "benchmark",
        "metric",
        "value",
        "stderr",
        "n",
        "group",
    }
    np.testing.assert_allclose(df["w_p"], df["plw"] ** 0.30103)
    assert (df["regularizer"] == "none").all()
    assert dict(df.groupby("dataset")["r_g"].first()) == {"d1": 0.1, "d2": 3.0}


def test_collect_reports_bad_folders_and_keeps_the_others(tmp_path):
    folders = list(_store(tmp_path).values())
    (folders[0] / "run.json").unlink()
    (folders[1] / "results.csv").unlink()
    (folders[2] / "run.json").write_text("{not json")
    pd.read_csv(folders[3] / "results.csv").drop(columns=["value"]).to_csv(folders[3] / "results.csv")
    (folders[4] / "train_summary.json").unlink()  # no R_g anywhere
    (tmp_path / "runs" / "empty_folder").mkdir()
    df, log = collect_runs(tmp_path / "runs")
    assert df["run_id"].nunique() == 1  # only folders[5] is intact
    msgs = {i.where: i.message for i in log}
    assert "missing run.json" in msgs[str(folders[0])]
    assert "missing results.csv" in msgs[str(folders[1])]
    assert "run.json is not valid JSON" in msgs[str(folders[2])]
    assert "results.csv lacks column(s) ['value']" in msgs[str(folders[3])]
    assert msgs[str(folders[4])].startswith("no R_g recorded: run.json has no r_g and ")
    assert "train_summary.json is missing" in msgs[str(folders[4])]
    assert "missing run.json" in msgs[str(tmp_path / "runs" / "empty_folder")]


def test_collect_drops_non_numeric_values_with_a_warning(tmp_path):
    folders = list(_store(tmp_path).values())
    res = pd.read_csv(folders[0] / "results.csv")
    res["value"] = res["value"].astype(object)
    res.loc[0, "value"] = "n/a"
    res.to_csv(folders[0] / "results.csv", index=False)
    df, log = collect_runs(tmp_path / "runs")
    assert df["run_id"].nunique() == 6
    (issue,) = list(log)
    assert issue.level == "warning" and str(folders[0]) == issue.where and "non-numeric" in issue.message


def test_collect_leaves_out_rows_the_evaluation_marked_skipped_reporting_once(tmp_path):
    """A benchmark the evaluation could not run (status skipped, no value; e.g. WMT offline) is left
    out with one info line per benchmark for the whole store, not a warning per run."""
    folders = list(_store(tmp_path).values())
    for f in folders:
        res = pd.read_csv(f / "results.csv")
        res["status"], res["message"] = "ok", ""
        extra = pd.DataFrame(
            [
                {
                    **res.iloc[0].to_dict(),
                    "benchmark": "wmt14_en_fr",
                    "metric": m,
                    "value": np.nan,
                    "group": "short_gen",
                    "status": "skipped",
                    "message": "not in the offline mirror",
                }
                for m in ("bleu", "chrf")
            ]
        )
        pd.concat([res, extra]).to_csv(f / "results.csv", index=False)
    df, log = collect_runs(tmp_path / "runs")
    assert df["run_id"].nunique() == 6 and "wmt14_en_fr" not in set(df["benchmark"])
    (issue,) = list(log)
    assert (issue.scope, issue.where, issue.level) == ("benchmark", "wmt14_en_fr", "info")
    assert "skipped" in issue.message and "12 row(s)" in issue.message and "offline mirror" in issue.message


def test_missing_run_store_is_reported(tmp_path):
    df, log = collect_runs(tmp_path / "nowhere")
    (issue,) = list(log)
    assert df.empty and issue.scope == "store" and "does not exist" in issue.message


# ------------------------------------------------------------------------------ scores
def test_select_primary_metric_rules():
    base = _grid()
    two = base.copy()
    two["metric"] = "acc_norm"
    tidy = pd.concat([base, two, base.assign(benchmark="mech_loss_rsd", metric="rsd")], ignore_index=True)
    # b1 and b2 report acc and acc_norm: configured choice wins; unconfigured -> left out
    scores, mech, log = select_primary(tidy, {"b1": "acc_norm"})
    assert set(scores["benchmark"]) == {"b1"} and set(scores["metric"]) == {"acc_norm"}
    assert "several metrics" in log.for_scope("benchmark", "b2")[0].message
    assert set(mech["benchmark"]) == {"mech_loss_rsd"}
    # a single reported metric is used even when the configured one is absent (with a warning)
    scores, _, log = select_primary(base, {"b1": "bleu"})
    assert set(scores["benchmark"]) == {"b1", "b2"}
    assert any("'bleu' -> 'acc'" in i.message for i in log)


# ------------------------------------------------------------------------------ aggregates
def test_squeeze_matches_smithson_verkuilen():
    y = np.array([0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(squeeze(y), (y * 3 + 0.5) / 4)
    s = squeeze(np.linspace(0, 1, 50))
    assert s.min() > 0 and s.max() < 1


def test_simple_and_relative_aggregates_by_hand():
    df = _scores(
        [
            ("d", "m", 0.0, "b1", "mc", 0.2),
            ("d", "m", 0.0, "b2", "long_gen", 10.0),
            ("d", "m", 1.0, "b1", "mc", 0.6),
            ("d", "m", 1.0, "b2", "long_gen", 30.0),
            ("d", "m", 0.5, "b1", "mc", 0.3),
            ("d", "m", 0.5, "b2", "long_gen", 30.0),
        ]
    )
    agg = run_aggregates(minmax_scale(df)).set_index(["plw", "group"])
    assert agg.loc[(0.0, "all"), "simple"] == pytest.approx(5.1)
    assert agg.loc[(0.0, "all"), "relative"] == pytest.approx(0.0)
    assert agg.loc[(1.0, "all"), "relative"] == pytest.approx(1.0)
    assert agg.loc[(0.5, "all"), "relative"] == pytest.approx((0.25 + 1.0) / 2)
    assert agg.loc[(0.5, "mc"), "relative"] == pytest.approx(0.25)
    assert agg.loc[(0.5, "long_gen"), "relative"] == pytest.approx(1.0)
    assert "short_gen" not in agg.index.get_level_values("group")


def test_relative_scaling_is_within_each_dataset():
    df = _grid(datasets=("d1", "d2"), value=lambda ds, m, p, b: p * (100 if ds == "d2" else 1))
    sc = minmax_scale(df)
    for ds, g in sc.groupby("dataset"):
        assert g["scaled"].min() == 0 and g["scaled"].max() == 1


# ------------------------------------------------------------------------------ bad input
def test_missing_benchmarks_skip_or_intersect():
    df = _grid(datasets=("good", "holey"))
    drop = (df["dataset"] == "holey") & (df["plw"] == 0.1) & (df["model"] == "m1") & (df["benchmark"] == "b2")
    df = df[~drop]
    usable, st, log = check_datasets(df, incomplete="skip")
    assert st["good"].analysable and not st["holey"].analysable
    (issue,) = log.for_scope("dataset", "holey")
    assert "missing benchmarks" in issue.message and "lacks ['b2']" in issue.message
    assert set(usable["dataset"]) == {"good"}
    usable, st, log = check_datasets(df, incomplete="intersect")
    assert st["holey"].analysable and st["holey"].benchmarks == ["b1"]
    assert st["holey"].dropped_benchmarks == {"b2": "missing in some runs"}


def test_single_plw_level_gets_aggregates_but_no_glmm():
    df = pd.concat([_grid(datasets=("good",)), _grid(datasets=("one_plw",), plws=(0.1,))])
    usable, st, log = check_datasets(df)
    assert st["good"].glmm and not st["one_plw"].glmm and st["one_plw"].analysable
    assert "a single PLW level (0.1)" in log.for_scope("dataset", "one_plw")[0].message
    two = _grid(datasets=("two",), plws=(0.0, 1.0))
    _, st, log = check_datasets(two)
    assert not st["two"].glmm and "only 2 PLW levels" in list(log)[0].message


def test_constant_scores():
    df = pd.concat(
        [
            _grid(datasets=("good",)),
            _grid(datasets=("flat",), value=lambda *a: 0.5),
            _grid(datasets=("one_flat",), value=lambda ds, m, p, b: 0.5 if b == "b1" else p),
        ]
    )
    usable, st, log = check_datasets(df)
    assert not st["flat"].analysable and "constant scores" in log.for_scope("dataset", "flat")[0].message
    assert st["one_flat"].analysable and st["one_flat"].benchmarks == ["b2"]
    assert "b1" in st["one_flat"].dropped_benchmarks
    assert set(usable["dataset"]) == {"good", "one_flat"}
    assert not ((usable["dataset"] == "one_flat") & (usable["benchmark"] == "b1")).any()


def test_regularizer_table_compares_with_fractional_plw():
    df = _grid(plws=(0.0, 0.1, 1.0), value=lambda ds, m, p, b: {0.0: 0.2, 0.1: 0.9, 1.0: 0.5}[p])
    reg = df[df["plw"].isin([0.0, 1.0])].assign(regularizer="weight_decay=0.1", value=lambda x: x["value"] + 0.1)
    reg["run_id"] = reg["run_id"] + "_wd"
    t = regularizer_table(pd.concat([df, reg], ignore_index=True))
    t = t[t["model"] == "m1"].set_index("regularization")
    assert set(t.index) == {"weight_decay", "PLW 0 (masking)", "PLW 1 (full loss)", "PLW fractional (ours)"}
    assert t.loc["PLW fractional (ours)", "relative"] == pytest.approx(1.0)
    assert t.loc["weight_decay", "best_plw"] == 1.0
    assert t.loc["weight_decay", "relative"] < t.loc["PLW fractional (ours)", "relative"]
