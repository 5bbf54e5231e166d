"""What the trainer feeds the model: examples, the validation split, and which examples each step sees.

Pure functions of the records, the tokenizer and the config (no I/O, no global RNG), so that the
order of the data is a function of ``(seed, step)`` alone. That is what makes a resumed run see
exactly the examples an uninterrupted one would, whatever the number of processes.

* Tokenisation: :func:`pipeline.preprocess.tokenize_records` (Alpaca-exact rendering,
  ``train.model_max_length``, ``train.truncation`` policy; its :class:`TruncationReport` goes into
  the run summary) and :func:`pipeline.preprocess.build_examples` with
  ``mask_zero_weight_labels=False``: at PLW = 0 the prompt targets keep their labels (with weight 0),
  so the *unweighted* prompt loss can still be logged; loss and gradients are unchanged (weight 0).
* Validation split (``train.eval_fraction``): ``round(f x N)`` instances (at least 1 when f > 0),
  drawn by a permutation seeded from ``(cfg.seed, "split")``; the rest train.
* Order: epoch ``e`` visits the training examples in ``randperm(N)`` seeded from
  ``(cfg.seed, "order", e)``. An epoch has ``ceil(N / global_batch_size)`` optimizer steps; its last
  step holds the remainder (like a DataLoader without ``drop_last``). With ``train.max_steps`` > 0
  the epochs continue (new permutations) until that many steps; otherwise
  ``ceil(train.epochs x steps_per_epoch)`` steps.
* Within a step: the step's examples are split into micro-batches of ``per_device_batch_size`` and
  dealt to ranks contiguously (rank r gets micro-batch slots ``r*A .. r*A+A-1``, A = accumulation
  steps). The last (short) step of an epoch uses ``A' = ceil(n / (world x per_device))`` slots per
  rank; a slot with no example gets a *filler* micro-batch (weights all 0: loss exactly 0, zero
  gradient), so that every rank runs the same number of forward passes (FSDP/DeepSpeed collectives
  must match). With the default normaliser (``weight_sum``) the step's gradient does not depend on
  this split at all (see :mod:`pipeline.loss`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch

from pipeline.loss import IGNORE_INDEX, effective_weights
from pipeline.preprocess import TruncationReport, build_examples, tokenize_records


def derived_seed(seed: int, purpose: str, *parts: Any) -> int:
    """A 63-bit seed for one purpose (``split``, ``order``...), independent across purposes/epochs."""
    blob = ":".join([str(int(seed)), purpose, *map(str, parts)]).encode()
    return int(hashlib.sha256(blob).hexdigest()[:15], 16)


def _perm(n: int, seed: int) -> List[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def split_indices(n: int, eval_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """``(train, eval)`` index lists (each sorted) of a deterministic hold-out split."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0 or n < 2:
        return list(range(n)), []
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    perm = _perm(n, derived_seed(seed, "split"))
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def steps_per_epoch(n: int, global_batch: int) -> int:
    if n < 1:
        raise ValueError("no training examples")
    return math.ceil(n / global_batch)


def total_steps(n: int, global_batch: int, epochs: float, max_steps: int = -1) -> int:
    if max_steps and max_steps > 0:
        return int(max_steps)
    return max(1, math.ceil(epochs * steps_per_epoch(n, global_batch)))


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The order in which epoch ``epoch`` (0-based) visits the ``n`` training examples."""
    return _perm(n, derived_seed(seed, "order", epoch))


def step_examples(n: int, global_batch: int, seed: int, step: int) -> List[int]:
    """Indices (into the training examples) of optimizer step ``step`` (1-based)."""
    if step < 1:
        raise ValueError(f"steps are 1-based, got {step}")
    spe = steps_per_epoch(n, global_batch)
    epoch, j = divmod(step - 1, spe)
    order = epoch_order(n, seed, epoch)
    return order[j * global_batch : (j + 1) * global_batch]


def step_epoch(step: int, n: int, global_batch: int) -> float:
    """Epochs completed after ``step`` optimizer steps (fractional, as HF Trainer logs it)."""
    return step / steps_per_epoch(n, global_batch)


def rank_micro_batches(
    step_idx: Sequence[int], world: int, rank: int, per_device: int, accumulation: int
) -> List[List[int]]:
    """This rank's micro-batches (lists of example indices; ``[]`` = a filler) for one step."""
    n = len(step_idx)
    slots = accumulation if n == world * per_device * accumulation else max(1, math.ceil(n / (world * per_device)))
    out = []
    for k in range(slots):
        q = rank * slots + k
        out.append(list(step_idx[q * per_device : (q + 1) * per_device]))
    return out


