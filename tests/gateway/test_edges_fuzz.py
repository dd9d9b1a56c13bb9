"""Property-based fuzzing of both front doors (hypothesis), bounded for CI: zero 5xx, zero INTERNAL, zero hangs.

Bodies mix well-formed requests, every request field with arbitrary JSON (huge integers, NaN, lone surrogates,
deep nesting), unknown fields and raw bytes; gRPC gets arbitrary GenerateRequest messages and arbitrary bytes.
Every answer must be a success or a 4xx OpenAI error / a client-error status, within the timeout.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.edgegw import edge_gateway

from services.rpc.tandem.v1 import generation_pb2 as pb
from services.rpc.tandem.v1 import generation_pb2_grpc as pb_grpc

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLIENT_ERRORS = {400, 401, 404, 405, 413, 422, 429}
GRPC_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # surrogates included
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | any_text)
any_json = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(any_text, kids, max_size=3),
                        max_leaves=12)
good = {  # valid values (the arbitrary ones come from any_json below)
    "model": st.sampled_from(["tiny", ""]),
    "prompt": st.sampled_from(["hi", "The capital of France is"]) | st.lists(st.integers(0, 383), min_size=1, max_size=4),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": st.text(max_size=12)}), min_size=1, max_size=3),
    "max_tokens": st.integers(1, 200), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50), "seed": st.sampled_from([0, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1), "stream": st.booleans(),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4), "n": st.just(1), "logit_bias": st.just({}),
    "response_format": st.just({"type": "text"}), "stream_options": st.just({"include_usage": True}),
    "user": st.text(max_size=8), "ignore_eos": st.booleans(),
}
CHAT_ONLY, COMPLETIONS_ONLY = {"messages", "response_format"}, {"prompt"}


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, object]:
    """(path, body): mostly-valid bodies with a few fields drawn valid and, half the time, one made arbitrary."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return path, draw(any_json)
    body = {"model": "tiny", "max_tokens": draw(st.integers(1, 8))}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    names = sorted(set(good) - (COMPLETIONS_ONLY if chat else CHAT_ONLY))
    for name in names:
        if draw(st.booleans()):
            body[name] = draw(good[name])
    if kind < 5:
        body[draw(st.sampled_from([*sorted(good), "bogus"]))] = draw(any_json)
    return path, body


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    with edge_gateway(tmp_path_factory.mktemp("fuzz")) as g:
        with httpx.Client(base_url=g.http, timeout=10) as client:
            g.client = client
            yield g


def _check_http(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        err = r.json()["error"]
        assert r.status_code in CLIENT_ERRORS and err["type"] == "invalid_request_error" and err["message"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, r.text
    else:
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text


@settings(FUZZ, max_examples=100)
@given(case=cases())
def test_http_json_bodies_never_5xx(gw, case) -> None:
    path, body = case
    raw = json.dumps(body, allow_nan=True)  # ensure_ascii: lone surrogates travel as \\ud800 escapes
    _check_http(gw.client.post(path, content=raw, headers={"content-type": "application/json"}))


@settings(FUZZ, max_examples=30)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models/x", "/v1/models"]))
def test_http_raw_bytes_never_5xx(gw, raw, path) -> None:
    _check_http(gw.client.post(path, content=raw))


floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
sampling = st.builds(pb.SamplingOptions, max_tokens=st.none() | st.integers(0, 64) | st.integers(0, 2**32 - 1),
                     temperature=st.none() | st.floats(0, 2, width=32) | floats32,
                     top_k=st.integers(0, 50) | st.integers(0, 2**32 - 1),
                     top_p=st.none() | st.floats(0.0625, 1, width=32) | floats32,
                     seed=st.none() | st.sampled_from([2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1), stop=st.lists(st.text(max_size=8), max_size=6),
                     ignore_eos=st.booleans())
messages = st.lists(st.builds(pb.ChatMessage, role=st.sampled_from(["user", "assistant", "system"]) | st.sampled_from(["wizard", ""]) | st.text(),
                              content=st.text(max_size=20)), max_size=3)
inputs = st.one_of(st.builds(dict, text=st.text(max_size=40)),
                   st.builds(dict, token_ids=st.builds(pb.TokenIds, ids=st.lists(st.integers(0, 2**32 - 1), max_size=5))),
                   st.builds(dict, chat=st.builds(pb.ChatMessages, messages=messages)), st.builds(dict, chat=st.builds(pb.ChatMessages, messages=messages)),
                   st.just({}))
requests = st.builds(lambda model, inp, s, t: pb.GenerateRequest(model=model, sampling=s, timeout_s=t, **inp),
                     st.sampled_from(["", "tiny"]) | st.sampled_from(["gpt-4"]) | st.text(max_size=5), inputs,
                     st.none() | st.builds(pb.SamplingOptions, max_tokens=st.integers(1, 64)) | sampling,
                     st.sampled_from([0.0, 5.0]) | st.sampled_from([0.0, 5.0]) | floats32)


@FUZZ
@given(request=requests)
def test_grpc_messages_never_internal(gw, request) -> None:
    if request.sampling.HasField("max_tokens") and request.sampling.max_tokens > 300:
        request.sampling.max_tokens = 300  # keep the fake stream short: the property is about validation
    with grpc.insecure_channel(gw.grpc) as ch:
        try:
            msgs = list(pb_grpc.GenerationStub(ch).Generate(request, timeout=10))
            assert msgs[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        except grpc.RpcError as exc:
            tiny_deadline = 0 < request.timeout_s < 1  # the client asked for it
            assert exc.code() in GRPC_OK or tiny_deadline and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, \
                (exc.code(), exc.details())
            assert exc.details()


@FUZZ
@given(raw=st.binary(max_size=80))
def test_grpc_raw_bytes_never_internal(gw, raw) -> None:
    with grpc.insecure_channel(gw.grpc) as ch:
        call = ch.unary_stream("/tandem.v1.Generation/Generate")
        try:
            list(call(raw, timeout=10))
        except grpc.RpcError as exc:
            assert exc.code() in GRPC_OK, (exc.code(), exc.details())
