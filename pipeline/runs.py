"""The run store: one folder per training run, named by a hash of what defines the run.

A run is defined by the model, the dataset (its full definition and the data-stage code versions),
the PLW and completion weight, the training recipe (minus runtime settings such as the number of
GPUs, how the global batch is split -- unless ``train.loss_normaliser=micro_batch`` makes the gradient
depend on it --, logging and checkpoint cadence) and the seed. Which fields are runtime settings is
marked on the schema itself (``metadata=RUNTIME`` in pipeline/config.py). Runtime settings
(partition, GPUs, paths) never change a run's identity, so a run started on one cluster resumes on
another.

Folder layout (``paths.runs_dir/<run_id>/``)::

    config.yaml      the resolved config the run was started with
    run.json         its identity: the factors (model, dataset, plw, variant, seed, ...) and the hash
    status.json      pending | running | done | failed, with the error, attempts (starts), failures
                     (failed attempts), host/pid/SLURM job of the latest start, timestamps
    metrics.jsonl    one line per optimizer step (training) and per evaluation
    checkpoints/     intermediate checkpoints (resume)
    final/           the fine-tuned model (safetensors + tokenizer)
    logs/            stdout/stderr of each attempt (attempt-<n>.log, written by the sweep's workers)
    launch.json      how the sweep last launched it: variant, overrides, the launcher (pipeline.sweep)
    launch.yaml      the resolved config of the latest launch (written by the sweep, and by
                     pipeline.train for the training processes of a multi-process attempt; runtime
                     settings may differ from config.yaml, the config the run was first created with)
    heartbeat.json   rewritten every few seconds by the process executing the run (liveness)
    .lock            held (flock) by the process executing the run

Every status change and result file is written atomically (write to a temporary file, then rename),
so a crash never leaves a half-written file that looks complete. ``status.json`` is written through
:mod:`pipeline.lifecycle` only (it decides every transition); :meth:`RunDir.load_config` is the one
reader of a run's config.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline import data
from pipeline.config import (
    Config,
    ConfigError,
    DatasetConfig,
    ModelConfig,
    TrainConfig,
    identity_of,
    runtime_fields,
    validate,
)

# Bump when the meaning of a run changes (tokenization, loss, trainer semantics) so that old results
# are never mistaken for new ones.
RUN_VERSION = 1

STATES = ("pending", "running", "done", "failed")
# What RunDir.status() reports for a status.json that cannot be read as a JSON object (edited by
# hand, a disk fault): never written, so a reader of the store reports the run and goes on.
CORRUPT = "corrupt"


class CorruptStatus(ValueError):
    """A run's status.json is not a JSON object: its state is unknown, so nothing changes it."""


# The fields that never define a run, as the schema marks them (metadata=RUNTIME in pipeline/config.py);
# train.per_device_batch_size is left out only when the loss normaliser makes the gradient independent
# of it (see pipeline.config.identity_of).
TRAIN_RUNTIME_FIELDS = runtime_fields(TrainConfig)
MODEL_RUNTIME_FIELDS = runtime_fields(ModelConfig)
DATASET_RUNTIME_FIELDS = runtime_fields(DatasetConfig)


def run_identity(cfg: Any, variant: str = "none") -> Dict[str, Any]:
    """The fields that define a run (a JSON-able dict); its hash names the run folder.

    ``cfg``: the composed config or a typed :class:`~pipeline.config.Config`. What is included is
    marked on the schema (:func:`pipeline.config.identity_of`): the model, the dataset's definition,
    plw, completion_weight, the training recipe and the seed; then the variant and the versions of
    the code that give a run (and its processed dataset, :func:`pipeline.data.code_versions`) meaning.
    """
    if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is not Config:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg)  # e.g. a config.yaml read without the schema
    ident = identity_of(cfg)
    ident["variant"] = variant
    ident["versions"] = {"run": RUN_VERSION, **data.code_versions()}
    return ident


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
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file in its folder and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by None, in nested dicts,
    lists and tuples: strict JSON has no NaN/Infinity, and "not defined" is ``null``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, indent: Optional[int] = None) -> str:
    """Strict JSON of ``obj`` (keys sorted; non-finite floats as ``null``, :func:`json_safe`; other
    objects as ``str``): what every JSON file of the run store is written with."""
    return json.dumps(json_safe(obj), indent=indent, sort_keys=True, default=str, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj, indent=2) + "\n")


