"""Distance of the fine-tuned weights to the pre-trained model (docs/study.md section 3, a mechanism metric).

Over every parameter tensor of the pre-trained model (tied tensors once), in float64:

* ``l1_mean``: sum |theta - theta0| / number of compared elements (the mean absolute change);
* ``l2``: sqrt(sum (theta - theta0)^2) (the Euclidean distance of the flattened models);
* ``l1_sum``, ``elements``; ``l1_mean_per_tensor``: the mean over tensors of each tensor's mean |diff|
  (the Minkowski regularizer's ``mean`` reduction) and ``l1_sum_per_tensor``: the mean over tensors
  of each tensor's sum (its ``sum`` reduction, the paper's wording).

Rows added for the pad token: when the fine-tuned embedding (or LM head) has more rows than the
pre-trained one (:func:`pipeline.models.ensure_pad_token` appended a ``[PAD]`` row), only the
common rows (the first ``rows0``) are compared; ``rows_excluded`` says which tensors lost how many
rows. Any other shape difference is an error.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch


def weight_distance(
    trained: Callable[[str], Optional[torch.Tensor]], reference: Iterable[Tuple[str, torch.Tensor]]
) -> Dict[str, object]:
    """Distance between ``trained(name)`` and each ``(name, tensor)`` of ``reference``.

    ``trained`` looks a tensor up by the reference's name (``None``: missing, an error).
    """
    l1 = l2sq = 0.0
    n = 0
    per_tensor_mean, per_tensor_sum = [], []
    excluded: Dict[str, int] = {}
    for name, ref in reference:
        t = trained(name)
        if t is None:
            raise KeyError(f"weight distance: the fine-tuned model has no tensor '{name}'")
        if t.shape != ref.shape:
            if t.dim() == ref.dim() and t.shape[1:] == ref.shape[1:] and t.shape[0] > ref.shape[0]:
                excluded[name] = int(t.shape[0] - ref.shape[0])
                t = t[: ref.shape[0]]
            else:
                raise ValueError(
                    f"weight distance: '{name}' has shape {tuple(t.shape)} in the fine-tuned "
                    f"model but {tuple(ref.shape)} in the pre-trained one"
                )
        d = t.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)
        a = d.abs().sum().item()
        l1 += a
        l2sq += d.pow(2).sum().item()
        n += d.numel()
        per_tensor_sum.append(a)
        per_tensor_mean.append(a / max(1, d.numel()))
    if n == 0:
        raise ValueError("weight distance: no tensors compared")
    return {
        "l1_mean": l1 / n,
        "l2": math.sqrt(l2sq),
        "l1_sum": l1,
        "elements": n,
        "tensors": len(per_tensor_sum),
        "l1_mean_per_tensor": sum(per_tensor_mean) / len(per_tensor_mean),
        "l1_sum_per_tensor": sum(per_tensor_sum) / len(per_tensor_sum),
        "rows_excluded": excluded,
        "note": (
            "rows appended for the pad token are excluded: only the pre-trained model's rows are compared"
            if excluded
            else "all elements compared"
        ),
    }


def reference_parameters(model) -> Iterable[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of a pre-trained model's parameters, tied tensors once."""
    return ((name, p.detach()) for name, p in model.named_parameters())
