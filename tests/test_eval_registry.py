"""Benchmarks are YAML files; runners are registered by kind; one GROUPS; the results table's contract
with the analysis reader.

- the registry is the folder of YAML files (declarations checked, bad ones named by file and field);
- a new lm-eval benchmark added by dropping ONE YAML file into a folder (``$PLW_EVAL_TASKS``; no
  Python change) is checked by the CLI, appears in the evaluation's plan and in results.csv, with
  lm-eval's own numbers, few-shot examples from its train split;
- rows the results writer (pipeline/eval/results.py) writes are read by the analysis reader
  (pipeline/analysis/collect.py) with the same group, benchmark, metric and value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.analysis import common as analysis_common
from pipeline.analysis.collect import collect_runs
from pipeline.eval import benchmarks as B
from pipeline.eval import groups, stage
from pipeline.eval.results import BenchmarkResult, ResultRow, ResultStore, read_results, status_rows
from pipeline.eval.runner import RUNNERS
from test_eval_stage import _cfg, make_run  # noqa: E402  (the run-folder helpers)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_registry_is_the_yaml_files():
    files = sorted(p.stem for p in B.TASKS_DIR.glob("*.yaml"))
    assert sorted(B.ALL) == files and len(B.BENCHMARKS) == 13 and len(B.MECHANISMS) == 4
    for name, b in B.ALL.items():
        assert b.path == B.TASKS_DIR / f"{name}.yaml" and b.group in groups.GROUPS
        assert b.kind in RUNNERS  # every kind has its runner (registered by importing the stage)
        assert set(b.metrics) <= set(b.available)
    assert {b.kind for b in B.ALL.values()} == {"harness", "alpaca_eval", "pandalm", "mechanism"}
    assert B.get("arc_challenge").shots == 25 and B.get("winogrande").shots == 5
    assert B.get("arc_challenge").metrics == ("acc_norm", "acc")
    assert B.get("mech_alpacaeval_length").kind == "alpaca_eval"  # computed from the AlpacaEval generations


def test_one_groups_definition():
    assert analysis_common.GROUPS is groups.BENCHMARK_GROUPS
    assert groups.GROUPS == ("mc", "short_gen", "long_gen", "mechanism")


@pytest.mark.parametrize(
    "block, field",
    [
        ({"group": "mcq", "metrics": ["acc"]}, "benchmark.group"),
        ({"group": "mc", "metrics": "acc"}, "benchmark.metrics"),
        ({"group": "mc"}, "benchmark.metrics"),
        ({"group": "mc", "metrics": ["acc"], "shots": -1}, "benchmark.shots"),
        ({"group": "mc", "metrics": ["acc"], "shot": 5}, "benchmark.shot"),
        ({"group": "mc", "metrics": ["acc"], "hub": "x/y"}, "benchmark.hub"),
        ({"group": "short_gen", "metrics": ["bleu"], "generations": 0, "new_tokens": 8}, "benchmark.generations"),
        ({"group": "short_gen", "metrics": ["bleu"], "generations": 10}, "benchmark.new_tokens"),
        (None, "benchmark:"),
    ],
)
def test_a_bad_declaration_names_its_file_and_field(tmp_path, monkeypatch, block, field):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"benchmark": block} if block is not None else {"task": "x"}))
    monkeypatch.setenv(B.EXTRA_DIRS_ENV, str(tmp_path))
    with pytest.raises(B.BenchmarkDeclarationError) as e:
        B.registry()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "mine.yaml") in msg and field in msg


def test_a_name_declared_twice_and_a_missing_folder(tmp_path, monkeypatch):
    (tmp_path / "piqa.yaml").write_text(yaml.safe_dump({"benchmark": {"group": "mc", "metrics": ["acc"]}}))
    monkeypatch.setenv(B.EXTRA_DIRS_ENV, str(tmp_path))
    with pytest.raises(B.BenchmarkDeclarationError, match="declared twice"):
        B.registry()
    monkeypatch.setenv(B.EXTRA_DIRS_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(B.BenchmarkDeclarationError, match="does not exist"):
        B.registry()
    monkeypatch.delenv(B.EXTRA_DIRS_ENV)
    assert "piqa" in B.registry()  # back to the package's folder


def test_unknown_names_are_config_errors(model_cache, tmp_path, capsys):
    from pipeline.eval.__main__ import main

    rc = main(
        [
            "model=tiny",
            "eval=cpu_small",
            f"paths.data_dir={model_cache}",
            f"paths.runs_dir={tmp_path}",
            "eval.benchmarks=[piqa,nonsense]",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "config key 'eval.benchmarks[1]'" in err and "'nonsense'" in err


# A new lm-eval benchmark: lm-eval's built-in BoolQ task, on a small mirror of our own, 2-shot.
BOOLQ_YAML = """\
# BoolQ from a local mirror: one file, no Python change.
benchmark:
  kind: harness
  group: mc
  shots: 2
  metrics: [acc]
  hub: {path: aps/super_glue, name: boolq}
  description: "BoolQ, 2-shot"
include: super_glue/boolq/default.yaml
task: plw_boolq
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: boolq/train.jsonl
    validation: boolq/validation.jsonl
