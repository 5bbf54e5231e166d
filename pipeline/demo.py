"""``python -m pipeline.demo [--experiment NAME] [--eval NAME] [--no-figures] [overrides]`` (``make demo``).

The newcomer's first command: runs the *same* stages a paper-scale study runs, in order, on a small
experiment, and ends with a summary (runs done, seconds per stage, where the report is):

  0. pretrain ``python -m pipeline.pretrain experiment=<NAME> ...``    (build the grid's pre-trained
              tiny models once; cached under paths.data_dir/models, where the demo then looks up
              each model's folder: :func:`built_models`)
  1. sweep    ``python -m pipeline.sweep run experiment=<NAME> launcher=demo ...``  (train every grid
              point; resumable; two workers, many runs per worker process)
  2. eval     ``python -m pipeline.eval eval=<EVAL> ...``              (runs lacking results.csv only)
  3. regress  ``python -m pipeline.analysis regress ...``              (GLMM, GAM, figures, report)

Each stage is a subprocess through the stage's own command-line entry point (nothing demo-specific is
executed), its output streamed live (tqdm bars, logging). Set-up is ``make setup`` (the Makefile's
``demo: setup``).

Re-running reuses everything: pretrain is skipped when every model's checkpoint folder recorded by
the last demo still exists for the same model definitions, the sweep skips done runs, eval skips runs
with results, and regress is skipped when the report exists and the inputs it was built from (every
``results.csv`` of the grid, hashed) are unchanged. ``--force-regress`` refits anyway.

Overrides (Hydra ``key=value``) are routed by key: ``experiment.*`` go to pretrain and the sweep,
``model.*`` too, ``eval.*`` to eval only, ``analysis.*`` to regress only, ``train.*``,
``launcher.*``, ``plw``, ``dataset`` to the sweep only, everything else (``paths.*``, ``seed`` ...)
to every stage.

Before the stages, the preflight (:func:`preflight`) finds the demo's input data (instruction sets,
LLaMA tokenizer, benchmark mirror; pipeline/shared_data.py lists them): an explicit
``paths.shared_dir=`` or ``PLW_SHARED_DIR`` is only checked; else the configured ``../shared`` when
complete; else ``<paths.data_dir>/shared`` when complete (passed to every stage as
``paths.shared_dir``); else, when GitHub answers, it is fetched there first (``make fetch-demo-data``,
with progress). Offline, the demo stops with one message listing what is missing and that command.

The summary is also written atomically to ``<analysis.output_dir>/demo_summary.json``
(``benchmarks/demo_stages.py`` reads it). Exit status: 0 every stage ok, 1 a stage failed (the
summary says which; what earlier stages computed stays in the run store), 2 bad arguments.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from pipeline import cli, shared_data
from pipeline.config import load_config
from pipeline.models import pretrained_dir
from pipeline.runs import RunDir, atomic_write_json
from pipeline.sweep.plan import make_plan

STAGES = ("pretrain", "sweep", "eval", "regress")
DEMO_LAUNCHER = "demo"  # conf/launcher/demo.yaml: two local workers, many runs per worker process


@dataclass
class StageResult:
    name: str
    command: List[str]
    seconds: float = 0.0
    returncode: Optional[int] = None
    skipped: str = ""  # non-empty: why the stage did not run


@dataclass
class Summary:
    experiment: str
    eval_config: str
    stages: List[StageResult] = field(default_factory=list)
    runs_total: int = 0
    runs_done: int = 0
    runs_evaluated: int = 0
    report: str = ""
    total_seconds: float = 0.0
    ok: bool = False
    inputs_hash: str = ""
    models_key: str = ""  # hash of the grid's model definitions (pretrain's skip check)
    model_dirs: Dict[str, str] = field(default_factory=dict)  # model name -> its checkpoint folder


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~").split(".", 1)[0].split("/", 1)[0]


def route_overrides(overrides: Sequence[str]) -> Dict[str, List[str]]:
    """Split Hydra overrides by stage (pure). ``experiment.*`` and ``model.*`` -> pretrain and sweep;
    ``train.*``, ``launcher.*``, ``plw``, ``dataset`` -> sweep; ``eval.*`` -> eval; ``analysis.*`` ->
    regress; anything else (``paths.*``, ``seed`` ...) -> every stage."""
    out: Dict[str, List[str]] = {s: [] for s in STAGES}
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not key=value")
        k = _key(o).lstrip("+")
        if k in ("experiment", "model"):
            out["pretrain"].append(o)
            out["sweep"].append(o)
        elif k in ("train", "launcher", "plw", "dataset", "completion_weight"):
            out["sweep"].append(o)
        elif k == "eval":
            out["eval"].append(o)
        elif k == "analysis":
            out["regress"].append(o)
        else:
            for s in STAGES:
                out[s].append(o)
    return out


def stage_commands(
    experiment: str, eval_config: str, overrides: Sequence[str], python: str = sys.executable, no_figures: bool = False
) -> Dict[str, List[str]]:
    """The exact command line of each stage (pure)."""
    r = route_overrides(overrides)
    chosen = any(o.split("=", 1)[0].lstrip("+~") == "launcher" for o in r["sweep"])  # launcher=<name>
    launcher = [] if chosen else [f"launcher={DEMO_LAUNCHER}"]
    return {
        "pretrain": [python, "-m", "pipeline.pretrain", f"experiment={experiment}", *r["pretrain"]],
        "sweep": [python, "-m", "pipeline.sweep", "run", f"experiment={experiment}", *launcher, *r["sweep"]],
        "eval": [python, "-m", "pipeline.eval", f"eval={eval_config}", *r["eval"]],
        "regress": [
            python,
            "-m",
            "pipeline.analysis",
            "regress",
            *(["--no-figures"] if no_figures else []),
            *r["regress"],
        ],
    }


def _grid(experiment: str, overrides: Sequence[str]):
    """(plan runs, analysis output dir, models key) from the sweep's own planner (store read only)."""
    r = route_overrides(overrides)
    plan = make_plan([f"experiment={experiment}", *r["sweep"]])
    acfg = load_config(list(r["regress"]))
    models = {}
    for pr in plan.runs:
        m = pr.cfg.model
        if str(m.name) not in models:
            models[str(m.name)] = OmegaConf.to_container(m, resolve=True)
    key = hashlib.sha256(json.dumps(models, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return plan, Path(str(acfg.analysis.output_dir)), key


def models_ready(previous: Dict, models_key: str) -> bool:
    """Whether the last demo built every model of the same definitions and their folders still
    hold a complete checkpoint (``DONE``)."""
    dirs = previous.get("model_dirs") or {}
    return (
        bool(models_key)
        and previous.get("models_key") == models_key
        and bool(dirs)
        and all((Path(d) / "DONE").is_file() for d in dirs.values())
    )


def built_models(plan) -> Dict[str, str]:
    """{model name: its checkpoint folder} for the grid's models that are built into the model store
    (``paths.data_dir/models``), read from the store after the pretrain stage built them: the folder
    :func:`pipeline.models.pretrained_dir` finds for the model definition the runs use (hub models,
    which have no such folder, are left out)."""
    out: Dict[str, str] = {}
    for pr in plan.runs:
        name = str(pr.cfg.model.name)
        if name not in out:
            folder = pretrained_dir(pr.cfg.model, pr.cfg.paths, verify=False)
            out[name] = "" if folder is None else str(folder)
    return {name: folder for name, folder in out.items() if folder}


def inputs_hash(run_dirs: Sequence[Path]) -> str:
    """Hash of the run ids and their results.csv bytes (what regress reads); pure over the files."""
    h = hashlib.sha256()
    for d in sorted(Path(p) for p in run_dirs):
        res = d / "results.csv"
        h.update(d.name.encode() + b"\0")
        h.update(res.read_bytes() if res.exists() else b"<missing>")
        h.update(b"\0")
    return h.hexdigest()[:16]


def _state(run_dir: Path) -> str:
    try:
        return RunDir(run_dir).status().get("state", "pending")
    except (OSError, ValueError):
        return "pending"


def _count(plan) -> Dict[str, int]:
    dirs = _run_dirs(plan)
    return {
        "total": len(dirs),
        "done": sum(_state(Path(d)) == "done" for d in dirs),
        "evaluated": sum((Path(d) / "results.csv").exists() for d in dirs),
    }


def _run_dirs(plan) -> List[Path]:
    return [Path(pr.rd.path) for pr in plan.runs]


def _run_stage(cmd: List[str], env: Dict[str, str]) -> int:
    """Run a stage, its output streamed live."""
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, env=env)


# ----------------------------------------------------------------------------------------------
# preflight: where the demo's input data is (../shared, data/shared, or fetched into data/shared)
# ----------------------------------------------------------------------------------------------
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def explicit_shared_dir(overrides: Sequence[str], env: Mapping[str, str]) -> bool:
    """Whether the user chose the shared folder (``paths.shared_dir=`` or ``PLW_SHARED_DIR``)."""
    return "PLW_SHARED_DIR" in env or any(o.split("=", 1)[0].lstrip("+~") == "paths.shared_dir" for o in overrides)


def reachable(base_url: str, timeout: float = 5.0) -> bool:
    """A quick probe: does the first pinned source answer at ``base_url``? (GitHub by default.) The
    Makefile sets HF_HUB_OFFLINE=1 for every demo stage, so that variable cannot say "offline" here."""
    src = next(f.source for f in shared_data.FILES if f.source is not None)
    try:
        with urllib.request.urlopen(urllib.request.Request(src.url(base_url), method="HEAD"), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def missing_message(root: Path, missing: Sequence[str], why: str, command: str) -> str:
    """The one message of a demo that cannot start: what is missing (grouped) and the command."""
    lines = [f"make demo: {why}; {len(missing)} of the demo's input files are missing from {root}:"]
    lines += [f"  {line}" for line in shared_data.summarize(missing)]
    lines.append(f"Fetch them once, where GitHub and the Hugging Face hub are reachable: {command}")
    return "\n".join(lines)


def fetch_shared(root: Path, base_url: str, python: str = sys.executable) -> int:
    """``python -m pipeline.shared_data --root ROOT`` with its progress streamed (the hub allowed)."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    cmd = [python, "-m", "pipeline.shared_data", "--root", str(root), "--base-url", base_url]
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, env=env)


def preflight(overrides: Sequence[str], env: Mapping[str, str]) -> Tuple[List[str], str]:
    """(the overrides the stages get, an error message or ""). Reads only, except the fetch."""
    cfg = load_config(route_overrides(overrides)["regress"])  # paths.* and the other common keys
    configured = Path(str(cfg.paths.shared_dir)).expanduser().resolve()
    if explicit_shared_dir(overrides, env):
        miss = shared_data.missing(configured)
        cmd = f"{shared_data.FETCH_COMMAND} ROOT={configured}"
        return list(overrides), missing_message(configured, miss, "paths.shared_dir is incomplete", cmd) if miss else ""
    fallback = Path(str(cfg.paths.data_dir)).expanduser().resolve() / "shared"
    chosen = shared_data.choose(configured, fallback)
    use = list(overrides) + [f"paths.shared_dir={fallback}"]
    if chosen == configured:
        return list(overrides), ""
    if chosen == fallback:
        print(f"make demo: no complete {configured}; reading the demo's inputs from {fallback}", flush=True)
        return use, ""
    base_url = env.get(shared_data.BASE_URL_ENV, shared_data.RAW)
    if not reachable(base_url):
        why = f"no complete {configured} and {base_url} is not reachable"
        return list(overrides), missing_message(fallback, shared_data.missing(fallback), why, shared_data.FETCH_COMMAND)
    print(f"make demo: no complete {configured}; fetching the demo's inputs into {fallback}", flush=True)
    rc = fetch_shared(fallback, base_url)
    miss = shared_data.missing(fallback)
    if rc != 0 or miss:
        return list(overrides), missing_message(fallback, miss, "fetching failed (above)", shared_data.FETCH_COMMAND)
    return use, ""


def format_summary(s: Summary) -> str:
    lines = [
        "",
        "=" * 72,
        f"make demo: experiment {s.experiment}, eval={s.eval_config} -> {'OK' if s.ok else 'FAILED'}",
        f"runs: {s.runs_done}/{s.runs_total} trained, {s.runs_evaluated}/{s.runs_total} evaluated",
    ]
    for st in s.stages:
        state = (
            f"skipped ({st.skipped})"
            if st.skipped
            else "ok"
            if st.returncode == 0
            else f"FAILED (exit {st.returncode})"
        )
        lines.append(f"  {st.name:<8} {st.seconds:8.1f} s  {state}")
    lines.append(f"  {'total':<8} {s.total_seconds:8.1f} s")
    for name, folder in sorted(s.model_dirs.items()):
        lines.append(f"model {name}: {folder}")
    lines.append(f"report: {s.report or '(not written)'}")
    lines.append("=" * 72)
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = cli.parser("python -m pipeline.demo", __doc__)
    ap.add_argument("--experiment", default="demo", help="conf/experiment/<NAME>.yaml (demo_ci: reduced)")
    ap.add_argument("--eval", dest="eval_config", default="demo", help="conf/eval/<NAME>.yaml")
    ap.add_argument("--no-figures", action="store_true", help="regress without figures")
    ap.add_argument("--force-regress", action="store_true", help="refit even if inputs are unchanged")
    args, overrides = cli.parse(ap, argv)
    try:
        overrides, problem = preflight(overrides, os.environ)
    except cli.CONFIG_ERRORS as e:
        print(f"make demo: bad configuration: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        ap.error(str(e))
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        cmds = stage_commands(args.experiment, args.eval_config, overrides, no_figures=args.no_figures)
    except ValueError as e:
        ap.error(str(e))
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")})

    t0 = time.monotonic()
    try:
        plan, out_dir, models_key = _grid(args.experiment, overrides)
    except Exception as e:  # bad config: name it and stop before any work
        print(f"make demo: bad configuration: {e}", file=sys.stderr)
        return 2
    summary = Summary(experiment=args.experiment, eval_config=args.eval_config, models_key=models_key)
    summary_file = out_dir / "demo_summary.json"
    previous = {}
    if summary_file.exists():
        try:
            previous = json.loads(summary_file.read_text())
        except ValueError:
            previous = {}
    print(
        f"make demo: {len(plan.runs)} runs of experiment {args.experiment}; stages: "
        f"{', '.join(STAGES)}; report -> {out_dir}",
        flush=True,
    )

    for name in STAGES:
        st = StageResult(name=name, command=cmds[name])
        summary.stages.append(st)
        if name == "pretrain":
            if models_ready(previous, models_key):
                summary.model_dirs = dict(previous["model_dirs"])
                st.skipped = f"{len(summary.model_dirs)} pre-trained model(s) cached"
        elif name == "sweep":
            c = _count(plan)
            if c["done"] == c["total"]:
                st.skipped = f"all {c['total']} runs done"
        elif name == "eval":
            c = _count(plan)
            if c["evaluated"] == c["total"]:
                st.skipped = f"all {c['total']} runs have results"
        elif name == "regress":
            h = inputs_hash(_run_dirs(plan))
            summary.inputs_hash = h
            report = out_dir / "report.md"
            if not args.force_regress and report.exists() and previous.get("inputs_hash") == h and previous.get("ok"):
                st.skipped = "inputs unchanged since the last report"
        if st.skipped:
            print(f"\n=== {name}: skipped ({st.skipped})", flush=True)
            continue
        ts = time.monotonic()
        st.returncode = _run_stage(cmds[name], env)
        st.seconds = time.monotonic() - ts
        if st.returncode != 0:
            break
        if name == "pretrain":
            summary.model_dirs = built_models(plan)

    c = _count(plan)
    summary.runs_total, summary.runs_done, summary.runs_evaluated = c["total"], c["done"], c["evaluated"]
    report = out_dir / "report.md"
    summary.report = str(report) if report.exists() else ""
    summary.ok = all(st.skipped or st.returncode == 0 for st in summary.stages) and len(summary.stages) == len(STAGES)
    summary.total_seconds = time.monotonic() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(summary_file, asdict(summary))
    print(format_summary(summary), flush=True)
    print(f"summary: {summary_file}", flush=True)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
