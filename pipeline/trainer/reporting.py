"""Where training metrics go: ``<run>/metrics.jsonl`` (always), the console, optional trackers.

``metrics.jsonl`` gets one line per optimizer step (``"kind": "train"``) and one per validation
(``"kind": "eval"``); see :mod:`pipeline.trainer.loop` for the fields. ``train.report_to`` adds
trackers through accelerate's tracker API (``accelerate.tracking``: tensorboard, wandb, mlflow,
trackio, aim, comet_ml, clearml, dvclive, swanlab; tensorboard is in the pinned set, the others are
``pip install <name>``). Each tracker run is named by the run id, so the evaluation and the analysis
can log to the same one later (:func:`log_run_results`):

* ``tensorboard``: ``<run>/logs/tensorboard``;
* ``wandb``: project ``$WANDB_PROJECT`` or ``plw``, run name and id = the run id (``resume="allow"``);
* ``mlflow``: experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``plw``, run name = the run id; the MLflow run id
  is recorded in ``<run>/logs/trackers.json`` and resumed;
* ``trackio``: project ``plw``, run name = the run id (``resume="allow"``);
* the others: accelerate's defaults with project ``plw``.

The flattened config is stored as the run's hyperparameters. An unknown name is a config error and a
requested tracker that is not installed an error, both before any training. Only the main process
logs (the caller creates trackers there).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from accelerate import PartialState
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

log = logging.getLogger("pipeline.train")

TRACKERS = tuple(LOGGER_TYPE_TO_CLASS)
IDENTITY_FILE = "trackers.json"  # in <run>/logs: what a later process needs to log to the same tracker runs
PROJECT = "plw"


def check_report_to(report_to: List[str]) -> List[str]:
    """The requested tracker names, validated: unknown -> ValueError, not installed -> RuntimeError."""
    names = [str(n) for n in report_to or []]
    for n in names:
        if n not in TRACKERS:
            raise ValueError(f"config key 'train.report_to': unknown tracker {n!r}; one of {list(TRACKERS)}")
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise RuntimeError(
            f"config key 'train.report_to': {missing} not installed (pip install {' '.join(missing)}; "
            f"tensorboard is in the pinned set)"
        )
    return list(dict.fromkeys(names))


def _flat(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


class Trackers:
    """The trackers of one run (see the module docstring); ``log_dir`` is ``<run>/logs``."""

    def __init__(
        self,
        report_to: List[str],
        log_dir: Path,
        run_name: str,
        config: Optional[Mapping[str, Any]] = None,
    ):
        self.names = check_report_to(report_to)
        self.log_dir = Path(log_dir)
        self.trackers: List[Any] = []
        if not self.names:
            return
        PartialState()  # accelerate's trackers log through accelerate's logger, which needs its state
        ident_file = self.log_dir / IDENTITY_FILE
        try:
            identity = json.loads(ident_file.read_text()) if ident_file.is_file() else {}
        except (OSError, ValueError):
            identity = {}
        for name in self.names:
            t = self._make(name, run_name, identity.get(name) or {})
            t.main_process_only = False  # the caller runs on the main process only
            t.start()
            self.trackers.append(t)
        if config:
            flat = _flat(config)
            for t in self.trackers:
                try:
                    t.store_init_configuration(flat)
                except Exception as e:  # a tracker refusing some value type must not stop training
                    log.warning("tracker %s: config not stored (%s)", t.name, e)
        for t in self.trackers:
            if t.name == "mlflow" and getattr(t, "active_run", None) is not None:
                identity["mlflow"] = {"run_id": t.active_run.info.run_id}
        if identity:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            ident_file.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")

    def _make(self, name: str, run_name: str, identity: Mapping[str, Any]):
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            return cls("tensorboard", str(self.log_dir))  # accelerate writes to <log_dir>/<run_name>
        if name == "wandb":
            return cls(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, id=run_name, resume="allow")
        if name == "mlflow":
            return cls(
                experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT),
                run_id=identity.get("run_id"),
                run_name=run_name,
            )
        if name == "trackio":
            return cls(PROJECT, name=run_name, resume="allow")
        if cls.requires_logging_directory:
            return cls(run_name, str(self.log_dir / name))
        return cls(PROJECT)

    def log_values(self, values: Mapping[str, Any], step: Optional[int]) -> None:
        """Log ``values`` (numbers; strings as text where the tracker has text) at ``step``."""
        for t in self.trackers:
            t.log(dict(values), step=step)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        """One metrics.jsonl row: its numbers under ``train/`` or ``eval/``."""
        scalars = {
            k: float(v)
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        prefix = "eval/" if row.get("kind") == "eval" else "train/"
        if scalars:
            self.log_values({prefix + k: v for k, v in scalars.items()}, step)

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []


def log_run_results(
    report_to: List[str], log_dir: Path, run_name: str, values: Mapping[str, Any], step: Optional[int]
) -> None:
    """Log ``values`` (e.g. the run's evaluation results) to the run's own tracker runs."""
    if not report_to:
        return
    t = Trackers(list(report_to), log_dir, run_name)
    try:
        t.log_values(values, step)
    finally:
        t.close()


def _num(x: Optional[float], spec: str) -> str:
    """``x`` formatted, or ``n/a`` where it is not defined (None: e.g. no prompt tokens)."""
    return "n/a" if x is None else format(x, spec)


def format_row(row: Mapping[str, Any]) -> str:
    """One console line for a metrics row."""
    if row.get("kind") == "eval":
        return (
            f"eval  step {row['step']}: loss {_num(row['eval_loss'], '.4f')}  prompt "
            f"{_num(row['eval_prompt_loss'], '.4f')}  completion {_num(row['eval_completion_loss'], '.4f')}"
            f"  ({row['eval_examples']} examples)"
        )
    if row.get("skipped"):
        return (
            f"step {row['step']}/{row['total_steps']}  epoch {row['epoch']:.3f}  skipped (total loss "
            f"weight 0)  lr {row['lr']:.3e}"
        )
    pen = f"  penalty {row['penalty']:.4g}" if row.get("penalty") else ""
    return (
        f"step {row['step']}/{row['total_steps']}  epoch {row['epoch']:.3f}  loss {row['loss']:.4f}"
        f"  prompt {_num(row['prompt_loss'], '.4f')}  completion {_num(row['completion_loss'], '.4f')}{pen}"
        f"  lr {row['lr']:.3e}  grad_norm {row['grad_norm']:.3f}  {_num(row['tokens_per_s'], '.0f')} tok/s"
    )


def nan_if_none(x: Optional[float]) -> float:
    return float("nan") if x is None else float(x)
