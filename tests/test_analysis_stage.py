"""The analysis stage end to end on a synthetic run store (real R): good datasets are analysed,
bad ones (single PLW level, missing benchmarks, constant scores, broken run folders) get a clear
message and do not stop the others; tables, figures (PNG + PDF), fitted GAMs and the report are
written; the CLI entry points work."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from pipeline.analysis import rbridge as rb
from pipeline.analysis.simulate import simulate_run_store, write_run_folders
from pipeline.config import load_config

BENCH = ("arc_challenge", "piqa", "winogrande", "truthfulqa_gen", "wmt16_de_en", "alpaca_eval")
GOOD = {"short": 0.08, "medium": 1.0, "cleaned": 7.83}


@pytest.fixture(autouse=True, scope="module")
def _need_r():
    reason = rb.r_unavailable_reason()
    if reason is not None:
        pytest.skip(f"R analysis stack unavailable (R, glmmTMB, mgcv, car, rpy2): {reason}")


def _bad_datasets(runs):
    rows = []
    for b in BENCH:
        for m in ("llama1_7b", "llama2_7b"):
            rows.append(("one_plw", 0.5, b, m, 0.1, 0.3 + 0.01 * len(b) + (m == "llama2_7b") * 0.05))
            for p in (0.0, 0.1, 1.0):
                rows.append(("flat", 2.0, b, m, p, 0.5))
                if not (b == "alpaca_eval" and m == "llama1_7b" and p == 0.1):
                    rows.append(("holey", 0.3, b, m, p, p + 0.01 * len(b)))
    df = pd.DataFrame(rows, columns=["dataset", "r_g", "benchmark", "model", "plw", "value"])
    df["metric"] = "score"
    write_run_folders(runs, df)
    broken = runs / "broken_run"
    broken.mkdir()
    (broken / "run.json").write_text("{")
    (broken / "results.csv").write_text("run_id,benchmark\n")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    runs = root / "runs"
    simulate_run_store(runs, datasets=GOOD, benchmarks=BENCH, regularizers=("weight_decay=0.1",), seed=0)
    _bad_datasets(runs)
    return root


@pytest.fixture(scope="module")
def output(store):
    from pipeline.analysis.stage import run_analysis

    cfg = load_config(
        [
            f"paths.runs_dir={store / 'runs'}",
            f"paths.reports_dir={store / 'reports'}",
            "analysis.glmm.n_sim=100",
            "analysis.figure_formats=[png,pdf]",
            "analysis.dpi=60",
        ]
    )
    return run_analysis(cfg.analysis)


def test_good_datasets_are_analysed(output):
    for ds in GOOD:
        r = output.glmm[ds]
        assert r.status == "fitted", (ds, r.errors)
        assert r.p_value < 0.05 and r.residuals is not None
    assert {s: g.status for s, g in output.gam.items()} == {"all": "fitted", "mc": "fitted", "gen": "fitted"}
    opt = output.gam["all"].optimum.set_index("r_g")
    assert abs(opt.loc[0.08, "optimal_plw"] - 0.2) <= 0.06  # planted peak at PLW 0.2


def test_both_p_values_in_table_json_and_report(output):
    """The paper's Wald p-value and the calibrated one side by side; the wording rests on the latter."""
    t = pd.read_csv(output.out_dir / "glmm_table3.csv").set_index("dataset")
    js = json.loads((output.out_dir / "results.json").read_text())["glmm"]
    rep = (output.out_dir / "report.md").read_text()
    assert "p Wald chi2 (paper)" in rep and "p calibrated (F)" in rep
    for ds in GOOD:
        r = output.glmm[ds]
        assert r.f_df2 == len(BENCH) - 1 and r.f_stat == pytest.approx(r.chisq / 2)
        assert r.p_value_calibrated >= r.p_value
        for row in (t.loc[ds], js[ds]):
            assert row["p_value"] == pytest.approx(r.p_value, rel=1e-9)
            assert row["p_value_calibrated"] == pytest.approx(r.p_value_calibrated, rel=1e-9)
            assert row["f_df2"] == len(BENCH) - 1 and row["optimizer"] == r.optimizer
            assert "(reported)" in row["optimizer_attempts"]
        assert "calibrated p = " in rep.split("## 8. Recommendations")[1]


