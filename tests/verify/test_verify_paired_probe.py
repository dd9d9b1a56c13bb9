"""`tandem profile`'s in-cluster prefill ratio is taken in pairs (each prompt through the cluster beside the same
prompt through the engine alone, minute by minute), and the fidelity study's capacity loop counts its window
only once the first wave is in: both against a real split cluster of a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # starts a cluster: gateway + 1 prefill + 2 decode worker processes


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):
    import yaml
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    from services.bench.cluster import running_cluster

    tmp = tmp_path_factory.mktemp("paired")
    ckpt = write_tiny_checkpoint(tmp / "tiny", tiny_config(max_seq_len=1024))
    layout = tmp / "split.yaml"  # ports: running_cluster moves them to free ones
    layout.write_text(yaml.safe_dump({"name": "tiny-split", "model": {"name": "smollm2-135m", "path": str(ckpt)},
                                      "pools": [{"role": "prefill", "count": 1},
                                                {"role": "decode", "count": 2, "batching": {"max_batch": 2}}]}))
    with running_cluster(layout, log_dir=tmp / "logs") as (lay, _):
        yield lay, ckpt


def test_prefill_ratio_rows_are_medians_of_same_minute_pairs(split) -> None:
    from services.bench.profile import EnginePrefill, prefill_ratios
    from services.workers.modelspec import load_model

    lay, ckpt = split
    engine = load_model(str(ckpt), "cpu")
    run = EnginePrefill(engine, 1)
    calls: list[int] = []

    def alone(n: int) -> float:
        calls.append(n)
        return run(n)

    detail: dict = {}
    try:
        rows = prefill_ratios(lay.gateway.grpc, alone, [64, 16, 256, 16], rounds=3, detail=detail)
    finally:
        run.stop()
    # sizes sorted and deduplicated, round robin, a warm-up round dropped: one engine prefill per in-cluster one
    assert calls == [16, 64, 256] * 4
    assert sorted(rows) == ["prefill_ratio@16", "prefill_ratio@256", "prefill_ratio@64"]
    for n in (16, 64, 256):
        pairs = detail["pairs"][n]
        assert len(pairs) == 3 and all(c > 0 and a > 0 for c, a in pairs)
        # the median of the per-pair ratios, not a ratio of medians taken apart
        assert rows[f"prefill_ratio@{n}"] == pytest.approx(float(np.median([c / a for c, a in pairs])))


def test_host_probe_names_each_phases_decode_batches(split) -> None:
    """host_phase_batches@s: the decode batches phase s's streams ran on (the simulator keys the beside-a-
    prefill slowdowns by it)."""
    from services.bench.profile import host_interference

    lay, _ = split
    detail: dict = {}
    rows = host_interference(lay.gateway.grpc, 2, [128], rounds=4, output=400, detail=detail)
    assert detail["phases"], detail["skipped"]
    for s, ph in detail["phases"].items():
        assert rows[f"host_phase_batches@{s}"] == ph["batches"][0]
    assert {k for k in rows if k.startswith("host_phase_batches@")} == \
        {f"host_phase_batches@{s}" for s in detail["phases"]}
    assert not any(k.startswith("prefill_ratio@") for k in rows)  # without an engine-alone prefill: none


def test_capacity_window_opens_once_the_first_wave_is_in(split) -> None:
    from services.bench.cluster import capacity
    from sim.trace import synthetic

    lay, _ = split
    w = synthetic(None, rate=1.0, duration_s=50, seed=0, fixed=(200, 6))
    seconds = 2.0
    cap = capacity(lay, w, seconds)
    assert cap["concurrency"] == 4  # two decode workers of max_batch 2
    assert cap["failed"] == 0 and cap["sent"] >= cap["completed"] > cap["concurrency"]
    # the window starts at the later of seconds / 5 and the first wave's last first token, then lasts `seconds`
    assert seconds / 5 <= cap["ramp_s"] < cap["wall_s"]
    assert cap["wall_s"] >= cap["ramp_s"] + seconds
    assert cap["capacity_rps"] == pytest.approx(cap["in_window"] / seconds)
    assert 0 < cap["in_window"] <= cap["completed"]


def test_step_ratio_by_batch_puts_b_streams_on_every_decode_batch(split) -> None:
    """decode_step_ratio@B on a layout of two decode workers: 2 B streams at once (JSQ spreads them), each gap
    over the engine's step at batch B."""
    from concurrent.futures import ThreadPoolExecutor

    from kit.faults import wait_until

    from services.bench.load import prompt_ids, stream_one
    from services.bench.profile import batch_step_ratios

    lay, _ = split

    def decode_workers_of_a_pair() -> set[str]:
        with ThreadPoolExecutor(2) as pool:
            res = list(pool.map(lambda i: stream_one(lay.gateway.grpc, prompt_ids(8, 90 + i), 2, f"pair-{i}"),
                                range(2)))
        return {r["workers"][-1] for r in res}

    # the precondition the spread needs: the gateway sees both decode workers free (a pair goes to both), not,
    # for a moment, one of them still busy or between two polls after the tests before
    wait_until(lambda: len(decode_workers_of_a_pair()) == 2, 30, "a pair of requests to reach both decode workers")
    detail: dict = {}
    rows = batch_step_ratios(lay.gateway.grpc, lambda b, ctx: 0.01 * b, [1, 2], output=16, prompt=8,
                             decode_workers=2, detail=detail)
    assert [len(detail[b]) for b in (1, 2)] == [2, 4]
    assert set(rows) == {"decode_step_ratio@1", "decode_step_ratio@2"} and all(v > 0 for v in rows.values())
    # every stream was served by a prefill worker and one of the two decode workers
    assert len({ws[-1] for ws in detail[1] + detail[2]}) == 2, detail
