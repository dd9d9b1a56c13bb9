"""The Policy gRPC service on loopback: real server, real client, real model, micro-batching, bad input."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.policy import task
from services.policy.server import serve
from services.rpc.tandem.v1 import policy_pb2, policy_pb2_grpc


def obs_values(seed: int) -> list[float]:
    return task.demonstrations(1, 16, seed=seed)[0][3].reshape(-1).tolist()


def test_health_reflection_describe(policy_server) -> None:
    with grpc.insecure_channel(policy_server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="tandem.v1.Policy"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        names = [s.name for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
                 for s in r.list_services_response.service]
        assert "tandem.v1.Policy" in names
        d = policy_pb2_grpc.PolicyStub(ch).Describe(policy_pb2.DescribeRequest(), timeout=10)
        assert (d.obs_dim, d.n_obs_steps, d.horizon, d.act_dim) == (7, 2, 16, 2)
        assert d.cache == "bac" and d.budget == 5 and d.sampler == "ddim20" and len(d.checkpoint_sha256) == 64


def test_concurrent_clients_are_batched_and_seeded(policy_server) -> None:
    results: dict[int, policy_pb2.ActResponse] = {}

    def call(i: int) -> None:
        with grpc.insecure_channel(policy_server.address) as ch:
            results[i] = policy_pb2_grpc.PolicyStub(ch).Act(
                policy_pb2.ActRequest(observation=obs_values(i), seed=100 + i), timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 6
    assert max(r.batch_size for r in results.values()) > 1  # gathered into one denoising pass
    with grpc.insecure_channel(policy_server.address) as ch:
        stub = policy_pb2_grpc.PolicyStub(ch)
        solo = stub.Act(policy_pb2.ActRequest(observation=obs_values(2), seed=102), timeout=30)
        other = stub.Act(policy_pb2.ActRequest(observation=obs_values(2), seed=103), timeout=30)
    assert solo.batch_size == 1 and solo.block_evals == results[2].block_evals
    assert len(solo.actions) == solo.horizon * solo.act_dim == 32 and solo.n_action_steps == 8
    # a request's chunk depends on its own seed, not on its batch-mates
    assert np.allclose(solo.actions, results[2].actions, atol=1e-5)
    assert not np.allclose(solo.actions, other.actions)


@pytest.mark.parametrize("values, needle", [([0.0] * 5, "expected 14 floats"),
                                            ([float("nan")] + [0.0] * 13, "NaN")])
def test_bad_observation_is_invalid_argument(policy_server, values: list[float], needle: str) -> None:
    with grpc.insecure_channel(policy_server.address) as ch, pytest.raises(grpc.RpcError) as err:
        policy_pb2_grpc.PolicyStub(ch).Act(policy_pb2.ActRequest(observation=values), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "observation" in err.value.details() and needle in err.value.details()


def test_missing_schedule_is_a_clear_error(tiny_policy_checkpoint: Path) -> None:
    from services.contracts.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="budget 7"):
        serve(0, str(tiny_policy_checkpoint), host="127.0.0.1", sampler="ddim20", cache="bac", budget=7, block=False)


def test_prometheus_metrics(policy_server, policy_metrics_port: int) -> None:
    import urllib.request

    with grpc.insecure_channel(policy_server.address) as ch:
        policy_pb2_grpc.PolicyStub(ch).Act(policy_pb2.ActRequest(observation=obs_values(1), seed=1), timeout=30)
    text = urllib.request.urlopen(f"http://127.0.0.1:{policy_metrics_port}/metrics", timeout=5).read().decode()
    assert 'tandem_policy_requests_total{code="OK"}' in text
    assert "tandem_policy_batch_size_bucket" in text and "tandem_policy_block_evals_total" in text


def test_committed_checkpoint_default_service() -> None:
    """What `tandem serve policy` starts: the committed checkpoint, DDPM-100 with BAC (9-block union) at S = 12."""
    srv = serve(0, host="127.0.0.1", block=False)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = policy_pb2_grpc.PolicyStub(ch)
            d = stub.Describe(policy_pb2.DescribeRequest(), timeout=10)
            assert (d.sampler, d.cache, d.budget) == ("ddpm100", "bac-n9", 12)
            obs = task.observe(np.array([[0.0, -0.9]]), np.array([[0.0, -0.9]]),
                               task.Scenes(np.array([[0.0, -0.9]]), np.array([[0.0, 0.9]]),
                                           np.array([[0.0, 0.0]]), np.array([0.3])))
            r = stub.Act(policy_pb2.ActRequest(observation=obs.reshape(-1).tolist(), seed=0), timeout=60)
        actions = np.asarray(r.actions).reshape(16, 2)
        assert r.block_evals == 350 < 1800
        # a trained policy heads up towards the goal and steps sideways around the obstacle
        assert actions[-1, 1] > -0.6 and abs(actions[-1, 0]) > 0.05
    finally:
        srv.stop()


def test_load_benchmark_reports_batches_formed(tiny_policy_checkpoint: Path) -> None:
    """`tandem bench policy --server` machinery: real server, clients in another process, batch sizes seen."""
    from services.bench import policy_load as loadbench

    doc = loadbench.run(str(tiny_policy_checkpoint), [1, 4], 1.5, sampler="ddim20", cache="bac", budget=5, window_ms=20)
    solo, many = doc["rows"]
    assert solo["clients"] == 1 and solo["max_batch"] == 1 and solo["batch_histogram"] == {"1": solo["requests"]}
    assert many["clients"] == 4 and many["max_batch"] > 1 and many["mean_batch_per_pass"] > 1
    for r in (solo, many):
        assert r["requests"] > 1 and r["chunks_per_s"] > 0 and r["actions_per_s"] == r["chunks_per_s"] * 8
        assert r["latency_p95_ms"] >= r["latency_p50_ms"] > 0
