"""The benchmark groups of results.csv's ``group`` column: defined once, here.

A module with no imports, so that both sides of the results table share it: the evaluation (each
benchmark's YAML declares its group, checked against :data:`GROUPS`) and the analysis
(pipeline/analysis reads ``group`` and aggregates by :data:`BENCHMARK_GROUPS`) import it without
importing any evaluation code.
"""

from __future__ import annotations

# Groups of the benchmarks proper (docs/study.md section 5): multiple choice, short generation
# (TruthfulQA-Gen, WMT), long generation judged by an LLM (AlpacaEval, PandaLM).
BENCHMARK_GROUPS = ("mc", "short_gen", "long_gen")
# The mechanism metrics (``mech_*``; runs only): not benchmarks of the paper's regressions.
MECHANISM_GROUP = "mechanism"
GROUPS = BENCHMARK_GROUPS + (MECHANISM_GROUP,)
