"""The evaluation stage end to end on CPU: real checkpoints, real lm-eval / alpaca_eval, TEST DOUBLE judges.

The main run is trained by the real trainer (pipeline.train.run, tiny model, train=cpu_small: 8
steps), so results.csv is checked on exactly what a sweep produces (final/, metrics.jsonl,
train_summary.json). Every benchmark available from ../shared's mirror is evaluated with
``eval=cpu_small`` (a limit, short generations, test-double judges); the numbers are checked
against the raw outputs and independent computations. Other tests use run folders made the way the
run store makes them (pipeline.runs.create_run) with a ``final/`` checkpoint = the pre-trained one
with one tensor shifted: resume, interruption, a missing checkpoint, runs not finished, a
pre-trained baseline.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.eval import benchmarks as B
from pipeline.eval import harness, judges
from pipeline.eval.results import COLUMNS, read_results
from pipeline.eval.stage import EvalError, evaluate_all, evaluate_pretrained, evaluate_run

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFT = 0.01
SHIFTED = "model.layers.0.mlp.down_proj.weight"
LOSSES = [2.0, 1.8, 1.9, 1.5, 1.6, 1.4, 1.45, 1.3, 1.35, 1.2, 1.25, 1.1]


def _cfg(model_cache, runs_dir, *overrides):
    return load_config(
        [
            "model=tiny",
            "dataset=shared_alpaca52k",
            "train=cpu_small",
            "eval=cpu_small",
            f"paths.data_dir={model_cache}",
            f"paths.runs_dir={runs_dir}",
            "plw=0.1",
            *overrides,
        ]
    )


def make_run(cfg, *, checkpoint: bool = True, state: str = "done", copy_from=None):
    """A run folder with the trainer's files: final/ = the PTLM with SHIFTED moved by SHIFT."""
    from pipeline import models
    from pipeline.runs import append_jsonl, create_run

    rd = create_run(cfg)
    if checkpoint:
        if copy_from is not None:
            shutil.copytree(copy_from, rd.final, dirs_exist_ok=True)
        else:
            model, tok = models.load_pretrained(cfg.model, cfg.paths)
            with torch.no_grad():
                dict(model.named_parameters())[SHIFTED].add_(SHIFT)
            model.save_pretrained(rd.final)
            tok.save_pretrained(rd.final)
    for i, loss in enumerate(LOSSES, start=1):
        append_jsonl(rd.metrics, {"kind": "train", "step": i, "loss": loss, "lr": 1e-4})
    append_jsonl(rd.metrics, {"kind": "eval", "step": 12, "eval_loss": 1.9})
    rd.set_status("running")
    if state != "running":
        rd.set_status(state)
    return rd


@pytest.fixture(scope="module")
def tiny_eval(model_cache, module_tmp, shared_dir):
    from pipeline.train import run as train

    runs = module_tmp("runs")
    cfg = _cfg(model_cache, runs, "eval.limit=2")
    rd = train(cfg)  # the real trainer: final/, metrics.jsonl, train_summary.json, status done
    assert rd.status()["state"] == "done"
    csv_path = evaluate_run(rd.path, cfg)
    return cfg, rd, csv_path, read_results(csv_path)


def _by(rows, benchmark, metric):
    [r] = [r for r in rows if r["benchmark"] == benchmark and r["metric"] == metric]
    return r


def test_every_benchmark_and_metric_has_a_row(tiny_eval):
    cfg, rd, csv_path, rows = tiny_eval
    assert csv_path == rd.path / "results.csv"
    assert list(rows[0].keys()) == COLUMNS
    want = [
        (b, m)
        for b in list(cfg.eval.benchmarks) + list(cfg.eval.mechanisms)
        for m in B.metrics_for(b, cfg.eval.metrics)
    ]
    assert [(r["benchmark"], r["metric"]) for r in rows] == want
    assert {r["run_id"] for r in rows} == {rd.path.name}
    status = {r["benchmark"]: r["status"] for r in rows}
    assert set(status) == set(B.BENCHMARKS) | set(B.MECHANISMS)  # all 13 benchmarks and the mechanisms
    for b in status:  # the WMT directions included: ../shared's mirror has them
        assert status[b] == "ok", (b, [r["message"] for r in rows if r["benchmark"] == b])
    for r in rows:
        assert r["group"] == B.get(r["benchmark"]).group
        assert r["value"] is not None
        ev = json.loads(r["evaluator"])
        if r["benchmark"].startswith("wmt"):  # validation + test from the mirror, zero-shot
            assert ev["shots"] == 0 and ev["data"]["source"] == "mirror" and r["n"] == 2
            assert [f.rsplit("/", 1)[1] for f in ev["data"]["files"]] == ["test.jsonl", "validation.jsonl"]
        if B.shots_for(r["benchmark"]) > 0:  # ARC, WinoGrande: the shots come from the train split
            assert ev["data"]["fewshot_split"] == "train", r


