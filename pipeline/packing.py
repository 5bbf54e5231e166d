"""Sequence packing that keeps examples apart (``train.packing: true``).

What it does
------------
:class:`PackedCollator` takes the examples of one micro-batch (dicts from
:func:`pipeline.preprocess.build_example`: ``input_ids``, ``labels``, ``weights``, ``prompt_mask``) and
lays them end to end into as few rows of at most ``max_length`` tokens as it can (first-fit
decreasing, then balanced so the longest row is as short as it can make it: :func:`pack_bins`),
instead of right-padding every example to the longest one (:class:`~pipeline.preprocess.Collator`).
Nothing about the training objective changes:

* **Positions** restart at 0 for every example (``position_ids``), so each example sees exactly the
  rotary positions it would see alone.
* **Attention isolation**: no token attends to a token of another example (block-diagonal causal
  attention, see "Attention paths" below).
* **Targets**: labels/weights/prompt_mask are carried over token for token in the unshifted
  convention of :mod:`pipeline.preprocess`. Position 0 of every example has no target
  (``labels = -100``, ``weights = 0``, ``prompt_mask = False``; the collator enforces it), so after
  :func:`pipeline.loss.shift_targets` the last token of one example never "predicts" the first token
  of the next: a packed row has exactly the loss terms of its unpacked examples, no more.
* **Normalisers**: packing only moves loss terms between rows of the *same* micro-batch, so the
  micro-batch's ``sum(w)`` and ``#{w > 0}`` are unchanged. Hence ``weight_sum`` and ``token_count``
  (:func:`pipeline.loss.step_normalisers`, totals over the optimizer step) and ``micro_batch`` (this
  micro-batch's own ``sum(w)``) give the same denominators, and the step's loss and gradient are those
  of the unpacked step up to floating-point reassociation (tested). The global batch is still counted
  in examples (``train.global_batch_size``); packing changes how a micro-batch is laid out, not which
  examples an optimizer step sees.

Padding is only needed at the end of rows shorter than the longest row: pad tokens get
``labels = -100``, ``weights = 0``, ``segment_ids = -1`` and positions of their own.

Attention paths (which is used where)
-------------------------------------
``attention="mask4d"`` (default; CPU and GPU with ``attn_implementation`` ``sdpa`` or ``eager``):
    ``attention_mask`` is a 4-D *additive* float32 mask ``(rows, 1, T, T)``: 0 where query ``i`` may
    attend key ``j`` (same example and ``j <= i``), ``finfo(float32).min`` elsewhere; every position
    may attend itself, so no row is fully masked (no NaN, even if a framework casts the mask to
    bf16/fp16 where the minimum becomes ``-inf``). transformers (4.57: ``masking_utils``) passes a 4-D
    mask through unchanged; ``eager`` adds it to the scores (so a *boolean* mask would silently be
    wrong there: that is why it is additive) and SDPA takes it as ``attn_mask``.
    :class:`pipeline.loss.WeightedLossModel` casts it to the compute dtype (torch 2.13's CPU SDPA
    silently mis-computes a float64 query with a float32 mask; fp32/bf16/fp16 queries are correct with
    either). Memory:
    ``rows x T x T x 4`` bytes (4 x 512 x 512: 4 MiB).
``attention="position_ids"`` (GPU with ``attn_implementation="flash_attention_2"``, padding-free):
    all examples of the micro-batch are flattened into ONE row ``(1, total tokens)`` with no padding
    and no ``attention_mask`` key; isolation comes from ``position_ids`` alone: transformers'
    ``_flash_attention_forward`` (4.57) switches to flash-attention's varlen kernel with sequence
    boundaries where positions restart at 0, but only for a batch of one row
    (``_is_packed_sequence``), hence the single row (``max_length`` then bounds each example, not the
    row). transformers >= 4.53 with torch >= 2.6 derives the same block-diagonal mask for
    ``sdpa``/``eager`` (``find_packed_sequence_indices``; tested on CPU here). Flash attention does not
    take 4-D masks, hence this mode. :meth:`PackedCollator.for_model` picks the mode from
    ``model.config._attn_implementation``.
    Not exercised here (no GPU / flash-attn on the development machine): verify on the cluster.

Where: with ``train.packing_scope=micro_batch`` this machine (CPU) and GPUs with the default ``sdpa``
use ``mask4d``; ``pipeline.trainer`` builds ``PackedCollator.for_model(tokenizer,
train.model_max_length, model)``.

Step scope (``train.packing_scope=step``, the default with ``train.packing=true``)
--------------------------------------------------------------------------------
:func:`plan_step` packs *all* examples of an optimizer step (every rank's) into rows of
``train.packing_tokens`` tokens (default: :func:`default_packing_tokens`) by first-fit decreasing; each row is one padding-free micro-batch in the ``position_ids`` layout (one
row, no mask of ours, for every attention implementation: transformers >= 4.53 reads the example
boundaries from the restarting positions when no attention mask and no KV cache are given, which
training guarantees with ``use_cache=False``). Rows go to ranks so that every rank has the same
number of micro-batches (fillers without loss terms where short) and the ranks' token counts are
balanced. The step's examples, hence its ``weight_sum`` / ``token_count`` normaliser, are
unchanged, so the step's loss and gradient are the unpacked ones (tests/test_packing_step.py);
the plan is a function of the step's example lengths, so a resumed run packs identically. The
per-micro-batch normaliser (``loss_normaliser=micro_batch``) is refused with step packing.

Either way the forward must receive ``position_ids`` (with ``attention="position_ids"`` they are the
only isolation): :class:`pipeline.loss.WeightedLossModel`, the one path from a model to the loss,
takes the whole batch (``wrapper(**batch, normaliser=d)``), forwards ``position_ids`` and the mask,
casts a 4-D mask to the compute dtype and refuses a 4-D mask for a flash-attention model. It works
the same on packed and ordinary batches.

Batch keys: ``input_ids``, ``labels``, ``weights``, ``prompt_mask``, ``position_ids``, ``segment_ids``
(example index within the micro-batch, -1 for padding) and, in ``mask4d`` mode, ``attention_mask``.
Count real tokens with ``segment_ids >= 0`` (not ``attention_mask.sum()``, which is 4-D here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from pipeline.loss import IGNORE_INDEX

ATTENTION_MODES = ("mask4d", "position_ids")


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------
def pack_bins(lengths: Sequence[int], max_length: int, balance: bool = True) -> List[List[int]]:
    """Assign example indices to rows of at most ``max_length`` tokens.

    The number of rows ``R`` is that of first-fit decreasing (:func:`first_fit_decreasing`). With
    ``balance`` the examples are then spread over those ``R`` rows longest-first into the
    least-filled row (LPT), which is kept when its longest row is shorter (the batch is padded to its
    longest row, so this cuts padding and attention cost); otherwise the FFD rows are used.
    Deterministic; within a row, examples keep their original order. Zero-length examples are left
    out. Raises ``ValueError`` naming the example when one is longer than ``max_length``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    rows = first_fit_decreasing(
        lengths, max_length, "micro-batch", f"max_length {max_length} (preprocess with model_max_length <= max_length)"
    )
    if balance and len(rows) > 1:
        order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
        lpt: List[List[int]] = [[] for _ in rows]
        load = [0] * len(rows)
        for i in order:
            r = min(range(len(load)), key=lambda k: (load[k], k))
            lpt[r].append(i)
            load[r] += lengths[i]
        if max(load) < max(sum(lengths[i] for i in row) for row in rows):
            rows = [sorted(r) for r in lpt]
    return rows


