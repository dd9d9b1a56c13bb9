"""The dense live batch: slot-contiguous KV whose live rows are always slots 0..n-1, plus the KV budget.

Flover's buffer reordering: when rows die, the last live row is moved into each hole, so the fused step
reads the buffer as a view (Engine.decode's dense fast path) and never computes on a dead slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from services.batching.request import DecodeRequest
from services.engine import Engine, KVBuffer
from services.engine.sampling import Sampler


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


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class DenseBatch:
    """Owns the KV buffer and the reservation ledger; knows nothing of policies.

    The budget bounds both the reservations and the allocation: the buffer (slots x capacity, both grown
    by doubling as rows need them, shrunk back to what the live rows need when that is the only way to
    admit) never holds more than `budget_bytes`.
    """

    def __init__(self, engine: Engine, max_batch: int, budget_bytes: int, initial_capacity: int) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.budget_bytes = budget_bytes
        self.bytes_per_token = engine.cfg.kv_bytes_per_token(engine.new_kv(1, 1).k.element_size())
        cap = max(1, min(initial_capacity, engine.cfg.max_seq_len, budget_bytes // self.bytes_per_token))
        self.kv: KVBuffer = engine.new_kv(1, cap)
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

    def _shape_for(self, reserved: int) -> tuple[int, int] | None:
        """Buffer shape (slots, capacity) that holds the live rows plus one of `reserved` tokens within the
        budget: the current shape grown by doubling if that fits, else the tightest shape; None if none fits."""
        n = len(self.rows) + 1
        need = max([r.reserved for r in self.rows] + [reserved])
        limit = self.engine.cfg.max_seq_len
        slots, cap = self.kv.slots, self.kv.capacity
        if slots >= n and cap >= need:
            return slots, cap
        grown = (max(slots, min(self.max_batch, next_pow2(n))), max(cap, next_capacity(need, cap, limit)))
        for s, c in (grown, (n, need)):
            if s * c * self.bytes_per_token <= self.budget_bytes:
                return s, c
        return None

    def fits(self, reserved: int) -> bool:
        return (len(self.rows) < self.max_batch
                and self.used_bytes + reserved * self.bytes_per_token <= self.budget_bytes
                and self._shape_for(reserved) is not None)

    def admit(self, row: Row) -> int:
        """Install the request's prompt KV into the next dense slot; reshapes the buffer first if needed."""
        shape = self._shape_for(row.reserved)
        if shape is None:
            raise RuntimeError("admit() without fits()")
        if shape != (self.kv.slots, self.kv.capacity):
            t0 = time.perf_counter()
            self.kv.resize(*shape)
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
        assert self.kv.nbytes() <= self.budget_bytes, "the KV allocation exceeds the budget"
        assert all(length == 0 for length in self.kv.lengths[n:]), "a slot past the live rows holds KV"
        for s, r in enumerate(self.rows):
            want = r.frozen_len if r.done else r.req.prompt_len + r.generated - 1
            assert self.kv.lengths[s] == want, f"slot {s} ({r.req.request_id}) length {self.kv.lengths[s]} != {want}"
            assert want <= r.reserved, f"slot {s} grew past its reservation"
