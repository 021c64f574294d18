"""Per-item validation by the workers: every message of the contract, its field, and the error order."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from tests.conftest import Tenant
from tests.helpers import (
    FIELD_NAMES,
    FIELDS,
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

REQUIRED = "Field is required"
STRING = "Field must be a string"
DEC_TYPE = "Field must be of type decimal"
DEC_FORMAT = "Field must be a valid decimal (e.g., 1.5, 10.25)"
DEC_NUMBER = "Field must be a valid decimal number"
YN = "Value must be one of: Y, N"


def max_len(n: int) -> str:
    return f"Field exceeds maximum length of {n} characters"


def int_digits(n: int) -> str:
    return f"Field exceeds maximum of {n} integer digits"


def dec_places(n: int) -> str:
    return f"Field exceeds maximum of {n} decimal places"


def case_table(prefix: str) -> list[tuple[Any, list[dict[str, str]] | None]]:
    """(item, errors) pairs; errors None means the item must be created."""
    n = 0

    def code() -> str:
        nonlocal n
        n += 1
        return f"{prefix}-{n:03d}"

    def ok(**fields: Any) -> dict[str, Any]:
        return {"code": code(), "name": "Valid Name", **fields}

    return [
        (ok(), None),
        ({"code": code()}, [err("name", REQUIRED)]),
        ({"code": code(), "name": None}, [err("name", REQUIRED)]),
        ({"code": code(), "name": ""}, [err("name", REQUIRED)]),
        ({"name": "no code"}, [err("code", REQUIRED)]),
        ({"code": None, "name": "null code"}, [err("code", REQUIRED)]),
        ({"code": "", "name": "empty code"}, [err("code", REQUIRED)]),
        ({}, [err("code", REQUIRED), err("name", REQUIRED)]),
        (ok(phone=3001234567), [err("phone", STRING)]),
        ({"code": 12345, "name": "numeric code"}, [err("code", STRING)]),
        (ok(city=True), [err("city", STRING)]),
        (ok(email=["a@b.c"]), [err("email", STRING)]),
        (ok(contact={"first": "Ana"}), [err("contact", STRING)]),
        (ok(quota=True), [err("quota", DEC_TYPE)]),
        (ok(quota={"value": 1}), [err("quota", DEC_TYPE)]),
        (ok(discount=[1, 2]), [err("discount", DEC_TYPE)]),
        (ok(quota="abc"), [err("quota", DEC_FORMAT)]),
        (ok(quota="1,5"), [err("quota", DEC_FORMAT)]),
        (ok(withholding="1.2.3"), [err("withholding", DEC_FORMAT)]),
        (ok(quota="NaN"), [err("quota", DEC_NUMBER)]),
        (ok(real_quota="Infinity"), [err("real_quota", DEC_NUMBER)]),
        ({"code": "A" * 19, "name": "long code"}, [err("code", max_len(18))]),
        (ok(name="N" * 151), [err("name", max_len(150))]),
        (ok(operation_center="X" * 11), [err("operation_center", max_len(10))]),
        (ok(observations="o" * 501), [err("observations", max_len(500))]),
        (ok(quota="12345678901234567"), [err("quota", int_digits(16))]),
        (ok(quota=12345678901234567), [err("quota", int_digits(16))]),
        (ok(discount=123456789.5), [err("discount", int_digits(8))]),
        (ok(term=1000), [err("term", int_digits(3))]),
        (ok(quota=1.234), [err("quota", dec_places(2))]),
        (ok(quota="0.001"), [err("quota", dec_places(2))]),
        (ok(term=30.5), [err("term", dec_places(0))]),
        # Rounding these to the scale would carry into a digit the column does not have.
        (ok(term=999.5), [err("term", dec_places(0))]),
        (ok(quota="9999999999999999.995"), [err("quota", dec_places(2))]),
        (ok(discount=-99999999.999), [err("discount", dec_places(2))]),
        (ok(block_sales="X"), [err("block_sales", YN)]),
        (ok(iva_exempt="Yes"), [err("iva_exempt", YN)]),
        (ok(state="y"), [err("state", YN)]),
        (ok(foo=1), [err("foo", "Unknown field")]),
        (ok(Code="x"), [err("Code", "Unknown field")]),
        (5, [err(None, "Item must be an object")]),
        ("CLI-001", [err(None, "Item must be an object")]),
        ([{"code": "x"}], [err(None, "Item must be an object")]),
        (None, [err(None, "Item must be an object")]),
        # Boundaries that are valid.
        ({"code": "B" * 18, "name": "max code"}, None),
        (ok(name="é" * 150), None),
        (ok(quota="9999999999999999.99", term=999, discount="99999999.99"), None),
        (ok(quota=10.25, term="30", discount="1.5"), None),
        (ok(block_sales="Y", iva_exempt="N", state="Y"), None),
    ]


def expected_results(cases: list[tuple[Any, list[dict[str, str]] | None]]) -> list[dict[str, Any]]:
    out = []
    for i, (item, errors) in enumerate(cases):
        out.append(created(i, item["code"]) if errors is None else failed(i, *errors))
    return out


def test_every_message_of_the_contract(tenant: Tenant) -> None:
    cases = case_table(unique_code("V"))
    body = run_batch(tenant.client, [item for item, _ in cases])
    expected = expected_results(cases)
    results = strip_ids(body["results"])
    mismatches = [
        {"sent": cases[i][0], "got": results[i], "expected": expected[i]}
        for i in range(min(len(results), len(expected)))
        if results[i] != expected[i]
    ]
    assert mismatches == []
    assert len(results) == len(cases)
    n_created = sum(1 for _, e in cases if e is None)
    assert (body["total"], body["processed"], body["created"], body["failed"]) == (
        len(cases),
        len(cases),
        n_created,
        len(cases) - n_created,
    )
    assert body["status"] == "COMPLETED"


def test_errors_follow_the_field_table_then_unknown_keys_in_input_order(tenant: Tenant) -> None:
    item = {
        "zeta": 1,
        "state": "maybe",
        "term": 30.5,
        "quota": "abc",
        "phone": 3001234567,
        "alpha": True,
        "code": "C" * 19,
        "block_sales": "X",
        "discount": True,
        "email": "e" * 151,
    }
    body = run_batch(tenant.client, [item])
    assert body["results"] == [
        failed(
            0,
            err("code", max_len(18)),
            err("name", REQUIRED),
            err("phone", STRING),
            err("quota", DEC_FORMAT),
            err("term", dec_places(0)),
            err("email", max_len(150)),
            err("discount", DEC_TYPE),
            err("block_sales", YN),
            err("state", YN),
            err("zeta", "Unknown field"),
            err("alpha", "Unknown field"),
        )
    ]


def test_every_string_field_reports_its_own_maximum_length(tenant: Tenant) -> None:
    prefix = unique_code("L")
    items: list[dict[str, Any]] = []
    expected = []
    for i, (name, _kind, size) in enumerate(f for f in FIELDS if f[1] == "str" and f[0] != "code"):
        items.append({"code": f"{prefix}-{i:02d}", "name": "n", name: "x" * (size + 1)})
        expected.append(failed(i, err(name, max_len(size))))
    body = run_batch(tenant.client, items)
    assert body["results"] == expected
    assert "code" in FIELD_NAMES


def test_duplicate_code_in_batch_points_at_the_first_occurrence(tenant: Tenant) -> None:
    a, b = unique_code("D"), unique_code("D")
    items = [
        {"code": a, "name": "first a"},
        {"code": b, "name": "first b"},
        {"code": a, "name": "second a"},
        {"code": b, "name": "second b"},
        {"code": a, "name": "third a"},
    ]
    body = run_batch(tenant.client, items)
    dup = "Duplicate code in batch (first at index {})"
    assert strip_ids(body["results"]) == [
        created(0, a),
        created(1, b),
        failed(2, err("code", dup.format(0))),
        failed(3, err("code", dup.format(1))),
        failed(4, err("code", dup.format(0))),
    ]
    customer = tenant.client.get(f"/v1/customers/{a}")
    assert customer.status_code == 200
    assert customer.json()["name"] == "first a"


def test_code_already_exists_for_the_tenant_only(make_tenant: Callable[[], Tenant], workers: object) -> None:
    first, other = make_tenant(), make_tenant()
    code = unique_code("E")
    assert run_batch(first.client, [{"code": code, "name": "one"}])["created"] == 1
    again = run_batch(first.client, [{"code": code, "name": "two"}, {"code": unique_code(), "name": "x"}])
    assert again["results"][0] == failed(0, err("code", "Code already exists"))
    assert again["results"][1]["status"] == "CREATED"
    assert first.client.get(f"/v1/customers/{code}").json()["name"] == "one"
    # Codes are unique per tenant: another tenant may use the same code.
    theirs = run_batch(other.client, [{"code": code, "name": "theirs"}])
    assert strip_ids(theirs["results"]) == [created(0, code)]


def test_large_decimal_sent_as_json_number_is_stored_exactly(tenant: Tenant) -> None:
    code = unique_code("N")
    raw = (
        f'[{{"code": "{code}", "name": "big", "quota": 9999999999999999.99,'
        f' "real_quota": 1234567890123456.01, "discount": 0.1, "term": 999, "withholding": 0.30}}]'
    )
    body = wait_for_batch(tenant.client, submit(tenant.client, raw=raw))
    assert strip_ids(body["results"]) == [created(0, code)]
    r = tenant.client.get(f"/v1/customers/{code}")
    assert r.status_code == 200
    c = r.json()
    assert c["quota"] == "9999999999999999.99"
    assert c["real_quota"] == "1234567890123456.01"
    assert c["discount"] == "0.10"
    assert c["term"] == "999"
    assert c["withholding"] == "0.30"
    assert c["contact"] is None
    assert c["commercial_discount"] is None


def test_stored_customer_has_every_field(tenant: Tenant) -> None:
    from tests.helpers import REFERENCE_STORED, reference_example

    code = unique_code("R")
    body = run_batch(tenant.client, raw=reference_example(code))
    assert strip_ids(body["results"]) == [created(0, code)]
    r = tenant.client.get(f"/v1/customers/{code}")
    assert r.status_code == 200
    customer = r.json()
    assert {k: customer.get(k, "<absent>") for k in FIELD_NAMES} == {**REFERENCE_STORED, "code": code}


def test_text_no_database_can_store_is_an_item_error_or_a_400(tenant: Tenant) -> None:
    good = unique_code("U")
    raw = f'[{{"code": "{good}", "name": "fine"}}, {{"code": "NUL-1", "name": "bad \\u0000 name"}}]'
    body = wait_for_batch(tenant.client, submit(tenant.client, raw=raw))
    assert body["status"] == "COMPLETED"
    assert strip_ids(body["results"][:1]) == [created(0, good)]
    assert body["results"][1]["status"] == "FAILED"
    assert [e["field"] for e in body["results"][1]["errors"]] == ["name"]

    raw = '[{"code": "SUR-1", "name": "lone \\ud800 surrogate"}]'
    r = post_batch(tenant.client, raw=raw)
    if r.status_code == 400:
        assert r.json() == {"statusCode": 400, "errors": [{"message": "Invalid JSON in request body"}]}
    else:
        assert r.status_code == 202, r.text
        done = wait_for_batch(tenant.client, r.json()["batchId"])
        assert done["results"][0]["status"] == "FAILED"


def test_text_with_escapes_is_stored_as_sent(tenant: Tenant) -> None:
    """Backslashes, tabs, line breaks and a literal `\\N` reach the database's text format of COPY; each
    must come back exactly as sent, whether the item is read by the fast path or by the model, in a code
    and in an unknown key's name too."""
    tricky = ["back\\slash", "tab\there", "line\nbreak", "carriage\rreturn", "\\N", "\\", "é \u00e9 \\t"]
    prefix = unique_code("E")
    items: list[dict[str, Any]] = [
        {"code": f"{prefix}\t{n}", "name": text, "contact": text, "observations": f"{text}|{text}"}
        for n, text in enumerate(tricky)
    ]
    # An error forces the model's read path, with the same values.
    items += [
        {"code": f"{prefix}\\{n}", "name": text, "contact": text, "term": 1000}
        for n, text in enumerate(tricky)
    ]
    items.append({"code": f"{prefix}-x", "name": "k", "weird\tkey\\": 1})
    # Sent with every non-ASCII character escaped too (json.dumps's default), as many encoders do.
    body = wait_for_batch(tenant.client, submit(tenant.client, raw=json.dumps(items)))
    n = len(tricky)
    assert strip_ids(body["results"][:n]) == [created(i, f"{prefix}\t{i}") for i in range(n)]
    assert body["results"][n : 2 * n] == [
        failed(n + i, err("term", "Field exceeds maximum of 3 integer digits")) for i in range(n)
    ]
    assert body["results"][-1] == failed(2 * n, err("weird\tkey\\", "Unknown field"))
    for i, text in enumerate(tricky):
        code = items[i]["code"]
        r = tenant.client.get(f"/v1/customers/{quote(code, safe='')}")
        assert r.status_code == 200, r.text
        stored = r.json()
        assert (stored["code"], stored["name"], stored["contact"], stored["observations"]) == (
            code,
            text,
            text,
            f"{text}|{text}",
        )
    # The same codes again, one of them plain: each one is found taken, escaped or not.
    again = [*items[:n], {"code": f"{prefix}-x", "name": "k"}]
    body = wait_for_batch(tenant.client, submit(tenant.client, raw=json.dumps(again)))
    assert body["results"] == [failed(i, err("code", "Code already exists")) for i in range(n)] + [
        created(n, f"{prefix}-x") | {"customerId": body["results"][n]["customerId"]}
    ]


