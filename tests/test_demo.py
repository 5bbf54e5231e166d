"""make demo (pipeline/demo.py): the pure parts (override routing, stage commands, input hash) and the
reduced demo end to end through the same command (`make demo EXPERIMENT=demo_ci`, slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.demo import inputs_hash, route_overrides, stage_commands

REPO = Path(__file__).resolve().parent.parent


def test_route_overrides_sends_each_key_to_its_stage():
    r = route_overrides(
        [
            "experiment.plw=[0.0]",
            "train.max_steps=2",
            "eval.limit=2",
            "analysis.dpi=50",
            "paths.runs_dir=/x",
            "+experiment.variants.a={weight_decay:0.1}",
            "model.pretrain.steps=5",
        ]
    )
    assert r["sweep"] == [
        "experiment.plw=[0.0]",
        "train.max_steps=2",
        "paths.runs_dir=/x",
        "+experiment.variants.a={weight_decay:0.1}",
        "model.pretrain.steps=5",
    ]
    assert r["pretrain"] == [
        "experiment.plw=[0.0]",
        "paths.runs_dir=/x",
        "+experiment.variants.a={weight_decay:0.1}",
        "model.pretrain.steps=5",
    ]
    assert r["eval"] == ["eval.limit=2", "paths.runs_dir=/x"]
    assert r["regress"] == ["analysis.dpi=50", "paths.runs_dir=/x"]
    with pytest.raises(ValueError, match="not key=value"):
        route_overrides(["oops"])


def test_stage_commands_are_the_stages_own_entry_points():
    c = stage_commands("demo_ci", "demo", ["paths.runs_dir=/r"], python="PY", no_figures=True)
    assert c["pretrain"] == ["PY", "-m", "pipeline.pretrain", "experiment=demo_ci", "paths.runs_dir=/r"]
    assert c["sweep"] == [
        "PY",
        "-m",
        "pipeline.sweep",
        "run",
        "experiment=demo_ci",
        "launcher=demo",
        "paths.runs_dir=/r",
    ]
    # a launcher chosen by the user replaces the demo's
    assert stage_commands("demo", "demo", ["launcher=local"], python="PY")["sweep"][-1] == "launcher=local"
    assert stage_commands("demo", "demo", ["launcher.max_parallel=1"], python="PY")["sweep"][-2:] == [
        "launcher=demo",
        "launcher.max_parallel=1",
    ]
    assert c["eval"] == ["PY", "-m", "pipeline.eval", "eval=demo", "paths.runs_dir=/r"]
    assert c["regress"] == ["PY", "-m", "pipeline.analysis", "regress", "--no-figures", "paths.runs_dir=/r"]


def test_inputs_hash_changes_with_any_results_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "results.csv").write_text("x\n1\n")
    h0 = inputs_hash([a, b])
    assert h0 == inputs_hash([b, a])  # order-free
    (b / "results.csv").write_text("x\n2\n")
    h1 = inputs_hash([a, b])
    (a / "results.csv").write_text("x\n3\n")
    assert len({h0, h1, inputs_hash([a, b])}) == 3


def test_demo_configs_compose_with_the_study_shape():
    e = load_config(["experiment=demo"]).experiment
    assert len(e.plw) == 10 and len(e.models) == 2 and len(e.datasets) == 3
    assert load_config(["eval=demo"]).eval.judge.startswith("test_double")


def test_reduced_demo_end_to_end_then_reuses_everything(tmp_path, shared_dir):
    """`make demo EXPERIMENT=demo_ci` (the same command as `make demo`, a reduced grid: 3 PLW levels x
    tinylm_b x 3 datasets) pre-trains the model (once per data dir), trains 9 runs, evaluates them,
    fits and reports; the second call runs no stage. A few minutes here (CI runs it in `make test`)."""
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    ov = f"paths.runs_dir={runs} paths.reports_dir={reports} paths.shared_dir={shared_dir}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS", None)  # the launchers set threads per worker
    cmd = ["make", "-s", "demo", "EXPERIMENT=demo_ci", f"OVERRIDES={ov}", f"PY={sys.executable}"]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    s = json.loads((reports / "analysis" / "demo_summary.json").read_text())
    assert s["ok"] and s["runs_total"] == 9 and s["runs_done"] == 9 and s["runs_evaluated"] == 9
    assert [st["name"] for st in s["stages"]] == ["pretrain", "sweep", "eval", "regress"]
    assert Path(s["report"]).is_file() and "report:" in first.stdout
    assert set(s["model_dirs"]) == {"tinylm_b"} and (Path(s["model_dirs"]["tinylm_b"]) / "DONE").is_file()
    # the report shows all 13 benchmarks with numbers (WMT included, however small)
    rep = Path(s["report"]).read_text()
    table = rep[rep.index("Benchmarks (all runs") :].split("\n\n")[1]
    assert [c.strip() for c in table.splitlines()[0].split("|")[1:-1]] == [
        "benchmark",
        "group",
        "metric",
        "scores",
        "mean",
        "min",
        "max",
    ]
    rows = {ln.split("|")[1].strip(): ln.split("|")[4:8] for ln in table.splitlines()[2:]}
    benchmarks = load_config(["eval=demo"]).eval.benchmarks
    assert len(benchmarks) == 13 and set(benchmarks) <= set(rows), sorted(rows)
    for b in benchmarks:
        n, mean, lo, hi = (c.strip() for c in rows[b])
        assert n == "9" and all(re.fullmatch(r"\d+(\.\d+)?", x) for x in (mean, lo, hi)), (b, rows[b])
    final_prompt_loss = {}
    for d in runs.iterdir():
        if not d.name.startswith("_"):
            assert (d / "results.csv").is_file() and (d / "final").is_dir()
            cfg = json.loads((d / "run.json").read_text())
            summ = json.loads((d / "train_summary.json").read_text())
            final_prompt_loss[(cfg["dataset"], float(cfg["plw"]))] = summ["final_prompt_loss"]
    # the PLW reached the loss: training on prompts (PLW 1) lowers the prompt loss vs PLW 0
    for ds in {k[0] for k in final_prompt_loss}:
        assert final_prompt_loss[(ds, 1.0)] < final_prompt_loss[(ds, 0.0)] - 0.2, final_prompt_loss
    # the demo's GAM (tiny models, TEST DOUBLE judges) is a fit to noise: suggest never presents it as
    # a recommendation, and answers with the paper's guidance instead
    sug = subprocess.run(
        ["make", "-s", "suggest", "RG=0.77", f"OVERRIDES={ov}", f"PY={sys.executable}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sug.returncode == 0, sug.stdout[-4000:] + sug.stderr[-4000:]
    assert "is not a recommendation" in sug.stdout and "TEST DOUBLE judges" in sug.stdout, sug.stdout
    assert "tinylm_b" in sug.stdout and "Recommended PLW" not in sug.stdout
    assert "The paper's published answer" in sug.stdout and "PLW about 0.155" in sug.stdout
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    s2 = json.loads((reports / "analysis" / "demo_summary.json").read_text())
    assert all(st["skipped"] for st in s2["stages"]), s2["stages"]
    assert s2["inputs_hash"] == s["inputs_hash"]
