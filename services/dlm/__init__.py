"""Masked diffusion LM worker: tiny LLaDA-style model, FreeCache and Guided Diffusion sampling, gRPC service."""
