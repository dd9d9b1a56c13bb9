"""Tandem's runtime: engine, prefill/decode/mixed workers, gateway, diffusion workers, cluster launcher."""

__version__ = "0.1.0"