def test_bad_datasets_get_one_clear_message_each(output):
    st = output.status
    assert not st["holey"].analysable and not st["flat"].analysable
    assert st["one_plw"].analysable and not st["one_plw"].glmm
    msgs = {
        ds: " ".join(i.message for i in output.issues.for_scope("dataset", ds)) for ds in ("holey", "flat", "one_plw")
    }
    assert "missing benchmarks" in msgs["holey"] and "lacks ['alpaca_eval']" in msgs["holey"]
    assert "constant scores" in msgs["flat"]
    assert "a single PLW level (0.1)" in msgs["one_plw"]
    for ds in ("holey", "flat", "one_plw"):
        assert output.glmm[ds].status == "skipped"
    # the broken folder names itself and its file
    (run_issue,) = [i for i in output.issues if i.scope == "run"]
    assert run_issue.where.endswith("broken_run") and "run.json" in run_issue.message
    # bad datasets stay out of the GAM
    assert not {"holey", "flat"} & set(output.gam["all"].datasets)


def test_files_and_report(output):
    out = output.out_dir
    for f in (
        "collected.csv",
        "collected.parquet",
        "scores.csv",
        "aggregates.csv",
        "glmm_table3.csv",
        "glmm_coefficients.csv",
        "glmm_residual_checks.csv",
        "gam_optimal_plw.csv",
        "regularizers_table4.csv",
        "issues.csv",
        "report.md",
        "results.json",
        "gam/gam_all.rds",
        "gam/gam_mc.rds",
        "gam/gam_gen.rds",
    ):
        assert (out / f).is_file(), f
    for fig in (
        "fig1_aggregates",
        "fig1_group_aggregates",
        "fig2_mechanisms",
        "fig5_benchmarks",
        "fig8_regularizers",
        "fig10_gam_contours",
        "fig_glmm_residuals",
    ):
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 1000, (fig, ext)
    pq = pd.read_parquet(out / "collected.parquet")
    assert {"w_p", "r_g", "regularizer"} <= set(pq.columns)
    rep = (out / "report.md").read_text()
    heads = [
        "## 1. Data",
        "## 2. Grid",
        "## 3. Results",
        "## 4. Regression",
        "## 5. Diagnostics",
        "## 6. Optimal PLW",
        "## 7. Alternative regularizers",
        "## 8. Recommendations",
        "## 9. Problems",
    ]
    pos = [rep.index(h) for h in heads]
    assert pos == sorted(pos)
    for ds in ("holey", "flat", "one_plw", "broken_run"):
        assert ds in rep
    assert "figures/fig1_aggregates.png" in rep and "figures/fig10_gam_contours.png" in rep
    t3 = pd.read_csv(out / "glmm_table3.csv").set_index("dataset")
    assert set(t3.loc[list(GOOD), "status"]) == {"fitted"}
    res = json.loads((out / "results.json").read_text())
    assert res["glmm"]["short"]["status"] == "fitted"