"""


def _boolq_mirror(root: Path) -> None:
    (root / "boolq").mkdir(parents=True)
    for split, n in (("train", 6), ("validation", 3)):
        rows = [
            {
                "question": f"is {split} item {i} even",
                "passage": f"The {split} item {i} is a number.",
                "idx": i,
                "label": int(i % 2 == 0),
            }
            for i in range(n)
        ]
        (root / "boolq" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_benchmark_added_by_one_yaml_file(model_cache, tmp_path, shared_dir, monkeypatch, capsys):
    from pipeline.eval.__main__ import main

    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    mirror = tmp_path / "mirror"
    _boolq_mirror(mirror)
    (mirror / "piqa").symlink_to(shared_dir / "data" / "benchmarks" / "piqa")
    overrides = [
        f"eval.data_dir={mirror}",
        "eval.benchmarks=[piqa,boolq]",
        "eval.mechanisms=[mech_loss_rsd]",
        "eval.limit=2",
    ]
    cfg = _cfg(model_cache, tmp_path / "runs", *overrides)
    rd = make_run(cfg)
    with pytest.raises(Exception, match="boolq"):  # not declared yet: an unknown benchmark
        stage.check_names(cfg)
    (tasks / "boolq.yaml").write_text(BOOLQ_YAML)  # the one file
    monkeypatch.setenv(B.EXTRA_DIRS_ENV, str(tasks))
    assert B.get("boolq").group == "mc" and "boolq" in B.BENCHMARKS
    assert stage.pending_benchmarks(rd.path, cfg) == ["piqa", "boolq", "mech_loss_rsd"]  # the plan
    argv = [
        "model=tiny",
        "dataset=shared_alpaca52k",
        "train=cpu_small",
        "eval=cpu_small",
        f"paths.data_dir={model_cache}",
        f"paths.runs_dir={tmp_path / 'runs'}",
        "plw=0.1",
        *overrides,
        f"eval.run_dir={rd.path}",
    ]
    assert main(argv) == 0  # `make eval OVERRIDES=...`
    rows = read_results(rd.path / "results.csv")
    boolq = [r for r in rows if r["benchmark"] == "boolq"]
    assert [(r["metric"], r["group"], r["status"], r["n"]) for r in boolq] == [("acc", "mc", "ok", 2)]
    raw = json.loads((rd.path / "eval" / "lm_eval" / "plw_boolq.json").read_text())
    assert boolq[0]["value"] == raw["results"]["plw_boolq"]["acc,none"] and raw["n-shot"]["plw_boolq"] == 2
    ev = json.loads(boolq[0]["evaluator"])
    assert (
        ev["shots"] == 2
        and ev["data"]["fewshot_split"] == "train"
        and ev["base_task"] == "super_glue/boolq/default.yaml"
    )
    samples = [
        json.loads(x) for x in (rd.path / "eval" / "lm_eval" / "plw_boolq.samples.jsonl").read_text().splitlines()
    ]
    ctx = (
        samples[0]["arguments"]["gen_args_0"]["arg_0"]
        if isinstance(samples[0]["arguments"], dict)
        else samples[0]["arguments"][0][0]
    )
    assert (
        ctx.count("Answer:") == 3
        and "The train item" in ctx
        and ctx.endswith("Question: is validation item 0 even?\nAnswer:")
    )
    assert "boolq" in capsys.readouterr().out  # the CLI's summary


def test_the_analysis_reads_what_the_evaluation_writes(tmp_path):
    """Every registered benchmark's rows, written by ResultStore, come back from collect_runs with
    their group, benchmark, metric and value; non-ok rows are left out (one note per benchmark)."""
    runs = tmp_path / "runs"
    written = {}
    for k, run_id in enumerate(("run_a", "run_b")):
        st = ResultStore(runs / run_id, run_id)
        for i, (name, b) in enumerate(B.ALL.items()):
            if name == "pandalm":  # a benchmark that failed: no value, left out by the reader
                st.save(BenchmarkResult(name, {"k": 1}, status_rows(name, list(b.metrics), "error", "judge failed")))
                continue
            rows = [ResultRow(name, m, 0.25 * i + 0.01 * j + k, 0.5, 10 + j) for j, m in enumerate(b.metrics)]
            st.save(BenchmarkResult(name, {"k": 1}, rows), order=list(B.ALL))
            for r in rows:
                written[(run_id, name, r.metric)] = (b.group, r.value, r.stderr, r.n)
        (runs / run_id / "run.json").write_text(
            json.dumps({"run_id": run_id, "model": "m", "dataset": "d", "plw": 0.1 * (k + 1), "seed": 1, "r_g": 2.0})
        )
    df, log = collect_runs(runs)
    got = {(r.run_id, r.benchmark, r.metric): (r.group, r.value, r.stderr, r.n) for r in df.itertuples()}
    assert got == written
    assert set(df["group"]) == set(groups.GROUPS)  # the writer's groups are the reader's (+ mechanism)
    assert not [i for i in log if i.scope == "run"]  # nothing in the table was refused
    (note,) = [i for i in log if i.scope == "benchmark"]
    assert note.where == "pandalm" and "error" in note.message and "judge failed" in note.message
