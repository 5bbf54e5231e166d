"""Judges for the LLM-as-a-judge benchmarks, including the named TEST DOUBLES.

Real judges are large models (Mixtral-8x7B-Instruct, PandaLM-7B) configured in
``pipeline/eval/evaluators/`` (AlpacaEval) and ``pipeline/eval/pandalm_judges/`` (PandaLM). They
cannot run on a CPU-only machine without them, so tests and the offline demo use a TEST DOUBLE:

``test_double_longer_wins`` -- NOT A JUDGE. A deterministic rule that prefers the longer of the two
outputs (characters, after stripping); equal lengths: the lexicographically larger text; identical
outputs: a tie (PandaLM; AlpacaEval records identical outputs as a draw itself). It is plugged
into the real pipelines in place of the judge model only: for AlpacaEval it is the annotator's
``fn_completions`` (alpaca_eval's own prompt templating, output-order randomisation, completion
parser ``regex_parser``, caching and win-rate metric all run), and it reads the two outputs back
out of the real Mixtral prompt; for PandaLM it answers the real PandaLM prompt with PandaLM's
answer format (``1`` / ``2`` / ``Tie`` on the first line), which the real parser reads. Results
computed with it are marked in results.csv (``evaluator.judge`` and the row's ``message``). It is
never a default for real experiments (``conf/eval/default.yaml`` uses Mixtral and PandaLM-7B);
``conf/eval/cpu_small.yaml`` selects it.
"""

from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

TEST_DOUBLE = "test_double_longer_wins"
TEST_DOUBLE_NOTE = "TEST DOUBLE judge (test_double_longer_wins: prefers the longer output); not a real evaluation"


class JudgePromptError(ValueError):
    """The test double could not find the two outputs in a judge prompt."""


def _between(text: str, start: str, end: str, where: str) -> str:
    i = text.find(start)
    if i < 0:
        raise JudgePromptError(f"test double judge: marker {start!r} not found in the {where} prompt")
    i += len(start)
    j = text.find(end, i)
    if j < 0:
        raise JudgePromptError(f"test double judge: marker {end!r} not found in the {where} prompt")
    return text[i:j]


def longer(a: str, b: str) -> int:
    """1 if ``a`` wins, 2 if ``b`` wins, 0 for identical texts (the test double's rule)."""
    a, b = a.strip(), b.strip()
    if a == b:
        return 0
    if len(a) != len(b):
        return 1 if len(a) > len(b) else 2
    return 1 if a > b else 2


# --------------------------------------------------------------------------------------------
# AlpacaEval: an alpaca_eval ``fn_completions`` (prompts -> completions dict)
# --------------------------------------------------------------------------------------------
ALPACA_TASK_MARKER = "# Task:"
ALPACA_A = "## Output (a):\n"
ALPACA_B = "\n\n## Output (b):\n"
ALPACA_END = "\n\n## Which is best"


def alpaca_outputs(prompt: str) -> Tuple[str, str]:
    """The two outputs inside an AlpacaEval prompt built from our Mixtral template (the task part,
    after the one-shot example)."""
    task = prompt[prompt.rfind(ALPACA_TASK_MARKER) :] if ALPACA_TASK_MARKER in prompt else prompt
    a = _between(task, ALPACA_A, ALPACA_B, "AlpacaEval")
    b_start = task.find(ALPACA_B) + len(ALPACA_B)
    end = task.rfind(ALPACA_END)
    if end < b_start:
        raise JudgePromptError(f"test double judge: marker {ALPACA_END!r} not found in the AlpacaEval prompt")
    return a, task[b_start:end]


def longer_wins_completions(prompts: Sequence[str], **decoding_kwargs) -> Dict[str, List]:
    """TEST DOUBLE for alpaca_eval's ``fn_completions``: answers ``Output (a)`` or ``Output (b)``."""
    t0 = time.time()
    out = []
    for p in prompts:
        a, b = alpaca_outputs(p)
        out.append("Output (b)" if longer(a, b) == 2 else "Output (a)")
    dt = (time.time() - t0) / max(1, len(out))
    return {"completions": out, "price_per_example": [0.0] * len(out), "time_per_example": [dt] * len(out)}


# --------------------------------------------------------------------------------------------
# PandaLM: prompts -> completions in PandaLM's answer format
# --------------------------------------------------------------------------------------------
PANDALM_1 = "### Response 1:\n"
PANDALM_2 = "\n\n### Response 2:\n"
PANDALM_END = "\n\n### Evaluation:\n"


def pandalm_outputs(prompt: str) -> Tuple[str, str]:
    r1 = _between(prompt, PANDALM_1, PANDALM_2, "PandaLM")
    start = prompt.find(PANDALM_2) + len(PANDALM_2)
    end = prompt.rfind(PANDALM_END)
    if end < start:
        raise JudgePromptError(f"test double judge: marker {PANDALM_END!r} not found in the PandaLM prompt")
    return r1, prompt[start:end]


def pandalm_longer_wins(prompts: Sequence[str]) -> List[str]:
    """TEST DOUBLE PandaLM judge: ``1``, ``2`` or ``Tie`` on the first line, then a fixed reason."""
    out = []
    for p in prompts:
        r1, r2 = pandalm_outputs(p)
        verdict = {0: "Tie", 1: "1", 2: "2"}[longer(r1, r2)]
        out.append(f"{verdict}\n\n### Reason: test double (the longer response wins)\n\n### Reference: -\n")
    return out