def first_fit_decreasing(
    lengths: Sequence[int],
    budget: int,
    where: str = "step",
    limit: str = "",
) -> List[List[int]]:
    """Rows of at most ``budget`` tokens by first-fit decreasing (longest first, ties by index, into
    the first row with room); within a row, indices ascending; zero-length examples left out.
    Deterministic. Raises ``ValueError`` naming the example (``where``: of the step / micro-batch)
    and the ``limit`` when one is longer than ``budget``."""
    limit = limit or f"train.packing_tokens {budget} (packing_tokens must be >= train.model_max_length)"
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"packing: example {i} of the {where} has {n} tokens > {limit}")
    rows: List[List[int]] = []
    room: List[int] = []
    for i in sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return [sorted(r) for r in rows]


def plan_step(lengths: Sequence[int], budget: int, world: int = 1) -> List[List[List[int]]]:
    """The micro-batches of one optimizer step with ``train.packing_scope=step``, per rank.

    ``lengths``: token counts of the step's examples (all ranks' together, in step order). The
    examples are packed into rows of at most ``budget`` tokens (:func:`first_fit_decreasing`); each
    row is one padding-free micro-batch. Every rank gets the same number of micro-batches,
    ``ceil(rows / world)`` (a rank short of rows gets an empty one: a filler with no loss term, so
    collective calls stay matched), and rows go longest first to the rank with the fewest tokens
    among those with room (ties: lowest rank), which balances the ranks' token counts. A function
    of the lengths alone: the same step always packs the same way (resume stays bit-exact).
    Returns ``plan[rank] = [row, ...]``, each row a list of positions into ``lengths``.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    rows = first_fit_decreasing(lengths, budget)
    per_rank = max(1, math.ceil(len(rows) / world))
    plan: List[List[List[int]]] = [[] for _ in range(world)]
    load = [0] * world
    size = [sum(lengths[i] for i in r) for r in rows]
    for r in sorted(range(len(rows)), key=lambda r: (-size[r], r)):
        k = min((k for k in range(world) if len(plan[k]) < per_rank), key=lambda k: (load[k], k))
        plan[k].append(rows[r])
        load[k] += size[r]
    for k in range(world):
        plan[k].sort(key=lambda row: row[0])  # step order within a rank
        plan[k] += [[] for _ in range(per_rank - len(plan[k]))]
    return plan


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive ``(B, 1, T, T)`` mask from ``(B, T)`` segment ids: 0 where ``j <= i`` and both
    positions belong to the same segment (or ``i == j``), ``finfo(dtype).min`` elsewhere."""
    B, T = segment_ids.shape
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)  # (B, T, T): [b, i, j]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (same & causal) | torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(B, 1, T, T, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(dtype).min)
    return mask


