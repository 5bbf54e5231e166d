"""PLW inside transformers' ``Trainer``: the project's token weights and its ``weight_sum`` normaliser.

For practitioners who train with ``transformers.Trainer`` and want the study's loss without the rest
of the pipeline (docs/study.md section 1: every prompt target weighted by PLW, every completion
target by ``completion_weight``, the weighted sum divided by the sum of weights over the whole
optimizer step)::

    from transformers import Trainer, TrainingArguments
    from pipeline.integrations.hf import PLWCollator, count_weights, plw_compute_loss

    args = TrainingArguments("out", per_device_train_batch_size=4, gradient_accumulation_steps=4,
                             remove_unused_columns=False)          # the collator reads the text fields
    trainer = Trainer(model=model, args=args, train_dataset=records,  # Alpaca records or prompt/completion
                      data_collator=PLWCollator(tokenizer, plw=0.1, chunked=True),
                      compute_loss_func=plw_compute_loss(model))
    count_weights(trainer)   # num_items_in_batch = sum of weights of the step (all micro-batches, all ranks)
    trainer.train()

Pieces:

- :class:`PLWCollator` tokenizes each feature exactly as the project does
  (:mod:`pipeline.preprocess`: Alpaca's template and tokenization for Alpaca records
  ``instruction``/``input``/``output``; for TRL-style ``prompt``/``completion`` pairs the prompt is
  the source and ``completion + EOS`` the target), weights it with :func:`pipeline.loss.token_weights`
  and pads. The batch's ``labels`` is a dict ``{"labels": ids, "weights": w}``: Trainer pops
  ``labels`` before the forward pass and hands it, moved to the device, to ``compute_loss_func``; the
  model never sees the weights.
- :func:`plw_compute_loss` is that ``compute_loss_func``: ``sum(w * CE) / num_items_in_batch``.
  Given the model (``plw_compute_loss(model)``) and a collator made with ``chunked=True``, it is the
  project's chunked loss (:func:`pipeline.loss.weighted_causal_lm_loss`, the loss owns the LM head):
  the collator asks the forward pass for the final hidden states and for the logits of the last
  position only (``output_hidden_states=True, logits_to_keep=1``), so the ``tokens x vocab`` logits
  are never built; the loss walks the vocabulary in chunks from the hidden states and the head
  weight. Without them, the same loss from the model's full logits
  (:func:`pipeline.loss.naive_weighted_loss`, the reference the chunked loss is tested against).
  The chunked path needs the LM head as one parameter (DDP yes, FSDP's flattened parameters no).
- :func:`count_weights` makes Trainer's ``num_items_in_batch`` the sum of weights over the
  accumulation window (and over all processes when ``average_tokens_across_devices``, the default):
  Trainer counts ``labels != -100`` otherwise, a token count, not the study's normaliser. It replaces
  the trainer's counting hook ``_get_num_items_in_batch`` on that instance (transformers 4.57).

With these, the step gradient equals the project's trainer's on the same examples, whatever the
gradient accumulation (tests/test_integrations_hf.py, float64).

TRL (the ``integrations`` extra, trl 1.16.0): :func:`sft_trainer_class` returns ``PLWSFTTrainer``,
TRL's ``SFTTrainer`` with this loss and normaliser. TRL 1.16 deprecates ``compute_loss_func`` for
``SFTTrainer`` (and feeds ``labels`` to its fused-head metrics, which a weights dict would break), so
the subclass overrides ``compute_loss`` and the counting hook instead; TRL's own dataset preparation
is skipped (``dataset_kwargs={"skip_prepare_dataset": True}``, ``remove_unused_columns=False``,
set by the subclass): the collator tokenizes. Its loss is the chunked one (no full logits). TRL's
entropy/token-accuracy metrics are not computed.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from pipeline.loss import DEFAULT_CHUNK_SIZE, IGNORE_INDEX, naive_weighted_loss, weighted_causal_lm_loss
from pipeline.preprocess import Collator, _finish_instance, _ids, build_example, render

TEXT_FIELDS = "Alpaca records (instruction, input, output) or prompt/completion pairs"


class PLWInputError(ValueError):
    """A feature the collator cannot read (the message names the feature and the fields)."""


@dataclass
class PLWCollator:
    """Tokenize, weight and pad a list of features (see the module docstring)."""

    tokenizer: Any
    plw: float
    completion_weight: float = 1.0
    model_max_length: int = 512
    truncation: str = "keep"
    pad_to_multiple_of: Optional[int] = None
    # ask the forward pass for hidden states and the last position's logits only (for
    # plw_compute_loss(model): the chunked loss, no tokens x vocab logits)
    chunked: bool = False

    def example(self, feature: Mapping[str, Any], index: int = 0) -> Dict[str, torch.Tensor]:
        """One feature -> ``input_ids``, ``labels``, ``weights``, ``prompt_mask`` (unpadded)."""
        tok = self.tokenizer
        if "output" in feature and "instruction" in feature:
            source, target = render(feature, tok.eos_token)
        elif "prompt" in feature and "completion" in feature:
            source, target = str(feature["prompt"]), str(feature["completion"]) + tok.eos_token
        else:
            raise PLWInputError(
                f"feature {index}: fields {sorted(feature)}: expected {TEXT_FIELDS} (with Trainer, set "
                f"TrainingArguments(remove_unused_columns=False) so that the text fields reach the collator)"
            )
        full = _ids(tok, source + target, self.model_max_length)
        n_src = len(_ids(tok, source, self.model_max_length))
        inst = _finish_instance(source, target, full, n_src, tok, self.model_max_length, self.truncation)
        if inst is None:
            raise PLWInputError(
                f"feature {index}: no completion token left after truncation to {self.model_max_length}"
            )
        return build_example(inst.input_ids, inst.n_prompt, self.plw, self.completion_weight)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        batch = Collator(int(pad), self.pad_to_multiple_of)([self.example(f, i) for i, f in enumerate(features)])
        out: Dict[str, Any] = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": {"labels": batch["labels"], "weights": batch["weights"]},
        }
        if self.chunked:
            out.update(output_hidden_states=True, logits_to_keep=1)
        return out


def plw_compute_loss(model=None, label_smoothing: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """``compute_loss_func`` for ``transformers.Trainer``: the weighted causal-LM loss of one
    micro-batch divided by ``num_items_in_batch`` (the step's weight sum, with :func:`count_weights`;
    without it, this micro-batch's own weight sum). With ``model`` and a ``chunked`` collator: the
    chunked loss from the final hidden states and ``model``'s LM head (see the module docstring)."""
    head = model.get_output_embeddings() if model is not None else None
    if head is not None and getattr(head, "bias", None) is not None:
        raise PLWInputError("the chunked PLW loss needs an LM head without a bias: use plw_compute_loss()")

    def compute_loss(outputs, labels, num_items_in_batch=None):
        if not isinstance(labels, Mapping) or "weights" not in labels:
            raise PLWInputError("labels must come from PLWCollator (a dict with 'labels' and 'weights')")
        if num_items_in_batch is None:
            warnings.warn(
                "num_items_in_batch is None: each micro-batch is divided by its own weight sum (right for "
                "evaluation and for one micro-batch per step); for training, call count_weights(trainer)",
                stacklevel=2,
            )
        get = outputs.get if isinstance(outputs, Mapping) else (lambda k: getattr(outputs, k, None))
        hidden = get("hidden_states")
        ids, w = labels["labels"], labels["weights"]
        if head is not None and hidden is not None:
            h = hidden[-1]  # the final norm's output (transformers ties hidden_states[-1] to it)
            return weighted_causal_lm_loss(
                h,
                head.weight,
                ids,
                w.to(h.device),
                num_items_in_batch,
                label_smoothing=label_smoothing,
                ignore_index=IGNORE_INDEX,
                chunk_size=chunk_size,
            ).loss
        logits = get("logits")
        if logits is None or logits.shape[1] != ids.shape[1]:
            raise PLWInputError(
                "the model returned no full logits (a PLWCollator with chunked=True asks for hidden states "
                "only): pass the model, compute_loss_func=plw_compute_loss(model)"
            )
        return naive_weighted_loss(
            logits,
            ids,
            w.to(logits.device),
            normaliser=num_items_in_batch,
            label_smoothing=label_smoothing,
            ignore_index=IGNORE_INDEX,
        )

    return compute_loss


def _weight_sum_items(self, batch_samples: list, device) -> Optional[torch.Tensor]:
    """Trainer's counting hook, replaced: the sum of the weights of the step's micro-batches (targets
    only: each example's first weight has no target), gathered over processes like Trainer's count."""
    if not batch_samples or not isinstance(batch_samples[0].get("labels"), Mapping):
        return None
    total = sum(b["labels"]["weights"][:, 1:].sum(dtype=torch.float64) for b in batch_samples)
    total = total.to(device)
    if self.args.average_tokens_across_devices and self.args.world_size > 1:
        total = self.accelerator.gather(total.reshape(1)).sum()
    return total


def count_weights(trainer) -> Any:
    """Make ``trainer``'s ``num_items_in_batch`` the step's sum of weights (see the module docstring);
    returns the trainer."""
    if not hasattr(trainer, "_get_num_items_in_batch"):
        raise RuntimeError(
            "this transformers Trainer has no _get_num_items_in_batch hook (transformers >= 4.48 has it): "
            "pass the step's weight sum another way"
        )
    trainer._get_num_items_in_batch = types.MethodType(_weight_sum_items, trainer)
    return trainer


def _step_loss(trainer, model, inputs, return_outputs: bool, num_items_in_batch):
    """Trainer.compute_loss with the PLW loss, the chunked one: the forward pass gives hidden states and
    the last position's logits only; the same rescaling Trainer applies when it averages tokens across
    devices."""
    labels = inputs.pop("labels")
    inputs = {**inputs, "use_cache": False, "output_hidden_states": True, "logits_to_keep": 1}
    outputs = model(**inputs)
    unwrapped = trainer.accelerator.unwrap_model(model)
    loss = plw_compute_loss(unwrapped)(outputs, labels, num_items_in_batch=num_items_in_batch)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * trainer.accelerator.num_processes
    return (loss, outputs) if return_outputs else loss


def sft_trainer_class():
    """``PLWSFTTrainer``: TRL's ``SFTTrainer`` with the project's loss and weight-sum normaliser (see the
    module docstring). Use it with ``data_collator=PLWCollator(...)``."""
    try:
        from trl import SFTTrainer  # lazy: TRL is the optional `integrations` extra
    except ImportError as e:  # pragma: no cover - the pinned set has it
        raise ImportError("PLWSFTTrainer needs TRL: pip install 'plw-pipeline[integrations]' (trl==1.16.0)") from e

    class PLWSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            cfg = kwargs.get("args")
            if cfg is not None:
                cfg.dataset_kwargs = {**(cfg.dataset_kwargs or {}), "skip_prepare_dataset": True}
                cfg.remove_unused_columns = False
            if not isinstance(kwargs.get("data_collator"), PLWCollator):
                raise PLWInputError("PLWSFTTrainer needs data_collator=PLWCollator(tokenizer, plw=...)")
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return _step_loss(self, model, inputs, return_outputs, num_items_in_batch)

        _get_num_items_in_batch = _weight_sum_items

    return PLWSFTTrainer
