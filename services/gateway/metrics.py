"""The gateway's Prometheus metrics: TTFT and its split, inter-token latency, E2E, load, KV transfer."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DOOR = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_TBT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
TTFT_PHASES = ("queue", "prefill", "kv_transfer", "first_decode", "gateway")


class GatewayMetrics:
    """One registry per gateway (so tests can run several in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tandem_gateway_requests", "Requests finished, by API and outcome",
                                ["api", "outcome"], registry=r)
        self.ttft = Histogram("tandem_ttft_seconds", "Time to first token, measured at the gateway",
                              buckets=_LATENCY, registry=r)
        self.ttft_phase = Histogram("tandem_ttft_phase_seconds",
                                    "TTFT split: queue, prefill, kv_transfer, gateway (they sum to TTFT) and "
                                    "first_decode (the decode worker's first step right after)",
                                    ["phase"], buckets=_LATENCY, registry=r)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "Gap between consecutive output tokens",
                             buckets=_TBT, registry=r)
        self.e2e = Histogram("tandem_e2e_seconds", "Request received to last token", buckets=_LATENCY, registry=r)
        self.running = Gauge("tandem_running_requests", "Requests streaming tokens", registry=r)
        self.waiting = Gauge("tandem_waiting_requests", "Requests admitted, waiting for their first token",
                             registry=r)
        self.kv_bytes = Counter("tandem_kv_transfer_bytes", "KV cache bytes moved prefill -> decode", registry=r)
        self.kv_seconds = Histogram("tandem_kv_transfer_seconds", "KV transfer time not hidden behind prefill",
                                    buckets=_TBT + (5, 10), registry=r)
        self.retries = Counter("tandem_gateway_retries", "Requests moved to another worker pair after a failure, "
                               "by phase (prefill: before the first token; decode: mid-stream)", ["phase"], registry=r)
        self.inflight = Gauge("tandem_gateway_inflight", "Requests holding an admission place (bound: max_inflight)",
                              registry=r)
        self.refused = Counter("tandem_gateway_refused", "Requests refused at the door (429 full, 503 draining)",
                               ["reason"], registry=r)
        self.refusal_seconds = Histogram("tandem_gateway_refusal_seconds",
                                         "A refusal at the HTTP door: the request reaching the gateway's ASGI app "
                                         "to its 429/503 handed to the socket", ["reason"], buckets=_DOOR, registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "Tokens generated", registry=r)
        self.dlm_e2e = Histogram("tandem_gateway_dlm_seconds", "Diffusion-LM completions: received to last text",
                                 buckets=_LATENCY, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
