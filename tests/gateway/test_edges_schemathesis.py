"""schemathesis against the gateway's own OpenAPI schema (request bodies from services.gateway.schema): no 5xx.

Bounded for CI (derandomized, a few dozen cases per operation); skipped where schemathesis is not installed.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def gateway_schema(tmp_path_factory: pytest.TempPathFactory):
    from kit.edgegw import edge_gateway

    with edge_gateway(tmp_path_factory.mktemp("schemathesis")) as g:
        yield schemathesis.openapi.from_url(f"{g.http}/openapi.json")


schema = schemathesis.pytest.from_fixture("gateway_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_operation_answers_5xx(case) -> None:
    response = case.call(timeout=10)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error", response.text
