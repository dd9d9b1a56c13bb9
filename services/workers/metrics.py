"""Prometheus metrics of the workers (names prefixed tandem_worker_, labelled by the worker's address)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

KV_BYTES = Counter("tandem_worker_kv_transfer_bytes", "KV payload bytes pushed or received", ["worker", "direction"])
KV_SECONDS = Histogram("tandem_worker_kv_transfer_seconds", "Duration of one KV push (header to receipt)",
                       ["worker", "direction"], buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
KV_REJECTED = Counter("tandem_worker_kv_rejected", "KV pushes rejected, by the field that failed", ["worker", "field"])
RUNNING = Gauge("tandem_worker_running_requests", "Requests in the live decode batch", ["worker"])
WAITING = Gauge("tandem_worker_waiting_requests", "Prompts queued + received KV not yet decoding", ["worker"])
QUEUE_TOKENS = Gauge("tandem_worker_prefill_queue_tokens", "Prompt tokens queued or running in prefill", ["worker"])
KV_FREE = Gauge("tandem_worker_kv_free_bytes", "Decode KV budget left", ["worker"])


class WorkerMetrics:
    """Binds the metrics to one worker; gauges read live values when /metrics is scraped."""

    def __init__(self, worker: str, running: Callable[[], float], waiting: Callable[[], float],
                 queue_tokens: Callable[[], float], kv_free: Callable[[], float]) -> None:
        self.worker = worker
        for gauge, fn in ((RUNNING, running), (WAITING, waiting), (QUEUE_TOKENS, queue_tokens), (KV_FREE, kv_free)):
            gauge.labels(worker).set_function(fn)

    def pushed(self, nbytes: int, seconds: float) -> None:
        KV_BYTES.labels(self.worker, "sent").inc(nbytes)
        KV_SECONDS.labels(self.worker, "sent").observe(seconds)

    def received(self, nbytes: int, seconds: float) -> None:
        KV_BYTES.labels(self.worker, "received").inc(nbytes)
        KV_SECONDS.labels(self.worker, "received").observe(seconds)

    def rejected(self, field: str) -> None:
        KV_REJECTED.labels(self.worker, field).inc()
