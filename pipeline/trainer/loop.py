"""The training loop: optimizer steps, checkpoints, resume, validation, final model and summary.

One optimizer step (every rank, in lockstep)::

    examples of the step   = step_examples(N, global_batch, seed, step)        (pipeline.trainer.data)
    this rank's micro-batches (fillers where a rank has none)
    denominators           = step_normalisers(micro_batches, train.loss_normaliser)   # all-reduced, BEFORE
    for each micro-batch:  loss_k = model(batch, normaliser=D_k)["loss"]; backward   # the forward passes
    Minkowski penalty gradient added (train.minkowski_coef > 0)                 (pipeline.regularizers)
    grad_norm = clip(max_grad_norm); AdamW step; LR scheduler step; zero grads
    one line in metrics.jsonl (rank 0); checkpoint every train.save_steps steps

Metrics (``metrics.jsonl``, ``"kind": "train"``, one line per optimizer step):

==================  ===================================================================================
``step``            optimizer step (1-based); ``total_steps``; ``epoch`` = step / steps per epoch
``loss``            the step's objective: sum_k loss_k averaged over ranks (``weight_sum``: sum w*CE /
                    sum w over the whole step), before the Minkowski penalty
``penalty``         Minkowski penalty at the step's weights (0 when off); ``total_loss`` = loss + penalty
``prompt_loss``     unweighted mean CE over the step's prompt-target tokens (null if none)
``completion_loss`` unweighted mean CE over its completion-target tokens (null if none)
``prompt_tokens``, ``completion_tokens``, ``weight_sum``: the step's target counts and sum of weights
``lr``              learning rate used by this step's update
``grad_norm``       global gradient norm before clipping (data loss + penalty)
``tokens``          real (non-pad) input tokens of the step, all ranks; ``examples``
``tokens_per_s``    tokens / wall time of the step; ``step_time_s``; ``elapsed_s`` (all attempts)
``skipped``         only on a step whose total loss weight is zero (e.g. PLW 0 and every completion of
                    the step cut by truncation): no forward pass and no update (the LR schedule still
                    advances); ``loss``, the losses and ``grad_norm`` are null. Counted in the summary's
                    ``skipped_steps`` and logged. A run whose examples all weigh zero is refused before
                    training (:class:`~pipeline.trainer.data.ZeroWeightError`).
==================  ===================================================================================

No file written here holds NaN or Infinity (strict JSON: undefined values are ``null``).

``"kind": "eval"`` lines (validation split, at ``train.eval_steps`` and at the end): ``step``,
``eval_loss`` (sum w*CE / sum w over the split), ``eval_prompt_loss``, ``eval_completion_loss``
(unweighted means), ``eval_prompt_tokens``, ``eval_completion_tokens``, ``eval_examples``.

Resume: the latest complete checkpoint (:mod:`pipeline.trainer.checkpoint`) restores model,
optimizer, scheduler, RNG states and the step counter; the data position follows from the step
(:func:`~pipeline.trainer.data.step_examples`), and lines of ``metrics.jsonl`` after the checkpoint's
step (written before a kill) are dropped, so the file always has one line per step. On CPU a resumed
run ends bit-identical to an uninterrupted one (tested). A checkpoint whose files do not match the
sizes and checksums of its DONE marker is moved aside (``damaged-step-N``, kept) with a warning, and
the previous complete one is used (:func:`pipeline.trainer.checkpoint.verify`).

Stopping: SIGTERM or SIGUSR1 (SLURM's warning before a time limit, ``scancel``) set a flag; at the
next step boundary every rank agrees (one all-reduce), a checkpoint is written and
:class:`Preempted` is raised (a ``SystemExit`` with code :data:`PREEMPTED_EXIT_CODE`, 75) so that
the launcher can requeue the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

try:
    from torch.distributed.checkpoint.api import CheckpointException
except ImportError:  # a torch build without torch.distributed

    class CheckpointException(Exception):  # type: ignore[no-redef]
        pass


import pipeline
from pipeline.atomic_dir import staging, swap_in
from pipeline.config import Config, validate
from pipeline.lifecycle import PREEMPTED_EXIT_CODE, Preempted
from pipeline.loss import WeightedLossModel, step_normalisers
from pipeline.packing import PackedCollator, default_packing_tokens, plan_step
from pipeline.preprocess import Collator
from pipeline.regularizers import (
    MinkowskiPenalty,
    decay_parameter_names,
    optimizer_groups,
    set_attention_dropout,
    trainable_parameters,
)
from pipeline.runs import RunDir, append_jsonl, atomic_write_json, atomic_write_text, dumps_json, read_jsonl
from pipeline.trainer import checkpoint as ckpt
from pipeline.trainer import lora
from pipeline.trainer.data import (
    TrainData,
    batch_tokens,
    example_weight,
    filler_example,
    rank_micro_batches,
    step_epoch,
    step_examples,
    steps_per_epoch,
    total_steps,
)
from pipeline.models import load_model, torch_dtype
from pipeline.trainer.dist import Backend, seed_everything
from pipeline.trainer.distance import reference_parameters, weight_distance
from pipeline.trainer.reporting import Trackers, format_row

log = logging.getLogger("pipeline.train")

SUMMARY_FILE = "train_summary.json"
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class TrainerCallback:
    """Hooks for tests and tools (all optional). ``on_step_end`` returning True requests a stop
    (handled like SIGTERM: checkpoint, then :class:`Preempted`)."""

    def on_train_begin(self, trainer: "Trainer", start_step: int) -> None: ...

    def on_gradients(self, trainer: "Trainer", step: int) -> None: ...

    def on_step_end(self, trainer: "Trainer", step: int, row: Mapping[str, Any]) -> Optional[bool]: ...

    def on_checkpoint(self, trainer: "Trainer", step: int, path: Path) -> None: ...


def _f(x: torch.Tensor | float) -> float:
    return float(x)


def _div(a: float, b: float) -> Optional[float]:
    return a / b if b > 0 else None


class Trainer:
    """Trains ``lm`` on ``data`` as ``cfg.train`` says, in ``run_dir`` (see the module docstring)."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: RunDir,
        backend: Backend,
        lm: torch.nn.Module,
        tokenizer,
        data: TrainData,
        callbacks: Sequence[TrainerCallback] = (),
        typed: Optional[Config] = None,
        peft_model: Any = None,
    ):
        self.cfg = cfg
        # train.peft: the peft model whose adapters sit inside ``lm`` (pipeline/trainer/lora.py)
        self.peft_model = peft_model
        self.typed = validate(cfg) if typed is None else typed  # validated once, by the entry point
        self.tc = self.typed.train
        self.rd = run_dir
        self.backend = backend
        self.lm = lm
        self.tokenizer = tokenizer
        self.data = data
        self.callbacks = list(callbacks)
        self.seed = int(cfg.seed)
        self.accumulation = self.tc.accumulation_steps(backend.world)
        self.n_train = len(data.train)
        self.global_batch = self.tc.global_batch_size
        self.steps_per_epoch = steps_per_epoch(self.n_train, self.global_batch)
        self.total_steps = total_steps(self.n_train, self.global_batch, self.tc.epochs, self.tc.max_steps)
        self.warmup_steps = math.ceil(self.total_steps * self.tc.warmup_ratio)
        self.step = 0
        self.counters = {"tokens": 0, "examples": 0, "elapsed_s": 0.0, "skipped_steps": 0}
        self.resumed_from: List[int] = []
        self._stop_reason: Optional[str] = None
        self._old_handlers: Dict[int, Any] = {}
        self.last_row: Optional[Dict[str, Any]] = None
        self.last_eval: Optional[Dict[str, Any]] = None
        self.penalty: Optional[MinkowskiPenalty] = None
        self.model = self.optimizer = self.scheduler = None
        self.pack_step = bool(self.tc.packing) and self.tc.packing_scope == "step"
        self.packing_tokens = int(self.tc.packing_tokens or default_packing_tokens(self.tc, lm))
        if self.pack_step:
            # pipeline/packing.py: each step's examples in padding-free rows of packing_tokens tokens,
            # one row per micro-batch, positions restarting per example (isolation by position_ids).
            self.collate = PackedCollator(tokenizer, self.packing_tokens, attention="position_ids")
        elif self.tc.packing:
            # pipeline/packing.py: rows of up to model_max_length tokens, per-example position_ids and
            # attention isolation (a 4-D mask, or position_ids alone for flash attention), weights kept.
            self.collate = PackedCollator.for_model(tokenizer, self.tc.model_max_length, lm)
        else:
            self.collate = Collator(pad_token_id=int(tokenizer.pad_token_id))
        self.filler = filler_example(int(tokenizer.pad_token_id))

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        tc, b = self.tc, self.backend
        seed_everything(self.seed)
        cfg = getattr(self.lm, "config", None)
        # config values training changes; the saved model gets the originals back (inference settings)
        self._orig_config = {k: getattr(cfg, k) for k in ("use_cache", "attention_dropout") if hasattr(cfg, k)}
        if tc.attention_dropout > 0:
            set_attention_dropout(self.lm, float(tc.attention_dropout))
        if tc.gradient_checkpointing or b.settings.get("activation_checkpointing"):
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(self.lm, "config", None) is not None:
            self.lm.config.use_cache = False
        if b.device.type == "cuda" and tc.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.lm.train()
        mp = b.mixed_precision(tc) if b.device.type == "cuda" else None
        self.compute_dtype = mp or next(self.lm.parameters()).dtype
        wrapper = WeightedLossModel(
            self.lm,
            label_smoothing=float(tc.label_smoothing),
            chunk_size=int(tc.loss_chunk_size),
            compute_dtype=self.compute_dtype,
        )
        decay = decay_parameter_names(wrapper)
        self.model = b.wrap(wrapper, self.cfg.model, self.cfg.train)
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self.model, float(tc.weight_decay), decay),
            lr=float(tc.learning_rate),
            betas=(float(tc.adam_beta1), float(tc.adam_beta2)),
            eps=float(tc.adam_epsilon),
        )
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            tc.lr_scheduler, self.optimizer, num_warmup_steps=self.warmup_steps, num_training_steps=self.total_steps
        )
        if b.mode == "deepspeed":
            if tc.minkowski_coef > 0:
                raise NotImplementedError(
                    "train.minkowski_coef > 0 is not supported with train.distributed=deepspeed (use fsdp)"
                )
            self.model, self.optimizer, self.scheduler = b.init_deepspeed(
                self.model, self.optimizer, self.scheduler, self.tc, self.accumulation
            )
        if tc.minkowski_coef > 0:
            # theta_0 = the weights training starts from (taken before any checkpoint is loaded)
            self.penalty = MinkowskiPenalty(
                trainable_parameters(self.model),
                float(tc.minkowski_coef),
                tc.minkowski_reduction,
                tc.minkowski_reference,
            )
            log.info(
                "Minkowski penalty: coef %g, %s per tensor, %d tensors, reference %.1f MiB on %s (this rank's shard)",
                tc.minkowski_coef,
                tc.minkowski_reduction,
                self.penalty.n_tensors,
                self.penalty.reference_bytes() / 2**20,
                tc.minkowski_reference,
            )

    def resume(self) -> Optional[Path]:
        """Load the latest complete checkpoint (if any and ``train.resume``); returns it."""
        b = self.backend
        if b.is_main:
            gone = ckpt.remove_debris(self.rd.checkpoints)
            if gone:
                log.info("removed incomplete checkpoint folders %s", gone)
            if self.tc.resume:
                self._set_aside_damaged_checkpoints()
        b.barrier()
        latest = ckpt.latest_checkpoint(self.rd.checkpoints) if self.tc.resume else None
        if latest is None:
            if b.is_main:
                self._truncate_metrics(0)
            return None
        try:
            state = ckpt.read_state(latest)
            b.load(latest, self.model, self.optimizer, self.scheduler, trainable_only=self.peft_model is not None)
        except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
            # DCP's message carries each rank's traceback: its last line says what failed
            lines = [x for x in str(e).splitlines() if x.strip() and x.strip() != "."]
            why = lines[-1].strip() if lines else type(e).__name__
            raise RuntimeError(
                f"cannot resume from checkpoint {latest}: {type(e).__name__}: {why}. Move that folder "
                f"aside to resume from an earlier checkpoint, or set train.resume=false to "
                f"start over"
            ) from e
        self.step = int(state["step"])
        self.counters = {k: state["counters"].get(k, 0) for k in self.counters}
        self.resumed_from = list(state.get("resumed_from", [])) + [self.step]
        if state.get("total_steps") != self.total_steps:
            raise RuntimeError(
                f"{latest}: checkpoint of a run with {state.get('total_steps')} steps, but this "
                f"config gives {self.total_steps}: the data or recipe changed under the same run"
            )
        if b.is_main:
            self._truncate_metrics(self.step)
            log.info("resumed from %s (step %d of %d)", latest, self.step, self.total_steps)
            changed = layout_changes(state, self.layout())
            if changed:
                log.warning(
                    "resuming %s with a different layout (%s): the steps compute the same loss and "
                    "gradients up to floating-point rounding, but the run will not be bit-identical to "
                    "an uninterrupted one; set these back to resume exactly",
                    self.rd.path.name,
                    "; ".join(changed),
                )
        return latest

    def layout(self) -> Dict[str, Any]:
        """How the steps are laid out over processes, micro-batches and rows (runtime settings, not the
        run's identity): recorded in each checkpoint and compared on resume (:func:`layout_changes`)."""
        return {
            "world_size": self.backend.world,
            "per_device_batch_size": int(self.tc.per_device_batch_size),
            "accumulation_steps": self.accumulation,
            "packing": bool(self.tc.packing),
            "packing_scope": self.tc.packing_scope if self.tc.packing else None,
            "packing_tokens": self.packing_tokens if self.pack_step else None,
        }

    def _set_aside_damaged_checkpoints(self) -> None:
        """Rank 0, before resuming: newest first, a complete checkpoint whose files do not match the
        sizes and checksums of its DONE marker is moved aside (``damaged-step-N``, never deleted) and
        the previous one is checked, until one passes or none is left."""
        for path in reversed(ckpt.complete_checkpoints(self.rd.checkpoints)):
            problem = ckpt.verify(path)
            if problem is None:
                return
            aside = ckpt.move_aside(path)
            log.warning(
                "checkpoint %s is damaged (%s): moved aside to %s (not deleted); resuming from the "
                "previous complete checkpoint, if any",
                path,
                problem,
                aside.name,
            )

    def _truncate_metrics(self, step: int) -> None:
        rows = read_jsonl(self.rd.metrics)
        keep = [r for r in rows if int(r.get("step", 0)) <= step]
        if len(keep) != len(rows) or (rows and self.rd.metrics.read_text(encoding="utf-8")[-1:] != "\n"):
            atomic_write_text(self.rd.metrics, "".join(dumps_json(r) + "\n" for r in keep))

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._stop_reason is None:
            log.warning(
                "%s received: stopping at the next step boundary (checkpoint, then exit %d)", name, PREEMPTED_EXIT_CODE
            )
        self._stop_reason = name

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("training outside the main thread: SIGTERM/SIGUSR1 are not handled")
            return
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)
        self._old_handlers.clear()

    def request_stop(self, reason: str = "request") -> None:
        self._stop_reason = reason

    # ------------------------------------------------------------------ batches
    def _to_device(self, batch: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.backend.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _collate(self, examples: List[Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        return self._to_device(self.collate(examples if examples else [self.filler]))

    def _forward(self, batch: Mapping[str, torch.Tensor], normaliser=None) -> Dict[str, torch.Tensor]:
        # the (wrapped) pipeline.loss.WeightedLossModel: ordinary and packed batches alike
        return self.model(**batch, normaliser=normaliser)

    def step_batches(self, step: int) -> List[Dict[str, torch.Tensor]]:
        """This rank's collated micro-batches of optimizer step ``step``."""
        idx = step_examples(self.n_train, self.global_batch, self.seed, step)
        if self.pack_step:  # the whole step packed, rows balanced over the ranks (pipeline/packing.py)
            lengths = [int(self.data.train[i]["input_ids"].numel()) for i in idx]
            plan = plan_step(lengths, self.packing_tokens, self.backend.world)[self.backend.rank]
            return [self._collate([self.data.train[idx[p]] for p in row]) for row in plan]
        mbs = rank_micro_batches(
            idx, self.backend.world, self.backend.rank, self.tc.per_device_batch_size, self.accumulation
        )
        return [self._collate([self.data.train[i] for i in mb]) for mb in mbs]

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> Dict[str, Any]:
        b, tc = self.backend, self.tc
        t0 = time.perf_counter()
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step's update uses
        n_examples = len(step_examples(self.n_train, self.global_batch, self.seed, step))
        batches = self.step_batches(step)
        if not b.any(sum(example_weight(mb) for mb in batches) > 0):
            return self._skip_step(step, t0, lr, n_examples, batches)
        dens = step_normalisers(batches, tc.loss_normaliser)
        # loss, weighted CE, weight sum, prompt CE, prompt n, completion CE, completion n, tokens
        acc = torch.zeros(8, dtype=torch.float64)
        for k, batch in enumerate(batches):
            last = k == len(batches) - 1
            if b.engine is not None:  # a short last step of an epoch has fewer micro-batches
                b.engine.set_gradient_accumulation_boundary(last)
            with b.micro_batch_context(self.model, last), b.autocast(tc):
                out = self._forward(batch, dens[k])
                b.backward(out["loss"])
            if b.engine is not None:
                b.engine.step()  # DeepSpeed steps the optimizer itself at the accumulation boundary
            acc += torch.stack(
                [
                    out["loss"].detach().double().cpu(),
                    out["weighted_ce_sum"].double().cpu(),
                    out["weight_sum"].double().cpu(),
                    out["prompt_ce_sum"].double().cpu(),
                    out["prompt_tokens"].double().cpu(),
                    out["completion_ce_sum"].double().cpu(),
                    out["completion_tokens"].double().cpu(),
                    torch.tensor(float(batch_tokens(batch)), dtype=torch.float64),
                ]
            )
        penalty = self.penalty.apply() if self.penalty is not None else 0.0
        for cb in self.callbacks:
            cb.on_gradients(self, step)
        grad_norm = b.clip_grad_norm(self.model, float(tc.max_grad_norm))
        if b.engine is None:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        acc = b.all_reduce_sum(acc)
        dt = time.perf_counter() - t0
        self.counters["tokens"] += int(acc[7])
        self.counters["examples"] += n_examples
        self.counters["elapsed_s"] += dt
        loss = _f(acc[0]) / b.world
        return {
            "kind": "train",
            "step": step,
            "total_steps": self.total_steps,
            "epoch": step_epoch(step, self.n_train, self.global_batch),
            "loss": loss,
            "penalty": penalty,
            "total_loss": loss + penalty,
            "prompt_loss": _div(_f(acc[3]), _f(acc[4])),
            "completion_loss": _div(_f(acc[5]), _f(acc[6])),
            "prompt_tokens": int(acc[4]),
            "completion_tokens": int(acc[6]),
            "weight_sum": _f(acc[2]),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(acc[7]),
            "examples": n_examples,
            "tokens_per_s": _f(acc[7]) / dt if dt > 0 else None,
            "step_time_s": dt,
            "elapsed_s": self.counters["elapsed_s"],
            "seen_tokens": self.counters["tokens"],
        }

    def _skip_step(
        self, step: int, t0: float, lr: float, n_examples: int, batches: List[Dict[str, torch.Tensor]]
    ) -> Dict[str, Any]:
        """A step whose total loss weight is zero on every rank: nothing to learn from (its loss is
        0/0). No forward pass, no optimizer update (AdamW would still move the weights through its
        moments and weight decay); the LR schedule advances so that it stays a function of the step."""
        b = self.backend
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        if b.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        tokens = int(
            b.all_reduce_sum(torch.tensor([float(sum(batch_tokens(x) for x in batches))], dtype=torch.float64))[0]
        )
        dt = time.perf_counter() - t0
        self.counters["tokens"] += tokens
        self.counters["examples"] += n_examples
        self.counters["elapsed_s"] += dt
        self.counters["skipped_steps"] += 1
        if b.is_main:
            log.warning(
                "step %d skipped: its %d examples carry no loss weight (PLW %g; completions cut by "
                "truncation?); %d step(s) skipped so far",
                step,
                n_examples,
                float(self.cfg.plw),
                self.counters["skipped_steps"],
            )
        return {
            "kind": "train",
            "step": step,
            "total_steps": self.total_steps,
            "epoch": step_epoch(step, self.n_train, self.global_batch),
            "skipped": True,
            "loss": None,
            "penalty": None,
            "total_loss": None,
            "prompt_loss": None,
            "completion_loss": None,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "weight_sum": 0.0,
            "lr": lr,
            "grad_norm": None,
            "tokens": tokens,
            "examples": n_examples,
            "tokens_per_s": tokens / dt if dt > 0 else None,
            "step_time_s": dt,
            "elapsed_s": self.counters["elapsed_s"],
            "seen_tokens": self.counters["tokens"],
        }

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def evaluate(self, step: int) -> Optional[Dict[str, Any]]:
        n = len(self.data.eval)
        if n == 0:
            return None
        b, bs = self.backend, self.tc.per_device_batch_size
        mine = list(range(b.rank, n, b.world))
        n_batches = math.ceil(math.ceil(n / b.world) / bs)
        self.lm.eval()
        acc = torch.zeros(6, dtype=torch.float64)
        try:
            for j in range(n_batches):
                batch = self._collate([self.data.eval[i] for i in mine[j * bs : (j + 1) * bs]])
                with b.autocast(self.tc):
                    out = self._forward(batch, None)
                acc += torch.stack(
                    [
                        out[k].double().cpu()
                        for k in (
                            "weighted_ce_sum",
                            "weight_sum",
                            "prompt_ce_sum",
                            "prompt_tokens",
                            "completion_ce_sum",
                            "completion_tokens",
                        )
                    ]
                )
        finally:
            self.lm.train()
        acc = b.all_reduce_sum(acc)
        return {
            "kind": "eval",
            "step": step,
            "eval_loss": _div(_f(acc[0]), _f(acc[1])),
            "eval_prompt_loss": _div(_f(acc[2]), _f(acc[3])),
            "eval_completion_loss": _div(_f(acc[4]), _f(acc[5])),
            "eval_prompt_tokens": int(acc[3]),
            "eval_completion_tokens": int(acc[5]),
            "eval_examples": n,
        }

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> Path:
        b = self.backend
        tmp = ckpt.tmp_dir(self.rd.checkpoints, step)
        if b.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        b.barrier()
        resume = ckpt.resume_hint(self.rd.checkpoints)
        with ckpt.storage_full_is_clear(f"checkpoint {ckpt.checkpoint_name(step)}", tmp, resume):
            b.save(tmp, self.model, self.optimizer, self.scheduler, trainable_only=self.peft_model is not None)
            if b.is_main and self.peft_model is not None:  # LoRA: the adapter alone, loadable with peft
                self.peft_model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
            if b.is_main:
                atomic_write_json(
                    tmp / ckpt.STATE_FILE,
                    {
                        "step": step,
                        "total_steps": self.total_steps,
                        "counters": self.counters,
                        "epoch": step_epoch(step, self.n_train, self.global_batch),
                        "world_size": b.world,
                        "accumulation_steps": self.accumulation,
                        "distributed": b.mode,
                        "layout": self.layout(),
                        "resumed_from": self.resumed_from,
                        "run_id": self.rd.path.name,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                )
        b.barrier()
        final = self.rd.checkpoints / ckpt.checkpoint_name(step)
        if b.is_main:
            with ckpt.storage_full_is_clear(f"checkpoint {ckpt.checkpoint_name(step)}", tmp, resume):
                final = ckpt.commit(tmp, step)
            ckpt.prune(self.rd.checkpoints, self.tc.save_total_limit)
            log.info("checkpoint %s", final)
        b.barrier()
        for cb in self.callbacks:
            cb.on_checkpoint(self, step, final)
        return final

    # ------------------------------------------------------------------ the loop
    def train(self) -> Dict[str, Any]:
        """Set up, resume, train to ``total_steps``; returns the last step's metrics row."""
        from tqdm.auto import tqdm

        b, tc = self.backend, self.tc
        self.setup()
        self.resume()
        trackers = (
            Trackers(
                list(tc.report_to), self.rd.logs, self.rd.path.name, OmegaConf.to_container(self.cfg, resolve=True)
            )
            if b.is_main
            else None
        )
        if b.is_main:
            log.info(
                "training %s: %d examples (%d held out), %d steps (%d per epoch), global batch %d = "
                "%d per device x %d accumulation x %d processes (%s), normaliser %s, PLW %g",
                self.rd.path.name,
                self.n_train,
                len(self.data.eval),
                self.total_steps,
                self.steps_per_epoch,
                self.global_batch,
                tc.per_device_batch_size,
                self.accumulation,
                b.world,
                b.mode,
                tc.loss_normaliser,
                float(self.cfg.plw),
            )
        for cb in self.callbacks:
            cb.on_train_begin(self, self.step)
        self._install_signals()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not b.is_main or os.environ.get("PLW_NO_PROGRESS") == "1",
            mininterval=1.0 if os.isatty(2) else 30.0,
        )
        last_saved = self.step
        stack = contextlib.ExitStack()
        if not bar.disable:  # log lines above the progress bar, not through it
            from tqdm.contrib.logging import logging_redirect_tqdm

            stack.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger()]))
        try:
            while self.step < self.total_steps:
                if b.any(self._stop_reason is not None):
                    reason = self._stop_reason or "another rank's signal"
                    path = (
                        self.save_checkpoint(self.step)
                        if self.step > last_saved
                        else ckpt.latest_checkpoint(self.rd.checkpoints)
                    )
                    raise Preempted(self.step, reason, str(path) if path else None)
                step = self.step + 1
                row = self.train_step(step)
                self.step = step
                self.last_row = row
                if b.is_main:
                    append_jsonl(self.rd.metrics, row)
                    bar.update(1)
                    loss = "skipped" if row["loss"] is None else f"{row['loss']:.4f}"
                    bar.set_postfix(loss=loss, lr=f"{row['lr']:.2e}")
                    if step % int(tc.logging_steps) == 0 or step == self.total_steps:
                        log.info(format_row(row))
                        if trackers:
                            trackers.log(row, step)
                stop = False
                for cb in self.callbacks:
                    stop = bool(cb.on_step_end(self, step, row)) or stop
                if stop:
                    self.request_stop("callback")
                if tc.eval_steps and step % int(tc.eval_steps) == 0 and step < self.total_steps:
                    self._log_eval(self.evaluate(step), trackers)
                if step % int(tc.save_steps) == 0 and step < self.total_steps:
                    self.save_checkpoint(step)
                    last_saved = step
            self._log_eval(self.evaluate(self.step), trackers)
        finally:
            stack.close()
            bar.close()
            self._restore_signals()
            if trackers:
                trackers.close()
        return self.last_row or {}

    def finalize(self, data_summary: Mapping[str, Any], variant: str = "none") -> Dict[str, Any]:
        """Final model and summary (see :func:`_finalize`); every rank calls it."""
        return _finalize(self, data_summary, variant)

    def _log_eval(self, row: Optional[Dict[str, Any]], trackers: Optional[Trackers]) -> None:
        if row is None:
            return
        self.last_eval = row
        if self.backend.is_main:
            append_jsonl(self.rd.metrics, row)
            log.info(format_row(row))
            if trackers:
                trackers.log(row, row["step"])


