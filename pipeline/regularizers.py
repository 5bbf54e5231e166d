"""Regularizers of the supplemental experiment (paper section 6.1, appendix E.5; docs/study.md section 2).

Four ways to keep a fine-tuned model near its pre-trained weights, each a ``train.*`` value
(``conf/experiment/regularizers.yaml`` names the variants):

* **Weight decay** (``train.weight_decay``): PyTorch's AdamW, decoupled decay, applied as HF Trainer
  applies it: to every parameter with >= 2 dimensions (linear and embedding weights), not to biases
  or normalisation weights (:func:`optimizer_groups`).
* **Minkowski penalty** (``train.minkowski_coef``, :class:`MinkowskiPenalty`)::

      penalty = coef x mean over parameter tensors t of  D_t,    D_t = sum_i |theta_t,i - theta0_t,i|

  The paper: "calculating the mean of the p = 1 Minkowski distance between each pair of weight
  tensors from the PTLM and the trained model". The p = 1 Minkowski distance between two tensors is
  the L1 distance, a **sum** over elements (``train.minkowski_reduction: sum``, the default). With
  ``mean`` each tensor's distance is divided by its number of elements instead (scale-free, but
  then the penalty's gradient per element is ~1e-11 for a 7B model at coef 0.1: no regularization).
  Every trainable tensor counts once (tied input/output embeddings are one tensor); theta_0 is the
  model training starts from (after the pad-token row was added, so shapes match).
* **Attention dropout** (``train.attention_dropout``): ``config.attention_dropout`` of the LLaMA
  attention modules (transformers' ``LlamaAttention``), :func:`set_attention_dropout`.
* **Label smoothing** (``train.label_smoothing``): inside the weighted loss
  (:func:`pipeline.loss.weighted_causal_lm_loss`), so each token's smoothed CE keeps its PLW weight,
  like transformers' ``LabelSmoother`` applied per token.

How the Minkowski penalty is computed without a second copy of the model per GPU
--------------------------------------------------------------------------------
The penalty is separable over elements, so its gradient is analytic:
``d penalty / d theta_i = coef / T x sign(theta_i - theta0_i)`` (``/ numel_t`` more with ``mean``;
T = number of tensors; sign(0) = 0, the subgradient at theta = theta_0). :meth:`MinkowskiPenalty.apply`
adds it to the parameters' gradients *after* the data gradients have been reduced across ranks and
*before* clipping and the optimizer step, i.e. exactly what ``(data_loss + penalty).backward()``
followed by clipping would do, and returns the penalty's value at the current weights.

It works on each rank's *local* parameter data: under FSDP (``fully_shard``) a parameter is a
DTensor sharded on dim 0 and the reference is a copy of the same local shard taken right after
sharding, so every rank holds only its 1/world share of theta_0 (as it does of theta, the gradients
and the optimizer states); the per-tensor sums are all-reduced once per step (one vector of T
numbers). Under DDP or one process the parameters are whole and the reference is a whole copy.
``train.minkowski_reference: cpu`` keeps the reference in host memory instead (no accelerator
memory; one host-to-device copy per tensor per step). Resuming a run re-creates the reference from
the pre-trained weights (not from the checkpoint).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn


# --------------------------------------------------------------------------------------------
# parameter helpers (plain tensors and FSDP2 DTensors alike)
# --------------------------------------------------------------------------------------------
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name without wrapper prefixes (DDP ``module.``, FSDP1, checkpointing, compile)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    if name.startswith("module."):
        name = name[len("module.") :]
    return name


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's data of a (possibly DTensor-sharded) tensor, sharing storage with it."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None:
        return t._local_tensor if hasattr(t, "_local_tensor") else to_local()
    return t


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def trainable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """``(clean name, parameter)`` for every trainable parameter, tied parameters once."""
    return [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# weight decay
# --------------------------------------------------------------------------------------------
def no_decay(name: str, ndim: int) -> bool:
    """HF Trainer's rule (``get_decay_parameter_names``): no decay for biases and norm weights."""
    parts = name.lower().split(".")
    return ndim < 2 or parts[-1] == "bias" or any("norm" in x for x in parts[:-1])


def decay_parameter_names(model: nn.Module) -> set:
    """Names (clean) of the parameters that get weight decay; call before sharding (shapes known)."""
    return {n for n, p in trainable_parameters(model) if not no_decay(n, p.dim())}


def optimizer_groups(model: nn.Module, weight_decay: float, decay_names: Optional[set] = None) -> List[dict]:
    """AdamW parameter groups: ``[{params: decayed, weight_decay}, {params: others, weight_decay: 0}]``."""
    names = decay_parameter_names(model) if decay_names is None else decay_names
    decay, other = [], []
    for n, p in trainable_parameters(model):
        (decay if n in names else other).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------
