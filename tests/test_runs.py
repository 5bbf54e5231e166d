"""The run store (pipeline/runs.py): identity, folder naming, atomic status, attempts and failures,
liveness (lock, heartbeat), progress and JSONL reading."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runs import (
    CORRUPT,
    CorruptStatus,
    RunDir,
    append_jsonl,
    atomic_write_json,
    create_run,
    identity_hash,
    list_runs,
    read_jsonl,
    read_jsonl_tail,
    run_id,
    run_identity,
    slurm_job_id_from_env,
)

BASE = ["model=tiny", "dataset=shared_alpaca52k", "train=cpu_small", "plw=0.1"]


@pytest.fixture(scope="module")
def base_cfg():
    return load_config(BASE)


def _rid(*extra, variant="none"):
    return run_id(load_config([*BASE, *extra]), variant)


def test_run_id_is_readable_and_hash_named(base_cfg):
    rid = run_id(base_cfg)
    assert rid.startswith("tiny__shared_alpaca52k__plw0.1__s42__")
    assert rid.endswith(identity_hash(run_identity(base_cfg)))
    assert run_id(base_cfg, "weight_decay_0.1").split("__")[3] == "weight_decay_0.1"


@pytest.mark.parametrize(
    "runtime",
    [
        "launcher=slurm",
        "launcher.partition=gpu",
        "model.resources.gpus_per_node=8",
        "train.per_device_batch_size=2",
        "train.save_steps=7",
        "train.logging_steps=5",
        "train.distributed=ddp",
        "train.gradient_checkpointing=true",
        "paths.runs_dir=/elsewhere",
        "model.resources.mem_gb=999",
        "model.params_billion=9",
    ],
)
def test_runtime_settings_do_not_change_the_identity(base_cfg, runtime):
    assert _rid(runtime) == run_id(base_cfg)


@pytest.mark.parametrize(
    "defining",
    [
        "plw=0.2",
        "seed=1",
        "dataset=shared_alpaca52k_short",
        "dataset.max_records=10",
        "model.init_seed=1",
        "train.learning_rate=1e-3",
        "train.global_batch_size=16",
        "train.loss_normaliser=token_count",
        "completion_weight=0.5",
        "train.weight_decay=0.1",
    ],
)
def test_defining_fields_change_the_identity(base_cfg, defining):
    assert _rid(defining) != run_id(base_cfg)


def test_variant_and_code_versions_are_part_of_the_identity(base_cfg, monkeypatch):
    assert run_id(base_cfg, "minkowski_0.1") != run_id(base_cfg)
    import pipeline.data.inversion
    import pipeline.data.records
    import pipeline.runs as runs

    before = run_id(base_cfg)
    for module, name in [
        (pipeline.data.inversion, "TRANSFORM_VERSION"),
        (pipeline.data.records, "RECORDS_VERSION"),
        (runs, "RUN_VERSION"),
    ]:
        monkeypatch.setattr(module, name, getattr(module, name) + 1)
        assert run_id(base_cfg) != before, name
        monkeypatch.undo()
    assert run_id(base_cfg) == before


def test_micro_batch_identity_includes_the_batch_split():
    """micro_batch normalises each micro-batch by its own weight sum: the gradient depends on
    per_device_batch_size, so the run does too; with weight_sum (or token_count) it does not."""
    for normaliser, differ in [("micro_batch", True), ("weight_sum", False), ("token_count", False)]:
        ids = {_rid(f"train.loss_normaliser={normaliser}", f"train.per_device_batch_size={b}") for b in (2, 4)}
        assert (len(ids) == 2) == differ, normaliser


def test_identity_is_marked_on_the_schema(base_cfg):
    from dataclasses import fields

    from pipeline.config import RUNTIME, TrainConfig, identity_of, validate

    runtime = {f.name for f in fields(TrainConfig) if f.metadata == RUNTIME}
    assert {"nproc", "save_steps", "logging_steps", "distributed", "resume"} <= runtime
    ident = run_identity(base_cfg)
    assert not runtime & set(ident["train"]) and "learning_rate" in ident["train"]
    assert "per_device_batch_size" not in ident["train"]
    assert set(ident) == {"model", "dataset", "plw", "completion_weight", "train", "seed", "variant", "versions"}
    # the typed config (validated once at an entry point) has the same identity as the composed one
    typed = validate(base_cfg)
    assert run_identity(typed) == ident and run_id(typed) == run_id(base_cfg)
    assert identity_of(typed.train) == ident["train"]
    # and so has the resolved config.yaml a run folder holds, read back without the schema
    from omegaconf import OmegaConf

    assert run_id(OmegaConf.create(OmegaConf.to_yaml(base_cfg, resolve=True))) == run_id(base_cfg)


# Run ids computed before the identity moved onto the schema: the run store of earlier versions
# stays valid. A change here renames every run folder of that config: bump RUN_VERSION consciously.
PINNED_IDS = {
    (): "llama1_7b__alpaca_data__plw0__s42__b919f37606a4",
    tuple(BASE): "tiny__shared_alpaca52k__plw0.1__s42__4bc16f1ff879",
    (
        "model=tinylm_a",
        "dataset=shared_alpaca52k_short",
        "train=demo",
        "plw=0.01",
    ): "tinylm_a__shared_alpaca52k_short__plw0.01__s42__21212b451d8d",
    (
        "model=smollm2_135m",
        "dataset=dolly_short",
        "train=cpu_small",
    ): "smollm2_135m__dolly_short__plw0__s42__5eb9acdae68a",
    (
        "model=llama3_8b",
        "dataset=ultrafeedback_short",
        "plw=1.0",
        "train.packing=true",
    ): "llama3_8b__ultrafeedback_short__plw1__s42__ad87a5241bcb",
}


@pytest.mark.parametrize("overrides", list(PINNED_IDS), ids=lambda o: " ".join(o) or "default")
def test_run_ids_of_existing_configs_are_stable(overrides, monkeypatch):
    # A local dataset's file path is part of its definition, and so of the run's identity: the ids
    # above were computed in a checkout at /work/main with ../shared beside it. The same paths give
    # the same ids from any checkout.
    monkeypatch.setenv("PLW_SHARED_DIR", "/work/main/../shared")
    assert run_id(load_config(list(overrides))) == PINNED_IDS[overrides]


def test_create_run_writes_config_and_identity_once(base_cfg, tmp_path):
    from omegaconf import OmegaConf

    cfg = base_cfg.copy()
    cfg.paths.runs_dir = str(tmp_path)
    rd = create_run(cfg)
    assert rd.path.parent == tmp_path and rd.path.name == run_id(cfg)
    info = json.loads(rd.run_json.read_text())
    assert (info["model"], info["dataset"], info["plw"], info["variant"], info["seed"]) == (
        "tiny",
        "shared_alpaca52k",
        0.1,
        "none",
        42,
    )
    assert OmegaConf.load(rd.config).plw == 0.1
    first = rd.config.read_text()
    cfg.train.save_steps = 99  # runtime: same run, config.yaml is not rewritten
    assert create_run(cfg) == rd and rd.config.read_text() == first
    assert list_runs(tmp_path) == [rd]
    assert rd.status() == {"state": "pending", "attempts": 0}


def test_status_counts_attempts_and_failures_and_records_where(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "r")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    s = rd.set_status("running")
    assert s["attempts"] == 1 and s["pid"] == os.getpid() and s["slurm_job_id"] == "77_3"
    s = rd.set_status("failed", error="boom")
    assert (s["state"], s["failures"], s["error"]) == ("failed", 1, "boom")
    s = rd.set_status("running")
    assert s["attempts"] == 2 and "error" not in s and s["failures"] == 1
    s = rd.set_status("done", final_loss=1.5)
    assert s["state"] == "done" and s["final_loss"] == 1.5 and s["attempts"] == 2
    assert json.loads(rd.status_file.read_text()) == s
    with pytest.raises(ValueError, match="unknown run state"):
        rd.set_status("paused")
    assert not [p for p in rd.path.iterdir() if p.name.endswith(".tmp")]


def _bump(path: str, n: int) -> None:
    rd = RunDir(Path(path))
    for _ in range(n):
        rd.set_status("running")


def test_concurrent_status_updates_lose_nothing(tmp_path):
    """Read-modify-write of status.json is serialised between processes (trainer, worker, sweep)."""
    rd = RunDir(tmp_path / "r")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(str(rd.path), 25)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert rd.status()["attempts"] == 75


def test_slurm_job_id_from_env():
    assert slurm_job_id_from_env({"SLURM_JOB_ID": "12"}) == "12"
    assert (
        slurm_job_id_from_env({"SLURM_JOB_ID": "15", "SLURM_ARRAY_JOB_ID": "12", "SLURM_ARRAY_TASK_ID": "3"}) == "12_3"
    )
    assert slurm_job_id_from_env({}) is None


def test_heartbeat_and_progress(tmp_path):
    rd = RunDir(tmp_path / "r")
    assert rd.heartbeat() is None and rd.progress() == {"step": None, "total": None, "loss": None}
    rd.write_heartbeat(slurm_job_id="5")
    hb = rd.heartbeat()
    assert hb["pid"] == os.getpid() and hb["slurm_job_id"] == "5"
    for step in range(1, 4):
        append_jsonl(rd.metrics, {"kind": "train", "step": step, "total_steps": 10, "loss": 1.0 / step})
    append_jsonl(rd.metrics, {"kind": "eval", "step": 3, "eval_loss": 0.1})
    assert rd.progress() == {"step": 3, "total": 10, "loss": pytest.approx(1 / 3)}


def test_jsonl_torn_last_line_and_tail(tmp_path):
    p = tmp_path / "m.jsonl"
    for i in range(200):
        append_jsonl(p, {"step": i, "pad": "x" * 50})
    with open(p, "a") as f:
        f.write('{"step": 200, "pa')  # a crash mid-write
    rows = read_jsonl(p)
    assert [r["step"] for r in rows] == list(range(200))
    tail = read_jsonl_tail(p, max_bytes=1000)
    assert tail and tail[-1]["step"] == 199 and all(r["step"] == tail[0]["step"] + i for i, r in enumerate(tail))
    p.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(p)


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (Python's json accepts them; JSON does not)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_writers_write_null_for_non_finite_floats(tmp_path):
    obj = {"loss": float("nan"), "rates": [1.5, float("inf"), (float("-inf"), 2)], "nested": {"x": float("nan")}}
    atomic_write_json(tmp_path / "a.json", obj)
    append_jsonl(tmp_path / "m.jsonl", obj)
    want = {"loss": None, "rates": [1.5, None, [None, 2]], "nested": {"x": None}}
    assert _strict((tmp_path / "a.json").read_text()) == want
    assert [_strict(ln) for ln in (tmp_path / "m.jsonl").read_text().splitlines()] == [want]


@pytest.mark.parametrize("text", ['{"state": "done",', "[1, 2]", b"\xff\xfe"], ids=["torn", "not_an_object", "bytes"])
def test_a_corrupt_status_is_reported_and_never_overwritten(tmp_path, text):
    rd = RunDir(tmp_path / "run")
    rd.set_status("running")
    if isinstance(text, bytes):
        rd.status_file.write_bytes(text)
    else:
        rd.status_file.write_text(text)
    before = rd.status_file.read_bytes()
    st = rd.status()
    assert st["state"] == CORRUPT and st["path"] == str(rd.status_file)
    assert str(rd.status_file) in st["error"] and "corrupt" in st["error"]
    with pytest.raises(CorruptStatus, match="corrupt"):
        rd.set_status("failed", error="x")
    assert rd.status_file.read_bytes() == before
    assert rd.progress()["step"] is None  # readers of the store go on


def test_make_eval_leaves_out_and_reports_a_run_with_a_corrupt_status(tmp_path, caplog):
    from pipeline.eval.stage import finished_runs
    from pipeline.lifecycle import mark_done

    good, bad = RunDir(tmp_path / "a_good"), RunDir(tmp_path / "b_bad")
    for rd in (good, bad):
        atomic_write_json(rd.run_json, {"run_id": rd.run_id})
        mark_done(rd, {"steps": 1})
    bad.status_file.write_text("{")
    with caplog.at_level("WARNING", logger="pipeline.eval"):
        assert finished_runs(tmp_path) == [good.path]
    assert str(bad.status_file) in caplog.text
