"""Recommended PLW for a new dataset (``make suggest DATA=my.jsonl TOKENIZER=...``).

1. R_g of the dataset = total completion tokens / total prompt tokens, every field tokenized on
   its own without special tokens (prompt = instruction + input; the template is excluded), as in
   docs/study.md section 1. Chat data (``analysis.suggest.format=messages``): every message content
   alone, the counted assistant contents (``analysis.suggest.completion_turns``: all, or the last)
   the completion, every other content the prompt. One implementation with the data stage:
   :func:`pipeline.data.inversion.measure`, so ``make suggest`` and ``make data`` agree exactly.
2. The fitted GAM written by ``make regress`` (an R saveRDS bundle, ``analysis.suggest.gam_file``)
   is evaluated over PLW in [0, 1] at that R_g; the recommendation is the PLW maximising the
   fitted te(w, r) term, with the near-optimal range (within ``analysis.gam.tolerance`` x score
   range of the optimum) and a flatness verdict (``analysis.gam.flat_fraction``).
3. Beside it, always, the paper's published answer (:mod:`pipeline.analysis.paper_guidance`),
   labelled as the paper's. Without a fitted GAM, or with one fitted on TEST DOUBLE judges or on
   the pipeline's own scratch models (what ``make demo`` fits), only the paper's answer is given,
   and the GAM is named for what it is (:meth:`Recommendation.not_a_recommendation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from pipeline.analysis.gam import load_bundle, optimal_plw_table, surface
from pipeline.chat import COMPLETION_TURNS
from pipeline.data.inversion import measure
from pipeline.data.records import load_records
from pipeline.data.tokens import length_fn
from pipeline.tokenizer import load_tokenizer


def token_counts(records: Sequence[dict], tokenizer, completion_turns: str = "all") -> Dict[str, np.ndarray]:
    """Per-instance prompt and completion token counts, as the data stage measures them
    (:func:`pipeline.data.inversion.measure`): Alpaca records instruction + input / output, chat
    records their message contents (``completion_turns`` of the assistant turns the completion);
    every text tokenized alone, no special tokens."""
    lengths = measure(records, length_fn(tokenizer, desc="suggest: token lengths"), completion_turns)
    return {
        "prompt": np.asarray([x.prompt for x in lengths], dtype=np.int64),
        "completion": np.asarray([x.completion for x in lengths], dtype=np.int64),
    }


def generation_ratio(prompt: np.ndarray, completion: np.ndarray) -> Dict[str, float]:
    """Dataset R_g (total completion / total prompt tokens) and the mean and geometric mean of the
    per-instance ratios (instances with a prompt of zero tokens are left out of those two)."""
    prompt = np.asarray(prompt, dtype=float)
    completion = np.asarray(completion, dtype=float)
    if prompt.sum() <= 0:
        raise ValueError("the dataset has no prompt tokens: R_g is undefined")
    ok = prompt > 0
    ratios = completion[ok] / prompt[ok]
    pos = ratios[ratios > 0]
    return {
        "r_g": float(completion.sum() / prompt.sum()),
        "n": int(len(prompt)),
        "prompt_tokens": int(prompt.sum()),
        "completion_tokens": int(completion.sum()),
        "mean_ratio": float(ratios.mean()) if len(ratios) else float("nan"),
        "geomean_ratio": float(np.exp(np.log(pos).mean())) if len(pos) else float("nan"),
    }


def dataset_rg(path: Path, tokenizer_spec: str, fmt: str = "alpaca", completion_turns: str = "all") -> Dict[str, float]:
    """:func:`generation_ratio` of a dataset file (``fmt``: its field mapping; ``completion_turns``:
    which assistant turns of chat data are the completion, ``all`` or ``last``)."""
    if completion_turns not in COMPLETION_TURNS:
        raise ValueError(
            f"analysis.suggest.completion_turns: must be one of {', '.join(COMPLETION_TURNS)}, got {completion_turns!r}"
        )
    if completion_turns != "all" and fmt != "messages":
        raise ValueError(
            f"analysis.suggest.completion_turns={completion_turns} is only for chat data "
            f"(analysis.suggest.format=messages), not format {fmt}"
        )
    res = load_records(Path(path), fmt=fmt, empty_output="keep")
    tok = load_tokenizer(tokenizer_spec)
    c = token_counts(res.records, tok, completion_turns)
    return generation_ratio(c["prompt"], c["completion"])


@dataclass
class Recommendation:
    r_g: float
    plw: float
    near_low: float
    near_high: float
    flat: bool
    extrapolated: bool
    gain_over_plw0: float
    range_over_plw: float
    score_range: float
    tolerance: float
    flat_fraction: float
    subset: str
    gam_file: str
    r_range: tuple
    # what the fitted runs were (None: a bundle written before this was recorded)
    models: Optional[List[str]] = None
    test_double_benchmarks: Optional[List[str]] = None
    scratch_models: Optional[List[str]] = None

    def not_a_recommendation(self) -> Optional[str]:
        """Why this GAM must not be presented as a recommendation (None: it may): fitted on rows
        judged by TEST DOUBLE judges or on models the pipeline made from scratch (``make demo``)."""
        why = []
        if self.test_double_benchmarks:
            why.append(f"judged by the TEST DOUBLE judges ({', '.join(self.test_double_benchmarks)})")
        if self.scratch_models:
            why.append(f"of the pipeline's own tiny models made from scratch ({', '.join(self.scratch_models)})")
        if not why:
            return None
        return (
            f"The GAM at {self.gam_file} is not a recommendation: it was fitted on runs "
            + " and ".join(why)
            + ", as `make demo` makes them: a check that the pipeline runs, a fit to noise. Its optimum "
            "is not shown; run the study on real models with real judges for an answer of your own."
        )

    def text(self) -> str:
        tol = self.tolerance * self.score_range
        lines = [
            f"Your study's GAM ({self.gam_file}, subset '{self.subset}'"
            + (f", models {', '.join(self.models)}" if self.models else "")
            + "):",
            f"Recommended PLW: {self.plw:.3g}  (R_g = {self.r_g:.4g}; GAM '{self.subset}' from {self.gam_file})",
            f"Near-optimal PLW range: [{self.near_low:.3g}, {self.near_high:.3g}]  "
            f"(predicted score within {tol:.3g} = {self.tolerance:.0%} of the score range of the optimum)",
            f"Predicted gain of the optimum over PLW 0: {self.gain_over_plw0:.3g} "
            f"(scaled score units; the whole PLW effect at this R_g spans {self.range_over_plw:.3g})",
        ]
        if self.flat:
            lines.append(
                f"The fitted curve is flat at this R_g (varies by less than "
                f"{self.flat_fraction:.0%} of the score range): PLW hardly matters here."
            )
        if self.extrapolated:
            lines.append(
                f"WARNING: R_g = {self.r_g:.4g} lies outside the R_g range of the datasets "
                f"the GAM was fitted on [{self.r_range[0]:.4g}, {self.r_range[1]:.4g}]: "
                f"this is an extrapolation."
            )
        return "\n".join(lines)


def recommend(
    gam_file: Path, r_g: float, *, w_grid: int = 201, tolerance: float = 0.01, flat_fraction: float = 0.05
) -> Recommendation:
    if not (r_g > 0 and math.isfinite(r_g)):
        raise ValueError(f"R_g must be a positive number, got {r_g}")
    fit, facts = load_bundle(Path(gam_file))
    srange = float(facts["score_range"][1] - facts["score_range"][0])
    r_range = tuple(float(x) for x in facts["r_range"])
    surf = surface(fit, np.linspace(0.0, 1.0, int(w_grid)), [float(r_g)])
    row = optimal_plw_table(surf, srange, flat_fraction=flat_fraction, tolerance=tolerance, r_range=r_range).iloc[0]
    return Recommendation(
        r_g=float(r_g),
        plw=float(row["optimal_plw"]),
        near_low=float(row["near_opt_low"]),
        near_high=float(row["near_opt_high"]),
        flat=bool(row["flat"]),
        extrapolated=bool(row["extrapolated"]),
        gain_over_plw0=float(row["gain_over_plw0"]),
        range_over_plw=float(row["range_over_plw"]),
        score_range=srange,
        tolerance=tolerance,
        flat_fraction=flat_fraction,
        subset=str(facts.get("subset")),
        gam_file=str(gam_file),
        r_range=r_range,
        models=_names(facts.get("models")),
        test_double_benchmarks=_names(facts.get("test_double_benchmarks")),
        scratch_models=_names(facts.get("scratch_models")),
    )


def _names(v) -> Optional[List[str]]:
    """A bundle's list of names (R's character vector; "" stands for none; absent: None)."""
    if v is None:
        return None
    vals = [v] if isinstance(v, str) else list(v)
    return [str(x) for x in vals if str(x)]
