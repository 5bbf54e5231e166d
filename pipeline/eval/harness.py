"""lm-evaluation-harness benchmarks: task templates -> lm-eval task YAMLs -> ``simple_evaluate``.

Thin driver around lm-eval 0.4.13's Python API:

1. :func:`materialize` turns a template ``pipeline/eval/tasks/<benchmark>.yaml`` into a genuine
   lm-eval task YAML for this evaluation (``run_dir/eval/lm_eval/tasks/plw_<benchmark>.yaml``): the
   ``include`` of the built-in task becomes its absolute path, the mirror's ``data_files`` become
   absolute paths (``dataset_path: json``), splits missing from the mirror are nulled, and
   ``num_fewshot`` is set. Where the shots must come from the evaluated split (a mirror without
   training split), that split is named as both ``fewshot_split`` and ``test_split``, so that
   lm-eval's sampler leaves the current document out of its own context. Without a mirror
   (``eval.data_dir: null``) the built-in task reads the hub unchanged. A benchmark whose data are
   not in the mirror gives a :class:`TaskSpec` with a ``skip`` reason (recorded as status=skipped),
   never an exception.
2. :func:`run_task` evaluates one materialised task with an lm-eval ``HFLM`` (the harness's own
   Hugging Face model class, batched; :func:`make_lm` builds it on the checkpoint folder) via
   ``lm_eval.simple_evaluate``, writes the raw results JSON
   (``run_dir/eval/lm_eval/plw_<benchmark>.json``) and the per-item samples (``.samples.jsonl``)
   and returns the tidy rows.
3. :class:`HarnessRunner` (kind ``harness``, pipeline/eval/runner.py) does both for every benchmark
   whose YAML declares ``kind: harness`` (the default): adding an lm-eval benchmark is adding its
   YAML file (docs/evaluation.md).

Per-process caches (nothing here changes within a process, so results are unaffected): the lm-eval
``TaskManager`` (:func:`task_manager`: built without indexing lm-eval's ~14,000 built-in task YAMLs,
since our tasks are loaded from their materialised file, whose ``include`` is an absolute path and
whose ``!function`` references resolve relative to the included file; :func:`builtin_task_manager`
is the full index, for looking built-in tasks up by name), the environment description lm-eval
adds to every results JSON (:func:`install_env_info_cache`: ``torch.utils.collect_env`` runs
``pip list`` in a subprocess on every ``simple_evaluate`` call otherwise), the parsed task templates
and built-in base configs, and the mirror files' sha256 (keyed by path, size and mtime).

One computation is made cheaper with the same result (:func:`install_rouge_shortcut`): lm-eval's
TruthfulQA-Gen scores ROUGE of one prediction against one reference at a time through rouge_score's
``BootstrapAggregator``, which draws 1,000 bootstrap resamples of that single score in a Python
loop (~3 s per evaluation for 4 items). With one sample every resample is that sample and numpy
draws no random number (``choice`` of one index), so the shortcut fills the 1,000 resample means
directly and takes the same percentiles: bit-identical values, the same random state afterwards.
More than one sample goes to rouge_score's own loop.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from pipeline.config import ConfigError
from pipeline.data.records import sha256_file
from pipeline.models import check_attn_implementation
from pipeline.eval import benchmarks as B
from pipeline.eval.results import ResultRow
from pipeline.eval.runner import EvalPlan, EvalSession, Runner, plain, register
from pipeline.runs import atomic_write_text

log = logging.getLogger(__name__)

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


def _stat_key(path: Path) -> Tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


_TEMPLATES: Dict[Tuple[str, int, int], Dict[str, Any]] = {}
_BASE_CONFIGS: Dict[str, Dict[str, Any]] = {}
_SHA256: Dict[Tuple[str, int, int], str] = {}


def template_path(benchmark: str) -> Path:
    """The benchmark's YAML file (``pipeline/eval/tasks/<benchmark>.yaml`` or a ``$PLW_EVAL_TASKS`` folder)."""
    path = B.get(benchmark).path
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no task template {path} for benchmark {benchmark!r}")
    return path


def template(benchmark: str) -> Dict[str, Any]:
    """The lm-eval task template of the benchmark's YAML file: the file without its ``benchmark:``
    declaration (a fresh copy; parsed once per process and file version)."""
    path = template_path(benchmark)
    key = _stat_key(path)
    if key not in _TEMPLATES:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        doc.pop(B.DECLARATION_KEY, None)
        _TEMPLATES[key] = doc
    return copy.deepcopy(_TEMPLATES[key])


