"""Structured configuration: the schema every Hydra config in ``conf/`` is validated against.

Composition (Hydra) merges the YAML files onto these dataclasses, so an unknown key or a value of
the wrong type fails at composition with the key's full name, in one line (:func:`config_error`); a
key added with ``+key=value`` must be a field of its section's schema too (:func:`check_known_keys`;
only ``Dict``-typed fields such as ``eval.shots`` take new keys). Range and consistency checks live in
``__post_init__`` and run when :func:`validate` turns the composed config into objects; they raise
:class:`ConfigError` naming the offending key.

Every stage composes its config once at its entry point (:func:`compose_config` then :func:`validate`,
or :func:`load_config` for the composed form alone) and passes the typed sections (:class:`TrainConfig`,
:class:`ModelConfig`, ...) inward; :func:`validate` returns a typed :class:`Config` as it is. Which
fields define a run (its identity, pipeline.runs) is marked on the schema: see :data:`RUNTIME`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.loss import NORMALISERS
from pipeline.preprocess import TRUNCATION_POLICIES

PACKAGE_DIR = Path(__file__).resolve().parent
# The Hydra configs: pipeline/conf is a link to conf/ at the top of a checkout and a plain folder in
# an installed package (pyproject.toml's package data).
CONF_DIR = (PACKAGE_DIR / "conf").resolve()
# paths.root: the checkout when running from one (data/, runs/, reports/ beside the code), else the
# working directory (an installed package).
PROJECT_ROOT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else Path.cwd()

# The paper's ten PLW levels (docs/study.md section 2).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")  # model.attn_implementation
PLW_LEVELS: List[float] = [0.0, 5e-4, 2.236e-3, 1e-2, 2.463e-2, 5e-2, 1e-1, 2.463e-1, 5e-1, 1.0]


# Names of the torch dtypes weights are loaded and saved in (pipeline.models maps them to torch.dtype).
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message names the key."""


class CompositionError(ConfigError, HydraException):
    """Hydra could not compose the config (unknown key or option, wrong type): one line naming the key.

    Also a HydraException, as Hydra's own composition errors (which it replaces) are."""


# Range checks run only while `validate` builds objects from a composed config, not when the
# schema's defaults are instantiated (at ConfigStore registration, MISSING values are expected).
_VALIDATING = contextvars.ContextVar("plw_config_validating", default=False)


def _check(cond: bool, key: str, msg: str) -> None:
    if _VALIDATING.get() and not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _one_of(value: Any, allowed: Sequence[Any], key: str) -> None:
    _check(value in allowed, key, f"must be one of {list(allowed)}, got {value!r}")


def _sha256(value: Optional[str], key: str) -> None:
    if value is not None:
        _check(len(value) == 64 and all(c in "0123456789abcdef" for c in value), key, "must be 64 lowercase hex digits")


# --------------------------------------------------------------------------------------------
# run identity, marked on the schema
# --------------------------------------------------------------------------------------------
# Every field defines a run (it is part of the run's identity, hence of its hash and folder name;
# pipeline.runs.run_identity) unless its metadata says otherwise. RUNTIME fields say how a run is
# executed or observed (processes, cadence, paths, cluster resources), never what it computes, so a
# run started on one cluster resumes on another. A callable decides from the field's own section
# (a field that changes the result only in some settings).
IDENTITY = "identity"
RUNTIME: Dict[str, Any] = {IDENTITY: False}


def _batching_changes_gradient(train: Any) -> bool:
    """train.loss_normaliser=micro_batch divides each micro-batch by its own weight sum, so the step
    gradient depends on how the global batch is split (pipeline/loss.py); the other normalisers
    divide by totals over the step and do not."""
    return train.loss_normaliser == "micro_batch"


def _schema_of(section: Any) -> Optional[type]:
    schema = OmegaConf.get_type(section) if isinstance(section, DictConfig) else type(section)
    return schema if schema is not None and dataclasses.is_dataclass(schema) else None


def identity_of(section: Any) -> Dict[str, Any]:
    """The fields of a config section that define a run, as plain JSON-able values.

    ``section`` is a typed object (e.g. :class:`TrainConfig`) or the composed node of one
    (``cfg.train``); nested sections are reduced the same way. Fields whose metadata marks them
    RUNTIME are left out (see the comment above :data:`RUNTIME`).
    """
    schema = _schema_of(section)
    if schema is None:
        raise TypeError(f"identity_of needs a config section, got {type(section).__name__}")
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        rule = f.metadata.get(IDENTITY, True)
        if callable(rule):
            rule = rule(section)
        if rule:
            out[f.name] = _identity_value(getattr(section, f.name))
    return out


def _identity_value(value: Any) -> Any:
    if _schema_of(value) is not None and not isinstance(value, type):
        return identity_of(value)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: _identity_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_identity_value(v) for v in value]
    return value


def runtime_fields(schema: type) -> FrozenSet[str]:
    """The fields of ``schema`` that are never part of a run's identity."""
    return frozenset(f.name for f in dataclasses.fields(schema) if f.metadata.get(IDENTITY, True) is False)


# --------------------------------------------------------------------------------------------
# paths/
# --------------------------------------------------------------------------------------------
@dataclass
class PathsConfig:
    root: str = str(PROJECT_ROOT)
    data_dir: str = MISSING  # downloads and processed datasets
    raw_dir: str = MISSING  # verified downloads (cache)
    processed_dir: str = MISSING  # processed datasets, one folder per content hash
    runs_dir: str = MISSING  # run store (one folder per run hash)
    reports_dir: str = MISSING  # statistics tables, figures, reports
    shared_dir: str = MISSING  # optional offline data shipped beside the repo (../shared)
    llama_tokenizer: str = MISSING  # the LLaMA 1/2 tokenizer (hub id or local folder)


# --------------------------------------------------------------------------------------------
# model/
# --------------------------------------------------------------------------------------------
@dataclass
class ResourcesConfig:
    """What one training run of this model asks a cluster for (used by launcher=slurm)."""

    nodes: int = 1
    gpus_per_node: int = 4
    cpus_per_task: int = 32
    mem_gb: int = 320
    timeout_min: int = 24 * 60

    def __post_init__(self) -> None:
        for k in ("nodes", "cpus_per_task", "mem_gb", "timeout_min"):
            _check(getattr(self, k) >= 1, f"model.resources.{k}", "must be >= 1")
        _check(self.gpus_per_node >= 0, "model.resources.gpus_per_node", "must be >= 0")


