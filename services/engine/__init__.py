"""The model runtime shared by every worker: a Llama-family decoder, KV ownership, loading, sampling."""

from services.engine.config import ModelConfig
from services.engine.engine import Engine, model_fingerprint, random_engine
from services.engine.kv import KVBuffer
from services.engine.loader import default_model_path, load_engine

__all__ = ["Engine", "KVBuffer", "ModelConfig", "default_model_path", "load_engine", "model_fingerprint",
           "random_engine"]
