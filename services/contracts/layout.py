"""The layout file: one schema for the simulator and the runtime (model, pools, router, batching, SLOs, ports).

Pure pydantic; no torch, no service imports, so `sim/` may import it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from services.contracts.errors import InvalidArgument
from services.contracts.metrics import SLO
from services.contracts.registry_url import parse_registry
from services.contracts.roles import LLM_ROLES, PoolRole


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")


def parse_device(value: str) -> tuple[str, int | None]:
    """'cpu' -> ("cpu", None); 'cuda' -> ("cuda", None); 'cuda:N' -> ("cuda", N). ValueError otherwise."""
    v = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(v, str) or not _DEVICE.match(v):
        raise ValueError(f"must be 'cpu', 'cuda' or 'cuda:N' with N a GPU index, e.g. cuda:1 (got {value!r})")
    kind, _, index = v.partition(":")
    return kind, int(index) if index else None


class ModelRef(_Strict):
    """Which model the LLM pools serve. `name` is the simulator's catalog key (sim/catalog.py); `path` what the
    workers load: a HF directory or GGUF file, `random:<shape>` (random weights of a named shape, e.g.
    random:llama-3.2-1b; services/engine/shapes.py), `random:tiny` or `random:<json>`; None = the embedded SmolLM2."""

    name: str = "smollm2-135m"
    path: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the workers' weights and KV; None: bfloat16 on CUDA, float32 on CPU")


class Pool(_Strict):
    role: PoolRole
    count: int = Field(1, ge=0)
    hardware: str = Field("cpu", description="simulator: the catalog machine each worker is (speed, memory, cost, "
                          "power); the runtime runs on `device`")
    power_cap_w: float | None = Field(None, gt=0, description="simulator: per-machine power cap (Splitwise's HHcap); "
                                      "the runtime does not cap a machine's power")
    host: str = "127.0.0.1"
    base_port: int | None = Field(None, ge=1, le=65535, description="instance i listens on base_port + i")
    batching: Batching | None = Field(None, description="per-pool override of the layout's batching")
    device: str | list[str] | None = Field(
        None, description="where `tandem up` runs the pool's workers: 'cpu', 'cuda' (the first visible GPU) or "
        "'cuda:N' (GPU N alone: the worker runs with CUDA_VISIBLE_DEVICES=N); a list gives one per instance. "
        "None: CUDA when available. The simulator ignores it: `hardware` (and its profile) set the speed")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        if value is None:
            return None
        role = info.data.get("role")
        listed = value if isinstance(value, list) else [value]
        if role is not None and role not in LLM_ROLES and any(str(d).strip().lower() != "cpu" for d in listed):
            raise ValueError(f"the {role} service runs on the CPU; device applies to prefill, decode and mixed pools")
        if isinstance(value, list):
            count = info.data.get("count")
            if count is not None and len(value) != count:
                raise ValueError(f"a list needs one device per instance: count is {count}, got {len(value)} devices")
            return [cls._one_device(v) for v in value]
        return cls._one_device(value)

    @staticmethod
    def _one_device(value: str) -> str:
        kind, index = parse_device(value)
        return kind if index is None else f"{kind}:{index}"

    def device_of(self, instance: int) -> str | None:
        """The device of this pool's `instance`-th worker (0-based)."""
        return self.device[instance] if isinstance(self.device, list) else self.device


class RouterSpec(_Strict):
    """The `router:` section: how the gateway picks workers (`policy` is the routing strategy's name)."""

    policy: Literal["jsq", "round_robin", "random"] = "jsq"
    mixed_fallback: bool = Field(False, description="simulator only: with prefill and decode pools, a prompt runs "
                                 "on the chosen decode machine when the best prefill machine has more than "
                                 "sim.fallback_queue_tokens queued (Splitwise's mixed pool). The runtime never runs a "
                                 "prompt on a decode worker, so it refuses to serve a layout that sets it")