@dataclass
class PretrainConfig:
    """``model.pretrain`` (source=scratch): pre-train the model offline in a first, cached step
    (pipeline/pretrain/). The demo's tiny "pre-trained models" are made this way."""

    corpus: List[str] = field(default_factory=list)  # JSONL/JSON files of records
    text_fields: List[str] = field(default_factory=lambda: ["instruction", "input", "output"])
    # > 0: the model's tokenizer is a byte-level BPE of this size trained on the corpus (model.tokenizer
    # must then be unset); 0: model.tokenizer is used
    vocab_size: int = 0
    steps: int = 0  # optimizer steps of next-token prediction (0: no pre-training, random init)
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 1.0e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    held_out_fraction: float = 0.02  # blocks kept out of pre-training to report a held-out loss
    seed: int = 0  # block order

    def __post_init__(self) -> None:
        _check(
            self.vocab_size == 0 or self.vocab_size >= 259,
            "model.pretrain.vocab_size",
            "must be 0 (use model.tokenizer) or >= 259 (256 bytes + 3 special tokens)",
        )
        _check(self.steps >= 0, "model.pretrain.steps", "must be >= 0")
        for k in ("batch_size", "seq_len"):
            _check(getattr(self, k) >= 1, f"model.pretrain.{k}", "must be >= 1")
        _check(self.learning_rate > 0, "model.pretrain.learning_rate", "must be > 0")
        _check(0 <= self.warmup_steps, "model.pretrain.warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "model.pretrain.weight_decay", "must be >= 0")
        _check(0 < self.held_out_fraction < 0.5, "model.pretrain.held_out_fraction", "must be in (0, 0.5)")
        _check(
            bool(self.corpus) or (self.vocab_size == 0 and self.steps == 0),
            "model.pretrain.corpus",
            "required when model.pretrain.vocab_size or steps is set",
        )
        _check(bool(self.text_fields), "model.pretrain.text_fields", "must not be empty")


@dataclass
class ModelConfig:
    name: str = MISSING
    # Where the weights come from: a hub id (with a pinned revision), a local folder, a GGUF file
    # inside an installed Python package, or `scratch` (random init from `architecture`).
    source: str = "hub"  # hub | local | package_gguf | scratch
    hub_id: Optional[str] = None
    revision: Optional[str] = None  # pinned commit for hub models
    # a local folder used instead of the hub (offline clusters)
    local_path: Optional[str] = field(default=None, metadata=RUNTIME)
    package: Optional[str] = None  # python package holding a GGUF file (source=package_gguf)
    gguf_file: Optional[str] = None
    gguf_sha256: Optional[str] = None  # expected checksum of the GGUF file (verified when set)
    tokenizer: Optional[str] = None  # hub id or folder; default: the model's own
    tokenizer_revision: Optional[str] = None
    architecture: Optional[Dict[str, Any]] = None  # source=scratch: LlamaConfig kwargs
    # source=scratch: seed of the (deterministic) initialisation. Part of the model's definition
    # hash, independent of the training seed (every run of a grid starts from the same weights).
    init_seed: int = 0
    # Decoder layer class for FSDP auto wrap: a bare transformers class name (as HF Trainer's
    # fsdp_transformer_layer_cls_to_wrap takes it) or a dotted path; see pipeline.models.
    fsdp_wrap_class: Optional[str] = field(default=None, metadata=RUNTIME)
    params_billion: float = field(default=0.0, metadata=RUNTIME)  # for FLOP / GPU-hour estimates
    dtype: str = "bfloat16"  # weights' dtype when loaded (float32 for the CPU models)
    # attention kernel for training and evaluation (transformers' attn_implementation): sdpa (default;
    # what transformers picks for these models anyway), eager, flash_attention_2 (CUDA and the
    # flash-attn package), flex_attention. A hardware setting: not part of a run's identity.
    attn_implementation: str = field(default="sdpa", metadata=RUNTIME)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig, metadata=RUNTIME)
    # source=scratch: pre-train offline first (tokenizer and weights; pipeline/pretrain/); null: none
    pretrain: Optional[PretrainConfig] = None

    def __post_init__(self) -> None:
        _one_of(self.source, ["hub", "local", "package_gguf", "scratch"], "model.source")
        _one_of(self.attn_implementation, list(ATTN_IMPLEMENTATIONS), "model.attn_implementation")
        trained_tok = self.pretrain is not None and self.pretrain.vocab_size > 0
        if self.pretrain is not None:
            _check(self.source == "scratch", "model.pretrain", "only for model.source=scratch")
            _check(
                not (trained_tok and self.tokenizer),
                "model.tokenizer",
                "must be null when model.pretrain.vocab_size > 0 (the tokenizer is trained on the corpus)",
            )
        if self.source == "hub":
            _check(bool(self.hub_id), "model.hub_id", "required when model.source=hub")
        if self.source == "local":
            _check(bool(self.local_path), "model.local_path", "required when model.source=local")
        if self.source == "package_gguf":
            _check(
                bool(self.package) and bool(self.gguf_file),
                "model.gguf_file",
                "model.package and model.gguf_file are required when model.source=package_gguf",
            )
        _sha256(self.gguf_sha256, "model.gguf_sha256")
        if self.source == "scratch":
            _check(bool(self.architecture), "model.architecture", "required when model.source=scratch")
            _check(
                bool(self.tokenizer) or trained_tok,
                "model.tokenizer",
                "required when model.source=scratch (or set model.pretrain.vocab_size)",
            )
        _one_of(self.dtype, DTYPES, "model.dtype")
        _check(self.params_billion >= 0, "model.params_billion", "must be >= 0")
        _check(self.init_seed >= 0, "model.init_seed", "must be >= 0")
        if self.fsdp_wrap_class is not None:
            _check(
                all(part.isidentifier() for part in self.fsdp_wrap_class.split(".")),
                "model.fsdp_wrap_class",
                f"must be a class name or a dotted path, got {self.fsdp_wrap_class!r}",
            )
        if self.revision is not None and self.source == "hub":
            _check(bool(self.revision.strip()), "model.revision", "must not be empty (null = unpinned)")