def test_exponents_no_decimal_holds_fail_their_item_alone(tenant: Tenant) -> None:
    """JSON allows an exponent of any length; Python's Decimal holds them up to about 10**18. A number past
    that is an error of its item, or zero, and the other items of its chunk are created all the same."""
    codes = [unique_code("X") for _ in range(5)]
    raw = (
        f'[{{"code": "{codes[0]}", "name": "before"}},'
        f' {{"code": "{codes[1]}", "name": "huge", "quota": 1e99999999999999999999}},'
        f' {{"code": "{codes[2]}", "name": "tiny", "term": -1.5E-99999999999999999999}},'
        f' {{"code": "{codes[3]}", "name": "zero", "discount": -0.0e+99999999999999999999}},'
        f' {{"code": "{codes[4]}", "name": "after"}}]'
    )
    body = wait_for_batch(tenant.client, submit(tenant.client, raw=raw))
    assert body["status"] == "COMPLETED"
    assert strip_ids(body["results"]) == [
        created(0, codes[0]),
        failed(1, err("quota", int_digits(16))),
        failed(2, err("term", dec_places(0))),
        created(3, codes[3]),
        created(4, codes[4]),
    ]
    r = tenant.client.get(f"/v1/customers/{codes[3]}")
    assert r.status_code == 200
    assert r.json()["discount"] == "0.00"
