"""Prompts near the context length complete on the split cluster on CPU (the embedded SmolLM2-135M, context 8192).

The KV push limit starts when the KV is ready and grows with the prompt, so a forward pass of minutes is not a
timeout. Minutes of CPU: runs with TANDEM_LONG_PROMPTS=1 (see docs/reliability.md for a measured run).
"""

from __future__ import annotations

import os
import time

import grpc
import pytest
from kit.faults import start_split, stop_split

from services.rpc.tandem.v1 import generation_pb2 as gpb
from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("TANDEM_LONG_PROMPTS") != "1",
                                 reason="minutes of CPU prefill; set TANDEM_LONG_PROMPTS=1")]


@pytest.mark.timeout(3600)
def test_7000_and_8100_token_prompts_complete(tmp_path) -> None:
    split = start_split(tmp_path, None, 1, 1)
    try:
        with grpc.insecure_channel(split.grpc) as ch:
            stub = gpb_grpc.GenerationStub(ch)
            for n in (7000, 8100):
                req = gpb.GenerateRequest(text="hello " * (n - 1), timeout_s=1500)  # n SmolLM2 tokens
                req.sampling.max_tokens, req.sampling.temperature = 8, 0.0
                t0 = time.perf_counter()
                out = list(stub.Generate(req, timeout=1500))
                last = out[-1]
                print(f"\n{last.usage.prompt_tokens}-token prompt: {last.usage.completion_tokens} tokens in "
                      f"{time.perf_counter() - t0:.1f}s (prefill {last.timings.prefill_s:.1f}s, KV transfer not "
                      f"hidden {last.timings.kv_transfer_s:.2f}s, TTFT {last.timings.ttft_s:.1f}s)")
                assert last.finish_reason and last.usage.prompt_tokens == n
                assert last.usage.completion_tokens >= 1
    finally:
        stop_split(split)
