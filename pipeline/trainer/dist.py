"""Processes, devices and data parallelism: one small class, four modes (``train.distributed``).

========  ==================================================================================
``none``  one process (also what any mode becomes with one process)
``ddp``   ``torch.nn.parallel.DistributedDataParallel``; gradients all-reduced (mean) on the last
          micro-batch of a step (``no_sync`` before)
``fsdp``  FSDP2 (``torch.distributed.fsdp.fully_shard``): every decoder layer
          (``model.fsdp_wrap_class``) is a sharded unit, the loss wrapper the root unit (it owns the
          embeddings, final norm and LM head); full shard (parameters, gradients and optimizer states
          split over ranks, re-sharded after each forward); bf16 compute with fp32 gradient reduction
          and fp32 master weights when ``train.bf16``. Gradients are reduce-scattered (mean) after every
          micro-batch, so accumulation never holds unsharded gradients.
``deepspeed``  ``deepspeed.initialize`` with ``conf/distributed/ds_zero3.json`` (ZeRO-3); see
          :class:`pipeline.loss.WeightedLossModel` for how the LM head is gathered. Not installable/testable here.
========  ==================================================================================

The same code runs on CPU (gloo) and GPU (NCCL): the tests train with 2 gloo processes under FSDP.
Processes are started by ``torchrun`` or ``accelerate launch`` (:mod:`pipeline.train` does it);
this module reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and, when ``accelerate launch`` ran with one
of the config files in ``conf/distributed/``, its ``ACCELERATE_*``/``FSDP_*`` variables (mode, wrap
class, mixed precision, re-sharding, CPU offload, activation checkpointing, DeepSpeed config file).

Checkpoints: model and optimizer through ``torch.distributed.checkpoint`` (``get_state_dict`` gives
the same fully-qualified names in every mode, so the files are re-shardable), the LR scheduler and
per-rank RNG states with ``torch.save``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from pipeline.loss import register_for_zero3
from pipeline.models import decoder_layer_class
from pipeline.regularizers import local_tensor

log = logging.getLogger(__name__)

MODES = ("none", "ddp", "fsdp", "deepspeed")
_TRUE = ("1", "true", "yes", "on")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def accelerate_settings() -> Dict[str, Any]:
    """What ``accelerate launch --config_file conf/distributed/<x>.yaml`` put in the environment."""
    out: Dict[str, Any] = {}
    if _env_flag("ACCELERATE_USE_FSDP"):
        out["distributed"] = "fsdp"
    elif _env_flag("ACCELERATE_USE_DEEPSPEED"):
        out["distributed"] = "deepspeed"
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mp:
        out["mixed_precision"] = mp
    cls = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if cls:
        out["fsdp_wrap_class"] = cls.split(",")[0].strip()
    if "FSDP_RESHARD_AFTER_FORWARD" in os.environ:
        v = os.environ["FSDP_RESHARD_AFTER_FORWARD"].strip().lower()
        out["reshard_after_forward"] = v in _TRUE or v in ("full_shard", "1")
    if _env_flag("FSDP_OFFLOAD_PARAMS"):
        out["cpu_offload"] = True
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        out["activation_checkpointing"] = True
    ds = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds:
        out["deepspeed_config"] = ds
    return out


class Backend:
    """Rank, device and the data-parallel mode of this process."""

    def __init__(
        self,
        mode: str = "none",
        rank: int = 0,
        world: int = 1,
        local_rank: int = 0,
        device: Optional[torch.device] = None,
        settings: Optional[Dict[str, Any]] = None,
    ):
        if mode not in MODES:
            raise ValueError(f"train.distributed must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device or torch.device("cpu")
        self.settings = dict(settings or {})
        self.engine = None  # DeepSpeed engine
        self._owns_group = False

    # ------------------------------------------------------------------ set-up
    @classmethod
    def from_env(cls, train_cfg: Any) -> "Backend":
        """Initialise the process group if this process is one of several (torchrun/accelerate)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        settings = accelerate_settings() if world > 1 else {}
        mode = settings.get("distributed", str(train_cfg.distributed)) if world > 1 else "none"
        if world > 1 and mode == "none":
            mode = "ddp"  # several processes but no sharding asked for: plain data parallelism
        cuda = torch.cuda.is_available()
        if cuda:
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        b = cls(mode, rank, world, local_rank, device, settings)
        if world > 1:
            import torch.distributed as dist

            if mode == "deepspeed":
                import deepspeed

                deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
            elif not dist.is_initialized():
                dist.init_process_group(
                    "nccl" if cuda else "gloo",
                    timeout=datetime.timedelta(minutes=int(os.environ.get("PLW_DIST_TIMEOUT_MIN", "60"))),
                )
                b._owns_group = True
        return b

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t
        import torch.distributed as dist

        red = t.to(self._comm_device()).clone()
        dist.all_reduce(red, op=dist.ReduceOp.SUM)
        return red.to(t.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (stop requests)."""
        if not self.distributed:
            return bool(flag)
        return bool(self.all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)

    # ------------------------------------------------------------------ model
    def mixed_precision(self, train_cfg: Any) -> Optional[torch.dtype]:
        """bf16 compute (fp32 master weights) on GPU when ``train.bf16``; accelerate's flag wins."""
        mp = self.settings.get("mixed_precision")
        if mp is not None:
            return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
        return torch.bfloat16 if bool(train_cfg.bf16) else None

    def wrap(self, wrapper: nn.Module, model_cfg: Any, train_cfg: Any) -> nn.Module:
        """Move/shard ``wrapper`` (a :class:`~pipeline.loss.WeightedLossModel`)."""
        if self.mode == "fsdp":
            return self._wrap_fsdp(wrapper, model_cfg, train_cfg)
        if self.mode == "deepspeed":
            return wrapper  # deepspeed.initialize happens with the optimizer (init_deepspeed)
        wrapper = wrapper.to(self.device)
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(wrapper, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        return wrapper

    def _wrap_fsdp(self, wrapper: nn.Module, model_cfg: Any, train_cfg: Any) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        cls_name = self.settings.get("fsdp_wrap_class") or model_cfg.fsdp_wrap_class
        if not cls_name:
            raise ValueError(
                f"config key 'model.fsdp_wrap_class': required for train.distributed=fsdp (model '{model_cfg.name}')"
            )
        layer_cls = decoder_layer_class({"name": model_cfg.name, "fsdp_wrap_class": cls_name})
        mesh = init_device_mesh(self.device.type, (self.world,))
        mp = self.mixed_precision(train_cfg)
        kwargs: Dict[str, Any] = {"mesh": mesh}
        if mp is not None and self.device.type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp, reduce_dtype=torch.float32)
        if self.settings.get("cpu_offload"):
            kwargs["offload_policy"] = CPUOffloadPolicy()
        reshard = self.settings.get("reshard_after_forward", True)
        layers = [m for m in wrapper.modules() if isinstance(m, layer_cls)]
        if not layers:
            raise ValueError(
                f"config key 'model.fsdp_wrap_class': no module of class {cls_name} in model '{model_cfg.name}'"
            )
        for m in layers:
            fully_shard(m, reshard_after_forward=reshard, **kwargs)
        fully_shard(wrapper, **kwargs)  # fully_shard moves every (sharded) state to the mesh's device
        return wrapper

    def init_deepspeed(self, wrapper: nn.Module, optimizer, scheduler, train_cfg: Any, accumulation: int):
        """``deepspeed.initialize`` with the ZeRO-3 JSON (``"auto"`` values filled from ``train``)."""
        import json

        import deepspeed

        path = self.settings.get("deepspeed_config") or str(
            Path(__file__).resolve().parents[2] / "conf" / "distributed" / "ds_zero3.json"
        )
        ds = json.loads(Path(path).read_text())
        fill = {
            "train_micro_batch_size_per_gpu": int(train_cfg.per_device_batch_size),
            "gradient_accumulation_steps": int(accumulation),
            "train_batch_size": int(train_cfg.global_batch_size),
            "gradient_clipping": float(train_cfg.max_grad_norm) if train_cfg.max_grad_norm > 0 else 0.0,
        }
        for k, v in fill.items():
            if ds.get(k, "auto") == "auto":
                ds[k] = v
        if isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") == "auto":
            ds["bf16"]["enabled"] = bool(train_cfg.bf16)
        register_for_zero3(wrapper)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, lr_scheduler=scheduler, config=ds
        )
        self.engine = engine
        return engine, optimizer, scheduler

    # ------------------------------------------------------------------ steps
    def micro_batch_context(self, model: nn.Module, last: bool):
        """DDP: skip the gradient all-reduce on all but the step's last micro-batch."""
        if self.mode == "ddp" and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def autocast(self, train_cfg: Any):
        """Autocast for modes without a mixed-precision policy of their own (none/ddp on GPU)."""
        mp = self.mixed_precision(train_cfg)
        if mp is None or self.mode in ("fsdp", "deepspeed") or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=mp)

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is not None:
            # losses are already divided by the step's normaliser: no extra 1/accumulation scaling
            self.engine.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Global gradient norm before clipping (clips when ``max_norm`` > 0)."""
        if self.engine is not None:
            n = self.engine.get_global_grad_norm()
            return float(n) if n is not None else float("nan")
        return clip_grad_norm_fp64(
            [p.grad for p in model.parameters() if p.grad is not None],
            max_norm,
            self.all_reduce_sum if self.mode == "fsdp" else None,
        )

    # ------------------------------------------------------------------ state
    def save(self, folder: Path, model: nn.Module, optimizer, scheduler, trainable_only: bool = False) -> None:
        """Every rank calls this (collective). Writes model_optim/, scheduler.pt, rng/rank<r>.pt.

        ``trainable_only`` (LoRA): the frozen weights are left out (they are the pre-trained model,
        loaded again on resume), so a checkpoint holds the adapters and their optimizer state."""
        folder = Path(folder)
        (folder / "rng").mkdir(parents=True, exist_ok=True)
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder / "engine"), tag="state")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(ignore_frozen_params=trainable_only)
            msd, osd = get_state_dict(model, optimizer, options=opts)
            with _single_process_dcp(not self.distributed):
                dcp.save(
                    {"model": msd, "optim": osd},
                    checkpoint_id=str(folder / "model_optim"),
                    no_dist=not self.distributed,
                )
            if self.is_main:
                torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(rng_state(), folder / "rng" / f"rank{self.rank}.pt")

    def load(self, folder: Path, model: nn.Module, optimizer, scheduler, trainable_only: bool = False) -> None:
        folder = Path(folder)
        if self.engine is not None:
            self.engine.load_checkpoint(str(folder / "engine"), tag="state")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

            opts = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
            msd, osd = get_state_dict(model, optimizer, options=opts)
            state = {"model": msd, "optim": osd}
            with _single_process_dcp(not self.distributed):
                dcp.load(state, checkpoint_id=str(folder / "model_optim"), no_dist=not self.distributed)
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=opts
            )
            scheduler.load_state_dict(load_plain(folder / "scheduler.pt"))
        rng = folder / "rng" / f"rank{self.rank}.pt"
        if rng.is_file():
            set_rng_state(load_plain(rng))
        else:
            log.warning(
                "checkpoint %s has no RNG state for rank %d (resumed with another number of "
                "processes?): RNG streams restart from the seed",
                folder,
                self.rank,
            )

    def full_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The wrapped LM's full state dict on rank 0 (CPU; names relative to the LM); ``{}`` elsewhere."""
        if self.engine is not None:
            sd = self.engine._zero3_consolidated_16bit_state_dict()  # needs gather_16bit_weights_on_model_save
            sd = sd or {}
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return {}
        out = {}
        for k, v in sd.items():
            k = k[len("module.") :] if k.startswith("module.") else k
            if k.startswith("lm."):
                out[k[3:]] = v.detach().to("cpu")
        return out


