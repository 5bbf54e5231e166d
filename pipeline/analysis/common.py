"""Shared constants and the problem log of the analysis stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from pipeline.eval.groups import BENCHMARK_GROUPS

# Transformed PLW: w_p = PLW ** P (docs/study.md section 1; paper 4.1). P = log10(2), so 0.1 -> 0.5.
P_EXP = 0.30103

# Benchmark groups in results.csv (defined once, in pipeline/eval/groups.py; the mechanism
# metrics' group is not one of them).
GROUPS = BENCHMARK_GROUPS


def to_wp(plw, p: float = P_EXP):
    """w_p = PLW ** p (0 stays 0). Works on scalars and arrays."""
    arr = np.asarray(plw, dtype=float)
    if np.any(arr < 0):
        raise ValueError("PLW must be >= 0")
    out = np.power(arr, p)
    return float(out) if np.ndim(out) == 0 else out


@dataclass
class Issue:
    """One problem found on the way; nothing is dropped silently.

    scope: 'run' (a run folder), 'dataset', 'benchmark', 'gam', 'figure', ...
    where: what it concerns (run folder, dataset name, ...); level: 'error' (something was
    skipped) or 'warning' (analysed, with a caveat).
    """

    scope: str
    where: str
    message: str
    level: str = "error"

    def __str__(self) -> str:
        return f"[{self.level}] {self.scope} {self.where}: {self.message}"


@dataclass
class IssueLog:
    issues: List[Issue] = field(default_factory=list)

    def add(self, scope: str, where: str, message: str, level: str = "error") -> Issue:
        it = Issue(scope, where, message, level)
        self.issues.append(it)
        return it

    def extend(self, other: "IssueLog") -> None:
        self.issues.extend(other.issues)

    def for_scope(self, scope: str, where: Optional[str] = None) -> List[Issue]:
        return [i for i in self.issues if i.scope == scope and (where is None or i.where == where)]

    def __iter__(self):
        return iter(self.issues)

    def __len__(self) -> int:
        return len(self.issues)
