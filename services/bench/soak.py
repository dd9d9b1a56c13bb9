"""`tandem bench soak`: hold N concurrent streams against a split cluster for D seconds, with deliberate invalid
requests and client cancels mixed in, then check that the cluster is back to idle.

The cluster is the layout's (default examples/local-split.yaml), started on free ports with the launcher
(services.bench.cluster.running_cluster, as `tandem bench cluster` does) or attached to. A started cluster gets
its admission bounds sized for N (`sized_layout`): the point is that N streams are served, so none is refused.
Every stream slot loops: send a request (HTTP SSE or gRPC, completion or chat; some cancelled mid-stream by the
client), read it, send the next. Beside them, `invalid_rate` deliberate invalid requests per second (bad JSON, bad
fields, oversize, wrong API key) each of which must get its own refusal. Anything else is an unexpected error.
A watcher samples RSS per process, KV in use per decode worker and requests in flight; after the load, the
soak waits (up to `settle_s`) for every decode worker's KV in use and live rows to be back at zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from services.bench.soak_traffic import Outcome, Traffic, plan
from services.bench.soak_watch import Sample, Watcher
from services.contracts.layout import Layout, load_layout
from services.contracts.metrics import weighted_percentile

SPLIT_LAYOUT = Path(__file__).resolve().parents[2] / "examples/local-split.yaml"
INVALID_SENDERS = 4  # concurrent senders of the deliberate invalid requests


@dataclass(slots=True)
class SoakConfig:
    streams: int = 256
    duration_s: float = 300.0
    max_tokens: int = 64
    grpc_share: float = 0.25  # of the streams, sent over gRPC with services.client
    chat_share: float = 0.3
    cancel_share: float = 0.1  # cancelled by the client mid-stream
    invalid_rate: float = 2.0  # deliberate invalid requests per second
    ramp_s: float = 10.0  # the stream slots start spread over this
    sample_s: float = 1.0
    settle_s: float = 120.0  # after the load: how long KV in use may take to reach zero
    seed: int = 0


def sized_layout(base: str | Path, streams: int, dest: Path) -> Path:
    """A copy of `base` whose pools and gateway admit `streams` concurrent streams (plus the invalid requests):
    each decode (or mixed) worker runs its share live (max_batch) with as many again allowed to wait; each prefill
    worker may hold every stream's prompt; the gateway's bound leaves room for the invalid senders."""
    doc = yaml.safe_load(Path(base).read_text()) or {}
    default = doc.get("batching") or {}
    pools = doc.get("pools") or [{"role": "mixed", "count": 1}]
    holders = sum(int(p.get("count", 1)) for p in pools if p.get("role") in ("decode", "mixed"))
    share = math.ceil(streams / max(1, holders))
    for p in pools:
        b = {**default, **(p.get("batching") or {})}
        if p.get("role") in ("decode", "mixed"):
            b.update(max_batch=max(share, int(b.get("max_batch", 1))), max_waiting=share)
        elif p.get("role") == "prefill":
            b.update(max_waiting=max(streams, int(b.get("max_waiting") or 0)))
        p["batching"] = b
    doc["pools"] = pools
    doc["gateway"] = {**(doc.get("gateway") or {}), "max_inflight": streams + INVALID_SENDERS + 8}
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


@contextlib.contextmanager
def api_keys(key: str | None) -> Iterator[None]:
    """TANDEM_API_KEYS for the processes started inside (the gateway reads it at start-up)."""
    old = os.environ.get("TANDEM_API_KEYS")
    if key:
        os.environ["TANDEM_API_KEYS"] = key
    try:
        yield
    finally:
        if key and old is None:
            os.environ.pop("TANDEM_API_KEYS", None)
        elif key and old is not None:
            os.environ["TANDEM_API_KEYS"] = old


class Load:
    """The stream slots and invalid senders; counts what they saw."""

    def __init__(self, traffic: Traffic, cfg: SoakConfig) -> None:
        self.traffic, self.cfg = traffic, cfg
        self.outcomes: list[Outcome] = []
        self.inflight = 0
        self.started = 0

    async def run(self, stop_at: float, tick: Callable[[Load], None]) -> None:
        slots = [asyncio.ensure_future(self._slot(i, stop_at)) for i in range(self.cfg.streams)]
        senders = [asyncio.ensure_future(self._invalid(i, stop_at)) for i in range(INVALID_SENDERS)]
        ticker = asyncio.ensure_future(self._tick(tick))
        try:
            await asyncio.gather(*slots, *senders)
        finally:
            ticker.cancel()
            tick(self)

    async def _tick(self, tick: Callable[[Load], None]) -> None:
        while True:
            tick(self)
            await asyncio.sleep(0.5)

    async def _slot(self, i: int, stop_at: float) -> None:
        c = self.cfg
        rng = random.Random(c.seed * 100_003 + i)
        await asyncio.sleep(c.ramp_s * i / max(1, c.streams))
        while time.monotonic() < stop_at:
            p = plan(rng, c.max_tokens, c.grpc_share, c.chat_share, c.cancel_share)
            self.inflight += 1
            self.started += 1
            try:
                out = await self.traffic.send(p)
            except Exception as exc:  # noqa: BLE001 - a client-side surprise is an unexpected error, not a crash
                out = Outcome(p.label, "unexpected", f"{type(exc).__name__}: {str(exc)[:160]}")
            finally:
                self.inflight -= 1
            self.outcomes.append(out)

    async def _invalid(self, i: int, stop_at: float) -> None:
        if self.cfg.invalid_rate <= 0:
            return
        kinds = self.traffic.invalid_kinds()
        period = INVALID_SENDERS / self.cfg.invalid_rate
        n = i
        await asyncio.sleep(period * i / INVALID_SENDERS)
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            self.outcomes.append(await self.traffic.invalid(kinds[n % len(kinds)]))
            n += INVALID_SENDERS
            await asyncio.sleep(max(0.0, period - (time.monotonic() - t0)))


def _pct(values: list[float]) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": (weighted_percentile(arr, q) if arr.size else None) for q in (50, 90, 99)}


def _rss_table(samples: list[Sample], load_start: float, load_end: float,
               warm_at: float) -> dict[str, dict[str, float | None]]:
    """Per process, MiB: before the load, once warm (the first sample at or after `warm_at`: streams ramped up and
    every code path run), at the end of the load, the max, after settling, and the slope over the load's second
    half (MiB per minute; flat is ~0)."""
    out = {}
    for name in samples[0].rss:
        series = [(s.t_s, s.rss[name] / 2**20) for s in samples if s.rss.get(name)]
        during = [(t, v) for t, v in series if load_start <= t <= load_end]
        warm = next((v for t, v in during if t >= warm_at), None)
        half = np.asarray([(t, v) for t, v in during if t >= (load_start + load_end) / 2])
        slope = float(np.polyfit(half[:, 0], half[:, 1], 1)[0] * 60) if len(half) >= 3 else None
        out[name] = {"before": series[0][1] if series else None, "warm": warm,
                     "end": during[-1][1] if during else None, "max": max(v for _, v in series) if series else None,
                     "after": series[-1][1] if series else None, "slope_mb_per_min_2nd_half": slope}
    return out


def summarize(load: Load, w: Watcher, cfg: SoakConfig, load_start: float, load_end: float,
              settled_s: float | None) -> dict[str, Any]:
    outs = load.outcomes
    by = Counter((o.result, o.label) for o in outs)
    unexpected = Counter(o.detail.split(":")[0] for o in outs if o.result == "unexpected")
    streams = [o for o in outs if not o.label.startswith("invalid:")]
    ttft = [o.ttft_s for o in streams if o.ttft_s is not None]
    gaps = [g for o in streams for g in o.gaps_s]
    last = w.samples[-1]
    warm_at = load_start + cfg.ramp_s + 0.2 * cfg.duration_s
    inflight = [s.client_inflight for s in w.samples if load_start <= s.t_s <= load_end]
    return {
        "streams": cfg.streams, "duration_s": cfg.duration_s, "load_wall_s": round(load_end - load_start, 1),
        "requests": len(outs), "stream_requests": len(streams),
        "completed": sum(o.result == "completed" for o in streams),
        "cancelled_deliberately": sum(o.result == "cancelled" for o in streams),
        "tokens": sum(o.tokens for o in streams),
        "deliberate_by_kind": {f"{label}": n for (res, label), n in sorted(by.items()) if res in ("refused", "cancelled")},
        "unexpected": sum(unexpected.values()),
        "unexpected_by_kind": dict(unexpected),
        "unexpected_examples": [f"{o.label}: {o.detail}" for o in outs if o.result == "unexpected"][:20],
        "completed_by_label": {label: n for (res, label), n in sorted(by.items()) if res == "completed"},
        "client_inflight_max": max(inflight, default=0),
        "client_inflight_median": float(np.median(inflight)) if inflight else 0.0,
        "ttft_s": _pct(ttft), "itl_s": _pct(gaps),
        "rss_mb": _rss_table(w.samples, load_start, load_end, warm_at),
        "rss_warm_at_s": round(warm_at, 1),
        "kv_in_use_after_bytes": last.kv_in_use, "live_after": last.live,
        "kv_in_use_max_bytes": {k: max((s.kv_in_use[k] or 0) for s in w.samples) for k in last.kv_in_use},
        "kv_back_to_zero": w.kv_idle(), "kv_zero_after_s": settled_s,
        "process_restarts": w.pid_changes,
    }


def run_soak(layout: str | Path, cfg: SoakConfig, attach: bool = False, api_key: str | None = None,
             log_dir: str | Path | None = None, tick: Callable[[Load, float], None] | None = None,
             note: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start (or attach to) the cluster, run the load, let it settle; the result document (samples included)."""
    from services.bench.cluster import running_cluster

    say = note or (lambda _m: None)
    given = _shown(layout)
    if not attach:
        api_key = api_key or "soak-" + secrets.token_hex(8)
        layout = sized_layout(layout, cfg.streams, Path(tempfile.mkdtemp(prefix="tandem-soak-")) / "layout.yaml")
    load_avg = [round(x, 2) for x in os.getloadavg()]
    with api_keys(None if attach else api_key), running_cluster(layout, attach, log_dir, say) as (lay, path):
        served: Layout = lay if attach else load_layout(path)
        bound = served.gateway.max_inflight or served.capacity()
        say(f"layout {path}: gateway max_inflight {bound}, pools hold {served.capacity()}")
        if min(bound, served.capacity()) < cfg.streams + INVALID_SENDERS:
            say(f"warning: this cluster admits {min(bound, served.capacity())} requests at once, fewer than "
                f"{cfg.streams} streams + {INVALID_SENDERS} invalid senders: expect 429s (unexpected errors)")
        res = asyncio.run(_soak(served, cfg, api_key, tick, say))
    return {"config": {**asdict(cfg), "layout": given, "attach": attach, "api_keys": bool(api_key),
                       "invalid_senders": INVALID_SENDERS, "model": served.model.path or "embedded SmolLM2-135M",
                       "pools": [p.model_dump() for p in served.pools],
                       "gateway_max_inflight": served.gateway.max_inflight or served.capacity(),
                       "loadavg_before": load_avg, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                       "cpus": os.cpu_count()}, **res}


