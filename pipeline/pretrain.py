"""Pre-train a tiny language model offline: the demo's "pre-trained models" (issue #7).

The paper fine-tunes pre-trained LLaMA models; on a CPU without the hub the pipeline makes its own,
tiny ones, in a first, cached step. A model config with ``source: scratch`` and a ``pretrain`` block
(conf/model/tinylm_a.yaml) is built by :func:`pipeline.models.pretrained_dir` as:

1. its tokenizer (``pretrain.vocab_size > 0``): a byte-level BPE trained on the corpus
   (:func:`train_bpe`; deterministic, cached by content under ``PLW_CACHE_DIR/tokenizers``; see
   :func:`pipeline.tokenizer.load_tokenizer` with a ``trained_bpe:`` spec). It behaves like LLaMA's:
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

Command line (``make pretrain``; ``make demo`` runs it first)::

    python -m pipeline.pretrain experiment=demo       # every pre-trained model of a grid
    python -m pipeline.pretrain model=tinylm_a        # one model

prints each model's folder, time and held-out loss (before -> after pre-training); a model whose
folder exists is reused in well under a second.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 (as in LLaMA's tokenizer)
BPE_VERSION = 2  # bump when train_bpe changes (new tokenizer cache key and new pre-trained folders)


class CorpusError(ValueError):
    """A corpus file cannot be read; the message names the file, line and field."""


# --------------------------------------------------------------------------------------------
# corpus and tokenizer (pure given the files)
# --------------------------------------------------------------------------------------------
def corpus_texts(files: Sequence[str], text_fields: Sequence[str]) -> List[str]:
    """One text per record: its ``text_fields`` (strings; missing or empty ones left out) joined by
    newlines. JSONL (one object per line) or a JSON list of objects; files in the given order."""
    texts: List[str] = []
    for f in files:
        path = Path(str(f)).expanduser()
        if not path.is_file():
            raise CorpusError(f"pretrain corpus file {path} does not exist (model.pretrain.corpus)")
        raw = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                records = json.loads(raw)
            except ValueError as e:
                raise CorpusError(f"{path}: not valid JSON: {e}") from None
            if not isinstance(records, list):
                raise CorpusError(f"{path}: expected a JSON list of records")
            numbered = list(enumerate(records, 1))
            where = "record"
        else:
            numbered = []
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    numbered.append((i, json.loads(line)))
                except ValueError as e:
                    raise CorpusError(f"{path}: line {i}: not valid JSON: {e}") from None
            where = "line"
        for i, rec in numbered:
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}: {where} {i}: expected a JSON object")
            parts = []
            for k in text_fields:
                v = rec.get(k)
                if v is None:
                    continue
                if not isinstance(v, str):
                    raise CorpusError(f"{path}: {where} {i}: field '{k}' must be a string, got {type(v).__name__}")
                if v.strip():
                    parts.append(v)
            if parts:
                texts.append("\n".join(parts))
    if not texts:
        raise CorpusError(f"pretrain corpus {list(files)}: no text in fields {list(text_fields)}")
    return texts


def train_bpe(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``texts`` (deterministic), as a
    ``PreTrainedTokenizerFast`` that prepends ``<s>`` (id 1), has EOS ``</s>`` (id 2) and no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size}: must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])


def pack_blocks(token_lists: Iterable[Sequence[int]], eos_id: int, seq_len: int) -> List[List[int]]:
    """Documents (without BOS) each followed by ``eos_id``, concatenated and cut into blocks of
    ``seq_len`` tokens; the incomplete tail is dropped."""
    stream: List[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(int(eos_id))
    n = len(stream) // int(seq_len)
    return [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]


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
            x = blocks[i:i + batch_size]
            out = model(input_ids=x, labels=x)
            total += float(out.loss) * x.shape[0]
            n += x.shape[0]
    return total / n


def pretrain(model, tokenizer, texts: Sequence[str], spec: Any, desc: str = "pretrain") -> Dict[str, Any]:
    """Pre-train ``model`` in place on ``texts`` (see the module docstring); returns the log
    (losses per step, held-out loss before/after, tokens seen, seconds). Deterministic for a given
    spec, corpus and initial weights on one machine; touches no global RNG."""
    import torch
    from tqdm import tqdm

    get = (lambda k, d=None: spec.get(k, d)) if isinstance(spec, dict) else (lambda k, d=None: getattr(spec, k, d))
    steps, bs, seq_len = int(get("steps")), int(get("batch_size")), int(get("seq_len"))
    peak, warmup = float(get("learning_rate")), int(get("warmup_steps", 0))
    held_out_frac = float(get("held_out_fraction", 0.02))
    gen = torch.Generator().manual_seed(int(get("seed", 0)))
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(pack_blocks(ids, tokenizer.eos_token_id, seq_len), dtype=torch.long)
    if blocks.shape[0] < 2:
        raise ValueError(f"pretrain corpus gives {blocks.shape[0]} blocks of {seq_len} tokens: too little text")
    order = torch.randperm(blocks.shape[0], generator=gen)
    n_held = max(1, int(round(held_out_frac * blocks.shape[0])))
    held, train = blocks[order[:n_held]], blocks[order[n_held:]]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=float(get("weight_decay", 0.0)))
    t0 = time.monotonic()
    log_rec: Dict[str, Any] = {"blocks": int(blocks.shape[0]), "held_out_blocks": n_held, "seq_len": seq_len,
                               "corpus_tokens": int(sum(len(x) + 1 for x in ids)), "steps": steps,
                               "batch_size": bs, "losses": []}
    model.eval()
    log_rec["held_out_loss_before"] = _mean_loss(model, held, bs)
    model.train()
    perm = torch.randperm(train.shape[0], generator=gen)
    pos = 0
    bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    for step in bar:
        if pos + bs > perm.numel():  # next epoch: a new order
            perm, pos = torch.randperm(train.shape[0], generator=gen), 0
        x = train[perm[pos:pos + bs]]
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


# --------------------------------------------------------------------------------------------
# command line: build the cached checkpoints of a grid's models
# --------------------------------------------------------------------------------------------
def _model_configs(overrides: Sequence[str]):
    """(model configs, paths config): the experiment's models if ``experiment=`` is given, else
    ``cfg.model``."""
    from pipeline.config import load_config

    cfg = load_config(list(overrides))
    names = [str(m) for m in (cfg.experiment.models if any(o.startswith("experiment=") for o in overrides)
                              and cfg.experiment.get("models") else [cfg.model.name])]
    rest = [o for o in overrides if not o.startswith(("experiment", "model="))]
    out = []
    for name in dict.fromkeys(names):
        out.append(load_config([f"model={name}", *rest]).model)
    return out, cfg.paths


def _build(model: Dict[str, Any], paths: Dict[str, Any], threads: int) -> str:
    """Child-process entry: build one model's cached checkpoint with ``threads`` torch threads."""
    import torch

    from pipeline.models import pretrained_dir

    torch.set_num_threads(max(1, threads))
    folder = pretrained_dir(model, paths)
    return "" if folder is None else str(folder)


