"""Cost estimates of a run (pure): trained tokens -> FLOPs -> GPU-hours.

    FLOPs     = 6 x parameters x trained tokens          (forward + backward, dense decoder)
    GPU-hours = FLOPs / (peak TFLOPs per GPU x 1e12 x MFU) / 3600

Trained tokens = examples seen x mean tokens per example (rendered Alpaca prompt + completion + EOS,
capped at the model's max length), where examples seen = records x (1 - eval fraction) x epochs, or
max_steps x global batch when train.max_steps > 0. Padding is not counted: the estimate is a lower
bound to the degree the batches are padded; the MFU (launcher.mfu) absorbs the rest.

Token statistics come (in :mod:`pipeline.sweep.plan`) from the processed dataset when it is built,
else from the raw file, else from the paper's Table 1 (:data:`TABLE1`), else they are unknown.

Evaluation: what the evaluated model generates, per run (each benchmark YAML declares its full-size
``generations`` and ``new_tokens``: AlpacaEval 805, PandaLM 170, TruthfulQA-Gen 817, about 15,000 WMT
sentences, up to ``eval.memorization_prompts`` training prompts), an upper bound on the tokens
(generation stops at EOS or a newline), at ``launcher.eval_tokens_per_s`` generated tokens per GPU
second. Loglikelihood benchmarks (ARC, PIQA, ...) and the judges are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

# Tokens the Alpaca template adds around instruction/input (LLaMA tokenizer, BOS and EOS included):
# measured on the template text of docs/study.md section 1 with empty fields (shared/tokenizers/llama).
TEMPLATE_TOKENS_WITH_INPUT = 53
TEMPLATE_TOKENS_NO_INPUT = 36
CHARS_PER_TOKEN = 4.0  # English text, LLaMA-style BPE (used only where tokens were not counted)

# The paper's Table 1 (docs/study.md section 4): total tokens and mean tokens per instance
# (instruction + input + completion, LLaMA tokenizer, template excluded). Medium/Tiny are built
# from AlpacaDataCleaned (same instances, some inverted): its size stands in for them.
TABLE1 = {
    "alpaca_data": (4_376_482, 13.40 + 6.25 + 64.51),
    "alpaca_data_cleaned": (9_490_837, 14.21 + 6.42 + 162.74),
    "alpaca_data_short": (10_035_667, 16.93 + 162.34 + 14.62),
    "alpaca_data_medium": (9_490_837, 14.21 + 6.42 + 162.74),
    "alpaca_data_tiny": (10_035_667, 16.93 + 162.34 + 14.62),
    "ultrafeedback": (31_075_393, 184.47 + 0 + 327.37),
    "dolly": (3_023_113, 18.65 + 91.60 + 91.14),
    "ultrafeedback_short": (16_351_333, 94.09 + 206.18 + 55.03),
    "dolly_short": (3_122_209, 18.83 + 160.37 + 28.79),
}


@dataclass(frozen=True)
class TokenStats:
    """Size of a training set: records and mean tokens per example (template included)."""

    n_records: int
    mean_tokens: float
    source: str  # processed | raw | table1


@dataclass(frozen=True)
class Estimate:
    examples: float
    tokens: float
    flops: float
    gpu_hours: float
    wall_hours: Optional[float]  # gpu_hours / GPUs of the run (None on CPU-only runs)


def table1_stats(dataset_name: str, with_input_fraction: float = 0.4) -> Optional[TokenStats]:
    """Stats of a paper dataset from Table 1 (None for other datasets)."""
    row = TABLE1.get(dataset_name)
    if row is None:
        return None
    total, mean = row
    template = with_input_fraction * TEMPLATE_TOKENS_WITH_INPUT + (1 - with_input_fraction) * TEMPLATE_TOKENS_NO_INPUT
    return TokenStats(n_records=int(round(total / mean)), mean_tokens=mean + template, source="table1")


def example_tokens(instruction: int, input: int, output: int) -> int:
    """Tokens of one rendered example from the token counts of its fields."""
    return instruction + input + output + (TEMPLATE_TOKENS_WITH_INPUT if input > 0 else TEMPLATE_TOKENS_NO_INPUT)


def chars_to_tokens(n_chars: int) -> int:
    return int(math.ceil(n_chars / CHARS_PER_TOKEN))


def capped_mean(lengths: Iterable[float], max_length: Optional[int] = None) -> float:
    """Mean of per-example token counts, each capped at ``max_length`` (truncation)."""
    vals = [min(float(x), max_length) if max_length else float(x) for x in lengths]
    return sum(vals) / len(vals) if vals else 0.0


def examples_seen(
    n_records: int, epochs: float, max_steps: int, global_batch_size: int, eval_fraction: float = 0.0
) -> float:
    if max_steps and max_steps > 0:
        return float(max_steps * global_batch_size)
    return n_records * (1.0 - eval_fraction) * float(epochs)


def training_flops(params: float, tokens: float) -> float:
    return 6.0 * params * tokens


def gpu_hours(flops: float, peak_tflops: float, mfu: float) -> float:
    if peak_tflops <= 0 or not 0 < mfu <= 1:
        raise ValueError(f"throughput must be positive (peak {peak_tflops} TFLOPs, MFU {mfu})")
    return flops / (peak_tflops * 1e12 * mfu) / 3600.0


def estimate(
    stats: TokenStats,
    params_billion: float,
    epochs: float,
    max_steps: int,
    global_batch_size: int,
    peak_tflops: float,
    mfu: float,
    gpus: int = 0,
    eval_fraction: float = 0.0,
    max_length: Optional[int] = None,
) -> Estimate:
    """The cost of one run. ``stats.mean_tokens`` is capped at ``max_length`` when given (use
    :func:`capped_mean` on per-example counts for an exact cap)."""
    ex = examples_seen(stats.n_records, epochs, max_steps, global_batch_size, eval_fraction)
    mean = min(stats.mean_tokens, max_length) if max_length else stats.mean_tokens
    tokens = ex * mean
    flops = training_flops(params_billion * 1e9, tokens)
    gh = gpu_hours(flops, peak_tflops, mfu)
    return Estimate(examples=ex, tokens=tokens, flops=flops, gpu_hours=gh, wall_hours=gh / gpus if gpus > 0 else None)


@dataclass(frozen=True)
class EvalEstimate:
    generations: int  # per run
    new_tokens: int  # per run, at most
    gpu_hours: float  # per run, at most


def eval_estimate(items: Iterable[Tuple[int, int]], tokens_per_s: float) -> EvalEstimate:
    """The generation cost of one run from ``(generations, new tokens at most)`` per benchmark."""
    if tokens_per_s <= 0:
        raise ValueError(f"launcher.eval_tokens_per_s must be positive, got {tokens_per_s}")
    items = list(items)
    gens = sum(n for n, _ in items)
    tokens = sum(n * t for n, t in items)
    return EvalEstimate(gens, tokens, tokens / tokens_per_s / 3600.0)
