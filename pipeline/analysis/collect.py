"""Read every run folder of the run store into one tidy table.

Each ``<runs_dir>/<run_id>/`` holds ``run.json`` (the run's factors), ``train_summary.json`` (written
by training; its ``data.dataset_rg`` is the training set's R_g, measured by the data stage) and
``results.csv`` (one row per benchmark x metric; written by the evaluation stage). The collected
table has one row per run x benchmark x metric with the factors joined in and
``w_p = plw ** 0.30103`` added. The run store is only read, never written.

A run's R_g (:func:`run_rg`), first found of: ``train_summary.json`` ``data.dataset_rg``; ``r_g`` in
run.json (written by the analysis of earlier versions, or by hand); the ``rg`` (or, for an inverted
dataset, ``transform.rg_after``) of the processed dataset's meta.json named by ``train_summary.json``
``data.dataset_dir`` (read only; runs trained before the data stage recorded R_g). A run with none
of them is skipped with a note saying how to record it.

A folder whose files are missing or malformed is reported (an :class:`Issue` naming the folder and
the file) and skipped; the other runs are still collected. Hidden folders (name starting with
'.' or '_') without a run.json are ignored; every other folder is either collected or reported.
Rows the evaluation itself marked ``skipped``/``error`` (``status`` column; e.g. a benchmark absent
from an offline mirror) are left out and reported once per benchmark for the whole store (an info
issue with scope ``benchmark``); an ``ok`` row without a numeric value is dropped with a warning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

from pipeline.analysis.common import GROUPS, P_EXP, IssueLog

RUN_FIELDS_REQUIRED = ("run_id", "model", "dataset", "plw", "seed")
SUMMARY_FILE = "train_summary.json"  # written by the trainer (pipeline/trainer/loop.py)
RESULT_COLUMNS_REQUIRED = ("benchmark", "metric", "value", "group")
RESULT_COLUMNS = ("run_id", "benchmark", "metric", "value", "stderr", "n", "group")
FACTOR_COLUMNS = ["run_id", "dataset", "model", "plw", "w_p", "regularizer", "seed", "r_g"]
COLUMNS = FACTOR_COLUMNS + ["benchmark", "group", "metric", "value", "stderr", "n", "run_dir"]


def _read_run_json(folder: Path, log: IssueLog) -> Optional[dict]:
    f = folder / "run.json"
    where = str(folder)
    if not f.is_file():
        log.add("run", where, "missing run.json (the run's factors); run skipped")
        return None
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.add("run", where, f"run.json is not valid JSON ({e}); run skipped")
        return None
    if not isinstance(meta, dict):
        log.add("run", where, "run.json must hold a JSON object; run skipped")
        return None
    missing = [k for k in RUN_FIELDS_REQUIRED if meta.get(k) is None]
    if missing:
        log.add("run", where, f"run.json lacks {missing}; run skipped")
        return None
    try:
        plw = float(meta["plw"])
        seed = int(meta["seed"])
    except (TypeError, ValueError):
        log.add("run", where, "run.json: plw must be a number and seed an integer; run skipped")
        return None
    if not (math.isfinite(plw) and plw >= 0):
        log.add("run", where, f"run.json: plw must be a number >= 0, got {meta['plw']!r}; run skipped")
        return None
    r_g, problem = run_rg(folder, meta)
    if problem is not None:
        log.add("run", where, f"{problem}; run skipped")
        return None
    reg = meta.get("regularizer")
    reg = "none" if reg is None or str(reg).strip() == "" else str(reg)
    if str(meta["run_id"]) != folder.name:
        log.add(
            "run",
            where,
            f"run.json run_id {meta['run_id']!r} differs from the folder name; the run_id in run.json is used",
            level="warning",
        )
    return {
        "run_id": str(meta["run_id"]),
        "dataset": str(meta["dataset"]),
        "model": str(meta["model"]),
        "plw": plw,
        "regularizer": reg,
        "seed": seed,
        "r_g": r_g,
    }


def _number(v: Any) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _read_json(path: Path) -> Tuple[Optional[dict], Optional[str]]:
    """(object, None), (None, None) when the file does not exist, or (None, problem)."""
    if not path.is_file():
        return None, None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"{path} cannot be read ({type(e).__name__}: {e})"
    return (obj, None) if isinstance(obj, dict) else (None, f"{path} must hold a JSON object")


def run_rg(folder: Path, meta: dict) -> Tuple[Optional[float], Optional[str]]:
    """The training set's R_g of the run in ``folder`` (run.json ``meta``): ``(value, None)`` or
    ``(None, problem)``. Only reads (see the module docstring for where it is looked up)."""
    folder = Path(folder)
    summary, problem = _read_json(folder / SUMMARY_FILE)
    data = (summary or {}).get("data")
    data = data if isinstance(data, dict) else {}
    sources = []  # (where, value) in order of precedence
    if data.get("dataset_rg") is not None:
        sources.append((f"{folder / SUMMARY_FILE} data.dataset_rg", data["dataset_rg"]))
    if meta.get("r_g") is not None:
        sources.append((f"{folder / 'run.json'} r_g", meta["r_g"]))
    if sources:
        where, v = sources[0]
        x = _number(v)
        if x is None or x <= 0:
            return None, f"{where} must be a number > 0, got {v!r}"
        return x, None
    ds_dir = data.get("dataset_dir")
    if ds_dir:
        ds_meta_path = Path(ds_dir) / "meta.json"
        ds_meta, ds_problem = _read_json(ds_meta_path)
        if ds_meta is not None:
            rg = ds_meta.get("rg")
            if rg is None and (ds_meta.get("transform") or {}).get("kind") == "invert":
                rg = ds_meta["transform"].get("rg_after")
            x = _number(rg)
            if x is not None and x > 0:
                return x, None
            return None, (
                f"no R_g recorded: {folder / SUMMARY_FILE} has no data.dataset_rg, run.json no r_g, and "
                f"{ds_meta_path} no rg (built before the data stage recorded R_g: `make data "
                f"OVERRIDES=\"dataset={meta.get('dataset')} ...\"` with the run's dataset settings adds it)"
            )
        return None, (
            f"no R_g recorded: {folder / SUMMARY_FILE} has no data.dataset_rg, run.json no r_g, and "
            + (ds_problem or f"the run's processed dataset {ds_meta_path} is gone")
        )
    why = problem or (
        f"{folder / SUMMARY_FILE} is missing (not trained by the pipeline?)"
        if summary is None
        else f"{folder / SUMMARY_FILE} has neither data.dataset_rg nor data.dataset_dir"
    )
    return None, f"no R_g recorded: run.json has no r_g and {why}"


def _read_results(
    folder: Path, run_id: str, log: IssueLog, not_ok: Optional[Dict[Tuple[str, str], List[str]]] = None
) -> Optional[pd.DataFrame]:
    f = folder / "results.csv"
    where = str(folder)
    if not f.is_file():
        log.add("run", where, "missing results.csv (not evaluated yet?); run skipped")
        return None
    try:
        df = pd.read_csv(f)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        log.add("run", where, f"results.csv cannot be read ({type(e).__name__}: {e}); run skipped")
        return None
    missing = [c for c in RESULT_COLUMNS_REQUIRED if c not in df.columns]
    if missing:
        log.add("run", where, f"results.csv lacks column(s) {missing}; run skipped")
        return None
    if df.empty:
        log.add("run", where, "results.csv has no rows; run skipped")
        return None
    for c in ("stderr", "n"):
        if c not in df.columns:
            df[c] = np.nan
    if "run_id" in df.columns:
        other = sorted(set(df["run_id"].astype(str)) - {run_id})
        if other:
            log.add(
                "run",
                where,
                f"results.csv run_id {other} differs from run.json's {run_id!r}; run.json wins",
                level="warning",
            )
    df["benchmark"] = df["benchmark"].astype(str)
    df["metric"] = df["metric"].astype(str)
    df["group"] = df["group"].astype(str)
    if "status" in df.columns:
        # rows the evaluation itself marked skipped/error (e.g. WMT absent from an offline mirror):
        # dropped, and reported once per benchmark and status for the whole store (collect_runs)
        status = df["status"].fillna("ok").astype(str)
        marked = status != "ok"
        if "message" not in df.columns:
            df["message"] = ""
        if marked.any():
            for b, st, msg in df.loc[marked, ["benchmark", "status", "message"]].itertuples(index=False):
                if not_ok is not None:
                    not_ok.setdefault((b, st), [])
                    not_ok[(b, st)].append(str(msg) if isinstance(msg, str) else "")
                else:
                    log.add("run", where, f"results.csv: {b} is {st}: {msg}", level="info")
            df = df[~marked].copy()
    vals = pd.to_numeric(df["value"], errors="coerce")
    bad = df.loc[vals.isna() | ~np.isfinite(vals.fillna(0)), ["benchmark", "metric"]]
    if len(bad):
        rows = ", ".join(f"{b}/{m}" for b, m in bad.head(5).itertuples(index=False))
        log.add(
            "run",
            where,
            f"results.csv: non-numeric or missing value for {rows}{' ...' if len(bad) > 5 else ''}; those rows dropped",
            level="warning",
        )
    df["value"] = vals
    df = df[vals.notna() & np.isfinite(vals.fillna(0))].copy()
    dup = df.duplicated(["benchmark", "metric"], keep=False)
    if dup.any():
        pairs = sorted(set(map(tuple, df.loc[dup, ["benchmark", "metric"]].values)))
        log.add("run", where, f"results.csv: duplicate benchmark/metric rows {pairs[:5]}; run skipped")
        return None
    unknown = sorted(set(df.loc[~df["benchmark"].str.startswith("mech_"), "group"]) - set(GROUPS))
    if unknown:
        log.add("run", where, f"results.csv: unknown group(s) {unknown} (expected {list(GROUPS)})", level="warning")
    df["stderr"] = pd.to_numeric(df["stderr"], errors="coerce")
    df["n"] = pd.to_numeric(df["n"], errors="coerce")
    return df[["benchmark", "metric", "value", "stderr", "n", "group"]]


TEST_DOUBLE_MARK = "TEST DOUBLE"  # pipeline.eval.judges.TEST_DOUBLE_NOTE starts every such row's message


def provenance(scores: pd.DataFrame) -> Dict[str, List[str]]:
    """What the runs behind ``scores`` (rows with ``run_dir``) were: the pre-trained models, the
    benchmarks of ``scores`` whose rows were judged by a TEST DOUBLE judge (their results.csv message says so),
    and the models the pipeline itself made from scratch (run.json ``identity.model.source`` is
    ``scratch``: the demo's tiny models). Read from the run store; unreadable files count as unknown."""
    models, doubles, scratch = set(), set(), set()
    fitted = set(scores["benchmark"].astype(str)) if "benchmark" in scores else set()
    for run_dir, model in scores[["run_dir", "model"]].drop_duplicates().itertuples(index=False):
        models.add(str(model))
        if not isinstance(run_dir, str) or not run_dir:
            continue
        folder = Path(run_dir)
        try:
            res = pd.read_csv(folder / "results.csv", usecols=lambda c: c in ("benchmark", "message"))
            if "message" in res.columns:
                hit = res["message"].fillna("").astype(str).str.contains(TEST_DOUBLE_MARK, regex=False)
                doubles.update(set(res.loc[hit, "benchmark"].astype(str)) & fitted)
        except (OSError, ValueError, pd.errors.ParserError):
            pass
        meta, _ = _read_json(folder / "run.json")
        source = (((meta or {}).get("identity") or {}).get("model") or {}).get("source")
        if source == "scratch":
            scratch.add(str(model))
    return {"models": sorted(models), "test_double_benchmarks": sorted(doubles), "scratch_models": sorted(scratch)}


def collect_runs(runs_dir: Path, p: float = P_EXP) -> Tuple[pd.DataFrame, IssueLog]:
    """Collect every run folder below ``runs_dir`` (see the module docstring)."""
    log = IssueLog()
    runs_dir = Path(runs_dir)
    frames: List[pd.DataFrame] = []
    if not runs_dir.is_dir():
        log.add("store", str(runs_dir), "the run store does not exist; nothing collected")
        return pd.DataFrame(columns=COLUMNS), log
    seen = {}
    not_ok: Dict[Tuple[str, str], List[str]] = {}
    for folder in sorted(x for x in runs_dir.iterdir() if x.is_dir()):
        if folder.name.startswith((".", "_")) and not (folder / "run.json").exists():
            continue
        meta = _read_run_json(folder, log)
        if meta is None:
            continue
        if meta["run_id"] in seen:
            log.add(
                "run",
                str(folder),
                f"run_id {meta['run_id']!r} already collected from {seen[meta['run_id']]}; run skipped",
            )
            continue
        res = _read_results(folder, meta["run_id"], log, not_ok)
        if res is None:
            continue
        seen[meta["run_id"]] = str(folder)
        for k, v in meta.items():
            res[k] = v
        res["w_p"] = np.power(res["plw"].astype(float), p)
        res["run_dir"] = str(folder)
        frames.append(res)
    for (bench, st), messages in sorted(not_ok.items()):
        example = next((m for m in messages if m), "")
        log.add(
            "benchmark",
            bench,
            f"{st} in results.csv ({len(messages)} row(s) over the store; left out): {example[:200]}",
            level="info",
        )
    if not frames:
        return pd.DataFrame(columns=COLUMNS), log
    df = pd.concat(frames, ignore_index=True)[COLUMNS]
    # R_g is a property of the dataset: runs disagreeing are reported (the mean is used).
    for ds, g in df.groupby("dataset"):
        vals = g["r_g"].unique()
        if len(vals) > 1 and (vals.max() - vals.min()) > 1e-6 * max(1.0, abs(vals.max())):
            log.add(
                "dataset",
                ds,
                f"runs disagree on r_g ({sorted(vals.tolist())}); their mean {vals.mean():.4g} is used",
                level="warning",
            )
            df.loc[g.index, "r_g"] = float(vals.mean())
    return df, log


def write_collected(df: pd.DataFrame, out_dir: Path) -> List[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, pq = out_dir / "collected.csv", out_dir / "collected.parquet"
    df.to_csv(csv, index=False)
    df.to_parquet(pq, index=False)
    return [csv, pq]
