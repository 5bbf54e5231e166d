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

Modules: ``benchmarks`` (the registry: one YAML file per benchmark in ``tasks/``, declaring its
runner kind, group, shots, metrics and data), ``groups`` (the results groups, shared with the
analysis), ``runner`` (the runner contract and registry), the runners beside their code --
``harness`` (lm-evaluation-harness via ``lm_eval.simple_evaluate``), ``alpacaeval`` (+ evaluator
configs in ``evaluators/``), ``pandalm`` (+ judge configs in ``pandalm_judges/``), ``mechanisms``
(loss RSD, weight distance, memorization BLEU) --, ``results`` (results.csv schema and
per-benchmark markers), ``generation`` (batched greedy generation), ``judges`` (the named test
doubles), ``fetch`` (the mirror), ``stage`` (the driver), ``pool`` (worker processes for
``eval.workers``), ``slurm`` (one array task per run), ``__main__`` (the CLI).

This package's ``__init__`` imports nothing: the analysis imports ``groups`` without evaluation code.
"""
