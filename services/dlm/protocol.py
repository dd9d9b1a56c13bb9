"""The dlm worker's contract, torch-free: its gRPC service and model names, the request options a caller may set
(with the JSON type each must have), and `DLMChunk`, one streamed response. The worker, its client and the
gateway all take them from here."""

from __future__ import annotations

from dataclasses import dataclass

SERVICE = "tandem.v1.Diffusion"
MODEL_NAME = "tandem-dlm-char"  # the name the gateway serves the char-level DLM under
# DiffusionGenerateRequest's optional fields (the sampler options a request may override, plus `guided`), with
# the JSON types the gateway accepts for each in a completions body.
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "gen_len": (int,), "block": (int,), "steps_per_block": (int,), "cache": (str,), "guided": (bool,),
    "accept": (str,), "k": (int,), "tau": (int, float)}
OPTION_FIELDS: tuple[str, ...] = tuple(OPTION_TYPES)


@dataclass(slots=True)
class DLMChunk:
    """One DiffusionGenerateResponse: the text committed since the previous one and the running counters."""

    text: str
    committed_tokens: int
    steps: int
    forward_passes: int
    dlm_tokens: int
    done: bool


# Named sampler variants and the request options each sets. The bench, the profile behind the simulator's dlm
# cost table and a layout's `sim.dlm_variant` use these names.
VARIANT_OPTIONS: dict[str, dict[str, object]] = {
    "baseline": {"cache": "off", "guided": False},
    "freecache": {"cache": "freecache", "guided": False},
    "guided": {"cache": "off", "guided": True},
    "freecache_guided": {"cache": "freecache", "guided": True},
    "freecache_lag": {"cache": "freecache_lag", "guided": False},
    "refresh_block": {"cache": "refresh_block", "guided": False},
    # every draft of one DLM forward committed, no guide judging them: what Guided Diffusion is compared against
    "parallel": {"cache": "off", "guided": True, "accept": "all"},
}
VARIANTS = ("baseline", "freecache", "guided", "freecache_guided")  # the four every comparison reports
ABLATIONS = ("freecache_lag", "refresh_block", "parallel")
