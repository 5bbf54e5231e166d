"""``eval.workers``: runs evaluated in worker processes give the values of one process; the
per-process caches of the evaluation stage.

Run folders are made as the run store makes them (tests/test_eval_stage.py ``make_run``: ``final/``
= the tiny pre-trained model with one tensor shifted) and evaluated for real (lm-eval, alpaca_eval
and PandaLM with the test-double judge, memorization) with ``eval=cpu_small`` and few items.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.eval import harness, pool, stage
from pipeline.eval.results import read_results
from test_eval_stage import _cfg, make_run  # noqa: E402  (the run-folder helpers)

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = [
    "eval.limit=2",
    "eval.benchmarks=[piqa,truthfulqa_gen,alpaca_eval,pandalm]",
    "eval.mechanisms=[mech_loss_rsd,mech_memorization_bleu,mech_alpacaeval_length]",
    "eval.memorization_prompts=4",
]
ENV_KEYS = ("pretty_env_info", "transformers_version", "lm_eval_version", "upper_git_hash")


def _two_runs(model_cache, runs_dir, *extra):
    a = make_run(_cfg(model_cache, runs_dir, *EVAL, *extra))
    b = make_run(_cfg(model_cache, runs_dir, *EVAL, "plw=0.5", *extra))
    return [a, b]


def _forget_results(runs_dir: Path, rds) -> None:
    for rd in rds:
        shutil.rmtree(rd.path / "eval")
        (rd.path / "results.csv").unlink()
    shutil.rmtree(runs_dir / "_baselines")


def _env_info(rd, task="plw_piqa"):
    raw = json.loads((rd.path / "eval" / "lm_eval" / f"{task}.json").read_text())
    return {k: raw[k] for k in ENV_KEYS}


def test_two_workers_give_the_values_of_one_process(model_cache, tmp_path, caplog):
    runs = tmp_path / "runs"
    rds = _two_runs(model_cache, runs)
    cfg = _cfg(model_cache, runs, *EVAL)
    threads = max(1, pool.cpu_count() // 2)  # what each of the two workers gets
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        one = stage.evaluate_all(cfg)
    finally:
        torch.set_num_threads(n)
    rows_one = {rd.path.name: read_results(rd.path / "results.csv") for rd in rds}
    env_one = _env_info(rds[0])
    _forget_results(runs, rds)

    with caplog.at_level(logging.INFO, logger="pipeline.eval"):
        two = stage.evaluate_all(_cfg(model_cache, runs, *EVAL, "eval.workers=2"))
    assert (
        two == one == [(rd.path.name, rd.path / "results.csv", None) for rd in sorted(rds, key=lambda r: r.path.name)]
    )
    for rd in rds:  # every column of every row (results.csv has no timing field)
        rows = read_results(rd.path / "results.csv")
        assert rows == rows_one[rd.path.name]
        assert {r["benchmark"] for r in rows if r["status"] == "ok"} == {
            "piqa",
            "truthfulqa_gen",
            "alpaca_eval",
            "pandalm",
            "mech_loss_rsd",
            "mech_memorization_bleu",
            "mech_alpacaeval_length",
        }
        assert _env_info(rd) == env_one  # lm-eval's environment description, computed in the worker
        assert env_one["pretty_env_info"] and "PyTorch version" in env_one["pretty_env_info"]
    # one line per finished run, in the parent
    done = [
        r.getMessage()
        for r in caplog.records
        if r.name == "pipeline.eval" and re.match(r"\[\d+/\d+\] ", r.getMessage())
    ]
    assert sorted(m.split("] ")[0] for m in done) == ["[1/2", "[2/2"]
    assert sorted(m.split("] ")[1].split(":")[0] for m in done) == sorted(rd.path.name for rd in rds)
    assert all(": ok (" in m for m in done)
    # the pre-trained model's PandaLM candidates (both runs need them) were generated once
    assert len(list((runs / "_baselines" / "tiny" / "eval" / "pandalm").glob("candidates-*.json"))) == 1


def test_a_killed_worker_is_retried(model_cache, tmp_path, caplog):
    runs = tmp_path / "runs"
    few = ["eval.limit=1", "eval.benchmarks=[piqa]", "eval.mechanisms=[mech_loss_rsd]"]
    rds = [make_run(_cfg(model_cache, runs, *few)), make_run(_cfg(model_cache, runs, *few, "plw=0.5"))]
    cfg = _cfg(model_cache, runs, *few, "eval.workers=2")
    out = {}
    with caplog.at_level(logging.INFO, logger="pipeline.eval"):
        t = threading.Thread(target=lambda: out.setdefault("res", stage.evaluate_all(cfg)))
        t.start()
        killed = None
        deadline = time.time() + 300
        while killed is None and time.time() < deadline and t.is_alive():
            for rd in rds:  # a worker holds a run's lock while evaluating it: "<host> pid <pid> since ..."
                lock = rd.path / "eval" / ".lock"
                text = lock.read_text() if lock.is_file() else ""
                if " pid " in text:
                    killed = int(text.split(" pid ")[1].split()[0])
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.01)
        t.join(600)
    assert killed is not None and killed != os.getpid()
    assert [(name, err) for name, _, err in out["res"]] == [(rd.path.name, None) for rd in rds]
    for rd in rds:
        assert {r["status"] for r in read_results(rd.path / "results.csv")} == {"ok"}
    assert any("retried in fresh processes" in r.getMessage() for r in caplog.records)


def test_lm_eval_environment_described_once_per_process(model_cache, tmp_path, monkeypatch):
    from lm_eval.loggers import utils as lm_utils

    import lm_eval.evaluator

    computed = []
    real = lm_utils.add_env_info

    def counting(storage):
        real(storage)
        computed.append(dict(storage))

    monkeypatch.setattr(lm_utils, "add_env_info", counting)
    monkeypatch.setattr(harness, "_ENV_INFO", {})
    runs = tmp_path / "runs"
    cfg = _cfg(model_cache, runs, "eval.limit=1", "eval.benchmarks=[piqa,winogrande]", "eval.mechanisms=[]")
    rd = make_run(cfg)
    stage.evaluate_run(rd.path, cfg)
    assert lm_eval.evaluator.add_env_info is harness.cached_add_env_info
    assert len(computed) == 1  # two simple_evaluate calls, one environment description
    want = {k: computed[0][k] for k in ENV_KEYS}
    assert _env_info(rd, "plw_piqa") == want and _env_info(rd, "plw_winogrande") == want


def test_models_loaded_after_the_freeze_are_collected(model_cache, tmp_path, monkeypatch):
    """The import-time objects are frozen before the evaluated model exists: the model stays in the
    collected generations and is freed when released."""
    cfg = _cfg(model_cache, tmp_path / "runs", "eval.benchmarks=[piqa]", "eval.mechanisms=[]")
    rd = make_run(cfg)
    monkeypatch.setattr(stage, "_FROZEN", False)
    ev = stage.Evaluation(stage.Target(folder=rd.path, run_id="r", model_dir=rd.final, model_cfg=cfg.model), cfg)
    lm = ev.load_model(rd.final, cfg.model)
    assert stage._FROZEN and gc.get_freeze_count() > 0
    model = weakref.ref(lm.model)
    assert any(o is lm.model for o in gc.get_objects())  # not in the permanent (frozen) generation
    del lm
    gc.collect()
    assert model() is None


def test_workers_must_be_positive():
    with pytest.raises(ConfigError, match="eval.workers"):
        load_config(["eval.workers=0"])
    assert load_config([]).eval.workers == 1
