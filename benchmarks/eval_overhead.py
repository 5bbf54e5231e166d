"""Evaluation-stage overheads: each saving of pipeline/eval against the path it replaces, same run.

Rows (median wall and process-CPU time of ``--repeat`` alternating measurements; ratio = baseline /
optimised, > 1 is faster):

* ``task manager``: lm-eval's ``TaskManager()`` indexing every built-in task against the
  evaluation's ``harness.task_manager()`` (``include_defaults=False``) -- once per process;
* ``env info``: lm-eval's ``add_env_info`` (torch's collect_env, ``pip list`` in a subprocess) against
  ``harness.cached_add_env_info`` after its first call -- once per ``simple_evaluate`` (benchmark);
* ``attention mask``: transformers' SDPA mask (``vmap``) against ``generation.causal_padding_mask``
  for one decode step of a left-padded batch of 4 x ``--kv`` tokens -- once per generated token;
* ``rouge``: lm-eval's TruthfulQA ``rouge()`` of one (prediction, reference) pair with rouge_score's
  bootstrap loop against ``harness.install_rouge_shortcut`` -- ~30 per TruthfulQA-Gen item;
* ``gc.collect``: a full collection with torch/transformers/lm-eval/alpaca_eval imported, before
  against after ``gc.freeze`` (``stage.freeze_imported_objects``) -- 2-3 per evaluated run;
* ``bootstrap``: lm-eval's bootstrap standard error of chrF over 16 sentence pairs with 100 resamples
  in its ``multiprocessing.Pool`` against ``harness.bootstrap_in_process`` (one chunk: the same
  draws) -- 12 per run in ``eval=demo`` (BLEU/chrF of six WMT directions, TruthfulQA-Gen);
* ``0-shot task build`` (with the shared mirror): building the materialised WMT16 de->en task
  (0-shot, 5,168 documents) as lm-eval's own config would (the few-shot source listed) against
  ``materialize``'s ``fewshot_config: {samples: []}`` -- once per 0-shot benchmark and run;
* with ``--runs-from DIR``: ``python -m pipeline.eval eval=demo`` on copies of ``--runs`` finished runs
  of DIR (their eval/ and results.csv removed), ``eval.workers=1`` against ``eval.workers=2``:
  first run done, seconds per further run, total (subprocesses; CPU = children's CPU).

Identical results are what the tests check (tests/test_eval_*.py); this script only times.

    .venv/bin/python benchmarks/eval_overhead.py
    .venv/bin/python benchmarks/eval_overhead.py --runs-from runs --runs 4
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed(fn, repeat: int):
    """(median wall, median process CPU) of ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def alternate(base, fast, repeat: int):
    """Median wall/CPU of ``base`` and ``fast`` measured alternately (machine load hits both alike)."""
    b, f = ([], []), ([], [])
    for _ in range(repeat):
        for fn, acc in ((base, b), (fast, f)):
            w, c = timed(fn, 1)
            acc[0].append(w)
            acc[1].append(c)
    med = statistics.median
    return (med(b[0]), med(b[1])), (med(f[0]), med(f[1]))


