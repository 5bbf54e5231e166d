"""The results table of an evaluated run (``run_dir/results.csv``) and per-benchmark markers.

Schema (one row per (benchmark, metric); the analysis stage reads exactly this)::

    run_id     the run's id (run.json), or ``baseline__<model>`` for a pre-trained model
    benchmark  arc_challenge, ..., alpaca_eval, pandalm, mech_* (one YAML each: pipeline/eval/benchmarks.py)
    metric     acc, acc_norm, bleu_max, win_rate, score, rsd_mean, ...
    value      the number (lm-eval's scale: accuracies in [0, 1], BLEU/chrF 0-100; AlpacaEval and
               PandaLM win rates 0-100); empty when status is not ok
    stderr     its standard error (empty when there is none)
    n          items the value is computed over
    group      mc | short_gen | long_gen | mechanism (pipeline/eval/groups.py; declared in the YAML)
    status     ok | skipped | error
    message    why it was skipped / failed, or a note (e.g. the test-double judge, few-shot source)
    evaluator  compact JSON of the exact evaluator config (framework and version, task version,
               shots, limit, judge, decoding, data files)

Markers: ``run_dir/eval/done/<benchmark>.json`` holds a benchmark's rows, its evaluator config and
status, written atomically once the benchmark is finished (whatever the outcome). A benchmark is
*finished* when its marker has status ok and the same evaluator config as the current one; a
resumed evaluation skips finished benchmarks and redoes errors, skips (a mirror may have been
filled since) and benchmarks whose evaluator config changed. ``results.csv`` is rebuilt from the
markers (atomically) after every benchmark, so an interruption loses at most the benchmark that
was running.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from pipeline.eval import benchmarks as B
from pipeline.runs import atomic_write_json, atomic_write_text

COLUMNS = ["run_id", "benchmark", "metric", "value", "stderr", "n", "group", "status", "message", "evaluator"]
STATUSES = ("ok", "skipped", "error")
RESULTS_FILE = "results.csv"
EVAL_SUBDIR = "eval"
DONE_SUBDIR = "done"


def evaluator_json(evaluator: Mapping[str, Any]) -> str:
    """Compact, canonical JSON (sorted keys): equal configs give equal strings."""
    return json.dumps(evaluator, sort_keys=True, separators=(",", ":"), default=str)


@dataclass
class ResultRow:
    benchmark: str
    metric: str
    value: Optional[float] = None
    stderr: Optional[float] = None
    n: Optional[int] = None
    status: str = "ok"
    message: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        for k in ("value", "stderr"):
            v = getattr(self, k)
            if v is not None:
                v = float(v)
                setattr(self, k, v if math.isfinite(v) else None)
        if self.status == "ok" and self.value is None:
            self.status = "error"
            self.message = (self.message + "; " if self.message else "") + "no finite value was computed"


@dataclass
class BenchmarkResult:
    """Everything one benchmark produced (its marker file's content)."""

    benchmark: str
    evaluator: Dict[str, Any]
    rows: List[ResultRow] = field(default_factory=list)
    finished: str = ""

    @property
    def status(self) -> str:
        states = {r.status for r in self.rows}
        if not states:
            return "error"
        if states == {"ok"}:
            return "ok"
        return "error" if "error" in states else ("skipped" if states == {"skipped"} else "ok")

    def to_json(self) -> Dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "evaluator": self.evaluator,
            "status": self.status,
            "finished": self.finished or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rows": [asdict(r) for r in self.rows],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "BenchmarkResult":
        return cls(
            benchmark=obj["benchmark"],
            evaluator=dict(obj["evaluator"]),
            rows=[ResultRow(**r) for r in obj["rows"]],
            finished=obj.get("finished", ""),
        )


def status_rows(
    benchmark: str, metrics: Sequence[str], status: str, message: str, n: Optional[int] = None
) -> List[ResultRow]:
    """One row per metric with no value (a skipped or failed benchmark keeps its shape)."""
    return [ResultRow(benchmark, m, None, None, n, status, message) for m in (metrics or ["-"])]


class ResultStore:
    """The evaluation files of one run (or baseline) folder."""

    def __init__(self, folder: Path, run_id: str):
        self.folder = Path(folder)
        self.run_id = run_id

    @property
    def eval_dir(self) -> Path:
        return self.folder / EVAL_SUBDIR

    @property
    def done_dir(self) -> Path:
        return self.eval_dir / DONE_SUBDIR

    @property
    def results_csv(self) -> Path:
        return self.folder / RESULTS_FILE

    def marker(self, benchmark: str) -> Path:
        return self.done_dir / f"{benchmark}.json"

    def load(self, benchmark: str) -> Optional[BenchmarkResult]:
        p = self.marker(benchmark)
        if not p.exists():
            return None
        try:
            return BenchmarkResult.from_json(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError):
            return None  # unreadable marker: the benchmark is redone

    def is_finished(self, benchmark: str, evaluator: Mapping[str, Any]) -> bool:
        res = self.load(benchmark)
        return res is not None and res.status == "ok" and evaluator_json(res.evaluator) == evaluator_json(evaluator)

    def save(self, result: BenchmarkResult, order: Sequence[str] = ()) -> Path:
        """Write the benchmark's marker, then rebuild results.csv (both atomic)."""
        if not result.finished:
            result.finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(self.marker(result.benchmark), result.to_json())
        return self.write_table(order)

    def all_results(self, order: Sequence[str] = ()) -> List[BenchmarkResult]:
        names = [p.stem for p in sorted(self.done_dir.glob("*.json"))] if self.done_dir.is_dir() else []
        known = B.registry()
        registry = [b for b in known if b in names and b not in order]  # the others in the registry's order
        ranked = [b for b in order if b in names] + registry + [b for b in names if b not in order and b not in known]
        out = []
        for b in ranked:
            r = self.load(b)
            if r is not None:
                out.append(r)
        return out

    def write_table(self, order: Sequence[str] = ()) -> Path:
        rows = []
        known = B.registry()
        for res in self.all_results(order):
            ev = evaluator_json(res.evaluator)
            group = known[res.benchmark].group if res.benchmark in known else ""
            for r in res.rows:
                rows.append(
                    {
                        "run_id": self.run_id,
                        "benchmark": r.benchmark,
                        "metric": r.metric,
                        "value": r.value,
                        "stderr": r.stderr,
                        "n": r.n,
                        "group": group,
                        "status": r.status,
                        "message": r.message,
                        "evaluator": ev,
                    }
                )
        atomic_write_text(self.results_csv, format_csv(rows))
        return self.results_csv


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def format_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in COLUMNS])
    return buf.getvalue()


def read_results(path: Path) -> List[Dict[str, Any]]:
    """results.csv as a list of dicts (value/stderr as floats or None, n as int or None)."""
    with open(path, newline="", encoding="utf-8") as f:
        out = []
        for r in csv.DictReader(f):
            for k in ("value", "stderr"):
                r[k] = float(r[k]) if r[k] != "" else None
            r["n"] = int(float(r["n"])) if r["n"] != "" else None
            out.append(r)
    return out
