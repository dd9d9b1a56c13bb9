"""What the H200 runs rest on, checked on the CPU: random weights of a named shape and a dtype, the gateway's
tokenizer for them, the profile's plan by device, its decode cells back to back (CUDA) or round robin, a KV push
in bf16, and the simulator's in-cluster decode ratio by batch size."""

from __future__ import annotations

import pytest

from services.bench.profile import Plan, decode_rows, kv_rows
from services.contracts.errors import InvalidArgument
from services.workers.modelspec import load_model, random_config
from sim import catalog
from sim.perf import PerfModel, ProfileTable


def test_random_shapes_by_name_and_dtype() -> None:
    cfg = random_config("random:llama-3.2-1b")
    assert (cfg["vocab_size"], cfg["dim"], cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"]) == (128256, 2048, 16, 32, 8)
    assert random_config("random:tiny")["vocab_size"] == 256  # the workers' test model, not fusion's "tiny" shape
    spec = catalog.MODELS["llama-3.2-1b"]  # the simulator's entry of the same shape
    assert spec.kv_bytes_per_token == 2 * 16 * 8 * 64 * 2 == 32768
    assert load_model("random:tiny", "cpu", "bfloat16").dtype.__repr__() == "torch.bfloat16"
    assert load_model('random:{"vocab_size": 64, "dim": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, '
                      '"hidden_dim": 32, "dtype": "bfloat16"}', "cpu", "float32").dtype.__repr__() == "torch.float32"
    with pytest.raises(InvalidArgument) as err:
        load_model("random:llama-9b")
    assert err.value.param == "model" and "random:llama-3.2-1b" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        load_model("random:tiny", dtype="fp8")
    assert err.value.param == "dtype"


def test_the_gateway_serves_random_weights_by_token_ids() -> None:
    from services.gateway.tokenizer import IdsOnly, load_tokenizer

    tok = load_tokenizer("random:llama-3.2-1b")
    assert isinstance(tok, IdsOnly) and tok.vocab_size == 128256
    assert tok.stream().push(17) == "" and tok.decode([1, 2]) == ""
    with pytest.raises(InvalidArgument) as err:
        tok.encode("hello")
    assert err.value.param == "prompt" and "send token ids" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        tok.encode_chat([{"role": "user", "content": "hi"}])
    assert err.value.param == "messages"


def test_the_plan_follows_the_device() -> None:
    gpu, cpu = Plan.for_device("cuda"), Plan.for_device("cpu")
    assert max(gpu.prompt_sizes) == max(gpu.contexts) == 4096 and max(gpu.decode_batches) == 32
    assert set(gpu.cluster_batches) <= set(gpu.decode_batches)
    assert set(Plan.gpu(quick=True).cluster_batches) <= set(Plan.gpu(quick=True).decode_batches)
    assert cpu == Plan() and Plan.for_device("cpu", quick=True) == Plan.quick() and not Plan.quick().cluster_batches
    # the CPU measures the in-cluster step by batch too (per-stream work in the worker and gateway grows with it)
    assert set(cpu.cluster_batches) <= set(cpu.decode_batches)


@pytest.mark.parametrize("sequential", [True, False])
def test_decode_cells_back_to_back_or_round_robin(sequential: bool) -> None:
    engine = load_model("random:tiny", "cpu")
    plan = Plan(decode_batches=[1, 3], contexts=[8, 40], steps=2)
    seen: list[str] = []
    rows = decode_rows(engine, plan, seen.append, sequential=sequential)
    assert sorted((b, c) for b, c, _ in rows) == [(1, 8), (1, 40), (3, 8), (3, 40)]
    assert all(s > 0 for _, _, s in rows) and len(seen) == 4


@pytest.mark.slow  # pushes to a decode worker process
def test_kv_push_rows_in_bfloat16() -> None:
    """A GPU engine's KV is bf16: the pushed layers and the receiver's model must say so (before, the layers were
    float32 and the receiver took its device's default dtype: the push was refused)."""
    engine = load_model("random:tiny", "cpu", "bfloat16")
    rows = kv_rows(engine, Plan(kv_tokens=[16, 64], repeats=1), lambda _m: None)
    per_token = 2 * engine.cfg.n_layers * engine.cfg.n_kv_heads * engine.cfg.head_dim * 2
    assert [b for b, _ in rows] == [16 * per_token, 64 * per_token]


def test_sim_interpolates_the_in_cluster_ratio_by_batch() -> None:
    hw, spec = catalog.HARDWARE["h200x1"], catalog.MODELS["llama-3.2-1b"]

    def table(**ovh: float) -> ProfileTable:
        return ProfileTable([1.0, 100.0], [0.01, 0.02], [1.0, 32.0], [0.001, 0.002], overheads=ovh)

    plain = PerfModel(hw, spec, profile=table(decode_step_ratio=1.5))
    by_b = PerfModel(hw, spec, profile=table(**{"decode_step_ratio": 1.5, "decode_step_ratio@1": 1.0,
                                                 "decode_step_ratio@32": 4.0}))
    assert plain.decode(1)[0] == pytest.approx(0.0015) and plain.decode(32)[0] == pytest.approx(0.003)
    assert by_b.decode(1)[0] == pytest.approx(0.001) and by_b.decode(32)[0] == pytest.approx(0.008)
    # between the measured sizes linear in b; beyond them the last ratio holds
    assert by_b.decode(16)[0] == pytest.approx((0.001 + 0.001 * 15 / 31) * (1 + 3 * 15 / 31))
    assert by_b.decode(64)[0] == pytest.approx(4.0 * PerfModel(hw, spec, profile=table()).decode(64)[0])