# --------------------------------------------------------------------------------------------
# dataset/
# --------------------------------------------------------------------------------------------
@dataclass
class SourceConfig:
    """Where raw instances come from and how their fields map onto the Alpaca schema."""

    kind: str = "local"  # local | url | hf
    # alpaca | dolly | ultrafeedback (field mapping onto instruction/input/output) | messages (chat:
    # a list of {role, content}, rendered by the model's chat template, pipeline/chat.py)
    format: str = "alpaca"
    path: Optional[str] = None  # kind=local: a .json (array) or .jsonl file in `format`
    url: Optional[str] = None  # kind=url: a file at a pinned address (e.g. a GitHub commit)
    repo_id: Optional[str] = None  # kind=hf: a Hugging Face dataset repository
    revision: Optional[str] = None  # kind=hf: pinned commit
    filename: Optional[str] = None  # kind=hf: file inside the repository (json, jsonl or parquet)
    sha256: Optional[str] = None  # expected checksum of the downloaded file (verified when set)

    def __post_init__(self) -> None:
        _one_of(self.kind, ["local", "url", "hf"], "dataset.source.kind")
        _one_of(self.format, ["alpaca", "dolly", "ultrafeedback", "messages"], "dataset.source.format")
        if self.kind == "local":
            _check(bool(self.path), "dataset.source.path", "required when dataset.source.kind=local")
        if self.kind == "url":
            _check(bool(self.url), "dataset.source.url", "required when dataset.source.kind=url")
        if self.kind == "hf":
            _check(
                bool(self.repo_id) and bool(self.filename),
                "dataset.source.repo_id",
                "dataset.source.repo_id and dataset.source.filename are required when kind=hf",
            )
            _check(
                bool(self.revision),
                "dataset.source.revision",
                "a pinned revision is required for hub datasets (reproducibility)",
            )
        _sha256(self.sha256, "dataset.source.sha256")


@dataclass
class TransformConfig:
    """Prompt inversion (docs/study.md section 4). kind=none keeps the source as it is.

    kind=invert with target_rg=null inverts every instance with R_g > 1 (the Short datasets);
    with a target it chooses which instances to invert so the dataset R_g reaches the target
    within `tolerance` (relative), in an order fixed by `seed` (Medium, Tiny).
    """

    kind: str = "none"  # none | invert
    target_rg: Optional[float] = None
    tolerance: float = 0.01
    seed: int = 0
    tokenizer: Optional[str] = None  # tokenizer measuring R_g; default paths.llama_tokenizer

    def __post_init__(self) -> None:
        _one_of(self.kind, ["none", "invert"], "dataset.transform.kind")
        if self.target_rg is not None:
            _check(self.kind == "invert", "dataset.transform.target_rg", "only valid with kind=invert")
            _check(
                self.target_rg > 0 and math.isfinite(self.target_rg),
                "dataset.transform.target_rg",
                "must be a positive number",
            )
        _check(0 < self.tolerance < 1, "dataset.transform.tolerance", "must be in (0, 1)")


def _is_chat(dataset: Any) -> bool:
    return dataset.source.format == "messages"


