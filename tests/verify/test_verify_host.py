"""Workers that share a machine slow one another (`tandem profile`'s host probe: host_* and decode_join_stall_s
rows): the simulator applies the measured slowdowns only while the other kind of work runs on the same host, and
a profile without those rows simulates exactly as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.contracts.layout import parse_layout
from sim.cluster import perf_for, simulate
from sim.trace import synthetic

STEP_S = 0.010  # decode step at batch 1 (one context: no context term); 20 ms at batch 4
PREFILL_64_S = 0.060
HOST = {"host_prefill_slowdown@1": 2.0, "host_decode_slowdown_prefill@1": 1.5}


def _table(tmp_path: Path, overheads: dict[str, float], name: str = "t.csv") -> Path:
    rows = ["model,hardware,kind,prompt_size,batch_size,token_size,prompt_time,token_time,name,value",
            "smollm2-135m,cpu,prompt,16,1,,20,,,", f"smollm2-135m,cpu,prompt,64,1,,{PREFILL_64_S * 1e3},,,",
            f"smollm2-135m,cpu,token,,1,16,,{STEP_S * 1e3},,", "smollm2-135m,cpu,token,,4,16,,20,,"]
    rows += [f"smollm2-135m,cpu,overhead,,,,,,{k},{v}" for k, v in overheads.items()]
    path = tmp_path / name
    path.write_text("\n".join(rows) + "\n")
    return path


def _split(table: Path, hosts: tuple[str, str] = ("127.0.0.1", "127.0.0.1")):
    return parse_layout({"model": {"name": "smollm2-135m"},
                         "pools": [{"role": "prefill", "hardware": "cpu", "host": hosts[0]},
                                   {"role": "decode", "hardware": "cpu", "host": hosts[1]}],
                         "sim": {"perf_model": str(table)}})


def _two_requests():
    """Request 0 decodes 100 tokens alone; request 1's 64-token prompt arrives while it does."""
    w = synthetic(None, rate=1.0, duration_s=10, seed=0, fixed=(16, 101))
    w.arrival_s, w.prompt, w.output = np.array([0.0, 0.3]), np.array([16, 64]), np.array([101, 2])
    return w


def test_a_prefill_and_a_decode_on_one_host_slow_each_other_by_the_measured_factors(tmp_path: Path) -> None:
    shared = simulate(_split(_table(tmp_path, HOST)), _two_requests()).reqs
    apart = simulate(_split(_table(tmp_path, HOST), ("10.0.0.1", "10.0.0.2")), _two_requests()).reqs
    plain = simulate(_split(_table(tmp_path, {}, "plain.csv")), _two_requests()).reqs
    # separate hosts: nothing slows anything, exactly as a table without the rows
    for col in ("first_tok", "finish", "first_gap"):
        np.testing.assert_array_equal(getattr(apart, col), getattr(plain, col))
    ttft = lambda r, i: r.first_tok[i] - r.arrival[i]  # noqa: E731
    assert ttft(apart, 1) == pytest.approx(PREFILL_64_S, rel=1e-9)
    # one host: request 1's prefill started while request 0's decode batch ran (k = 1): 2x
    assert ttft(shared, 1) == pytest.approx(2 * PREFILL_64_S, rel=1e-9)
    # ... and request 0's steps ran 1.5x during those 0.12 s: 8 steps instead of 12, 4 steps (40 ms) later,
    # give or take the step in flight when the prefill started and ended
    late = shared.finish[0] - apart.finish[0]
    assert 0.03 < late < 0.05, late
    # request 0's prefill ran with no decode batch anywhere: as profiled
    assert ttft(shared, 0) == pytest.approx(ttft(apart, 0), rel=1e-12)


def test_host_rows_take_over_from_the_mixed_side_by_side_rows(tmp_path: Path) -> None:
    """A mixed worker's prefill lane and decode half are one host: its host rows (measured through the cluster)
    replace the in-process side-by-side slowdowns, and are not applied on top of them."""
    mixed = {"concurrent_phases": 1.0, "mixed_prefill_slowdown": 3.0, "mixed_decode_slowdown": 1.2}
    lay = lambda t: parse_layout({"model": {"name": "smollm2-135m"},  # noqa: E731
                                  "pools": [{"role": "mixed", "hardware": "cpu"}], "sim": {"perf_model": str(t)}})
    old = simulate(lay(_table(tmp_path, mixed, "old.csv")), _two_requests()).reqs
    new = simulate(lay(_table(tmp_path, {**mixed, **HOST}, "new.csv")), _two_requests()).reqs
    assert old.first_tok[1] - old.arrival[1] == pytest.approx(3 * PREFILL_64_S, rel=1e-9)
    assert new.first_tok[1] - new.arrival[1] == pytest.approx(2 * PREFILL_64_S, rel=1e-9)


