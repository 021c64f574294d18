"""Idempotency-Key on batch-create (IETF httpapi idempotency-key draft): a producer that retries after a
timeout gets the batch it already stored, never a second one; a key reused for another body is refused."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import Tenant
from tests.helpers import mixed_payload, post_batch, strip_ids, wait_for_batch

REUSED = {"statusCode": 422, "errors": [{"message": "Idempotency-Key reused with a different payload"}]}


def keyed(client: httpx.Client, items: Any, key: str, **kwargs: Any) -> httpx.Response:
    return post_batch(client, items, headers={"Idempotency-Key": key}, **kwargs)


def batch_ids(db: Callable[..., list[Any]], tenant: Tenant) -> list[str]:
    return [str(r[0]) for r in db("SELECT id FROM batches WHERE tenant_id::text = :t", t=tenant.id)]


def test_a_retry_with_the_same_key_and_body_answers_the_first_batch(
    tenant: Tenant, db: Callable[..., list[Any]]
) -> None:
    payload = mixed_payload(1500, f"IDM{uuid.uuid4().hex[:6]}", [], {1200: 4})
    key = str(uuid.uuid4())
    first = keyed(tenant.client, payload.items, key)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers

    again = keyed(tenant.client, payload.items, key)
    assert again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert batch_ids(db, tenant) == [first.json()["batchId"]]

    body = wait_for_batch(tenant.client, first.json()["batchId"], timeout=120)
    assert strip_ids(body["results"]) == payload.expected
    # Once the batch has ended, a late retry still gets the original answer and still creates nothing.
    late = keyed(tenant.client, payload.items, key)
    assert (late.status_code, late.json(), late.headers["idempotent-replayed"]) == (202, first.json(), "true")
    assert batch_ids(db, tenant) == [first.json()["batchId"]]
    [(customers,)] = db("SELECT count(*) FROM customers WHERE tenant_id::text = :t", t=tenant.id)
    assert customers == len(payload.created_codes)


def test_the_same_key_with_another_body_is_refused(tenant: Tenant, db: Callable[..., list[Any]]) -> None:
    key = "order-sync-2026-11-22T10:00"
    first = keyed(tenant.client, [{"code": f"K-{uuid.uuid4().hex[:8]}", "name": "A"}], key)
    assert first.status_code == 202
    other = keyed(tenant.client, [{"code": f"K-{uuid.uuid4().hex[:8]}", "name": "B"}], key)
    assert (other.status_code, other.json()) == (422, REUSED)
    assert "idempotent-replayed" not in other.headers
    assert batch_ids(db, tenant) == [first.json()["batchId"]]


def test_keys_belong_to_one_tenant(make_tenant: Callable[[], Tenant], workers: object) -> None:
    a, b = make_tenant(), make_tenant()
    items = [{"code": f"T-{uuid.uuid4().hex[:8]}", "name": "Shared key"}]
    first = keyed(a.client, items, "nightly-1")
    second = keyed(b.client, items, "nightly-1")
    assert first.status_code == second.status_code == 202
    assert "idempotent-replayed" not in second.headers
    assert first.json()["batchId"] != second.json()["batchId"]


def test_concurrent_retries_store_one_batch(tenant: Tenant, db: Callable[..., list[Any]]) -> None:
    payload = mixed_payload(3000, f"IDC{uuid.uuid4().hex[:6]}", [], {})
    body = json.dumps(payload.items).encode()
    key = str(uuid.uuid4())
    answers: list[httpx.Response] = []
    start = threading.Barrier(8)

    def retry() -> None:
        with httpx.Client(
            base_url=str(tenant.client.base_url), headers=tenant.client.headers, timeout=60
        ) as c:
            start.wait()
            answers.append(keyed(c, None, key, raw=body))

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [a.status_code for a in answers] == [202] * 8, [a.text for a in answers]
    assert len({a.json()["batchId"] for a in answers}) == 1
    assert sorted(a.headers.get("idempotent-replayed", "") for a in answers) == [""] + ["true"] * 7
    assert batch_ids(db, tenant) == [answers[0].json()["batchId"]]
    done = wait_for_batch(tenant.client, answers[0].json()["batchId"], timeout=120)
    assert done["created"] == len(payload.created_codes)


def test_a_refused_request_does_not_use_up_its_key(tenant: Tenant) -> None:
    key = str(uuid.uuid4())
    broken = keyed(tenant.client, None, key, raw="[{")
    assert broken.status_code == 400
    items = [{"code": f"R-{uuid.uuid4().hex[:8]}", "name": "After a bad request"}]
    accepted = keyed(tenant.client, items, key)
    assert accepted.status_code == 202
    assert "idempotent-replayed" not in accepted.headers


def test_an_expired_key_starts_a_new_batch(tenant: Tenant, engine: sa.Engine) -> None:
    key = str(uuid.uuid4())
    first = keyed(tenant.client, [{"code": f"E-{uuid.uuid4().hex[:8]}", "name": "Yesterday"}], key)
    assert first.status_code == 202
    # A day passes (the key's 24 hours are moved into the past instead of waiting them out).
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE idempotency_keys SET created_at = created_at - interval '25 hours'"
                " WHERE tenant_id::text = :t AND key = :k"
            ),
            {"t": tenant.id, "k": key},
        )
    again = keyed(tenant.client, [{"code": f"E-{uuid.uuid4().hex[:8]}", "name": "Today"}], key)
    assert again.status_code == 202, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json()["batchId"] != first.json()["batchId"]


def test_the_key_may_be_a_structured_field_string(tenant: Tenant) -> None:
    items = [{"code": f"Q-{uuid.uuid4().hex[:8]}", "name": "Quoted key"}]
    first = keyed(tenant.client, items, '"8e03978e-40d5-43e8-bc93-6894a57f9324"')
    bare = keyed(tenant.client, items, "8e03978e-40d5-43e8-bc93-6894a57f9324")
    assert first.status_code == bare.status_code == 202
    assert bare.headers["idempotent-replayed"] == "true"
    assert bare.json()["batchId"] == first.json()["batchId"]


@pytest.mark.parametrize("key", ["x" * 256, '""', 'a"b"', "tab\there"])
def test_a_malformed_key_is_refused(tenant: Tenant, key: str) -> None:
    r = keyed(tenant.client, [{"code": "MALFORMED", "name": "Never stored"}], key)
    assert (r.status_code, r.json()) == (
        400,
        {
            "statusCode": 400,
            "errors": [
                {"message": "Idempotency-Key must be 1 to 255 printable ASCII characters, without quotes"}
            ],
        },
    )


def test_expired_keys_are_purged_by_the_reconciler(
    tenant: Tenant,
    engine: sa.Engine,
    db: Callable[..., list[Any]],
    beat: Callable[..., object],
) -> None:
    live, old = str(uuid.uuid4()), str(uuid.uuid4())
    for key in (live, old):
        r = keyed(tenant.client, [{"code": f"P-{uuid.uuid4().hex[:8]}", "name": key}], key)
        assert r.status_code == 202
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE idempotency_keys SET created_at = created_at - interval '25 hours' WHERE key = :k"
            ),
            {"k": old},
        )
    beat(CLIENTELA_RECONCILE_INTERVAL_SECONDS="1")
    sql = "SELECT key FROM idempotency_keys WHERE tenant_id::text = :t"
    deadline = time.monotonic() + 60
    while len(db(sql, t=tenant.id)) > 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [r[0] for r in db(sql, t=tenant.id)] == [live]
