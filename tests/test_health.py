"""Health endpoints, without authentication."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.services import Server, free_port


def test_healthz_and_readyz(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200
    assert httpx.get(f"{server.base_url}/readyz").status_code == 200


def test_readyz_is_503_when_the_broker_is_unreachable(extra_server: Callable[..., Server]) -> None:
    srv = extra_server("server-no-broker", CLIENTELA_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert httpx.get(f"{srv.base_url}/healthz").status_code == 200
    r = httpx.get(f"{srv.base_url}/readyz", timeout=30)
    assert r.status_code == 503


def test_unexpected_failure_is_500_without_a_stack_trace(extra_server: Callable[..., Server]) -> None:
    """A receiver that cannot reach its database answers in the contract's shape, and says why only in
    its log."""
    gone = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/clientela?connect_timeout=2"
    srv = extra_server("server-no-database", CLIENTELA_DATABASE_URL=gone)
    r = httpx.post(f"{srv.base_url}/v1/token", headers={"Ocp-Apim-Subscription-Key": "any"}, timeout=30)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"statusCode": 500, "errors": [{"message": "Unexpected error"}]}
    ready = httpx.get(f"{srv.base_url}/readyz", timeout=30)
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] == "unreachable"
