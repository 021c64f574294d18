"""The receiver's envelope checks: every row of the contract's table, with the exact body a client gets."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import Tenant
from tests.helpers import created, post_batch, run_batch, strip_ids, unique_code
from tests.services import Server


def error_body(status: int, message: str) -> dict[str, object]:
    return {"statusCode": status, "errors": [{"message": message}]}


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"],
)
def test_wrong_content_type_is_415(tenant: Tenant, content_type: str | None) -> None:
    body = json.dumps([{"code": unique_code(), "name": "A"}]).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = tenant.client.post("/v1/customers/batch-create", content=body, headers=headers)
    assert r.status_code == 415
    assert r.json() == error_body(415, "Content-Type: application/json is required")


@pytest.mark.parametrize("raw", [b"", b" \r\n\t "])
def test_empty_body_is_422(tenant: Tenant, raw: bytes) -> None:
    r = post_batch(tenant.client, raw=raw)
    assert r.status_code == 422
    assert r.json() == error_body(422, "Request body cannot be empty")


@pytest.mark.parametrize(
    "raw",
    [
        "[{",
        "{'code': 'x'}",
        "[1,]",
        "nope",
        '[{"code": "A"}] trailing',
        "\xff",
        "[" * 300 + "]" * 300,
        "[" + "9" * 5000 + "]",
    ],
)
def test_invalid_json_is_400(tenant: Tenant, raw: str) -> None:
    r = post_batch(tenant.client, raw=raw.encode("latin-1"))
    assert r.status_code == 400
    assert r.json() == error_body(400, "Invalid JSON in request body")


@pytest.mark.parametrize(
    "raw",
    [
        '{"code": "A", "name": "B"}',
        '"text"',
        "42",
        "null",
        "true",
        "{}",
        # JSON all the same, though no item may nest this deep or hold such a number.
        '{"a": ' * 300 + "1" + "}" * 300,
        "9" * 5000,
        '{"a": [' + ",".join(["1"] * 1_000_001) + "]}",
    ],
)
def test_json_that_is_not_an_array_is_422(tenant: Tenant, raw: str) -> None:
    r = post_batch(tenant.client, raw=raw)
    assert r.status_code == 422
    assert r.json() == error_body(422, "Request body must be a JSON array")


def test_empty_array_is_422(tenant: Tenant) -> None:
    r = post_batch(tenant.client, raw="[]")
    assert r.status_code == 422
    assert r.json() == error_body(422, "Array must contain at least 1 item")


def test_more_than_10000_items_is_422(tenant: Tenant) -> None:
    r = post_batch(tenant.client, [{"code": f"X{i}", "name": "n"} for i in range(10_001)])
    assert r.status_code == 422
    assert r.json() == error_body(422, "Array must contain at most 10000 items")
    listed = tenant.client.get("/v1/customers/batches")
    assert listed.status_code == 200
    assert listed.json()["batches"] == [], "a refused request must not leave a batch behind"


def test_a_body_of_millions_of_tiny_values_is_413(tenant: Tenant) -> None:
    """Far below the byte limit, yet its parsed form would take gigabytes: refused before parsing, with the
    contract's message for a body over a limit."""
    r = post_batch(tenant.client, raw='[{"code": "A", "x": [' + ",".join(["[]"] * 2_000_000) + "]}]")
    assert r.status_code == 413
    assert r.json() == error_body(413, "Request body too large")


@pytest.mark.parametrize("items", [1_000_001, 30_000_000])
def test_too_many_items_is_422_however_many_values(tenant: Tenant, items: int) -> None:
    """A flat array of tiny items holds more values than any body may, yet what the client did wrong is
    the number of items, and the answer says so."""
    r = post_batch(tenant.client, raw="[" + ",".join(["1"] * items) + "]")
    assert r.status_code == 422
    assert r.json() == error_body(422, "Array must contain at most 10000 items")