def test_slowdowns_by_batches_streams_and_a_prefill_beside(tmp_path: Path) -> None:
    t = _table(tmp_path, {"host_decode_slowdown@2": 1.25, "host_decode_slowdown_prefill@1": 1.5,
                          "host_decode_slowdown_prefill@8": 2.2, "host_prefill_slowdown@1": 1.1,
                          "host_prefill_slowdown@2": 1.7, "host_prefill_slowdown@8": 2.9})
    perf = perf_for(_split(t), "cpu")
    assert perf.shares_host
    assert perf.host_decode_slowdown(1, 1, False) == 1.0  # alone: the profiled step (decode_step_ratio's level)
    assert perf.host_decode_slowdown(2, 2, False) == 1.25
    assert perf.host_decode_slowdown(5, 9, False) == 1.25  # past the measured end: the largest k's
    assert perf.host_decode_slowdown(1, 1, True) == 1.5
    assert perf.host_decode_slowdown(2, 8, True) == pytest.approx(1.25 * 2.2)  # another batch, and a prefill
    assert perf.host_decode_slowdown(1, 4, True) == pytest.approx(1.5 + 0.7 * 3 / 7)  # between 1 and 8 streams
    assert [perf.host_prefill_slowdown(s) for s in (0, 1, 2, 5, 8, 12)] == pytest.approx([1.0, 1.1, 1.7, 2.3, 2.9, 2.9])
    assert not perf_for(_split(_table(tmp_path, {}, "plain.csv")), "cpu").shares_host


def test_a_prefill_is_slowed_by_the_requests_decoding_on_its_host(tmp_path: Path) -> None:
    """Four requests decode on the decode worker when a prompt arrives: its prefill takes the 4-stream factor."""
    t = _table(tmp_path, {"host_prefill_slowdown@1": 1.5, "host_prefill_slowdown@4": 3.0})
    w = synthetic(None, rate=1.0, duration_s=10, seed=0, fixed=(16, 101))
    w.arrival_s, w.prompt, w.output = np.array([0.0, 0.0, 0.0, 0.0, 2.0]), np.array([16] * 4 + [64]), \
        np.array([201] * 4 + [2])
    r = simulate(_split(t), w).reqs
    assert r.first_tok[4] - r.arrival[4] == pytest.approx(3.0 * PREFILL_64_S, rel=1e-9)


def test_prefill_ratio_by_prompt_size_is_interpolated(tmp_path: Path) -> None:
    t = _table(tmp_path, {"prefill_ratio": 1.1, "prefill_ratio@16": 1.0, "prefill_ratio@64": 2.0})
    perf = perf_for(_split(t), "cpu")
    assert perf.prefill(16)[0] == pytest.approx(0.020)
    assert perf.prefill(64)[0] == pytest.approx(2 * PREFILL_64_S)
    assert perf.prefill(40)[0] == pytest.approx(0.040 * 1.5)  # halfway in tokens, halfway in ratio
    # past the last size: the table's time (extrapolated linearly) times the last ratio
    assert perf.prefill(128)[0] == pytest.approx(2 * (PREFILL_64_S + (PREFILL_64_S - 0.020) / 48 * 64))


