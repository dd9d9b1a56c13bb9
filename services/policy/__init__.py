"""Diffusion-policy worker: a transformer action denoiser with Block-wise Adaptive Caching (BAC)."""
