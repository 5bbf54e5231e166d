"""Pre-train a tiny language model offline: the demo's "pre-trained models".

The paper fine-tunes pre-trained LLaMA models; on a CPU without the hub the pipeline makes its own,
tiny ones, in a first, cached step. A model config with ``source: scratch`` and a ``pretrain`` block
(conf/model/tinylm_a.yaml) is built by :func:`pipeline.models.pretrained_dir` as:

1. its tokenizer (``pretrain.vocab_size > 0``): a byte-level BPE trained on the corpus
   (:func:`pipeline.tokenizer.train_bpe`; deterministic, cached by content under
   ``PLW_CACHE_DIR/tokenizers``; see :func:`pipeline.tokenizer.load_tokenizer` with a ``trained_bpe:``
   spec). It behaves like LLaMA's:
   ``<s>`` prepended, ``</s>`` = EOS, no pad (training adds ``[PAD]`` as Alpaca does);
2. a LLaMA-architecture model initialised from ``model.init_seed`` (as ``source: scratch``);
3. :func:`pretrain`: ``pretrain.steps`` AdamW steps of next-token prediction on the corpus, every
   document followed by EOS, concatenated and cut into ``seq_len`` blocks (:func:`pack_blocks`),
   blocks shuffled by ``pretrain.seed``; linear warm-up then cosine decay to 10%;
4. saved under ``paths.data_dir/models/pretrained-<hash>/`` (safetensors, tokenizer, definition,
   ``pretrain_log.json`` with the loss curve and the held-out loss before/after) and reused by every
   later load; the hash covers the architecture, init seed, tokenizer fingerprint, the pretrain block
   and the corpus files' sha256.

The corpus is plain text from instruction files (JSONL/JSON records; the text of a record is its
``pretrain.text_fields`` joined by newlines, no template), by default the shared Dolly-HH and
Stanford Alpaca seed-task files, which are disjoint from the demo's fine-tuning data.

This package is the pre-training itself; the corpus reader and the BPE trainer live with the
tokenizer (:mod:`pipeline.tokenizer`), the command line in :mod:`pipeline.pretrain.cli`.

Command line (``make pretrain``; ``make demo`` runs it first)::

    python -m pipeline.pretrain experiment=demo       # every pre-trained model of a grid
    python -m pipeline.pretrain model=tinylm_a        # one model

prints each model's folder, time and held-out loss (before -> after pre-training); a model whose
folder exists is reused in well under a second.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Dict, Iterable, List, Sequence

from pipeline.config import PretrainConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# blocks and schedule
# --------------------------------------------------------------------------------------------
def pack_blocks(token_lists: Iterable[Sequence[int]], eos_id: int, seq_len: int) -> List[List[int]]:
    """Documents (without BOS) each followed by ``eos_id``, concatenated and cut into blocks of
    ``seq_len`` tokens; the incomplete tail is dropped."""
    stream: List[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(int(eos_id))
    n = len(stream) // int(seq_len)
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Learning rate before optimizer step ``step`` (0-based): linear warm-up, cosine to 10% of peak."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------
# pre-training
# --------------------------------------------------------------------------------------------
def _mean_loss(model, blocks, batch_size: int) -> float:
    import torch

    if blocks.shape[0] == 0:
        return float("nan")
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, blocks.shape[0], batch_size):
            x = blocks[i : i + batch_size]
            out = model(input_ids=x, labels=x)
            total += float(out.loss) * x.shape[0]
            n += x.shape[0]
    return total / n


def pretrain(model, tokenizer, texts: Sequence[str], spec: PretrainConfig, desc: str = "pretrain") -> Dict[str, Any]:
    """Pre-train ``model`` in place on ``texts`` as ``spec`` (``model.pretrain``) says (see the module
    docstring); returns the log (losses per step, held-out loss before/after, tokens seen, seconds).
    Deterministic for a given spec, corpus and initial weights on one machine; touches no global RNG."""
    import torch
    from tqdm import tqdm

    steps, bs, seq_len = int(spec.steps), int(spec.batch_size), int(spec.seq_len)
    peak, warmup = float(spec.learning_rate), int(spec.warmup_steps)
    held_out_frac = float(spec.held_out_fraction)
    gen = torch.Generator().manual_seed(int(spec.seed))
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(pack_blocks(ids, tokenizer.eos_token_id, seq_len), dtype=torch.long)
    if blocks.shape[0] < 2:
        raise ValueError(f"pretrain corpus gives {blocks.shape[0]} blocks of {seq_len} tokens: too little text")
    order = torch.randperm(blocks.shape[0], generator=gen)
    n_held = max(1, int(round(held_out_frac * blocks.shape[0])))
    held, train = blocks[order[:n_held]], blocks[order[n_held:]]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=float(spec.weight_decay))
    t0 = time.monotonic()
    log_rec: Dict[str, Any] = {
        "blocks": int(blocks.shape[0]),
        "held_out_blocks": n_held,
        "seq_len": seq_len,
        "corpus_tokens": int(sum(len(x) + 1 for x in ids)),
        "steps": steps,
        "batch_size": bs,
        "losses": [],
    }
    model.eval()
    log_rec["held_out_loss_before"] = _mean_loss(model, held, bs)
    model.train()
    perm = torch.randperm(train.shape[0], generator=gen)
    pos = 0
    bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    for step in bar:
        if pos + bs > perm.numel():  # next epoch: a new order
            perm, pos = torch.randperm(train.shape[0], generator=gen), 0
        x = train[perm[pos : pos + bs]]
        pos += bs
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, peak, warmup)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().item()
        log_rec["losses"].append(round(value, 5))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    bar.close()
    model.eval()
    log_rec["held_out_loss_after"] = _mean_loss(model, held, bs)
    log_rec["tokens_seen"] = steps * bs * seq_len
    log_rec["epochs"] = steps * bs / max(1, train.shape[0])
    log_rec["seconds"] = round(time.monotonic() - t0, 2)
    return log_rec
