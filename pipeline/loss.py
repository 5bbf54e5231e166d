"""The training objective in one file: where the prompt loss weight (PLW) enters, the weighted
causal-LM loss, its normalisers, and the one module that connects a causal LM to it.

For a newcomer
--------------
A causal LM predicts every token from the tokens before it. Each predicted token ("target") gives a
cross-entropy term ``CE_i``. Instruction tuning usually drops the terms whose target is part of the
prompt (Alpaca's masking, PLW = 0) or keeps all of them (full-sequence training, PLW = 1). The paper
studies the values in between: every prompt-target term is multiplied by PLW, every
completion-target term by ``completion_weight`` (1 by default), padding by 0 (docs/study.md section 1)::

    loss = sum_i w_i * CE_i / normaliser

Where PLW enters: :func:`token_weights` is the weight rule, the only code that turns ``plw`` and
``completion_weight`` into loss weights. :func:`pipeline.preprocess.build_example` calls it once per
example and stores the result as the example's ``weights``; collation, packing and the loss below only
carry and sum those weights. The weights are aligned with the *targets* (Hugging Face's unshifted
convention: ``weights[b, j]`` is the weight of predicting ``input_ids[b, j]`` from the hidden state at
``j - 1``; ``weights[:, 0]`` is never used). This module shifts internally, exactly like
``LlamaForCausalLM``.

The normaliser (``train.loss_normaliser``) says what the weighted sum is divided by:

* ``weight_sum`` (default): sum of ``w`` over every target of the optimizer step, i.e. all
  micro-batches of the gradient-accumulation cycle on all data-parallel ranks. The step gradient is
  then independent of how the step is split into micro-batches / ranks (tested).
* ``token_count``: number of targets with ``w > 0`` over the same scope (WIT's choice).
* ``micro_batch``: each micro-batch divides by its own ``sum(w)``, micro-batch losses are averaged
  over accumulation steps (and ranks, by DDP/FSDP). This is what a pre-2024.10 transformers Trainer
  with a custom ``compute_loss`` did; its gradient depends on the batching (tested).

Because the first two need totals over the whole step, the caller computes them *before* the step's
forward passes with :func:`step_normalisers` (which all-reduces across ranks when
``torch.distributed`` is initialised) and passes each micro-batch its denominator. A zero
normaliser can only come with all-zero weights; the loss is then exactly 0 with zero gradients.

Memory: :func:`weighted_causal_lm_loss` takes the final hidden states and the LM-head weight instead
of logits. It never builds the ``tokens x vocab`` logits: a custom autograd Function walks over
chunks of tokens, computes each chunk's fp32 logits, its CE and, in the same pass, the chunk's
gradient w.r.t. the hidden states and its contribution to the head-weight gradient (as Liger's fused
linear cross entropy does). Backward only rescales those stored gradients. Extra peak memory is
O(chunk x vocab) plus one hidden-state-sized and one head-weight-sized gradient buffer.

From model to loss: :class:`WeightedLossModel` wraps a Hugging Face causal LM; its ``forward`` takes
a collated batch (ordinary, or packed by :mod:`pipeline.packing`: ``position_ids`` and 4-D attention
masks are forwarded) and returns the loss of :func:`weighted_causal_lm_loss`. The loss owns the LM
head (it reads the head's weight instead of calling it), which is also what lets FSDP and DeepSpeed
ZeRO-3 gather that weight (see the class). It is the one path from a model to this loss: the trainer,
the tests and the model-level benchmarks all use it (``benchmarks/loss_memory.py`` measures
:func:`weighted_causal_lm_loss` alone, from hidden states).

:func:`naive_weighted_loss` is the straightforward logits-based reference (tests and benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
NORMALISERS = ("weight_sum", "token_count", "micro_batch")
DEFAULT_CHUNK_SIZE = 1024

Number = Union[float, int, torch.Tensor]


# --------------------------------------------------------------------------------------------
# The weight rule: where PLW enters
# --------------------------------------------------------------------------------------------
def token_weights(
    prompt_mask: torch.Tensor, completion_mask: torch.Tensor, plw: float, completion_weight: float = 1.0
) -> torch.Tensor:
    """Per-target loss weights (float32, same shape as the masks): the paper's weight rule.

    ``prompt_mask[j]`` / ``completion_mask[j]`` say that position ``j`` holds a loss term whose target
    (``input_ids[j]``, unshifted convention) is a prompt / completion token. Prompt targets get
    ``plw``, completion targets ``completion_weight``, every other position (position 0, which has no
    target, and padding) 0. Raises ``ValueError`` for a negative (or NaN) weight.
    """
    if not (plw >= 0 and completion_weight >= 0):
        raise ValueError(f"weights must be >= 0 (plw={plw}, completion_weight={completion_weight})")
    prompt_mask, completion_mask = prompt_mask.bool(), completion_mask.bool()
    if prompt_mask.shape != completion_mask.shape or bool((prompt_mask & completion_mask).any()):
        raise ValueError(
            "token_weights: prompt_mask and completion_mask must have the same shape and never both be set"
        )
    w = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=prompt_mask.device)
    return w.masked_fill_(prompt_mask, float(plw)).masked_fill_(completion_mask, float(completion_weight))


# --------------------------------------------------------------------------------------------
# Alignment helpers
# --------------------------------------------------------------------------------------------
def shift_targets(
    labels: torch.Tensor,
    weights: torch.Tensor,
    prompt_mask: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
):
    """Map unshifted ``(B, T)`` labels/weights to the positions of the hidden states that predict them.

    Returns ``(targets, w, pm)`` of shape ``(B, T)``: row position ``t`` holds the target
    ``labels[:, t + 1]`` (the last position gets ``ignore_index`` / weight 0). Targets equal to
    ``ignore_index`` get weight 0 here, whatever ``weights`` says.
    """
    B = labels.shape[0]
    targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), ignore_index)], dim=1)
    w = torch.cat([weights[:, 1:], weights.new_zeros((B, 1))], dim=1)
    w = torch.where(targets == ignore_index, torch.zeros_like(w), w)
    pm = None
    if prompt_mask is not None:
        pm = torch.cat([prompt_mask[:, 1:].bool(), prompt_mask.new_zeros((B, 1), dtype=torch.bool)], dim=1)
    return targets, w, pm


def effective_weights(labels: torch.Tensor, weights: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Unshifted weights with position 0 (no target) and ignored labels set to 0."""
    w = weights.clone()
    w[:, 0] = 0
    return torch.where(labels == ignore_index, torch.zeros_like(w), w)