def pack_examples(
    examples: Sequence[Mapping[str, Any]],
    max_length: int,
    pad_token_id: int = 0,
    attention: str = "mask4d",
    pad_to_multiple_of: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Pack :func:`~pipeline.preprocess.build_example` dicts into one batch (see module docstring)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"packing attention mode must be one of {ATTENTION_MODES}, got {attention!r}")
    if not examples:
        raise ValueError("empty batch")
    seqs = []
    for i, e in enumerate(examples):
        for key in ("input_ids", "labels", "weights"):
            if key not in e:
                raise ValueError(
                    f"packing: example {i} of the micro-batch has no '{key}' "
                    f"(expected pipeline.preprocess.build_example output)"
                )
        ids = torch.as_tensor(e["input_ids"], dtype=torch.long).reshape(-1)
        n = ids.numel()
        labels = torch.as_tensor(e["labels"], dtype=torch.long).reshape(-1)
        weights = torch.as_tensor(e["weights"], dtype=torch.float32).reshape(-1)
        pm = (
            torch.as_tensor(e["prompt_mask"], dtype=torch.bool).reshape(-1)
            if "prompt_mask" in e
            else torch.zeros(n, dtype=torch.bool)
        )
        for key, t in (("labels", labels), ("weights", weights), ("prompt_mask", pm)):
            if t.numel() != n:
                raise ValueError(
                    f"packing: example {i} of the micro-batch: '{key}' has {t.numel()} entries, input_ids {n}"
                )
        seqs.append((ids, labels, weights, pm))
    lengths = [s[0].numel() for s in seqs]
    rows = pack_bins(lengths, max_length)
    if attention == "position_ids" and rows:  # padding-free: one flattened row (flash-attention varlen)
        rows = [[i for i, n in enumerate(lengths) if n > 0]]
    if not rows:
        raise ValueError("packing: every example of the micro-batch is empty")
    T = max(sum(seqs[i][0].numel() for i in r) for r in rows)
    if pad_to_multiple_of:
        m = int(pad_to_multiple_of)
        T = ((T + m - 1) // m) * m
    R = len(rows)
    batch = {
        "input_ids": torch.full((R, T), int(pad_token_id), dtype=torch.long),
        "labels": torch.full((R, T), IGNORE_INDEX, dtype=torch.long),
        "weights": torch.zeros((R, T), dtype=torch.float32),
        "prompt_mask": torch.zeros((R, T), dtype=torch.bool),
        "position_ids": torch.zeros((R, T), dtype=torch.long),
        "segment_ids": torch.full((R, T), -1, dtype=torch.long),
    }
    for r, members in enumerate(rows):
        s = 0
        for i in members:
            ids, labels, weights, pm = seqs[i]
            n = ids.numel()
            batch["input_ids"][r, s : s + n] = ids
            batch["labels"][r, s : s + n] = labels
            batch["weights"][r, s : s + n] = weights
            batch["prompt_mask"][r, s : s + n] = pm
            # The first token of an example has no target: never let the previous example's last
            # hidden state "predict" it (pipeline.loss shifts labels by one inside each row).
            batch["labels"][r, s] = IGNORE_INDEX
            batch["weights"][r, s] = 0.0
            batch["prompt_mask"][r, s] = False
            batch["position_ids"][r, s : s + n] = torch.arange(n)
            batch["segment_ids"][r, s : s + n] = i
            s += n
        if s < T:  # trailing padding: positions of its own (a new "sequence" for position-based detection)
            batch["position_ids"][r, s:] = torch.arange(T - s)
    if attention == "mask4d":
        batch["attention_mask"] = block_causal_mask(batch["segment_ids"])
    return batch


def attention_mode_for(model) -> str:
    """``position_ids`` for flash-attention models, else ``mask4d`` (sdpa, eager)."""
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return "position_ids" if "flash" in impl else "mask4d"


def default_packing_tokens(train_cfg: Any, model) -> int:
    """``train.packing_tokens`` when null: ``per_device_batch_size x model_max_length`` for flash
    attention (varlen kernels: each example costs its own length squared, so long rows are free),
    ``model_max_length`` otherwise (sdpa / eager attend densely within a row under the block mask:
    shorter rows cost less; benchmarks/packing_throughput.py measured 1.65x for 512-token rows and
    1.05x for 2,048-token rows against dynamic padding, SmolLM2-135M on CPU)."""
    if attention_mode_for(model) == "position_ids":
        return int(train_cfg.per_device_batch_size) * int(train_cfg.model_max_length)
    return int(train_cfg.model_max_length)


@dataclass
class PackedCollator:
    """Packs a micro-batch of preprocessed examples into rows of at most ``max_length`` tokens.

    ``tokenizer`` supplies the pad id (its ``pad_token_id``, else ``eos_token_id``, else 0; the value
    is irrelevant to the loss: pad tokens have no target and are attended by no real token); an int
    is accepted too. See the module docstring for ``attention``.
    """

    tokenizer: Any
    max_length: int
    attention: str = "mask4d"
    pad_to_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"packing attention mode must be one of {ATTENTION_MODES}, got {self.attention!r}")
        if int(self.max_length) < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    @classmethod
    def for_model(cls, tokenizer, max_length: int, model, **kwargs) -> "PackedCollator":
        return cls(tokenizer, max_length, attention=attention_mode_for(model), **kwargs)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        if isinstance(tok, int):
            return tok
        for attr in ("pad_token_id", "eos_token_id"):
            v = getattr(tok, attr, None)
            if v is not None:
                return int(v)
        return 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> Dict[str, torch.Tensor]:
        return pack_examples(examples, int(self.max_length), self.pad_token_id, self.attention, self.pad_to_multiple_of)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
def packing_stats(batch: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Real tokens, slots (rows x T) and the fill ratio of a packed or ordinary batch."""
    ids = batch["input_ids"]
    if "segment_ids" in batch:
        real = int((batch["segment_ids"] >= 0).sum())
        n_ex = int(torch.unique(batch["segment_ids"][batch["segment_ids"] >= 0]).numel())
    elif batch.get("attention_mask") is not None and batch["attention_mask"].dim() == 2:
        real = int(batch["attention_mask"].sum())
        n_ex = ids.shape[0]
    else:
        real, n_ex = ids.numel(), ids.shape[0]
    slots = ids.numel()
    return {
        "rows": ids.shape[0],
        "examples": n_ex,
        "real_tokens": real,
        "slots": slots,
        "fill": real / slots if slots else 0.0,
    }