@dataclass
class DatasetConfig:
    name: str = MISSING
    description: str = field(default="", metadata=RUNTIME)
    source: SourceConfig = field(default_factory=SourceConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    # Records with an empty (or whitespace-only) output: `error` stops with the record's index,
    # `drop` removes and counts them (reported in the statistics), `keep` trains on them.
    empty_output: str = "error"
    max_records: Optional[int] = None  # keep the first N records (quick runs); null = all
    # the paper's Table 1 R_g, shown beside ours
    paper_rg: Optional[float] = field(default=None, metadata=RUNTIME)
    # Chat data (source.format=messages): which assistant turns are the completion (weight
    # completion_weight): `all` of them, or only the `last` (earlier answers are then prompt, PLW).
    # Part of a run's identity for chat data only (pipeline/chat.py).
    completion_turns: str = field(default="all", metadata={IDENTITY: _is_chat})

    def __post_init__(self) -> None:
        _one_of(self.empty_output, ["error", "drop", "keep"], "dataset.empty_output")
        _one_of(self.completion_turns, ["all", "last"], "dataset.completion_turns")
        if self.completion_turns != "all":
            _check(
                self.source.format == "messages",
                "dataset.completion_turns",
                "only for chat data (dataset.source.format=messages)",
            )
        if self.max_records is not None:
            _check(self.max_records >= 1, "dataset.max_records", "must be >= 1 or null")


# --------------------------------------------------------------------------------------------
# train/
# --------------------------------------------------------------------------------------------
@dataclass
class PeftConfig:
    """LoRA / QLoRA instead of full fine-tuning (``train.peft.enabled=true``; off: full fine-tuning,
    the paper's).

    A departure from the paper (docs/study.md section 3 fine-tunes every weight): the base weights
    are frozen and low-rank adapters (rank ``r``, scale ``alpha / r``) are trained on
    ``target_modules``; the loss and its normalisers are the same. ``method: qlora`` loads the base in
    4 bits (bitsandbytes, CUDA only). Part of a run's identity when set."""

    enabled: bool = False
    method: str = "lora"  # lora | qlora
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # final/: the merged model (true; every reader works unchanged) or the adapter alone (false:
    # evaluation loads the pre-trained model and the adapter). The same weights either way.
    merge: bool = field(default=True, metadata=RUNTIME)

    def __post_init__(self) -> None:
        _one_of(self.method, ["lora", "qlora"], "train.peft.method")
        _check(self.r >= 1, "train.peft.r", "must be >= 1")
        _check(self.alpha > 0, "train.peft.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "train.peft.dropout", "must be in [0, 1)")
        _check(len(self.target_modules) >= 1, "train.peft.target_modules", "must name at least one module")


def _peft_is_set(section: Any) -> bool:
    peft = getattr(section, "peft", None)
    return bool(peft is not None and peft.enabled)


@dataclass
class TrainConfig:
    """Training recipe (default: the Alpaca recipe, docs/study.md section 3)."""

    name: str = field(default=MISSING, metadata=RUNTIME)
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-5
    # The recipe fixes the global batch (examples per optimizer step); how it is split is runtime:
    # accumulation steps = global_batch_size / (per_device_batch_size x data-parallel processes).
    # Except with loss_normaliser=micro_batch, whose gradient depends on the split.
    global_batch_size: int = 128
    per_device_batch_size: int = field(default=4, metadata={IDENTITY: _batching_changes_gradient})
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw_torch"
    model_max_length: int = 512
    truncation: str = "keep"  # keep | drop | truncate_prompt_left  (instances losing all completion tokens)
    loss_normaliser: str = "weight_sum"  # weight_sum | token_count | micro_batch
    packing: bool = False
    # With packing: `step` packs all examples of each optimizer step into padding-free rows of
    # packing_tokens tokens, one row per micro-batch, examples kept apart by position_ids alone (no
    # dense mask; sdpa and flash varlen); `micro_batch` packs each micro-batch's examples into rows
    # with a 4-D block mask (pipeline/packing.py).
    # Like per_device_batch_size, how the step is laid out, not what it computes: not part of the identity.
    packing_scope: str = field(default="step", metadata=RUNTIME)
    # Tokens per packed row (step scope); null: per_device_batch_size x model_max_length with flash
    # attention, model_max_length with sdpa/eager (pipeline.packing.default_packing_tokens). How the
    # step is split, not what it computes (the step's loss and gradient are the unpacked ones).
    packing_tokens: Optional[int] = field(default=None, metadata=RUNTIME)
    bf16: bool = True
    tf32: bool = True
    distributed: str = field(default="fsdp", metadata=RUNTIME)  # none | ddp | fsdp | deepspeed
    gradient_checkpointing: bool = field(default=False, metadata=RUNTIME)
    # Regularizers (supplemental experiment)
    minkowski_coef: float = 0.0  # coef x mean over tensors of the p=1 distance to pre-trained weights
    attention_dropout: float = 0.0
    label_smoothing: float = 0.0
    logging_steps: int = field(default=1, metadata=RUNTIME)
    save_steps: int = field(default=500, metadata=RUNTIME)
    eval_fraction: float = 0.0  # held-out validation split
    report_to: List[str] = field(default_factory=list, metadata=RUNTIME)
    # --- trainer (pipeline/train.py, pipeline/trainer/) ---------------------------------------
    # HF Trainer defaults, which the Alpaca recipe ran with (its train.py does not change them).
    max_grad_norm: float = 1.0  # clip the step's global gradient norm; <= 0: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1.0e-8
    # Minkowski (p = 1) penalty: each tensor's distance is `sum` |theta - theta_0| (the p = 1 Minkowski
    # distance, the paper's wording) or its `mean`; the penalty is minkowski_coef x the mean over tensors.
    minkowski_reduction: str = "sum"
    # Where the pre-trained reference weights live: `device` (beside the trained weights, sharded
    # like them under FSDP) or `cpu` (offloaded; slower steps, no accelerator memory).
    minkowski_reference: str = field(default="device", metadata=RUNTIME)
    save_dtype: Optional[str] = None  # dtype of the saved final model; null = model.dtype
    # Runtime settings (metadata=RUNTIME: not part of a run's identity):
    # processes (GPUs) on this node; 0 = all visible GPUs when distributed != none, else 1
    nproc: int = field(default=0, metadata=RUNTIME)
    launcher: str = field(default="auto", metadata=RUNTIME)  # how >1 processes start: auto | torchrun | accelerate
    eval_steps: int = field(default=0, metadata=RUNTIME)  # validation every N optimizer steps (0: only at the end)
    # complete checkpoints kept in <run>/checkpoints (older ones deleted)
    save_total_limit: int = field(default=2, metadata=RUNTIME)
    # keep the step checkpoints once the run is done (final/ written)? They hold weights and optimizer
    # state (about 12 bytes per parameter: 2 x 84 GB for a 7B model, 10 TB over the paper's grid), and
    # only resuming reads them: removed by default
    keep_checkpoints: bool = field(default=False, metadata=RUNTIME)
    resume: bool = field(default=True, metadata=RUNTIME)  # resume from the latest complete checkpoint
    # tokens per chunk of the fused LM-head + loss (memory vs speed)
    loss_chunk_size: int = field(default=1024, metadata=RUNTIME)
    num_threads: Optional[int] = field(default=None, metadata=RUNTIME)  # torch CPU threads per process (null: default)
    # LoRA / QLoRA (PeftConfig): train.peft.enabled=true [train.peft.r=16 ...]. Part of the identity
    # only when enabled (runs without it keep their ids).
    peft: PeftConfig = field(default_factory=PeftConfig, metadata={IDENTITY: _peft_is_set})

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", "must be > 0")
        _check(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        for k in ("global_batch_size", "per_device_batch_size", "model_max_length", "logging_steps", "save_steps"):
            _check(getattr(self, k) >= 1, f"train.{k}", "must be >= 1")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _one_of(self.lr_scheduler, ["cosine", "linear", "constant", "constant_with_warmup"], "train.lr_scheduler")
        _one_of(self.truncation, TRUNCATION_POLICIES, "train.truncation")
        _one_of(self.loss_normaliser, NORMALISERS, "train.loss_normaliser")
        _one_of(self.packing_scope, ["step", "micro_batch"], "train.packing_scope")
        if self.packing_tokens is not None:
            _check(
                self.packing_tokens >= self.model_max_length,
                "train.packing_tokens",
                f"must be >= train.model_max_length ({self.model_max_length}) or null",
            )
        if self.packing and self.packing_scope == "step":
            _check(
                self.loss_normaliser != "micro_batch",
                "train.packing_scope",
                "step packing re-splits the step into micro-batches, so it needs a normaliser over the "
                "whole step (loss_normaliser weight_sum or token_count), or packing_scope=micro_batch",
            )
        _one_of(self.distributed, ["none", "ddp", "fsdp", "deepspeed"], "train.distributed")
        _check(self.minkowski_coef >= 0, "train.minkowski_coef", "must be >= 0")
        _check(0 <= self.attention_dropout < 1, "train.attention_dropout", "must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(0 <= self.eval_fraction < 1, "train.eval_fraction", "must be in [0, 1)")
        _check(
            self.global_batch_size % self.per_device_batch_size == 0,
            "train.global_batch_size",
            f"must be a multiple of train.per_device_batch_size ({self.per_device_batch_size})",
        )
        _check(self.max_steps == -1 or self.max_steps >= 1, "train.max_steps", "must be >= 1 or -1 (use epochs)")
        _check(
            0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
            "train.adam_beta1",
            "train.adam_beta1 and train.adam_beta2 must be in [0, 1)",
        )
        _check(self.adam_epsilon > 0, "train.adam_epsilon", "must be > 0")
        _one_of(self.optimizer, ["adamw_torch"], "train.optimizer")
        _one_of(self.minkowski_reduction, ["sum", "mean"], "train.minkowski_reduction")
        _one_of(self.minkowski_reference, ["device", "cpu"], "train.minkowski_reference")
        if self.save_dtype is not None:
            _one_of(self.save_dtype, DTYPES, "train.save_dtype")
        _check(self.nproc >= 0, "train.nproc", "must be >= 0 (0 = auto)")
        _one_of(self.launcher, ["auto", "torchrun", "accelerate"], "train.launcher")
        _check(self.eval_steps >= 0, "train.eval_steps", "must be >= 0")
        _check(self.save_total_limit >= 1, "train.save_total_limit", "must be >= 1")
        _check(self.loss_chunk_size >= 1, "train.loss_chunk_size", "must be >= 1")
        if self.num_threads is not None:
            _check(self.num_threads >= 1, "train.num_threads", "must be >= 1 or null")

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each of `world_size` data-parallel processes."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"config key 'train.global_batch_size': {self.global_batch_size} is not divisible by "
                f"train.per_device_batch_size x processes = {self.per_device_batch_size} x {world_size}"
            )
        return self.global_batch_size // per_step


# --------------------------------------------------------------------------------------------
# eval/
# --------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Evaluation stage (``python -m pipeline.eval``; see pipeline/eval/__init__.py and docs/evaluation.md).

    What is evaluated: every finished run in ``paths.runs_dir`` lacking results (default), one run
    (``run_dir``), or the pre-trained model of ``model`` (``pretrained=true``: baselines). Benchmarks
    and mechanism metrics are the names in pipeline/eval/benchmarks.py; per-benchmark shots and
    metrics override the registry's defaults (docs/study.md section 5).
    """

    name: str = MISSING
    # Offline mirror of the benchmark data (JSONL in the Hugging Face schemas; `make fetch-data`
    # writes it). null: lm-eval's built-in tasks read the hub (WMT then needs the mirror: skipped).
    data_dir: Optional[str] = None
    benchmarks: List[str] = field(default_factory=list)
    mechanisms: List[str] = field(default_factory=list)  # mech_* metrics (runs only)
    limit: Optional[int] = None  # items per benchmark (quick runs); null = all
    batch_size: int = 8
    max_new_tokens: int = 512  # AlpacaEval, PandaLM candidates and memorization (greedy)
    # --- lm-evaluation-harness
    shots: Dict[str, int] = field(default_factory=dict)  # benchmark -> num_fewshot (registry default otherwise)
    metrics: Dict[str, List[str]] = field(default_factory=dict)  # benchmark -> reported metrics
    fewshot_seed: int = 1234  # lm-eval's default few-shot sampler seed
    bootstrap_iters: int = 100000  # lm-eval stderr bootstrap (corpus metrics use min(this, 100))
    add_bos_token: Optional[bool] = None  # null: the tokenizer's default (lm-eval HFLM semantics)
    # generation settings overriding the generate_until tasks' own (e.g. max_gen_toks for CPU smoke
    # runs); empty: each task's (recorded in results.csv's evaluator column either way)
    gen_kwargs: Dict[str, Any] = field(default_factory=dict)
    # --- AlpacaEval 1
    judge: str = "mixtral_8x7b_instruct"  # evaluator config in pipeline/eval/evaluators/<judge>/
    judge_model: Optional[str] = None  # replaces the evaluator's model (hub id or local folder)
    judge_chunksize: Optional[int] = None  # annotations per alpaca_eval chunk (null: one chunk)
    alpaca_eval_reference: Optional[str] = None  # JSON/JSONL of reference outputs; null: see docs/evaluation.md
    # --- PandaLM
    pandalm_judge: str = "pandalm_7b"  # judge config in pipeline/eval/pandalm_judges/<name>.yaml
    pandalm_judge_model: Optional[str] = None  # replaces the judge's model (hub id or local folder)
    pandalm_comparator: str = "pretrained"  # pretrained | a model folder | a JSON/JSONL file of outputs
    pandalm_unparsable: str = "exclude"  # judgments without 1/2/Tie: exclude | tie (PandaLM's own parser)
    # share of unparsable judgments above which the pandalm rows' message starts with WARNING (the
    # numbers are kept); every judgment unparsable is an error row whatever this is
    pandalm_max_unparsable: float = 0.5
    pandalm_testset: Optional[str] = None  # testset-inference-v1.json; null: data_dir/pandalm/...
    # --- mechanism metrics
    memorization_prompts: int = 10000
    memorization_seed: int = 0
    rsd_window: int = 5
    rsd_windows: str = "tumbling"  # tumbling (non-overlapping) | rolling
    # --- what to evaluate, where, how
    run_dir: Optional[str] = None  # evaluate this run only
    pretrained: bool = False  # evaluate the pre-trained `model` (no run): a baseline
    output_dir: Optional[str] = None  # pretrained=true: where results go (default runs_dir/_baselines/<model>)
    force: bool = False  # recompute benchmarks that already have results
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # What generates (AlpacaEval / PandaLM candidates, memorization, lm-eval's tasks): `hf`
    # (transformers, the default and the only one on CPU) or `vllm` (CUDA and the vllm package;
    # lm-eval's vllm model; the same greedy settings). vllm_args go to vllm's LLM (e.g.
    # gpu_memory_utilization, max_model_len, tensor_parallel_size).
    backend: str = "hf"
    vllm_args: Dict[str, Any] = field(default_factory=dict)
    dtype: Optional[str] = None  # weights' dtype for evaluation; null: model.dtype
    # local `python -m pipeline.eval` over the runs: evaluate that many runs at a time in worker
    # processes (cpu_count // workers torch threads each); 1: one after the other in this process
    workers: int = 1

    def __post_init__(self) -> None:
        if self.limit is not None:
            _check(self.limit >= 1, "eval.limit", "must be >= 1 or null")
        _check(self.workers >= 1, "eval.workers", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _one_of(self.backend, ["hf", "vllm"], "eval.backend")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.memorization_prompts >= 0, "eval.memorization_prompts", "must be >= 0")
        _check(self.rsd_window >= 2, "eval.rsd_window", "must be >= 2")
        _one_of(self.rsd_windows, ["tumbling", "rolling"], "eval.rsd_windows")
        _one_of(self.pandalm_unparsable, ["exclude", "tie"], "eval.pandalm_unparsable")
        _check(0.0 <= self.pandalm_max_unparsable <= 1.0, "eval.pandalm_max_unparsable", "must be in [0, 1]")
        _check(self.bootstrap_iters >= 0, "eval.bootstrap_iters", "must be >= 0")
        if self.judge_chunksize is not None:
            _check(self.judge_chunksize >= 1, "eval.judge_chunksize", "must be >= 1 or null")
        if self.dtype is not None:
            _one_of(self.dtype, DTYPES, "eval.dtype")
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "eval.device",
            f"must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )
        # The names in benchmarks / mechanisms / shots / metrics are the eval stage's (its YAML
        # registry, pipeline/eval/benchmarks.py), checked there: the config layer does not import it.
        for b, k in self.shots.items():
            _check(k >= 0, f"eval.shots.{b}", "must be >= 0")
        for b in self.metrics:
            _check(len(self.metrics[b]) >= 1, f"eval.metrics.{b}", "must list at least one metric")


# --------------------------------------------------------------------------------------------
# launcher/
# --------------------------------------------------------------------------------------------
@dataclass
class LauncherConfig:
    """Where and how the runs of a sweep execute (``python -m pipeline.sweep``; docs/sweep.md).

    Nothing here changes a run's identity: a run started locally resumes on a cluster.
    """

    name: str = MISSING
    kind: str = "local"  # local | slurm
    # local: runs at a time (subprocesses); slurm: array tasks running at a time (%N of --array).
    max_parallel: int = 1
    # local: runs one worker process executes one after another (the start-up cost -- imports,
    # ~10 s on a small CPU -- is paid once per worker); 1 = one process per run. slurm: ignored
    # (one run per array task).
    runs_per_worker: int = 1
    # Failed attempts after which a run is no longer relaunched (attempts count in status.json;
    # a stale run -- status running, process gone -- counts as a failed attempt).
    max_retries: int = 2
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # Liveness: a running worker rewrites <run>/heartbeat.json every heartbeat_s; a run whose
    # status says running is stale when no process holds its lock (same host), SLURM says its job
    # ended (sacct), or, where neither can be checked, its heartbeat is older than stale_after_s.
    heartbeat_s: float = 30.0
    stale_after_s: float = 600.0
    # GPU-hour estimates (DRY_RUN): peak dense TFLOPs of one GPU (A100 bf16: 312) x model FLOPs
    # utilisation; FLOPs = 6 x params x trained tokens.
    gpu_peak_tflops: float = 312.0
    mfu: float = 0.35
    # evaluation GPU-hour estimate (DRY_RUN): generated tokens per second of one GPU with the HF
    # backend (greedy, batched; a 7B model in bf16 on an A100: a few hundred)
    eval_tokens_per_s: float = 250.0
    # the same with eval.backend=vllm (continuous batching; a 7B model on an A100: a few thousand)
    eval_tokens_per_s_vllm: float = 2500.0
    # slurm: submitit's folder (one subfolder per sweep invocation), requeues after a time limit,
    # seconds between the warning signal and the kill, extra sbatch keys, shell lines run first.
    submitit_dir: Optional[str] = None  # default: <paths.runs_dir>/_submitit
    max_num_timeout: int = 20
    signal_delay_s: int = 120
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    setup: List[str] = field(default_factory=list)
    # Wait for the runs to end (progress shown) instead of returning after submission. Local runs
    # always wait. On a cluster, submit from a login node and follow with `make status`.
    wait: bool = False
    poll_s: float = 10.0
    python: Optional[str] = None  # interpreter for the workers (default: the current one)

    def __post_init__(self) -> None:
        _one_of(self.kind, ["local", "slurm"], "launcher.kind")
        _check(self.max_parallel >= 1, "launcher.max_parallel", "must be >= 1")
        _check(self.runs_per_worker >= 1, "launcher.runs_per_worker", "must be >= 1")
        _check(self.max_retries >= 0, "launcher.max_retries", "must be >= 0")
        _check(self.heartbeat_s > 0, "launcher.heartbeat_s", "must be > 0")
        _check(
            self.stale_after_s > self.heartbeat_s, "launcher.stale_after_s", "must be larger than launcher.heartbeat_s"
        )
        _check(self.gpu_peak_tflops > 0, "launcher.gpu_peak_tflops", "must be > 0")
        _check(0 < self.mfu <= 1, "launcher.mfu", "must be in (0, 1]")
        _check(self.max_num_timeout >= 0, "launcher.max_num_timeout", "must be >= 0")
        _check(self.signal_delay_s >= 10, "launcher.signal_delay_s", "must be >= 10")
        _check(self.poll_s > 0, "launcher.poll_s", "must be > 0")


# --------------------------------------------------------------------------------------------
# experiment/
# --------------------------------------------------------------------------------------------
@dataclass
class ExperimentConfig:
    """A grid of runs: every combination of the listed values (config names for model/dataset)."""

    name: str = MISSING
    description: str = ""
    plw: List[float] = field(default_factory=lambda: list(PLW_LEVELS))
    models: List[str] = field(default_factory=list)
    datasets: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=lambda: [42])
    # Named training variants (e.g. regularizers): name -> overrides of train.* (a bare key such as
    # `weight_decay` means train.weight_decay; a dotted key such as `dataset.max_records` is taken
    # as it is); empty = the recipe only.
    variants: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # With variants: also run the plain recipe (variant `none`, the same run as in the main grid).
    include_baseline: bool = True
    # Hydra overrides applied to every run of the grid before the command line's (e.g. train=cpu_small).
    overrides: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(bool(self.models), "experiment.models", "must list at least one model config")
        _check(bool(self.datasets), "experiment.datasets", "must list at least one dataset config")
        _check(bool(self.plw), "experiment.plw", "must list at least one PLW")
        _check(bool(self.seeds), "experiment.seeds", "must list at least one seed")
        for name in self.variants:
            _check(
                name != "none" and name.replace("_", "").replace(".", "").replace("-", "").isalnum(),
                f"experiment.variants.{name}",
                "a variant name is letters, digits, '_', '-' or '.', and not 'none'",
            )
        for i, v in enumerate(self.plw):
            _check(v >= 0 and math.isfinite(v), f"experiment.plw[{i}]", f"PLW must be >= 0, got {v}")
        for k in ("models", "datasets"):
            for name in getattr(self, k):
                group = "model" if k == "models" else "dataset"
                _check(
                    (CONF_DIR / group / f"{name}.yaml").is_file(), f"experiment.{k}", f"no config '{group}/{name}.yaml'"
                )


# --------------------------------------------------------------------------------------------
# analysis/  (python -m pipeline.analysis; see docs/analysis.md)
# --------------------------------------------------------------------------------------------
@dataclass
class GlmmConfig:
    """Per-dataset beta GLMM (glmmTMB) of min-max scaled scores on w_p."""

    raw_poly: bool = True  # raw polynomial (the paper's Table 3 coefficients); False = orthogonal
    conf_level: float = 0.95
    alpha: float = 0.05  # significance level used in the report and the recommendations
    squeeze: bool = True  # (y (n - 1) + 0.5) / n into the open interval
    n_sim: int = 250  # simulated responses for the residual checks (0 = no checks)
    seed: int = 1
    optimizer: str = "nlminb"
    fallback_optimizer: Optional[str] = "BFGS"  # optim() method tried after a convergence problem
    min_plw_levels: int = 3

    def __post_init__(self) -> None:
        _check(0 < self.conf_level < 1, "analysis.glmm.conf_level", "must be in (0, 1)")
        _check(0 < self.alpha < 1, "analysis.glmm.alpha", "must be in (0, 1)")
        _check(self.n_sim >= 0, "analysis.glmm.n_sim", "must be >= 0")
        _check(self.min_plw_levels >= 3, "analysis.glmm.min_plw_levels", "must be >= 3 (quadratic)")


@dataclass
class GamConfig:
    """GAM across datasets (mgcv): optimal PLW per R_g (paper appendix D)."""

    formula: str = "score ~ te(w, r, k = 3) + factor(b)"
    k: int = 3
    method: str = "GCV.Cp"  # mgcv's default smoothing-parameter method
    scaling: str = "across_datasets"  # across_datasets | within_dataset | none
    subsets: List[str] = field(default_factory=lambda: ["all", "mc", "gen"])
    gen_benchmarks: List[str] = field(default_factory=lambda: ["truthfulqa_gen", "alpaca_eval", "pandalm"])
    r_values: List[float] = field(
        default_factory=lambda: [0.042, 0.082, 0.16, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.27, 5.0, 7.83]
    )
    w_grid: int = 201  # PLW grid points over [0, 1] for the optimum search
    flat_fraction: float = 0.05  # "flat" when max - min over PLW < this x score range (Table 5's *)
    tolerance: float = 0.01  # near-optimal PLW range: within this x score range of the optimum
    rds_dir: str = MISSING  # fitted GAMs (saveRDS bundles gam_<subset>.rds)

    def __post_init__(self) -> None:
        _one_of(self.scaling, ["across_datasets", "within_dataset", "none"], "analysis.gam.scaling")
        for s in self.subsets:
            _one_of(s, ["all", "mc", "gen"], "analysis.gam.subsets")
        _check(self.k >= 3, "analysis.gam.k", "must be >= 3")
        _check(self.w_grid >= 11, "analysis.gam.w_grid", "must be >= 11")
        _check(0 < self.flat_fraction < 1, "analysis.gam.flat_fraction", "must be in (0, 1)")
        _check(0 < self.tolerance < 1, "analysis.gam.tolerance", "must be in (0, 1)")
        for i, r in enumerate(self.r_values):
            _check(r > 0 and math.isfinite(r), f"analysis.gam.r_values[{i}]", "must be > 0")


@dataclass
class SuggestConfig:
    """`make suggest`: recommended PLW for a dataset from a fitted GAM."""

    gam_file: str = MISSING  # a bundle written by `make regress` (saveRDS)
    data: Optional[str] = None  # the dataset (.json / .jsonl / .parquet)
    format: str = "alpaca"  # alpaca | dolly | ultrafeedback | messages (chat)
    completion_turns: str = "all"  # chat data: which assistant turns are the completion (all | last)
    tokenizer: Optional[str] = None  # default: paths.llama_tokenizer
    r_g: Optional[float] = None  # skip tokenisation and use this R_g

    def __post_init__(self) -> None:
        _one_of(self.format, ["alpaca", "dolly", "ultrafeedback", "messages"], "analysis.suggest.format")
        _one_of(self.completion_turns, ["all", "last"], "analysis.suggest.completion_turns")
        if self.r_g is not None:
            _check(self.r_g > 0 and math.isfinite(self.r_g), "analysis.suggest.r_g", "must be > 0")


@dataclass
class AnalysisConfig:
    name: str = MISSING
    runs_dir: str = MISSING  # the run store read by `regress`
    output_dir: str = MISSING  # tables, figures, report, fitted GAMs
    power: float = 0.30103  # w_p = PLW ** power
    # Benchmark -> metric used as its score when it reports several metrics.
    primary_metrics: Dict[str, str] = field(default_factory=dict)
    mechanism_prefix: str = "mech_"  # benchmarks named so are mechanism metrics (Fig. 2)
    incomplete: str = "skip"  # runs lacking benchmarks: skip the dataset | intersect the benchmarks
    figure_formats: List[str] = field(default_factory=lambda: ["png", "pdf"])
    dpi: int = 150
    glmm: GlmmConfig = field(default_factory=GlmmConfig)
    gam: GamConfig = field(default_factory=GamConfig)
    suggest: SuggestConfig = field(default_factory=SuggestConfig)
    # trackers the analysis tables go to (a tracker run named "analysis"): null = those the analysed
    # runs were trained with (train.report_to), [] = none
    report_to: Optional[List[str]] = None

    def __post_init__(self) -> None:
        _check(0 < self.power <= 1, "analysis.power", "must be in (0, 1]")
        _one_of(self.incomplete, ["skip", "intersect"], "analysis.incomplete")
        for f in self.figure_formats:
            _one_of(f, ["png", "pdf", "svg"], "analysis.figure_formats")


# --------------------------------------------------------------------------------------------
# top level
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    plw: float = 0.0  # prompt loss weight
    completion_weight: float = 1.0
    seed: int = 42
    paths: PathsConfig = field(default_factory=PathsConfig, metadata=RUNTIME)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=RUNTIME)
    launcher: LauncherConfig = field(default_factory=LauncherConfig, metadata=RUNTIME)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig, metadata=RUNTIME)
    experiment: Optional[ExperimentConfig] = field(default=None, metadata=RUNTIME)
    # Extra datasets for stage commands that take several (e.g. the statistics table).
    stats_datasets: List[str] = field(default_factory=list, metadata=RUNTIME)

    def __post_init__(self) -> None:
        _check(math.isfinite(self.plw) and self.plw >= 0, "plw", f"PLW must be >= 0, got {self.plw}")
        _check(
            math.isfinite(self.completion_weight) and self.completion_weight > 0,
            "completion_weight",
            f"must be > 0, got {self.completion_weight}",
        )


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (config files name them in their defaults)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="paths", name="base_paths", node=PathsConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="train", name="base_train", node=TrainConfig)
    cs.store(group="eval", name="base_eval", node=EvalConfig)
    cs.store(group="launcher", name="base_launcher", node=LauncherConfig)
    cs.store(group="experiment", name="base_experiment", node=ExperimentConfig)


register_configs()

# The schemas by class name (error messages name them).
_SCHEMAS: Dict[str, type] = {
    c.__name__: c for c in list(globals().values()) if isinstance(c, type) and dataclasses.is_dataclass(c)
}


def validate(cfg: Any) -> Config:
    """Resolve interpolations and run every range check; returns typed objects.

    A :class:`Config` (typed objects an entry point validated already) is returned as it is, so code
    that takes either form validates a composed config once and never a typed one again.
    Raises ConfigError (or OmegaConf's own error for unknown keys and wrong types), naming the key.
    """
    if isinstance(cfg, Config):
        return cfg
    check_known_keys(cfg)
    token = _VALIDATING.set(True)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise config_error(e) from e
    finally:
        _VALIDATING.reset(token)
    assert isinstance(obj, Config)
    return obj


def _unknown_key_error(key: str, fields: Sequence[str], schema: type) -> ConfigError:
    parent, _, name = key.rpartition(".")
    near = difflib.get_close_matches(name, list(fields), n=1)
    hint = f"; did you mean '{parent + '.' if parent else ''}{near[0]}'?" if near else ""
    return CompositionError(f"config key '{key}': unknown key ({schema.__name__} has no such field){hint}")


def check_known_keys(cfg: Any, prefix: str = "") -> None:
    """Raise :class:`ConfigError` naming the first key of ``cfg`` that its schema does not define.

    Hydra's ``+key=value`` adds a key even to a structured (schema-typed) node, and validation
    would carry it along silently (into the run's config and hash); an unknown key is an error
    however it is spelled. Keys of ``Dict``-typed fields (``eval.shots.<benchmark>``,
    ``experiment.variants.<name>``, ``model.architecture.<kwarg>``) are free-form and allowed.
    """
    if not isinstance(cfg, DictConfig) or cfg._is_none() or cfg._is_missing():
        return
    schema = _schema_of(cfg)
    fields = {f.name for f in dataclasses.fields(schema)} if schema is not None else None
    for k in cfg.keys():
        key = f"{prefix}{k}"
        if fields is not None and k not in fields:
            raise _unknown_key_error(key, sorted(fields), schema)
        if schema is not None:  # descend into typed sections only; Dict/Any fields are free-form
            node = cfg._get_node(k)
            if isinstance(node, DictConfig):
                check_known_keys(node, f"{key}.")


def _first_line(text: str) -> str:
    return " ".join(str(text).strip().splitlines()[:1]).strip()


def config_error(e: BaseException) -> ConfigError:
    """One line naming the key for an error Hydra or OmegaConf raised while composing or validating a
    config (a :class:`CompositionError` for Hydra's)."""
    if isinstance(e, ConfigError):
        return e
    if isinstance(e, HydraException):
        return CompositionError(str(_config_error(e)))
    return _config_error(e)


def _config_error(e: BaseException) -> ConfigError:
    msg, cause = str(e), e.__cause__
    full_key = getattr(cause, "full_key", None) or getattr(e, "full_key", None)
    m = re.match(r"Could not override '([^']+)'", msg)
    if m:
        key = m.group(1)
        if "not in struct" in str(cause or "") and "Dict[" in str(cause or ""):  # a Dict-typed field
            return ConfigError(f"config key '{key}': not set yet; add it with +{key}=<value>")
        named = re.search(r"Key '[^']+' not in '(\w+)'", str(cause or ""))
        schema = _SCHEMAS.get(named.group(1)) if named else None
        if schema is not None:
            return _unknown_key_error(key, sorted(f.name for f in dataclasses.fields(schema)), schema)
        return ConfigError(f"config key '{key}': unknown key")
    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '([^']+)'", msg)
        options = re.findall(r"^\t(\S+)$", msg, flags=re.M)
        options = [o for o in options if not o.startswith("base_")]
        if m:
            group, _, name = m.group(1).rpartition("/")
            avail = f" (available: {', '.join(options)})" if options else ""
            return ConfigError(f"config key '{group or name}': no option '{name}'{avail}")
    m = re.match(r"Error merging override (.+)$", _first_line(msg))
    if m and cause is not None:
        key = full_key or _override_key(m.group(1))
        return ConfigError(f"config key '{key}': {_first_line(str(cause))} (override {m.group(1)})")
    if full_key:
        return ConfigError(f"config key '{full_key}': {_first_line(msg)}")
    detail = f": {_first_line(str(cause))}" if cause is not None and str(cause).strip() else ""
    return ConfigError(f"{_first_line(msg)}{detail}")


def _override_key(o: str) -> str:
    return o.lstrip("+~").split("=", 1)[0]


def merge_overrides(*lists: Sequence[str]) -> List[str]:
    """Concatenate override lists; a later override of the same key replaces the earlier one."""
    out: Dict[str, str] = {}
    for lst in lists:
        for o in lst:
            k = _override_key(o)
            out.pop(k, None)
            out[k] = o
    return list(out.values())


def compose_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose a config outside of a Hydra app, without validating it (see :func:`load_config`).

    With ``experiment=<name>``, the experiment's own ``overrides`` (e.g. ``train=demo``) are applied
    before the given ones, as the sweep applies them to each of its runs: ``python -m pipeline.train
    experiment=demo model=... dataset=... plw=...`` composes the same run as the sweep's grid point.
    An entry point composes once and validates once: ``cfg = compose_config(argv); typed = validate(cfg)``.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
            experiment = cfg.get("experiment")
            if experiment is not None and experiment.get("overrides"):
                cfg = compose(config_name=config_name, overrides=merge_overrides(list(experiment.overrides), overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise config_error(e) from e
    check_known_keys(cfg)
    return cfg


def load_config(overrides: Optional[List[str]] = None, config_name: str = "config") -> DictConfig:
    """Compose a config (:func:`compose_config`) and validate it: the composed form, checked (stage
    commands that need only the composed form, tests, notebooks; code that also wants the typed
    objects calls :func:`compose_config` and :func:`validate` instead, validating once)."""
    cfg = compose_config(overrides, config_name)
    validate(cfg)
    return cfg


def load_group_config(group: str, name: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """The composed node of one group option (e.g. dataset `alpaca_data_short`), validated."""
    cfg = load_config([f"{group}={name}", *(overrides or [])])
    return cfg[group]
