"""The factorial grid of an experiment config, as a list of runs (pure: no I/O, no Hydra).

An experiment (``conf/experiment/*.yaml``, :class:`pipeline.config.ExperimentConfig`) lists PLW
levels, model and dataset config names, seeds and named variants (overrides of ``train.*``). Its
grid is every combination, in the order model, dataset, variant, PLW, seed. Each point becomes the
Hydra overrides of one run::

    model=<m> dataset=<d> plw=<w> seed=<s> [train.<k>=<v> ... for the variant]

and the variant's name (``none`` for the plain recipe) enters the run's identity
(:func:`pipeline.runs.run_id`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Tuple

BASELINE = "none"
# Top-level config keys and groups a variant may name with a dotted key; a bare key means train.<key>.
_DOTTED_ROOTS = ("train.", "dataset.", "model.", "eval.")
_TOP_LEVEL = ("completion_weight",)
_PLAIN = re.compile(r"^[A-Za-z0-9_.:/+-]+$")


@dataclass(frozen=True)
class GridPoint:
    """One run of a grid: the factors and the variant's overrides (``(key, value)`` pairs)."""

    model: str
    dataset: str
    plw: float
    seed: int
    variant: str = BASELINE
    variant_overrides: Tuple[Tuple[str, Any], ...] = field(default_factory=tuple)

    def overrides(self) -> List[str]:
        """The Hydra overrides that make this run from the root config."""
        out = [
            f"model={self.model}",
            f"dataset={self.dataset}",
            f"plw={format_value(self.plw)}",
            f"seed={int(self.seed)}",
        ]
        out += [f"{k}={format_value(v)}" for k, v in self.variant_overrides]
        return out

    def label(self) -> str:
        v = "" if self.variant == BASELINE else f" {self.variant}"
        return f"{self.model} {self.dataset} plw={self.plw:g}{v} s{self.seed}"


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.match(value) and value not in ("null", "true", "false") and not _looks_numeric(value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a Hydra override")


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def variant_key(key: str) -> str:
    """``weight_decay`` -> ``train.weight_decay``; ``dataset.max_records`` stays as it is."""
    if key.startswith(_DOTTED_ROOTS) or key in _TOP_LEVEL:
        return key
    if "." in key:
        raise ValueError(f"variant key {key!r}: a dotted key must start with one of {list(_DOTTED_ROOTS)}")
    return f"train.{key}"


def variants_of(experiment: Mapping[str, Any]) -> List[Tuple[str, Tuple[Tuple[str, Any], ...]]]:
    """``[(name, ((key, value), ...)), ...]``: the baseline ``none`` (unless the experiment has
    variants and ``include_baseline`` is false), then the named variants in config order."""
    named = experiment.get("variants") or {}
    out: List[Tuple[str, Tuple[Tuple[str, Any], ...]]] = []
    if not named or experiment.get("include_baseline", True):
        out.append((BASELINE, ()))
    for name, ov in named.items():
        if name == BASELINE:
            raise ValueError(f"experiment.variants: the name {BASELINE!r} is reserved for the plain recipe")
        pairs = tuple((variant_key(str(k)), v) for k, v in (ov or {}).items())
        out.append((str(name), pairs))
    return out


def enumerate_grid(experiment: Mapping[str, Any]) -> List[GridPoint]:
    """Every run of the experiment (a plain mapping: ``OmegaConf.to_container(cfg.experiment)``).

    Duplicate values on an axis are an error (they would name the same run twice)."""
    axes = {k: list(experiment.get(k) or []) for k in ("models", "datasets", "plw", "seeds")}
    for k, values in axes.items():
        if not values:
            raise ValueError(f"experiment.{k} is empty: the grid has no runs")
        keyed = [float(v) if k == "plw" else v for v in values]
        dup = sorted({str(v) for v in keyed if keyed.count(v) > 1})
        if dup:
            raise ValueError(f"experiment.{k} lists {', '.join(dup)} more than once")
    points = []
    for model, dataset, (vname, vov), plw, seed in itertools.product(
        axes["models"], axes["datasets"], variants_of(experiment), axes["plw"], axes["seeds"]
    ):
        points.append(GridPoint(str(model), str(dataset), float(plw), int(seed), vname, vov))
    return points


def split_overrides(overrides: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Command-line overrides -> (those about the grid: ``experiment=...``, ``experiment.*``;
    those applied to every run)."""
    grid, per_run = [], []
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        (grid if key == "experiment" or key.startswith("experiment.") else per_run).append(o)
    return grid, per_run


def grid_summary(points: Sequence[GridPoint]) -> Dict[str, Any]:
    """Counts per axis (for the header of the table)."""
    return {
        "runs": len(points),
        "models": sorted({p.model for p in points}),
        "datasets": sorted({p.dataset for p in points}),
        "plw": sorted({p.plw for p in points}),
        "seeds": sorted({p.seed for p in points}),
        "variants": sorted({p.variant for p in points}),
    }


def point_key(p: GridPoint) -> str:
    return json.dumps([p.model, p.dataset, p.plw, p.seed, p.variant], separators=(",", ":"))
