"""``python -m pipeline.pretrain``: build the cached pre-trained checkpoints of a grid's models
(``make pretrain``; ``make demo`` runs it first)::

    python -m pipeline.pretrain experiment=demo       # every pre-trained model of a grid
    python -m pipeline.pretrain model=tinylm_a        # one model

prints each model's folder, time and held-out loss (before -> after pre-training); a model whose
folder exists is reused in well under a second. The pre-training itself: :mod:`pipeline.pretrain`.
(A module of its own, not ``__main__``: the worker processes import :func:`_build` from it.)
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from pipeline import cli
from pipeline.config import ModelConfig, PathsConfig, compose_config, validate
from pipeline.models import pretrained_dir


def _model_configs(overrides: Sequence[str]) -> Tuple[List[ModelConfig], PathsConfig]:
    """(typed model configs, paths): the experiment's models if ``experiment=`` is given, else
    ``cfg.model``; each composed as the experiment's runs compose it (its overrides applied)."""
    cfg = validate(compose_config(list(overrides)))
    names = list(cfg.experiment.models) if cfg.experiment is not None else [cfg.model.name]
    rest = [o for o in overrides if not o.startswith("model=")]
    out = [validate(compose_config([*rest, f"model={name}"])).model for name in dict.fromkeys(names)]
    return out, cfg.paths


def _build(model: ModelConfig, paths: PathsConfig, threads: int) -> str:
    """Child-process entry: build one model's cached checkpoint with ``threads`` torch threads."""
    import torch

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
        info = (
            f"; held-out loss {d['held_out_loss_before']:.3f} -> {d['held_out_loss_after']:.3f} "
            f"after {d['steps']} steps ({d['tokens_seen']:,} tokens, {d['seconds']:.0f} s)"
        )
    return f"[ready] {name}: {folder} ({seconds:.1f} s){info}"


def main(argv: Optional[List[str]] = None) -> int:
    """Build every model's checkpoint; several models are built at once, one process per model (up
    to the number of CPUs, torch threads shared out), since each pre-training is single-machine work."""
    _, argv = cli.parse(cli.parser("python -m pipeline.pretrain", __doc__), argv)
    cli.setup_logging()
    try:
        models, paths = _model_configs(argv)
    except Exception as e:  # noqa: BLE001 - a bad override: name it
        print(f"pipeline.pretrain: bad configuration: {e}", file=sys.stderr)
        return 2
    cpus = os.cpu_count() or 1
    workers = max(1, min(len(models), cpus))
    threads = max(1, cpus // workers)
    t0 = time.monotonic()
    rc = 0
    with ExitStack() as stack:
        if workers > 1:
            ex = stack.enter_context(
                ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
            )
            jobs = [(m.name, ex.submit(_build, m, paths, threads).result) for m in models]
        else:
            jobs = [(m.name, functools.partial(_build, m, paths, threads)) for m in models]
        for name, folder in jobs:
            try:
                print(_report(name, folder(), time.monotonic() - t0), flush=True)
            except Exception as e:  # noqa: BLE001 - reported per model
                print(f"[failed] {name}: {e}", flush=True)
                rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
