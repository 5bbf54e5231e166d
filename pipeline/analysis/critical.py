"""Critical PLW from the GLMM's raw-polynomial fixed effects (paper 5.2; docs/study.md section 6).

score (link scale) = a w_p^2 + b w_p + c. Only a concave fit (a < 0) has a maximum:
w_p* = -b / (2a) and lambda = w_p* ** (1/p) with p = 0.30103. Otherwise there is none, and a
maximum outside [0, 1] is reported as such (the best PLW of the fitted curve is then a boundary).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from pipeline.analysis.common import P_EXP


@dataclass
class CriticalPLW:
    exists: bool  # a < 0 and w_p* in [0, 1]
    a: float
    b: float
    wp_star: Optional[float] = None  # vertex on the w_p scale (also when outside [0, 1])
    plw: Optional[float] = None  # lambda = w_p* ** (1/p); None when there is no critical PLW
    peak_link: Optional[float] = None  # fitted link value at the vertex (needs the intercept)
    wp_ci: Optional[tuple] = None  # delta-method CI of w_p* (needs the covariance of a, b)
    plw_ci: Optional[tuple] = None  # the same CI mapped to PLW (clipped to [0, 1])
    message: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def critical_plw(
    a: float,
    b: float,
    *,
    p: float = P_EXP,
    intercept: Optional[float] = None,
    var_a: Optional[float] = None,
    var_b: Optional[float] = None,
    cov_ab: Optional[float] = None,
    conf_level: float = 0.95,
) -> CriticalPLW:
    """Critical PLW of ``a w_p^2 + b w_p (+ intercept)``; see the module docstring.

    With the (co)variances of a and b, a delta-method confidence interval of w_p* is added."""
    a, b = float(a), float(b)
    if not (math.isfinite(a) and math.isfinite(b)):
        return CriticalPLW(False, a, b, message="coefficients are not finite: no critical PLW")
    if a >= 0:
        shape = "convex (a > 0): the fitted curve has a minimum, not a maximum" if a > 0 else "linear (a = 0)"
        best = "PLW = 1" if a + b > 0 else "PLW = 0"
        return CriticalPLW(
            False, a, b, message=f"no critical PLW: the fit is {shape}; of the two ends the fitted curve favours {best}"
        )
    wp = -b / (2.0 * a)
    res = CriticalPLW(False, a, b, wp_star=wp)
    if intercept is not None:
        res.peak_link = float(intercept) - b * b / (4.0 * a)
    if None not in (var_a, var_b, cov_ab):
        g = np.array([b / (2.0 * a * a), -1.0 / (2.0 * a)])  # d wp*/da, d wp*/db
        V = np.array([[var_a, cov_ab], [cov_ab, var_b]], dtype=float)
        var = float(g @ V @ g)
        if math.isfinite(var) and var >= 0:
            from scipy.stats import norm

            z = float(norm.ppf(1 - (1 - conf_level) / 2))
            lo, hi = wp - z * math.sqrt(var), wp + z * math.sqrt(var)
            res.wp_ci = (lo, hi)
            res.plw_ci = (min(max(lo, 0.0), 1.0) ** (1.0 / p), min(max(hi, 0.0), 1.0) ** (1.0 / p))
    if wp < 0:
        res.message = (
            f"no critical PLW in range: the vertex w_p* = {wp:.3f} lies below 0, so the "
            f"fitted curve decreases over [0, 1] (best fitted PLW = 0)"
        )
        return res
    if wp > 1:
        res.message = (
            f"no critical PLW in range: the vertex w_p* = {wp:.3f} lies above 1, so the "
            f"fitted curve increases over [0, 1] (best fitted PLW = 1)"
        )
        return res
    res.exists = True
    res.plw = wp ** (1.0 / p)
    res.message = f"critical PLW lambda = {res.plw:.3f} (w_p* = {wp:.3f})"
    return res
