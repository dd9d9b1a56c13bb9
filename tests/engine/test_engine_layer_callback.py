"""Engine.prefill's on_layer: called once per layer, in order, after that layer's K/V are in the cache and before
the next layer's are (eager path and the fused step); the layer-wise KV push hangs on it."""

from __future__ import annotations

import threading

import torch
from kit.checkpoints import tiny_config

from services.engine.engine import random_engine
from services.engine.fused import TORCH_OPS, fuse_weights, prefill_step

PROMPTS = [[5, 6, 7, 8, 9], list(range(20, 60))]


def _watch(kv, seen: list[tuple[int, bool, bool]]):
    def on_layer(i: int) -> None:  # (layer, its K written, the next layer's K still empty)
        nxt = kv.k[i + 1].abs().sum().item() == 0 if i + 1 < kv.k.shape[0] else True
        seen.append((i, kv.k[i].abs().sum().item() > 0, nxt))
    return on_layer


def test_eager_prefill_calls_on_layer_in_order_and_leaves_no_hook() -> None:
    engine = random_engine(tiny_config(), seed=1)
    kv, seen = engine.new_kv(2, 64), []
    logits = engine.prefill(PROMPTS, kv, [0, 1], _watch(kv, seen))
    n = engine.cfg.n_layers
    assert seen == [(i, True, True) for i in range(n)]
    assert all(not layer._forward_hooks for layer in engine.model.layers)
    plain = engine.new_kv(2, 64)
    assert torch.equal(engine.prefill(PROMPTS, plain, [0, 1]), logits)
    assert torch.equal(plain.k, kv.k)


def test_eager_on_layer_ignores_other_threads() -> None:
    engine = random_engine(tiny_config(), seed=1)
    calls: list[int] = []
    other = engine.new_kv(1, 64)
    gate = threading.Event()

    def on_layer(i: int) -> None:
        if i == 0:  # another thread runs a forward on the same model while this prefill is in flight
            t = threading.Thread(target=lambda: (engine.prefill([[3, 4, 5]], other, [0]), gate.set()))
            t.start()
            t.join()
        calls.append(i)

    engine.prefill([[5, 6, 7]], engine.new_kv(1, 64), [0], on_layer)
    assert gate.is_set() and calls == list(range(engine.cfg.n_layers))


def test_fused_prefill_step_calls_on_layer_after_each_layer() -> None:
    engine = random_engine(tiny_config(), seed=1)
    fm = fuse_weights(engine.model)
    kv, seen = engine.new_kv(2, 64), []
    t = max(len(p) for p in PROMPTS)
    tokens = torch.zeros(2, t, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = torch.tensor(p)
    last = torch.tensor([len(p) - 1 for p in PROMPTS])
    prefill_step(fm, TORCH_OPS, tokens, torch.tensor([0, 1]), last, kv.k, kv.v, _watch(kv, seen))
    assert seen == [(i, True, True) for i in range(engine.cfg.n_layers)]
