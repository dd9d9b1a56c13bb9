"""The model runtime shared by every worker: a Llama-family decoder, KV ownership, loading, sampling."""

from services.engine.config import ModelConfig
from services.engine.engine import Engine, model_fingerprint, random_engine
from services.engine.kv import KVBuffer

__all__ = ["Engine", "KVBuffer", "ModelConfig", "model_fingerprint", "random_engine"]
