"""The shared layout schema and metric definitions."""

from __future__ import annotations

import numpy as np
import pytest

from services.contracts.errors import InvalidArgument
from services.contracts.layout import Layout, load_layout, parse_layout
from services.contracts.metrics import SLO, RequestRecord, summarize, weighted_percentile


def test_default_layout_is_one_mixed_worker() -> None:
    layout = load_layout(None)
    assert [(p.role, p.count) for p in layout.pools] == [("mixed", 1)]


def test_layout_error_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_layout({"pools": [{"role": "prefill", "count": 1}, {"role": "decode", "count": -2}]})
    assert "pools.1.count" in str(err.value)
    with pytest.raises(InvalidArgument, match="pools.0.role"):
        parse_layout({"pools": [{"role": "oven"}]})
    with pytest.raises(InvalidArgument, match="bogus"):
        parse_layout({"bogus": 1})


def test_prefill_without_decode_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="decode pool"):
        parse_layout({"pools": [{"role": "prefill", "count": 2}]})


def test_layout_file_errors(tmp_path) -> None:
    with pytest.raises(InvalidArgument, match="not found"):
        load_layout(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [\n")
    with pytest.raises(InvalidArgument, match="YAML"):
        load_layout(bad)
    good = tmp_path / "good.yaml"
    good.write_text("name: x\npools:\n  - {role: prefill, count: 1}\n  - {role: decode, count: 2}\n")
    assert isinstance(load_layout(good), Layout)


def test_weighted_percentile_equals_repetition() -> None:
    rng = np.random.default_rng(0)
    values = rng.random(50)
    weights = rng.integers(1, 6, 50)
    expanded = np.repeat(values, weights)
    for q in (1, 50, 90, 99, 100):
        assert weighted_percentile(values, q, weights) == pytest.approx(np.percentile(expanded, q, method="inverted_cdf"))


def test_summarize_records() -> None:
    recs = [
        RequestRecord("a", arrival_s=0.0, prompt_tokens=4, token_times_s=[0.5, 0.6, 0.7]),
        RequestRecord("b", arrival_s=1.0, prompt_tokens=4, token_times_s=[3.0, 3.5]),
        RequestRecord("c", arrival_s=1.0, prompt_tokens=4, dropped=True),
    ]
    out = summarize(recs, slo=SLO(ttft_s=1.0))
    assert out["completed"] == 2 and out["dropped"] == 1
    assert out["ttft_p50_s"] == pytest.approx(0.5)
    assert out["ttft_p99_s"] == pytest.approx(2.0)
    assert out["slo_attainment"] == pytest.approx(1 / 3)
    assert out["tokens_per_s"] == pytest.approx(5 / 3.5)
    assert out["tbt_p99_s"] == pytest.approx(0.5)
