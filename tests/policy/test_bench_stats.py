"""The one Wilson interval the dlm and policy benchmarks share (services.bench.stats)."""

import pytest

from services.bench.stats import wilson


def test_wilson_known_value() -> None:
    # 8 of 10 at 95%: the textbook Wilson interval is [0.490, 0.943]
    assert wilson(8, 10) == pytest.approx((0.49015684672, 0.94331905202))
    lo, hi = wilson(50, 100)
    assert (lo, hi) == pytest.approx((0.40383, 0.59617), abs=1e-5) and (lo + hi) / 2 == pytest.approx(0.5)


def test_wilson_at_the_edges() -> None:
    assert wilson(0, 0) == (0.0, 1.0)  # no trials: no evidence, the whole range
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson(3, 2)