def test_a_join_lengthens_its_step_for_the_members_already_there(tmp_path: Path) -> None:
    """decode_join_stall_s: the iteration a request joins a running batch in is that much longer for the members
    already in it; the joiner's own first gap stays decode_join_s + a step (as lone requests measure it)."""
    base = {"decode_join_s": 0.008}
    stall = simulate(_split(_table(tmp_path, {**base, "decode_join_stall_s": 0.005}, "s.csv")), _two_requests())
    plain = simulate(_split(_table(tmp_path, base, "p.csv")), _two_requests())
    step2 = STEP_S + (0.020 - STEP_S) / 3  # batch 2, between the table's batch 1 and batch 4
    gaps = lambda run: np.asarray(run.tally.gap_values)  # noqa: E731
    assert np.any(np.isclose(gaps(stall), step2 + 0.005, rtol=0, atol=1e-12))
    assert not np.any(np.isclose(gaps(plain), step2 + 0.005, rtol=0, atol=1e-9))
    assert stall.reqs.first_gap[1] == pytest.approx(plain.reqs.first_gap[1], rel=1e-9)
    # request 0 (in the batch when request 1 joined) finishes 5 ms later than without the stall
    assert stall.reqs.finish[0] - plain.reqs.finish[0] == pytest.approx(0.005, abs=1e-9)
    # a request joining an idle worker stalls nobody: request 0 alone is as without the row
    assert stall.reqs.first_gap[0] == plain.reqs.first_gap[0]


@pytest.mark.slow  # starts a cluster: gateway + 1 prefill + 2 decode worker processes of a tiny checkpoint
def test_host_probe_measures_through_a_real_split_cluster(tmp_path: Path) -> None:
    import yaml
    from kit.checkpoints import tiny_config, write_tiny_checkpoint

    from services.bench.cluster import running_cluster
    from services.bench.profile import host_interference
    from services.bench.verify_cli import decode_batches

    ckpt = write_tiny_checkpoint(tmp_path / "tiny", tiny_config(max_seq_len=4096))
    layout = tmp_path / "split.yaml"  # ports: running_cluster moves them to free ones
    layout.write_text(yaml.safe_dump({"name": "tiny-split", "model": {"name": "smollm2-135m", "path": str(ckpt)},
                                      "pools": [{"role": "prefill", "count": 1}, {"role": "decode", "count": 2}]}))
    detail: dict = {}  # (2000-token streams: the tiny model's steps take a millisecond or two, and a phase ends
    # with them: 500 let a phase end after one prompt on a busy machine, with no quiet gap left to measure)
    with running_cluster(layout, log_dir=tmp_path / "logs") as (lay, _):
        assert decode_batches(lay) == 2
        rows = host_interference(lay.gateway.grpc, decode_batches(lay), [128, 256], rounds=6, output=2000,
                                 detail=detail, prefill_s=lambda n: 0.001 * n, streams=4)
    # the alone prefills (the worker's own time) over the given engine-alone time, per size
    for n in (128, 256):
        assert len(detail["alone"][n]) == 2 and all(s > 0 for s in detail["alone"][n])
        assert rows[f"prefill_ratio@{n}"] == pytest.approx(np.median(detail["alone"][n]) / (0.001 * n))
    # 1 stream on one decode batch, 2 (or 3, where the gateway's load view stacked two) on both, then 4 (or 5)
    # over both (keyed by the streams that decoded); prompts beside each
    phases = detail["phases"]
    assert len(phases) == 3 and min(phases) == 1 and 2 <= sorted(phases)[1] <= 3 <= 4 <= max(phases) <= 6, \
        (sorted(phases), detail["skipped"])
    assert [phases[s]["batches"] for s in sorted(phases)] == [[1], [2], [2]]
    for s, ph in phases.items():
        assert ph["prefill_ratio"] and len(ph["quiet"]) >= 5
        assert rows[f"host_prefill_slowdown@{s}"] == pytest.approx(max(1.0, np.median(ph["prefill_ratio"])))
    for key, v in rows.items():
        assert np.isfinite(v) and v >= 0, key
    for s, ph in phases.items():  # the covered gaps' spread over the quiet median, wherever the median row is
        q = [rows.get(f"host_covered_q{lv:04d}@{s}") for lv in (0, 500, 1000)]
        assert (q[0] is not None) == (f"host_decode_slowdown_prefill@{s}" in rows), (s, sorted(rows))
        if q[0] is not None:
            assert q[0] <= q[1] <= q[2] and q[2] == pytest.approx(max(ph["covered"]) / np.median(ph["quiet"]))
    if 2 in phases:  # one stream on each batch: its quiet gaps over phase 1's, the second batch beside the first
        assert rows["host_decode_slowdown@2"] == pytest.approx(max(1.0, np.median(phases[2]["quiet"])
                                                                    / np.median(phases[1]["quiet"])))
    else:
        assert "host_decode_slowdown@2" not in rows
    # (the tiny model's steps take a millisecond or two, so whether a prompt's prefill covers half a gap, or its
    # join lands in one the client saw apart from its neighbours, is up to chance: those rows may be absent)