def _shown(path: str | Path) -> str:
    """A layout path as the result records it: relative to the repository when inside it."""
    p = Path(path).resolve()
    root = SPLIT_LAYOUT.parents[1]
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)


async def _soak(lay: Layout, cfg: SoakConfig, api_key: str | None, tick: Callable[[Load, float], None] | None,
                say: Callable[[str], None]) -> dict[str, Any]:
    traffic = Traffic(f"http://{lay.gateway.http}", lay.gateway.grpc, lay.model.name, api_key,
                      cfg.streams + INVALID_SENDERS + 4)
    load = Load(traffic, cfg)
    w = Watcher(lay, cfg.sample_s, lambda: load.inflight)
    await asyncio.to_thread(w.start)
    try:
        load_start = w.now()
        stop_at = time.monotonic() + cfg.duration_s
        await load.run(stop_at, lambda ld: tick(ld, w.now() - load_start) if tick else None)
        load_end = w.now()
        say(f"load over after {load_end - load_start:.1f} s; waiting up to {cfg.settle_s:.0f} s for KV in use to "
            "reach zero")
        settled = await asyncio.to_thread(_settle, w, cfg.settle_s)
        settled_s = None if settled is None else round(settled - load_end, 1)
        await asyncio.sleep(min(5.0, cfg.settle_s))  # a few idle samples after zero, for the plot
    finally:
        await asyncio.to_thread(w.stop)
        await traffic.close()
    res = summarize(load, w, cfg, load_start, load_end, settled_s)
    res["load_start_s"], res["load_end_s"] = round(load_start, 2), round(load_end, 2)
    res["samples"] = [asdict(s) for s in w.samples]
    return res


def _settle(w: Watcher, settle_s: float) -> float | None:
    """Wait for a sample in which every decode worker holds no KV and no request; its watcher time, or None."""
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        if w.kv_idle():
            return w.samples[-1].t_s
        time.sleep(0.2)
    return None
