"""The benchmarks of docs/study.md section 5 and the mechanism metrics: the registry, read from YAML.

A light module (no heavy imports): the config schema validates ``eval.benchmarks`` /
``eval.mechanisms`` against it.

Every benchmark is one YAML file ``<name>.yaml`` in ``pipeline/eval/tasks/`` (and in the folders
listed in the environment variable ``PLW_EVAL_TASKS``, separated by ``:``; a name found twice is an
error). Its ``benchmark:`` block declares it::

    benchmark:
      kind: harness            # the runner: harness | alpaca_eval | pandalm | mechanism (default harness)
      group: mc                # results.csv group (pipeline/eval/groups.py)
      shots: 25                # default few-shot examples (eval.shots overrides)
      metrics: [acc_norm, acc] # reported by default, first = the paper's score (eval.metrics overrides)
      available: [acc, acc_norm]   # every metric it can report (default: metrics)
      needs_model: true        # computed with the evaluated model loaded (default true)
      compute: loss_rsd        # which of its runner's computations (runners with several)
      hub: {path: allenai/ai2_arc, name: ARC-Challenge}   # where `make fetch-data` gets its data
      description: "..."

For ``kind: harness`` the rest of the file is the lm-eval task template (pipeline/eval/harness.py:
the built-in task it ``include``\\ s, the mirror files in ``dataset_kwargs.data_files`` relative to
``eval.data_dir``); adding an lm-eval benchmark is adding such a file (docs/evaluation.md). Where
each runner lives: pipeline/eval/runner.py's registry. The group decides BENCHMARKS (the
benchmarks proper) vs MECHANISMS (group ``mechanism``: the ``mech_*`` metrics, runs only).

The registry is read once per process and again when a file in these folders changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

from pipeline.eval.groups import GROUPS, MECHANISM_GROUP

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
EXTRA_DIRS_ENV = "PLW_EVAL_TASKS"
DECLARATION_KEY = "benchmark"
_FIELDS = (
    "kind",
    "group",
    "shots",
    "metrics",
    "available",
    "needs_model",
    "compute",
    "hub",
    "description",
    "generations",
    "new_tokens",
)


class BenchmarkDeclarationError(ValueError):
    """A benchmark YAML that cannot be used (the message names the file and the field)."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    group: str
    kind: str  # the runner (pipeline/eval/runner.py): harness | alpaca_eval | pandalm | mechanism
    shots: int = 0
    metrics: Tuple[str, ...] = ()  # reported by default
    available: Tuple[str, ...] = ()  # every metric the benchmark can report
    needs_model: bool = True
    description: str = ""
    compute: Optional[str] = None  # which computation of its runner (runners with several)
    hub: Optional[Tuple[str, Optional[str], Optional[str]]] = None  # (dataset, config, revision) for fetch-data
    # what the evaluated model generates at full size, for the evaluation cost estimate (make sweep
    # DRY_RUN=1): generations per run and new tokens at most each; an int, or the name of an eval
    # config key holding it (memorization_prompts, max_new_tokens). None: it generates nothing.
    generations: Optional[Union[int, str]] = None
    new_tokens: Optional[Union[int, str]] = None
    path: Optional[Path] = None  # its YAML file