def test_a_padded_prefill_batch_costs_its_longest_prompt_times_its_size(tmp_path: Path) -> None:
    """prefill_padded (our engine pads a batch to its longest prompt): prompts of 16 and 64 tokens prefilled
    together cost what two 64-token prompts cost (the table's 128 tokens), not 80 tokens' worth."""
    def run(rows: dict[str, float]):
        lay = parse_layout({"model": {"name": "smollm2-135m"}, "pools": [{"role": "mixed", "hardware": "cpu"}],
                            "sim": {"perf_model": str(_table(tmp_path, rows, f"p{len(rows)}.csv"))}})
        w = synthetic(None, rate=1.0, duration_s=10, seed=0, fixed=(16, 2))
        # request 0 keeps the worker busy; 1 and 2 queue behind it and are prefilled together
        w.arrival_s, w.prompt, w.output = np.array([0.0, 0.01, 0.02]), np.array([64, 16, 64]), np.array([1, 2, 2])
        return simulate(lay, w).reqs
    padded, summed = run({"prefill_padded": 1.0}), run({})
    start = PREFILL_64_S  # request 0's prefill ends; the batch of 1 and 2 starts
    per_token = (PREFILL_64_S - 0.020) / 48  # the table's slope past 64 tokens
    assert padded.first_tok[1] == pytest.approx(start + PREFILL_64_S + 64 * per_token, rel=1e-9)
    assert summed.first_tok[1] == pytest.approx(start + PREFILL_64_S + 16 * per_token, rel=1e-9)
    assert padded.first_tok[2] == padded.first_tok[1]


def test_beside_a_prefill_slowdowns_follow_the_hosts_busy_batches(tmp_path: Path) -> None:
    """host_phase_batches@s: each probe phase's decode batches. With them, a prefill beside one batch of two
    requests takes the one-batch phase's factor (one more busy process on the cores), not the two-stream phase's
    (which ran on two batches); without them, the rows are read by streams alone, as before."""
    rows = {"host_prefill_slowdown@1": 1.5, "host_prefill_slowdown@2": 3.0, "host_prefill_slowdown@8": 4.0,
            "host_decode_slowdown@2": 1.2, "host_decode_slowdown_prefill@1": 1.1,
            "host_decode_slowdown_prefill@2": 2.0, "host_decode_slowdown_prefill@8": 2.5}
    phases = {"host_phase_batches@1": 1.0, "host_phase_batches@2": 2.0, "host_phase_batches@8": 2.0}
    old = perf_for(_split(_table(tmp_path, rows, "old.csv")), "cpu")
    new = perf_for(_split(_table(tmp_path, {**rows, **phases}, "new.csv")), "cpu")
    assert old.host_prefill_slowdown(2, 1) == 3.0 and new.host_prefill_slowdown(2, 1) == 1.5
    assert old.host_prefill_slowdown(2, 2) == new.host_prefill_slowdown(2, 2) == 3.0
    assert new.host_prefill_slowdown(5, 2) == pytest.approx(3.5)  # two batches: between their 2 and 8 streams
    assert new.host_prefill_slowdown(5, 3) == pytest.approx(3.5)  # three: the nearest measured count's
    assert new.host_prefill_slowdown(0, 0) == 1.0
    assert old.host_decode_slowdown(1, 2, True) == 2.0 and new.host_decode_slowdown(1, 2, True) == 1.1
    assert new.host_decode_slowdown(2, 8, True) == pytest.approx(1.2 * 2.5)
    # a whole run: four requests decode on the one decode worker when a prompt arrives
    w = synthetic(None, rate=1.0, duration_s=10, seed=0, fixed=(16, 101))
    w.arrival_s, w.prompt, w.output = np.array([0.0, 0.0, 0.0, 0.0, 2.0]), np.array([16] * 4 + [64]), \
        np.array([201] * 4 + [2])
    ttft = {name: simulate(_split(_table(tmp_path, t, f"{name}.csv")), w).reqs
            for name, t in (("old", rows), ("new", {**rows, **phases}))}
    assert ttft["old"].first_tok[4] - w.arrival_s[4] == pytest.approx((3.0 + 1 / 3) * PREFILL_64_S, rel=1e-9)
    assert ttft["new"].first_tok[4] - w.arrival_s[4] == pytest.approx(1.5 * PREFILL_64_S, rel=1e-9)


