"""What the tests send and expect: the reference document's field table, payloads, polling."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from worker import results as item_results
from worker.contracts.customer import CUSTOMER

# The reference document's field table, in its order: (name, kind, max length | (precision, scale)).
FIELDS: list[tuple[str, str, Any]] = [
    ("code", "str", 18),
    ("type", "str", 30),
    ("name", "str", 150),
    ("contact", "str", 150),
    ("phone", "str", 100),
    ("address", "str", 300),
    ("city", "str", 50),
    ("quota", "dec", (18, 2)),
    ("term", "dec", (3, 0)),
    ("payment_method", "str", 50),
    ("email", "str", 150),
    ("email2", "str", 150),
    ("country", "str", 50),
    ("region", "str", 50),
    ("price_list", "str", 20),
    ("location", "str", 20),
    ("nit", "str", 20),
    ("discount", "dec", (10, 2)),
    ("discount_list", "str", 20),
    ("observations", "str", 500),
    ("name_est", "str", 200),
    ("short_name", "str", 200),
    ("operation_center", "str", 10),
    ("block_sales", "yn", 1),
    ("commercial_discount", "dec", (18, 2)),
    ("discount_base", "dec", (18, 2)),
    ("withholding_base", "dec", (18, 2)),
    ("withholding", "dec", (18, 2)),
    ("corporate_client", "str", 18),
    ("iva_exempt", "yn", 1),
    ("real_quota", "dec", (18, 2)),
    ("state", "yn", 1),
]
FIELD_NAMES = [f[0] for f in FIELDS]

# The reference document's example request, byte for byte as the document gives it.
REFERENCE_EXAMPLE = (
    '[ { "code": "CLI-001", "type": "DISTRIBUIDOR", "name": "Distribuidora ABC S.A.S", "contact": '
    '"Juan Pérez", "phone": "3001234567", "email": "contacto@distribuidoraabc.com", "email2": '
    '"ventas@distribuidoraabc.com", "address": "Calle 100 #15-25 Oficina 301", "city": "Bogotá", '
    '"country": "Colombia", "region": "Cundinamarca", "quota": 50000000.0, "term": 30, "payment_method": '
    '"CRÉDITO", "nit": "900123456-1", "discount": 5.0, "discount_list": "DESC-PREMIUM", "observations": '
    '"Cliente preferencial - Zona norte", "price_list": "LP-001", "location": "LOC-NORTE", "name_est": '
    '"Distribuidora ABC Sede Principal", "short_name": "Dist ABC", "operation_center": "CO-001", '
    '"block_sales": "N", "commercial_discount": 2500.0, "discount_base": 100000.0, "withholding_base": '
    '500000.0, "withholding": 15000.0, "corporate_client": "CORP-001", "iva_exempt": "N", "real_quota": '
    '45000000.0, "state": "Y" }]'
)

# What GET /v1/customers/CLI-001 must show for the example: decimals as strings with their scale.
REFERENCE_STORED = {
    "code": "CLI-001",
    "type": "DISTRIBUIDOR",
    "name": "Distribuidora ABC S.A.S",
    "contact": "Juan Pérez",
    "phone": "3001234567",
    "address": "Calle 100 #15-25 Oficina 301",
    "city": "Bogotá",
    "quota": "50000000.00",
    "term": "30",
    "payment_method": "CRÉDITO",
    "email": "contacto@distribuidoraabc.com",
    "email2": "ventas@distribuidoraabc.com",
    "country": "Colombia",
    "region": "Cundinamarca",
    "price_list": "LP-001",
    "location": "LOC-NORTE",
    "nit": "900123456-1",
    "discount": "5.00",
    "discount_list": "DESC-PREMIUM",
    "observations": "Cliente preferencial - Zona norte",
    "name_est": "Distribuidora ABC Sede Principal",
    "short_name": "Dist ABC",
    "operation_center": "CO-001",
    "block_sales": "N",
    "commercial_discount": "2500.00",
    "discount_base": "100000.00",
    "withholding_base": "500000.00",
    "withholding": "15000.00",
    "corporate_client": "CORP-001",
    "iva_exempt": "N",
    "real_quota": "45000000.00",
    "state": "Y",
}

LOCKED = "Resource is locked and cannot be accessed"
# The keys of a batch's progress (the 423 body adds statusCode and errors) and of its summary.
PROGRESS_KEYS = {"batchId", "status", "total", "processed", "created", "failed"}
SUMMARY_KEYS = PROGRESS_KEYS | {"submittedAt", "startedAt", "completedAt"}
UNAUTHORIZED = {"statusCode": 401, "errors": [{"message": "Unauthorized"}]}


def reference_example(code: str) -> str:
    """The reference example with another code (codes are unique per tenant)."""
    return REFERENCE_EXAMPLE.replace('"CLI-001"', json.dumps(code))


def unique_code(prefix: str = "C") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def err(field: str | None, message: str) -> dict[str, str]:
    return {"message": message} if field is None else {"field": field, "message": message}


def created(index: int, code: str) -> dict[str, Any]:
    """A CREATED result without its customerId (compare with `strip_ids`)."""
    return {"index": index, "status": "CREATED", "code": code}


def failed(index: int, *errors: dict[str, str]) -> dict[str, Any]:
    return {"index": index, "status": "FAILED", "errors": list(errors)}


def strip_ids(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results with the customerId removed after checking that every CREATED one has its own random UUID, in
    the canonical text."""
    out = []
    seen: set[str] = set()
    for r in results:
        r = dict(r)
        if r.get("status") == "CREATED":
            assert set(r) == {"index", "status", "code", "customerId"}, r
            customer_id = r.pop("customerId")
            parsed = uuid.UUID(customer_id)
            assert str(parsed) == customer_id, r
            assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122), r
            assert customer_id not in seen, r
            seen.add(customer_id)
        out.append(r)
    return out


