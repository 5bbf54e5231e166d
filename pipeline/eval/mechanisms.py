"""Mechanism metrics (docs/study.md section 5, paper section 5.3; results.csv benchmarks ``mech_*``).

Pure functions (tested against independent computations):

- :func:`loss_rsd` -- training-loss relative standard deviation: the per-step losses are cut into
  windows of ``window`` (5) consecutive optimizer steps (``tumbling``: non-overlapping, a trailing
  partial window is dropped; ``rolling``: every run of 5 consecutive steps); RSD of a window =
  sample standard deviation (ddof 1) / mean; the metric is the mean over windows.
- :func:`corpus_bleu` -- sacreBLEU corpus BLEU with the paper's signature
  ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp`` (sacreBLEU's defaults).
- :func:`select_prompts` -- up to N unique training prompts (the rendered Alpaca source; chat
  records: the conversation before its last answer in the model's chat template), a seeded sample
  when there are more.
- :func:`weight_distance` -- distance between the fine-tuned and the pre-trained weights with the
  trainer's definitions (:mod:`pipeline.trainer.distance`, one implementation): ``l1_mean`` =
  sum|w - w0| / number of elements, ``l2`` = sqrt(sum (w - w0)^2), ``l1_sum_per_tensor`` = mean over
  tensors of each tensor's sum|w - w0| (the p = 1 Minkowski distance of the paper's regularizer),
  ``l1_mean_per_tensor``; rows appended for a pad token are left out. Streamed tensor by tensor
  from the safetensors files (used when the trainer's ``train_summary.json`` lacks them).

I/O helpers: :func:`read_losses` (metrics.jsonl: the last ``"kind": "train"`` line of every step;
bad lines are errors naming the file and line), :func:`summary_distance` (the distance the trainer
wrote in ``train_summary.json``).

:class:`MechanismRunner` (kind ``mechanism``, pipeline/eval/runner.py) computes the ``mech_*``
benchmarks of runs (a pre-trained baseline: skipped); which metric a benchmark is comes from its
YAML's ``compute``: ``memorization_bleu`` (with the evaluated model loaded), ``loss_rsd`` and
``weight_distance`` (from the run's files). (``mech_alpacaeval_length`` belongs to the AlpacaEval
runner, which has the generations.)
"""

from __future__ import annotations

import json
import math
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from pipeline.data.build import load_dataset
from pipeline.eval import benchmarks as B
from pipeline.eval import generation, prompting
from pipeline.eval.results import ResultRow
from pipeline.eval.runner import EvalPlan, EvalSession, Runner, model_identity, register, short_hash
from pipeline.preprocess import render_source
from pipeline.runs import atomic_write_json
from pipeline.trainer.distance import weight_distance as trainer_weight_distance

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
        return [v[i : i + window] for i in range(0, len(v) - window + 1, window)]
    if mode == "rolling":
        return [v[i : i + window] for i in range(0, len(v) - window + 1)]
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
        if not isinstance(rec, dict) or rec.get("loss") is None or rec.get("kind", "train") != "train":
            continue  # validation lines ("kind": "eval"), steps skipped for zero weight (loss null), ...
        if "step" not in rec:
            raise MechanismError(f"{path}: line {i}: field 'step' is missing")
        try:
            step, loss = int(rec["step"]), float(rec["loss"])
        except (TypeError, ValueError):
            raise MechanismError(
                f"{path}: line {i}: fields 'step'/'loss' must be numbers, got {rec.get('step')!r}/{rec.get('loss')!r}"
            ) from None
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


