"""End to end through real worker processes: a full-size batch, and the same results whatever the chunk
order (the first occurrence of a code wins even when its chunk runs last)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import lz4.frame
import pytest
import sqlalchemy as sa
from celery import Celery

from tests.conftest import CHUNK_SIZE, Tenant
from tests.helpers import (
    LOCKED,
    PROGRESS_KEYS,
    created,
    err,
    failed,
    mixed_payload,
    post_batch,
    run_batch,
    stored_results,
    strip_ids,
    submit,
    unique_code,
    wait_for_batch,
    wait_until,
)
from tests.services import RedisServer, Server, Workers, free_port

# Duplicates across every chunk boundary (1000-item chunks), and far apart.
DUPS_10K = {k * CHUNK_SIZE: k * CHUNK_SIZE - 1 for k in range(1, 10)} | {9998: 0, 5500: 12, 3001: 2996}


def seed_existing(tenant: Tenant, codes: list[str]) -> None:
    body = run_batch(tenant.client, [{"code": c, "name": "already here"} for c in codes])
    assert body["created"] == len(codes), body


def customer_codes(db: Callable[..., list[Any]], tenant: Tenant) -> list[str]:
    rows = db("SELECT code FROM customers WHERE tenant_id::text = :t", t=tenant.id)
    return [r[0] for r in rows]


@pytest.mark.slow
def test_ten_thousand_items_end_to_end(tenant: Tenant, db: Callable[..., list[Any]]) -> None:
    prefix = f"K{uuid.uuid4().hex[:6]}"
    existing = [f"{prefix}-OLD-1", f"{prefix}-OLD-2"]
    seed_existing(tenant, existing)
    payload = mixed_payload(10_000, prefix, existing, DUPS_10K)

    batch_id = submit(tenant.client, payload.items)

    # While it runs, the status endpoint answers 423 with the progress.
    r = tenant.client.get(f"/v1/customers/batches/{batch_id}")
    assert r.status_code == 423, r.text[:300]
    progress = r.json()
    assert set(progress) == {"statusCode", "errors"} | PROGRESS_KEYS
    assert progress["statusCode"] == 423
    assert progress["errors"] == [{"message": LOCKED}]
    assert progress["batchId"] == batch_id
    assert progress["status"] in ("QUEUED", "RUNNING")
    assert progress["total"] == 10_000
    assert progress["created"] + progress["failed"] == progress["processed"] <= 10_000
    assert int(r.headers["Retry-After"]) > 0

    seen_processed = [progress["processed"]]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        r = tenant.client.get(f"/v1/customers/batches/{batch_id}")
        if r.status_code == 200:
            break
        assert r.status_code == 423, r.text[:300]
        seen_processed.append(r.json()["processed"])
        time.sleep(0.25)
    assert r.status_code == 200, "batch did not finish in 300 s"
    assert seen_processed == sorted(seen_processed), "progress must never go backwards"

    body = r.json()
    n_created = len(payload.created_codes)
    assert body["status"] == "COMPLETED"
    assert (body["total"], body["processed"], body["created"], body["failed"]) == (
        10_000,
        10_000,
        n_created,
        10_000 - n_created,
    )
    results = body["results"]
    assert [x["index"] for x in results] == list(range(10_000))
    got = strip_ids(results)
    mismatches = [(g, e) for g, e in zip(got, payload.expected, strict=True) if g != e]
    assert mismatches[:20] == []

    # Every created customer exists exactly once, with the id the result gave.
    rows = db(
        "SELECT code, id::text, count(*) OVER (PARTITION BY code) FROM customers WHERE tenant_id::text = :t",
        t=tenant.id,
    )
    by_code = {code: (cid, n) for code, cid, n in rows}
    assert len(rows) == n_created + len(existing)
    assert all(n == 1 for _, n in by_code.values())
    for res in results:
        if res["status"] == "CREATED":
            assert by_code[res["code"]][0] == res["customerId"]
    assert [entry["index"] for entry in stored_results(db, batch_id)] == list(range(10_000))
    # Raw input does not linger once the chunks have ended.
    assert db(
        "SELECT count(*) FROM chunks WHERE batch_id::text = :b AND payload IS NOT NULL", b=batch_id
    ) == [(0,)]

    # The same codes again: each one already exists now.
    again_items = [{"code": c, "name": "again"} for c in payload.created_codes]
    again = run_batch(tenant.client, again_items, timeout=300)
    assert again["created"] == 0
    assert again["failed"] == len(again_items)
    assert again["results"] == [
        failed(i, err("code", "Code already exists")) for i in range(len(again_items))
    ]
    assert len(customer_codes(db, tenant)) == n_created + len(existing)


def purge_ingest_queue(redis_url: str) -> int:
    app = Celery(broker=redis_url)
    try:
        with app.connection_for_write() as conn:
            return int(conn.default_channel.queue_purge("ingest") or 0)
    finally:
        app.close()


def enqueue_in_order(redis_url: str, chunk_ids: list[str]) -> None:
    app = Celery(broker=redis_url)
    try:
        for chunk_id in chunk_ids:
            app.send_task("clientela.process_chunk", args=[chunk_id], queue="ingest")
    finally:
        app.close()


@pytest.mark.slow
def test_same_results_whatever_the_chunk_order(
    make_tenant: Callable[[], Tenant],
    workers: Workers,
    redis_server: RedisServer,
    db: Callable[..., list[Any]],
) -> None:
    forward, backward = make_tenant(), make_tenant()
    prefix = "ORD"
    existing = [f"{prefix}-OLD-1", f"{prefix}-OLD-2"]
    # The same full-size batch as above: the first occurrence of a code sits in an earlier chunk that,
    # enqueued in reverse, runs after the chunk holding its duplicate.
    payload = mixed_payload(10_000, prefix, existing, DUPS_10K)
    for t in (forward, backward):
        seed_existing(t, existing)

    first = wait_for_batch(forward.client, submit(forward.client, payload.items), timeout=180)

    workers.stop()
    batch_id = submit(backward.client, payload.items)
    chunks = db("SELECT id::text, seq FROM chunks WHERE batch_id::text = :b ORDER BY seq", b=batch_id)
    assert len(chunks) == 10, chunks
    purged = purge_ingest_queue(redis_server.url)
    assert purged == len(chunks), f"expected one message per chunk in the queue, purged {purged}"
    enqueue_in_order(redis_server.url, [cid for cid, _ in reversed(chunks)])
    workers.start()
    second = wait_for_batch(backward.client, batch_id, timeout=180)

    assert strip_ids(first["results"]) == payload.expected
    assert strip_ids(second["results"]) == payload.expected
    for key in ("status", "total", "processed", "created", "failed"):
        assert first[key] == second[key], key
    assert sorted(customer_codes(db, backward)) == sorted(payload.created_codes + existing)
    assert sorted(customer_codes(db, forward)) == sorted(payload.created_codes + existing)
    assert second["results"][0] == {
        **created(0, f"{prefix}-00000"),
        "customerId": second["results"][0]["customerId"],
    }


def test_queue_messages_carry_ids_only(
    stopped_workers: Workers, tenant: Tenant, redis_server: RedisServer, db: Callable[..., list[Any]]
) -> None:
    code = f"SC{uuid.uuid4().hex[:6]}"
    items = [{"code": f"{code}-{i}", "name": "Private Name", "nit": "900123456-1"} for i in range(2_500)]
    batch_id = submit(tenant.client, items)
    chunk_ids = {r[0] for r in db("SELECT id::text FROM chunks WHERE batch_id::text = :b", b=batch_id)}
    assert len(chunk_ids) == 3
    r = redis_server.client()
    messages = [json.loads(m) for m in r.lrange("ingest", 0, -1)]
    assert len(messages) == 3
    seen = set()
    for m in messages:
        body = base64.b64decode(m["body"]).decode()
        for secret in (code, "Private Name", "900123456-1", tenant.key):
            assert secret not in body
        assert len(body) < 2_000, "a message carries an id, never the payload"
        args = json.loads(body)[0]
        seen.add(args[0])
    assert seen == chunk_ids
    stopped_workers.start()
    assert wait_for_batch(tenant.client, batch_id)["created"] == 2_500


def test_a_batch_is_accepted_and_kept_while_the_broker_is_unreachable(
    extra_server: Callable[..., Server], tenant: Tenant, db: Callable[..., list[Any]]
) -> None:
    """The 202 needs the batch stored, not the broker: its chunks wait, pending, for the reconciler."""
    srv = extra_server("server-broker-gone", CLIENTELA_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    code = unique_code("NB")
    with httpx.Client(base_url=srv.base_url, headers=tenant.client.headers, timeout=60) as client:
        r = post_batch(client, [{"code": code, "name": "Kept"}])
        assert r.status_code == 202, r.text
        batch_id = r.json()["batchId"]
        assert r.headers["location"] == f"/v1/customers/batches/{batch_id}"
        status = client.get(f"/v1/customers/batches/{batch_id}")
    assert status.status_code == 423
    assert status.json()["status"] == "QUEUED"
    chunks = db("SELECT status, item_count FROM chunks WHERE batch_id::text = :b", b=batch_id)
    assert [tuple(c) for c in chunks] == [("PENDING", 1)]
    wait_until(
        lambda: "the reconciler will retry" in srv.process.log.read_text(errors="replace"),
        30,
        "the failed enqueue logged",
    )


def test_concurrent_chunks_with_the_same_codes_create_each_once(
    stopped_workers: Workers, tenant: Tenant, redis_server: RedisServer, db: Callable[..., list[Any]]
) -> None:
    """Two batches of one tenant with the same 5,000 codes, their chunks queued in turns (A1, B1, A2, B2,
    …) for two worker processes: chunks holding the same codes run at the same time. Each code is created
    once, by the chunk whose transaction committed first; the other occurrence says it exists. A chunk
    that lost the race is done again within its attempt, not left for the reconciler."""
    prefix = uuid.uuid4().hex[:8]
    items = [{"code": f"{prefix}-{i:04d}", "name": f"Race {i}"} for i in range(5 * CHUNK_SIZE)]
    batch_ids = [submit(tenant.client, items) for _ in range(2)]
    chunks = [
        [r[0] for r in db("SELECT id::text FROM chunks WHERE batch_id::text = :b ORDER BY seq", b=b)]
        for b in batch_ids
    ]
    assert purge_ingest_queue(redis_server.url) == 10
    enqueue_in_order(redis_server.url, [cid for pair in zip(*chunks, strict=True) for cid in pair])
    stopped_workers.start()
    bodies = [wait_for_batch(tenant.client, b, timeout=60) for b in batch_ids]

    assert [b["status"] for b in bodies] == ["COMPLETED", "COMPLETED"]
    assert bodies[0]["created"] + bodies[1]["created"] == len(items)
    exists = [err("code", "Code already exists")]
    for i, item in enumerate(items):
        outcomes = sorted(b["results"][i]["status"] for b in bodies)
        assert outcomes == ["CREATED", "FAILED"], (i, [b["results"][i] for b in bodies])
        (winner,) = [b["results"][i] for b in bodies if b["results"][i]["status"] == "CREATED"]
        (loser,) = [b["results"][i] for b in bodies if b["results"][i]["status"] == "FAILED"]
        assert winner["code"] == item["code"]
        assert loser == {"index": i, "status": "FAILED", "errors": exists}
    stored = db(
        "SELECT code, id::text, batch_id::text FROM customers WHERE tenant_id::text = :t", t=tenant.id
    )
    assert len(stored) == len(items)
    by_code = {code: (customer_id, batch) for code, customer_id, batch in stored}
    for i, item in enumerate(items):
        (winner_batch, winner) = next(
            (b["batchId"], b["results"][i]) for b in bodies if b["results"][i]["status"] == "CREATED"
        )
        assert by_code[item["code"]] == (winner["customerId"], winner_batch)
    attempts = db(
        "SELECT max(attempts) FROM chunks WHERE batch_id::text IN (:a, :b)", a=batch_ids[0], b=batch_ids[1]
    )
    assert attempts == [(1,)], "a chunk needed a second attempt"


def test_a_chunk_stored_as_an_array_by_an_older_receiver_is_still_read(
    stopped_workers: Workers, tenant: Tenant, engine: sa.Engine
) -> None:
    """Before migration 0008 a receiver stored a chunk as a JSON array; one still running while a deployment
    is upgraded does so after it. The workers read such a chunk item for item, as they read their own."""
    prefix = uuid.uuid4().hex[:8]
    items: list[Any] = [{"code": f"{prefix}-{i}", "name": f"Name\n{i}"} for i in range(3)]
    items.insert(1, ["not", "an", "object"])
    batch_id = submit(tenant.client, items)
    array = lz4.frame.compress(json.dumps(items, indent=1).encode())
    with engine.begin() as conn:
        changed = conn.execute(
            sa.text("UPDATE chunks SET payload = :payload WHERE batch_id = CAST(:b AS uuid)"),
            {"payload": array, "b": batch_id},
        ).rowcount
    assert changed == 1
    stopped_workers.start()
    body = wait_for_batch(tenant.client, batch_id)
    assert strip_ids(body["results"]) == [
        created(0, f"{prefix}-0"),
        failed(1, err(None, "Item must be an object")),
        created(2, f"{prefix}-1"),
        created(3, f"{prefix}-2"),
    ]
