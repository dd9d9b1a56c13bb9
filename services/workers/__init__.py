"""Splitwise's worker pools: prefill, decode and mixed gRPC workers, and the layer-wise KV wire format."""