def test_a_benchmark_missing_from_the_mirror_is_skipped(model_cache, tmp_path, shared_dir):
    """A mirror holding only some benchmarks (symlinks): the others are skipped with the reason,
    without loading a model, and the rest of the evaluation goes on."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "piqa").symlink_to(shared_dir / "data" / "benchmarks" / "piqa")
    cfg = _cfg(
        model_cache,
        tmp_path / "runs",
        f"eval.data_dir={mirror}",
        "eval.benchmarks=[wmt14_en_fr,wmt16_de_en]",
        "eval.mechanisms=[mech_loss_rsd]",
    )
    rd = make_run(cfg, checkpoint=False)  # no checkpoint: nothing may need the model
    rows = read_results(evaluate_run(rd.path, cfg))
    assert [(r["benchmark"], r["metric"]) for r in rows] == [
        ("wmt14_en_fr", "bleu"),
        ("wmt14_en_fr", "chrf"),
        ("wmt16_de_en", "bleu"),
        ("wmt16_de_en", "chrf"),
        ("mech_loss_rsd", "rsd_mean"),
    ]
    for r in rows[:4]:
        assert r["status"] == "skipped" and r["value"] is None
        assert "not in the offline mirror" in r["message"] and "make fetch-data" in r["message"]
        assert str(mirror / "wmt1") in r["message"]
    assert rows[4]["status"] == "ok"


def test_harness_values_are_lm_evals(tiny_eval):
    cfg, rd, _, rows = tiny_eval
    for b in ("arc_challenge", "piqa", "truthfulqa_mc2", "winogrande", "truthfulqa_gen"):
        raw = json.loads((rd.path / "eval" / "lm_eval" / f"plw_{b}.json").read_text())
        res = raw["results"][f"plw_{b}"]
        for m in B.metrics_for(b, cfg.eval.metrics):
            r = _by(rows, b, m)
            assert r["value"] == res[f"{m},none"] and r["n"] == 2
        assert raw["n-shot"][f"plw_{b}"] == B.shots_for(b)
        samples = (rd.path / "eval" / "lm_eval" / f"plw_{b}.samples.jsonl").read_text().splitlines()
        assert len(samples) == 2
    arc = json.loads(_by(rows, "arc_challenge", "acc_norm")["evaluator"])
    assert arc["shots"] == 25 and arc["limit"] == 2 and arc["framework"] == "lm-eval" and arc["version"] == "0.4.13"
    assert arc["data"]["source"] == "mirror" and "arc_challenge/test.jsonl" in arc["data"]["files"]
    assert "gen_kwargs" not in arc  # only generation tasks carry the generation override
    assert json.loads(_by(rows, "truthfulqa_gen", "bleu_max")["evaluator"])["gen_kwargs"] == {"max_gen_toks": 32}
    # per-item accuracy of the samples gives the reported value
    s = [json.loads(x) for x in (rd.path / "eval" / "lm_eval" / "plw_piqa.samples.jsonl").read_text().splitlines()]
    assert _by(rows, "piqa", "acc")["value"] == pytest.approx(statistics.mean(x["acc"] for x in s))


def test_alpaca_eval_win_rate_is_the_test_doubles(tiny_eval, shared_dir):
    from pipeline.eval.alpacaeval import load_reference

    _, rd, _, rows = tiny_eval
    outs = json.loads((rd.path / "eval" / "alpaca_eval" / "model_outputs.json").read_text())["outputs"]
    ref = {r["instruction"]: r["output"] for r in load_reference(shared_dir / "data/alpaca_eval/alpaca_eval_v1.jsonl")}
    assert len(outs) == 2 and all(o["generator"] == rd.path.name for o in outs)
    pts = [{0: 0.5, 1: 0.0, 2: 1.0}[judges.longer(ref[o["instruction"]], o["output"])] for o in outs]
    wr = _by(rows, "alpaca_eval", "win_rate")
    assert wr["value"] == pytest.approx(100 * statistics.mean(pts)) and wr["n"] == 2
    assert "TEST DOUBLE" in wr["message"]
    assert json.loads(wr["evaluator"])["annotator"] == judges.TEST_DOUBLE
    ln = _by(rows, "mech_alpacaeval_length", "mean_chars")
    assert ln["value"] == pytest.approx(statistics.mean(len(o["output"]) for o in outs))
    assert _by(rows, "mech_alpacaeval_length", "mean_tokens")["value"] == statistics.mean(o["n_tokens"] for o in outs)
    assert all(o["n_tokens"] <= 32 for o in outs)  # eval.max_new_tokens of cpu_small


def test_pandalm_against_the_pretrained_model(tiny_eval):
    from pipeline.eval import pandalm

    cfg, rd, _, rows = tiny_eval
    rec = json.loads((rd.path / "eval" / "pandalm" / "judgments.json").read_text())
    assert len(rec) == 2
    pairs = []
    for r in rec:  # the test double's rule, independently: the longer response wins
        v = judges.longer(r["model"], r["comparator"])
        pairs.append((v, {0: 0, 1: 2, 2: 1}[v]))
    assert pairs == [(r["verdict_model_first"], r["verdict_model_second"]) for r in rec]
    t = pandalm.tally(pairs)
    assert _by(rows, "pandalm", "score")["value"] == pytest.approx(t.score)
    assert (
        _by(rows, "pandalm", "wins")["value"] == t.wins
        and "pretrained (tiny)" in _by(rows, "pandalm", "wins")["message"]
    )
    # the comparator's outputs are the pre-trained model's, cached once per PTLM
    cached = list((Path(cfg.paths.runs_dir) / "_baselines" / "tiny" / "eval" / "pandalm").glob("candidates-*.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["outputs"][:2] == [r["comparator"] for r in rec]


def test_mechanisms(tiny_eval):
    from pipeline import models
    from pipeline.eval import mechanisms

    cfg, rd, _, rows = tiny_eval
    train_lines = [json.loads(x) for x in rd.metrics.read_text().splitlines()]
    losses = [r["loss"] for r in train_lines if r.get("kind") == "train"]
    assert len(losses) == 8  # train=cpu_small
    w = np.array(losses[:5])  # one tumbling 5-step window
    assert _by(rows, "mech_loss_rsd", "rsd_mean")["value"] == pytest.approx(float(w.std(ddof=1) / w.mean()), rel=1e-12)
    assert _by(rows, "mech_loss_rsd", "rsd_mean")["n"] == 1
    # weight distance: the trainer's summary, and our streamed computation from final/ agrees with it
    summary = json.loads((rd.path / "train_summary.json").read_text())["weight_distance"]
    wd = {m: _by(rows, "mech_weight_distance", m) for m in ("l1_mean", "l2")}
    assert wd["l1_mean"]["value"] == summary["l1_mean"] and wd["l2"]["value"] == summary["l2"]
    assert wd["l1_mean"]["n"] == summary["tensors"] and "train_summary.json" in wd["l1_mean"]["message"]
    assert summary["l1_mean"] > 0
    d = mechanisms.weight_distance(rd.final, models.pretrained_dir(cfg.model, cfg.paths))
    for m in mechanisms.DISTANCE_METRICS:
        assert d.values[m] == pytest.approx(summary[m], rel=1e-9), m
    from pipeline.eval.mechanisms import corpus_bleu

    gens = json.loads((rd.path / "eval" / "memorization" / "generations.json").read_text())
    mem = _by(rows, "mech_memorization_bleu", "bleu")
    assert mem["n"] == len(gens) == 16 and len({g["prompt"] for g in gens}) == 16
    assert mem["value"] == pytest.approx(
        corpus_bleu([g["generation"] for g in gens], [g["reference"] for g in gens])[0]
    )
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp" in mem["message"]


def test_weight_distance_computed_when_the_trainer_wrote_none(model_cache, tmp_path):
    cfg = _cfg(model_cache, tmp_path / "runs", "eval.benchmarks=[]", "eval.mechanisms=[mech_weight_distance]")
    rd = make_run(cfg)  # final/ = the pre-trained model with SHIFTED moved by SHIFT; no train_summary.json
    rows = read_results(evaluate_run(rd.path, cfg))
    from safetensors import safe_open

    with safe_open(str(rd.final / "model.safetensors"), framework="pt") as f:
        numel = f.get_tensor(SHIFTED).numel()
    from pipeline import models

    with safe_open(str(models.pretrained_dir(cfg.model, cfg.paths) / "model.safetensors"), framework="pt") as f:
        elements = sum(f.get_tensor(k).numel() for k in f.keys())
    wd = {m: _by(rows, "mech_weight_distance", m) for m in ("l1_mean", "l2")}
    assert "no train_summary.json" in wd["l1_mean"]["message"]
    assert wd["l1_mean"]["value"] == pytest.approx(SHIFT * numel / elements, rel=1e-5)  # mean absolute change
    assert wd["l2"]["value"] == pytest.approx(SHIFT * math.sqrt(numel), rel=1e-5)


def test_resume_skips_finished_benchmarks(tiny_eval, monkeypatch):
    cfg, rd, csv_path, rows = tiny_eval
    before = {p.name: json.loads(p.read_text())["finished"] for p in (rd.path / "eval" / "done").glob("*.json")}

    def forbidden(*a, **k):
        raise AssertionError("a finished benchmark was recomputed")

    monkeypatch.setattr(harness, "run_task", forbidden)
    monkeypatch.setattr("pipeline.eval.alpacaeval.annotate", forbidden)
    monkeypatch.setattr("pipeline.eval.generation.generate", forbidden)
    evaluate_run(rd.path, cfg)
    after = {p.name: json.loads(p.read_text())["finished"] for p in (rd.path / "eval" / "done").glob("*.json")}
    assert after == before
    assert [(r["benchmark"], r["metric"], r["value"]) for r in read_results(csv_path)] == [
        (r["benchmark"], r["metric"], r["value"]) for r in rows
    ]


def test_interrupted_evaluation_resumes_where_it_stopped(model_cache, tmp_path, shared_dir, monkeypatch):
    cfg = _cfg(
        model_cache,
        tmp_path / "runs",
        "eval.limit=1",
        "eval.benchmarks=[piqa,winogrande,truthfulqa_mc2]",
        "eval.mechanisms=[mech_loss_rsd]",
    )
    rd = make_run(cfg)
    real = harness.run_task
    calls = []

    def crash_on_second(lm, spec, **kw):
        calls.append(spec.benchmark)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. the job was pre-empted
        return real(lm, spec, **kw)

    monkeypatch.setattr(harness, "run_task", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(rd.path, cfg)
    assert {r["benchmark"] for r in read_results(rd.path / "results.csv")} == {"piqa"}  # kept
    calls.clear()
    monkeypatch.setattr(
        harness, "run_task", lambda lm, spec, **kw: (calls.append(spec.benchmark), real(lm, spec, **kw))[1]
    )
    evaluate_run(rd.path, cfg)
    assert calls == ["winogrande", "truthfulqa_mc2"]  # piqa was not redone
    rows = read_results(rd.path / "results.csv")
    assert list(dict.fromkeys(r["benchmark"] for r in rows)) == [
        "piqa",
        "winogrande",
        "truthfulqa_mc2",
        "mech_loss_rsd",
    ]
    assert all(r["status"] == "ok" for r in rows)
    # a changed evaluator config (another limit) redoes the benchmark
    calls.clear()
    evaluate_run(
        rd.path, _cfg(model_cache, tmp_path / "runs", "eval.limit=2", "eval.benchmarks=[piqa]", "eval.mechanisms=[]")
    )
    assert calls == ["piqa"] and _by(read_results(rd.path / "results.csv"), "piqa", "acc")["n"] == 2


def test_missing_checkpoint_is_recorded_not_fatal(model_cache, tmp_path, capsys):
    from pipeline.eval.__main__ import main

    runs = tmp_path / "runs"
    cfg = _cfg(
        model_cache,
        runs,
        "eval.limit=1",
        "eval.benchmarks=[piqa,alpaca_eval]",
        "eval.mechanisms=[mech_loss_rsd,mech_weight_distance]",
    )
    rd = make_run(cfg, checkpoint=False)
    code = main(
        [
            "model=tiny",
            "dataset=shared_alpaca52k",
            "train=cpu_small",
            "eval=cpu_small",
            "plw=0.1",
            f"paths.data_dir={model_cache}",
            f"paths.runs_dir={runs}",
            "eval.limit=1",
            "eval.benchmarks=[piqa,alpaca_eval]",
            "eval.mechanisms=[mech_loss_rsd,mech_weight_distance]",
        ]
    )
    assert code == 1  # some benchmark failed
    rows = read_results(rd.path / "results.csv")
    st = {(r["benchmark"], r["metric"]): (r["status"], r["message"]) for r in rows}
    assert (
        st[("piqa", "acc")][0] == "error"
        and "final" in st[("piqa", "acc")][1]
        and "does not exist" in st[("piqa", "acc")][1]
    )
    assert st[("alpaca_eval", "win_rate")][0] == "error"
    assert st[("mech_loss_rsd", "rsd_mean")][0] == "ok"  # what does not need the checkpoint still runs
    assert (
        st[("mech_weight_distance", "l1_mean")][0] == "error"
        and "missing checkpoint" in st[("mech_weight_distance", "l1_mean")][1]
    )
    assert "[error]" in capsys.readouterr().out


def test_only_finished_runs_are_evaluated(model_cache, tmp_path):
    runs = tmp_path / "runs"
    cfg = _cfg(model_cache, runs, "eval.benchmarks=[]", "eval.mechanisms=[mech_loss_rsd]")
    running = make_run(cfg, checkpoint=False, state="running")
    with pytest.raises(EvalError, match="is 'running', not 'done'"):
        evaluate_run(running.path, cfg)
    done = make_run(
        _cfg(model_cache, runs, "plw=0.5", "eval.benchmarks=[]", "eval.mechanisms=[mech_loss_rsd]"), checkpoint=False
    )
    (runs / "junk").mkdir()
    (runs / "junk" / "run.json").write_text("{not json")
    (runs / "junk" / "status.json").write_text('{"state": "done"}')
    res = {name: (p, err) for name, p, err in evaluate_all(cfg)}
    assert set(res) == {done.path.name, "junk"}  # the running run is left alone
    assert res[done.path.name][0] == done.path / "results.csv" and res[done.path.name][1] is None
    assert "run.json" in res["junk"][1] and "not valid JSON" in res["junk"][1]
    with pytest.raises(EvalError, match="no run.json"):
        evaluate_run(tmp_path, cfg)


def test_pretrained_baseline(model_cache, tmp_path):
    cfg = _cfg(model_cache, tmp_path / "runs", "eval.pretrained=true", "eval.limit=1", "eval.benchmarks=[piqa,pandalm]")
    csv_path = evaluate_pretrained(cfg)
    assert csv_path == tmp_path / "runs" / "_baselines" / "tiny" / "results.csv"
    rows = read_results(csv_path)
    st = {r["benchmark"]: (r["status"], r["message"]) for r in rows}
    assert st["piqa"][0] == "ok" and {r["run_id"] for r in rows} == {"baseline__tiny"}
    assert st["pandalm"] == ("skipped", "the comparator (the pre-trained model) is the evaluated model itself")
    for m in ("mech_loss_rsd", "mech_weight_distance", "mech_memorization_bleu"):
        assert st[m][0] == "skipped" and "training run" in st[m][1]
    assert st["mech_alpacaeval_length"][0] == "ok"


@pytest.mark.slow
def test_smollm2_run_end_to_end(model_cache, tmp_path):
    """SmolLM2-135M (real pretrained weights) through every benchmark available offline."""
    from pipeline import models

    cfg = load_config(
        [
            "model=smollm2_135m",
            "dataset=shared_alpaca52k",
            "train=cpu_small",
            "eval=cpu_small",
            f"paths.data_dir={model_cache}",
            f"paths.runs_dir={tmp_path / 'runs'}",
            "eval.limit=1",
        ]
    )
    rd = make_run(cfg, copy_from=models.pretrained_dir(cfg.model, cfg.paths))
    rows = read_results(evaluate_run(rd.path, cfg))
    ok = {r["benchmark"] for r in rows if r["status"] == "ok"}
    assert ok == set(cfg.eval.benchmarks) | set(cfg.eval.mechanisms)  # the WMT directions included
    assert _by(rows, "mech_weight_distance", "l2")["value"] == 0.0  # final/ is the pre-trained model
    assert _by(rows, "pandalm", "ties")["value"] == 1  # identical greedy outputs: every item a tie


def test_a_bad_judge_config_is_recorded(model_cache, tmp_path):
    cfg = _cfg(
        model_cache,
        tmp_path / "runs",
        "eval.benchmarks=[alpaca_eval,pandalm]",
        "eval.mechanisms=[mech_loss_rsd]",
        "eval.judge=no_such_judge",
        "eval.pandalm_judge=nor_this",
    )
    rd = make_run(cfg, checkpoint=False)
    rows = read_results(evaluate_run(rd.path, cfg))
    st = {r["benchmark"]: (r["status"], r["message"]) for r in rows}
    assert st["alpaca_eval"][0] == "error" and "eval.judge" in st["alpaca_eval"][1]
    assert st["pandalm"][0] == "error" and "eval.pandalm_judge" in st["pandalm"][1]
    assert st["mech_loss_rsd"][0] == "ok"


def test_folder_lock_refuses_a_second_holder_and_waiting_lock_waits(tmp_path):
    """The evaluation's locks are the run store's (pipeline.runs.file_lock)."""
    from pipeline.eval import stage
    from pipeline.runs import file_lock
    import threading
    import time as _time

    with stage.folder_lock(tmp_path):
        assert "pid" in (tmp_path / "eval" / ".lock").read_text()
        with pytest.raises(stage.EvalError, match="being evaluated by another process"):
            with stage.folder_lock(tmp_path):
                pass
    with stage.folder_lock(tmp_path):  # released: taken again
        pass
    order = []
    path = tmp_path / "cache.lock"

    def holder():
        with file_lock(path, wait=True):
            order.append("held")
            _time.sleep(0.3)
            order.append("released")

    t = threading.Thread(target=holder)
    t.start()
    while not order:
        _time.sleep(0.01)
    waited = []
    with file_lock(path, wait=True, on_wait=lambda: waited.append(True)):
        order.append("second")
    t.join()
    assert order == ["held", "released", "second"] and waited == [True]


def test_a_run_trained_with_a_tracker_gets_its_results_in_the_same_tracker_run(model_cache, tmp_path, shared_dir):
    """train.report_to=[tensorboard]: the trainer's metrics and, after `make eval`, the run's results
    land in <run>/logs/tensorboard (accelerate's TensorBoard tracker), read back from the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.train import run as train

    cfg = _cfg(
        model_cache,
        tmp_path / "runs",
        "train.report_to=[tensorboard]",
        "eval.limit=2",
        "eval.benchmarks=[piqa]",
        "eval.mechanisms=[mech_loss_rsd]",
    )
    rd = train(cfg)
    rows = read_results(evaluate_run(rd.path, cfg))
    summary = json.loads((rd.path / "train_summary.json").read_text())
    got = {}
    for folder in sorted({e.parent for e in (rd.logs / "tensorboard").rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            got.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    losses = [json.loads(x) for x in rd.metrics.read_text().splitlines()]
    train_loss = [(r["step"], r["loss"]) for r in losses if r.get("kind") == "train"]
    assert sorted(got["train/loss"]) == [(s, pytest.approx(v, rel=1e-6)) for s, v in train_loss]
    for r in rows:
        if r["status"] == "ok":
            tag = f"results/{r['benchmark']}/{r['metric']}"
            assert got[tag] == [(summary["steps"], pytest.approx(float(r["value"]), rel=1e-6))], tag
    assert "results/piqa/acc" in got and any(t.startswith("results/mech_loss_rsd/") for t in got)