# --------------------------------------------------------------------------------------------
# Chunked fused linear + weighted cross-entropy
# --------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs


def _chunk_softmax_ce(h, weight_h, t, eps: float, cdt, V: int):
    """One chunk: its (smoothed) CE and, in the logits' own buffer, its softmax. The logits are the
    only vocab-sized buffer: the max, the target logit and (with smoothing) the mean are read first,
    then ``exp(logits - max)`` is taken in place and normalised in place."""
    logits = (h @ weight_h.t()).to(cdt)  # (c, V)
    target_logit = logits.gather(1, t).squeeze(1)
    mean = logits.mean(dim=-1) if eps > 0 else None
    m = logits.amax(dim=1, keepdim=True)
    p = logits.sub_(m).exp_()
    se = p.sum(dim=1, keepdim=True)
    lse = (m + se.log()).squeeze(1)
    nll = lse - target_logit
    ce = (1.0 - eps) * nll + eps * (lse - mean) if eps > 0 else nll
    return ce, p.div_(se)


def _chunked_linear_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    label_smoothing: float,
    ignore_index: int,
    chunk_size: int,
    need_grad_hidden: bool,
    need_grad_weight: bool,
):
    """Kernel shared by the autograd Function and the no-grad path.

    hidden (N, H), weight (V, H), targets (N,), token_weights (N,). Returns
    ``(weighted_sum, ce, grad_hidden, grad_weight)``: ``ce`` (N,) is the (smoothed) per-token CE in the
    compute dtype, 0 at ignored targets; the gradients are those of ``weighted_sum`` (or None).

    Only what is needed is computed. Ignored targets (padding, each sequence's last position) enter
    no matmul. With gradients, the targets that carry weight are taken first, in chunks of
    ``chunk_size`` (forward and both gradient matmuls); then the targets of weight 0 (prompt tokens
    at PLW 0), whose CE is still computed (it is logged) but which enter neither gradient matmul
    (their rows of ``grad_hidden`` are 0). Peak extra memory: one ``chunk_size x V`` buffer (the
    logits, turned into the softmax and the gradient in place) and the ``V x H`` head gradient.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    valid = targets != ignore_index
    w = torch.where(valid, token_weights.to(cdt), torch.zeros((), dtype=cdt, device=hidden.device))
    ce = torch.zeros(N, dtype=cdt, device=hidden.device)
    need_grad = need_grad_hidden or need_grad_weight
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
    grad_weight = (
        torch.zeros((V, H), dtype=_compute_dtype(weight.dtype), device=weight.device) if need_grad_weight else None
    )
    eps = float(label_smoothing)
    chunk_size = max(1, int(chunk_size))
    weight_h = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
    if need_grad:  # weighted targets (forward + gradients), then weight-0 ones (forward only)
        passes = [((valid & (w != 0)).nonzero().squeeze(1), True), ((valid & (w == 0)).nonzero().squeeze(1), False)]
    else:
        passes = [(valid.nonzero().squeeze(1), False)]
    for rows, with_grad in passes:
        for s in range(0, rows.numel(), chunk_size):
            idx = rows[s : s + chunk_size]
            h = hidden.index_select(0, idx)
            t = targets.index_select(0, idx).unsqueeze(1)
            ce_c, g = _chunk_softmax_ce(h, weight_h, t, eps, cdt, V)
            ce.index_copy_(0, idx, ce_c.to(ce.dtype))
            if with_grad:
                # d(sum w*CE)/d logits = w * (softmax - (1 - eps) * onehot - eps / V), in place.
                if eps > 0:
                    g.sub_(eps / V)
                g.scatter_add_(1, t, torch.full_like(t, -(1.0 - eps), dtype=cdt))
                g.mul_(w.index_select(0, idx).unsqueeze(1))
                g_lp = g.to(hidden.dtype)
                if need_grad_hidden:
                    grad_hidden.index_copy_(0, idx, (g_lp @ weight_h).to(grad_hidden.dtype))  # autocast: bf16
                if need_grad_weight:
                    if h.dtype == grad_weight.dtype:
                        grad_weight.addmm_(g.t(), h)
                    else:  # low-precision matmul as autograd would do, accumulated in fp32
                        grad_weight.add_(g_lp.t() @ h)
                del g_lp
            del g
    weighted_sum = (w * ce).sum()
    return weighted_sum, ce, grad_hidden, grad_weight


class ChunkedLinearWeightedCE(torch.autograd.Function):
    """``sum_i w_i * CE(hidden_i @ weight.T, target_i)`` without materialising all logits.

    Gradients w.r.t. ``hidden`` and ``weight`` are computed chunk by chunk during forward and only
    rescaled in backward. Outputs: ``(weighted_sum, ce)`` where ``ce`` (N,) is detached.
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        token_weights,
        label_smoothing,
        ignore_index,
        chunk_size,
        need_grad_hidden,
        need_grad_weight,
    ):
        weighted_sum, ce, gh, gw = _chunked_linear_ce(
            hidden,
            weight,
            targets,
            token_weights,
            label_smoothing,
            ignore_index,
            chunk_size,
            need_grad_hidden,
            need_grad_weight,
        )
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.has_gh, ctx.has_gw = gh is not None, gw is not None
        ctx.save_for_backward(*(x for x in (gh, gw) if x is not None))
        ctx.mark_non_differentiable(ce)
        return weighted_sum, ce

    @staticmethod
    def backward(ctx, grad_sum, grad_ce):
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) if ctx.has_gh else None
        gw = saved.pop(0) if ctx.has_gw else None
        # in place: the saved gradients are this Function's own buffers, used once (no second
        # (V, H) buffer at the peak)
        if gh is not None:
            gh = gh.mul_(grad_sum.to(gh.dtype))
        if gw is not None:
            gw = gw.mul_(grad_sum.to(gw.dtype)).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None, None