def test_no_mechanisms_or_regularizers_is_graceful(tmp_path):
    from pipeline.analysis.stage import run_analysis

    simulate_run_store(
        tmp_path / "runs",
        datasets={"a": 0.1, "b": 1.0},
        benchmarks=BENCH[:3],
        models=("llama2_7b",),
        mechanisms=False,
        seed=1,
    )
    cfg = load_config(
        [
            f"paths.runs_dir={tmp_path / 'runs'}",
            f"paths.reports_dir={tmp_path / 'rep'}",
            "analysis.glmm.n_sim=0",
            "analysis.figure_formats=[png]",
            "analysis.dpi=50",
        ]
    )
    o = run_analysis(cfg.analysis)
    assert o.glmm["a"].status == "fitted"
    assert any("one PTLM only" in n for n in o.glmm["a"].notes)
    assert o.gam["all"].status == "skipped" and "2 distinct R_g" in o.gam["all"].errors[0]
    rep = (o.out_dir / "report.md").read_text()
    assert "Fig. 2 (mechanisms) skipped" in rep and "No regularised runs" in rep
    assert "one PTLM only" in rep
    assert "fig2_mechanisms" not in o.files and "fig8_regularizers" not in o.files


def test_cli_regress_collect_and_suggest(store, tmp_path, capsys):
    from pipeline.analysis.__main__ import main

    runs = tmp_path / "runs"
    shutil.copytree(store / "runs", runs)
    shutil.rmtree(runs / "broken_run")
    rep = tmp_path / "reports"
    ov = [f"paths.runs_dir={runs}", f"paths.reports_dir={rep}", "analysis.glmm.n_sim=0"]
    assert main(["collect", *ov]) == 0
    assert (rep / "analysis" / "collected.parquet").is_file()
    # the store's bad datasets (flat, holey, one_plw) could not be analysed: exit 1, said last
    assert main(["regress", "--no-figures", *ov]) == 1
    out = capsys.readouterr().out
    assert "GLMM short: fitted" in out and "GAM all: fitted" in out
    assert "calibrated p = " in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: 3 of 6 dataset(s) could not be analysed") and "flat, holey, one_plw" in last
    assert main(["suggest", "--r-g", "0.08", *ov]) == 0
    out = capsys.readouterr().out
    assert "Recommended PLW:" in out and "Near-optimal PLW range:" in out
    assert "Your study's GAM" in out and "models llama1_7b, llama2_7b" in out
    assert out.index("Recommended PLW:") < out.index("The paper's published answer")  # both, the study's first
    # no GAM of one's own: the paper's answer, and where a GAM would come from
    assert main(["suggest", "--r-g", "0.08", f"paths.reports_dir={tmp_path / 'none'}"]) == 0
    out = capsys.readouterr().out
    assert "No fitted GAM of your own" in out and "make regress" in out and "Recommended PLW" not in out
    assert "PLW about 0.155" in out and "critical PLW 0.242" in out
    assert main(["suggest", *ov]) == 2  # neither data nor R_g
    assert main(["regress", "analysis.incomplete=sometimes"]) == 2


def _good_runs(store, tmp_path):
    """A copy of the store's run folders of the good datasets only (every one of them analysable)."""
    runs = tmp_path / "runs"
    shutil.copytree(store / "runs", runs)
    shutil.rmtree(runs / "broken_run")
    for run in list(runs.iterdir()):
        if json.loads((run / "run.json").read_text()).get("dataset") not in GOOD:
            shutil.rmtree(run)
    return runs


