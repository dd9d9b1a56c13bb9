"""Named model shapes for random-weight models: real models' architectures, no checkpoint needed.

A worker, `tandem profile` and the benches load one as `random:<name>` (services/workers/modelspec.py); a layout
names it as `model: {name: llama-3.2-1b, path: "random:llama-3.2-1b", dtype: bfloat16}`.
"""

from __future__ import annotations

from services.engine.config import ModelConfig

SHAPES = {
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=512),
    "smollm2-135m": ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                                rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True, eos_ids=(2,)),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                                rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True, eos_ids=(128001,),
                                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}