def _report(name: str, folder: Optional[str], seconds: float) -> str:
    if not folder:
        return f"[hub] {name}: loaded from the Hugging Face cache (nothing to build)"
    info = ""
    plog = Path(folder) / "pretrain_log.json"
    if plog.is_file():
        d = json.loads(plog.read_text())
        info = (f"; held-out loss {d['held_out_loss_before']:.3f} -> {d['held_out_loss_after']:.3f} "
                f"after {d['steps']} steps ({d['tokens_seen']:,} tokens, {d['seconds']:.0f} s)")
    return f"[ready] {name}: {folder} ({seconds:.1f} s){info}"


def main(argv: Optional[List[str]] = None) -> int:
    """Build every model's checkpoint; several models are built at once, one process per model (up
    to the number of CPUs, torch threads shared out), since each pre-training is single-machine work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import functools
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor
    from contextlib import ExitStack

    from omegaconf import OmegaConf

    try:
        models, paths = _model_configs(argv)
    except Exception as e:  # noqa: BLE001 - a bad override: name it
        print(f"pipeline.pretrain: bad configuration: {e}", file=sys.stderr)
        return 2
    plain = [OmegaConf.to_container(m, resolve=True) for m in models]
    paths_plain = OmegaConf.to_container(paths, resolve=True)
    cpus = os.cpu_count() or 1
    workers = max(1, min(len(plain), cpus))
    threads = max(1, cpus // workers)
    t0 = time.monotonic()
    rc = 0
    with ExitStack() as stack:
        if workers > 1:
            ex = stack.enter_context(ProcessPoolExecutor(max_workers=workers,
                                                         mp_context=multiprocessing.get_context("spawn")))
            jobs = [(m["name"], ex.submit(_build, m, paths_plain, threads).result) for m in plain]
        else:
            jobs = [(m["name"], functools.partial(_build, m, paths_plain, threads)) for m in plain]
        for name, folder in jobs:
            try:
                print(_report(name, folder(), time.monotonic() - t0), flush=True)
            except Exception as e:  # noqa: BLE001 - reported per model
                print(f"[failed] {name}: {e}", flush=True)
                rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
