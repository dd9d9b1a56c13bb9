"""The gateway: OpenAI-compatible HTTP and the gRPC `Generation` front door over the prefill/decode pools."""
