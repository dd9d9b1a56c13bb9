"""Hardware and model catalogs: every number with the source it came from.

A machine is the unit the router sees (a DGX box, or this CPU); a model spec yields the per-token KV bytes
and the FLOPs/bytes the roofline needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.contracts.errors import InvalidArgument


@dataclass(slots=True, frozen=True)
class Hardware:
    """One machine. Throughput figures are whole-machine (all GPUs), power is whole-machine wall power."""

    name: str
    gpus: int
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bw: float  # bytes/s
    memory_bytes: float
    power_idle_w: float
    power_peak_w: float
    cost_per_hour: float  # $ per machine-hour
    link_gbps: float  # scale-out network for KV transfer, Gbit/s
    mfu: float  # roofline efficiency: achieved / peak FLOP/s in compute-bound phases
    mbu: float  # roofline efficiency: achieved / peak bytes/s in memory-bound phases
    iter_overhead_s: float  # fixed cost per forward pass (launches, tensor-parallel all-reduce)
    profile_name: str | None  # the `hardware` value in splitwise_perf_model.csv, if profiled
    sources: str
    # measured power-capped rows in splitwise_perf_model.csv: (their `hardware` value, the cap in W per machine)
    capped_profile: tuple[str, float] | None = None


_GB = 1e9
_GiB = 2**30

HARDWARE: dict[str, Hardware] = {
    "dgx-a100": Hardware(
        name="dgx-a100", gpus=8, peak_flops=8 * 312e12, hbm_bw=8 * 2.039e12, memory_bytes=8 * 80 * _GiB,
        power_idle_w=0.3 * 6500, power_peak_w=6500, cost_per_hour=17.6, link_gbps=8 * 200,
        mfu=0.5, mbu=0.6, iter_overhead_s=0.004, profile_name="a100-80gb",
        sources="A100-SXM4-80GB datasheet (312 TFLOP/s dense bf16, 2,039 GB/s HBM2e, 80 GB); DGX A100 datasheet "
        "(6.5 kW max, 8x 200 Gb/s HDR InfiniBand); memory 80 GiB per GPU (nvidia-smi: 81,920 MiB; splitwise-sim "
        "uses the same); $17.6/h: Splitwise paper (ISCA'24) Table; idle 30% of max: "
        "our assumption; mfu/mbu/overhead: typical serving efficiencies (our assumption; profile mode replaces them)",
    ),
    "dgx-h100": Hardware(
        name="dgx-h100", gpus=8, peak_flops=8 * 989e12, hbm_bw=8 * 3.35e12, memory_bytes=8 * 80 * _GiB,
        power_idle_w=0.3 * 10200, power_peak_w=10200, cost_per_hour=38.0, link_gbps=8 * 400,
        mfu=0.5, mbu=0.6, iter_overhead_s=0.004, profile_name="h100-80gb",
        sources="H100-SXM5-80GB datasheet (989 TFLOP/s dense bf16, 3.35 TB/s HBM3, 80 GB); DGX H100 datasheet "
        "(10.2 kW max, 8x 400 Gb/s NDR InfiniBand); memory 80 GiB per GPU (5 HBM3 stacks of 16 GiB; splitwise-sim "
        "uses the same); $38/h: Splitwise paper Table; idle 30%: our assumption; capped rows: "
        "splitwise_perf_model.csv's h100-80gb-pcap, run at splitwise-sim's dgx-h100-pcap TDP of 7,140 W (70%)",
        capped_profile=("h100-80gb-pcap", 7140.0),
    ),
    "h200": Hardware(
        name="h200", gpus=8, peak_flops=8 * 989e12, hbm_bw=8 * 4.8e12, memory_bytes=8 * 141 * _GB,
        power_idle_w=0.3 * 10200, power_peak_w=10200, cost_per_hour=38.0 * 1.25, link_gbps=8 * 400,
        mfu=0.5, mbu=0.6, iter_overhead_s=0.004, profile_name=None,
        sources="H200-SXM datasheet (989 TFLOP/s dense bf16, 4.8 TB/s HBM3e, 141 GB); DGX H200 datasheet "
        "(~10.2 kW max, 8x 400 Gb/s); $/h: 1.25x DGX-H100, our assumption (no list price used)",
    ),
    "h200x1": Hardware(
        name="h200x1", gpus=1, peak_flops=989e12, hbm_bw=4.8e12, memory_bytes=141 * _GB,
        power_idle_w=0.3 * 700, power_peak_w=700, cost_per_hour=38.0 * 1.25 / 8, link_gbps=400,
        mfu=0.5, mbu=0.6, iter_overhead_s=0.004, profile_name=None,
        sources="one H200-SXM GPU (989 TFLOP/s dense bf16, 4.8 TB/s HBM3e, 141 GB; 700 W max TDP): a worker "
        "pinned to one GPU of a multi-GPU host (`device: cuda:N`); $/h: an eighth of the h200 machine; link: "
        "one 400 Gb/s NIC; efficiencies as h200 (our assumption; a `tandem profile` table replaces them)",
    ),
    "cpu": Hardware(
        name="cpu", gpus=0, peak_flops=2 * 2.6e9 * 64, hbm_bw=20 * _GB, memory_bytes=24 * 2**30,
        power_idle_w=20.0, power_peak_w=60.0, cost_per_hour=0.10, link_gbps=10.0,
        mfu=0.3, mbu=0.5, iter_overhead_s=0.002, profile_name=None,
        sources="this dev machine (lscpu: 2 cores AMD EPYC Zen 5 with AVX-512: 2 cores x ~2.6 GHz x 64 fp32 "
        "FLOP/cycle; free -g: 24 GiB); bandwidth, power, $/h and efficiencies: rough estimates, to be replaced by "
        "`tandem profile` tables",
    ),
}


@dataclass(slots=True, frozen=True)
class ModelShape:
    name: str
    params: float
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    dtype_bytes: int = 2
    profile_name: str | None = None
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes


MODELS: dict[str, ModelShape] = {
    "bloom-176b": ModelShape("bloom-176b", 176.2e9, 70, 14336, 112, 112, profile_name="bloom-176b",
                            source="bigscience/bloom config.json (n_layer 70, hidden 14336, 112 heads, MHA)"),
    "llama2-70b": ModelShape("llama2-70b", 68.98e9, 80, 8192, 64, 8, profile_name="llama2-70b",
                            source="meta-llama/Llama-2-70b-hf config.json (80 layers, 8192, 64 heads, 8 KV heads)"),
    "llama3-8b": ModelShape("llama3-8b", 8.03e9, 32, 4096, 32, 8,
                           source="meta-llama/Meta-Llama-3-8B config.json (32 layers, 4096, 32 heads, 8 KV heads)"),
    "llama-3.2-1b": ModelShape("llama-3.2-1b", 1.236e9, 16, 2048, 32, 8,
                              source="meta-llama/Llama-3.2-1B config.json (16 layers, 2048, 32 heads, 8 KV heads, "
                              "head dim 64, tied embeddings: 1.24B parameters)"),
    "smollm2-135m": ModelShape("smollm2-135m", 134.5e6, 30, 576, 9, 3,
                              source="HuggingFaceTB/SmolLM2-135M config.json (30 layers, 576, 9 heads, 3 KV heads)"),
}


def hardware(name: str, field: str = "hardware") -> Hardware:
    try:
        return HARDWARE[name]
    except KeyError:
        raise InvalidArgument(f"{field}: unknown hardware {name!r}; known: {', '.join(HARDWARE)}",
                              param=field) from None


def model(name: str, field: str = "model.name") -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise InvalidArgument(f"{field}: unknown model {name!r}; known: {', '.join(MODELS)}", param=field) from None
