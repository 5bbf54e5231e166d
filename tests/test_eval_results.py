"""results.csv: the schema the analysis stage reads, markers, resume rules, atomic writes."""

from __future__ import annotations

import csv

import pytest

from pipeline.eval import benchmarks as B
from pipeline.eval.results import (
    COLUMNS,
    BenchmarkResult,
    ResultStore,
    ResultRow,
    evaluator_json,
    read_results,
    status_rows,
)


def test_columns_are_the_contract():
    assert COLUMNS == [
        "run_id",
        "benchmark",
        "metric",
        "value",
        "stderr",
        "n",
        "group",
        "status",
        "message",
        "evaluator",
    ]


def test_row_validation():
    with pytest.raises(ValueError, match="status"):
        ResultRow("piqa", "acc", 0.5, status="maybe")
    r = ResultRow("piqa", "acc", float("nan"))
    assert r.value is None and r.status == "error" and "no finite value" in r.message
    assert ResultRow("piqa", "acc", 1, float("inf")).stderr is None


def test_benchmark_status():
    ev = {"x": 1}
    assert BenchmarkResult("piqa", ev, [ResultRow("piqa", "acc", 0.5)]).status == "ok"
    assert (
        BenchmarkResult(
            "piqa", ev, [ResultRow("piqa", "acc", 0.5), ResultRow("piqa", "b", None, status="skipped")]
        ).status
        == "ok"
    )
    assert BenchmarkResult("piqa", ev, status_rows("piqa", ["acc"], "skipped", "m")).status == "skipped"
    assert (
        BenchmarkResult(
            "piqa", ev, [ResultRow("piqa", "acc", 0.5), ResultRow("piqa", "b", None, status="error")]
        ).status
        == "error"
    )
    assert BenchmarkResult("piqa", ev, []).status == "error"


def test_store_markers_table_and_resume_rules(tmp_path):
    st = ResultStore(tmp_path, "run-1")
    ev = {"framework": "lm-eval", "shots": 0, "limit": None}
    assert not st.is_finished("piqa", ev)
    st.save(BenchmarkResult("piqa", ev, [ResultRow("piqa", "acc", 0.625, 0.01, 1838, "ok", 'a "quoted", note')]))
    st.save(BenchmarkResult("mech_loss_rsd", {"window": 5}, [ResultRow("mech_loss_rsd", "rsd_mean", 0.1, None, 3)]))
    st.save(
        BenchmarkResult("wmt14_en_fr", {"f": 1}, status_rows("wmt14_en_fr", ["bleu", "chrf"], "skipped", "no data"))
    )
    st.save(BenchmarkResult("arc_challenge", ev, status_rows("arc_challenge", ["acc_norm"], "error", "boom")))
    assert st.is_finished("piqa", dict(reversed(list(ev.items()))))  # same config, any key order
    assert not st.is_finished("piqa", {**ev, "limit": 4})  # a changed evaluator config is redone
    assert not st.is_finished("wmt14_en_fr", {"f": 1}) and not st.is_finished("arc_challenge", ev)  # retried
    st.write_table(order=["arc_challenge", "piqa", "wmt14_en_fr", "mech_loss_rsd"])
    rows = read_results(st.results_csv)
    assert [(r["benchmark"], r["metric"]) for r in rows] == [
        ("arc_challenge", "acc_norm"),
        ("piqa", "acc"),
        ("wmt14_en_fr", "bleu"),
        ("wmt14_en_fr", "chrf"),
        ("mech_loss_rsd", "rsd_mean"),
    ]
    piqa = rows[1]
    assert piqa["value"] == 0.625 and piqa["stderr"] == 0.01 and piqa["n"] == 1838 and piqa["group"] == "mc"
    assert piqa["message"] == 'a "quoted", note' and piqa["evaluator"] == evaluator_json(ev)
    assert piqa["run_id"] == "run-1" and rows[4]["group"] == "mechanism" and rows[4]["stderr"] is None
    assert rows[2]["value"] is None and rows[2]["status"] == "skipped"
    with open(st.results_csv, newline="") as f:
        header = next(csv.reader(f))
    assert header == COLUMNS
    assert not [p for p in tmp_path.rglob("*.tmp")]  # atomic writes leave no temporaries


def test_analysis_stage_reads_the_table(tmp_path):
    """The analysis stage's reader accepts our table (non-ok rows have no value: left out, with one
    note per benchmark)."""
    import json

    from pipeline.analysis.collect import collect_runs

    run = tmp_path / "runs" / "r1"
    st = ResultStore(run, "r1")
    st.save(BenchmarkResult("piqa", {"a": 1}, [ResultRow("piqa", "acc", 0.6, 0.01, 10)]))
    st.save(BenchmarkResult("wmt16_de_en", {"a": 1}, status_rows("wmt16_de_en", ["bleu"], "skipped", "no data")))
    (run / "run.json").write_text(
        json.dumps({"run_id": "r1", "model": "m", "dataset": "d", "plw": 0.1, "seed": 42, "r_g": 1.0})
    )
    df, log = collect_runs(tmp_path / "runs")
    assert list(df["benchmark"]) == ["piqa"] and df["value"].iloc[0] == 0.6 and df["group"].iloc[0] == "mc"
    (issue,) = [i for i in log if i.where == "wmt16_de_en"]
    assert issue.scope == "benchmark" and issue.level == "info" and "skipped" in issue.message
    assert "no data" in issue.message


def test_registry_groups():
    assert {b.group for b in B.BENCHMARKS.values()} == {"mc", "short_gen", "long_gen"}
    assert all(n.startswith("mech_") and b.group == "mechanism" for n, b in B.MECHANISMS.items())
    assert [n for n, b in B.BENCHMARKS.items() if b.group == "mc"] == [
        "arc_challenge",
        "piqa",
        "truthfulqa_mc2",
        "winogrande",
    ]
    assert len(B.BENCHMARKS) == 13
