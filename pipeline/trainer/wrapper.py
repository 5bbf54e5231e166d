"""The causal LM wrapped so that its ``forward`` returns the PLW-weighted loss.

Why a wrapper: :func:`pipeline.loss.weighted_causal_lm_loss` takes the final hidden states and the
LM-head *weight* (it never builds full logits). Under sharded data parallelism a weight is only
materialised while the module that owns it runs its forward, so the loss has to be computed *inside*
a module's forward:

* **FSDP** (``fully_shard`` / FSDP2): the decoder layers are wrapped (sharded units of their own) and
  this wrapper is the root unit. ``lm_head`` (and the embeddings, and the final norm) belong to the
  root unit, so they are unsharded for the whole of the root's forward and backward: reading
  ``self.lm.get_output_embeddings().weight`` here gives the full (mixed-precision) weight, and its
  gradient is reduce-scattered by the root's post-backward hook like any other root parameter.
* **DeepSpeed ZeRO-3**: parameters are gathered by hooks on *submodule* forwards, and ``lm_head``'s
  own forward is never called. :func:`register_for_zero3` therefore registers the head weight as an
  *external parameter* of this wrapper (``deepspeed.zero.register_external_parameter``), and the
  wrapper itself is the engine's module (``deepspeed.initialize(model=wrapper, ...)``): ZeRO-3 then
  gathers the head weight for the wrapper's forward and partitions its gradient afterwards (the
  alternative, ``deepspeed.zero.GatheredParameters`` around the loss, would not route the gradient).
* **DDP / one process**: nothing special; DDP wraps this module, so its forward is what DDP calls.

The forward returns a dict of tensors (``loss`` differentiable; the rest detached sums for logging:
``weighted_ce_sum``, ``weight_sum``, ``prompt_ce_sum``, ``prompt_tokens``, ``completion_ce_sum``,
``completion_tokens``), a structure FSDP/DDP know how to traverse.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from pipeline.loss import DEFAULT_CHUNK_SIZE, weighted_causal_lm_loss

OUTPUT_KEYS = ("loss", "weighted_ce_sum", "weight_sum", "prompt_ce_sum", "prompt_tokens",
               "completion_ce_sum", "completion_tokens")


class WeightedLossModel(nn.Module):
    """``forward(input_ids, labels, weights, normaliser, prompt_mask, **model_kwargs)`` -> loss dict.

    ``model_kwargs`` go to the base model (``attention_mask``, ``position_ids`` of packed batches).
    ``normaliser`` is this micro-batch's denominator from :func:`pipeline.loss.step_normalisers`
    (``None``: the batch's own weight sum).
    """

    def __init__(self, lm: nn.Module, label_smoothing: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.lm = lm
        self.label_smoothing = float(label_smoothing)
        self.chunk_size = int(chunk_size)

    def base_model(self) -> nn.Module:
        prefix = getattr(self.lm, "base_model_prefix", "model")
        base = getattr(self.lm, prefix, None)
        if base is None:
            raise TypeError(f"{type(self.lm).__name__} has no base model '{prefix}'")
        return base

    def head_weight(self) -> torch.Tensor:
        head = self.lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError("LM heads with a bias are not supported by the chunked loss")
        return head.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                normaliser: Optional[torch.Tensor] = None, prompt_mask: Optional[torch.Tensor] = None,
                **model_kwargs: Any) -> Dict[str, torch.Tensor]:
        out = self.base_model()(input_ids=input_ids, use_cache=False, **model_kwargs)
        hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
        res = weighted_causal_lm_loss(hidden, self.head_weight(), labels, weights, normaliser,
                                      prompt_mask=prompt_mask, label_smoothing=self.label_smoothing,
                                      chunk_size=self.chunk_size)
        return {"loss": res.loss, "weighted_ce_sum": res.weighted_ce_sum, "weight_sum": res.weight_sum,
                "prompt_ce_sum": res.prompt_ce_sum, "prompt_tokens": res.prompt_tokens,
                "completion_ce_sum": res.completion_ce_sum, "completion_tokens": res.completion_tokens}


def register_for_zero3(wrapper: WeightedLossModel) -> None:
    """DeepSpeed ZeRO-3: make the wrapper's forward gather the LM-head weight (see module docstring)."""
    import deepspeed  # only on clusters with DeepSpeed installed

    deepspeed.zero.register_external_parameter(wrapper, wrapper.head_weight())
