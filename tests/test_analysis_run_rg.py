"""R_g flows one way: the data stage measures it (processed meta.json), training copies it into the
run's train_summary.json, the analysis only reads it (docs/analysis.md, "Input").

- the recorded R_g equals the Table 1 statistics (what the analysis used to compute itself) and an
  independent sentencepiece count;
- collect finds it in the run store (and, for runs trained before it was recorded, in run.json or
  the processed dataset's meta.json), or leaves the run out with one clear note, writing nothing;
- acceptance: ``regress`` (the command ``make regress`` runs) leaves every file under the run store
  byte-identical, also for runs in the old layouts, and gives the same report on a read-only store
  with its output elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from _train_common import SMALL, overrides, tokenizer_dir  # noqa: E402  (the trainer tests' small recipe)
from pipeline.analysis import rbridge as rb
from pipeline.analysis.collect import collect_runs, run_rg
from pipeline.analysis.simulate import simulate_run_store, write_run_folders
from pipeline.config import load_config
from pipeline.data.build import build
from pipeline.data.stats import dataset_stats
from pipeline.train import run
from test_data_stats import _independent  # noqa: E402  (plain Python + sentencepiece Table 1 numbers)


def snapshot(root: Path) -> dict:
    """Every file under ``root``: sha256, size and modification time (a rewrite with the same bytes
    changes the time), and every folder."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        st = p.lstat()
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------------
# the data stage's value
# ------------------------------------------------------------------------------------------------
@pytest.mark.shared
@pytest.mark.parametrize(
    "name,file,short",
    [
        ("shared_alpaca52k", "alpaca52k_torchtune_tiny.jsonl", False),
        ("shared_alpaca52k_short", "alpaca52k_torchtune_tiny.jsonl", True),
        ("shared_alpaca_gpt4", "alpaca_gpt4_llamafactory_en_demo.jsonl", False),
    ],
)
def test_processed_meta_records_rg_equal_to_an_independent_count(
    name, file, short, tmp_path, instructions_dir, llama_tokenizer_dir
):
    import sentencepiece as spm

    cfg = load_config([f"dataset={name}", f"paths.data_dir={tmp_path}"])
    res = build(cfg)
    meta = json.loads((res.folder / "meta.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))
    rg = _independent(instructions_dir / file, sp, short)[4]
    assert meta["rg"] == pytest.approx(rg, abs=1e-12)
    assert meta["rg"] == dataset_stats(cfg).rg  # the value the analysis computed itself before
    m = meta["rg_measure"]
    assert m["error"] is None and meta["rg"] == m["completion_tokens"] / m["prompt_tokens"]
    assert m["tokenizer"] == str(llama_tokenizer_dir) and len(m["fingerprint"]) > 8
    if short:
        assert meta["rg"] == meta["transform"]["rg_after"]  # the transform's own counts
    assert res.meta["rg"] == meta["rg"]


# ------------------------------------------------------------------------------------------------
# collect: where a run's R_g is read from (only read)
# ------------------------------------------------------------------------------------------------
def _one_run(runs: Path, ds: str, r_g: float, rg_in: str = "summary") -> Path:
    df = pd.DataFrame(
        [(ds, r_g, "arc_challenge", "m", 0.1, 0.5)], columns=["dataset", "r_g", "benchmark", "model", "plw", "value"]
    )
    (folder,) = write_run_folders(runs, df, rg_in=rg_in).values()
    return folder


def _summary(folder: Path, **data) -> None:
    (folder / "train_summary.json").write_text(json.dumps({"run_id": folder.name, "data": data}))


def _dataset_meta(data_dir: Path, name: str, meta: dict) -> Path:
    d = data_dir / "processed" / f"{name}-0123456789ab"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"name": name, **meta}))
    return d


