"""Fan independent simulations out: in this process (jobs=1), over local processes (jobs>1), or on a Ray cluster
(`ray_address`, the optional `ray` extra). Results come back in input order whichever way they ran, and every
simulation is deterministic for its seed, so the answer does not depend on how it was spread."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from services.contracts.errors import InvalidArgument


def fan_out(fn: Callable[..., Any], calls: Sequence[tuple], *, jobs: int = 1, ray_address: str | None = None,
            progress: Callable[[int], None] | None = None) -> list[Any]:
    """[fn(*args) for args in calls]; `progress(i)` after call i finishes (in completion order). `fn` must be a
    module-level function and its arguments picklable when jobs > 1 or on Ray."""
    if jobs < 1:
        raise InvalidArgument(f"jobs: must be >= 1, got {jobs}", param="jobs")
    if ray_address is not None:
        return _on_ray(fn, calls, ray_address, progress)
    if jobs == 1 or len(calls) <= 1:
        out = []
        for i, args in enumerate(calls):
            out.append(fn(*args))
            if progress:
                progress(i)
        return out
    results: list[Any] = [None] * len(calls)
    # spawn, not fork: the caller may hold threads (a progress bar's refresher) that fork would copy mid-lock
    with ProcessPoolExecutor(max_workers=min(jobs, len(calls)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if progress:
                progress(i)
    return results


def _on_ray(fn: Callable[..., Any], calls: Sequence[tuple], address: str,
            progress: Callable[[int], None] | None) -> list[Any]:
    try:
        import ray
    except ImportError:
        raise InvalidArgument("ray: --ray needs the optional extra: pip install 'tandem[ray]'", param="ray") from None
    started = not ray.is_initialized()
    if started:
        # "local" starts a Ray instance on this machine; anything else is the address of a running cluster
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    try:
        remote = ray.remote(fn)
        refs = [remote.remote(*args) for args in calls]
        index = {ref: i for i, ref in enumerate(refs)}
        results: list[Any] = [None] * len(calls)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                if progress:
                    progress(index[ref])
        return results
    finally:
        if started:
            ray.shutdown()
