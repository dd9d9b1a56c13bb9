"""Splitwise's join-the-shortest-queue routing decision as pure functions of worker loads.

The one routing policy: the runtime router (`services/router.py`) feeds it polled `WorkerInfo` loads, the
simulator (`sim/cluster.py`) feeds it its simulated workers' loads, so a simulation runs the runtime's own decision.

The definition is the runtime's, with one addition from the simulator. They used to differ: the simulator ranked
prefill workers by estimated seconds of queued prompt work, decode workers by the share of KV capacity assigned,
and a colocated (mixed) worker by the sum of the two. Now:
- prefill (and mixed) workers: fewest pending prompt tokens, then the least KV in use (share), then the fewest
  requests (live + waiting);
- decode workers: one with free KV first, then the fewest requests (live + waiting), then the most free KV.
Why the runtime's: it is what serves, and it ranks by what a real worker reports (`WorkerInfo`), which the
router's own accounting moves between polls (pending tokens, requests), so a burst spreads out; the simulator's
seconds need the perf model, and a KV share first in the decode ranking would send a whole burst between polls
to one worker. Within a pool of one hardware type, tokens and seconds of prompt work rank alike.
Why the KV share on prefill/mixed workers: a mixed worker's decode batch lives in its KV, so among workers with
the same prompt backlog the one with the lighter batch memory should take the request (what the simulator's
mixed ranking did); without it the colocated baseline in tests/sim (test_phase_split_beats_colocated_at_equal_power)
lands on the other side of Splitwise's p90 TBT slowdown SLO (1.48 instead of 1.51 against 1.5).
Split pools are used when both have a worker; otherwise the mixed pool serves both phases.

Speed: the runtime ranks a few freshly polled loads per pick, so `jsq` over a list is all it needs. The simulator
picks twice per request among up to dozens of workers whose loads change a few times per request; calling the
key function on every worker per pick took about an eighth of its CPU. It keeps each pool in a `Ranked`: a
worker's key is recomputed when that worker's load changes (`Ranked.update`: `keys[i]` is always `key(self[i])`),
and `jsq` over a `Ranked` compares the stored keys, with the same answer (same keys, same first-in-order
tie-break) as over a list (tests/contracts/test_routing.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar


@dataclass(slots=True)
class Load:
    """A worker's load as the router sees it (the fields of WorkerInfo it ranks by). `address` names the worker
    (the runtime's host:port, the simulator's worker index)."""

    address: str | int
    pending_prompt_tokens: int = 0
    live_requests: int = 0
    waiting_requests: int = 0
    kv_free_bytes: int = 0
    kv_total_bytes: int = 0
    healthy: bool = True


L = TypeVar("L", bound=Load)
Key = Callable[[Load], tuple]
Choose = Callable[[Sequence[L], Key], L]


def kv_used_share(load: Load) -> float:
    """The share of the worker's KV memory in use (0 when it reports none)."""
    return 1.0 - load.kv_free_bytes / load.kv_total_bytes if load.kv_total_bytes > 0 else 0.0


def kv_full(load: Load) -> bool:
    return load.kv_total_bytes > 0 and load.kv_free_bytes <= 0


def prefill_key(load: Load) -> tuple:
    """JSQ over prefill (and mixed) workers: fewest pending prompt tokens, then the least KV in use (on a mixed
    worker: its decode batch's memory), then fewest requests."""
    total = load.kv_total_bytes  # kv_used_share, inlined (this runs a few times per simulated request)
    return (load.pending_prompt_tokens, 1.0 - load.kv_free_bytes / total if total > 0 else 0.0,
            load.live_requests + load.waiting_requests)


def decode_key(load: Load) -> tuple:
    """JSQ over decode workers: a worker with free KV first, then the lightest batch, then the most free KV."""
    free = load.kv_free_bytes
    return (load.kv_total_bytes > 0 and free <= 0, load.live_requests + load.waiting_requests, -free)


class Ranked(list):
    """A fixed pool of loads (a list of them) with each one's `key` kept current: whoever changes `self[i]` calls
    `update(i)` (or sets `keys[i] = key(self[i])` itself). `jsq(ranked, ranked.key)` then compares the stored keys
    instead of calling `key` on every load."""

    __slots__ = ("key", "keys")

    def __init__(self, loads: Iterable[Load], key: Key) -> None:
        super().__init__(loads)
        self.key = key
        self.keys: list[tuple] = [key(ld) for ld in self]

    def update(self, i: int) -> None:
        self.keys[i] = self.key(self[i])


def jsq(loads: Sequence[L], key: Key) -> L:
    """The least-loaded worker by `key` (ties go to the first in `loads`, i.e. registry/layout order)."""
    if type(loads) is Ranked and loads.key is key:
        keys = loads.keys
        return loads[keys.index(min(keys))]  # the first least key, as min(loads, key=key) picks
    return min(loads, key=key)


def route(prefill: Sequence[L], decode: Sequence[L], mixed: Callable[[], Sequence[L]],
          choose: Choose = jsq) -> tuple[L, L, bool] | None:
    """(prefill worker, decode worker, mixed?) among healthy workers, or None when no pool can serve.

    Split pools when both have a worker, else the mixed pool (`mixed` is called only then, so a caller that
    polls loads polls the mixed pool only when it needs it). `choose` is the policy's pick within one pool.
    """
    if prefill and decode:
        return choose(prefill, prefill_key), choose(decode, decode_key), False
    pool = mixed()
    if not pool:
        return None
    w = choose(pool, prefill_key)
    return w, w, True
