"""Critical PLW (pure Python) and the w_p transform."""

from __future__ import annotations

import math

import pytest

from pipeline.analysis.common import P_EXP, to_wp
from pipeline.analysis.critical import critical_plw


def test_paper_alpacadatashort_critical_plw():
    # Table 3 / section 5.2: a = -4.284, b = 5.590, intercept -1.043 -> w_p* = 0.652, lambda = 0.242
    c = critical_plw(-4.284, 5.590, intercept=-1.043)
    assert c.exists
    assert round(c.wp_star, 3) == 0.652
    assert round(c.plw, 3) == 0.242
    # the paper's vertex form: score = -4.284 (w_p - 0.652)^2 + 0.781
    assert round(c.peak_link, 3) == 0.781


def test_transform_maps_one_tenth_to_one_half():
    assert P_EXP == pytest.approx(math.log10(2), abs=1e-5)
    assert to_wp(0.1) == pytest.approx(0.5, abs=1e-5)
    assert to_wp(0.0) == 0.0 and to_wp(1.0) == 1.0
    with pytest.raises(ValueError):
        to_wp(-0.1)


@pytest.mark.parametrize("a,b", [(0.5, 1.0), (0.0, 1.0), (2.0, -3.0)])
def test_no_critical_plw_without_a_maximum(a, b):
    c = critical_plw(a, b)
    assert not c.exists and c.plw is None and c.wp_star is None
    assert "no critical PLW" in c.message


def test_vertex_outside_the_unit_interval_is_reported():
    below = critical_plw(-1.0, -1.0)  # vertex at -0.5
    assert not below.exists and below.plw is None
    assert below.wp_star == pytest.approx(-0.5)
    assert "below 0" in below.message and "PLW = 0" in below.message
    above = critical_plw(-1.0, 3.0)  # vertex at 1.5
    assert not above.exists and above.wp_star == pytest.approx(1.5)
    assert "above 1" in above.message and "PLW = 1" in above.message


def test_delta_method_interval_brackets_the_vertex():
    c = critical_plw(-4.284, 5.590, var_a=0.25, var_b=0.25, cov_ab=-0.2)
    lo, hi = c.wp_ci
    assert lo < c.wp_star < hi
    assert c.plw_ci[0] <= c.plw <= c.plw_ci[1]
    # a more precise fit gives a narrower interval
    c2 = critical_plw(-4.284, 5.590, var_a=0.01, var_b=0.01, cov_ab=-0.008)
    assert (c2.wp_ci[1] - c2.wp_ci[0]) < (hi - lo)
