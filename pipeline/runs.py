"""The run store: one folder per training run, named by a hash of what defines the run.

A run is defined by the model, the dataset (its full definition and the data-stage code versions),
the PLW and completion weight, the training recipe (minus runtime settings such as the number of
GPUs, how the global batch is split, logging and checkpoint cadence) and the seed. Runtime settings
(partition, GPUs, paths) never change a run's identity, so a run started on one cluster resumes on
another.

Folder layout (``paths.runs_dir/<run_id>/``)::

    config.yaml      the resolved config the run was started with
    run.json         its identity: the factors (model, dataset, plw, variant, seed, ...) and the hash
    status.json      pending | running | done | failed, with the error, attempts and timestamps
    metrics.jsonl    one line per optimizer step (training) and per evaluation
    checkpoints/     intermediate checkpoints (resume)
    final/           the fine-tuned model (safetensors + tokenizer)
    logs/            stdout/stderr of each attempt

Every status change and result file is written atomically (write to a temporary file, then rename),
so a crash never leaves a half-written file that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from pipeline.data.inversion import TRANSFORM_VERSION
from pipeline.data.records import RECORDS_VERSION

# Bump when the meaning of a run changes (tokenization, loss, trainer semantics) so that old results
# are never mistaken for new ones.
RUN_VERSION = 1

STATES = ("pending", "running", "done", "failed")

# train.* fields that do not change what a run computes (how it is executed or observed).
TRAIN_RUNTIME_FIELDS = {
    "name", "per_device_batch_size", "distributed", "gradient_checkpointing", "logging_steps",
    "save_steps", "report_to",
}
# model.* fields that say where weights come from or what a cluster should give the run.
MODEL_RUNTIME_FIELDS = {"local_path", "resources", "fsdp_wrap_class", "params_billion"}
DATASET_RUNTIME_FIELDS = {"description", "paper_rg"}


def _plain(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def run_identity(cfg: DictConfig, variant: str = "none") -> Dict[str, Any]:
    """The fields that define a run (a JSON-able dict); its hash names the run folder."""
    model = {k: v for k, v in _plain(cfg.model).items() if k not in MODEL_RUNTIME_FIELDS}
    dataset = {k: v for k, v in _plain(cfg.dataset).items() if k not in DATASET_RUNTIME_FIELDS}
    train = {k: v for k, v in _plain(cfg.train).items() if k not in TRAIN_RUNTIME_FIELDS}
    return {
        "model": model,
        "dataset": dataset,
        "plw": float(cfg.plw),
        "completion_weight": float(cfg.completion_weight),
        "train": train,
        "variant": variant,
        "seed": int(cfg.seed),
        "versions": {"run": RUN_VERSION, "transform": TRANSFORM_VERSION, "records": RECORDS_VERSION},
    }


def identity_hash(identity: Mapping[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def format_plw(plw: float) -> str:
    return f"{plw:.6g}"


def run_id(cfg: DictConfig, variant: str = "none") -> str:
    """Readable and unique: ``<model>__<dataset>__plw<value>[__<variant>]__s<seed>__<hash>``."""
    ident = run_identity(cfg, variant)
    parts = [cfg.model.name, cfg.dataset.name, f"plw{format_plw(float(cfg.plw))}"]
    if variant != "none":
        parts.append(variant)
    parts += [f"s{int(cfg.seed)}", identity_hash(ident)]
    return "__".join(parts)


# ------------------------------------------------------------------------------------------------
# atomic files
# ------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_jsonl(path: Path, obj: Mapping[str, Any]) -> None:
    """Append one line (a single write of a full line: a crash loses at most the last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True, default=str) + "\n")


def read_jsonl(path: Path) -> list:
    """Read a JSONL file, ignoring a torn last line left by a crash."""
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn final line
            raise ValueError(f"{path}: line {i + 1} is not valid JSON")
    return rows


# ------------------------------------------------------------------------------------------------
# run folders
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def status_file(self) -> Path:
        return self.path / "status.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    def status(self) -> Dict[str, Any]:
        """The current status (``pending`` when the folder or file does not exist yet)."""
        if not self.status_file.exists():
            return {"state": "pending", "attempts": 0}
        return json.loads(self.status_file.read_text(encoding="utf-8"))

    def set_status(self, state: str, error: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; one of {STATES}")
        status = self.status()
        status.update(extra)
        status["state"] = state
        status["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if state == "running":
            status["attempts"] = int(status.get("attempts", 0)) + 1
            status.pop("error", None)
        if error is not None:
            status["error"] = error
        atomic_write_json(self.status_file, status)
        return status


def create_run(cfg: DictConfig, variant: str = "none") -> RunDir:
    """Create (or find) the run folder for ``cfg``; writes config.yaml and run.json once."""
    rid = run_id(cfg, variant)
    rd = RunDir(Path(cfg.paths.runs_dir) / rid)
    rd.path.mkdir(parents=True, exist_ok=True)
    if not rd.run_json.exists():
        ident = run_identity(cfg, variant)
        atomic_write_text(rd.config, OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(rd.run_json, {
            "run_id": rid, "hash": identity_hash(ident), "model": cfg.model.name,
            "dataset": cfg.dataset.name, "plw": float(cfg.plw), "variant": variant,
            "regularizer": variant, "seed": int(cfg.seed), "identity": ident,
        })
    return rd
