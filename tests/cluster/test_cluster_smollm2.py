"""End to end with the real model: `tandem up` (1 gateway, 1 prefill, 1 decode) serving SmolLM2-135M-Instruct.

Greedy output through gateway -> prefill -> KV transfer -> decode equals the single-process engine's output
for several prompts (plain and chat), and the official openai client gets the same text.
"""

from __future__ import annotations

import threading

import grpc
import pytest

from services.engine.sampling import SamplingParams
from services.rpc.tandem.v1 import generation_pb2 as gpb
from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHATS = [[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 2?"}]]
MAX_TOKENS = 16


_REFS: dict[tuple[int, ...], tuple[list[int], str]] = {}


def reference(engine, ids: list[int]) -> tuple[list[int], str]:
    """The single-process engine's greedy ids and text (computed once per prompt)."""
    from services.engine.generate import generate

    if tuple(ids) not in _REFS:
        out = list(generate(engine, ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0)))
        _REFS[tuple(ids)] = out, engine.tokenizer.decode(out, skip_special_tokens=True)
    return _REFS[tuple(ids)]


def test_greedy_disaggregated_equals_single_process(smol_split_cluster, smol_engine) -> None:
    requests = [gpb.GenerateRequest(text=p) for p in PROMPTS]
    requests += [gpb.GenerateRequest(chat=gpb.ChatMessages(messages=[gpb.ChatMessage(**m) for m in c])) for c in CHATS]
    out: dict[int, list] = {}

    def run(i: int, req: gpb.GenerateRequest) -> None:
        req.sampling.CopyFrom(gpb.SamplingOptions(max_tokens=MAX_TOKENS, temperature=0))
        with grpc.insecure_channel(smol_split_cluster.grpc) as ch:
            out[i] = list(gpb_grpc.GenerationStub(ch).Generate(req, timeout=120))

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    inputs = [smol_engine.tokenizer.encode(p) for p in PROMPTS] + [smol_engine.tokenizer.encode_chat(c) for c in CHATS]
    for i, ids in enumerate(inputs):
        ref_ids, ref_text = reference(smol_engine, ids)
        msgs = out[i]
        assert [t for m in msgs for t in m.token_ids] == ref_ids, i
        assert "".join(m.text for m in msgs) == ref_text
        assert msgs[-1].usage.prompt_tokens == len(ids) and msgs[-1].usage.completion_tokens == len(ref_ids)
        assert msgs[-1].timings.kv_bytes > 0 and len(msgs[-1].workers) == 2


def test_openai_client_gets_the_engine_text(smol_split_cluster, smol_engine) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{smol_split_cluster.http}/v1", api_key="unused", max_retries=0)
    _, ref_chat = reference(smol_engine, smol_engine.tokenizer.encode_chat(CHATS[0]))
    r = client.chat.completions.create(model="smollm2-135m", messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == ref_chat
