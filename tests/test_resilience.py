"""The pipeline's guarantees under failure: a worker SIGKILLed mid-chunk and Redis restarted empty still
end with every accepted item answered exactly once and every created customer stored exactly once.

These tests run their own receiver, Redis, workers and beat (short lease, fast reconciler), so that killing
things never disturbs the session's processes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.conftest import Tenant
from tests.helpers import mixed_payload, strip_ids, submit, wait_for_batch
from tests.services import ClientelaProcess, PostgresServer, RedisServer, Server, Workers, start_server

LEASE_SECONDS = "5"


@dataclass
class Stack:
    redis: RedisServer
    server: Server
    workers: Workers
    beat: ClientelaProcess

    def client_for(self, tenant: Tenant) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, headers=tenant.client.headers, timeout=120)


@pytest.fixture
def stack(
    migrated: dict[str, str], session_dir: Path, session_workers: Workers, tmp_path: Path
) -> Iterator[Stack]:
    """A separate receiver + Redis + 2 workers + beat on the session's database."""
    session_workers.stop()
    redis = RedisServer(tmp_path / "redis")
    started: list[Any] = []
    try:
        redis.start()
        started.append(redis)
        env = {
            **migrated,
            "CLIENTELA_BROKER_URL": redis.url,
            "CLIENTELA_CHUNK_LEASE_SECONDS": LEASE_SECONDS,
            "CLIENTELA_RECONCILE_INTERVAL_SECONDS": "1",
        }
        logs = session_dir / "logs"
        server = start_server("stack-server", env, logs)
        started.append(server)
        workers = Workers(env, logs, count=2)
        for p in workers.processes:
            p.name = f"stack-{p.name}"
        started.append(workers)
        workers.start()
        beat = ClientelaProcess("stack-beat", ["beat"], env, logs)
        started.append(beat)
        beat.start()
        yield Stack(redis, server, workers, beat)
    finally:
        for thing in reversed(started):
            thing.stop()
        session_workers.start()


def check_outcome(body: dict[str, Any], expected: list[dict[str, Any]], codes: list[str]) -> None:
    assert body["status"] == "COMPLETED"
    assert strip_ids(body["results"]) == expected
    assert body["created"] == len([e for e in expected if e["status"] == "CREATED"])
    assert body["created"] + body["failed"] == body["total"] == body["processed"] == len(expected)
    assert sorted(codes) == sorted(e["code"] for e in expected if e["status"] == "CREATED")


def codes_of(db: Callable[..., list[Any]], tenant: Tenant) -> list[str]:
    return [r[0] for r in db("SELECT code FROM customers WHERE tenant_id::text = :t", t=tenant.id)]


@pytest.mark.slow
def test_worker_killed_mid_chunk_loses_and_duplicates_nothing(
    stack: Stack, make_tenant: Callable[[], Tenant], db: Callable[..., list[Any]]
) -> None:
    tenant = make_tenant()
    payload = mixed_payload(6_000, f"KILL{uuid.uuid4().hex[:4]}", [], {1000: 999, 5999: 3})
    with stack.client_for(tenant) as client:
        batch_id = submit(client, payload.items)
        # Kill a worker (its pool child too) as soon as the batch is under way.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rows = db("SELECT status FROM batches WHERE id::text = :b", b=batch_id)
            if rows and rows[0][0] != "QUEUED":
                break
            time.sleep(0.02)
        stack.workers.processes[0].kill()
        body = wait_for_batch(client, batch_id, timeout=180)
    check_outcome(body, payload.expected, codes_of(db, tenant))
    assert db(
        "SELECT count(*), count(DISTINCT idx) FROM item_results WHERE batch_id::text = :b", b=batch_id
    ) == [(6_000, 6_000)]


@pytest.mark.slow
def test_redis_restarted_empty_still_completes_the_batch(
    stack: Stack, make_tenant: Callable[[], Tenant], db: Callable[..., list[Any]]
) -> None:
    tenant = make_tenant()
    payload = mixed_payload(2_500, f"RDS{uuid.uuid4().hex[:4]}", [], {2000: 5})
    stack.workers.stop()
    with stack.client_for(tenant) as client:
        batch_id = submit(client, payload.items)
        # Every message of the batch is lost with Redis.
        stack.redis.restart_empty()
        stack.workers.start()
        body = wait_for_batch(client, batch_id, timeout=180)
        check_outcome(body, payload.expected, codes_of(db, tenant))

        # The receiver keeps working with the restarted Redis.
        again = mixed_payload(10, f"RDS2{uuid.uuid4().hex[:4]}", [], {})
        body = wait_for_batch(client, submit(client, again.items), timeout=120)
        assert strip_ids(body["results"]) == again.expected


@pytest.mark.slow
def test_postgres_restarted_still_completes_the_batch(
    stack: Stack,
    postgres: PostgresServer,
    server: Server,
    make_tenant: Callable[[], Tenant],
    db: Callable[..., list[Any]],
) -> None:
    tenant = make_tenant()
    payload = mixed_payload(2_500, f"PG{uuid.uuid4().hex[:4]}", [], {1500: 7})
    stack.workers.stop()
    with stack.client_for(tenant) as client:
        batch_id = submit(client, payload.items)
        postgres.stop()
        postgres.launch()
        stack.workers.start()
        body = wait_for_batch(client, batch_id, timeout=180)
        check_outcome(body, payload.expected, codes_of(db, tenant))
    # The session's receiver got its database back too.
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.base_url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "receiver not ready again 30 s after PostgreSQL came back"
        time.sleep(0.5)
    r = tenant.client.get(f"/v1/customers/batches/{batch_id}")
    assert r.status_code == 200


@pytest.mark.slow
def test_poison_chunk_ends_the_batch_failed_with_unprocessed_items(
    stack: Stack, make_tenant: Callable[[], Tenant], db: Callable[..., list[Any]], engine: sa.Engine
) -> None:
    """A chunk whose stored items cannot be read (simulated corruption) fails on every attempt: after its
    retries the batch ends FAILED with every item UNPROCESSED, instead of looping forever."""
    tenant = make_tenant()
    payload = mixed_payload(300, f"PSN{uuid.uuid4().hex[:4]}", [], {})
    stack.workers.stop()
    with stack.client_for(tenant) as client:
        batch_id = submit(client, payload.items)
        with engine.begin() as conn:
            corrupted = conn.execute(
                sa.text("UPDATE chunks SET payload = :p WHERE batch_id::text = :b"),
                {"p": b"\x00 not json", "b": batch_id},
            ).rowcount
        assert corrupted == 1
        stack.workers.start()
        body = wait_for_batch(client, batch_id, timeout=240)
    assert body["status"] == "FAILED"
    assert body["created"] == 0
    assert [r["index"] for r in body["results"]] == list(range(300))
    assert {r["status"] for r in body["results"]} == {"UNPROCESSED"}
    assert codes_of(db, tenant) == []
    [(status, attempts)] = db("SELECT status, attempts FROM chunks WHERE batch_id::text = :b", b=batch_id)
    assert status == "FAILED"
    assert 1 < attempts < 20
