"""The dense live batch: slot-contiguous KV whose live rows are always slots 0..n-1, plus the KV budget.

Flover's buffer reordering: when rows die, the last live row is moved into each hole, so the fused step
reads the buffer as a view (Engine.decode's dense fast path) and never computes on a dead slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.engine import Engine, KVBuffer
from services.engine.sampling import Sampler
from services.fusion.request import DecodeRequest


@dataclass(slots=True, eq=False)
class Row:
    """A live request in the batch; its slot is its index in DenseBatch.rows."""

    req: DecodeRequest
    sampler: Sampler
    reserved: int  # KV tokens reserved for it (request.reserved_tokens)
    last_token: int  # fed at the next step
    generated: int  # tokens emitted so far, first_token included
    done: str | None = None  # finish reason; a done row in a static batch stays as padding
    frozen_len: int = 0  # KV length of a padding row, restored after each step


def next_capacity(need: int, current: int, limit: int) -> int:
    """Capacity growth policy: double until `need` fits, never past the model's context length."""
    cap = max(current, 1)
    while cap < need:
        cap *= 2
    return min(cap, limit)


class DenseBatch:
    """Owns the KV buffer (max_batch slots) and the reservation ledger; knows nothing of policies."""

    def __init__(self, engine: Engine, max_batch: int, budget_bytes: int, initial_capacity: int) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.budget_bytes = budget_bytes
        self.bytes_per_token = engine.cfg.kv_bytes_per_token(engine.new_kv(1, 1).k.element_size())
        self.kv: KVBuffer = engine.new_kv(max_batch, min(initial_capacity, engine.cfg.max_seq_len))
        self.rows: list[Row] = []
        self.reserved_tokens = 0
        self.moves = 0
        self.reorder_s = 0.0
        self.grows = 0
        self.grow_s = 0.0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def used_bytes(self) -> int:
        return self.reserved_tokens * self.bytes_per_token

    def fits(self, reserved: int) -> bool:
        return len(self.rows) < self.max_batch and self.used_bytes + reserved * self.bytes_per_token <= self.budget_bytes

    def admit(self, row: Row) -> int:
        """Install the request's prompt KV into the next dense slot; grows capacity first if needed."""
        if row.reserved > self.kv.capacity:
            t0 = time.perf_counter()
            self.kv.grow(next_capacity(row.reserved, self.kv.capacity, self.engine.cfg.max_seq_len))
            self.grows += 1
            self.grow_s += time.perf_counter() - t0
        slot = len(self.rows)
        self.kv.import_all(slot, row.req.prompt_kv)
        self.rows.append(row)
        self.reserved_tokens += row.reserved
        return slot

    def evict(self, slots: list[int]) -> None:
        """Free `slots` at once and refill each hole with the last live row, keeping 0..n-1 dense."""
        t0 = time.perf_counter()
        for s in sorted(set(slots), reverse=True):  # descending: the last row is always live when moved
            self.reserved_tokens -= self.rows[s].reserved
            last = len(self.rows) - 1
            if s != last:
                self.kv.move(last, s)
                self.rows[s] = self.rows[last]
                self.moves += 1
            self.kv.clear(last)
            self.rows.pop()
        self.reorder_s += time.perf_counter() - t0

    def slot_map(self) -> list[str]:
        return [r.req.request_id for r in self.rows]

    def check(self) -> None:
        """Invariants (tests call this after every step): dense rows, lengths, ledger, budget."""
        n = len(self.rows)
        assert self.reserved_tokens == sum(r.reserved for r in self.rows), "reservation ledger drifted"
        assert self.used_bytes <= self.budget_bytes, "KV reservations exceed the budget"
        assert all(length == 0 for length in self.kv.lengths[n:]), "a slot past the live rows holds KV"
        for s, r in enumerate(self.rows):
            want = r.frozen_len if r.done else r.req.prompt_len + r.generated - 1
            assert self.kv.lengths[s] == want, f"slot {s} ({r.req.request_id}) length {self.kv.lengths[s]} != {want}"
            assert want <= r.reserved, f"slot {s} grew past its reservation"
