"""The diffusion LM through the gateway: `tandem up` with a mixed worker (tiny checkpoint) and a dlm worker.

Greedy text through gateway -> dlm worker equals services.dlm.server.generate_text in this process (HTTP, SSE and
the official openai client); bad input is a 400 naming the field; the deadline, request id and a client
disconnect reach the worker; `tandem up` stops every process. Plus the plan/compose shape of a dlm pool.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml
from kit.cluster import alive

from services.cluster.compose import compose_doc
from services.cluster.launcher import plan
from services.contracts.errors import InvalidArgument
from services.contracts.layout import Pool, load_layout
from services.dlm.client import MODEL_NAME
from services.registry import StaticRegistry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "local-dlm.yaml"


# -- the plan and the compose file of a layout with a dlm pool (fast) ------------------------------------------------
def test_plan_and_compose_include_the_dlm_worker() -> None:
    from kit.compose import validate

    lay = load_layout(EXAMPLE)
    specs = plan(lay, str(EXAMPLE))
    assert [s.name for s in specs] == ["mixed-0", "dlm-0", "gateway"]
    dlm = specs[1]
    assert dlm.argv[dlm.argv.index("serve") + 1] == "dlm" and dlm.argv[-2:] == ["--port", "50400"]
    assert dlm.grpc == "127.0.0.1:50400" and "metrics http://127.0.0.1:51400/metrics" in dlm.endpoints
    doc = compose_doc(lay)
    assert validate(doc) == []
    assert set(doc["services"]) == {"gateway", "mixed-0", "dlm-0"}
    gw = doc["services"]["gateway"]
    assert gw["command"][-4:] == ["--worker", "mixed=mixed-0:50300", "--worker", "dlm=dlm-0:50400"]
    assert set(gw["depends_on"]) == {"mixed-0", "dlm-0"}
    assert doc["services"]["dlm-0"]["command"][-2:] == ["--port", "50400"]
    # a policy pool gets its container and process, but no gateway route
    with_policy = lay.model_copy(update={"pools": [*lay.pools, Pool(role="policy", count=1)]})
    doc = compose_doc(with_policy)
    assert validate(doc) == [] and doc["services"]["policy-0"]["command"][-2:] == ["--port", "50500"]
    assert "policy-0" not in doc["services"]["gateway"]["depends_on"]
    assert not any("policy" in a for a in doc["services"]["gateway"]["command"])
    assert [s.name for s in plan(with_policy, None)] == ["mixed-0", "dlm-0", "policy-0", "gateway"]


def test_gateway_worker_flags_take_dlm_but_not_policy() -> None:
    reg = StaticRegistry.from_pairs(["mixed=a:1", "dlm=b:2", "dlm=c:3"])
    assert [e.name for e in reg.endpoints("dlm")] == ["dlm-0", "dlm-1"]
    with pytest.raises(InvalidArgument, match="worker"):
        StaticRegistry.from_pairs(["policy=d:4"])


def test_client_model_name_is_the_servers() -> None:
    from services.dlm import server

    assert server.MODEL_NAME == MODEL_NAME


# -- a real cluster ----------------------------------------------------------------------------------------------------
PROMPTS = ["R04534962516482=", "S82518698223135507=", "A0000028175+0741645241=", "R12="]


def sse(resp: httpx.Response) -> list[dict]:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


@pytest.mark.slow
def test_models_and_health_list_the_dlm(dlm_cluster) -> None:
    ids = [m["id"] for m in httpx.get(f"{dlm_cluster.http}/v1/models").json()["data"]]
    assert ids == ["tiny", MODEL_NAME]
    assert httpx.get(f"{dlm_cluster.http}/v1/models/{MODEL_NAME}").json()["id"] == MODEL_NAME
    health = httpx.get(f"{dlm_cluster.http}/health").json()
    assert health["status"] == "ok" and {w["role"]: w["ok"] for w in health["workers"]} == {"mixed": True, "dlm": True}


@pytest.mark.slow
def test_policy_worker_is_up_beside(dlm_cluster) -> None:
    from services.cluster.probe import grpc_ok

    port = yaml.safe_load((dlm_cluster.log_dir.parent / "layout.yaml").read_text())["pools"][2]["base_port"]
    assert grpc_ok(f"127.0.0.1:{port}", 2.0)
    assert "tandem_policy_requests" in httpx.get(f"http://127.0.0.1:{port + 1000}/metrics").text


@pytest.mark.slow
def test_grpc_front_door_points_to_http(dlm_cluster) -> None:
    import grpc

    from services.rpc.tandem.v1 import generation_pb2 as gpb
    from services.rpc.tandem.v1 import generation_pb2_grpc as gpb_grpc

    with grpc.insecure_channel(dlm_cluster.grpc) as ch, pytest.raises(grpc.RpcError) as err:
        list(gpb_grpc.GenerationStub(ch).Generate(gpb.GenerateRequest(model=MODEL_NAME, text="R12="), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"model: {MODEL_NAME} supports HTTP /v1/completions only"


@pytest.mark.slow
def test_greedy_text_equals_generate_text(dlm_cluster, dlm_reference) -> None:
    with httpx.Client(base_url=dlm_cluster.http, timeout=60) as c:
        for prompt in PROMPTS:
            want = dlm_reference(prompt)
            whole = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt}).json()
            assert whole["choices"][0]["text"] == want and whole["model"] == MODEL_NAME
            assert whole["choices"][0]["finish_reason"] == "stop"
            assert whole["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 24, "total_tokens":
                                      len(prompt) + 24}
            assert whole["tandem_timings"]["forward_passes"] >= 1
            with c.stream("POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "stream": True,
                                                           "stream_options": {"include_usage": True}}) as r:
                assert r.status_code == 200
                docs = sse(r)
            assert "".join(d["choices"][0]["text"] for d in docs if d["choices"]) == want
            assert docs[-1]["usage"]["completion_tokens"] == 24
    # a slow (uncached, unguided) run commits block by block: more than one text event
    with httpx.Client(base_url=dlm_cluster.http, timeout=60) as c, c.stream(
            "POST", "/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPTS[0], "stream": True,
                                             "cache": "off", "guided": False}) as r:
        docs = sse(r)
    assert len([d for d in docs if d["choices"][0]["text"]]) > 1
    assert "".join(d["choices"][0]["text"] for d in docs) == dlm_reference(PROMPTS[0])


@pytest.mark.slow
def test_official_openai_client(dlm_cluster, dlm_reference) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{dlm_cluster.http}/v1", api_key="unused", max_retries=0)
    prompt = PROMPTS[2]
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0)
    assert r.choices[0].text == dlm_reference(prompt)
    text = "".join(ch.choices[0].text for ch in client.completions.create(model=MODEL_NAME, prompt=prompt,
                                                                          stream=True))
    assert text == dlm_reference(prompt)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}])
    assert "supports /v1/completions only" in err.value.message


@pytest.mark.slow
@pytest.mark.parametrize("extra, param", [
    ({"temperature": 0.7}, "temperature"),
    ({"top_p": 0.5}, "top_p"),
    ({"stop": ["0"]}, "stop"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "hello"}, "prompt"),           # not in the char model's vocabulary (worker-side check)
    ({"prompt": "R" + "1" * 200 + "="}, "prompt"),
    ({"cache": "lru"}, "cache"),
    ({"block": 5}, "block"),
    ({"gen_len": "long"}, "gen_len"),
    ({"guided": "yes"}, "guided"),
    ({"max_tokens": 9}, "max_tokens"),         # becomes gen_len, which the served blocks of 2 do not divide
    ({"stream": True, "tau": 3.0}, "tau"),     # streaming too: a 400, not a 200 with an error event
])
def test_bad_input_is_400_naming_the_field(dlm_cluster, extra: dict, param: str) -> None:
    body = {"model": MODEL_NAME, "prompt": "R12=", **extra}
    r = httpx.post(f"{dlm_cluster.http}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"].startswith(param)


@pytest.mark.slow
def test_chat_is_a_clear_400(dlm_cluster) -> None:
    r = httpx.post(f"{dlm_cluster.http}/v1/chat/completions", timeout=30,
                   json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "R12="}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["message"] == f"model: {MODEL_NAME} supports /v1/completions only"


@pytest.mark.slow
def test_deadline_request_id_and_llm_path(dlm_cluster, dlm_reference) -> None:
    r = httpx.post(f"{dlm_cluster.http}/v1/completions", headers={"x-tandem-timeout-s": "0.000001"}, timeout=30,
                   json={"model": MODEL_NAME, "prompt": "R12=", "cache": "off", "guided": False})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    rid = f"dlm-rid-{time.time_ns()}"
    r = httpx.post(f"{dlm_cluster.http}/v1/completions", headers={"x-request-id": rid}, timeout=30,
                   json={"model": MODEL_NAME, "prompt": "S321="})
    assert r.status_code == 200 and r.headers["x-request-id"] == rid and r.json()["choices"][0]["text"] == dlm_reference("S321=")
    assert _wait_for_log(dlm_cluster.log_dir / "dlm-0.log", rid, "generated")
    # the LLM model still goes to the mixed worker
    r = httpx.post(f"{dlm_cluster.http}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_disconnect_cancels_the_worker_call(dlm_cluster) -> None:
    dlm = next(w for w in httpx.get(f"{dlm_cluster.http}/health").json()["workers"] if w["role"] == "dlm")
    port = int(dlm["address"].rsplit(":", 1)[1]) + 1000  # the worker's /metrics

    def worker_ok() -> float:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('tandem_dlm_requests_total{code="OK"}'))

    before = worker_ok()
    rid = f"dlm-cancel-{time.time_ns()}"
    # uncached and unguided: ~0.2 s of denoising, committed a token per step
    body = {"model": MODEL_NAME, "prompt": "R" + "9876543210" * 2 + "=", "stream": True, "cache": "off",
            "guided": False}
    with httpx.Client(base_url=dlm_cluster.http, timeout=30) as c, c.stream(
            "POST", "/v1/completions", json=body, headers={"x-request-id": rid}) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first text event; then leave while the worker is still denoising
    assert _wait_for_log(dlm_cluster.log_dir / "gateway.log", rid, "dlm request done", outcome="cancelled")
    time.sleep(0.5)  # longer than the whole request would have taken
    assert worker_ok() == before  # the worker's call ended without completing
    log = (dlm_cluster.log_dir / "dlm-0.log").read_text()
    assert rid not in log or "client went away" in log
    metrics = httpx.get(f"{dlm_cluster.http}/metrics").text
    assert 'tandem_gateway_requests_total{api="dlm",outcome="cancelled"}' in metrics


@pytest.mark.slow
def test_up_stops_every_process(dlm_cluster) -> None:
    kids = dlm_cluster.children()
    assert len(kids) == 4  # mixed, dlm, policy, gateway
    assert dlm_cluster.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 10
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(k) for k in kids)


def _wait_for_log(path: Path, request_id: str, msg: str, timeout_s: float = 10.0, **fields: str) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("request_id") == request_id and doc.get("msg") == msg and all(
                    doc.get(k) == v for k, v in fields.items()):
                return True
        time.sleep(0.1)
    return False


def test_example_layout_parses() -> None:
    lay = yaml.safe_load(EXAMPLE.read_text())
    assert [p["role"] for p in lay["pools"]] == ["mixed", "dlm"]