@contextlib.contextmanager
def _single_process_dcp(single: bool):
    """Silence DCP's "assuming the intent is to save in a single process" (it is the intent)."""
    import warnings

    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ------------------------------------------------------------------ gradient clipping
def clip_grad_norm_fp64(grads, max_norm: float, reduce=None) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (L2, coefficient ``max_norm / (norm + 1e-6)`` capped at 1)
    with the norm accumulated in float64 over each rank's local (shard of the) gradients and summed
    over ranks by ``reduce`` when gradients are sharded. torch's float32 norm of a 7B-parameter
    gradient is only good to ~1e-4 relative and depends on how tensors are split; this one does not
    (1 process and N FSDP processes clip by the same factor). Returns the norm before clipping."""

    parts = [
        torch.linalg.vector_norm(local_tensor(g), 2, dtype=torch.float64).pow(2)
        for g in grads
        if local_tensor(g).numel()
    ]
    sq = torch.stack(parts).sum().cpu() if parts else torch.zeros((), dtype=torch.float64)
    if reduce is not None:
        sq = reduce(sq)
    total = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(total):
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for g in grads:
                local_tensor(g).mul_(coef)
    return total


# ------------------------------------------------------------------ RNG
def _numpy_globals() -> list:
    """What unpickling a numpy array needs (RNG states of checkpoints written before the numpy key
    was stored as a list)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_plain(path: Path) -> Any:
    """``torch.load`` of a checkpoint's plain-data file (scheduler state, RNG states) with
    ``weights_only=True``: tensors, numbers, strings, lists, tuples and dicts only, so a checkpoint
    cannot run code when it is resumed; numpy arrays (older RNG files) are allowed explicitly."""
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(path, weights_only=True)


def rng_state() -> Dict[str, Any]:
    """The RNG states of this process in plain data (:func:`load_plain` reads them back)."""
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, key, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, key.tolist(), int(pos), int(has_gauss), float(gauss))
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # pragma: no cover
        pass
