"""Backpressure: a tenant with too many items waiting is asked to come back later (429 + Retry-After),
other tenants are not, and the receiver keeps answering health and status checks meanwhile."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import httpx

from tests.conftest import Tenant
from tests.helpers import LOCKED, mixed_payload, post_batch, wait_for_batch
from tests.report import figure
from tests.services import Server, Workers

CAP = 2500
TOO_MANY = {"statusCode": 429, "errors": [{"message": "Too many items in progress"}]}


def client_for(server: Server, tenant: Tenant) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, headers=tenant.client.headers, timeout=60)


def items(n: int) -> list[dict[str, str]]:
    prefix = uuid.uuid4().hex[:8]
    return [{"code": f"BP{prefix}-{i}", "name": f"Customer {i}"} for i in range(n)]


def test_past_the_cap_batch_create_answers_429_until_the_workers_catch_up(
    extra_server: Callable[..., Server],
    make_tenant: Callable[[], Tenant],
    stopped_workers: Workers,
) -> None:
    server = extra_server("capped", CLIENTELA_MAX_ITEMS_IN_PROGRESS=str(CAP))
    busy, other = make_tenant(), make_tenant()
    with client_for(server, busy) as client, client_for(server, other) as other_client:
        first = post_batch(client, items(1000))
        second = post_batch(client, items(1000))
        assert first.status_code == second.status_code == 202
        refused = post_batch(client, items(1000), headers={"Idempotency-Key": "after-the-429"})
        assert (refused.status_code, refused.json()) == (429, TOO_MANY)
        assert refused.headers["retry-after"] == "5"
        # Exactly up to the cap is still accepted; one item more is not.
        assert post_batch(client, items(500)).status_code == 202
        assert post_batch(client, items(1)).status_code == 429
        # The cap is per tenant.
        assert post_batch(other_client, items(1000)).status_code == 202

        # Saturated: health and status still answer, and promptly.
        slowest = 0.0
        for _ in range(20):
            started = time.monotonic()
            assert server_get(server, "/healthz").status_code == 200
            status = client.get(f"/v1/customers/batches/{first.json()['batchId']}")
            assert (status.status_code, status.json()["errors"]) == (423, [{"message": LOCKED}])
            slowest = max(slowest, time.monotonic() - started)
        figure("backpressure", f"health + status while saturated: slowest pair {slowest * 1000:.0f} ms")

        stopped_workers.start()
        for answer in (first, second):
            assert wait_for_batch(client, answer.json()["batchId"], timeout=120)["status"] == "COMPLETED"
        # With the backlog worked off, the retry with the same key is a new batch, not a replay.
        retried = post_batch(client, items(1000), headers={"Idempotency-Key": "after-the-429"})
        deadline = time.monotonic() + 120
        while retried.status_code == 429 and time.monotonic() < deadline:
            time.sleep(int(retried.headers["retry-after"]))
            retried = post_batch(client, items(1000), headers={"Idempotency-Key": "after-the-429"})
        assert retried.status_code == 202, retried.text
        assert "idempotent-replayed" not in retried.headers


def test_a_batch_larger_than_the_cap_is_accepted_when_nothing_is_in_progress(
    extra_server: Callable[..., Server], make_tenant: Callable[[], Tenant], stopped_workers: Workers
) -> None:
    server = extra_server("tiny-cap", CLIENTELA_MAX_ITEMS_IN_PROGRESS="100")
    tenant = make_tenant()
    with client_for(server, tenant) as client:
        payload = mixed_payload(300, f"BIG{uuid.uuid4().hex[:6]}", [], {})
        accepted = post_batch(client, payload.items)
        assert accepted.status_code == 202
        assert post_batch(client, items(1)).status_code == 429
        stopped_workers.start()
        assert wait_for_batch(client, accepted.json()["batchId"], timeout=120)["total"] == 300
        assert post_batch(client, items(1)).status_code == 202


def server_get(server: Server, path: str) -> httpx.Response:
    return httpx.get(f"{server.base_url}{path}", timeout=10)
