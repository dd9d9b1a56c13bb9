"""The decode worker's KV store in one process: budget, leases, stalls."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from services.contracts.errors import NotFound, ResourceExhausted
from services.kv.store import KVStore


def _layers(nbytes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    t = torch.zeros(nbytes // 8)  # K and V of one layer, 4-byte elements
    return [(t, t.clone())]


def test_budget_lease_release_and_claim() -> None:
    store = KVStore(budget_bytes=1000, lease_s=0.3, stall_s=5, other_used=lambda: 200)
    try:
        t1 = store.begin("a", 500, cancel=lambda: None)
        with pytest.raises(ResourceExhausted, match="300 of 1000 bytes free"):
            store.begin("b", 301, cancel=lambda: None)
        h1, lease = store.commit(t1, _layers(500))
        assert lease == 0.3 and store.used_bytes == 500 and store.free_bytes == 300
        assert store.claim(h1).request_id == "a" and store.used_bytes == 0  # the scheduler owns it now
        with pytest.raises(NotFound, match="handle"):
            store.claim(h1)
        h2, _ = store.commit(store.begin("c", 400, cancel=lambda: None), _layers(400))
        assert store.release(h2) and not store.release(h2)
        h3, _ = store.commit(store.begin("d", 400, cancel=lambda: None), _layers(400), lease_s=0.2)
        time.sleep(0.5)  # the reaper thread expires the lease
        assert store.used_bytes == 0
        with pytest.raises(NotFound):
            store.claim(h3)
    finally:
        store.close()


def test_stalled_push_is_cancelled_and_aborted() -> None:
    cancelled = threading.Event()
    freed: list[str] = []
    store = KVStore(budget_bytes=1000, stall_s=0.2, on_expire=lambda e, why: freed.append(why))
    try:
        ticket = store.begin("s", 100, cancel=cancelled.set)
        for _ in range(4):  # progress keeps it alive
            time.sleep(0.1)
            store.touch(ticket)
        assert not cancelled.is_set()
        assert cancelled.wait(2) and freed == ["push stalled"]
        store.abort(ticket)  # what the handler's finally does once the RPC is cancelled
        assert store.used_bytes == 0
    finally:
        store.close()
