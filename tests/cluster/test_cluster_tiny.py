"""End to end over real processes: `tandem up` (1 gateway, 1 prefill, 2 decode) on a tiny random checkpoint.

Greedy output through gateway -> prefill -> KV push -> decode equals the single-process engine; the official
openai client works unmodified; disconnects free the decode slot and KV; bad input gets 400 / INVALID_ARGUMENT;
TTFT is split in the timings and in /metrics; SIGTERM stops every process `tandem up` started.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx
import pytest
from kit.cluster import alive

from services.engine.sampling import SamplingParams
from services.rpc.tandem.v1 import generation_pb2 as gpb
from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

pytestmark = pytest.mark.slow
PROMPTS = ["Hello world, hello", "The capital of France is", "def main():\n    return"]


def reference(engine, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    from services.engine.generate import generate, generate_text

    ids = engine.tokenizer.encode(prompt)
    p = SamplingParams(max_tokens=max_tokens, temperature=0)
    return list(generate(engine, ids, p)), "".join(generate_text(engine, ids, p))


def grpc_generate(up, **kw) -> list:
    with grpc.insecure_channel(up.grpc) as ch:
        return list(gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(**kw), timeout=60))


def decode_infos(up) -> list:
    from services.workers.client import WorkerClient

    health = httpx.get(f"{up.http}/health").json()
    out = []
    for w in health["workers"]:
        if w["role"] == "decode":
            with WorkerClient(w["address"]) as c:
                out.append(c.info())
    return out


def wait_decode_idle(up, timeout_s: float = 10.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        infos = decode_infos(up)
        if all(i.live_requests == 0 and i.waiting_requests == 0 and i.kv_free_bytes == i.kv_total_bytes
               for i in infos) or time.monotonic() > deadline:
            return infos
        time.sleep(0.1)


def test_greedy_split_path_equals_single_process_engine(split_cluster, tiny_engine_4k) -> None:
    results: dict[str, list] = {}

    def run(prompt: str) -> None:  # concurrently, so the decode workers batch them
        results[prompt] = grpc_generate(split_cluster, text=prompt, sampling=gpb.SamplingOptions(max_tokens=24, temperature=0))

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for prompt in PROMPTS:
        ref_ids, ref_text = reference(tiny_engine_4k, prompt, 24)
        msgs = results[prompt]
        ids = [t for m in msgs for t in m.token_ids]
        assert ids == ref_ids, prompt
        assert "".join(m.text for m in msgs) == ref_text
        last = msgs[-1]
        assert all(m.finish_reason == gpb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
        assert last.finish_reason in (gpb.FINISH_REASON_LENGTH, gpb.FINISH_REASON_STOP)
        n_prompt = len(tiny_engine_4k.tokenizer.encode(prompt))
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (n_prompt, len(ref_ids))
        assert last.usage.total_tokens == n_prompt + len(ref_ids)
        times = list(last.timings.token_times_s)
        assert len(times) == len(ref_ids) and times == sorted(times)
        assert len(last.workers) == 2 and "decode" not in last.workers[0]


def test_http_stream_order_usage_and_timings(split_cluster, tiny_engine_4k) -> None:
    ref_ids, ref_text = reference(tiny_engine_4k, PROMPTS[1], 20)
    body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 20, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{split_cluster.http}/v1/completions", json=body, headers={"x-request-id": "rid-42"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-request-id"] == "rid-42"
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    docs = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    text_docs, usage_doc = docs[:-1], docs[-1]
    assert "".join(d["choices"][0]["text"] for d in text_docs) == ref_text
    assert [d["choices"][0]["finish_reason"] for d in text_docs][:-1] == [None] * (len(text_docs) - 1)
    assert usage_doc["choices"] == [] and usage_doc["usage"]["completion_tokens"] == len(ref_ids)
    assert all(d["id"] == "cmpl-rid-42" for d in docs)
    t = text_docs[-1]["tandem_timings"]
    for key in ("queue_s", "prefill_s", "kv_transfer_s", "first_decode_s", "gateway_s", "ttft_s", "e2e_s"):
        assert t[key] >= 0, key
    assert t["ttft_s"] == pytest.approx(t["queue_s"] + t["prefill_s"] + t["kv_transfer_s"] + t["gateway_s"], abs=1e-6)
    assert t["prefill_s"] > 0 and t["first_decode_s"] > 0 and t["kv_bytes"] > 0
    assert t["ttft_s"] <= t["e2e_s"] and len(t["token_times_s"]) == len(ref_ids)


def test_openai_client_unmodified(split_cluster, tiny_engine_4k) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{split_cluster.http}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    _, ref_text = reference(tiny_engine_4k, PROMPTS[0], 12)
    c = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert c.choices[0].text == ref_text and c.usage.completion_tokens <= 12
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == ref_text

    messages = [{"role": "user", "content": "Hello there!"}]
    chat_ids = tiny_engine_4k.tokenizer.encode_chat(messages)
    from services.engine.generate import generate_text

    ref_chat = "".join(generate_text(tiny_engine_4k, chat_ids, SamplingParams(max_tokens=10, temperature=0)))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == ref_chat and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref_chat
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(chat_ids)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="nope", prompt="x")
    assert err.value.status_code == 400 and err.value.body["param"] == "model"


def test_stop_string_cuts_text_and_frees_decode(split_cluster, tiny_engine_4k) -> None:
    _, ref_text = reference(tiny_engine_4k, PROMPTS[2], 30)
    stop = ref_text[len(ref_text) // 2: len(ref_text) // 2 + 3]
    if not stop.strip() or "\ufffd" in stop:
        pytest.skip("the tiny model's continuation has no usable stop string")
    r = httpx.post(f"{split_cluster.http}/v1/completions", json={"model": "tiny", "prompt": PROMPTS[2], "max_tokens": 30,
                                                           "temperature": 0, "stop": [stop]}, timeout=60).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == ref_text[: ref_text.index(stop)]
    infos = wait_decode_idle(split_cluster)
    assert all(i.live_requests == 0 and i.kv_free_bytes == i.kv_total_bytes for i in infos)


def test_http_disconnect_and_grpc_cancel_free_decode_slot_and_kv(split_cluster) -> None:
    long = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{split_cluster.http}/v1/completions", json=long, timeout=60) as r:
        it = r.iter_lines()
        got = [ln for ln in (next(it) for _ in range(8)) if ln.startswith("data: ")]
        assert got
        busy = decode_infos(split_cluster)
        assert sum(i.live_requests for i in busy) == 1 and any(i.kv_free_bytes < i.kv_total_bytes for i in busy)
    infos = wait_decode_idle(split_cluster)
    assert all(i.live_requests == 0 and i.kv_free_bytes == i.kv_total_bytes for i in infos)

    with grpc.insecure_channel(split_cluster.grpc) as ch:
        call = gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(
            text=PROMPTS[0], sampling=gpb.SamplingOptions(max_tokens=3000, temperature=0, ignore_eos=True)), timeout=60)
        for _ in range(5):
            next(call)
        assert sum(i.live_requests for i in decode_infos(split_cluster)) == 1
        call.cancel()
    infos = wait_decode_idle(split_cluster)
    assert all(i.live_requests == 0 and i.kv_free_bytes == i.kv_total_bytes for i in infos)
    metrics = httpx.get(f"{split_cluster.http}/metrics").text
    assert 'tandem_gateway_requests_total{api="completions",outcome="cancelled"} 1.0' in metrics
    assert 'tandem_gateway_requests_total{api="grpc",outcome="cancelled"} 1.0' in metrics


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 5000}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "n": 3}, "n"),
    ({"model": "gpt-4", "prompt": "hi"}, "model"),
    ({"prompt": "hi"}, "model"),
    ({"model": "tiny", "prompt": [99999]}, "prompt"),
    ("{not json", "body"),
])
def test_bad_http_input_is_400_openai_error(split_cluster, body, param) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{split_cluster.http}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and param.split(".")[0] in err["message"]


def test_bad_chat_input_is_400(split_cluster) -> None:
    for body in ({"model": "tiny", "messages": []}, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
                 {"model": "tiny", "messages": "hi"}):
        r = httpx.post(f"{split_cluster.http}/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text


@pytest.mark.parametrize("kw, field", [
    ({"text": ""}, "text"),
    ({}, "input"),
    ({"token_ids": gpb.TokenIds(ids=[])}, "token_ids"),
    ({"text": "hi", "sampling": gpb.SamplingOptions(max_tokens=5000)}, "text"),
    ({"text": "hi", "sampling": gpb.SamplingOptions(temperature=-1)}, "temperature"),
    ({"text": "hi", "sampling": gpb.SamplingOptions(top_p=1.5)}, "top_p"),
    ({"text": "hi", "model": "gpt-4"}, "model"),
])
def test_bad_grpc_input_is_invalid_argument(split_cluster, kw, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        grpc_generate(split_cluster, **kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


def test_metrics_have_ttft_split_and_kv_transfer(split_cluster) -> None:
    with grpc.insecure_channel(split_cluster.grpc) as ch:
        call = gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(
            text="metrics please", sampling=gpb.SamplingOptions(max_tokens=4, temperature=0)),
            metadata=(("x-request-id", "grpc-rid-7"),), timeout=60)
        msgs = list(call)
        assert ("x-request-id", "grpc-rid-7") in call.initial_metadata()
    assert all(m.request_id == "grpc-rid-7" for m in msgs)
    text = httpx.get(f"{split_cluster.http}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    for phase in ("queue", "prefill", "kv_transfer", "first_decode", "gateway"):
        assert samples[f'tandem_ttft_phase_seconds_count{{phase="{phase}"}}'] >= 1
    assert samples["tandem_ttft_seconds_count"] >= 1 and samples["tandem_e2e_seconds_count"] >= 1
    assert samples["tandem_inter_token_latency_seconds_count"] >= 3
    assert samples["tandem_kv_transfer_bytes_total"] > 0 and samples["tandem_kv_transfer_seconds_count"] >= 1
    assert samples["tandem_running_requests"] == 0 and samples["tandem_waiting_requests"] == 0


def test_deadlines_fail_cleanly_and_free_the_decode_slot(split_cluster) -> None:
    long = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    r = httpx.post(f"{split_cluster.http}/v1/completions", json=long, headers={"x-tandem-timeout-s": "0.5"}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    with pytest.raises(grpc.RpcError) as err:
        with grpc.insecure_channel(split_cluster.grpc) as ch:
            list(gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(
                text=PROMPTS[0], sampling=gpb.SamplingOptions(max_tokens=3000, ignore_eos=True)), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    infos = wait_decode_idle(split_cluster)
    assert all(i.live_requests == 0 and i.kv_free_bytes == i.kv_total_bytes for i in infos)


def test_one_token_request_finishes_at_prefill(split_cluster, tiny_engine_4k) -> None:
    ref_ids, _ = reference(tiny_engine_4k, PROMPTS[1], 1)
    msgs = grpc_generate(split_cluster, text=PROMPTS[1], sampling=gpb.SamplingOptions(max_tokens=1, temperature=0))
    assert [t for m in msgs for t in m.token_ids] == ref_ids
    assert msgs[-1].finish_reason == gpb.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == 1
    assert msgs[-1].timings.kv_bytes == 0  # nothing was pushed: the first token ended it


def test_non_streaming_client_that_gives_up_frees_the_decode_slot(split_cluster) -> None:
    long = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{split_cluster.http}/v1/completions", json=long, timeout=httpx.Timeout(60, read=0.8))
    infos = wait_decode_idle(split_cluster)
    assert all(i.live_requests == 0 and i.kv_free_bytes == i.kv_total_bytes for i in infos)
    metrics = httpx.get(f"{split_cluster.http}/metrics").text
    assert 'tandem_gateway_requests_total{api="completions",outcome="cancelled"} 2.0' in metrics


def test_grpc_front_door_serves_health_and_reflection(split_cluster) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(split_cluster.grpc) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Generation"), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([req]), timeout=5))
        assert "tandem.v1.Generation" in {s.name for s in resp.list_services_response.service}


def test_sigterm_stops_every_process_it_started(split_cluster) -> None:
    kids = split_cluster.children()
    assert len(kids) == 4  # gateway + prefill + 2 decode
    assert split_cluster.stop(signal.SIGTERM, timeout=40) == 0
    deadline = time.monotonic() + 5
    while any(alive(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in kids if alive(p)]