class Batching(_Strict):
    policy: Literal["fusion", "static", "sequential"] = "fusion"
    max_batch: int = Field(32, ge=1)
    max_batch_tokens: int = Field(2048, ge=1, description="prefill token budget per batch")
    kv_budget_mb: float | None = Field(None, gt=0, description="decode KV memory budget per worker, in MiB (2**20 bytes; runtime and simulator alike)")
    max_waiting: int | None = Field(None, ge=0, description="requests a worker queues behind its running batch "
                                    "(prefill prompts; decode KV pushed but not admitted); beyond it: 429 / "
                                    "RESOURCE_EXHAUSTED. None = 2 x max_batch")

    def waiting_bound(self) -> int:
        return self.max_waiting if self.max_waiting is not None else 2 * self.max_batch


Pool.model_rebuild()


class SLOSpec(_Strict):
    ttft_s: float | None = Field(None, gt=0)
    tbt_s: float | None = Field(None, gt=0)
    e2e_s: float | None = Field(None, gt=0)

    def to_slo(self) -> SLO:
        return SLO(self.ttft_s, self.tbt_s, self.e2e_s)


class GatewaySpec(_Strict):
    """The `gateway:` section: where the gateway process listens."""

    http: str = "127.0.0.1:8000"
    grpc: str = "127.0.0.1:50051"
    max_inflight: int | None = Field(None, ge=1, description="requests the gateway holds at once; beyond it 429 "
                                     "with Retry-After. None = what the pools can hold (see Layout.capacity)")
    stall_s: float = Field(15.0, gt=0, description="a decode stream silent this long is moved to another pair")
    drain_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may run to finish")


class KVLink(_Strict):
    bandwidth_gbps: float = Field(200.0, gt=0, description="simulator: per-machine link for KV transfer, Gbit/s "
                                  "(the runtime's link is the machines' real one)")
    latency_s: float = Field(0.0, ge=0, description="simulator: added to every KV transfer")
    switch_gbps: float | None = Field(None, gt=0, description="simulator: a switch every KV transfer crosses, "
                                      "shared by all of them (None: no switch limit)")
    path: Literal["auto", "grpc", "ipc"] = Field(
        "auto", description="runtime: how prefill workers hand KV to decode workers: 'grpc' (bytes), 'ipc' (CUDA "
        "IPC handles; workers whose model is not on CUDA refuse to start), 'auto' (CUDA IPC between workers on "
        "one machine and GPU, gRPC elsewhere). The simulator models every transfer by bandwidth_gbps.")


class SimSpec(_Strict):
    """Simulator-only knobs (the runtime ignores them)."""

    perf_model: str = Field("roofline", description="'roofline', 'profile' (bundled splitwise_perf_model.csv) or a CSV path")
    kv_usable_fraction: float = Field(0.9, gt=0, le=1, description="share of machine memory usable for weights + KV")
    fallback_queue_tokens: int = Field(8192, ge=0, description="prefill backlog above which the router uses a decode machine (mixed pool)")
    slowdown_ref: str = Field("dgx-a100", description="hardware whose uncontended latency defines SLO slowdowns")
    drain_s: float = Field(600.0, ge=0, description="simulate this long after the last arrival; unfinished requests count as dropped")
    tbt_slo_basis: Literal["request", "gap"] = Field(
        "request", description="TBT slowdown SLO over each request's mean gap (splitwise-sim) or over every gap")
    dlm_fraction: float = Field(0.0, ge=0, lt=1, description="share of requests sent to the dlm pool")
    dlm_profile: str = Field("dlm_profile.json", description="seconds per dlm request by hardware and sampler "
                             "variant: a path, or a name under sim/data/ (`tandem dlm profile`)")
    dlm_variant: str = Field("freecache_guided", description="the dlm sampler variant the pool serves")
    # where splitwise-sim deliberately differs, its behaviour is one setting away (docs/sim.md, fidelity)
    decode_time_by: Literal["batch", "batch_tokens"] = Field(
        "batch", description="profile mode: token time by decode batch size, or as splitwise-sim does: "
        "interpolated over prompt_size x batch_size and queried with the batch size (nearly flat)")
    mixed_overhead: float = Field(0.0, ge=0, description="a mixed iteration (prompts + decode steps) costs "
                                  "(1 + this) x the prefill of its tokens; splitwise-sim: 0.1")
    kv_transfer: Literal["layerwise", "after_prefill"] = Field(
        "layerwise", description="KV pushed layer by layer during the prefill, or whole after it (splitwise-sim)")
    kv_link_sharing: Literal["fair", "none"] = Field(
        "fair", description="concurrent KV transfers share each worker's link, or each gets the whole link "
        "(splitwise-sim's DummyLink)")