# attention dropout
# --------------------------------------------------------------------------------------------
def set_attention_dropout(model: nn.Module, p: float) -> int:
    """Set ``config.attention_dropout`` and every attention module's rate to ``p``; returns how many
    modules were set (LLaMA-family attention reads ``self.attention_dropout`` in train mode)."""
    if not 0 <= p < 1:
        raise ValueError(f"attention dropout must be in [0, 1), got {p}")
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "attention_dropout"):
        cfg.attention_dropout = float(p)
    n = 0
    for m in model.modules():
        rate = getattr(m, "attention_dropout", None)
        if m is not model and isinstance(rate, (int, float)) and not isinstance(rate, bool):
            m.attention_dropout = float(p)
            n += 1
    if p > 0 and n == 0:
        raise ValueError(
            f"{type(model).__name__} has no attention module with an `attention_dropout` "
            "attribute: train.attention_dropout is not supported for this model"
        )
    return n


# --------------------------------------------------------------------------------------------
# Minkowski (p = 1) penalty
# --------------------------------------------------------------------------------------------
def minkowski_penalty(
    params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], coef: float, reduction: str = "sum"
) -> torch.Tensor:
    """Reference definition (differentiable, whole tensors): ``coef x mean_t D_t``.

    ``D_t = sum |p_t - ref_t|`` (``reduction="sum"``, the p = 1 Minkowski distance) or its mean.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    dists = []
    for p, r in zip(params, reference):
        d = (p - r.to(p.dtype)).abs()
        dists.append(d.sum() if reduction == "sum" else d.mean())
    if not dists:
        return torch.zeros(())
    return coef * torch.stack(dists).mean()


class MinkowskiPenalty:
    """``coef x mean_t D_t`` to the weights at construction (theta_0); see the module docstring.

    ``named_params``: ``(name, parameter)`` of the (possibly sharded) model. ``group``: the process
    group over which sharded tensors are split (``None``: the default group when one is initialised).
    """

    def __init__(
        self,
        named_params: Iterable[Tuple[str, nn.Parameter]],
        coef: float,
        reduction: str = "sum",
        reference_device: str = "device",
        group=None,
    ):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"minkowski reduction must be 'sum' or 'mean', got {reduction!r}")
        if reference_device not in ("device", "cpu"):
            raise ValueError(f"minkowski reference must be 'device' or 'cpu', got {reference_device!r}")
        self.coef = float(coef)
        self.reduction = reduction
        self.group = group
        self.names: List[str] = []
        self.params: List[nn.Parameter] = []
        self.refs: List[torch.Tensor] = []
        self.numel: List[int] = []
        self.sharded = False
        with torch.no_grad():
            for name, p in named_params:
                loc = local_tensor(p.detach())
                ref = loc.clone() if reference_device == "device" else loc.to("cpu", copy=True)
                self.names.append(name)
                self.params.append(p)
                self.refs.append(ref)
                self.numel.append(int(p.numel()))  # global numel (DTensor: the full shape)
                self.sharded = self.sharded or is_sharded(p)
        if not self.params:
            raise ValueError("no trainable parameters for the Minkowski penalty")

    @property
    def n_tensors(self) -> int:
        return len(self.params)

    def reference_bytes(self) -> int:
        return sum(r.numel() * r.element_size() for r in self.refs)

    def _scales(self) -> List[float]:
        T = self.n_tensors
        if self.reduction == "sum":
            return [self.coef / T] * T
        return [self.coef / (T * n) for n in self.numel]

    @torch.no_grad()
    def distances(self) -> torch.Tensor:
        """Per-tensor ``D_t`` (float64, all-reduced over shards), without touching gradients."""
        return self._run(add_grad=False)

    @torch.no_grad()
    def apply(self) -> float:
        """Add the penalty's gradient to ``p.grad`` (local shards) and return the penalty's value."""
        d = self._run(add_grad=True)
        return float(self._value(d))

    @torch.no_grad()
    def value(self) -> float:
        return float(self._value(self.distances()))

    def _value(self, d: torch.Tensor) -> torch.Tensor:
        if self.reduction == "mean":
            d = d / torch.tensor(self.numel, dtype=torch.float64, device=d.device)
        return self.coef * d.mean()

    def _run(self, add_grad: bool) -> torch.Tensor:
        sums = []
        scales = self._scales()
        device = None
        for p, ref, scale in zip(self.params, self.refs, scales):
            loc = local_tensor(p.detach())
            device = loc.device
            diff = loc - ref.to(loc.device, non_blocking=True).to(loc.dtype)
            sums.append(
                diff.abs().sum(dtype=torch.float64)
                if diff.numel()
                else torch.zeros((), dtype=torch.float64, device=loc.device)
            )
            if add_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                g = local_tensor(p.grad)
                g.add_(torch.sign(diff).to(g.dtype), alpha=scale)
        d = torch.stack(sums)
        if self.sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
            import torch.distributed as dist

            red = d
            if dist.get_backend(self.group) == "nccl" and red.device.type != "cuda":
                red = red.cuda()
            dist.all_reduce(red, op=dist.ReduceOp.SUM, group=self.group)
            d = red.to(device)
        return d