def test_a_prefill_follows_its_hosts_decode_batches_as_they_stop(tmp_path: Path) -> None:
    """With host_phase_batches rows, a running prefill is charged the slowdown only while a decode batch runs
    beside it: here the mixed worker's decode half finishes request 0 a third of the way into request 1's
    slowed prefill, which then runs its last two thirds at full speed; without the rows, slowed to its end."""
    rows = {"concurrent_phases": 1.0, "host_prefill_slowdown@1": 2.0}
    lay = lambda t: parse_layout({"model": {"name": "smollm2-135m"},  # noqa: E731
                                  "pools": [{"role": "mixed", "hardware": "cpu"}], "sim": {"perf_model": str(t)}})
    w = synthetic(None, rate=1.0, duration_s=10, seed=0, fixed=(16, 6))
    # request 0: prefill 20 ms, then 5 steps of 10 ms (until 70 ms); request 1's 64-token prompt arrives at 30 ms
    w.arrival_s, w.prompt, w.output = np.array([0.0, 0.03]), np.array([16, 64]), np.array([6, 2])
    old = simulate(lay(_table(tmp_path, rows, "old.csv")), w).reqs
    new = simulate(lay(_table(tmp_path, {**rows, "host_phase_batches@1": 1.0}, "new.csv")), w).reqs
    assert old.finish[0] == new.finish[0] == pytest.approx(0.07, rel=1e-9)
    assert old.first_tok[1] - 0.03 == pytest.approx(2 * PREFILL_64_S, rel=1e-9)
    # 40 ms at half speed (a third of the work), then 40 ms alone
    assert new.first_tok[1] - 0.03 == pytest.approx(PREFILL_64_S / 3 * 2 + PREFILL_64_S * 2 / 3, rel=1e-9)


def test_a_step_beside_a_prefill_draws_its_factor_from_the_measured_spread(tmp_path: Path) -> None:
    """host_covered_q<per mille>@s (with the step's own spread, step_jitter_q): a decode step beside a prefill on
    its host takes a factor drawn from the probe's distribution of covered gaps over quiet ones, not the median
    host_decode_slowdown_prefill, so the TBT tail beside prefills reaches the measured one; seeded (the same run
    twice is the same), and a table without those rows keeps the median factor."""
    flat = {f"step_jitter_q{lv:04d}": 1.0 for lv in (0, 500, 1000)}  # no spread of its own: only the draws vary
    covered = {"host_covered_q0000@1": 1.0, "host_covered_q0500@1": 1.5, "host_covered_q0900@1": 3.0,
               "host_covered_q1000@1": 5.0}
    w = synthetic(None, rate=1.0, duration_s=10, seed=0, fixed=(16, 101))
    arrivals = [0.0] + [0.2 + 0.25 * i for i in range(30)]  # a prompt every 250 ms beside request 0's 600 steps
    w.arrival_s = np.array(arrivals)
    w.prompt, w.output = np.array([16] + [64] * 30), np.array([601] + [2] * 30)
    runs = {name: simulate(_split(_table(tmp_path, t, f"{name}.csv")), w, seed=3)
            for name, t in (("median", {**HOST, **flat}), ("drawn", {**HOST, **flat, **covered}),
                            ("again", {**HOST, **flat, **covered}))}
    gaps = {k: np.asarray(r.tally.gap_values) for k, r in runs.items()}
    np.testing.assert_array_equal(gaps["drawn"], gaps["again"])
    beside = {k: g[g > STEP_S * 1.01] for k, g in gaps.items()}  # the steps a prefill slowed
    # the median factor, 1.5, at most (less for a step that a prefill's start or end cut in two)
    m = beside["median"] / STEP_S
    assert m.max() <= 1.5 + 1e-9 and np.mean(np.isclose(m, 1.5)) > 0.5
    b = beside["drawn"] / STEP_S
    assert len(b) > 20 and b.max() > 3.0 and b.max() <= 5.0 + 1e-9  # the measured tail, not past its top
    assert np.mean(b > 1.6) > 0.25  # about half the draws lie above the median (1.5), where the median run has none
    with pytest.raises(Exception, match="host_covered_q"):
        simulate(_split(_table(tmp_path, {**HOST, **flat, "host_covered_q0500@1": 1.5}, "bad.csv")), w)
