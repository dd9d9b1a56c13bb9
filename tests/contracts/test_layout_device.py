"""`pools[].device` (where `tandem up` runs a pool's workers) and `model.dtype`: what the loader accepts, and the
errors for what it does not, each naming the field."""

from __future__ import annotations

import pytest

from services.contracts.errors import InvalidArgument
from services.contracts.layout import load_layout, parse_device, parse_layout


def _pools(*pools: dict) -> dict:
    return {"pools": list(pools)}


def test_devices_are_normalised_and_one_per_instance() -> None:
    lay = parse_layout(_pools({"role": "prefill", "device": " CUDA:0 "},
                              {"role": "decode", "count": 3, "device": ["cuda:1", "cpu", "cuda"]}))
    assert lay.pools[0].device == "cuda:0"
    assert lay.pools[1].device == ["cuda:1", "cpu", "cuda"]
    assert [lay.pools[1].device_of(i) for i in range(3)] == ["cuda:1", "cpu", "cuda"]
    assert lay.pools[0].device_of(5) == "cuda:0"  # one device for every instance
    assert parse_layout({}).pools[0].device is None  # none: the worker picks (CUDA when available)
    assert parse_device("cuda:12") == ("cuda", 12) and parse_device("cpu") == ("cpu", None)


def test_instances_are_numbered_across_a_roles_pools() -> None:
    lay = parse_layout(_pools({"role": "prefill"}, {"role": "decode", "count": 2, "hardware": "dgx-a100"},
                              {"role": "decode", "count": 0}, {"role": "decode", "count": 1, "hardware": "h200"}))
    assert lay.instance("decode", 1)[0::2] == (1, 1)
    assert lay.instance("decode", 2)[0::2] == (3, 0)  # the empty pool is skipped, as `tandem up` skips it
    assert lay.instance("decode", 3) is None and lay.instance("mixed", 0) is None


@pytest.mark.parametrize(("pool", "field", "words"), [
    ({"role": "mixed", "device": "gpu1"}, "pools.0.device", ["'cpu', 'cuda' or 'cuda:N'", "gpu1"]),
    ({"role": "mixed", "device": "cuda:-1"}, "pools.0.device", ["cuda:-1"]),
    ({"role": "mixed", "device": "cuda:"}, "pools.0.device", ["'cuda:'"]),
    ({"role": "mixed", "count": 2, "device": ["cuda:0"]}, "pools.0.device", ["one device per instance", "count is 2"]),
    ({"role": "mixed", "count": 2, "device": ["cuda:0", "tpu"]}, "pools.0.device", ["tpu"]),
    ({"role": "dlm", "device": "cuda:0"}, "pools.0.device", ["dlm service runs on the CPU"]),
])
def test_a_bad_device_is_an_error_naming_the_field(pool: dict, field: str, words: list[str]) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_layout(_pools(pool))
    assert err.value.param == field
    for w in words:
        assert w in str(err.value)
    assert str(err.value).count(field) == 1


def test_model_dtype_and_a_random_shape_from_yaml(tmp_path) -> None:
    path = tmp_path / "layout.yaml"
    path.write_text('model: {name: llama-3.2-1b, path: "random:llama-3.2-1b", dtype: bfloat16}\n'
                    'pools:\n  - {role: mixed, hardware: h200x1, device: "cuda:1"}\n')
    lay = load_layout(path)
    assert (lay.model.path, lay.model.dtype, lay.pools[0].device) == ("random:llama-3.2-1b", "bfloat16", "cuda:1")
    path.write_text("model: {dtype: fp8}\n")
    with pytest.raises(InvalidArgument) as err:
        load_layout(path)
    assert err.value.param == "model.dtype" and "bfloat16" in str(err.value)
