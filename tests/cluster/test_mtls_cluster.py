"""Mutual TLS inside a real split cluster: `tandem certs` makes a CA, `tandem up` runs with TANDEM_TLS_*.

Workers listen with TLS and demand client certificates, so the cluster answering at all means the
gateway -> prefill, gateway -> decode and prefill -> decode (KV push) calls ran over mTLS; a plaintext
channel or a TLS channel without a client certificate to a worker is refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kit.cluster import start_up, write_layout
from kit.net import free_port

from services.client import TLS, Client

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mtls_cluster(tiny_checkpoint_4k, tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("mtls")
    out = subprocess.run([sys.executable, "-m", "services.cli", "certs", str(d / "certs")], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())
    pools = [{"role": "prefill", "count": 1, "base_port": free_port()},
             {"role": "decode", "count": 1, "base_port": free_port()}]
    layout = write_layout(d / "layout.yaml", str(tiny_checkpoint_4k), pools, free_port(), free_port(), name="mtls")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by `tandem up` and every process it starts
    try:
        up = start_up(layout, d / "logs")
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    yield up, env
    up.stop(signal.SIGKILL if up.proc.poll() is None else signal.SIGTERM)


def test_split_cluster_serves_over_mtls(mtls_cluster) -> None:
    up, env = mtls_cluster
    with Client(up.grpc, tls=TLS(env["TANDEM_TLS_CA"]), timeout=60) as c:
        answer = c.generate("The capital of France is", max_tokens=6, temperature=0)
    assert answer.finish_reason in ("stop", "length") and len(answer.workers) == 2 and answer.timings["kv_bytes"] > 0
    health = httpx.get(f"{up.http}/health").json()
    assert health["status"] == "ok" and all(w["ok"] for w in health["workers"])
    worker = health["workers"][0]["address"]
    ca = open(env["TANDEM_TLS_CA"], "rb").read()
    for ch in (grpc.insecure_channel(worker), grpc.secure_channel(worker, grpc.ssl_channel_credentials(ca))):
        with ch, pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(up.grpc) as ch, pytest.raises(grpc.RpcError):  # the front door speaks TLS only
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
