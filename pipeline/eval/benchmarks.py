"""The benchmarks of docs/study.md section 5 and the mechanism metrics: names, groups, defaults, data.

A light module (no heavy imports): the config schema validates ``eval.benchmarks`` /
``eval.mechanisms`` against it.

Every benchmark has a name used everywhere (config lists, results.csv ``benchmark`` column, marker
files), a ``group`` of the results table (``mc`` | ``short_gen`` | ``long_gen`` | ``mechanism``),
and a ``kind`` saying which runner computes it:

- ``harness``: lm-evaluation-harness 0.4.13 with the task template ``pipeline/eval/tasks/<name>.yaml``
  (default shots and reported metrics below; ``eval.shots`` / ``eval.metrics`` override them);
- ``alpaca_eval``: AlpacaEval 1 (pipeline/eval/alpacaeval.py);
- ``pandalm``: PandaLM (pipeline/eval/pandalm.py);
- ``mechanism``: pipeline/eval/mechanisms.py (``mech_*``, runs only).

Where a harness benchmark's data live in the offline mirror is said by its task template
(``dataset_kwargs.data_files``, relative to ``eval.data_dir``); where `make fetch-data` gets them
by pipeline/eval/fetch.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

GROUPS = ("mc", "short_gen", "long_gen", "mechanism")

# truthfulqa_gen's metrics in lm-eval 0.4.13 (BLEURT is commented out there: it needs the BLEURT-20
# model, which cannot run here; see docs/evaluation.md).
TQA_GEN_METRICS = [f"{m}_{s}" for m in ("bleu", "rouge1", "rouge2", "rougeL") for s in ("max", "acc", "diff")]
WMT_METRICS = ["bleu", "chrf", "ter"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    group: str
    kind: str  # harness | alpaca_eval | pandalm | mechanism
    shots: int = 0
    metrics: Tuple[str, ...] = ()  # reported by default
    available: Tuple[str, ...] = ()  # every metric the benchmark can report
    needs_model: bool = True
    description: str = ""


def _wmt(year: str, src: str, tgt: str) -> Benchmark:
    return Benchmark(
        name=f"wmt{year}_{src}_{tgt}", group="short_gen", kind="harness", shots=0,
        metrics=("bleu", "chrf"), available=tuple(WMT_METRICS),
        description=f"WMT{year} {src}->{tgt}, zero-shot instruction, validation + test combined")


_LIST: List[Benchmark] = [
    Benchmark("arc_challenge", "mc", "harness", shots=25, metrics=("acc_norm", "acc"),
              available=("acc", "acc_norm"),
              description="ARC-Challenge, 25-shot, acc_norm"),
    Benchmark("piqa", "mc", "harness", shots=0, metrics=("acc", "acc_norm"), available=("acc", "acc_norm"),
              description="PIQA, 0-shot, acc"),
    Benchmark("truthfulqa_mc2", "mc", "harness", shots=0, metrics=("acc",), available=("acc",),
              description="TruthfulQA-MC2, 0-shot (6-QA preamble built in)"),
    Benchmark("winogrande", "mc", "harness", shots=5, metrics=("acc",), available=("acc",),
              description="WinoGrande (xl), 5-shot, acc"),
    Benchmark("truthfulqa_gen", "short_gen", "harness", shots=0,
              metrics=tuple(TQA_GEN_METRICS), available=tuple(TQA_GEN_METRICS),
              description="TruthfulQA-Gen, 0-shot (6-QA preamble built in); BLEU/ROUGE, no BLEURT"),
    _wmt("14", "en", "fr"), _wmt("14", "fr", "en"),
    _wmt("16", "en", "de"), _wmt("16", "de", "en"),
    _wmt("16", "en", "ro"), _wmt("16", "ro", "en"),
    Benchmark("alpaca_eval", "long_gen", "alpaca_eval", metrics=("win_rate", "avg_length"),
              available=("win_rate", "discrete_win_rate", "avg_length"),
              description="AlpacaEval 1: 805 instructions vs text-davinci-003, LLM judge"),
    Benchmark("pandalm", "long_gen", "pandalm", metrics=("score", "wins", "ties", "losses"),
              available=("score", "wins", "ties", "losses", "position_consistency"),
              description="PandaLM testset v1 (170), both orders, vs eval.pandalm_comparator"),
]

_MECH: List[Benchmark] = [
    Benchmark("mech_loss_rsd", "mechanism", "mechanism", metrics=("rsd_mean",), available=("rsd_mean",),
              needs_model=False, description="training-loss RSD over 5-step windows, mean over windows"),
    Benchmark("mech_weight_distance", "mechanism", "mechanism", metrics=("l1_mean", "l2"),
              available=("l1_mean", "l2", "l1_sum_per_tensor", "l1_mean_per_tensor"), needs_model=False,
              description="distance of the fine-tuned weights to the pre-trained ones"),
    Benchmark("mech_memorization_bleu", "mechanism", "mechanism", metrics=("bleu",), available=("bleu",),
              description="corpus BLEU of greedy completions of training prompts vs training outputs"),
    Benchmark("mech_alpacaeval_length", "mechanism", "mechanism", metrics=("mean_chars", "mean_tokens"),
              available=("mean_chars", "mean_tokens"),
              description="length of the AlpacaEval generations"),
]

BENCHMARKS: Dict[str, Benchmark] = {b.name: b for b in _LIST}
MECHANISMS: Dict[str, Benchmark] = {b.name: b for b in _MECH}
ALL: Dict[str, Benchmark] = {**BENCHMARKS, **MECHANISMS}

WMT_LANGUAGES = {"en": "English", "fr": "French", "de": "German", "ro": "Romanian"}


def get(name: str) -> Benchmark:
    try:
        return ALL[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(ALL)}") from None


def shots_for(name: str, overrides: Optional[Dict[str, int]] = None) -> int:
    if overrides and name in overrides:
        return int(overrides[name])
    return get(name).shots


def metrics_for(name: str, overrides: Optional[Dict[str, List[str]]] = None) -> List[str]:
    if overrides and name in overrides:
        return [str(m) for m in overrides[name]]
    return list(get(name).metrics)