def linear_weighted_ce_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
):
    """Flat, already-shifted interface: hidden (N, H), weight (V, H), targets (N,), token_weights (N,).

    Returns ``(weighted_sum, ce)``; ``weighted_sum`` is differentiable w.r.t. hidden and weight.
    """
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    if not (need_h or need_w):
        ws, ce, _, _ = _chunked_linear_ce(
            hidden, weight, targets, token_weights, label_smoothing, ignore_index, chunk_size, False, False
        )
        return ws, ce
    return ChunkedLinearWeightedCE.apply(
        hidden,
        weight,
        targets,
        token_weights,
        float(label_smoothing),
        int(ignore_index),
        int(chunk_size),
        need_h,
        need_w,
    )


# --------------------------------------------------------------------------------------------
# The loss callers use
# --------------------------------------------------------------------------------------------
@dataclass
class WeightedLossOutput:
    """``loss`` is differentiable; everything else is detached (for logging / aggregation).

    The ``*_ce_sum`` / ``*_tokens`` pairs are unweighted CE sums and counts over prompt-target and
    completion-target positions with a non-ignored label, so they can be summed over micro-batches
    and ranks before taking the mean (``prompt_ce`` / ``completion_ce`` are this batch's means).
    """

    loss: torch.Tensor
    weighted_ce_sum: torch.Tensor
    weight_sum: torch.Tensor
    normaliser: torch.Tensor
    prompt_ce_sum: torch.Tensor
    prompt_tokens: torch.Tensor
    completion_ce_sum: torch.Tensor
    completion_tokens: torch.Tensor

    @property
    def prompt_ce(self) -> torch.Tensor:
        return self.prompt_ce_sum / self.prompt_tokens if self.prompt_tokens > 0 else torch.tensor(float("nan"))

    @property
    def completion_ce(self) -> torch.Tensor:
        return (
            self.completion_ce_sum / self.completion_tokens
            if self.completion_tokens > 0
            else torch.tensor(float("nan"))
        )