# ------------------------------------------------------------------------------------------------
# the end: final model, weight distance, summary
# ------------------------------------------------------------------------------------------------
def _finalize(self: Trainer, data_summary: Mapping[str, Any], variant: str = "none") -> Dict[str, Any]:
    """Every rank calls it (the full state dict is gathered collectively); rank 0 writes
    ``<run>/final/`` (atomically: a temporary folder renamed) and ``<run>/train_summary.json``."""

    b = self.backend
    adapter_tmp = self.rd.path / ".adapter.tmp"
    peft_info = None
    if self.peft_model is not None:  # replicated (single process or DDP): rank 0 merges its copy
        peft_info = {**OmegaConf.to_container(OmegaConf.structured(self.tc.peft)), **lora.summary(self.peft_model)}
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        sd = (
            lora.finish(self.peft_model, adapter_tmp, self.tc.peft, self.cfg.model, self.cfg.paths) if b.is_main else {}
        )
    else:
        sd = b.full_state_dict(self.model)
    summary: Dict[str, Any] = {}
    if b.is_main:
        save_dtype = torch_dtype(self.cfg.model, self.tc.save_dtype)
        # distance to the pre-trained model, from the fp32 training weights
        ref = load_model(self.cfg.model, self.cfg.paths, dtype=torch.float32)
        distance = weight_distance(sd.get, reference_parameters(ref))
        del ref
        for k, v in getattr(self, "_orig_config", {}).items():
            setattr(self.lm.config, k, v)
        resume = ckpt.resume_hint(self.rd.checkpoints)
        with ckpt.storage_full_is_clear("the final model", staging(self.rd.final), resume):
            if self.peft_model is not None and not self.tc.peft.merge:  # final/ = the adapter (+ tokenizer)
                final = lora.save_adapter_final(adapter_tmp, self.tokenizer, self.rd.final)
            else:
                extras = {"adapter": adapter_tmp} if self.peft_model is not None else {}
                final = save_final(self.lm, self.tokenizer, sd, self.rd.final, save_dtype, extras)
        rows = [r for r in read_jsonl(self.rd.metrics) if r.get("kind") == "train"]
        # the last step that trained (a skipped step has no loss)
        last = next((r for r in reversed(rows) if r.get("loss") is not None), {})
        tail = [r["loss"] for r in rows[-10:] if r.get("loss") is not None]
        summary = {
            "run_id": self.rd.path.name,
            "variant": variant,
            "model": str(self.cfg.model.name),
            "dataset": str(self.cfg.dataset.name),
            "plw": float(self.cfg.plw),
            "completion_weight": float(self.cfg.completion_weight),
            "seed": self.seed,
            "steps": self.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": step_epoch(self.step, self.n_train, self.global_batch),
            "final_loss": last.get("loss"),
            "final_prompt_loss": last.get("prompt_loss"),
            "final_completion_loss": last.get("completion_loss"),
            "final_penalty": last.get("penalty"),
            "final_grad_norm": last.get("grad_norm"),
            "mean_loss_last_10": sum(tail) / len(tail) if tail else None,
            "tokens": self.counters["tokens"],
            "examples_seen": self.counters["examples"],
            "skipped_steps": self.counters["skipped_steps"],
            "train_time_s": self.counters["elapsed_s"],
            "eval": self.last_eval,
            "weight_distance": distance,
            "data": dict(data_summary),
            "batch": {
                "global_batch_size": self.global_batch,
                "per_device_batch_size": self.tc.per_device_batch_size,
                "accumulation_steps": self.accumulation,
                "world_size": b.world,
                "distributed": b.mode,
                "mixed_precision": str(b.mixed_precision(self.tc)) if b.device.type == "cuda" else "no",
                "device": str(b.device.type),
                "launcher_settings": dict(b.settings),
            },
            "optimizer": {
                "name": self.tc.optimizer,
                "lr": self.tc.learning_rate,
                "scheduler": self.tc.lr_scheduler,
                "warmup_steps": self.warmup_steps,
                "weight_decay": self.tc.weight_decay,
                "max_grad_norm": self.tc.max_grad_norm,
            },
            "loss_normaliser": self.tc.loss_normaliser,
            "peft": peft_info,
            "regularizers": {
                "weight_decay": self.tc.weight_decay,
                "minkowski_coef": self.tc.minkowski_coef,
                "minkowski_reduction": self.tc.minkowski_reduction,
                "attention_dropout": self.tc.attention_dropout,
                "label_smoothing": self.tc.label_smoothing,
            },
            "resumed_from": self.resumed_from,
            "final_dir": str(final),
            "save_dtype": str(save_dtype).replace("torch.", ""),
            "pad_token": {"token": self.tokenizer.pad_token, "id": self.tokenizer.pad_token_id},
            "versions": _versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(self.rd.path / SUMMARY_FILE, summary)
    b.barrier()
    return summary


def save_final(
    lm: torch.nn.Module,
    tokenizer,
    state_dict: Mapping[str, torch.Tensor],
    folder: Path,
    dtype: torch.dtype,
    extras: Optional[Mapping[str, Path]] = None,
) -> Path:
    """``save_pretrained`` (safetensors) + tokenizer into ``folder`` via a temporary folder and rename;
    ``extras`` (name -> folder) are moved in before the rename (e.g. a LoRA run's ``adapter``)."""
    folder = Path(folder)
    tmp = staging(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    sd = {k: v.to(dtype) for k, v in state_dict.items()}
    lm.config.dtype = dtype  # recorded in config.json (transformers >= 4.56 name; was torch_dtype)
    lm.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, src in (extras or {}).items():
        os.rename(src, tmp / name)
    return swap_in(tmp, folder)


def _versions() -> Dict[str, str]:
    import platform

    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pipeline": getattr(pipeline, "__version__", "?"),
    }


def layout_changes(state: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """``key: was -> now`` for each layout setting that differs between a checkpoint's state and this
    process. A checkpoint written before layouts were recorded has world size and accumulation
    only; with ``train.packing`` it packed per micro-batch (``packing_scope=micro_batch``)."""
    was = dict(state.get("layout") or {})
    if not was:
        was = {k: state[k] for k in ("world_size", "accumulation_steps") if k in state}
        if now.get("packing"):
            was.update(packing=True, packing_scope="micro_batch")
    named = {"world_size": "processes", "accumulation_steps": "accumulation steps"}
    return [f"{named.get(k, 'train.' + k)}: {was[k]} -> {now.get(k)}" for k in was if was[k] != now.get(k)]