def test_cli_regress_exits_0_only_when_every_dataset_is_analysed(store, tmp_path, capsys):
    from pipeline.analysis.__main__ import main

    runs = _good_runs(store, tmp_path)
    ov = [f"paths.runs_dir={runs}", f"paths.reports_dir={tmp_path / 'reports'}", "analysis.glmm.n_sim=0"]
    assert main(["regress", "--no-figures", *ov]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "all 3 dataset(s) analysed"


def test_suggest_on_a_jsonl_with_the_llama_tokenizer(store, tmp_path, capsys, llama_tokenizer_dir):
    from pipeline.analysis.__main__ import main

    data = tmp_path / "my.jsonl"
    recs = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Summarise the text.", "input": "A long text about many things " * 5, "output": "Things."},
    ]
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    rc = main(
        [
            "suggest",
            "--data",
            str(data),
            "--tokenizer",
            str(llama_tokenizer_dir),
            f"paths.reports_dir={store / 'reports'}",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "R_g = " in out and "Recommended PLW:" in out
    from pipeline.analysis.suggest import dataset_rg

    g = dataset_rg(data, str(llama_tokenizer_dir))
    assert 0 < g["r_g"] < 0.5 and g["n"] == 2


def test_a_gam_fitted_on_test_double_judges_is_never_a_recommendation(store, tmp_path, capsys):
    """What `make demo` leaves behind: a GAM whose generation benchmarks were judged by the TEST DOUBLE.
    suggest names it for what it is and answers with the paper's guidance instead."""
    from pipeline.analysis.__main__ import main
    from pipeline.analysis.collect import TEST_DOUBLE_MARK

    runs = _good_runs(store, tmp_path)
    for run in runs.iterdir():
        res = pd.read_csv(run / "results.csv")
        res["message"] = ""
        res.loc[res["benchmark"] == "alpaca_eval", "message"] = (
            f"{TEST_DOUBLE_MARK} judge (test): not a real evaluation"
        )
        res.to_csv(run / "results.csv", index=False)
    ov = [f"paths.runs_dir={runs}", f"paths.reports_dir={tmp_path / 'reports'}", "analysis.glmm.n_sim=0"]
    assert main(["regress", "--no-figures", *ov]) == 0
    capsys.readouterr()
    for r_g in ("0.08", "1.0", "1.5", "7.8"):
        assert main(["suggest", "--r-g", r_g, *ov]) == 0
        out = capsys.readouterr().out
        assert "is not a recommendation" in out and "TEST DOUBLE judges (alpaca_eval)" in out, out
        assert "Recommended PLW" not in out and "The paper's published answer" in out
    # the MC-only GAM has no judged benchmark: it stays a recommendation
    mc = tmp_path / "reports" / "analysis" / "gam" / "gam_mc.rds"
    assert main(["suggest", "--r-g", "0.08", "--gam", str(mc), *ov]) == 0
    assert "Recommended PLW" in capsys.readouterr().out


def test_the_analysis_tables_go_to_the_tracker(store, tmp_path, capsys):
    """analysis.report_to=[tensorboard]: GLMM tests, critical PLW and GAM optima as scalars and the report
    as text in a tracker run "analysis" (read back from the event files); by default (null) the trackers
    of the analysed runs, none here."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.analysis.__main__ import main

    runs = _good_runs(store, tmp_path)
    rep = tmp_path / "reports"
    ov = [f"paths.runs_dir={runs}", f"paths.reports_dir={rep}", "analysis.glmm.n_sim=0"]
    assert main(["regress", "--no-figures", *ov]) == 0
    assert not (rep / "analysis" / "tensorboard").exists()  # the simulated runs used no tracker
    assert main(["regress", "--no-figures", *ov, "analysis.report_to=[tensorboard]"]) == 0
    capsys.readouterr()
    results = json.loads((rep / "analysis" / "results.json").read_text())
    got, texts = {}, {}
    for folder in sorted({e.parent for e in (rep / "analysis" / "tensorboard").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
        acc.Reload()
        got.update({t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"]})
        texts.update({t: acc.Tensors(t) for t in acc.Tags()["tensors"]})
    for ds in GOOD:
        assert got[f"glmm/{ds}/p_value"] == pytest.approx(results["glmm"][ds]["p_value"], rel=1e-5, abs=1e-30)
        assert got[f"glmm/{ds}/p_value_calibrated"] == pytest.approx(
            results["glmm"][ds]["p_value_calibrated"], rel=1e-5, abs=1e-30
        )
    opt = {r["r_g"]: r["optimal_plw"] for r in results["gam"]["all"]["optimum"]}
    assert got["gam/all/optimal_plw/R_g=0.08"] == pytest.approx(opt[0.08], rel=1e-6)
    assert any(t.startswith("report") for t in texts)