def filler_example(pad_token_id: int) -> Dict[str, torch.Tensor]:
    """A two-token example with no loss term (weights 0, labels ignored)."""
    return {
        "input_ids": torch.full((2,), int(pad_token_id), dtype=torch.long),
        "labels": torch.full((2,), IGNORE_INDEX, dtype=torch.long),
        "weights": torch.zeros(2, dtype=torch.float32),
        "prompt_mask": torch.zeros(2, dtype=torch.bool),
    }


@dataclass
class TrainData:
    """Tokenised, weighted examples of one run (``train`` and the held-out ``eval`` split)."""

    train: List[Dict[str, torch.Tensor]]
    eval: List[Dict[str, torch.Tensor]]
    truncation: TruncationReport
    n_records: int
    train_index: List[int] = field(default_factory=list)  # positions among the kept instances
    eval_index: List[int] = field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        return {
            "records": self.n_records,
            "train_examples": len(self.train),
            "eval_examples": len(self.eval),
            "truncation": self.truncation.to_dict(),
        }


def prepare_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    plw: float,
    completion_weight: float,
    model_max_length: int,
    truncation: str,
    eval_fraction: float,
    seed: int,
    dataset: str = "?",
    completion_turns: str = "all",
) -> TrainData:
    """Tokenise and weight ``records`` (see the module docstring) and split off the validation set.

    :class:`ZeroWeightError` when the training examples carry no loss weight at all (e.g. PLW 0 and
    every completion cut by truncation): such a run would train nothing. ``dataset`` names the data
    in that message. ``completion_turns``: chat records' counted assistant turns (pipeline/chat.py)."""
    instances, report = tokenize_records(
        records, tokenizer, model_max_length, truncation, completion_turns=completion_turns
    )
    examples = build_examples(instances, plw, completion_weight, mask_zero_weight_labels=False)
    if not examples:
        raise ValueError(f"no training examples left of {len(records)} records ({report.summary()})")
    tr, ev = split_indices(len(examples), eval_fraction, seed)
    train = [examples[i] for i in tr]
    if total_weight(train) <= 0:
        raise ZeroWeightError(
            f"dataset {dataset!r} at PLW {plw:g} (completion weight {completion_weight:g}): the "
            f"{len(train)} training examples carry no loss weight, so the run would train nothing; "
            f"{report.n_lost_completion} of {report.n_instances} examples lost every completion token "
            f"to truncation at train.model_max_length={model_max_length} (train.truncation={truncation}). "
            f"Raise train.model_max_length, set train.truncation=drop or truncate_prompt_left, or use PLW > 0"
        )
    return TrainData(train, [examples[i] for i in ev], report, len(records), tr, ev)


class ZeroWeightError(ValueError):
    """The training examples' total loss weight is zero: nothing to train."""


def example_weight(example: Mapping[str, torch.Tensor]) -> float:
    """Sum of an example's (or a collated batch's) loss weights over its targets (position 0 and
    ignored labels carry none), as :func:`pipeline.loss.effective_weights` counts them."""
    labels, w = example["labels"], example["weights"].to(torch.float64)
    if labels.dim() == 1:
        labels, w = labels[None], w[None]
    return float(effective_weights(labels, w).sum())


def total_weight(examples: Sequence[Mapping[str, torch.Tensor]]) -> float:
    return sum(example_weight(e) for e in examples)


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Real (non-pad) input tokens of a collated batch (packed batches: ``segment_ids >= 0``)."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum())
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())