def _safe_divide(num: torch.Tensor, den: Number) -> torch.Tensor:
    den_t = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    return num / torch.where(den_t > 0, den_t, torch.ones_like(den_t))


def weighted_causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    normaliser: Optional[Number] = None,
    *,
    prompt_mask: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> WeightedLossOutput:
    """``sum(w * CE) / normaliser`` for one micro-batch, from final hidden states and the LM head.

    hidden_states (B, T, H) (after the final norm), lm_head_weight (V, H) (no bias), labels/weights/
    prompt_mask (B, T) in the unshifted convention of :mod:`pipeline.preprocess`. ``normaliser`` is
    this micro-batch's denominator from :func:`step_normalisers`; ``None`` means this batch's own
    ``sum(w)`` (correct for a single micro-batch on a single process). A normaliser <= 0 (only
    possible with all-zero weights) is treated as 1, so the loss is exactly 0.
    """
    if hidden_states.dim() != 3:
        raise ValueError(f"hidden_states must be (B, T, H), got {tuple(hidden_states.shape)}")
    B, T, H = hidden_states.shape
    targets, w, pm = shift_targets(labels, weights, prompt_mask, ignore_index)
    flat_t = targets.reshape(-1)
    flat_w = w.reshape(-1)
    wsum, ce = linear_weighted_ce_sum(
        hidden_states.reshape(B * T, H),
        lm_head_weight,
        flat_t,
        flat_w,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
    )
    weight_total = flat_w.detach().to(wsum.dtype).sum()
    den = weight_total if normaliser is None else normaliser
    loss = _safe_divide(wsum, den)
    valid = flat_t != ignore_index
    ce = ce.detach()
    if pm is not None:
        p = pm.reshape(-1) & valid
        c = (~pm.reshape(-1)) & valid
        prompt_sum, prompt_n = ce[p].sum(), p.sum()
    else:
        c = valid
        prompt_sum, prompt_n = ce.new_zeros(()), valid.new_zeros((), dtype=torch.long)
    return WeightedLossOutput(
        loss=loss,
        weighted_ce_sum=wsum.detach(),
        weight_sum=weight_total,
        normaliser=torch.as_tensor(den, dtype=wsum.dtype, device=wsum.device).detach(),
        prompt_ce_sum=prompt_sum,
        prompt_tokens=prompt_n,
        completion_ce_sum=ce[c].sum(),
        completion_tokens=c.sum(),
    )