def append_jsonl(path: Path, obj: Mapping[str, Any]) -> None:
    """Append one line (a single write of a full line: a crash loses at most the last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(dumps_json(obj) + "\n")


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


def read_jsonl_tail(path: Path, max_bytes: int = 16384) -> list:
    """The complete lines among the last ``max_bytes`` of a JSONL file (fast progress reads)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return []
    with open(path, "rb") as f:
        start = max(0, size - max_bytes)
        f.seek(start)
        blob = f.read()
    lines = blob.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line may be cut
    rows = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn line (being written, or left by a crash)
    return rows


def slurm_job_id_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``; None outside SLURM."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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

    @property
    def heartbeat_file(self) -> Path:
        return self.path / "heartbeat.json"

    @property
    def lock_file(self) -> Path:
        return self.path / ".lock"

    @property
    def launch_json(self) -> Path:
        return self.path / "launch.json"

    @property
    def launch_config(self) -> Path:
        return self.path / "launch.yaml"

    @property
    def run_id(self) -> str:
        return self.path.name

    def load_config(self, latest: bool = True, notes: Optional[List[str]] = None) -> DictConfig:
        """The run's resolved config on the schema (:class:`pipeline.config.Config`), validated; no
        Hydra runs. ``latest``: the config of the latest launch (``launch.yaml``) when there is one,
        else (and with ``latest=False``) the config the run was created with (``config.yaml``).
        A config that does not validate raises :class:`~pipeline.config.ConfigError` naming the file;
        given a ``notes`` list instead (readers of finished runs: a run made under an older schema is
        still evaluated), the file is returned as it is and the problem appended to ``notes``."""
        path = self.launch_config if latest and self.launch_config.is_file() else self.config
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no {path.name} (not a run folder written by pipeline.runs.create_run?)"
            )
        raw = OmegaConf.load(path)
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
            validate(cfg)
        except (ConfigError, OmegaConfBaseException, ValueError) as e:
            problem = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
            if notes is None:
                raise ConfigError(f"{path}: {problem}") from e
            notes.append(f"{path} does not fit the current schema ({problem}); read as is")
            return raw
        return cfg

    def info(self) -> Dict[str, Any]:
        """run.json (``{}`` when the folder has not been created yet)."""
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def status(self) -> Dict[str, Any]:
        """The current status (``pending`` when the folder or file does not exist yet). A file that
        is not a JSON object (written atomically, so someone edited it or the disk failed) gives
        state :data:`CORRUPT` with ``error`` and ``path``: readers report that run and go on with the
        others; :meth:`set_status` refuses to change it (:class:`CorruptStatus`)."""
        try:
            blob = self.status_file.read_bytes()
        except FileNotFoundError:
            return {"state": "pending", "attempts": 0}
        try:
            status = json.loads(blob.decode("utf-8"))
            if not isinstance(status, dict):
                raise ValueError(f"a JSON {type(status).__name__}, not an object")
        except ValueError as e:  # also invalid UTF-8 (UnicodeDecodeError is a ValueError)
            return {"state": CORRUPT, "attempts": 0, "path": str(self.status_file), "error": self._corrupt_text(e)}
        return status

    def _corrupt_text(self, e: Exception) -> str:
        return (
            f"{self.status_file}: corrupt status (not valid JSON: {e}); move the file aside to "
            f"start the run's status over (its checkpoints are kept)"
        )

    @contextlib.contextmanager
    def _status_lock(self) -> Iterator[None]:
        """Serialise read-modify-write of status.json between processes (trainer, worker, sweep)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".status.lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def set_status(self, state: str, error: Optional[str] = None, **extra: Any) -> Dict[str, Any]:
        """Change the state (atomically). ``running`` counts an attempt, clears the error and
        records where it runs (host, pid, SLURM job); ``failed`` counts a failure. Called by
        :mod:`pipeline.lifecycle` only, which decides the transitions."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; one of {STATES}")
        with self._status_lock():
            status = self.status()
            if status.get("state") == CORRUPT:
                raise CorruptStatus(f"cannot set run {self.run_id} {state}: {status['error']}")
            status.update(extra)
            status["state"] = state
            status["updated"] = now_iso()
            if state == "running":
                status["attempts"] = int(status.get("attempts", 0)) + 1
                status.pop("error", None)
                status.pop("interrupted", None)
                if "host" not in extra:
                    status["host"] = socket.gethostname()
                if "pid" not in extra:
                    status["pid"] = os.getpid()
                if "slurm_job_id" not in extra:
                    status["slurm_job_id"] = slurm_job_id_from_env()
                status["started"] = status["updated"]
            if state == "failed":
                status["failures"] = int(status.get("failures", 0)) + 1
            if state == "done":
                status.pop("error", None)
            if error is not None:
                status["error"] = error
            atomic_write_json(self.status_file, status)
        return status

    # -- liveness ---------------------------------------------------------------------------------
    def write_heartbeat(self, **info: Any) -> None:
        atomic_write_json(
            self.heartbeat_file,
            {"time": time.time(), "iso": now_iso(), "host": socket.gethostname(), "pid": os.getpid(), **info},
        )

    def heartbeat(self) -> Optional[Dict[str, Any]]:
        try:
            return json.loads(self.heartbeat_file.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def try_lock(self) -> Optional[int]:
        """Take the run's execution lock (non-blocking): a file descriptor, or None when another
        process holds it. Released by :meth:`unlock` or when the process ends (even by SIGKILL)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        return fd

    @staticmethod
    def unlock(fd: Optional[int]) -> None:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def lock_held(self) -> bool:
        """Whether some process holds the execution lock right now."""
        if not self.lock_file.exists():
            return False
        fd = os.open(self.lock_file, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    # -- progress ---------------------------------------------------------------------------------
    def progress(self) -> Dict[str, Any]:
        """``{step, total, loss}`` of the latest training line of metrics.jsonl (None where unknown);
        ``total`` from the metrics line or status.json (``total_steps``/``max_steps``)."""
        step = total = loss = None
        for row in reversed(read_jsonl_tail(self.metrics)):
            if "step" in row and ("loss" in row or "train_loss" in row):
                step = row.get("step")
                loss = row.get("loss", row.get("train_loss"))
                total = row.get("total_steps", row.get("max_steps"))
                break
        if total is None:
            st = self.status() if self.status_file.exists() else {}
            total = st.get("total_steps", st.get("max_steps"))
        return {"step": step, "total": total, "loss": loss}


def list_runs(runs_dir: Path) -> List[RunDir]:
    """Every run folder (one with a run.json) in the store, sorted by name."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    return [RunDir(p) for p in sorted(runs_dir.iterdir()) if (p / "run.json").is_file()]


def create_run(cfg: DictConfig, variant: str = "none") -> RunDir:
    """Create (or find) the run folder for ``cfg``; writes config.yaml and run.json once."""
    rid = run_id(cfg, variant)
    rd = RunDir(Path(cfg.paths.runs_dir) / rid)
    rd.path.mkdir(parents=True, exist_ok=True)
    if not rd.run_json.exists():
        ident = run_identity(cfg, variant)
        atomic_write_text(rd.config, OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(
            rd.run_json,
            {
                "run_id": rid,
                "hash": identity_hash(ident),
                "model": cfg.model.name,
                "dataset": cfg.dataset.name,
                "plw": float(cfg.plw),
                "variant": variant,
                "regularizer": variant,
                "seed": int(cfg.seed),
                "identity": ident,
            },
        )
    return rd


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = False, on_wait: Any = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created with its folder) for the block; released when the
    block ends or the process dies (even by SIGKILL). The holder writes its host, pid and start time
    into the file. Another process holding it: ``BlockingIOError`` naming the holder, or with
    ``wait=True`` wait for it (``on_wait()`` is called first, e.g. to log that)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not wait:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                raise BlockingIOError(f"{path} is held by {holder}") from None
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {now_iso()}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