def test_many_separators_inside_strings_are_not_values(tenant: Tenant) -> None:
    observations = ", : [ {" * 60
    r = post_batch(tenant.client, [{"code": unique_code("SEP"), "observations": observations}] * 5000)
    assert r.status_code == 202, r.text


@pytest.fixture
def small_limit_server(extra_server: Callable[..., Server]) -> str:
    return extra_server("server-small-limit", CLIENTELA_MAX_BODY_BYTES="2048").base_url


def test_body_over_the_limit_is_413(small_limit_server: str, tenant: Tenant) -> None:
    items = [{"code": f"BIG-{i:04d}", "name": "x" * 100} for i in range(40)]
    body = json.dumps(items).encode()
    assert len(body) > 2048
    with httpx.Client(base_url=small_limit_server, headers=tenant.client.headers, timeout=60) as c:
        r = post_batch(c, raw=body)
        assert r.status_code == 413
        assert r.json() == error_body(413, "Request body too large")

        # Without a Content-Length (chunked upload) the limit holds all the same.
        def chunks() -> Iterator[bytes]:
            for i in range(0, len(body), 512):
                yield body[i : i + 512]

        r = c.post(
            "/v1/customers/batch-create", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413
        assert r.json() == error_body(413, "Request body too large")

        # Under the limit the same server accepts.
        r = post_batch(c, [{"code": unique_code(), "name": "small"}])
        assert r.status_code == 202, r.text


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_accepted_batch_is_202_with_location(tenant: Tenant, content_type: str) -> None:
    items = [{"code": unique_code(), "name": "A"}, {"code": unique_code(), "name": "B"}, 7]
    r = post_batch(tenant.client, items, headers={"Content-Type": content_type})
    assert r.status_code == 202, r.text
    body = r.json()
    batch_id = body["batchId"]
    assert str(uuid.UUID(batch_id)) == batch_id
    assert body == {
        "statusCode": 202,
        "message": "Batch accepted",
        "batchId": batch_id,
        "status": "QUEUED",
        "total": 3,
    }
    assert r.headers["Location"] == f"/v1/customers/batches/{batch_id}"


def test_malformed_requests_never_answer_5xx(tenant: Tenant) -> None:
    bodies: list[bytes] = [
        b"[" * 100_000,
        b'[{"code": "' + b"\\ud800" + b'", "name": "x"}]',
        b"\x00\x01\x02",
        b'[{"quota": 1e999999}]',
        b'[{"a": ' * 5000,
        json.dumps([[[[[]]]]]).encode(),
    ]
    for raw in bodies:
        r = post_batch(tenant.client, raw=raw)
        assert r.status_code < 500, (raw[:40], r.status_code, r.text[:300])
        body = r.json()
        assert body["statusCode"] == r.status_code


def test_a_pretty_printed_body_is_read_as_the_same_items(tenant: Tenant) -> None:
    """Line breaks between tokens (indented JSON, CRLF too) are whitespace, whatever the worker's storage
    of the items; a line break escaped inside a string stays one, and a number keeps its exact text."""
    prefix = unique_code("PP")
    items = [
        {"code": f"{prefix}-1", "name": "two\nlines", "quota": "QUOTA"},
        {"code": f"{prefix}-2", "name": "plain", "observations": "a, b\r\nc"},
    ]
    raw = json.dumps(items, indent=2).replace("\n", "\r\n").replace('"QUOTA"', "1234567890123456.010")
    body = run_batch(tenant.client, raw=raw)
    assert strip_ids(body["results"]) == [created(0, f"{prefix}-1"), created(1, f"{prefix}-2")]
    first = tenant.client.get(f"/v1/customers/{prefix}-1").json()
    assert (first["name"], first["quota"]) == ("two\nlines", "1234567890123456.01")
    assert tenant.client.get(f"/v1/customers/{prefix}-2").json()["observations"] == "a, b\r\nc"
