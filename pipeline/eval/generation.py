"""Batched generation with a Hugging Face causal LM (AlpacaEval, PandaLM, memorization, HF judges).

Generation left-pads a batch of prompts (the model's tokenizer adds BOS as it did in
training: Alpaca tokenizes ``source + target`` with the tokenizer's defaults), decodes greedily
by default and returns the text of the new tokens (special tokens skipped, stripped) and the number
of new tokens before EOS. Prompts are sorted by length so batches pad little; results come back
in the input order. Progress is shown with tqdm.

:func:`check_checkpoint` says whether a folder holds a saved model (:class:`ModelMissing` naming
what is missing); :func:`load_for_eval` loads one with its tokenizer (the stage itself loads through
lm-eval's HFLM, :func:`pipeline.eval.harness.make_lm`, and generates with its model).

:func:`fast_causal_masks` (a context manager; :func:`generate` and the stage's model phase use it)
builds transformers' SDPA attention mask -- the causal mask AND the padding mask -- with two
broadcast comparisons instead of transformers' ``torch.vmap`` over a Python mask function, which
costs ~2.5 ms per forward call on CPU, i.e. per decoded token of a left-padded batch. The boolean
mask is the same tensor (tests/test_eval_generation.py compares them), so outputs are identical;
any other mask pattern (sliding window, chunked, packed sequences, non-boolean masks) goes to
transformers' own function.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import torch

from pipeline.models import check_attn_implementation

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    """``float32`` / ``bfloat16`` / ``float16`` as a torch dtype (None: None)."""
    return _DTYPES[name] if name else None


class ModelMissing(RuntimeError):
    """The checkpoint to evaluate does not exist or cannot be loaded."""


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_checkpoint(folder: Path) -> Path:
    """``folder`` if it holds a saved model (config.json and weights), else :class:`ModelMissing`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelMissing(f"checkpoint folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ModelMissing(f"checkpoint folder {folder} has no config.json (not a saved model)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelMissing(f"checkpoint folder {folder} holds no weights (*.safetensors / *.bin)")
    return folder


def load_for_eval(
    folder: Path, dtype: Optional[str] = None, device: str = "auto", attn_implementation: Optional[str] = None
):
    """``(model, tokenizer)`` from a saved Hugging Face folder, in eval mode on ``device``
    (``attn_implementation``: ``model.attn_implementation``, checked by ``models.check_attn_implementation``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = check_checkpoint(folder)
    dt = _DTYPES[dtype] if dtype else "auto"
    attn = check_attn_implementation(attn_implementation)  # a config error stays one
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dt, **attn)
    except (OSError, ValueError) as e:
        raise ModelMissing(f"cannot load the checkpoint in {folder}: {e}") from e
    model.to(resolve_device(device))
    return model.eval(), tok


def load_judge(
    model_id: str, revision: Optional[str], dtype: str = "bfloat16", device: str = "auto", slow_fallback=False
):
    """``(model, tokenizer)`` of a judge (a hub id or local folder) in eval mode: ``dtype``, spread over
    the GPUs (``device_map=auto``) on CUDA, else on ``device``. ``slow_fallback``: the slow tokenizer
    when the fast one cannot be built (PandaLM's LLaMA tokenizer). An ``OSError`` (not downloaded, no
    such folder) is the caller's to name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_id.startswith(("/", "./", "../", "~")):  # a folder, not a hub id (that would fail less clearly)
        if not Path(model_id).expanduser().is_dir():
            raise OSError(f"no such folder {model_id}")
        model_id = str(Path(model_id).expanduser())
    dev = resolve_device(device)
    kw: Dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if dev.startswith("cuda"):
        kw["device_map"] = "auto"
    try:
        tok = AutoTokenizer.from_pretrained(model_id, revision=revision)
    except Exception:
        if not slow_fallback:
            raise
        tok = AutoTokenizer.from_pretrained(model_id, revision=revision, use_fast=False)
    model = AutoModelForCausalLM.from_pretrained(model_id, revision=revision, **kw)
    if "device_map" not in kw:
        model.to(dev)
    return model.eval(), tok


def release() -> None:
    """Collect garbage and free cached accelerator memory (after ``del`` of the last references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def causal_padding_mask(
    batch_size: int,
    cache_position: torch.Tensor,
    kv_length: int,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    local_size: Optional[int] = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
):
    """transformers' ``sdpa_mask`` (4.57, torch >= 2.6) for the plain causal mask with a boolean 2D
    padding mask, computed by broadcasting: ``mask[b, 0, i, j] = (j + kv_offset <= cache_position[i])
    and padding[b, j + kv_offset]``. ``None`` when SDPA's ``is_causal`` can be used instead (the same
    rule as transformers'). Other cases are delegated to transformers' function."""
    from transformers import masking_utils as mu

    original = mu.AttentionMaskInterface._global_mapping["sdpa"]
    if (
        mask_function is not mu.causal_mask_function
        or not mu._is_torch_greater_or_equal_than_2_6
        or (attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.ndim != 2))
    ):
        return original(
            batch_size=batch_size,
            cache_position=cache_position,
            kv_length=kv_length,
            kv_offset=kv_offset,
            mask_function=mask_function if mask_function is not None else mu.causal_mask_function,
            attention_mask=attention_mask,
            local_size=local_size,
            allow_is_causal_skip=allow_is_causal_skip,
            **kwargs,
        )
    q_length = cache_position.shape[0]
    padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset, _slice=False)
    if allow_is_causal_skip and mu._ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, kv_offset, local_size):
        return None
    kv_arange = torch.arange(kv_length, device=cache_position.device)
    kv_arange += kv_offset
    mask = (kv_arange[None, :] <= cache_position[:, None])[None, None].expand(batch_size, 1, q_length, kv_length)
    if padding_mask is not None:
        return mask & padding_mask[:, kv_arange][:, None, None, :]
    return mask.contiguous()


@contextmanager
def fast_causal_masks() -> Iterator[None]:
    """Within the block, models with SDPA attention build their causal/padding mask with
    :func:`causal_padding_mask` (same mask, no ``vmap``); restored on exit (re-entrant)."""
    try:
        from transformers import masking_utils as mu
    except ImportError:  # pragma: no cover
        yield
        return
    if not hasattr(mu, "ALL_MASK_ATTENTION_FUNCTIONS") or "sdpa" not in mu.AttentionMaskInterface._global_mapping:
        yield  # another transformers layout: leave it alone
        return
    local = mu.ALL_MASK_ATTENTION_FUNCTIONS._local_mapping
    had, before = "sdpa" in local, local.get("sdpa")
    local["sdpa"] = causal_padding_mask
    try:
        yield
    finally:
        if had:
            local["sdpa"] = before
        else:
            local.pop("sdpa", None)


def pad_id(tokenizer) -> int:
    """The id generation pads with (on the left): the pad token, else EOS, else UNK, else 0."""
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if v is not None:
            return int(v)
    return 0


@dataclass
class Generation:
    text: str
    n_tokens: int  # new tokens before (not counting) EOS / pad
    finished: bool  # stopped at EOS (False: hit max_new_tokens)


def _eos_ids(model, tokenizer) -> List[int]:
    ids = set()
    for v in (
        getattr(model.generation_config, "eos_token_id", None),
        model.config.eos_token_id,
        tokenizer.eos_token_id,
    ):
        if v is None:
            continue
        ids.update(v if isinstance(v, (list, tuple)) else [v])
    return sorted(ids)


def is_vllm(model) -> bool:
    """A vllm ``LLM`` engine (``eval.backend=vllm``) rather than a transformers model."""
    return type(model).__module__.split(".")[0] == "vllm"


def _vllm_eos_ids(llm, tokenizer) -> List[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    hf = getattr(getattr(getattr(llm, "llm_engine", None), "model_config", None), "hf_config", None)
    v = getattr(hf, "eos_token_id", None)
    if v is not None:
        ids.update(v if isinstance(v, (list, tuple)) else [v])
    return sorted(ids)


def _context(model) -> Optional[int]:
    if is_vllm(model):
        mc = getattr(getattr(model, "llm_engine", None), "model_config", None)
        return getattr(mc, "max_model_len", None)
    return getattr(model.config, "max_position_embeddings", None)


def _finish(toks: Sequence[int], eos: Sequence[int], tok) -> Generation:
    """New tokens up to (not counting) the first EOS, decoded as the HF path decodes them."""
    n, finished = len(toks), False
    for j, t in enumerate(toks):
        if t in eos:
            n, finished = j, True
            break
    return Generation(text=tok.decode(list(toks[:n]), skip_special_tokens=True).strip(), n_tokens=n, finished=finished)


def _generate_vllm(llm, tok, encoded: List[List[int]], eos: List[int], max_new_tokens: int, show_progress: bool):
    """Greedy generation through a vllm engine from the same token ids (temperature 0, one
    sequence, stop at the same EOS ids, ``max_new_tokens``): the HF path's settings."""
    from vllm import SamplingParams  # lazy: only with eval.backend=vllm (CUDA machines)

    params = SamplingParams(temperature=0.0, n=1, max_tokens=int(max_new_tokens), stop_token_ids=eos, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=show_progress)
    return [_finish(list(o.outputs[0].token_ids), eos, tok) for o in outs]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    gen_kwargs: Optional[Mapping[str, Any]] = None,
    desc: str = "generating",
    max_prompt_tokens: Optional[int] = None,
    show_progress: bool = True,
    add_special_tokens: bool = True,
) -> List[Generation]:
    """Greedy (unless ``gen_kwargs`` says otherwise) batched generation; results in input order.

    ``add_special_tokens=False`` for prompts that already hold them (rendered by a chat template).

    ``max_prompt_tokens`` left-truncates prompts (keeping the end, next to the answer) so that
    prompt + ``max_new_tokens`` fits the model's context; by default the model's
    ``max_position_embeddings`` minus ``max_new_tokens``.

    ``model`` may be a vllm engine (``eval.backend=vllm``): the same prompt ids, greedy, the same
    stop ids and decoding (``gen_kwargs`` other than greedy are not supported there).
    """
    from tqdm.auto import tqdm

    if not prompts:
        return []
    tok = tokenizer
    limit = max_prompt_tokens
    if limit is None:
        ctx = _context(model)
        limit = max(1, ctx - max_new_tokens) if ctx else None
    encoded = [tok(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    truncated = 0
    if limit is not None:
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                keep_bos = ids[:1] if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else []
                encoded[i] = keep_bos + ids[len(ids) - (limit - len(keep_bos)) :]
                truncated += 1
    if truncated:
        log.warning("%s: %d prompt(s) longer than %d tokens were left-truncated", desc, truncated, limit)
    if is_vllm(model):
        if gen_kwargs and gen_kwargs.get("do_sample"):
            raise ValueError(f"{desc}: sampling is not supported with eval.backend=vllm here (greedy only)")
        return _generate_vllm(model, tok, encoded, _vllm_eos_ids(model, tok), max_new_tokens, show_progress)
    device = next(model.parameters()).device
    eos = _eos_ids(model, tok)
    kwargs: Dict[str, Any] = {
        "do_sample": False,
        "num_beams": 1,
        "max_new_tokens": int(max_new_tokens),
        "pad_token_id": pad_id(tok),
        "eos_token_id": eos or None,
    }
    kwargs.update(dict(gen_kwargs or {}))
    if not kwargs.get("do_sample"):
        for k in ("temperature", "top_p", "top_k"):
            kwargs.pop(k, None)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: List[Optional[Generation]] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not show_progress, leave=False)
    pad = pad_id(tok)
    with fast_causal_masks():  # the same masks, built without vmap (see the module docstring)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attn = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids = encoded[i]
                input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attn[r, width - len(ids) :] = 1
            seqs = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs)
            new = seqs[:, width:].tolist()
            for r, i in enumerate(idx):
                out[i] = _finish(new[r], eos, tok)
            bar.update(len(idx))
    bar.close()
    return [g for g in out if g is not None]
