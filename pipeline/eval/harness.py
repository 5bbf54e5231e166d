"""lm-evaluation-harness benchmarks: task templates -> lm-eval task YAMLs -> ``simple_evaluate``.

Thin driver around lm-eval 0.4.13's Python API:

1. :func:`materialize` turns a template ``pipeline/eval/tasks/<benchmark>.yaml`` into a genuine
   lm-eval task YAML for this evaluation (``run_dir/eval/lm_eval/tasks/plw_<benchmark>.yaml``): the
   ``include`` of the built-in task becomes its absolute path, the mirror's ``data_files`` become
   absolute paths (``dataset_path: json``), splits missing from the mirror are nulled, and
   ``num_fewshot`` is set. Without a mirror (``eval.data_dir: null``) the built-in task reads the
   hub unchanged. A benchmark whose data are not in the mirror gives a :class:`TaskSpec` with a
   ``skip`` reason (recorded as status=skipped), never an exception.
2. :func:`run_task` evaluates one materialised task with an lm-eval ``HFLM`` (the harness's own
   Hugging Face model class, batched; :func:`make_lm` builds it on the checkpoint folder) via
   ``lm_eval.simple_evaluate``, writes the raw results JSON
   (``run_dir/eval/lm_eval/plw_<benchmark>.json``) and the per-item samples (``.samples.jsonl``)
   and returns the tidy rows.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from pipeline.eval import benchmarks as B
from pipeline.eval.results import Row
from pipeline.runs import atomic_write_text
from pipeline.data.records import sha256_file

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "?")


@dataclass
class TaskSpec:
    benchmark: str
    task: str  # lm-eval task name (plw_<benchmark>)
    yaml_path: Optional[Path] = None
    skip: Optional[str] = None  # why it cannot run (status=skipped)
    notes: List[str] = field(default_factory=list)
    evaluator: Dict[str, Any] = field(default_factory=dict)


def template(benchmark: str) -> Dict[str, Any]:
    path = TASKS_DIR / f"{benchmark}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no task template {path} for benchmark {benchmark!r}")
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def mirror_files(benchmark: str) -> Dict[str, List[str]]:
    """split -> mirror-relative files of a harness benchmark (from its template)."""
    files = (template(benchmark).get("dataset_kwargs") or {}).get("data_files") or {}
    return {split: ([v] if isinstance(v, str) else list(v)) for split, v in files.items()}


def _base_config(include: str) -> Dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(lm_eval_tasks_dir() / include, resolve_func=False, recursive=True)


def materialize(benchmark: str, data_dir: Optional[str], out_dir: Path, *, shots: int,
                metrics: Sequence[str], limit: Optional[int], fewshot_seed: int,
                add_bos_token: Optional[bool] = None) -> TaskSpec:
    """Write the lm-eval task YAML of ``benchmark`` for this evaluation (see the module docstring)."""
    tpl = template(benchmark)
    task = str(tpl["task"])
    spec = TaskSpec(benchmark=benchmark, task=task)
    include = tpl.pop("include", None)
    base = _base_config(include) if include else {}
    cfg: Dict[str, Any] = {}
    if include:
        cfg["include"] = str(lm_eval_tasks_dir() / include)
    data: Dict[str, Any] = {}
    if data_dir is None:
        if not include:
            spec.skip = (f"{benchmark} reads its data only from the offline mirror (validation + test "
                         f"combined): set eval.data_dir and run `make fetch-data`")
            return spec
        cfg.update({k: v for k, v in tpl.items() if k not in ("dataset_path", "dataset_name", "dataset_kwargs")})
        data = {"source": "hub", "dataset_path": base.get("dataset_path"), "dataset_name": base.get("dataset_name")}
    else:
        root = Path(data_dir).expanduser()
        cfg.update({k: v for k, v in tpl.items() if k != "dataset_kwargs"})
        files: Dict[str, List[str]] = {}
        for split, rels in mirror_files(benchmark).items():
            found = [str(root / r) for r in rels if (root / r).is_file()]
            if found:
                files[split] = found
        merged = {**base, **cfg}
        # splits the mirror lacks are nulled; the evaluated split must exist
        for key in SPLIT_KEYS:
            split = merged.get(key)
            if split is not None and split not in files:
                cfg[key] = None
                merged[key] = None
        eval_split = merged.get("test_split") or merged.get("validation_split")
        if eval_split is None:
            wanted = [str(root / r) for rels in mirror_files(benchmark).values() for r in rels]
            spec.skip = (f"{benchmark}: not in the offline mirror {root} (expected "
                         f"{' or '.join(wanted)}); run `make fetch-data` where the hub is reachable")
            return spec
        partial = [str(root / r) for r in mirror_files(benchmark).get(eval_split, []) if not (root / r).is_file()]
        if partial:
            spec.notes.append(f"evaluated split '{eval_split}' is incomplete in the mirror: missing {partial}")
        cfg["dataset_kwargs"] = {"data_files": {s: (v[0] if len(v) == 1 else v) for s, v in files.items()}}
        data = {"source": "mirror", "eval_split": eval_split,
                "files": {Path(f).relative_to(root).as_posix(): sha256_file(Path(f))[:16]
                          for s in sorted(files) for f in files[s]}}
        if shots > 0:
            fs = merged.get("fewshot_split") or merged.get("training_split") or merged.get("validation_split") \
                or merged.get("test_split")
            data["fewshot_split"] = fs
            if fs == eval_split:
                spec.notes.append(f"few-shot examples are drawn from the evaluated split '{eval_split}' "
                                  f"(minus the current item): the mirror has no training split")
    cfg["task"] = task
    cfg["num_fewshot"] = int(shots)
    if "metric_list" in tpl:  # our own tasks (WMT): compute only what is reported
        keep = [m for m in tpl["metric_list"] if m["metric"] in metrics]
        cfg["metric_list"] = keep or tpl["metric_list"]
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.yaml_path = out_dir / f"{task}.yaml"
    header = (f"# Materialised by pipeline/eval/harness.py from pipeline/eval/tasks/{benchmark}.yaml "
              f"for lm-eval {lm_eval_version()}.\n")
    atomic_write_text(spec.yaml_path, header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    version = (tpl.get("metadata") or base.get("metadata") or {}).get("version")
    spec.evaluator = {
        "framework": "lm-eval", "version": lm_eval_version(), "task": task,
        "base_task": include, "task_version": version, "shots": int(shots), "fewshot_seed": int(fewshot_seed),
        "limit": limit, "metrics": list(metrics),
        "template_sha256": sha256_file(TASKS_DIR / f"{benchmark}.yaml")[:16], "data": data,
        "add_bos_token": add_bos_token,
    }
    return spec


_TASK_MANAGER = None


def task_manager():
    """One lm-eval TaskManager per process (indexing the built-in tasks takes a moment)."""
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGER = TaskManager()
    return _TASK_MANAGER


def make_lm(pretrained, *, batch_size: int, device: str = "cpu", dtype: Optional[str] = None,
            revision: Optional[str] = None, add_bos_token: Optional[bool] = None):
    """lm-eval's own Hugging Face model class (``HFLM``, batched) on a checkpoint folder (or a hub id
    with its revision). Its ``.model`` / ``.tokenizer`` also serve the stage's generation steps."""
    from lm_eval.models.huggingface import HFLM

    kwargs: Dict[str, Any] = {"pretrained": str(pretrained), "batch_size": int(batch_size), "device": device,
                              "dtype": dtype or "auto"}
    if revision:
        kwargs["revision"] = str(revision)
    if add_bos_token is not None:
        kwargs["add_bos_token"] = bool(add_bos_token)
    return HFLM(**kwargs)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def parse_results(res: Dict[str, Any], task: str, benchmark: str, metrics: Sequence[str],
                  notes: Sequence[str] = ()) -> List[Row]:
    """Tidy rows from an lm-eval results dict (``"<metric>,<filter>"`` keys, stderr ``N/A`` -> None)."""
    values = res["results"].get(task, {})
    n = (res.get("n-samples", {}).get(task) or {}).get("effective")
    got: Dict[str, Dict[str, Any]] = {}
    for key, v in values.items():
        if "," not in key:
            continue
        name, _filter = key.split(",", 1)
        if name.endswith("_stderr"):
            got.setdefault(name[: -len("_stderr")], {})["stderr"] = v if isinstance(v, (int, float)) else None
        elif isinstance(v, (int, float)):
            got.setdefault(name, {})["value"] = v
    rows = []
    message = "; ".join(notes)
    available = B.get(benchmark).available
    for m in metrics:
        if m in got and "value" in got[m]:
            rows.append(Row(benchmark, m, got[m]["value"], got[m].get("stderr"), n, "ok", message))
        else:
            why = (f"metric {m!r} is not reported by {task} (reported: {sorted(k for k in got if 'value' in got[k])}"
                   f"{'; BLEURT needs the BLEURT-20 model and is not computed by lm-eval 0.4.13' if m.startswith('bleurt') else ''}"
                   f"; available here: {list(available)})")
            rows.append(Row(benchmark, m, None, None, n, "skipped", why))
    return rows


def run_task(lm, spec: TaskSpec, *, metrics: Sequence[str], limit: Optional[int], raw_dir: Path,
             bootstrap_iters: int, fewshot_seed: int, gen_kwargs: Optional[Dict[str, Any]] = None) -> List[Row]:
    """Evaluate one materialised task; raw JSON and samples are written to ``raw_dir``."""
    import lm_eval

    res = lm_eval.simple_evaluate(
        model=lm, tasks=[str(spec.yaml_path)], limit=limit, bootstrap_iters=int(bootstrap_iters),
        fewshot_random_seed=int(fewshot_seed), log_samples=True, task_manager=task_manager(),
        gen_kwargs=dict(gen_kwargs) if gen_kwargs else None)
    if res is None:  # non-zero rank (never the case here: one process)
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    samples = res.pop("samples", {}) or {}
    raw_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(raw_dir / f"{spec.task}.json", json.dumps(res, indent=1, default=_json_default) + "\n")
    lines = [json.dumps(s, default=_json_default, ensure_ascii=False) for s in samples.get(spec.task, [])]
    atomic_write_text(raw_dir / f"{spec.task}.samples.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    return parse_results(res, spec.task, spec.benchmark, metrics, spec.notes)
