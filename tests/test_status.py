"""Reading batches back: the status endpoint (423 while locked, paging, filters), the list, and
`Prefer: wait`."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from tests.conftest import CHUNK_SIZE, Tenant
from tests.helpers import (
    LOCKED,
    SUMMARY_KEYS,
    created,
    err,
    failed,
    post_batch,
    run_batch,
    strip_ids,
    submit,
    unique_code,
    wait_for_batch,
)
from tests.services import Workers


def utc(ts: str) -> datetime:
    parsed = datetime.fromisoformat(ts)
    assert parsed.utcoffset() == timedelta(0), f"{ts} is not UTC"
    return parsed


def five_items(prefix: str) -> tuple[list[Any], list[dict[str, Any]]]:
    items: list[Any] = [
        {"code": f"{prefix}-0", "name": "a"},
        {"code": f"{prefix}-1"},
        {"code": f"{prefix}-2", "name": "c"},
        {"code": f"{prefix}-3", "name": "d", "term": 30.5},
        {"code": f"{prefix}-4", "name": "e"},
    ]
    expected = [
        created(0, f"{prefix}-0"),
        failed(1, err("name", "Field is required")),
        created(2, f"{prefix}-2"),
        failed(3, err("term", "Field exceeds maximum of 0 decimal places")),
        created(4, f"{prefix}-4"),
    ]
    return items, expected


def test_finished_batch_body(tenant: Tenant) -> None:
    prefix = unique_code("S")
    items, expected = five_items(prefix)
    before = datetime.now().astimezone()
    body = run_batch(tenant.client, items)
    after = datetime.now().astimezone()
    assert set(body) == SUMMARY_KEYS | {"results"}
    assert body["status"] == "COMPLETED"
    assert (body["total"], body["processed"], body["created"], body["failed"]) == (5, 5, 3, 2)
    submitted, started, completed = (utc(body[k]) for k in ("submittedAt", "startedAt", "completedAt"))
    slack = timedelta(seconds=2)
    assert before - slack <= submitted <= started <= completed <= after + slack
    assert strip_ids(body["results"]) == expected


def test_results_filter_and_paging(tenant: Tenant) -> None:
    prefix = unique_code("P")
    items, expected = five_items(prefix)
    batch_id = submit(tenant.client, items)
    full = wait_for_batch(tenant.client, batch_id)
    by_index = {r["index"]: r for r in full["results"]}

    def results(**params: Any) -> list[dict[str, Any]]:
        r = tenant.client.get(f"/v1/customers/batches/{batch_id}", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        # Filters and pages cut the results, never the batch's counters.
        assert (body["total"], body["created"], body["failed"]) == (5, 3, 2)
        out: list[dict[str, Any]] = body["results"]
        return out

    assert results(status="FAILED") == [by_index[1], by_index[3]]
    assert results(status="CREATED") == [by_index[0], by_index[2], by_index[4]]
    assert results(offset=1, limit=2) == [by_index[1], by_index[2]]
    assert results(offset=4, limit=10) == [by_index[4]]
    assert results(offset=5) == []
    # Offsets past any database integer are as empty as any other past the end.
    assert results(offset=2**31) == []
    assert results(offset=2**31 - 1, limit=10) == []
    assert results(offset=10**24, limit=1) == []
    assert results(status="CREATED", offset=2**63) == []
    assert results(limit=1) == [by_index[0]]
    assert results(status="CREATED", offset=1, limit=1) == [by_index[2]]
    assert strip_ids(results()) == expected


def test_pages_across_chunks_are_the_full_results_cut(tenant: Tenant) -> None:
    """A page reads only the chunks that hold it: its entries are still those of the full answer."""
    prefix = unique_code("PG")
    items = [
        {"code": f"{prefix}-{i:04d}", **({} if i % 7 == 3 else {"name": f"Page {i}"})}
        for i in range(2 * CHUNK_SIZE + 100)
    ]
    batch_id = submit(tenant.client, items)
    full = wait_for_batch(tenant.client, batch_id)["results"]
    assert len(full) == len(items)
    for offset, limit in [
        (0, 1),
        (CHUNK_SIZE - 1, 2),
        (CHUNK_SIZE, CHUNK_SIZE),
        (CHUNK_SIZE - 5, CHUNK_SIZE + 10),
        (2 * CHUNK_SIZE + 99, 10),
        (2 * CHUNK_SIZE + 100, 10),
        (CHUNK_SIZE + 1, None),
    ]:
        params: dict[str, int] = {"offset": offset} if limit is None else {"offset": offset, "limit": limit}
        r = tenant.client.get(f"/v1/customers/batches/{batch_id}", params=params)
        assert r.status_code == 200, r.text
        end = None if limit is None else offset + limit
        assert r.json()["results"] == full[offset:end], (offset, limit)


def test_locked_while_queued_and_listed_meanwhile(stopped_workers: Workers, tenant: Tenant) -> None:
    items = [{"code": unique_code("Q"), "name": "q"}, {"code": unique_code("Q")}]
    batch_id = submit(tenant.client, items)

    r = tenant.client.get(f"/v1/customers/batches/{batch_id}")
    assert r.status_code == 423
    assert r.json() == {
        "statusCode": 423,
        "errors": [{"message": LOCKED}],
        "batchId": batch_id,
        "status": "QUEUED",
        "total": 2,
        "processed": 0,
        "created": 0,
        "failed": 0,
    }
    assert int(r.headers["Retry-After"]) >= 1

    # The list always answers 200, also while the batch waits.
    listed = tenant.client.get("/v1/customers/batches")
    assert listed.status_code == 200
    [summary] = listed.json()["batches"]
    assert summary["batchId"] == batch_id
    assert summary["status"] == "QUEUED"
    assert "results" not in summary
    queued = tenant.client.get("/v1/customers/batches", params={"status": "QUEUED"}).json()["batches"]
    assert [b["batchId"] for b in queued] == [batch_id]
    assert tenant.client.get("/v1/customers/batches", params={"status": "COMPLETED"}).json()["batches"] == []

    # Prefer: wait that cannot be honoured in time: the plain 202.
    t0 = time.monotonic()
    r = post_batch(tenant.client, [{"code": unique_code("W"), "name": "w"}], prefer="wait=1")
    elapsed = time.monotonic() - t0
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "QUEUED"
    assert r.json()["message"] == "Batch accepted"
    assert "Preference-Applied" not in r.headers
    assert 0.95 <= elapsed < 10, f"Prefer: wait=1 gave up after {elapsed:.2f}s"
    waited_id = r.json()["batchId"]

    stopped_workers.start()
    done = wait_for_batch(tenant.client, batch_id)
    assert done["status"] == "COMPLETED"
    assert (done["created"], done["failed"]) == (1, 1)
    assert wait_for_batch(tenant.client, waited_id)["created"] == 1


def test_list_newest_first_with_paging_and_status_filter(tenant: Tenant) -> None:
    ids = [run_batch(tenant.client, [{"code": unique_code("B"), "name": "b"}])["batchId"] for _ in range(3)]
    newest_first = list(reversed(ids))

    r = tenant.client.get("/v1/customers/batches")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"batches", "nextBefore"}
    assert [b["batchId"] for b in body["batches"]] == newest_first
    assert body["nextBefore"] is None
    for b in body["batches"]:
        assert set(b) == SUMMARY_KEYS
        assert (b["status"], b["total"], b["processed"], b["created"], b["failed"]) == (
            "COMPLETED",
            1,
            1,
            1,
            0,
        )

    page1 = tenant.client.get("/v1/customers/batches", params={"limit": 2}).json()
    assert [b["batchId"] for b in page1["batches"]] == newest_first[:2]
    assert page1["nextBefore"] == newest_first[1]
    page2 = tenant.client.get(
        "/v1/customers/batches", params={"limit": 2, "before": page1["nextBefore"]}
    ).json()
    assert [b["batchId"] for b in page2["batches"]] == newest_first[2:]
    assert page2["nextBefore"] is None

    assert [
        b["batchId"]
        for b in tenant.client.get("/v1/customers/batches", params={"status": "COMPLETED"}).json()["batches"]
    ] == newest_first
    assert tenant.client.get("/v1/customers/batches", params={"status": "RUNNING"}).json() == {
        "batches": [],
        "nextBefore": None,
    }


def test_prefer_wait_all_valid_is_201(tenant: Tenant, db: Callable[..., list[Any]]) -> None:
    codes = [unique_code("Y"), unique_code("Y")]
    r = post_batch(tenant.client, [{"code": c, "name": "ok"} for c in codes], prefer="wait=30")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body == {
        "statusCode": 201,
        "message": "Customers created successfully",
        "batchId": body["batchId"],
    }
    assert r.headers["Preference-Applied"] == "wait=30"
    for c in codes:
        assert tenant.client.get(f"/v1/customers/{c}").status_code == 200
    done = tenant.client.get(f"/v1/customers/batches/{body['batchId']}")
    assert done.status_code == 200
    assert done.json()["created"] == 2


def test_prefer_wait_of_any_length_is_capped(tenant: Tenant) -> None:
    """RFC 7240 puts no bound on the digits of a wait; past the cap, any number of them asks for the cap."""
    code = unique_code("L")
    r = post_batch(tenant.client, [{"code": code, "name": "ok"}], prefer="wait=" + "1" * 4301)
    assert r.status_code == 201, r.text
    assert r.headers["Preference-Applied"] == "wait=60"
    r = post_batch(tenant.client, [{"code": unique_code("L"), "name": "ok"}], prefer="wait=0000000000000030")
    assert r.status_code == 201, r.text
    assert r.headers["Preference-Applied"] == "wait=30"


def test_prefer_wait_with_invalid_items_is_422_per_item(tenant: Tenant) -> None:
    good = unique_code("G")
    items: list[Any] = [
        {"code": unique_code("G")},
        {"code": good, "name": "fine"},
        {"code": "X" * 19, "name": "long", "quota": True},
        "not an object",
    ]
    r = post_batch(tenant.client, items, prefer="wait=30")
    assert r.status_code == 422, r.text
    assert r.headers["Preference-Applied"] == "wait=30"
    body = r.json()
    assert body == {
        "statusCode": 422,
        "batchId": body["batchId"],
        "created": 1,
        "errors": [
            {"index": 0, "errors": [err("name", "Field is required")]},
            {
                "index": 2,
                "errors": [
                    err("code", "Field exceeds maximum length of 18 characters"),
                    err("quota", "Field must be of type decimal"),
                ],
            },
            {"index": 3, "errors": [err(None, "Item must be an object")]},
        ],
    }
    # Partial success: the valid item was created all the same.
    assert tenant.client.get(f"/v1/customers/{good}").json()["name"] == "fine"