def select_prompts(
    records: Sequence[Mapping[str, Any]], n: int, seed: int = 0, tokenizer=None
) -> List[Tuple[str, str]]:
    """Up to ``n`` (prompt, output) pairs with unique prompts (first occurrence's output), in record
    order; a seeded sample of the unique prompts when there are more than ``n``.

    Chat records (``messages``): the prompt is the conversation up to its last answer in
    ``tokenizer``'s chat template with the assistant turn opened (as it was trained), the output
    that last answer."""
    seen: Dict[str, str] = {}
    for i, r in enumerate(records):
        if "messages" in r:
            msgs = list(r["messages"])
            src, out = prompting.chat_context(tokenizer, msgs[:-1]), msgs[-1]["content"]
        elif not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise MechanismError(f"training record {i}: fields 'instruction'/'output' must be strings")
        else:
            src, out = render_source(r), r["output"]
        if src not in seen:
            seen[src] = out
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

    a, b = _tensor_index(trained), _tensor_index(pretrained)
    handles: Dict[Path, Any] = {}

    def get(path: Path, key: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(key)

    try:
        res = trainer_weight_distance(
            lambda k: get(a[k], k) if k in a else None, ((k, get(b[k], k)) for k in sorted(b))
        )
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


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
COMPUTATIONS = ("loss_rsd", "weight_distance", "memorization_bleu")


@register
class MechanismRunner(Runner):
    kind = "mechanism"
    order = {"model": 40, "files": 10}

    def plan(self, ev: EvalSession, bench) -> EvalPlan:
        name, e = bench.name, ev.e
        if bench.compute not in COMPUTATIONS:
            raise ValueError(
                f"{bench.path}: field 'benchmark.compute' must be one of {list(COMPUTATIONS)} for "
                f"kind mechanism, got {bench.compute!r}"
            )
        if not ev.t.is_run:
            return EvalPlan(name, {"kind": "mechanism"}, f"{name} needs a training run (this is a pre-trained model)")
        if bench.compute == "loss_rsd":
            return EvalPlan(
                name,
                {
                    "kind": "mechanism",
                    "source": "metrics.jsonl",
                    "window": e.rsd_window,
                    "windows": e.rsd_windows,
                    "ddof": 1,
                    "statistic": "mean over windows of sd/mean",
                },
            )
        if bench.compute == "weight_distance":
            return EvalPlan(
                name,
                {
                    "kind": "mechanism",
                    "definitions": "pipeline.trainer.distance",
                    "source": "train_summary.json, else final/ vs the pre-trained checkpoint",
                    "pretrained": short_hash(model_identity(ev.t.model_cfg)),
                },
            )
        ds = ev.t.run_cfg.dataset.name if ev.t.run_cfg is not None else "?"
        return EvalPlan(
            name,
            {
                "kind": "mechanism",
                "signature": BLEU_SIGNATURE,
                "prompts": int(e.memorization_prompts),
                "seed": int(e.memorization_seed),
                "dataset": ds,
                "decoding": "greedy",
                "max_new_tokens": int(e.max_new_tokens),
                "template": "alpaca (pipeline.preprocess.render_source)",
            },
        )

    def model_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str], lm) -> None:
        for n in names:
            if B.get(n).compute == "memorization_bleu":
                ev.attempt(plans[n], lambda n=n: rows_memorization(ev, n, lm.model, lm.tokenizer))

    def files_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str]) -> None:
        for n in names:
            c = B.get(n).compute
            if c == "loss_rsd":
                ev.attempt(plans[n], lambda n=n: rows_loss_rsd(ev, n))
            elif c == "weight_distance":
                ev.attempt(plans[n], lambda n=n: rows_weight_distance(ev, n))


def rows_loss_rsd(ev: EvalSession, name: str) -> List[ResultRow]:
    losses, steps = read_losses(ev.t.folder / "metrics.jsonl")
    mean, per = loss_rsd(losses, ev.e.rsd_window, ev.e.rsd_windows)
    se = statistics.stdev(per) / len(per) ** 0.5 if len(per) > 1 else None
    msg = f"{len(steps)} optimizer steps, {len(per)} {ev.e.rsd_windows} windows of {ev.e.rsd_window}"
    return [
        ResultRow(
            name,
            m,
            mean if m == "rsd_mean" else None,
            se if m == "rsd_mean" else None,
            len(per),
            "ok" if m == "rsd_mean" else "skipped",
            msg if m == "rsd_mean" else f"unknown metric {m!r}",
        )
        for m in ev.metrics(name)
    ]


def rows_weight_distance(ev: EvalSession, name: str) -> List[ResultRow]:
    s = summary_distance(ev.t.folder)
    if s is not None:
        vals, n, msg = s, s.get("tensors"), f"from the trainer's summary {s['source']}"
    else:
        final = ev.t.model_dir
        if final is None or not Path(final).is_dir():
            raise MechanismError(f"missing checkpoint {final} (and no train_summary.json with weight_distance)")
        folder, _ = ev.pretrained_source()
        if folder is None:
            raise MechanismError(
                f"the pre-trained model '{getattr(ev.t.model_cfg, 'name', '?')}' has no local folder "
                f"(hub cache only): set model.local_path to compute the weight distance"
            )
        d = weight_distance(Path(final), Path(folder))
        vals, n = d.values, d.n_tensors
        msg = "; ".join([f"computed from the saved checkpoint {final} vs {folder} (no train_summary.json)"] + d.notes)
    return [
        ResultRow(
            name,
            m,
            vals.get(m),
            None,
            n,
            "ok" if m in vals else "skipped",
            msg if m in vals else f"metric {m!r} not available (available: {list(DISTANCE_METRICS)})",
        )
        for m in ev.metrics(name)
    ]


def rows_memorization(ev: EvalSession, name: str, model, tok) -> List[ResultRow]:
    e = ev.e
    if ev.t.run_cfg is None:
        raise MechanismError("no run config (config.yaml): cannot find the training data")
    records, _meta = load_dataset(ev.t.run_cfg)
    pairs = select_prompts(records, int(e.memorization_prompts), int(e.memorization_seed), tok)
    if not pairs:
        raise MechanismError(f"dataset {ev.t.run_cfg.dataset.name}: no training prompts")
    gens = generation.generate(
        model,
        tok,
        [p for p, _ in pairs],
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        desc="memorization",
        add_special_tokens=not any("messages" in r for r in records),  # a chat template wrote them
    )
    hyps = [g.text for g in gens]
    atomic_write_json(
        ev.eval_dir / "memorization" / "generations.json",
        [{"prompt": p, "reference": r, "generation": h} for (p, r), h in zip(pairs, hyps)],
    )
    score, sig = corpus_bleu(hyps, [r for _, r in pairs])
    msg = f"sacreBLEU {sig}; {len(pairs)} unique training prompts of {len(records)} records"
    return [
        ResultRow(
            name,
            m,
            score if m == "bleu" else None,
            None,
            len(pairs),
            "ok" if m == "bleu" else "skipped",
            msg if m == "bleu" else f"unknown metric {m!r}",
        )
        for m in ev.metrics(name)
    ]
