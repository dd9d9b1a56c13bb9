"""The engine's forward pass against Hugging Face transformers, and its KV cache behaviour (incremental, batched, moved)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kit.checkpoints import tiny_config, write_tiny_checkpoint

from services.engine import load_engine
from services.engine.generate import generate
from services.engine.kv import KVBuffer
from services.engine.sampling import Sampler, SamplingParams, sample_batch

transformers = pytest.importorskip("transformers")


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
VARIANTS = {
    "gqa-untied": tiny_config(),
    "mha-tied": tiny_config(n_kv_heads=4, tie_embeddings=True),
    "gqa-tied-llama3": tiny_config(n_kv_heads=1, tie_embeddings=True, rope_scaling=LLAMA3, rope_theta=500000.0),
    "linear-rope-bias": tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True),
}


@pytest.fixture(scope="module")
def variant_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny_checkpoint(root / name, cfg, seed=i, shards=1 + i % 2)
            for i, (name, cfg) in enumerate(VARIANTS.items())}


def full_logits(engine, ids: list[int]) -> torch.Tensor:
    kv = engine.new_kv(1, len(ids))
    with torch.inference_mode():
        return engine.model(torch.tensor([ids]), kv, slice(0, 1), [0])[0].float()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant_checkpoints: dict[str, Path], variant: str) -> None:
    path = variant_checkpoints[variant]
    ours = load_engine(path, device="cpu")
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ours.cfg.tie_embeddings == VARIANTS[variant].tie_embeddings
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 100), generator=g)  # past llama3's original 32 positions
    with torch.no_grad():
        expected = ref(ids).logits[0]
    got = full_logits(ours, ids[0].tolist())
    assert expected.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # the public prefill path returns the same last-token logits
    last = ours.prefill([ids[0].tolist()], ours.new_kv(1, 100), [0])[0]
    torch.testing.assert_close(last, expected[-1], atol=1e-4, rtol=1e-4)


def test_incremental_decode_equals_full_recompute(tiny_engine) -> None:
    ids = torch.randint(0, tiny_engine.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    full = full_logits(tiny_engine, ids)
    kv = tiny_engine.new_kv(1, 64)
    steps = [tiny_engine.prefill([ids[:10]], kv, [0])[0]]
    for t in ids[10:]:
        steps.append(tiny_engine.decode([t], kv, slice(0, 1))[0])
    assert kv.lengths[0] == 40
    torch.testing.assert_close(torch.stack(steps[:-1]), full[9:-1], atol=1e-4, rtol=1e-4)


def test_mixed_length_batch_equals_each_alone(tiny_engine) -> None:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, tiny_engine.cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 9, 1)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [list(generate(tiny_engine, p, params)) for p in prompts]
    # batched: one prefill over right-padded prompts, then fused decode steps over slots given as a tensor
    kv = tiny_engine.new_kv(len(prompts), 40)
    slots = torch.tensor([2, 0, 3, 1])
    logits = tiny_engine.prefill(prompts, kv, slots.tolist())
    samplers = [Sampler(params) for _ in prompts]
    batched = [[t] for t in sample_batch(logits, samplers)]
    for _ in range(11):
        logits = tiny_engine.decode([b[-1] for b in batched], kv, slots)
        for b, t in zip(batched, sample_batch(logits, samplers), strict=True):
            b.append(t)
    assert batched == alone
    assert [kv.lengths[s] for s in slots.tolist()] == [len(p) + 11 for p in prompts]


def test_dense_slice_decode_equals_gathered_slots(tiny_engine) -> None:
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    a, b = tiny_engine.new_kv(2, 16), tiny_engine.new_kv(3, 16)
    la = tiny_engine.prefill(prompts, a, [0, 1])
    lb = tiny_engine.prefill(prompts, b, [2, 0])
    torch.testing.assert_close(la, lb)
    da = tiny_engine.decode([1, 2], a, slice(0, 2))
    db = tiny_engine.decode([1, 2], b, torch.tensor([2, 0]))
    torch.testing.assert_close(da, db, atol=1e-5, rtol=1e-5)


def test_export_import_into_fresh_cache_continues_identically(tiny_engine) -> None:
    prompt = list(range(3, 30))
    src = tiny_engine.new_kv(1, 64)
    logits = tiny_engine.prefill([prompt], src, [0])
    token = int(logits[0].argmax())
    layers = src.export(0)
    assert len(layers) == tiny_engine.cfg.n_layers and layers[0][0].shape == (27, tiny_engine.cfg.n_kv_heads, tiny_engine.cfg.head_dim)
    # the receiving side only sees raw bytes with dtype/shape, as over the wire
    wire = [(k.numpy().tobytes(), v.numpy().tobytes(), tuple(k.shape)) for k, v in layers]
    dst = KVBuffer(tiny_engine.cfg, slots=3, capacity=64)
    for i, (kb, vb, shape) in enumerate(wire):
        k = torch.frombuffer(bytearray(kb), dtype=torch.float32).reshape(shape)
        v = torch.frombuffer(bytearray(vb), dtype=torch.float32).reshape(shape)
        dst.import_layer(2, i, k, v)
    dst.lengths[2] = len(prompt)
    out_src, out_dst, t_src, t_dst = [], [], token, token
    for _ in range(10):
        ls = tiny_engine.decode([t_src], src, slice(0, 1))[0]
        ld = tiny_engine.decode([t_dst], dst, torch.tensor([2]))[0]
        torch.testing.assert_close(ls, ld, atol=1e-5, rtol=1e-5)
        t_src, t_dst = int(ls.argmax()), int(ld.argmax())
        out_src.append(t_src)
        out_dst.append(t_dst)
    assert out_src == out_dst


def test_import_rejects_mismatched_layers(tiny_engine) -> None:
    from services.contracts.errors import InvalidArgument

    kv = tiny_engine.new_kv(1, 8)
    good = torch.zeros(4, tiny_engine.cfg.n_kv_heads, tiny_engine.cfg.head_dim)
    with pytest.raises(InvalidArgument, match="dtype"):
        kv.import_layer(0, 0, good.double(), good.double())
    with pytest.raises(InvalidArgument, match="shape"):
        kv.import_layer(0, 0, good[:, :1], good[:, :1])
    with pytest.raises(InvalidArgument, match="layers"):
        kv.import_all(0, [(good, good)] * (tiny_engine.cfg.n_layers + 1))


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_engine) -> None:
    p = [3, 4, 5]
    run = lambda seed: list(generate(tiny_engine, p, SamplingParams(max_tokens=20, temperature=1.0, top_k=50,  # noqa: E731
                                                               top_p=0.9, seed=seed, ignore_eos=True)))
    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.gpu
def test_cuda_bfloat16_tracks_cpu_float32(variant_checkpoints: dict[str, Path]) -> None:
    cpu = load_engine(variant_checkpoints["gqa-untied"], device="cpu")
    gpu = load_engine(variant_checkpoints["gqa-untied"], device="cuda")
    assert gpu.dtype == torch.bfloat16 and gpu.model.inv_freq.dtype == torch.float32
    ids = list(range(3, 60))
    a = cpu.prefill([ids], cpu.new_kv(1, 64), [0])[0]
    b = gpu.prefill([ids], gpu.new_kv(1, 64), [0])[0].cpu()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
