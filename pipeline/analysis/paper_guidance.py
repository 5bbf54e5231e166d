"""The paper's published guidance on the prompt loss weight for a dataset's R_g (docs/study.md section 6).

What ``make suggest`` answers without a study of one's own (and beside one's own GAM): the numbers
Huerta-Enochian & Ko (2024) published, labelled as theirs. Nothing here is fitted; these are
constants from the paper:

- GAM over PLW x R_g on all benchmarks (their appendix D): optimal PLW about 0.155 for R_g <= 1,
  rising to about 0.278 at R_g = 1.5. Between 1 and 1.5 only the two end points are published; the
  value in between is a linear interpolation, said to be one.
- GLMM on the short-completion dataset (AlpacaDataShort, R_g 0.08): performance peaks at the
  critical PLW 0.242 (w_p* = 0.652), p < 0.001.
- GLMM on the long-completion datasets (AlpacaData R_g 3.27: p = 0.237; AlpacaDataCleaned R_g 7.83:
  p = 0.0861): no significant effect of PLW; the paper calls PLW "effectively irrelevant" there.
- Between R_g 1.5 and 3.27 the paper publishes no optimum: the answer says so (the effect of PLW
  shrinks as R_g grows) rather than inventing one.

The paper itself calls these models "an exercise rather than an authoritative reference" (fitted on
AlpacaData-derived datasets and LLaMA-1/2 7B); the text says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

SOURCE = "Huerta-Enochian & Ko (2024), 'Instruction Fine-Tuning: Does Prompt Loss Matter?'"
GAM_SHORT_RG = 1.0  # R_g <= 1: optimum about 0.155 (appendix D, all benchmarks)
GAM_SHORT_PLW = 0.155
GAM_MID_RG = 1.5  # up to 0.278 at R_g = 1.5
GAM_MID_PLW = 0.278
CRITICAL_PLW = 0.242  # GLMM, AlpacaDataShort (R_g 0.08): w_p* = 0.652 -> PLW 0.242
CRITICAL_WP = 0.652
SHORT_DATASET_RG = 0.08
LONG_RG = 3.27  # AlpacaData: no significant effect (p = 0.237); AlpacaDataCleaned 7.83 (p = 0.0861)
LONG_DATASETS = "AlpacaData (R_g 3.27, p = 0.237) and AlpacaDataCleaned (R_g 7.83, p = 0.0861)"


@dataclass
class PaperAnswer:
    r_g: float
    regime: str  # short | intermediate | gap | long
    plw: Optional[float]  # the paper's point answer, None where it publishes none
    low: float  # the range the answer spans (the whole [0, 1] where PLW does not matter)
    high: float
    lines: List[str]

    def text(self) -> str:
        return "\n".join(self.lines)


def paper_answer(r_g: float) -> PaperAnswer:
    """The paper's answer at ``r_g`` (see the module docstring for every number's origin)."""
    if not (r_g > 0 and math.isfinite(r_g)):
        raise ValueError(f"R_g must be a positive number, got {r_g}")
    head = f"The paper's published answer ({SOURCE}; not fitted to your data):"
    caveat = (
        "  (the paper calls its PLW models 'an exercise rather than an authoritative reference': "
        "AlpacaData-derived datasets, LLaMA-1/2 7B)"
    )
    if r_g <= GAM_SHORT_RG:
        lines = [
            head,
            f"  PLW about {GAM_SHORT_PLW} (GAM over PLW x R_g on all benchmarks: about {GAM_SHORT_PLW} for R_g <= 1);",
            f"  the GLMM on short-completion data (R_g {SHORT_DATASET_RG}) puts the peak at the critical PLW "
            f"{CRITICAL_PLW} (w_p* = {CRITICAL_WP}, p < 0.001). PLW matters here: avoid PLW 0 and PLW 1.",
            caveat,
        ]
        return PaperAnswer(r_g, "short", GAM_SHORT_PLW, GAM_SHORT_PLW, CRITICAL_PLW, lines)
    if r_g <= GAM_MID_RG:
        t = (r_g - GAM_SHORT_RG) / (GAM_MID_RG - GAM_SHORT_RG)
        plw = GAM_SHORT_PLW + t * (GAM_MID_PLW - GAM_SHORT_PLW)
        lines = [
            head,
            f"  PLW about {plw:.3g}: the GAM over PLW x R_g on all benchmarks gives about {GAM_SHORT_PLW} at "
            f"R_g 1 and {GAM_MID_PLW} at R_g 1.5 (only these two are published; {plw:.3g} is their linear "
            f"interpolation, not a published value). The GLMM's critical PLW for short-completion data is "
            f"{CRITICAL_PLW}.",
            caveat,
        ]
        return PaperAnswer(r_g, "intermediate", plw, GAM_SHORT_PLW, GAM_MID_PLW, lines)
    if r_g < LONG_RG:
        lines = [
            head,
            f"  no published optimum between R_g {GAM_MID_RG} (PLW about {GAM_MID_PLW}) and R_g {LONG_RG} (no "
            f"significant effect of PLW). The paper finds PLW matters less the longer the completions: "
            f"any PLW from 0 to about {GAM_MID_PLW} is in line with it.",
            caveat,
        ]
        return PaperAnswer(r_g, "gap", None, 0.0, GAM_MID_PLW, lines)
    lines = [
        head,
        f"  no significant effect of PLW for long-completion data: the GLMMs on {LONG_DATASETS} found none, "
        f"and its GAM confirms PLW matters little there. Any PLW in [0, 1] (PLW 0, i.e. masking the prompt, is the common default).",
        caveat,
    ]
    return PaperAnswer(r_g, "long", None, 0.0, 1.0, lines)
