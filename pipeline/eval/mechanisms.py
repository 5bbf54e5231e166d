"""Mechanism metrics (SPEC.md section 5, paper section 5.3; results.csv benchmarks ``mech_*``).

Pure functions (tested against independent computations):

- :func:`loss_rsd` -- training-loss relative standard deviation: the per-step losses are cut into
  windows of ``window`` (5) consecutive optimizer steps (``tumbling``: non-overlapping, a trailing
  partial window is dropped; ``rolling``: every run of 5 consecutive steps); RSD of a window =
  sample standard deviation (ddof 1) / mean; the metric is the mean over windows.
- :func:`corpus_bleu` -- sacreBLEU corpus BLEU with the paper's signature
  ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp`` (sacreBLEU's defaults).
- :func:`select_prompts` -- up to N unique training prompts (the rendered Alpaca source), a seeded
  sample when there are more.
- :func:`weight_distance` -- distance between the fine-tuned and the pre-trained weights, streamed
  tensor by tensor from the safetensors files: ``l1_mean`` = mean over parameter tensors of the
  p = 1 Minkowski distance sum|w - w0| (the SPEC's regularizer quantity), ``l2`` = sqrt of
  sum (w - w0)^2 over all parameters. A tensor whose first dimension grew (the embedding rows of an
  added pad token) is compared over the shared rows; tensors present on one side only are skipped;
  both are said in the notes.

I/O helpers: :func:`read_losses` (metrics.jsonl: the last line of every step that has a ``loss``;
bad lines are errors naming the file and line), :func:`summary_distance` (the trainer's summary,
when it wrote the distance).
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
    (a resumed run may log a step again). Lines without ``loss`` (evaluations) are ignored."""
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
        if not isinstance(rec, dict) or "loss" not in rec:
            continue
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
@dataclass
class Distance:
    l1_mean: float
    l2: float
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
    """Distances between two saved checkpoints (see the module docstring); float64 accumulation."""
    import torch
    from safetensors import safe_open

    a, b = _tensor_index(trained), _tensor_index(pretrained)
    shared = [k for k in a if k in b]
    notes: List[str] = []
    only = sorted(set(a) ^ set(b))
    if only:
        notes.append(f"{len(only)} tensor(s) present in one checkpoint only, skipped: {only[:4]}"
                     f"{' ...' if len(only) > 4 else ''}")
    if not shared:
        raise MechanismError(f"{trained} and {pretrained} share no tensor names")
    l1_sum, sq, n = 0.0, 0.0, 0
    handles: Dict[Path, Any] = {}
    try:
        def get(path: Path, key: str):
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            return handles[path].get_tensor(key)

        for k in shared:
            x, y = get(a[k], k).to(torch.float64), get(b[k], k).to(torch.float64)
            if x.shape != y.shape:
                if x.dim() == y.dim() and x.shape[1:] == y.shape[1:]:
                    rows = min(x.shape[0], y.shape[0])
                    notes.append(f"{k}: shapes {tuple(x.shape)} vs {tuple(y.shape)}, compared over the "
                                 f"{rows} shared rows (added tokens)")
                    x, y = x[:rows], y[:rows]
                else:
                    notes.append(f"{k}: shapes {tuple(x.shape)} vs {tuple(y.shape)} differ, skipped")
                    continue
            d = x - y
            l1_sum += float(d.abs().sum())
            sq += float((d * d).sum())
            n += 1
    finally:
        handles.clear()
    if n == 0:
        raise MechanismError(f"{trained} vs {pretrained}: no comparable tensors")
    return Distance(l1_mean=l1_sum / n, l2=math.sqrt(sq), n_tensors=n, notes=notes)


SUMMARY_FILES = ("train_summary.json", "summary.json")


def summary_distance(run_dir: Path) -> Optional[Dict[str, float]]:
    """``{"l1_mean": .., "l2": ..}`` from the trainer's summary if it wrote them (keys
    ``weight_distance: {l1_mean, l2}`` or ``weight_distance_l1_mean`` / ``weight_distance_l2``)."""
    for name in SUMMARY_FILES:
        p = Path(run_dir) / name
        if not p.is_file():
            continue
        try:
            s = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        wd = s.get("weight_distance") if isinstance(s, dict) else None
        if isinstance(wd, dict) and {"l1_mean", "l2"} <= set(wd):
            return {"l1_mean": float(wd["l1_mean"]), "l2": float(wd["l2"]), "source": str(p)}
        if isinstance(s, dict) and {"weight_distance_l1_mean", "weight_distance_l2"} <= set(s):
            return {"l1_mean": float(s["weight_distance_l1_mean"]), "l2": float(s["weight_distance_l2"]),
                    "source": str(p)}
    return None
