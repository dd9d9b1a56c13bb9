"""The Diffusion gRPC service on loopback: streamed text, health, reflection, INVALID_ARGUMENT, metrics."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services import grpcutil
from services.dlm.server import SERVICE, generate_text
from services.dlm.tasks import eval_set
from services.rpc.tandem.v1 import dlm_pb2, dlm_pb2_grpc


def _stub(server) -> dlm_pb2_grpc.DiffusionStub:
    return dlm_pb2_grpc.DiffusionStub(grpcutil.channel(server.address))


def test_streams_the_answer_in_pieces(dlm_server) -> None:
    ex = next(e for e in eval_set(6) if e.task == "rev")
    req = dlm_pb2.DiffusionGenerateRequest(prompt=ex.prompt, cache="off", guided=False)
    msgs = list(_stub(dlm_server).DiffusionGenerate(req, timeout=60))
    assert "".join(m.text for m in msgs) == ex.answer
    assert len([m for m in msgs if m.text]) > 1  # block by block, not one final message
    assert msgs[-1].done and not any(m.done for m in msgs[:-1])
    assert msgs[-1].committed_tokens == 24 and msgs[-1].forward_passes == 24
    assert [m.committed_tokens for m in msgs] == sorted(m.committed_tokens for m in msgs)


def test_guided_freecache_is_correct_and_cheaper(dlm_server) -> None:
    ex = next(e for e in eval_set(6) if e.task == "add")
    msgs = list(_stub(dlm_server).DiffusionGenerate(dlm_pb2.DiffusionGenerateRequest(prompt=ex.prompt), timeout=60))
    assert "".join(m.text for m in msgs) == ex.answer
    assert msgs[-1].forward_passes < 24
    assert "".join(generate_text(ex.prompt, guided=True)) == ex.answer


@pytest.mark.parametrize("req, field", [
    (dlm_pb2.DiffusionGenerateRequest(prompt="hello"), "prompt"),
    (dlm_pb2.DiffusionGenerateRequest(prompt=""), "prompt"),
    (dlm_pb2.DiffusionGenerateRequest(prompt="R12=", block=5), "block"),
    (dlm_pb2.DiffusionGenerateRequest(prompt="R12=", cache="lru"), "cache"),
    (dlm_pb2.DiffusionGenerateRequest(prompt="R12=", accept="maybe"), "accept"),
    (dlm_pb2.DiffusionGenerateRequest(prompt="R12=", tau=3.0), "tau"),
])
def test_bad_input_is_invalid_argument_naming_the_field(dlm_server, req, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(_stub(dlm_server).DiffusionGenerate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)


def test_health_reflection_and_metrics(dlm_server) -> None:
    ch = grpcutil.channel(dlm_server.address)
    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    out = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert SERVICE in [s.name for s in out.list_services_response.service]
    list(_stub(dlm_server).DiffusionGenerate(dlm_pb2.DiffusionGenerateRequest(prompt="S321="), timeout=30))
    body = urllib.request.urlopen(f"http://127.0.0.1:{dlm_server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'tandem_dlm_requests_total{code="OK"}' in body and "tandem_dlm_forward_passes_total" in body
