"""Property: under random arrivals, lengths, cancels and budgets, every policy reproduces each request's solo
greedy tokens, the slot <-> request mapping survives every reordering, and the KV budget always holds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.batching import MODES, NO_TOKEN, DecodeRequest, FusionScheduler
from services.batching.request import reserved_tokens
from services.bench.fusion_reference import prefill, solo_decode
from services.contracts.errors import ResourceExhausted
from services.engine import ModelConfig, random_engine
from services.engine.sampling import SamplingParams

CFG = ModelConfig(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32,
                  eos_ids=(5,))
POOL = 8  # distinct prompts; a drawn request picks one and its own max_tokens
MAX_NEW = 14


@pytest.fixture(scope="module")
def pool():
    engine = random_engine(CFG, seed=7)
    items = []
    for i in range(POOL):
        g = torch.Generator().manual_seed(i)
        prompt = torch.randint(6, CFG.vocab_size, (2 + 3 * i,), generator=g).tolist()  # 2..23 tokens
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0)
        kv, first = prefill(engine, prompt, params)
        items.append((kv, first, solo_decode(engine, kv, first, params)))
    return engine, items


request_st = st.tuples(
    st.integers(0, POOL - 1),  # which prompt
    st.integers(1, MAX_NEW),  # max_tokens
    st.integers(0, 12),  # arrival step
    st.one_of(st.none(), st.integers(0, 20)),  # cancel step
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from(MODES), max_batch=st.integers(1, 5), budget_tokens=st.integers(8, 80),
       requests=st.lists(request_st, min_size=1, max_size=9))
def test_fused_tokens_equal_solo_under_random_orders(pool, policy, max_batch, budget_tokens, requests) -> None:
    engine, items = pool
    per_token = CFG.kv_bytes_per_token(4)
    s = FusionScheduler(engine, mode=policy, max_batch=max_batch, kv_budget_bytes=budget_tokens * per_token,
                        initial_capacity=4)
    got: dict[str, list[int]] = {}
    reason: dict[str, str] = {}
    meta: dict[str, tuple[int, int]] = {}  # id -> (pool index, max_tokens)

    def sink(rid: str):
        def emit(token: int, why: str | None) -> None:
            assert rid not in reason, f"{rid} emitted after its end"
            if token != NO_TOKEN:
                got[rid].append(token)
            if why is not None:
                reason[rid] = why
        return emit

    def check_mapping() -> None:
        s.batch.check()  # dense rows, lengths, ledger, budget
        for slot, row in enumerate(s.batch.rows):
            k_want = torch.stack([k for k, _ in row.req.prompt_kv])
            v_want = torch.stack([v for _, v in row.req.prompt_kv])
            n = row.req.prompt_len
            assert torch.equal(s.batch.kv.k[:, slot, :n], k_want), f"slot {slot} holds another request's keys"
            assert torch.equal(s.batch.kv.v[:, slot, :n], v_want), f"slot {slot} holds another request's values"

    evict = s.batch.evict

    def checked_evict(slots: list[int]) -> None:
        evict(slots)
        check_mapping()  # after every reordering, not just every step

    s.batch.evict = checked_evict

    accepted = []
    for t in range(200):
        for i, (idx, max_tokens, arrive, cancel_at) in enumerate(requests):
            rid = f"r{i}"
            if arrive == t:
                kv, first, _ = items[idx]
                req = DecodeRequest(rid, kv, first, SamplingParams(max_tokens=max_tokens, temperature=0), sink(rid))
                need = reserved_tokens(req.prompt_len, max_tokens, CFG.max_seq_len)
                if need > budget_tokens:
                    with pytest.raises(ResourceExhausted):
                        s.submit(req)
                    continue
                got[rid] = []
                meta[rid] = (idx, max_tokens)
                s.submit(req)
                accepted.append(rid)
            if cancel_at == t and rid in got:
                s.cancel(rid)
        cancelled_now = {f"r{i}" for i, r in enumerate(requests) if r[3] == t and f"r{i}" in got}
        ended_before = set(reason)
        s.step()
        check_mapping()
        stats = s.stats()
        assert stats["kv_used_bytes"] <= stats["kv_budget_bytes"]
        assert stats["rows"] <= (1 if policy == "sequential" else max_batch)
        for rid in cancelled_now - ended_before:
            assert rid in reason, "a cancel must take effect at the next iteration"
        if policy != "static":  # static keeps finished rows as padding until its longest request ends
            assert not set(reason) & set(s.slot_map()), "an ended request still holds a slot"
        elif stats["live"] == 0:
            assert stats["rows"] == 0 and stats["kv_used_bytes"] == 0
        if t > 12 and s.idle():
            break
    assert s.idle() and s.stats()["kv_used_bytes"] == 0
    for rid in accepted:
        idx, max_tokens = meta[rid]
        want = items[idx][2][: max_tokens - 1]
        if reason[rid] == "cancelled":
            assert got[rid] == want[: len(got[rid])]
        else:
            assert got[rid] == want, f"{rid} ({policy}) diverged from its solo run"
            assert reason[rid] == ("stop" if (want[-1] if want else items[idx][1]) in CFG.eos_ids else "length")
