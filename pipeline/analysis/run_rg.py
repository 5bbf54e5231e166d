"""Record each finished run's training-set R_g in its run.json (the GAM's r factor).

R_g is a property of the training dataset (docs/study.md section 1: total completion tokens / total prompt
tokens, fields tokenized alone with the LLaMA tokenizer), so it is computed here, once per distinct
dataset definition, with the data stage's own statistics (:func:`pipeline.data.stats.dataset_stats`),
not by the trainer. ``collect`` and ``regress`` call :func:`fill_missing_r_g` first; run.json files
that already carry ``r_g`` are left alone. A run whose dataset cannot be rebuilt (its config names a
dataset that no longer exists, or a file that is gone) is reported and left without ``r_g``; the
collect step then skips it with that message.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

from omegaconf import OmegaConf


def runs_missing_r_g(runs_dir: Path) -> List[Path]:
    """Done runs whose run.json has no ``r_g``."""
    from pipeline.runs import list_runs

    out = []
    for rd in list_runs(runs_dir):
        if rd.path.name.startswith((".", "_")):
            continue
        try:
            missing = rd.info().get("r_g") is None and rd.status().get("state") == "done"
        except (OSError, ValueError):
            continue  # collect reports malformed files
        if missing:
            out.append(rd.path)
    return out


def fill_missing_r_g(runs_dir: Path) -> Tuple[int, List[str]]:
    """Add ``r_g`` to every done run's run.json that lacks it. Returns (runs updated, problems)."""
    from pipeline.config import load_config
    from pipeline.data.stats import dataset_stats
    from pipeline.runs import atomic_write_json

    cache: Dict[str, float] = {}
    problems: List[str] = []
    n = 0
    for d in runs_missing_r_g(runs_dir):
        try:
            saved = OmegaConf.load(d / "config.yaml")
            dataset = OmegaConf.to_container(saved.dataset, resolve=True)
            key = json.dumps(dataset, sort_keys=True)
            if key not in cache:
                # Recompose the run's own dataset definition (the saved node, not today's config file).
                cfg = load_config([f"paths.data_dir={saved.paths.data_dir}",
                                   f"paths.shared_dir={saved.paths.shared_dir}",
                                   f"paths.llama_tokenizer={saved.paths.llama_tokenizer}"])
                cfg.dataset = OmegaConf.merge(cfg.dataset, OmegaConf.create(dataset))
                print(f"R_g of dataset {dataset.get('name')} (for run.json r_g) ...", flush=True)
                cache[key] = float(dataset_stats(cfg).rg)
            meta = json.loads((d / "run.json").read_text())
            meta["r_g"] = cache[key]
            atomic_write_json(d / "run.json", meta)
            n += 1
        except Exception as e:  # noqa: BLE001 - reported, the other runs go on
            problems.append(f"{d / 'config.yaml'}: cannot compute the dataset's R_g for run.json: {e}")
    return n, problems