def post_batch(
    client: httpx.Client,
    items: Any = None,
    *,
    raw: str | bytes | None = None,
    prefer: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body = raw if raw is not None else json.dumps(items, ensure_ascii=False)
    h = {"Content-Type": "application/json", "Accept": "application/json"}
    if prefer is not None:
        h["Prefer"] = prefer
    h.update(headers or {})
    content = body.encode() if isinstance(body, str) else body
    return client.post("/v1/customers/batch-create", content=content, headers=h)


def submit(client: httpx.Client, items: Any = None, *, raw: str | None = None) -> str:
    """Submit a batch that must be accepted; return its id."""
    r = post_batch(client, items, raw=raw)
    assert r.status_code == 202, f"{r.status_code} {r.text[:500]}"
    return str(r.json()["batchId"])


def wait_for_batch(
    client: httpx.Client, batch_id: str, timeout: float = 120, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Poll the status endpoint until the batch has ended (200); every answer before must be a 423."""
    deadline = time.monotonic() + timeout
    last: httpx.Response | None = None
    while time.monotonic() < deadline:
        last = client.get(f"/v1/customers/batches/{batch_id}", params=params)
        if last.status_code == 200:
            body: dict[str, Any] = last.json()
            return body
        assert last.status_code == 423, f"unexpected {last.status_code}: {last.text[:500]}"
        time.sleep(0.2)
    raise AssertionError(
        f"batch {batch_id} not finished after {timeout}s; last answer "
        f"{last.status_code if last else None}: {last.text[:500] if last else ''}"
    )


def run_batch(
    client: httpx.Client, items: Any = None, *, raw: str | None = None, timeout: float = 120
) -> dict[str, Any]:
    return wait_for_batch(client, submit(client, items, raw=raw), timeout)


@dataclass
class Payload:
    """A generated batch and the result expected for each index."""

    items: list[dict[str, Any]]
    expected: list[dict[str, Any]]

    @property
    def created_codes(self) -> list[str]:
        return [e["code"] for e in self.expected if e["status"] == "CREATED"]


def mixed_payload(n: int, prefix: str, existing: list[str], dup_of: dict[int, int]) -> Payload:
    """`n` items: mostly valid, some invalid, some repeating an earlier item's code (`dup_of`: index ->
    index of the first occurrence), and the codes in `existing` (already stored) placed at the end."""
    special = set(dup_of) | set(dup_of.values())
    exist_at = {n - 1 - 3 * j: code for j, code in enumerate(existing)}
    assert not (special & set(exist_at))
    items: list[dict[str, Any]] = []
    expected: list[dict[str, Any]] = []
    for i in range(n):
        code = f"{prefix}-{i:05d}"
        item: dict[str, Any] = {"code": code, "name": f"Customer {i}", "quota": f"{i}.50", "term": 30}
        if i in dup_of:
            first = dup_of[i]
            item["code"] = f"{prefix}-{first:05d}"
            expected.append(failed(i, err("code", f"Duplicate code in batch (first at index {first})")))
        elif i in exist_at:
            item["code"] = exist_at[i]
            expected.append(failed(i, err("code", "Code already exists")))
        elif i not in special and i % 7 == 3:
            del item["name"]
            expected.append(failed(i, err("name", "Field is required")))
        elif i not in special and i % 11 == 5:
            item["quota"] = "abc"
            item["block_sales"] = "X"
            expected.append(
                failed(
                    i,
                    err("quota", "Field must be a valid decimal (e.g., 1.5, 10.25)"),
                    err("block_sales", "Value must be one of: Y, N"),
                )
            )
        else:
            expected.append(created(i, code))
        items.append(item)
    return Payload(items, expected)


T = TypeVar("T")


def stored_results(db: Callable[..., list[Any]], batch_id: str) -> list[dict[str, Any]]:
    """The result entries that a batch's ended chunks keep in the database, in chunk order, as stored."""
    packed = db(
        "SELECT results FROM chunks WHERE batch_id::text = :b AND results IS NOT NULL ORDER BY seq",
        b=batch_id,
    )
    return item_results.entries(bytes(value) for (value,) in packed)


def wait_until(predicate: Callable[[], T], timeout: float, what: str, pause: float = 0.05) -> T:
    """The predicate's first truthy value; fails the test with `what` if none comes within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(pause)


def read_item(text: bytes) -> tuple[list[Any] | None, list[dict[str, str]]]:
    """One item's JSON text as a worker reads it in a chunk of its own: its stored values in
    ``value_names`` order (decimals as text), or None and its errors."""
    records, errors = CUSTOMER.read_chunk([text], escapes=b"\\" in text)
    return (records.values(0) if records.positions else None), errors.get(0, [])
