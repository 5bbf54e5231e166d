"""Where training metrics go: ``<run>/metrics.jsonl`` (always), the console, optional trackers.

``metrics.jsonl`` gets one line per optimizer step (``"kind": "train"``) and one per validation
(``"kind": "eval"``); see :mod:`pipeline.trainer.loop` for the fields. ``train.report_to`` adds
trackers, each imported only when asked for:

* ``tensorboard``: ``torch.utils.tensorboard`` into ``<run>/logs/tensorboard`` -- only if the
  ``tensorboard`` package is installed (otherwise a warning, and training goes on);
* ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "plw", name=<run id>, config=<the config>)``;
* ``mlflow``: ``mlflow.start_run(run_name=<run id>)`` (``MLFLOW_TRACKING_URI`` as usual).

A requested ``wandb``/``mlflow`` that is not installed is an error at start (before any training).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, List, Mapping, Optional

log = logging.getLogger("pipeline.train")

TRACKERS = ("tensorboard", "wandb", "mlflow")


class Trackers:
    def __init__(self, report_to: List[str], log_dir: Path, run_name: str, config: Mapping[str, Any]):
        self._tb = self._wandb = self._mlflow = None
        for name in report_to or []:
            if name not in TRACKERS:
                raise ValueError(f"config key 'train.report_to': unknown tracker {name!r}; one of {TRACKERS}")
        if "tensorboard" in report_to:
            if importlib.util.find_spec("tensorboard") is None:
                log.warning(
                    "train.report_to has 'tensorboard' but the tensorboard package is not "
                    "installed: not logging to TensorBoard (pip install tensorboard)"
                )
            else:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"))
        if "wandb" in report_to:
            if importlib.util.find_spec("wandb") is None:
                raise RuntimeError("config key 'train.report_to': 'wandb' is not installed (pip install wandb)")
            import os

            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "plw"),
                name=run_name,
                id=run_name,
                resume="allow",
                config=dict(config),
            )
        if "mlflow" in report_to:
            if importlib.util.find_spec("mlflow") is None:
                raise RuntimeError("config key 'train.report_to': 'mlflow' is not installed (pip install mlflow)")
            import mlflow

            self._mlflow = mlflow
            mlflow.start_run(run_name=run_name)

    def log(self, row: Mapping[str, Any], step: int) -> None:
        scalars = {
            k: float(v)
            for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        prefix = "eval/" if row.get("kind") == "eval" else "train/"
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(prefix + k, v, step)
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in scalars.items()}, step=step)
        if self._mlflow is not None:
            self._mlflow.log_metrics({(prefix + k).replace("/", "_"): v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._mlflow is not None:
            self._mlflow.end_run()


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
