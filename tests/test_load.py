"""Load: many producers submit batches at once over loopback while pollers watch them; every request is
answered (no 5xx, no transport error), every batch ends with exactly the expected per-item results, and
every created customer is stored exactly once. Speed is measured and printed, never asserted."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import Tenant
from tests.helpers import (
    LOCKED,
    PROGRESS_KEYS,
    SUMMARY_KEYS,
    Payload,
    mixed_payload,
    run_batch,
    stored_results,
    strip_ids,
)
from tests.report import figure
from tests.services import Server, Workers

TENANTS = 4
PRODUCERS = 20
BATCHES_PER_PRODUCER = 20
ITEMS_PER_BATCH = 1000
STATUS_POLLERS = 4
# A tenant has at most PRODUCERS / TENANTS * BATCHES_PER_PRODUCER * ITEMS_PER_BATCH = 100,000 items in
# progress, under the default cap of 200,000; a 429 is still honoured (and counted) should the cap change.
DEADLINE_SECONDS = 300
POST_TIMEOUT = 60
POLL_TIMEOUT = 30
# Indexes repeating an earlier item's code; each batch also repeats two codes its tenant already has.
DUPLICATES = {10: 2, 500: 499, 998: 0}
EXISTING_PER_BATCH = 2


@dataclass
class Submitted:
    tenant: Tenant
    payload: Payload
    batch_id: str


@dataclass
class LoadRun:
    """What producers and pollers share: the batches accepted so far, what was seen, what went wrong."""

    deadline: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    submitted: list[Submitted] = field(default_factory=list)
    ended_at: dict[str, float] = field(default_factory=dict)
    last_processed: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    throttled: int = 0
    first_post: float | None = None
    post_latencies: list[float] = field(default_factory=list)
    poll_latencies: list[float] = field(default_factory=list)
    health_latencies: list[float] = field(default_factory=list)
    producers_done: threading.Event = field(default_factory=threading.Event)

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)

    def pending(self) -> list[Submitted]:
        with self.lock:
            return [s for s in self.submitted if s.batch_id not in self.ended_at]

    def finished(self) -> bool:
        return (self.producers_done.is_set() and not self.pending()) or time.monotonic() > self.deadline


def percentiles(latencies: list[float]) -> str:
    """p50/p99/max in milliseconds (nearest rank)."""
    if not latencies:
        return "none"
    ordered = sorted(latencies)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000

    return f"p50 {rank(0.5):.0f} / p99 {rank(0.99):.0f} / max {ordered[-1] * 1000:.0f} ms"


def produce(run: LoadRun, server: Server, tenant: Tenant, payloads: list[Payload]) -> None:
    """Submit the batches one after the other; a 429 is retried after its Retry-After."""
    with httpx.Client(base_url=server.base_url, headers=tenant.client.headers, timeout=POST_TIMEOUT) as c:
        for payload in payloads:
            body = json.dumps(payload.items).encode()
            while time.monotonic() < run.deadline:
                started = time.monotonic()
                with run.lock:
                    run.first_post = run.first_post or started
                try:
                    r = c.post(
                        "/v1/customers/batch-create",
                        content=body,
                        headers={"Content-Type": "application/json"},
                    )
                except httpx.HTTPError as exc:
                    run.error(f"POST: {exc!r}")
                    break
                latency = time.monotonic() - started
                if r.status_code == 429:
                    with run.lock:
                        run.throttled += 1
                    time.sleep(int(r.headers["retry-after"]))
                    continue
                if r.status_code != 202 or r.json()["total"] != len(payload.items):
                    run.error(f"POST: {r.status_code} {r.text[:300]}")
                    break
                with run.lock:
                    run.post_latencies.append(latency)
                    run.submitted.append(Submitted(tenant, payload, r.json()["batchId"]))
                break


def check_poll(run: LoadRun, batch_id: str, r: httpx.Response) -> None:
    """A running batch answers 423 with consistent, never decreasing progress; an ended one 200."""
    body = r.json()
    if r.status_code == 423:
        ok = (
            set(body) == PROGRESS_KEYS | {"statusCode", "errors"}
            and body["statusCode"] == 423
            and body["errors"] == [{"message": LOCKED}]
            and body["batchId"] == batch_id
            and body["status"] in ("QUEUED", "RUNNING")
            and body["total"] == ITEMS_PER_BATCH
            and body["created"] + body["failed"] == body["processed"] <= body["total"]
            and r.headers.get("retry-after", "").isdigit()
        )
        with run.lock:
            ok = ok and body["processed"] >= run.last_processed.get(batch_id, 0)
            run.last_processed[batch_id] = body["processed"]
    elif r.status_code == 200:
        ok = (
            set(body) == SUMMARY_KEYS | {"results"}
            and body["status"] == "COMPLETED"
            and body["processed"] == body["total"] == ITEMS_PER_BATCH
            and len(body["results"]) == 1
        )
        with run.lock:
            run.ended_at.setdefault(batch_id, time.monotonic())
    else:
        ok = False
    if not ok:
        run.error(f"status {batch_id}: {r.status_code} {r.text[:300]}")


def poll_status(run: LoadRun, server: Server, offset: int) -> None:
    """Keep asking for the batches not yet seen ended, round robin, until all have ended."""
    turn = offset
    with httpx.Client(base_url=server.base_url, timeout=POLL_TIMEOUT) as client:
        while not run.finished():
            pending = run.pending()
            if not pending:
                time.sleep(0.05)
                continue
            batch = pending[turn % len(pending)]
            turn += 1
            started = time.monotonic()
            try:
                # One result is enough here: the full results are compared once every batch has ended.
                r = client.get(
                    f"/v1/customers/batches/{batch.batch_id}",
                    params={"limit": 1},
                    headers=batch.tenant.client.headers,
                )
            except httpx.HTTPError as exc:
                run.error(f"status {batch.batch_id}: {exc!r}")
                continue
            with run.lock:
                run.poll_latencies.append(time.monotonic() - started)
            try:
                check_poll(run, batch.batch_id, r)
            except (ValueError, KeyError, TypeError) as exc:
                run.error(f"status {batch.batch_id}: {exc!r} in {r.status_code} {r.text[:300]}")
            time.sleep(0.02)


def poll_health(run: LoadRun, server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=POLL_TIMEOUT) as client:
        while not run.finished():
            started = time.monotonic()
            try:
                r = client.get("/healthz")
            except httpx.HTTPError as exc:
                run.error(f"healthz: {exc!r}")
                continue
            with run.lock:
                run.health_latencies.append(time.monotonic() - started)
            if r.status_code != 200 or r.json() != {"status": "ok"}:
                run.error(f"healthz: {r.status_code} {r.text[:300]}")
            time.sleep(0.1)


@pytest.mark.slow
def test_concurrent_producers_get_every_batch_answered_and_stored_exactly_once(
    server: Server, workers: Workers, make_tenant: Callable[[], Tenant], db: Callable[..., list[Any]]
) -> None:
    tenants = [make_tenant() for _ in range(TENANTS)]
    # Codes each tenant already has, so that "Code already exists" is part of the load.
    seed = mixed_payload(20, "SEED", [], {})
    for tenant in tenants:
        assert strip_ids(run_batch(tenant.client, seed.items)["results"]) == seed.expected
    existing = seed.created_codes[:EXISTING_PER_BATCH]
    work = [
        (
            tenants[p % TENANTS],
            [
                mixed_payload(ITEMS_PER_BATCH, f"P{p:02d}B{b:02d}", existing, DUPLICATES)
                for b in range(BATCHES_PER_PRODUCER)
            ],
        )
        for p in range(PRODUCERS)
    ]

    run = LoadRun(deadline=time.monotonic() + DEADLINE_SECONDS)
    watchers = [threading.Thread(target=poll_health, args=(run, server))] + [
        threading.Thread(target=poll_status, args=(run, server, i)) for i in range(STATUS_POLLERS)
    ]
    producers = [threading.Thread(target=produce, args=(run, server, t, ps)) for t, ps in work]
    for thread in watchers + producers:
        thread.start()
    for thread in producers:
        thread.join(max(0.0, run.deadline - time.monotonic()) + POST_TIMEOUT)
    run.producers_done.set()
    for thread in watchers:
        thread.join(max(0.0, run.deadline - time.monotonic()) + POLL_TIMEOUT)
    assert not any(thread.is_alive() for thread in watchers + producers), "load threads did not stop"

    assert run.errors == [], f"{len(run.errors)} errors, first ones: {run.errors[:5]}"
    total_batches = PRODUCERS * BATCHES_PER_PRODUCER
    assert len(run.submitted) == total_batches
    assert set(run.ended_at) == {s.batch_id for s in run.submitted}, "batches still running at the deadline"
    assert run.first_post is not None
    wall = max(run.ended_at.values()) - run.first_post

    for s in run.submitted:
        r = s.tenant.client.get(f"/v1/customers/batches/{s.batch_id}", timeout=POLL_TIMEOUT)
        assert r.status_code == 200, r.text[:500]
        body = r.json()
        created = len(s.payload.created_codes)
        assert (body["status"], body["total"], body["processed"], body["created"], body["failed"]) == (
            "COMPLETED",
            ITEMS_PER_BATCH,
            ITEMS_PER_BATCH,
            created,
            ITEMS_PER_BATCH - created,
        )
        assert strip_ids(body["results"]) == s.payload.expected, s.batch_id

    for tenant in tenants:
        expected_codes = set(seed.created_codes).union(
            *(s.payload.created_codes for s in run.submitted if s.tenant is tenant)
        )
        [(rows, distinct)] = db(
            "SELECT count(*), count(DISTINCT code) FROM customers WHERE tenant_id = :t", t=tenant.id
        )
        assert rows == distinct == len(expected_codes), tenant.name
        stored = {code for (code,) in db("SELECT code FROM customers WHERE tenant_id = :t", t=tenant.id)}
        assert stored == expected_codes, tenant.name
        per_batch = db("SELECT id::text, total FROM batches WHERE tenant_id = :t", t=tenant.id)
        assert len(per_batch) == 1 + BATCHES_PER_PRODUCER * PRODUCERS // TENANTS
        for batch_id, total in per_batch:
            indexes = [entry["index"] for entry in stored_results(db, batch_id)]
            assert indexes == list(range(total)), (tenant.name, batch_id)

    items = total_batches * ITEMS_PER_BATCH
    figure(
        "load",
        f"{PRODUCERS} producers x {BATCHES_PER_PRODUCER} batches x {ITEMS_PER_BATCH:,} items "
        f"over {TENANTS} tenants = {items:,} items; "
        f"first POST to last batch seen ended {wall:.1f} s = {items / wall:,.0f} items/s end to end",
    )
    figure("load", f"POST 202 x {len(run.post_latencies)}: {percentiles(run.post_latencies)}")
    figure("load", f"status polls x {len(run.poll_latencies)}: {percentiles(run.poll_latencies)}")
    figure("load", f"healthz x {len(run.health_latencies)}: {percentiles(run.health_latencies)}")
    figure("load", f"errors {len(run.errors)}; 429 answers (retried after Retry-After) {run.throttled}")
