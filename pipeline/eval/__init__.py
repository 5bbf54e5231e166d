"""The evaluation stage: 13 benchmarks, AlpacaEval 1, PandaLM and the mechanism metrics (docs/study.md section 5).

Commands (docs/evaluation.md)::

    make eval                                   # every finished run in paths.runs_dir lacking results
    make eval OVERRIDES="eval.workers=2"        # ... two runs at a time, in worker processes
    make eval OVERRIDES="eval.run_dir=runs/<run_id>"          # one run
    make eval OVERRIDES="eval.pretrained=true model=smollm2_135m"   # a pre-trained model (baseline)
    make eval OVERRIDES="eval=cpu_small"        # CPU smoke setting: limit, shared mirror, TEST DOUBLE judges
    make fetch-data                             # the offline benchmark mirror (needs internet once)

API: :func:`pipeline.eval.stage.evaluate_run` ``(run_dir, cfg) -> Path`` (what the sweep launcher
submits), :func:`~pipeline.eval.stage.evaluate_pretrained`, :func:`~pipeline.eval.stage.evaluate_all`.

Modules: ``benchmarks`` (names, groups, defaults), ``results`` (results.csv schema and per-benchmark
markers), ``harness`` (lm-evaluation-harness via ``lm_eval.simple_evaluate`` and the task templates
in ``tasks/``), ``generation`` (batched greedy generation), ``alpacaeval`` (+ evaluator configs in
``evaluators/``), ``pandalm`` (+ judge configs in ``pandalm_judges/``), ``judges`` (the named test
doubles), ``mechanisms`` (loss RSD, weight distance, memorization BLEU), ``fetch`` (the mirror),
``stage`` (the driver), ``__main__`` (the CLI).

This package's ``__init__`` imports nothing heavy: the config schema imports ``benchmarks``.
"""