def naive_weighted_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    normaliser: Optional[Number] = None,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Reference: the same loss from full ``(B, T, V)`` logits (materialises fp32 logits)."""
    B, T, V = logits.shape
    targets, w, _ = shift_targets(labels, weights, None, ignore_index)
    cdt = _compute_dtype(logits.dtype)
    ce = F.cross_entropy(
        logits.to(cdt).reshape(B * T, V),
        targets.reshape(-1),
        reduction="none",
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    w = w.reshape(-1).to(cdt)
    num = (w * ce).sum()
    den = w.sum() if normaliser is None else normaliser
    return _safe_divide(num, den)


# --------------------------------------------------------------------------------------------
# Normalisers over an optimizer step
# --------------------------------------------------------------------------------------------
def _dist_ready(group=None) -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def step_normalisers(
    micro_batches: Sequence[Mapping[str, torch.Tensor]],
    mode: str = "weight_sum",
    *,
    ignore_index: int = IGNORE_INDEX,
    group=None,
    grad_reduction: str = "mean",
) -> List[torch.Tensor]:
    """Per-micro-batch denominators for one optimizer step on this rank.

    ``micro_batches``: this rank's micro-batches of the step (dicts with ``labels`` and ``weights``,
    unshifted). With ``loss_k = weighted_ce_sum_k / denominators[k]``, calling ``loss_k.backward()``
    for every k and then letting DDP/FSDP *average* gradients over the ``W`` data-parallel ranks
    (``grad_reduction="mean"``, their default; use ``"sum"`` if gradients are summed) gives the
    gradient of the step objective:

    * ``weight_sum``:  sum over the whole step of w*CE / (global sum of w)  -> D_k = total_w / W
    * ``token_count``: sum over the whole step of w*CE / (global #{w > 0})  -> D_k = total_n / W
    * ``micro_batch``: mean over micro-batches and ranks of (sum w*CE / sum w) -> D_k = sum(w_k) * G

    (G = number of micro-batches on this rank.) Global totals are all-reduced (SUM) over ``group``
    when ``torch.distributed`` is initialised. The same reduction makes the logged step loss
    ``mean over ranks of sum_k loss_k``. Returns 0-dim float32 tensors on the weights' device.
    """
    if mode not in NORMALISERS:
        raise ValueError(f"normaliser must be one of {NORMALISERS}, got {mode!r}")
    if grad_reduction not in ("mean", "sum"):
        raise ValueError(f"grad_reduction must be 'mean' or 'sum', got {grad_reduction!r}")
    if not micro_batches:
        return []
    device = micro_batches[0]["weights"].device
    per_w, per_n = [], []
    for mb in micro_batches:
        ew = effective_weights(mb["labels"], mb["weights"].to(torch.float64), ignore_index)
        per_w.append(ew.sum())
        per_n.append((ew > 0).sum().to(torch.float64))
    G = len(micro_batches)
    if mode == "micro_batch":
        return [(wk * G).to(torch.float32) for wk in per_w]
    local = torch.stack([torch.stack(per_w).sum(), torch.stack(per_n).sum()])
    world = 1
    if _dist_ready(group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        red = local
        if dist.get_backend(group) == "nccl" and red.device.type != "cuda":
            red = red.to(torch.device("cuda", torch.cuda.current_device()))
        red = red.clone()
        dist.all_reduce(red, op=dist.ReduceOp.SUM, group=group)
        local = red.to(device)
    total = local[0] if mode == "weight_sum" else local[1]
    den = total / world if grad_reduction == "mean" else total
    return [den.to(torch.float32).clone() for _ in range(G)]


# --------------------------------------------------------------------------------------------
# From model to loss
# --------------------------------------------------------------------------------------------
class WeightedLossModel(nn.Module):
    """A causal LM whose ``forward`` returns the PLW-weighted loss: the one path from a model to it.

    ``forward`` takes a collated batch as keyword arguments (``model(**batch, normaliser=d)``):
    ``input_ids``, ``labels``, ``weights``, ``prompt_mask`` and, when present, ``attention_mask`` (2-D,
    or the 4-D additive mask of a packed batch, cast to ``compute_dtype``) and ``position_ids``
    (packed batches: positions restart at 0 for every example), which go to the base model;
    ``segment_ids`` (packing bookkeeping) is accepted and not used. ``normaliser`` is this
    micro-batch's denominator from :func:`step_normalisers` (``None``: the batch's own weight sum).
    It runs the base model (no logits), then :func:`weighted_causal_lm_loss` on its final hidden
    states and the LM head's weight, and returns the fields of :class:`WeightedLossOutput` as a dict
    (``loss`` differentiable, the rest detached; a dict is a structure FSDP/DDP/DeepSpeed traverse;
    ``WeightedLossOutput(**out)`` gives the object back).

    Why the loss sits inside a module's forward: it reads the LM-head *weight* instead of calling
    the head, and under sharded data parallelism a weight is only materialised while the module that
    owns it runs its forward:

    * **FSDP** (``fully_shard`` / FSDP2): the decoder layers are wrapped (sharded units of their own)
      and this module is the root unit. ``lm_head`` (and the embeddings, and the final norm) belong to
      the root unit, so they are unsharded for the whole of the root's forward and backward: reading
      the head weight here gives the full (mixed-precision) weight, and its gradient is
      reduce-scattered by the root's post-backward hook like any other root parameter.
    * **DeepSpeed ZeRO-3**: parameters are gathered by hooks on *submodule* forwards, and
      ``lm_head``'s own forward is never called. :func:`register_for_zero3` therefore registers the
      head weight as an *external parameter* of this module
      (``deepspeed.zero.register_external_parameter``), and this module is the engine's module
      (``deepspeed.initialize(model=wrapper, ...)``): ZeRO-3 then gathers the head weight for this
      forward and partitions its gradient afterwards (the alternative,
      ``deepspeed.zero.GatheredParameters`` around the loss, would not route the gradient).
    * **DDP / one process**: nothing special; DDP wraps this module, so its forward is what DDP calls.

    ``compute_dtype``: the dtype a 4-D additive mask is cast to (the dtype attention runs in, e.g.
    bf16 under mixed precision); ``None`` means the LM head's dtype. torch 2.13's CPU SDPA silently
    mis-computes a float64 query with a float32 mask, and older torch releases reject a mask whose
    float dtype differs from the query's.
    """

    def __init__(
        self,
        lm: nn.Module,
        label_smoothing: float = 0.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        compute_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.lm = lm
        self.label_smoothing = float(label_smoothing)
        self.chunk_size = int(chunk_size)
        self.compute_dtype = compute_dtype

    def base_model(self) -> nn.Module:
        prefix = getattr(self.lm, "base_model_prefix", "model")
        base = getattr(self.lm, prefix, None)
        if base is None:
            raise TypeError(f"{type(self.lm).__name__} has no base model '{prefix}'")
        return base

    def head_weight(self) -> torch.Tensor:
        """The LM-head weight (V, H); heads with a bias are not supported by the chunked loss."""
        head = self.lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError("LM heads with a bias are not supported by the chunked loss")
        return head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        normaliser: Optional[Number] = None,
        prompt_mask: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        head = self.head_weight()
        mask_dtype = self.compute_dtype if self.compute_dtype is not None else head.dtype
        kwargs = attention_inputs(self.lm, attention_mask, position_ids, mask_dtype)
        out = self.base_model()(input_ids=input_ids, use_cache=False, **kwargs)
        hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
        res = weighted_causal_lm_loss(
            hidden,
            head,
            labels,
            weights,
            normaliser,
            prompt_mask=prompt_mask,
            label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size,
        )
        return {f.name: getattr(res, f.name) for f in fields(res)}


def attention_inputs(
    lm: Any,
    attention_mask: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """The ``attention_mask`` / ``position_ids`` keyword arguments for ``lm``'s base model.

    A 4-D floating mask (packed batches, ``attention="mask4d"``) is cast to ``dtype``. Raises a clear
    error when the model uses flash attention, which takes no 4-D mask (pack with
    ``PackedCollator.for_model``, i.e. ``attention="position_ids"``).
    """
    out: Dict[str, torch.Tensor] = {}
    if attention_mask is not None:
        if attention_mask.dim() == 4:
            impl = str(getattr(getattr(lm, "config", None), "_attn_implementation", "") or "")
            if "flash" in impl:
                raise ValueError(
                    f"packed batch has a 4-D attention mask but the model uses "
                    f"attn_implementation={impl!r}: build the collator with "
                    f"PackedCollator.for_model(...) (attention='position_ids')"
                )
            if dtype is not None and attention_mask.is_floating_point() and attention_mask.dtype != dtype:
                attention_mask = attention_mask.to(dtype)  # finfo(float32).min -> -inf in bf16: harmless
        out["attention_mask"] = attention_mask
    if position_ids is not None:
        out["position_ids"] = position_ids
    return out


def register_for_zero3(wrapper: WeightedLossModel) -> None:
    """DeepSpeed ZeRO-3: make the wrapper's forward gather the LM-head weight (see the class)."""
    import deepspeed  # only on clusters with DeepSpeed installed

    deepspeed.zero.register_external_parameter(wrapper, wrapper.head_weight())