class Layout(_Strict):
    name: str = "default"
    model: ModelRef = ModelRef()
    pools: list[Pool] = Field(default_factory=lambda: [Pool(role="mixed", count=1)])
    router: RouterSpec = RouterSpec()
    batching: Batching = Batching()
    slo: SLOSpec = SLOSpec()
    gateway: GatewaySpec = GatewaySpec()
    kv_link: KVLink = KVLink()
    registry: str = Field("memory", description="where workers register: 'memory' (in-process, the default) or "
                          "redis://HOST[:PORT][/DB][?ttl_s=SECONDS]")
    sim: SimSpec = SimSpec()

    @field_validator("registry")
    @classmethod
    def _check_registry(cls, value: str) -> str:
        parse_registry(value)
        return value

    @model_validator(mode="after")
    def _check_pools(self) -> Layout:
        roles = {p.role for p in self.pools if p.count > 0}
        if not roles:
            raise ValueError("pools: at least one pool needs count > 0")
        if ("prefill" in roles) != ("decode" in roles) and "mixed" not in roles:
            raise ValueError("pools: a prefill pool needs a decode pool (or a mixed pool) and vice versa")
        return self

    def pools_of(self, role: PoolRole) -> list[Pool]:
        return [p for p in self.pools if p.role == role and p.count > 0]

    def instance(self, role: PoolRole, index: int) -> tuple[int, Pool, int] | None:
        """Worker `index` of `role` (numbered across the role's pools in layout order, as `tandem up` numbers
        them) -> (its pool's position in `pools`, the pool, its instance within the pool); None past the end."""
        for pi, pool in enumerate(self.pools):
            if pool.role != role or pool.count <= 0:
                continue
            if index < pool.count:
                return pi, pool, index
            index -= pool.count
        return None

    def check_servable(self) -> None:
        """Refuse, naming the field, a setting the simulator models but the runtime cannot do; called where a
        layout is served or deployed (the gateway, `tandem up`, `tandem compose`, `tandem k8s`)."""
        if self.router.mixed_fallback and self.pools_of("prefill") and self.pools_of("decode"):
            raise InvalidArgument("router.mixed_fallback: the runtime never runs a prompt on a decode worker (only "
                                  "the simulator models Splitwise's mixed pool); set it to false to serve this "
                                  "layout", param="router.mixed_fallback")

    def capacity(self) -> int:
        """Requests the LLM pools hold at once (running + queued): the gateway's default admission bound.

        Each decode (or mixed) worker holds max_batch live + its waiting bound; each prefill worker its batch
        plus its waiting bound. A split cluster holds the smaller of its two halves.
        """
        def hold(role: PoolRole) -> int:
            return sum(p.count * (b.max_batch + b.waiting_bound())
                       for p in self.pools_of(role) for b in [p.batching or self.batching])

        split = min(hold("prefill"), hold("decode")) if self.pools_of("prefill") and self.pools_of("decode") else 0
        return max(1, split + hold("mixed"))


def _field_path(loc: tuple) -> str:
    return ".".join(str(x) for x in loc) or "layout"


def parse_layout(data: dict, source: str = "layout") -> Layout:
    """Validate a layout mapping; errors name the field, e.g. `pools.1.count`."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Layout.model_validate(data)
    except ValidationError as exc:
        lines = [f"{_field_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        first = exc.errors()[0]
        raise InvalidArgument(f"{source}: invalid layout: " + "; ".join(lines), param=_field_path(first["loc"])) from None


def load_layout(path: str | Path | None) -> Layout:
    """Read a layout YAML file; None gives the one-machine default (one mixed worker)."""
    if path is None:
        return Layout()
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"layout file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{p}: not valid YAML: {exc}") from None
    return parse_layout(data or {}, source=str(p))