def template_sha256(benchmark: str) -> str:
    """sha256 of the task template (canonical JSON of :func:`template`: comments and the
    ``benchmark:`` declaration, whose shots and metrics the evaluator records itself, do not count)."""
    return hashlib.sha256(json.dumps(template(benchmark), sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per process and file version (path, size, mtime)."""
    path = Path(path)
    key = _stat_key(path)
    if key not in _SHA256:
        _SHA256[key] = sha256_file(path)
    return _SHA256[key]


def mirror_files(benchmark: str) -> Dict[str, List[str]]:
    """split -> mirror-relative files of a harness benchmark (from its template)."""
    files = (template(benchmark).get("dataset_kwargs") or {}).get("data_files") or {}
    return {split: ([v] if isinstance(v, str) else list(v)) for split, v in files.items()}


def _base_config(include: str) -> Dict[str, Any]:
    """The built-in task config ``include`` refers to (its own includes resolved; a fresh copy)."""
    if include not in _BASE_CONFIGS:
        from lm_eval.tasks._yaml_loader import load_yaml

        _BASE_CONFIGS[include] = load_yaml(lm_eval_tasks_dir() / include, resolve_func=False, recursive=True)
    return copy.deepcopy(_BASE_CONFIGS[include])


def fewshot_split(config: Dict[str, Any]) -> Optional[str]:
    """The split lm-eval draws few-shot examples from for a task config: ``fewshot_split``, else its
    preconfigured rule (training, else validation, else the evaluated test split)."""
    return (
        config.get("fewshot_split")
        or config.get("training_split")
        or config.get("validation_split")
        or config.get("test_split")
    )


def materialize(
    benchmark: str,
    data_dir: Optional[str],
    out_dir: Path,
    *,
    shots: int,
    metrics: Sequence[str],
    limit: Optional[int],
    fewshot_seed: int,
    add_bos_token: Optional[bool] = None,
) -> TaskSpec:
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
            spec.skip = (
                f"{benchmark} reads its data only from the offline mirror (validation + test "
                f"combined): set eval.data_dir and run `make fetch-data`"
            )
            return spec
        cfg.update({k: v for k, v in tpl.items() if k not in ("dataset_path", "dataset_name", "dataset_kwargs")})
        data = {"source": "hub", "dataset_path": base.get("dataset_path"), "dataset_name": base.get("dataset_name")}
        if shots > 0:
            data["fewshot_split"] = fewshot_split({**base, **cfg})
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
            spec.skip = (
                f"{benchmark}: not in the offline mirror {root} (expected "
                f"{' or '.join(wanted)}); run `make fetch-data` where the hub is reachable"
            )
            return spec
        partial = [str(root / r) for r in mirror_files(benchmark).get(eval_split, []) if not (root / r).is_file()]
        if partial:
            spec.notes.append(f"evaluated split '{eval_split}' is incomplete in the mirror: missing {partial}")
        cfg["dataset_kwargs"] = {"data_files": {s: (v[0] if len(v) == 1 else v) for s, v in files.items()}}
        data = {
            "source": "mirror",
            "eval_split": eval_split,
            "files": {
                Path(f).relative_to(root).as_posix(): file_sha256(Path(f))[:16] for s in sorted(files) for f in files[s]
            },
        }
        if shots > 0:
            fs = fewshot_split(merged)
            data["fewshot_split"] = fs
            if fs == eval_split:
                # lm-eval removes the current document from its shots only where the few-shot split
                # equals the test split (ConfigurableTask.fewshot_context: eval_doc is passed to the
                # sampler iff fewshot_config.split == config.test_split); its preconfigured fallback
                # sets neither, so the current item could be among its own shots. Naming the split
                # as both makes lm-eval's sampler draw shots + 1 and drop the current document
                # (WinoGrande evaluates its validation split: it becomes the test split, the same docs).
                cfg["fewshot_split"] = eval_split
                cfg["test_split"] = eval_split
                data["fewshot_excludes_current"] = True
                spec.notes.append(
                    f"few-shot examples are drawn from the evaluated split '{eval_split}' "
                    f"(minus the current item): the mirror has no training split"
                )
    cfg["task"] = task
    cfg["num_fewshot"] = int(shots)
    if int(shots) == 0:
        # no shots are drawn, but lm-eval lists the few-shot source (the training split, else the
        # evaluated one) when it builds the task: ~5k documents per WMT direction, each time.
        # An empty sample list gives the same prompts (tests/test_eval_harness.py) without it.
        cfg["fewshot_config"] = {"samples": []}
    if "metric_list" in tpl:  # our own tasks (WMT): compute only what is reported
        keep = [m for m in tpl["metric_list"] if m["metric"] in metrics]
        cfg["metric_list"] = keep or tpl["metric_list"]
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.yaml_path = out_dir / f"{task}.yaml"
    header = (
        f"# Materialised by pipeline/eval/harness.py from {template_path(benchmark)} for lm-eval {lm_eval_version()}.\n"
    )
    atomic_write_text(spec.yaml_path, header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    version = (tpl.get("metadata") or base.get("metadata") or {}).get("version")
    spec.evaluator = {
        "framework": "lm-eval",
        "version": lm_eval_version(),
        "task": task,
        "base_task": include,
        "task_version": version,
        "shots": int(shots),
        "fewshot_seed": int(fewshot_seed),
        "limit": limit,
        "metrics": list(metrics),
        "template_sha256": template_sha256(benchmark)[:16],
        "data": data,
        "add_bos_token": add_bos_token,
    }
    return spec


_TASK_MANAGER = None
_BUILTIN_TASK_MANAGER = None


def task_manager():
    """The lm-eval TaskManager our materialised tasks are loaded with (one per process).

    It indexes no task folder (``include_defaults=False``): :func:`run_task` passes the task as the
    path of its materialised YAML, which lm-eval loads from the file alone (``TaskIndex.entry_from_path``;
    the index serves only names, groups and tags, and for the log line naming the task's folder).
    The ``include`` of the built-in task is an absolute path and its ``!function`` references
    resolve relative to the included file, so the task built is the same as with the full index
    (tests/test_eval_harness.py builds both and compares their requests). Indexing every built-in
    task (:func:`builtin_task_manager`) takes 5-15 s per process."""
    global _TASK_MANAGER
    if _TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGER = TaskManager(include_defaults=False)
    return _TASK_MANAGER


def builtin_task_manager():
    """An lm-eval TaskManager indexing every built-in task (look-ups by name; one per process)."""
    global _BUILTIN_TASK_MANAGER
    if _BUILTIN_TASK_MANAGER is None:
        from lm_eval.tasks import TaskManager

        _BUILTIN_TASK_MANAGER = TaskManager()
    return _BUILTIN_TASK_MANAGER


_ENV_INFO: Dict[str, Dict[str, Any]] = {}


def cached_add_env_info(storage: Dict[str, Any]) -> None:
    """lm-eval's ``add_env_info`` computed once per process (and working directory: it records the
    git hash of the parent folder) and copied into every results dict afterwards.

    ``torch.utils.collect_env.get_pretty_env_info`` runs ``pip list`` and other commands in
    subprocesses (0.7-3 s) on each ``simple_evaluate`` call; what it reports (packages, hardware,
    versions) cannot change within a process."""
    from lm_eval.loggers import utils as lm_utils

    key = os.getcwd()
    if key not in _ENV_INFO:
        added: Dict[str, Any] = {}
        lm_utils.add_env_info(added)  # lm-eval's own function, once
        _ENV_INFO[key] = added
    storage.update(copy.deepcopy(_ENV_INFO[key]))


def _single_sample_bootstrap(original):
    def _bootstrap_resample(self, matrix):
        """rouge_score's ``BootstrapAggregator._bootstrap_resample`` (0.1.2) for one sample without the
        loop: each of the ``n_samples`` resamples is row 0 (``np.random.choice(np.arange(1))`` is 0
        and consumes no randomness), so every resample mean is the mean of row 0."""
        import numpy as np

        if matrix.shape[0] != 1:
            return original(self, matrix)
        sample_mean = np.zeros((self._n_samples, matrix.shape[1]))
        sample_mean[:, :] = np.mean(matrix[np.zeros(1, dtype=int), :], axis=0)
        percentile_delta = (1 - self._confidence_interval) / 2
        q = 100 * np.array([percentile_delta, 0.5, 1 - percentile_delta])
        return np.percentile(sample_mean, q, axis=0)

    _bootstrap_resample.plw_original = original
    return _bootstrap_resample


def install_rouge_shortcut() -> None:
    """Use :func:`_single_sample_bootstrap` in rouge_score's BootstrapAggregator (idempotent; see the
    module docstring). Without rouge_score (no TruthfulQA-Gen) nothing happens."""
    try:
        from rouge_score import scoring
    except ImportError:  # pragma: no cover
        return
    current = scoring.BootstrapAggregator._bootstrap_resample
    if not hasattr(current, "plw_original"):
        scoring.BootstrapAggregator._bootstrap_resample = _single_sample_bootstrap(current)


def install_env_info_cache() -> None:
    """Make ``lm_eval.simple_evaluate`` use :func:`cached_add_env_info` (idempotent). lm-eval 0.4.13
    calls the name ``add_env_info`` bound in ``lm_eval.evaluator``; nothing else changes."""
    import lm_eval.evaluator as ev

    if getattr(ev, "add_env_info", None) is not cached_add_env_info:
        ev.add_env_info = cached_add_env_info


def check_backend(backend: str) -> None:
    """``eval.backend`` can run on this machine: vllm needs the package and a CUDA GPU (one line)."""
    if backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("config key 'eval.backend': vllm is not installed (pip install vllm): use eval.backend=hf")
    if not torch.cuda.is_available():
        raise ConfigError("config key 'eval.backend': vllm needs a CUDA GPU (none here): use eval.backend=hf")


def import_model_class() -> None:
    """Import what evaluating a model with lm-eval needs (HFLM, the evaluator; ~5-8 s, once)."""
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401


def make_lm(
    pretrained,
    *,
    batch_size: int,
    device: str = "cpu",
    dtype: Optional[str] = None,
    revision: Optional[str] = None,
    add_bos_token: Optional[bool] = None,
    attn_implementation: Optional[str] = None,
    tokenizer=None,
    backend: str = "hf",
    vllm_args: Optional[Dict[str, Any]] = None,
):
    """lm-eval's own Hugging Face model class (``HFLM``, batched) on a checkpoint folder (or a hub id
    with its revision, or a loaded model with its ``tokenizer``); with ``backend="vllm"`` lm-eval's
    vllm model on the folder (``vllm_args`` to vllm's ``LLM``). Its ``.model`` / ``.tokenizer`` also serve the stage's generation steps.
    ``attn_implementation`` (the run's ``model.attn_implementation``) goes to ``from_pretrained``."""
    if backend == "vllm":  # lm-eval's vllm model: its .model is the engine, .tokenizer HF's
        from lm_eval.models.vllm_causallms import VLLM  # lazy: only with eval.backend=vllm

        if not isinstance(pretrained, (str, Path)):
            raise ValueError("eval.backend=vllm loads saved model folders only (not an adapter over its base)")
        kw = {"pretrained": str(pretrained), "dtype": dtype or "auto", "batch_size": "auto", "seed": 0}
        if revision:
            kw["revision"] = str(revision)
        if add_bos_token is not None:
            kw["add_bos_token"] = bool(add_bos_token)
        return VLLM(**kw, **dict(vllm_args or {}))
    from lm_eval.models.huggingface import HFLM

    if not isinstance(pretrained, (str, Path)):  # a loaded model (a LoRA adapter merged over its base)
        kw: Dict[str, Any] = {
            "pretrained": pretrained.to(device),
            "tokenizer": tokenizer,
            "batch_size": int(batch_size),
        }
        if add_bos_token is not None:
            kw["add_bos_token"] = bool(add_bos_token)
        return HFLM(**kw)
    kwargs: Dict[str, Any] = {
        "pretrained": str(pretrained),
        "batch_size": int(batch_size),
        "device": device,
        "dtype": dtype or "auto",
    }
    if revision:
        kwargs["revision"] = str(revision)
    if add_bos_token is not None:
        kwargs["add_bos_token"] = bool(add_bos_token)
    kwargs.update(check_attn_implementation(attn_implementation))
    return HFLM(**kwargs)


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def parse_results(
    res: Dict[str, Any], task: str, benchmark: str, metrics: Sequence[str], notes: Sequence[str] = ()
) -> List[ResultRow]:
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
            rows.append(ResultRow(benchmark, m, got[m]["value"], got[m].get("stderr"), n, "ok", message))
        else:
            why = (
                f"metric {m!r} is not reported by {task} (reported: {sorted(k for k in got if 'value' in got[k])}"
                f"{'; BLEURT needs the BLEURT-20 model and is not computed by lm-eval 0.4.13' if m.startswith('bleurt') else ''}"
                f"; available here: {list(available)})"
            )
            rows.append(ResultRow(benchmark, m, None, None, n, "skipped", why))
    return rows


@contextlib.contextmanager
def bootstrap_in_process(iters: int):
    """lm-eval's bootstrap standard errors (BLEU, chrF, TER) in this process where a pool cannot help.

    ``lm_eval.api.metrics.bootstrap_stderr`` draws chunks of up to 1,000 resamples, chunk i with
    ``random.Random(i)``, in a fresh ``multiprocessing.Pool(cpu_count())`` per metric unless
    ``DISABLE_MULTIPROC`` is set; its single-process path draws the same chunks with the same seeds.
    Below 2,000 iterations there is one chunk, so the pool only adds its start-up (about 0.2 s per
    metric, 12 metrics per run): the same values, computed here. More keep lm-eval's pool."""
    if iters >= 2000 or os.environ.get("DISABLE_MULTIPROC"):
        yield
        return
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        os.environ.pop("DISABLE_MULTIPROC", None)


def run_task(
    lm,
    spec: TaskSpec,
    *,
    metrics: Sequence[str],
    limit: Optional[int],
    raw_dir: Path,
    bootstrap_iters: int,
    fewshot_seed: int,
    gen_kwargs: Optional[Dict[str, Any]] = None,
) -> List[ResultRow]:
    """Evaluate one materialised task; raw JSON and samples are written to ``raw_dir``."""
    import lm_eval

    install_env_info_cache()
    install_rouge_shortcut()
    with bootstrap_in_process(int(bootstrap_iters)):
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[str(spec.yaml_path)],
            limit=limit,
            bootstrap_iters=int(bootstrap_iters),
            fewshot_random_seed=int(fewshot_seed),
            log_samples=True,
            task_manager=task_manager(),
            gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
        )
    if res is None:  # non-zero rank (never the case here: one process)
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    samples = res.pop("samples", {}) or {}
    raw_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(raw_dir / f"{spec.task}.json", json.dumps(res, indent=1, default=_json_default) + "\n")
    lines = [json.dumps(s, default=_json_default, ensure_ascii=False) for s in samples.get(spec.task, [])]
    atomic_write_text(raw_dir / f"{spec.task}.samples.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    return parse_results(res, spec.task, spec.benchmark, metrics, spec.notes)


@register
class HarnessRunner(Runner):
    """lm-eval benchmarks: planned by :func:`materialize`, run by :func:`run_task` with the evaluated
    model (``eval.gen_kwargs`` applies to the ``short_gen`` group: the generate_until tasks)."""

    kind = "harness"
    order = {"model": 10}

    def plan(self, ev: EvalSession, bench: B.Benchmark) -> EvalPlan:
        e = ev.e
        spec = materialize(
            bench.name,
            e.data_dir,
            ev.eval_dir / "lm_eval" / "tasks",
            shots=ev.shots(bench.name),
            metrics=ev.metrics(bench.name),
            limit=e.limit,
            fewshot_seed=e.fewshot_seed,
            add_bos_token=e.add_bos_token,
        )
        evaluator = dict(spec.evaluator)
        if plain(e.gen_kwargs) and bench.group == "short_gen":  # generate_until tasks only
            evaluator["gen_kwargs"] = plain(e.gen_kwargs)
        if e.backend != "hf" and evaluator:
            evaluator["backend"] = str(e.backend)  # lm-eval's vllm model (HF: recorded as before)
        return EvalPlan(bench.name, evaluator or {"framework": "lm-eval", "task": spec.task}, spec.skip, spec)

    def model_phase(self, ev: EvalSession, plans: Dict[str, EvalPlan], names: List[str], lm) -> None:
        e = ev.e
        gk = plain(e.gen_kwargs) or None
        for n in names:
            p = plans[n]
            ev.attempt(
                p,
                lambda p=p, n=n: run_task(
                    lm,
                    p.spec,
                    metrics=ev.metrics(n),
                    limit=e.limit,
                    gen_kwargs=gk if B.get(n).group == "short_gen" else None,
                    raw_dir=ev.eval_dir / "lm_eval",
                    bootstrap_iters=e.bootstrap_iters,
                    fewshot_seed=e.fewshot_seed,
                ),
            )