def test_collect_reads_rg_from_the_run_store_in_order_and_writes_nothing(tmp_path):
    runs, data = tmp_path / "runs", tmp_path / "data"
    new = _one_run(runs, "new", 0.5)  # trained now: train_summary.json
    analysed = _one_run(runs, "analysed", 2.0, rg_in="run.json")  # r_g written by an earlier analysis
    both = _one_run(runs, "both", 3.0)  # the data stage's value wins
    meta = json.loads((both / "run.json").read_text())
    (both / "run.json").write_text(json.dumps({**meta, "r_g": 99.0}))
    upgraded = _one_run(runs, "upgraded", 1.0)  # trained before: meta.json has rg
    _summary(upgraded, dataset_dir=str(_dataset_meta(data, "upgraded", {"rg": 4.25, "transform": {"kind": "none"}})))
    inverted = _one_run(runs, "inverted", 1.0)  # trained before: an inverted dataset
    _summary(
        inverted, dataset_dir=str(_dataset_meta(data, "inverted", {"transform": {"kind": "invert", "rg_after": 0.14}}))
    )
    old = _one_run(runs, "old", 1.0)  # trained before, dataset never rebuilt
    old_ds = _dataset_meta(data, "old", {"transform": {"kind": "none"}})
    _summary(old, dataset_dir=str(old_ds))
    gone = _one_run(runs, "gone", 1.0)
    _summary(gone, dataset_dir=str(data / "processed" / "deleted-0000"))
    untrained = _one_run(runs, "untrained", 1.0)
    (untrained / "train_summary.json").unlink()
    bad = _one_run(runs, "bad", 1.0)
    _summary(bad, dataset_rg="n/a")
    before = snapshot(tmp_path)

    df, log = collect_runs(runs)
    assert snapshot(tmp_path) == before
    got = df.groupby("dataset")["r_g"].first().to_dict()
    assert got == {"new": 0.5, "analysed": 2.0, "both": 3.0, "upgraded": 4.25, "inverted": 0.14}
    msgs = {Path(i.where).name: i.message for i in log}
    assert set(msgs) == {old.name, gone.name, untrained.name, bad.name}
    assert msgs[old.name].startswith("no R_g recorded: ") and str(old_ds / "meta.json") in msgs[old.name]
    assert "make data" in msgs[old.name] and "dataset=old" in msgs[old.name]
    assert "deleted-0000/meta.json is gone" in msgs[gone.name]
    assert "train_summary.json is missing" in msgs[untrained.name]
    assert "data.dataset_rg must be a number > 0, got 'n/a'" in msgs[bad.name]
    assert all(m.endswith("run skipped") for m in msgs.values())
    assert run_rg(new, json.loads((new / "run.json").read_text())) == (0.5, None)
    assert run_rg(analysed, json.loads((analysed / "run.json").read_text())) == (2.0, None)


def test_collect_works_on_a_read_only_store(tmp_path):
    runs = tmp_path / "runs"
    simulate_run_store(
        runs,
        datasets={"a": 0.1, "b": 1.0},
        benchmarks=("piqa",),
        models=("m",),
        plw_levels=(0.0, 1.0),
        mechanisms=False,
    )
    before = snapshot(runs)
    _read_only(runs)
    try:
        df, log = collect_runs(runs)
    finally:
        _writable(runs)
    assert len(log) == 0 and df["run_id"].nunique() == 4
    assert df.groupby("dataset")["r_g"].first().to_dict() == {"a": 0.1, "b": 1.0}
    assert snapshot(runs) == before


# ------------------------------------------------------------------------------------------------
# the data stage -> training -> analysis, with a real (tiny) training run
# ------------------------------------------------------------------------------------------------
@pytest.mark.shared
def test_training_records_the_processed_datasets_rg_and_collect_reads_it(
    request, tmp_path, instructions_dir, llama_tokenizer_dir
):
    import sentencepiece as spm

    cache = request.config.cache.mkdir("plw_train")
    base = {"data_dir": tmp_path / "data", "tokenizer": tokenizer_dir(cache)}
    one_step = [o for o in SMALL if not o.startswith(("train.max_steps=", "train.save_steps=", "train.eval_steps="))]
    rd = run(
        load_config(
            overrides(
                base,
                tmp_path / "runs",
                "train.max_steps=1",
                "train.save_steps=1",
                "train.eval_steps=1",
                recipe=one_step,
            )
        )
    )
    summary = json.loads((rd.path / "train_summary.json").read_text())["data"]
    meta = json.loads((Path(summary["dataset_dir"]) / "meta.json").read_text())
    assert summary["dataset_hash"] == meta["hash"] and summary["dataset_rg"] == meta["rg"]
    # dataset.max_records=40: the first 40 rows
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))
    rows = (instructions_dir / "alpaca52k_torchtune_tiny.jsonl").read_text().splitlines(keepends=True)[:40]
    (tmp_path / "first40.jsonl").write_text("".join(rows))
    assert meta["rg"] == pytest.approx(_independent(tmp_path / "first40.jsonl", sp)[4], abs=1e-12)
    # evaluated (a results.csv), then collected: R_g from train_summary.json, nothing written
    pd.DataFrame(
        {"run_id": [rd.path.name], "benchmark": ["piqa"], "metric": ["acc"], "value": [0.5], "group": ["mc"]}
    ).to_csv(rd.path / "results.csv", index=False)
    before = snapshot(tmp_path)
    df, log = collect_runs(tmp_path / "runs")
    assert snapshot(tmp_path) == before
    assert len(log) == 0 and list(df["r_g"]) == [meta["rg"]]