def task_dirs() -> List[Path]:
    """The folders benchmarks are read from: the package's ``tasks/``, then ``$PLW_EVAL_TASKS``."""
    extra = [Path(p).expanduser() for p in os.environ.get(EXTRA_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    return [TASKS_DIR] + extra


def _strings(path: Path, field: str, value: Any) -> Tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BenchmarkDeclarationError(
            f"{path}: field '{DECLARATION_KEY}.{field}' must be a list of strings, got {value!r}"
        )
    return tuple(value)


def parse_declaration(path: Path, doc: Any) -> Benchmark:
    """The :class:`Benchmark` a YAML document declares (its ``benchmark:`` block)."""
    path = Path(path)
    if not isinstance(doc, dict) or not isinstance(doc.get(DECLARATION_KEY), dict):
        raise BenchmarkDeclarationError(
            f"{path}: no '{DECLARATION_KEY}:' block (a mapping declaring the "
            f"benchmark's group, metrics, ...; docs/evaluation.md)"
        )
    d = doc[DECLARATION_KEY]
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise BenchmarkDeclarationError(
            f"{path}: unknown field '{DECLARATION_KEY}.{unknown[0]}' (known: {', '.join(_FIELDS)})"
        )
    group = d.get("group")
    if group not in GROUPS:
        raise BenchmarkDeclarationError(
            f"{path}: field '{DECLARATION_KEY}.group' must be one of {list(GROUPS)}, got {group!r}"
        )
    kind = d.get("kind", "harness")
    if not isinstance(kind, str) or not kind:
        raise BenchmarkDeclarationError(f"{path}: field '{DECLARATION_KEY}.kind' must be a runner name, got {kind!r}")
    shots = d.get("shots", 0)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise BenchmarkDeclarationError(
            f"{path}: field '{DECLARATION_KEY}.shots' must be an integer >= 0, got {shots!r}"
        )
    if "metrics" not in d:
        raise BenchmarkDeclarationError(f"{path}: field '{DECLARATION_KEY}.metrics' is missing (the reported metrics)")
    metrics = _strings(path, "metrics", d["metrics"])
    if not metrics:
        raise BenchmarkDeclarationError(f"{path}: field '{DECLARATION_KEY}.metrics' must list at least one metric")
    available = _strings(path, "available", d.get("available", list(metrics)))
    needs_model = d.get("needs_model", True)
    if not isinstance(needs_model, bool):
        raise BenchmarkDeclarationError(
            f"{path}: field '{DECLARATION_KEY}.needs_model' must be true or false, got {needs_model!r}"
        )
    hub = d.get("hub")
    if hub is not None:
        if not isinstance(hub, dict) or not isinstance(hub.get("path"), str) or set(hub) - {"path", "name", "revision"}:
            raise BenchmarkDeclarationError(
                f"{path}: field '{DECLARATION_KEY}.hub' must be a mapping with 'path' "
                f"(and optionally 'name', 'revision'), got {hub!r}"
            )
        hub = (hub["path"], hub.get("name"), hub.get("revision"))
    compute = d.get("compute")
    gen = {}
    for key in ("generations", "new_tokens"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, str)) or (isinstance(v, int) and v <= 0)):
            raise BenchmarkDeclarationError(
                f"{path}: field '{DECLARATION_KEY}.{key}' must be a positive integer or an eval config key, got {v!r}"
            )
        gen[key] = v
    if (gen["generations"] is None) != (gen["new_tokens"] is None):
        raise BenchmarkDeclarationError(
            f"{path}: fields '{DECLARATION_KEY}.generations' and '{DECLARATION_KEY}.new_tokens' go together"
        )
    return Benchmark(
        name=path.stem,
        group=group,
        kind=kind,
        shots=shots,
        metrics=metrics,
        available=available,
        needs_model=needs_model,
        description=str(d.get("description") or ""),
        compute=None if compute is None else str(compute),
        hub=hub,
        generations=gen["generations"],
        new_tokens=gen["new_tokens"],
        path=path,
    )


_CACHE: Dict[Tuple, Dict[str, Benchmark]] = {}


def _listing() -> Tuple[Tuple[str, int, int], ...]:
    out = []
    for folder in task_dirs():
        if not folder.is_dir():
            raise BenchmarkDeclarationError(
                f"benchmark folder {folder} does not exist (environment variable {EXTRA_DIRS_ENV})"
            )
        for p in sorted(folder.glob("*.yaml")):
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


def registry() -> Dict[str, Benchmark]:
    """Every declared benchmark, ordered by group (:data:`GROUPS`), then name."""
    key = _listing()
    if key not in _CACHE:
        found: Dict[str, Benchmark] = {}
        for path_s, _, _ in key:
            path = Path(path_s)
            try:
                doc = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise BenchmarkDeclarationError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
            b = parse_declaration(path, doc)
            if b.name in found:
                raise BenchmarkDeclarationError(
                    f"{path}: benchmark {b.name!r} is declared twice (also {found[b.name].path})"
                )
            found[b.name] = b
        _CACHE.clear()
        _CACHE[key] = {b.name: b for b in sorted(found.values(), key=lambda b: (GROUPS.index(b.group), b.name))}
    return _CACHE[key]


def benchmarks() -> Dict[str, Benchmark]:
    """The benchmarks proper (every group but ``mechanism``)."""
    return {n: b for n, b in registry().items() if b.group != MECHANISM_GROUP}


def mechanisms() -> Dict[str, Benchmark]:
    """The mechanism metrics (group ``mechanism``; ``mech_*``, runs only)."""
    return {n: b for n, b in registry().items() if b.group == MECHANISM_GROUP}


def __getattr__(name: str) -> Dict[str, Benchmark]:
    """``BENCHMARKS``, ``MECHANISMS`` and ``ALL``: the registry as it is now (module attributes)."""
    if name == "BENCHMARKS":
        return benchmarks()
    if name == "MECHANISMS":
        return mechanisms()
    if name == "ALL":
        return dict(registry())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get(name: str) -> Benchmark:
    reg = registry()
    try:
        return reg[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(reg)}") from None


def shots_for(name: str, overrides: Optional[Dict[str, int]] = None) -> int:
    if overrides and name in overrides:
        return int(overrides[name])
    return get(name).shots


def metrics_for(name: str, overrides: Optional[Dict[str, List[str]]] = None) -> List[str]:
    if overrides and name in overrides:
        return [str(m) for m in overrides[name]]
    return list(get(name).metrics)
