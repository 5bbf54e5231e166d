"""LoRA instead of full fine-tuning (``train.peft.enabled=true``; a departure from the paper, which
fine-tunes every weight: docs/study.md section 3).

- :func:`apply` injects low-rank adapters (``peft``; rank ``r``, scale ``alpha / r``, dropout) into
  ``target_modules`` of the loaded model and freezes everything else. The adapters are initialised
  from the run's seed in a forked RNG (the training RNG stream is untouched): B = 0, so the model
  starts as the pre-trained one. The trainer keeps training the *base* model object, whose target
  modules now carry the adapters, so the loss path is the same (:class:`pipeline.loss.WeightedLossModel`;
  the LM head is frozen, so the chunked loss skips its weight gradient), and checkpoints, resume
  and the RNG states work as for full fine-tuning (the frozen weights are saved too).
- Checkpoints hold the adapters and their optimizer state only (the frozen weights are the
  pre-trained model, loaded again on resume), and the adapter as peft saves it
  (``checkpoint-N/adapter/``, safetensors).
- At the end, :func:`finish` saves the adapter (``final/adapter/``: safetensors and peft's config)
  and merges it into the base weights: ``final/`` holds the merged model, so evaluation and every
  other reader work unchanged (the merged model's outputs equal base + adapter: tests/test_lora.py).
  With ``merge: false`` ``final/`` holds the adapter alone (:func:`save_adapter_final`) and
  evaluation loads the pre-trained model as training did and the adapter over it
  (:func:`load_for_eval`). The weight distance is computed on the merged weights either way.
- QLoRA (``method: qlora``): the base loaded in 4 bits (NF4, double quantization, bf16 compute;
  :func:`load_kwargs`) through bitsandbytes, prepared with peft's ``prepare_model_for_kbit_training``;
  single process, CUDA only (refused with one line elsewhere). Its merged weights are the adapter
  merged into the full-precision pre-trained model. LoRA runs single-process or with DDP (FSDP /
  DeepSpeed: refused).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from transformers import AutoTokenizer

from pipeline.atomic_dir import staging, swap_in
from pipeline.config import ConfigError, PeftConfig
from pipeline.models import load_pretrained


def check(pc: PeftConfig, distributed_mode: str, distributed: bool) -> None:
    """Refuse what this machine or set-up cannot do (one line naming the key)."""
    if pc.method == "qlora":
        if not torch.cuda.is_available():
            raise ConfigError(
                "config key 'train.peft.method': qlora loads the base model in 4 bits with bitsandbytes, "
                "which needs a CUDA GPU (none here): use method=lora"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("config key 'train.peft.method': qlora needs bitsandbytes (pip install bitsandbytes)")
        if distributed:
            raise ConfigError(
                "config key 'train.distributed': QLoRA (train.peft.method=qlora) runs in a single process "
                "here (one 4-bit base per GPU): set train.nproc=1"
            )
    if distributed and distributed_mode in ("fsdp", "deepspeed"):
        raise ConfigError(
            f"config key 'train.distributed': LoRA (train.peft) runs single-process or with ddp, "
            f"not {distributed_mode} (the adapters are small: ddp is enough)"
        )


def load_kwargs(pc: PeftConfig) -> Dict[str, Any]:
    """``from_pretrained`` arguments of the base model: QLoRA's 4-bit NF4 quantization (double
    quantization, bf16 compute) on this process's GPU; nothing for LoRA."""
    if pc.method != "qlora":
        return {}
    from transformers import BitsAndBytesConfig  # lazy: only for qlora

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": q, "device_map": {"": torch.cuda.current_device()}}


def apply(lm: torch.nn.Module, pc: PeftConfig, seed: int, gradient_checkpointing: bool = False):
    """The peft model around ``lm`` (adapters injected into ``lm`` itself; see the module docstring).
    A 4-bit base (QLoRA) is first prepared for training (peft's ``prepare_model_for_kbit_training``:
    norms in fp32, input gradients for checkpointing)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # lazy: peft only when enabled

    if pc.method == "qlora":
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=gradient_checkpointing)

    cfg = LoraConfig(
        r=int(pc.r),
        lora_alpha=float(pc.alpha),
        lora_dropout=float(pc.dropout),
        target_modules=list(pc.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = get_peft_model(lm, cfg)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise ConfigError(f"config key 'train.peft.target_modules': {list(pc.target_modules)} matched no module")
    return model


def summary(peft_model) -> Dict[str, Any]:
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return {"trainable_parameters": int(trainable), "all_parameters": int(total)}


def finish(peft_model, adapter_dir: Path, pc: PeftConfig, model_cfg: Any, paths_cfg: Any) -> Dict[str, torch.Tensor]:
    """Save the adapter into ``adapter_dir`` (safetensors) and return the merged model's state dict
    (fp32, CPU, the plain model's parameter names). LoRA merges in place; QLoRA merges the adapter
    into the full-precision pre-trained model (:func:`load_for_eval`), not into its 4-bit copy, so
    the merged weights (and the weight distance) hold the adapter's change alone."""
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    if pc.method == "qlora":
        merged, _ = load_for_eval(adapter_dir, model_cfg, paths_cfg, torch.float32)
    else:
        merged = peft_model.merge_and_unload()
    return {k: v.detach().to("cpu") for k, v in merged.state_dict().items()}


def save_adapter_final(adapter_dir: Path, tokenizer, folder: Path) -> Path:
    """``folder`` = the adapter saved by :func:`finish` and the tokenizer, through a temporary
    folder and a rename (an earlier ``folder`` is replaced)."""
    folder = Path(folder)
    tmp = staging(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    os.rename(adapter_dir, tmp)
    tokenizer.save_pretrained(str(tmp))
    return swap_in(tmp, folder)


def is_adapter_folder(folder: Path) -> bool:
    """A saved adapter without a model of its own (a LoRA run's ``final/`` with ``merge: false``)."""
    folder = Path(folder)
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def load_for_eval(folder: Path, model_cfg: Any, paths_cfg: Any, dtype: Optional[torch.dtype] = None):
    """``(model, tokenizer)``: the pre-trained model exactly as training loaded it (pad token
    included), the adapter in ``folder`` over it, merged (the same weights as a merged ``final/``)."""
    from peft import PeftModel  # lazy: peft only for LoRA runs

    base, _ = load_pretrained(model_cfg, paths_cfg, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))
