"""Mechanism metrics (docs/study.md section 5, paper section 5.3; results.csv benchmarks ``mech_*``).

Pure functions (tested against independent computations):

- :func:`loss_rsd` -- training-loss relative standard deviation: the per-step losses are cut into
  windows of ``window`` (5) consecutive optimizer steps (``tumbling``: non-overlapping, a trailing
  partial window is dropped; ``rolling``: every run of 5 consecutive steps); RSD of a window =
  sample standard deviation (ddof 1) / mean; the metric is the mean over windows.
- :func:`corpus_bleu` -- sacreBLEU corpus BLEU with the paper's signature
  ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp`` (sacreBLEU's defaults).
- :func:`select_prompts` -- up to N unique training prompts (the rendered Alpaca source), a seeded
  sample when there are more.
- :func:`weight_distance` -- distance between the fine-tuned and the pre-trained weights with the
  trainer's definitions (:mod:`pipeline.trainer.distance`, one implementation): ``l1_mean`` =
  sum|w - w0| / number of elements, ``l2`` = sqrt(sum (w - w0)^2), ``l1_sum_per_tensor`` = mean over
  tensors of each tensor's sum|w - w0| (the p = 1 Minkowski distance of the paper's regularizer),
  ``l1_mean_per_tensor``; rows appended for a pad token are left out. Streamed tensor by tensor
  from the safetensors files (used when the trainer's ``train_summary.json`` lacks them).

I/O helpers: :func:`read_losses` (metrics.jsonl: the last ``"kind": "train"`` line of every step;
bad lines are errors naming the file and line), :func:`summary_distance` (the distance the trainer
wrote in ``train_summary.json``).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

BLEU_SIGNATURE = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp"


class MechanismError(ValueError):
    """Bad input to a mechanism metric (the message names the file, record and field)."""


# --------------------------------------------------------------------------------------------
# training-loss RSD
# --------------------------------------------------------------------------------------------
def windows(values: Sequence[float], window: int = 5, mode: str = "tumbling") -> List[List[float]]:
    if window < 2:
        raise ValueError("window must be >= 2")
    v = list(values)
    if mode == "tumbling":
        return [v[i:i + window] for i in range(0, len(v) - window + 1, window)]
    if mode == "rolling":
        return [v[i:i + window] for i in range(0, len(v) - window + 1)]
    raise ValueError(f"mode must be tumbling or rolling, got {mode!r}")


def rsd(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof 1) / mean."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1))
    return sd / m


def loss_rsd(losses: Sequence[float], window: int = 5, mode: str = "tumbling") -> Tuple[float, List[float]]:
    """(mean RSD over windows, RSD of each window). Raises ValueError with fewer than one window."""
    ws = windows(losses, window, mode)
    if not ws:
        raise ValueError(f"{len(losses)} logged steps: fewer than one {window}-step window")
    per = [rsd(w) for w in ws]
    return sum(per) / len(per), per


def read_losses(path: Path) -> Tuple[List[float], List[int]]:
    """(losses, steps) from metrics.jsonl, ordered by step, the last line of each step winning
    (a resumed run may log a step again). The trainer's ``loss`` (the data loss, before a
    regularizer's penalty) is used; ``"kind": "eval"`` lines and lines without ``loss`` are ignored."""
    path = Path(path)
    if not path.is_file():
        raise MechanismError(f"{path}: no such file (the trainer writes one line per optimizer step)")
    by_step: Dict[int, float] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break  # a torn last line (crash while writing)
            raise MechanismError(f"{path}: line {i} is not valid JSON") from None
        if not isinstance(rec, dict) or "loss" not in rec or rec.get("kind", "train") != "train":
            continue  # validation lines ("kind": "eval") and anything without a training loss
        if "step" not in rec:
            raise MechanismError(f"{path}: line {i}: field 'step' is missing")
        try:
            step, loss = int(rec["step"]), float(rec["loss"])
        except (TypeError, ValueError):
            raise MechanismError(f"{path}: line {i}: fields 'step'/'loss' must be numbers, got "
                                 f"{rec.get('step')!r}/{rec.get('loss')!r}") from None
        if not math.isfinite(loss):
            raise MechanismError(f"{path}: line {i}: field 'loss' is not finite ({loss})")
        by_step[step] = loss
    steps = sorted(by_step)
    return [by_step[s] for s in steps], steps