# ------------------------------------------------------------------------------------------------
# acceptance: make regress writes nothing into the run store; a read-only store gives the same report
# ------------------------------------------------------------------------------------------------
def _read_only(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(stat.S_IMODE(p.lstat().st_mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _writable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(stat.S_IMODE(p.lstat().st_mode) | stat.S_IWUSR)


def _mixed_store(root: Path) -> Path:
    """Runs in every layout: R_g in train_summary.json (trained now), in run.json (analysed by an
    earlier version), only in the processed dataset's meta.json (trained before R_g was recorded:
    an upgraded folder and an inverted dataset's rg_after), and one run with no R_g at all."""
    runs, data = root / "runs", root / "data"
    datasets = {"new": 0.08, "analysed": 1.0, "upgraded": 7.83, "inverted": 0.3}
    folders = simulate_run_store(
        runs,
        datasets=datasets,
        benchmarks=("arc_challenge", "piqa", "truthfulqa_gen"),
        models=("llama1_7b", "llama2_7b"),
        plw_levels=(0.0, 0.01, 0.1, 0.5, 1.0),
        mechanisms=False,
        seed=3,
    )
    up = _dataset_meta(data, "upgraded", {"rg": 7.83, "transform": {"kind": "none"}})
    inv = _dataset_meta(data, "inverted", {"transform": {"kind": "invert", "rg_after": 0.3}})
    for folder in folders.values():
        meta = json.loads((folder / "run.json").read_text())
        if meta["dataset"] == "analysed":
            (folder / "train_summary.json").unlink()
            (folder / "run.json").write_text(json.dumps({**meta, "r_g": 1.0}, indent=1))
        elif meta["dataset"] in ("upgraded", "inverted"):
            _summary(folder, dataset_dir=str(up if meta["dataset"] == "upgraded" else inv))
    lost = _one_run(runs, "lost", 1.0)
    _summary(lost, dataset_dir=str(_dataset_meta(data, "lost", {"transform": {"kind": "none"}})))
    return runs


@pytest.fixture()
def need_r():
    reason = rb.r_unavailable_reason()
    if reason is not None:
        pytest.skip(f"R analysis stack unavailable (R, glmmTMB, mgcv, car, rpy2): {reason}")


def _normalised(out: Path) -> dict:
    """The report and tables of one regress, with the output folder's own path and the report's
    time stamp taken out."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.suffix in (".md", ".csv", ".json"):
            text = p.read_text().replace(str(out), "<out>")
            files[str(p.relative_to(out))] = "\n".join(x for x in text.splitlines() if not x.startswith("Generated "))
    return files


def test_regress_writes_nothing_into_the_run_store_and_a_read_only_store_gives_the_same_report(
    need_r, tmp_path, capsys
):
    from pipeline.analysis.__main__ import main

    runs = _mixed_store(tmp_path)
    data = tmp_path / "data"
    ov = [f"paths.runs_dir={runs}", "analysis.glmm.n_sim=0", "analysis.figure_formats=[png]", "analysis.dpi=40"]
    before, data_before = snapshot(runs), snapshot(data)

    out1 = tmp_path / "reports1" / "analysis"
    assert main(["regress", *ov, f"paths.reports_dir={tmp_path / 'reports1'}"]) == 0
    assert snapshot(runs) == before and snapshot(data) == data_before
    err = capsys.readouterr().err
    assert "no R_g recorded" in err and "lost-0123456789ab/meta.json no rg" in err

    _read_only(runs)
    _read_only(data)
    try:
        # tests run as root, whom chmod does not stop: the snapshots are the real check
        out2 = tmp_path / "elsewhere"
        assert main(["regress", *ov, f"paths.reports_dir={tmp_path / 'reports2'}", f"analysis.output_dir={out2}"]) == 0
    finally:
        _writable(runs)
        _writable(data)
    assert snapshot(runs) == before and snapshot(data) == data_before
    assert not (tmp_path / "reports2").exists()

    first, second = _normalised(out1), _normalised(out2)
    assert set(first) >= {
        "report.md",
        "collected.csv",
        "aggregates.csv",
        "glmm_table3.csv",
        "gam_optimal_plw.csv",
        "issues.csv",
        "results.json",
    }
    assert first == second
    collected = pd.read_csv(out1 / "collected.csv")
    assert collected.groupby("dataset")["r_g"].first().to_dict() == {
        "new": 0.08,
        "analysed": 1.0,
        "upgraded": 7.83,
        "inverted": 0.3,
    }
    assert "lost" in first["report.md"] and "no R_g recorded" in first["report.md"]
    assert os.access(out2 / "report.md", os.R_OK)