def micro(args):
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401
    import torch
    from lm_eval.loggers import utils as lm_utils
    from lm_eval.tasks import TaskManager
    from transformers import masking_utils as mu

    from pipeline.eval import generation as G
    from pipeline.eval import harness

    rows = []
    rows.append(
        ("task manager (per process)",)
        + alternate(lambda: TaskManager(), lambda: TaskManager(include_defaults=False), 1)
    )
    harness.cached_add_env_info({})  # the first call computes; later calls copy
    rows.append(
        ("env info (per benchmark)",)
        + alternate(lambda: lm_utils.add_env_info({}), lambda: harness.cached_add_env_info({}), args.repeat)
    )
    kv = args.kv
    am = torch.ones(4, kv, dtype=torch.bool)
    for b in range(4):
        am[b, : 20 * b] = False  # left padding
    case = dict(
        batch_size=4,
        cache_position=torch.tensor([kv - 1]),
        kv_length=kv,
        attention_mask=am,
        mask_function=mu.causal_mask_function,
    )
    theirs = mu.AttentionMaskInterface._global_mapping["sdpa"]
    n = 100
    rows.append(
        (f"attention mask (per token, x{n})",)
        + alternate(
            lambda: [theirs(**case) for _ in range(n)],
            lambda: [G.causal_padding_mask(**case) for _ in range(n)],
            args.repeat,
        )
    )
    from lm_eval.tasks.truthfulqa import utils as tqa
    from rouge_score import scoring

    harness.install_rouge_shortcut()
    fast = scoring.BootstrapAggregator._bootstrap_resample
    loop = fast.plw_original
    ref, pred = "Nothing happens if you eat watermelon seeds.", "The seeds pass through your digestive system."

    def rouge_with(impl):
        scoring.BootstrapAggregator._bootstrap_resample = impl
        try:
            tqa.rouge([ref], [pred])
        finally:
            scoring.BootstrapAggregator._bootstrap_resample = fast

    rows.append(("rouge (one pair)",) + alternate(lambda: rouge_with(loop), lambda: rouge_with(fast), args.repeat))
    os.environ.setdefault("IS_ALPACA_EVAL_2", "False")
    import alpaca_eval.main  # noqa: F401

    before = timed(gc.collect, args.repeat)
    gc.freeze()
    after = timed(gc.collect, args.repeat)
    gc.unfreeze()
    rows.append(("gc.collect (per model release)", before, after))
    from lm_eval.api import metrics as lm_metrics

    refs = [f"the cat sat on mat number {i} today" for i in range(16)]
    preds = [f"a cat sat on the mat {i}" for i in range(16)]
    items = list(zip(refs, preds))

    def chrf_stderr():
        return lm_metrics.bootstrap_stderr(lm_metrics.chrf, items, iters=100)

    def chrf_in_process():
        with harness.bootstrap_in_process(100):
            return lm_metrics.bootstrap_stderr(lm_metrics.chrf, items, iters=100)

    assert chrf_stderr() == chrf_in_process()  # the same draws, the same value
    rows.append(("bootstrap (chrF, 100 resamples)",) + alternate(chrf_stderr, chrf_in_process, args.repeat))
    mirror = Path(os.environ.get("PLW_SHARED_DIR") or REPO.parent / "shared") / "data" / "benchmarks"
    if (mirror / "wmt16" / "de-en" / "test.jsonl").is_file():
        import yaml
        from lm_eval.tasks import get_task_dict

        tmp = Path(tempfile.mkdtemp(prefix="plw_task_bench_"))
        spec = harness.materialize(
            "wmt16_de_en", str(mirror), tmp, shots=0, metrics=["bleu"], limit=16, fewshot_seed=1234
        )
        cfg = yaml.safe_load(spec.yaml_path.read_text())
        cfg.pop("fewshot_config")
        (tmp / "listed").mkdir()
        listed = tmp / "listed" / spec.yaml_path.name
        listed.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tm = harness.task_manager()
        rows.append(
            ("0-shot task build (WMT16 de->en)",)
            + alternate(
                lambda: get_task_dict([str(listed)], tm), lambda: get_task_dict([str(spec.yaml_path)], tm), args.repeat
            )
        )
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def _eval_once(store: Path, workers: int, n: int):
    env = dict(os.environ)
    t0 = time.time()
    r0 = os.times()
    p = subprocess.run(
        [sys.executable, "-m", "pipeline.eval", "eval=demo", f"paths.runs_dir={store}", f"eval.workers={workers}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    total = time.time() - t0
    r1 = os.times()
    if p.returncode != 0:
        raise SystemExit(f"pipeline.eval failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)

    def ts(line):
        return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    lines = p.stderr.splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")
    done = [
        ts(m.group(0))
        for ln in lines
        for m in [stamp.search(ln)]
        if m and re.search(r"pipeline.eval: \[\d+/\d+\] ", ln)
    ]
    starts = [
        ts(m.group(0))
        for ln in lines
        for m in [stamp.search(ln)]
        if m and "pipeline.eval: evaluating " in ln and " run(s) in " not in ln
    ]
    last = max(ts(m.group(0)) for ln in lines for m in [stamp.search(ln)] if m)
    if done:  # parallel: the parent's line per finished run
        first, further = min(done) - t0, (max(done) - min(done)) / max(1, n - 1)
    else:  # sequential: a run ends where the next one starts
        first = (starts[1] if len(starts) > 1 else last) - t0
        further = (last - (starts[1] if len(starts) > 1 else last)) / max(1, n - 1)
    return first, further, total, cpu


def end_to_end(args):
    src = sorted(
        p
        for p in Path(args.runs_from).iterdir()
        if (p / "run.json").is_file() and (p / "final").is_dir() and not p.name.startswith(("_", "."))
    )
    src = src[: args.runs]
    if len(src) < 2:
        raise SystemExit(f"--runs-from {args.runs_from}: needs at least 2 finished runs with final/")
    out = {}
    with tempfile.TemporaryDirectory(prefix="plw_eval_bench_") as tmp:
        for workers in (1, 2):
            store = Path(tmp) / f"w{workers}"
            for p in src:
                shutil.copytree(
                    p,
                    store / p.name,
                    symlinks=True,
                    ignore=shutil.ignore_patterns("eval", "results.csv", "checkpoints"),
                )
            out[workers] = _eval_once(store, workers, len(src))
            shutil.rmtree(store)
    return len(src), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="alternating measurements per row (default 5)")
    ap.add_argument("--kv", type=int, default=300, help="attention-mask row: tokens in the cache (default 300)")
    ap.add_argument("--runs-from", help="a runs folder with finished runs: also time python -m pipeline.eval")
    ap.add_argument("--runs", type=int, default=3, help="how many of its runs (default 3)")
    args = ap.parse_args(argv)
    print(f"# torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'what':<34} {'baseline wall':>13} {'CPU':>8} {'optimised wall':>15} {'CPU':>8} {'ratio wall':>11}")

    def ratio(b, f):
        r = b / max(f, 1e-9)
        return f"{r:10.1f}x" if r < 1000 else f"{'>1000':>10}x"

    for name, (bw, bc), (fw, fc) in micro(args):  # env info: its CPU is a subprocess's (pip list)
        print(f"{name:<34} {bw:12.4f}s {bc:7.4f}s {fw:14.4f}s {fc:7.4f}s {ratio(bw, fw)}")
    if args.runs_from:
        n, out = end_to_end(args)
        print(f"\n# python -m pipeline.eval eval=demo on {n} runs (workers=1 is the baseline)")
        print(
            f"{'workers':<8} {'first run done':>15} {'per further run':>16} {'total':>8} {'CPU':>8} {'ratio (total)':>14}"
        )
        for w, (first, further, total, cpu) in out.items():
            print(f"{w:<8} {first:14.1f}s {further:15.1f}s {total:7.1f}s {cpu:7.1f}s {out[1][2] / total:13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