# --------------------------------------------------------------------------------------------
# memorization
# --------------------------------------------------------------------------------------------
def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> Tuple[float, str]:
    """(corpus BLEU 0-100, sacreBLEU signature) with one reference per hypothesis."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    bleu = BLEU()  # tokenize 13a, smooth exp, case-sensitive, no effective order
    score = bleu.corpus_score(list(hypotheses), [list(references)])
    return float(score.score), bleu.get_signature().format()


def select_prompts(records: Sequence[Mapping[str, Any]], n: int, seed: int = 0) -> List[Tuple[str, str]]:
    """Up to ``n`` (prompt, output) pairs with unique prompts (first occurrence's output), in record
    order; a seeded sample of the unique prompts when there are more than ``n``."""
    from pipeline.preprocess import render_source

    seen: Dict[str, str] = {}
    for i, r in enumerate(records):
        if not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise MechanismError(f"training record {i}: fields 'instruction'/'output' must be strings")
        src = render_source(r)
        if src not in seen:
            seen[src] = r["output"]
    items = list(seen.items())
    if n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# --------------------------------------------------------------------------------------------
# weight distance
# --------------------------------------------------------------------------------------------
DISTANCE_METRICS = ("l1_mean", "l2", "l1_sum_per_tensor", "l1_mean_per_tensor")


@dataclass
class Distance:
    values: Dict[str, float]  # DISTANCE_METRICS
    n_tensors: int
    notes: List[str] = field(default_factory=list)


def _tensor_index(folder: Path) -> Dict[str, Path]:
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise MechanismError(f"{folder}: no *.safetensors weight files")
    index: Dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                index[k] = f
    return index


def weight_distance(trained: Path, pretrained: Path) -> Distance:
    """The trainer's weight distance (:func:`pipeline.trainer.distance.weight_distance`, the one
    implementation) between two saved checkpoints, streamed tensor by tensor from their safetensors
    files: every tensor of the pre-trained checkpoint against the fine-tuned one's."""
    from safetensors import safe_open

    from pipeline.trainer.distance import weight_distance as distance

    a, b = _tensor_index(trained), _tensor_index(pretrained)
    handles: Dict[Path, Any] = {}

    def get(path: Path, key: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(key)

    try:
        res = distance(lambda k: get(a[k], k) if k in a else None, ((k, get(b[k], k)) for k in sorted(b)))
    except (KeyError, ValueError) as e:
        raise MechanismError(f"{trained} vs {pretrained}: {e.args[0] if e.args else e}") from None
    finally:
        handles.clear()
    notes = []
    extra = sorted(set(a) - set(b))
    if extra:
        notes.append(f"{len(extra)} tensor(s) only in the fine-tuned checkpoint, not compared: {extra[:4]}")
    if res.get("rows_excluded"):
        notes.append(str(res.get("note")) + f" {res['rows_excluded']}")
    return Distance({k: float(res[k]) for k in DISTANCE_METRICS}, int(res["tensors"]), notes)


SUMMARY_FILE = "train_summary.json"


def summary_distance(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The trainer's ``train_summary.json`` ``weight_distance`` (its metrics and ``tensors``), or None."""
    p = Path(run_dir) / SUMMARY_FILE
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    wd = s.get("weight_distance") if isinstance(s, dict) else None
    if not isinstance(wd, dict) or not {"l1_mean", "l2"} <= set(wd):
        return None
    out: Dict[str, Any] = {k: float(wd[k]) for k in DISTANCE_METRICS if isinstance(wd.get(k), (int, float))}
    out["tensors"] = wd.get("tensors")
    out["source"] = str(p)
    return out
