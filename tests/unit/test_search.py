"""fastllama.search: bisection on a stub accuracy with a known threshold, and the summary table."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastllama.search import SearchResult, bisect_max_amount, search_table

pytestmark = pytest.mark.unit


def _step(threshold: float):
    """Accuracy 0.7 up to `threshold`, 0.3 beyond: the search must land just below the threshold."""
    return lambda amount: 0.7 if amount <= threshold else 0.3


@settings(max_examples=50, deadline=None)
@given(threshold=st.floats(0.0, 0.94), tol=st.sampled_from([0.01, 0.02, 0.05]))
def test_bisection_finds_the_threshold_within_tol(threshold, tol):
    amount, acc, probes = bisect_max_amount(_step(threshold), floor=0.5, tol=tol)
    assert amount <= threshold < amount + tol + 1e-9
    assert acc == 0.7
    assert len(probes) <= 3 + 7  # lo, hi, then log2(0.95 / tol) halvings at most


def test_bisection_on_a_smooth_accuracy_curve():
    amount, acc, _ = bisect_max_amount(lambda a: 0.69 - 0.5 * a, floor=0.50, tol=0.001)
    assert abs(amount - 0.38) < 0.001 and acc >= 0.50


def test_parent_below_floor_gives_zero_and_everything_passing_gives_hi():
    assert bisect_max_amount(lambda a: 0.2, floor=0.5)[0] == 0.0
    assert bisect_max_amount(lambda a: 0.9, floor=0.5, hi=0.9)[:2] == (0.9, 0.9)


@pytest.mark.parametrize("lo,hi,tol", [(-0.1, 0.5, 0.01), (0.5, 0.5, 0.01), (0.0, 1.0, 0.01), (0.0, 0.5, 0.0)])
def test_bad_ranges_are_rejected(lo, hi, tol):
    with pytest.raises(ValueError, match="lo|tol"):
        bisect_max_amount(lambda a: 1.0, floor=0.5, lo=lo, hi=hi, tol=tol)


def test_search_table_is_quant_by_dim():
    rows = [SearchResult("gptq4", "input", 0.5, 0.62, 0.10, 0.53), SearchResult("gptq8", "input", 0.5, 0.62, 0.35, 0.52),
            SearchResult("gptq4", "output", 0.5, 0.62, 0.01, 0.55)]
    table = search_table(rows).splitlines()
    assert table[0] == "| quantization | max input pruning (acc) | max output pruning (acc) |"
    assert table[2] == "| gptq4 | 10.0% (53.0%) | 1.0% (55.0%) |"
    assert table[3] == "| gptq8 | 35.0% (52.0%) | — |"
