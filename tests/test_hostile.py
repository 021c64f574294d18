"""Hostile input: a fuzzer driven by the service's own OpenAPI document, generated items for the validator
(in-process and end to end), bodies built to hurt (huge, deep, slow, malformed), and every way a request
can try to pass as another tenant. Whatever comes in, the answer is a clear 4xx or a per-item error in the
contract's format: never a 5xx, never a crashed process, never another tenant's data."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from tests.conftest import SECRET_KEY, Tenant
from tests.helpers import (
    UNAUTHORIZED,
    post_batch,
    read_item,
    run_batch,
    strip_ids,
    submit,
    unique_code,
    wait_for_batch,
)
from tests.report import figure
from tests.services import Server, Workers
from worker.contracts.base import Choice, Text
from worker.contracts.base import Decimal as DecimalField
from worker.contracts.customer import CUSTOMER

REPEATED = "Field appears more than once"
INVALID_JSON = {"statusCode": 400, "errors": [{"message": "Invalid JSON in request body"}]}
TOO_LARGE = {"statusCode": 413, "errors": [{"message": "Request body too large"}]}
MiB = 1024 * 1024


def assert_contract_shape(status: int, body: Any) -> None:
    """Every error answer is {"statusCode": <its status>, "errors": [{"message": …}, …], …}."""
    assert isinstance(body, dict), body
    assert body.get("statusCode") == status, body
    errors = body.get("errors")
    assert isinstance(errors, list), body
    assert errors, body
    assert all(isinstance(e, dict) and isinstance(e.get("message"), str) for e in errors), body


def log_size(server: Server) -> int:
    return server.process.log.stat().st_size


def assert_alive_without_tracebacks(server: Server, log_from: int) -> None:
    """The receiver process is still running, answers health, and logged no unexpected error since."""
    assert server.process.running, f"{server.process.name} exited"
    assert httpx.get(f"{server.base_url}/healthz", timeout=30).status_code == 200
    assert httpx.get(f"{server.base_url}/readyz", timeout=30).status_code == 200
    with server.process.log.open("rb") as log:
        log.seek(log_from)
        text = log.read().decode(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert "unexpected error" not in text, text[-3000:]


# --- schemathesis against the live receiver ---------------------------------------------------------


@pytest.fixture
def api_schema(server: Server, request: pytest.FixtureRequest) -> Any:
    # schemathesis 4.32's lazy loader reads `Node._nodeid`, which pytest 9 no longer has.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", timeout=30)


@dataclass
class CaseCounter:
    by_status: dict[int, int] = field(default_factory=dict)

    def add(self, status: int) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1

    @property
    def cases(self) -> int:
        return sum(self.by_status.values())


def ended_batches(tenant: Tenant, timeout: float = 120) -> list[dict[str, Any]]:
    """The tenant's batches once none is queued or running any more."""
    deadline = time.monotonic() + timeout
    while True:
        listed = tenant.client.get("/v1/customers/batches", params={"limit": 500}).json()
        assert listed["nextBefore"] is None
        if all(b["status"] in ("COMPLETED", "FAILED") for b in listed["batches"]):
            return list(listed["batches"])
        assert time.monotonic() < deadline, "the workers did not finish the fuzzer's batches"
        time.sleep(0.5)


@pytest.fixture
def fuzz_run(server: Server, tenant: Tenant, workers: Workers) -> Iterator[CaseCounter]:
    """Counts the cases the fuzzer ran; afterwards the receiver must still be up and quiet, and every
    batch the fuzzer got accepted must have been worked off by the workers."""
    counter = CaseCounter()
    start = log_size(server)
    worker_logs = {p.log: p.log.stat().st_size for p in workers.processes}
    yield counter
    batches = ended_batches(tenant)
    figure(
        "hostile",
        f"schemathesis: {counter.cases} cases by status {sorted(counter.by_status.items())}; "
        f"{len(batches)} batches accepted and worked off",
    )
    assert [b for b in batches if b["status"] != "COMPLETED" or b["processed"] != b["total"]] == []
    for path, offset in worker_logs.items():
        with path.open("rb") as log:
            log.seek(offset)
            assert b"Traceback" not in log.read(), f"{path.name} logged a traceback"
    assert counter.cases >= 100, f"only {counter.cases} cases ran"
    assert set(counter.by_status) & {200, 202}, "the fuzzer never got past authentication"
    assert_alive_without_tracebacks(server, start)


fuzzed = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.slow
@fuzzed.parametrize()
@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case: Any, tenant: Tenant, fuzz_run: CaseCounter) -> None:
    headers = {
        k: v
        for k, v in tenant.client.headers.items()
        if k.lower() in ("ocp-apim-subscription-key", "authorization")
    }
    response = case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=60)
    fuzz_run.add(response.status_code)
    if response.status_code >= 400:
        assert_contract_shape(response.status_code, response.json())


# --- generated items: the validator in-process and the whole pipeline over HTTP ----------------------

ABSENT = object()
CHARS = st.characters(codec="utf-8", exclude_characters="\x00")
TEXT = st.text(CHARS)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.text(CHARS, max_size=19),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(CHARS, max_size=7), inner, max_size=3)
    ),
    max_leaves=6,
)
NOT_A_STRING = st.one_of(
    st.integers(-(10**25), 10**25),
    st.booleans(),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# A value and the contract's message for it (None when the value is valid).
Outcome = tuple[Any, str | None]


@dataclass
class FieldCases:
    """How one field of the table can be given: valid values, and invalid ones with their message."""

    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Outcome]


def text_cases(spec: Text) -> FieldCases:
    n = spec.max_length
    invalid = [
        st.text(CHARS, min_size=n + 1, max_size=n + 40).map(
            lambda v: (v, f"Field exceeds maximum length of {n} characters")
        ),
        NOT_A_STRING.map(lambda v: (v, "Field must be a string")),
        st.tuples(st.text(CHARS, max_size=(n - 1) // 2), st.text(CHARS, max_size=(n - 1) // 2)).map(
            lambda ab: (ab[0] + "\x00" + ab[1], "Field must not contain NUL characters")
        ),
    ]
    valid = st.text(CHARS, min_size=1 if spec.required else 0, max_size=n)
    if spec.required:
        invalid.append(st.sampled_from([ABSENT, None, ""]).map(lambda v: (v, "Field is required")))
    else:
        valid = valid | st.sampled_from([ABSENT, None])
    return FieldCases(valid, st.one_of(invalid))


def plain(number: Decimal) -> str:
    return format(number, "f")


# Strings that are no plain decimal, among them Arabic-Indic digits (which Decimal() itself would read).
NOT_PLAIN_DECIMALS = ["", "1e5", "abc", " 1", "1.", ".5", "1,000", "0x10", "--1", "1_000", "\u0661\u0662"]


def decimal_cases(spec: DecimalField) -> FieldCases:
    p, s = spec.precision, spec.scale
    integer_digits = f"Field exceeds maximum of {p - s} integer digits"
    places = f"Field exceeds maximum of {s} decimal places"
    fitting = st.integers(-(10**p) + 1, 10**p - 1).map(lambda n: Decimal(n).scaleb(-s))
    as_number_or_text = st.sampled_from([lambda d: d, plain, lambda d: plain(d) + ("000" if s else "")])
    too_big = st.integers(10 ** (p - s), 10 ** (p - s + 30)).map(Decimal)
    largest_whole = 10 ** (p - s) - 1
    fraction = st.tuples(
        st.integers(0, largest_whole) | st.just(largest_whole),
        # The places the column has, all nines now and then: rounding those up carries into a digit the
        # column does not have (999.5 in decimal(3, 0)).
        st.sampled_from(["0" * s, "9" * s]) | st.text("0123456789", min_size=s, max_size=s),
        # Runs of zeros before the last digit: rounding to some precision would make them look exact.
        st.integers(1, 60).flatmap(
            lambda k: st.just("0" * k) | st.text("0123456789", min_size=k, max_size=k)
        ),
        st.integers(1, 9),
    ).map(lambda t: Decimal(f"{t[0]}.{t[1]}{t[2]}{t[3]}"))
    either_form = st.sampled_from([lambda d: d, plain])
    return FieldCases(
        st.sampled_from([ABSENT, None]) | st.tuples(fitting, as_number_or_text).map(lambda t: t[1](t[0])),
        st.one_of(
            st.tuples(too_big, either_form).map(lambda t: (t[1](t[0]), integer_digits)),
            st.tuples(fraction, either_form).map(lambda t: (t[1](t[0]), places)),
            # Exponents far beyond the decimal module's default context, as JSON numbers (their plain
            # form would be megabytes).
            st.sampled_from([Decimal("1E+9999999"), Decimal("-1E+999999")]).map(
                lambda d: (d, integer_digits)
            ),
            st.sampled_from([Decimal("1E-9999999"), Decimal("1." + "0" * 40 + "1")]).map(
                lambda d: (d, places)
            ),
            st.one_of(
                st.booleans(),
                st.lists(st.integers(), max_size=2),
                st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
            ).map(lambda v: (v, "Field must be of type decimal")),
            st.sampled_from(NOT_PLAIN_DECIMALS).map(
                lambda v: (v, "Field must be a valid decimal (e.g., 1.5, 10.25)")
            ),
            st.sampled_from(["NaN", "-inf", "Infinity", Decimal("NaN"), Decimal("-Infinity")]).map(
                lambda v: (v, "Field must be a valid decimal number")
            ),
        ),
    )


def choice_cases(spec: Choice) -> FieldCases:
    wrong = st.one_of(
        st.text(CHARS, max_size=3).filter(lambda v: v not in spec.values),
        st.integers(),
        st.booleans(),
        st.lists(st.none(), max_size=1),
    )
    return FieldCases(
        st.sampled_from([ABSENT, None, *spec.values]),
        wrong.map(lambda v: (v, "Value must be one of: " + ", ".join(spec.values))),
    )


def field_cases(spec: Text | DecimalField | Choice) -> FieldCases:
    if isinstance(spec, Text):
        return text_cases(spec)
    if isinstance(spec, DecimalField):
        return decimal_cases(spec)
    return choice_cases(spec)


@dataclass
class GeneratedItem:
    item: Any
    errors: list[dict[str, str]]


@st.composite
def generated_items(draw: st.DrawFn) -> GeneratedItem:
    """An item whose expected errors follow from how it was built, not from the validator's code."""
    fields: dict[str, Any] = {}
    errors = []
    # A few fields are given wrong, the others right, so that whole items are valid now and then too.
    faulty = draw(st.sets(st.sampled_from(CUSTOMER.field_names), max_size=3))
    for spec in CUSTOMER.fields:
        cases = field_cases(spec)
        value, message = draw(cases.invalid) if spec.name in faulty else (draw(cases.valid), None)
        if value is not ABSENT:
            fields[spec.name] = value
        if message is not None:
            errors.append({"field": spec.name, "message": message})
    unknown = draw(
        st.lists(
            st.text(CHARS, max_size=11).filter(lambda k: k not in CUSTOMER.field_names),
            unique=True,
            max_size=2,
        )
    )
    keys = draw(st.permutations([*fields, *unknown]))
    item = {key: fields[key] if key in fields else draw(ANY_JSON) for key in keys}
    errors += [{"field": key, "message": "Unknown field"} for key in keys if key in unknown]
    return GeneratedItem(item, errors)


NOT_OBJECTS = ANY_JSON.filter(lambda v: not isinstance(v, dict)).map(
    lambda v: GeneratedItem(v, [{"message": "Item must be an object"}])
)
ANY_ITEMS = st.one_of(generated_items(), NOT_OBJECTS)


VALIDATOR_EXAMPLES = 400
GENERATED_ITEMS = given(generated=ANY_ITEMS)
VALIDATOR_SETTINGS = settings(
    max_examples=VALIDATOR_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def examples(request: pytest.FixtureRequest) -> Iterator[list[int]]:
    """[examples run, items sent]; printed once the hypothesis test is over."""
    seen = [0, 0]
    yield seen
    figure("hostile", f"hypothesis {request.node.name}: {seen[0]} examples, {seen[1]} generated items")


@GENERATED_ITEMS
@VALIDATOR_SETTINGS
def test_validator_gives_the_contracts_errors_for_generated_items(
    generated: GeneratedItem, examples: list[int]
) -> None:
    examples[0] += 1
    examples[1] += 1
    values, errors = CUSTOMER.validate(generated.item)
    assert errors == generated.errors
    if errors:
        assert values is None
        return
    assert values is not None
    assert set(values) == set(CUSTOMER.field_names)
    for spec in CUSTOMER.fields:
        given_value = generated.item.get(spec.name)
        if isinstance(spec, DecimalField) and given_value is not None:
            assert values[spec.name] == Decimal(given_value)
        else:
            assert values[spec.name] == given_value


@GENERATED_ITEMS
@VALIDATOR_SETTINGS
def test_the_workers_fast_path_reads_generated_items_as_the_model_does(
    generated: GeneratedItem, examples: list[int]
) -> None:
    """What the worker stores for an item's JSON text (fast path or model) is what the model decides for
    the parsed item: the same errors, or the same values with decimals as exact text."""
    examples[0] += 1
    examples[1] += 1
    values, errors = read_item(as_json([generated.item])[1:-1])
    assert errors == generated.errors
    if errors:
        assert values is None
        return
    assert values is not None
    for spec, value in zip(CUSTOMER.value_order, values, strict=True):
        given_value = generated.item.get(spec.name)
        if isinstance(spec, DecimalField) and given_value is not None:
            assert isinstance(value, str)
            assert Decimal(value) == Decimal(given_value)
        else:
            assert value == given_value


@given(generated=generated_items(), again=st.data())
@VALIDATOR_SETTINGS
def test_a_field_given_twice_fails_its_item_whatever_the_values(
    generated: GeneratedItem, again: st.DataObject, examples: list[int]
) -> None:
    """A field of the table given a second time, with any value, fails its item with that message alone
    for the field, on the fast path and the model's alike; the item's other errors stand."""
    known = [key for key in generated.item if key in CUSTOMER.field_names]
    if not known:
        return
    examples[0] += 1
    examples[1] += 1
    key = again.draw(st.sampled_from(known))
    value = again.draw(st.one_of(st.just(generated.item[key]), ANY_JSON))
    text = as_json([generated.item])[1:-2] + b"," + as_json([{key: value}])[2:-1]
    values, errors = read_item(text)
    assert values is None
    table = CUSTOMER.field_names
    kept = [e for e in generated.errors if e["field"] != key]
    later = [
        i for i, e in enumerate(kept) if e["field"] not in table or table.index(e["field"]) > table.index(key)
    ]
    at = later[0] if later else len(kept)
    assert errors == [*kept[:at], {"field": key, "message": REPEATED}, *kept[at:]]


@given(generated=st.lists(ANY_ITEMS, min_size=2, max_size=30))
@VALIDATOR_SETTINGS
def test_a_chunk_read_at_once_gives_each_item_what_it_gets_alone(
    generated: list[GeneratedItem], examples: list[int]
) -> None:
    """A worker reads a chunk's items together, the valid ones apart from the others: whatever the mix,
    each item ends with the values or the errors that reading it alone gives."""
    examples[0] += 1
    examples[1] += len(generated)
    texts = [as_json([g.item])[1:-1] for g in generated]
    records, errors = CUSTOMER.read_chunk(texts, escapes=any(b"\\" in text for text in texts))
    assert sorted([*records.positions, *errors]) == list(range(len(texts)))
    together = {position: (records.values(k), []) for k, position in enumerate(records.positions)}
    together |= {position: (None, item_errors) for position, item_errors in errors.items()}
    assert [together[position] for position in range(len(texts))] == [read_item(text) for text in texts]
    assert [together[p][1] for p in range(len(texts))] == [g.errors for g in generated]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Decimal("1E+9999999"), "Field exceeds maximum of 16 integer digits"),
        (Decimal("-1E+17"), "Field exceeds maximum of 16 integer digits"),
        (Decimal("1E-9999999"), "Field exceeds maximum of 2 decimal places"),
        (Decimal("1." + "0" * 30 + "1"), "Field exceeds maximum of 2 decimal places"),
        (Decimal("1." + "0" * 4999 + "1"), "Field exceeds maximum of 2 decimal places"),
        (Decimal("9" * 4000), "Field exceeds maximum of 16 integer digits"),
        (Decimal("9999999999999999.995"), "Field exceeds maximum of 2 decimal places"),
        (Decimal("-9999999999999999.9951"), "Field exceeds maximum of 2 decimal places"),
        ("0." + "0" * 100 + "1", "Field exceeds maximum of 2 decimal places"),
        (Decimal("sNaN"), "Field must be a valid decimal number"),
        ("sNaN", "Field must be a valid decimal number"),
        # Arabic-Indic and full-width digits, which Decimal() would read as 12 and 12.5.
        ("\u0661\u0662", "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("\uff11\uff12.\uff15", "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        (Decimal("0E+9999999"), None),
        (Decimal("0E-9999999"), None),
        (Decimal("1." + "0" * 20000), None),
        (Decimal("9999999999999999.990"), None),
    ],
)
def test_decimals_beyond_any_context(value: Any, message: str | None) -> None:
    """Exponents and digit counts past the decimal module's default context neither raise nor round."""
    values, errors = CUSTOMER.validate({"code": "D", "name": "d", "quota": value})
    if message is None:
        assert errors == []
        assert values is not None
        assert values["quota"] == Decimal(value)
        # What is stored fits numeric(18, 2) as it is: no exponent or digits PostgreSQL would refuse.
        assert len(format(values["quota"], "f")) <= 20
    else:
        assert errors == [{"field": "quota", "message": message}]


def as_json(items: list[Any]) -> bytes:
    """JSON with every number (also ints past 64 bits and finite decimals) written as its exact text."""

    def exact(value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return orjson.Fragment(str(value))
        if isinstance(value, list):
            return [exact(v) for v in value]
        if isinstance(value, dict):
            return {k: exact(v) for k, v in value.items()}
        return value

    def decimal(d: Decimal) -> Any:
        # NaN and Infinity are no JSON numbers: they go as the strings a client could send instead.
        return orjson.Fragment(str(d)) if d.is_finite() else str(d)

    return orjson.dumps(exact(items), default=decimal)


def expected_results(generated: list[GeneratedItem]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, g in enumerate(generated):
        if g.errors:
            out.append({"index": i, "status": "FAILED", "errors": g.errors})
        else:
            out.append({"index": i, "status": "CREATED", "code": g.item["code"]})
    return out


def with_unique_codes(generated: list[GeneratedItem]) -> list[GeneratedItem]:
    """Valid codes made unique, so that only the generated faults decide each result."""
    prefix = uuid.uuid4().hex[:10]
    for i, g in enumerate(generated):
        if isinstance(g.item, dict) and not any(e.get("field") == "code" for e in g.errors):
            g.item["code"] = f"H{prefix}-{i}"
    return generated


@pytest.mark.slow
@given(batch=st.lists(ANY_ITEMS, min_size=5, max_size=60))
# No shrinking: each attempt is a batch through the workers, and the failing example is printed as is.
@settings(
    max_examples=15,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_generated_batches_end_to_end(
    batch: list[GeneratedItem], tenant: Tenant, examples: list[int]
) -> None:
    """Through the receiver and the session's workers: each item gets exactly its one expected result."""
    examples[0] += 1
    examples[1] += len(batch)
    generated = with_unique_codes(batch)
    r = post_batch(tenant.client, raw=as_json([g.item for g in generated]))
    assert r.status_code == 202, r.text[:500]
    body = wait_for_batch(tenant.client, r.json()["batchId"], timeout=60)
    assert body["status"] == "COMPLETED"
    assert body["total"] == body["processed"] == len(generated)
    assert strip_ids(body["results"]) == expected_results(generated)


# --- bodies built to hurt ------------------------------------------------------------------------------


def nested(depth: int, leaf: str = "0") -> str:
    return "[" * depth + leaf + "]" * depth


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'[{"code": "A", "name": "' + b"\xff\xfe" + b'"}]', id="invalid UTF-8 in a string"),
        pytest.param(b'[{"code": "A", "name": "\xc0\xaf"}]', id="overlong UTF-8"),
        pytest.param(b'[{"code": "A", "name": "\xed\xa0\x80"}]', id="UTF-8 encoded surrogate"),
        pytest.param(b'[{"code": "A", "name": "x\xf4\x90\x80\x80"}]', id="UTF-8 beyond U+10FFFF"),
        pytest.param(
            ('[{"code": "A", "name": ' + nested(250) + "}]").encode(), id="250 levels inside an item"
        ),
        pytest.param(
            ('[{"code": "A", "name": ' + '{"a": ' * 250 + "0" + "}" * 250 + "}]").encode(),
            id="250 levels of objects inside an item",
        ),
        pytest.param(b'[{"code": "A", "quota": -' + b"7" * 5000 + b"}]", id="5000-digit integer"),
        pytest.param(
            b'[{"code": "A", "quota": ' + b"1" * 5000 + b".5}]", id="5000 integer digits in a decimal"
        ),
        pytest.param(b'[{"code": "A", "quota": NaN}]', id="NaN is not JSON"),
        pytest.param(b'[{"code": "A", "term": -Infinity}]', id="Infinity is not JSON"),
    ],
)
def test_malformed_bodies_are_400(tenant: Tenant, raw: bytes) -> None:
    r = post_batch(tenant.client, raw=raw)
    assert r.status_code == 400, r.text[:300]
    assert r.json() == INVALID_JSON


def test_a_code_no_record_can_have_is_not_found(tenant: Tenant) -> None:
    """NUL cannot be stored, so a code holding it is a 404 like any unknown code, and the connection stays
    usable for the next request."""
    not_found = {"statusCode": 404, "errors": [{"message": "Customer not found"}]}
    for path in ("/v1/customers/%00", "/v1/customers/A%00B", "/v1/customers/" + "B" * 19):
        r = tenant.client.get(path)
        assert (r.status_code, r.json()) == (404, not_found), path
        assert tenant.client.get("/healthz").status_code == 200


def test_hostile_items_become_per_item_errors(server: Server, tenant: Tenant) -> None:
    """Each hostile value is accepted by the thin receiver and refused by the worker for its item alone."""
    start = log_size(server)
    good, twice = unique_code("OK"), unique_code("TWICE")
    items: list[tuple[str, list[tuple[str, str]] | None]] = [
        (
            f'{{"code": "{unique_code()}", "name": "{"n" * MiB}"}}',
            [("name", "Field exceeds maximum length of 150 characters")],
        ),
        (
            f'{{"code": "{"c" * MiB}", "name": "x"}}',
            [("code", "Field exceeds maximum length of 18 characters")],
        ),
        (f'{{"code": "{unique_code()}", "name": {nested(150)}}}', [("name", "Field must be a string")]),
        (
            f'{{"code": "{unique_code()}", "name": "x", "quota": 1.{"0" * 4999}1}}',
            [("quota", "Field exceeds maximum of 2 decimal places")],
        ),
        (
            f'{{"code": "{unique_code()}", "name": "x", "quota": 1.{"0" * 30}1}}',
            [("quota", "Field exceeds maximum of 2 decimal places")],
        ),
        (
            f'{{"code": "{unique_code()}", "name": "x", "quota": 1e9999999}}',
            [("quota", "Field exceeds maximum of 16 integer digits")],
        ),
        (
            f'{{"code": "{unique_code()}", "name": "x", "quota": 1e-9999999}}',
            [("quota", "Field exceeds maximum of 2 decimal places")],
        ),
        (
            f'{{"code": "{unique_code()}", "name": "x", "quota": {"9" * 4000}}}',
            [("quota", "Field exceeds maximum of 16 integer digits")],
        ),
        ('{"code": "NUL\\u0000CODE", "name": "x"}', [("code", "Field must not contain NUL characters")]),
        ('{"code": "NUL\\u0000CODE", "name": "again"}', [("code", "Field must not contain NUL characters")]),
        (
            f'{{"code": "{unique_code()}", "name": "x", "{"k" * 1000}": {nested(100)}}}',
            [("k" * 1000, "Unknown field")],
        ),
        (f'{{"code": "{good}", "name": "still fine", "quota": 1.{"0" * 5000}}}', None),
        # A key given twice: which value the client meant cannot be known (RFC 8259 leaves it open).
        (f'{{"code": "{unique_code()}", "name": "first", "name": "second"}}', [("name", REPEATED)]),
        # Every ':' but those in strings ends a key: the ones in "10:30" must not hide the repeated city.
        (
            f'{{"code": "{unique_code()}", "name": "at 10:30", "city": "A", "city": "B"}}',
            [("city", REPEATED)],
        ),
        (f'{{"code": "{unique_code()}", "name": "x", "name": "\\u003a"}}', [("name", REPEATED)]),
        (f'{{"code": "{unique_code()}", "name": "x", "zz": 1, "zz": 2}}', [("zz", "Unknown field")]),
        (
            f'{{"code": "{unique_code()}", "name": "x", "observations": {{"y": 1, "y": 2}}}}',
            [("observations", "Field must be a string")],
        ),
        # The last of two codes is the one the item holds, for the duplicates after it as well.
        (f'{{"code": "{unique_code()}", "name": "x", "code": "{twice}"}}', [("code", REPEATED)]),
    ]
    owner = len(items) - 1
    items.append(
        (
            f'{{"code": "{twice}", "name": "y"}}',
            [("code", f"Duplicate code in batch (first at index {owner})")],
        )
    )
    raw = "[" + ", ".join(item for item, _ in items) + "]"
    body = wait_for_batch(tenant.client, submit(tenant.client, raw=raw), timeout=90)
    expected = [
        {"index": i, "status": "CREATED", "code": good}
        if errors is None
        else {"index": i, "status": "FAILED", "errors": [{"field": f, "message": m} for f, m in errors]}
        for i, (_, errors) in enumerate(items)
    ]
    assert body["status"] == "COMPLETED"
    assert strip_ids(body["results"]) == expected
    stored = tenant.client.get(f"/v1/customers/{good}").json()
    assert stored["quota"] == "1.00"
    assert_alive_without_tracebacks(server, start)


# --- size limits and memory ------------------------------------------------------------------------------


def raw_head(base_url: str, tenant: Tenant, extra: str) -> tuple[socket.socket, bytes]:
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /v1/customers/batch-create HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Ocp-Apim-Subscription-Key: {tenant.key}\r\nAuthorization: Bearer {tenant.token}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()
    return sock, head


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of one HTTP/1.1 answer with a Content-Length."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"connection closed before an answer: {data!r}"
        data += part
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(rest) < length:
        part = sock.recv(65536)
        assert part, "connection closed mid-answer"
        rest += part
    return int(head.split(b" ", 2)[1]), json.loads(rest[:length])


LIMIT = 4096


def body_of_size(size: int) -> bytes:
    start = f'[{{"code": "{unique_code("LIM")}", "name": "at the limit"}}]'.encode()
    return start + b" " * (size - len(start))


def test_body_size_limit(extra_server: Callable[..., Server], tenant: Tenant) -> None:
    srv = extra_server("hostile-limit", CLIENTELA_MAX_BODY_BYTES=str(LIMIT))
    with httpx.Client(base_url=srv.base_url, headers=tenant.client.headers, timeout=60) as c:
        assert post_batch(c, raw=body_of_size(LIMIT)).status_code == 202
        r = post_batch(c, raw=body_of_size(LIMIT + 1))
        assert (r.status_code, r.json()) == (413, TOO_LARGE)

        def in_parts(body: bytes) -> Iterator[bytes]:
            yield from (body[i : i + 1000] for i in range(0, len(body), 1000))

        plain = {"Content-Type": "application/json"}
        r = c.post("/v1/customers/batch-create", content=in_parts(body_of_size(LIMIT)), headers=plain)
        assert r.status_code == 202, r.text
        r = c.post("/v1/customers/batch-create", content=in_parts(body_of_size(LIMIT + 1)), headers=plain)
        assert (r.status_code, r.json()) == (413, TOO_LARGE)

    # A declared length over the limit is refused at once: the client never sends a byte of its body.
    sock, head = raw_head(srv.base_url, tenant, "Content-Length: 1000000000\r\n")
    with sock:
        sock.sendall(head)
        assert read_response(sock) == (413, TOO_LARGE)

    # A chunked body without a declared length is refused while it is still being sent.
    sock, head = raw_head(srv.base_url, tenant, "Transfer-Encoding: chunked\r\n")
    sent = 0
    with sock:
        sock.sendall(head)
        chunk = b"400\r\n" + b" " * 1024 + b"\r\n"
        answered = False
        while sent < 8 * MiB and not answered:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1024
            answered = bool(select.select([sock], [], [], 0)[0])
        assert read_response(sock) == (413, TOO_LARGE)
    assert sent < 4 * MiB, f"the receiver kept reading {sent} bytes past a {LIMIT}-byte limit"
    assert httpx.get(f"{srv.base_url}/healthz", timeout=30).status_code == 200


def peak_rss_mib(server: Server) -> float:
    assert server.process.proc is not None
    status = Path(f"/proc/{server.process.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


# Measured about 430 MiB after the worst shape below (a 60 MiB body is held as bytes, parsed, written
# back as compact JSON and sent to PostgreSQL); more than twice that still catches a body whose parsed form
# grows out of proportion (millions of tiny values cost gigabytes).
PEAK_RSS_BOUND_MIB = 1024


@pytest.mark.slow
def test_largest_bodies_keep_the_receiver_memory_bounded(
    extra_server: Callable[..., Server], tenant: Tenant
) -> None:
    srv = extra_server("hostile-memory")
    before = peak_rss_mib(srv)
    code = unique_code("MEM")
    shapes = {
        "one 60 MiB string": f'[{{"code": "{code}-S", "name": "'.encode() + b"x" * (60 * MiB) + b'"}]',
        # Just under the 1,000,000 values a body may hold, each a decimal kept with its exact text.
        "999,000 decimals": f'[{{"code": "{code}-D", "name": "x", "observations": ['.encode()
        + b",".join([b"0." + b"1" * 58] * 999_000)
        + b"]}]",
    }
    peaks = {}
    with httpx.Client(base_url=srv.base_url, headers=tenant.client.headers, timeout=300) as c:
        batches = {}
        for label, raw in shapes.items():
            assert len(raw) < 64 * MiB
            r = post_batch(c, raw=raw)
            assert r.status_code == 202, (label, r.status_code, r.text[:300])
            batches[label] = r.json()["batchId"]
            peaks[label] = peak_rss_mib(srv)
        for label, message in [
            (
                "one 60 MiB string",
                {"field": "name", "message": "Field exceeds maximum length of 150 characters"},
            ),
            ("999,000 decimals", {"field": "observations", "message": "Field must be a string"}),
        ]:
            body = wait_for_batch(c, batches[label], timeout=180, params={"limit": 1})
            assert body["results"] == [{"index": 0, "status": "FAILED", "errors": [message]}], label
    figure(
        "hostile",
        f"receiver peak RSS (VmHWM) {before:.0f} MiB at start; "
        + "; ".join(f"{peaks[k]:.0f} MiB after {k}" for k in peaks)
        + f" (bound {PEAK_RSS_BOUND_MIB} MiB)",
    )
    assert max(peaks.values()) < PEAK_RSS_BOUND_MIB
    assert srv.process.running


def test_a_stalled_or_slow_client_does_not_block_others(server: Server, tenant: Tenant) -> None:
    body = f'[{{"code": "{unique_code("SLOW")}", "name": "slowly"}}]'.encode()
    stalled = []
    try:
        for n in range(10):
            sock, head = raw_head(server.base_url, tenant, f"Content-Length: {len(body)}\r\n")
            # Half of them stall inside the headers, half after a few bytes of the body.
            sock.sendall(head[: len(head) // 2] if n % 2 else head + body[:5])
            stalled.append(sock)

        slow_answer: list[tuple[int, dict[str, Any]]] = []
        sock, head = raw_head(server.base_url, tenant, f"Content-Length: {len(body)}\r\n")
        stalled.append(sock)

        def trickle() -> None:
            sock.sendall(head)
            for byte in body:
                sock.sendall(bytes([byte]))
                time.sleep(0.08)
            slow_answer.append(read_response(sock))

        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        with httpx.Client(base_url=server.base_url, timeout=10) as c:
            while sender.is_alive():
                assert c.get("/healthz").status_code == 200
                time.sleep(0.3)
        # Meanwhile an ordinary client is served as usual.
        assert run_batch(tenant.client, [{"code": unique_code("FAST"), "name": "fast"}])["created"] == 1
        sender.join(timeout=60)
        assert [status for status, _ in slow_answer] == [202], slow_answer
    finally:
        for s in stalled:
            s.close()


# --- authentication and tenant isolation (beyond tests/test_auth.py) -------------------------------------


def b64(data: dict[str, Any]) -> str:
    return jwt.utils.base64url_encode(json.dumps(data).encode()).decode()


def signed(claims: dict[str, Any], algorithm: str = "HS256") -> str:
    return jwt.encode(claims, SECRET_KEY, algorithm=algorithm)


def hostile_credentials(tenant: Tenant, other: Tenant) -> dict[str, dict[str, str]]:
    header, payload, signature = tenant.token.split(".")
    # The first character of the signature: the last one may only carry padding bits.
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    claims = jwt.decode(tenant.token, options={"verify_signature": False})
    later = int(time.time()) + 600

    def with_key(token: str) -> dict[str, str]:
        return {"Ocp-Apim-Subscription-Key": tenant.key, "Authorization": f"Bearer {token}"}

    return {
        "signature changed": with_key(f"{header}.{payload}.{flipped}"),
        "claims changed to another tenant, signature kept": with_key(
            f"{header}.{b64({**claims, 'sub': other.id})}.{signature}"
        ),
        "expiry pushed back, signature kept": with_key(
            f"{header}.{b64({**claims, 'exp': later * 10})}.{signature}"
        ),
        "signature dropped": with_key(f"{header}.{payload}."),
        "HS512 with the right secret": with_key(signed({"sub": tenant.id, "exp": later}, "HS512")),
        "no exp": with_key(signed({"sub": tenant.id})),
        "no sub": with_key(signed({"exp": later})),
        "sub of no tenant": with_key(signed({"sub": str(uuid.uuid4()), "exp": later})),
        "not yet valid (nbf)": with_key(signed({"sub": tenant.id, "exp": later, "nbf": later - 60})),
        "expired a second ago": with_key(signed({"sub": tenant.id, "exp": int(time.time()) - 1})),
        "token of another tenant with that tenant's key mixed in": {
            "Ocp-Apim-Subscription-Key": f"{tenant.key},{other.key}",
            "Authorization": f"Bearer {other.token}",
        },
        "two tokens": with_key(f"{tenant.token} {other.token}"),
        "empty Authorization": {"Ocp-Apim-Subscription-Key": tenant.key, "Authorization": ""},
        "token as the key": {
            "Ocp-Apim-Subscription-Key": tenant.token,
            "Authorization": f"Bearer {tenant.token}",
        },
    }


# The forged HS512 token is signed with the (HS256-sized) test secret on purpose.
@pytest.mark.filterwarnings("ignore:The HMAC key is")
def test_every_route_refuses_forged_and_tampered_tokens(
    server: Server, make_tenant: Callable[[], Tenant], workers: Workers
) -> None:
    tenant, other = make_tenant(), make_tenant()
    code = unique_code("F")
    batch = run_batch(tenant.client, [{"code": code, "name": "mine"}])
    routes = [
        ("POST", "/v1/customers/batch-create"),
        ("GET", f"/v1/customers/batches/{batch['batchId']}"),
        ("GET", f"/v1/customers/batches/{batch['batchId']}?status=CREATED&limit=1"),
        ("GET", "/v1/customers/batches?limit=1"),
        ("GET", f"/v1/customers/{code}"),
    ]
    refused = []
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        # The token in the query string instead of the header is no token at all.
        r = c.get(
            f"/v1/customers/{code}",
            params={"access_token": tenant.token},
            headers={"Ocp-Apim-Subscription-Key": tenant.key},
        )
        refused.append(("token in query", r.status_code, r.json()))
        for label, headers in hostile_credentials(tenant, other).items():
            for method, path in routes:
                content = b'[{"code": "Z", "name": "z"}]' if method == "POST" else None
                r = c.request(
                    method, path, headers={**headers, "Content-Type": "application/json"}, content=content
                )
                refused.append((f"{label}: {method} {path}", r.status_code, r.json()))
        r = c.post("/v1/token", headers={"Authorization": f"Bearer {tenant.token}"})
        refused.append(("token endpoint without a key", r.status_code, r.json()))
    assert [x for x in refused if x[1:] != (401, UNAUTHORIZED)] == []
    assert [b["batchId"] for b in tenant.client.get("/v1/customers/batches").json()["batches"]] == [
        batch["batchId"]
    ]
    # The genuine credentials still work.
    assert tenant.client.get(f"/v1/customers/{code}").status_code == 200


def test_no_tenant_sees_another_tenants_batches_or_customers(
    make_tenant: Callable[[], Tenant], workers: Workers
) -> None:
    alice, bob = make_tenant(), make_tenant()
    shared_code = unique_code("SAME")
    done_a = run_batch(alice.client, [{"code": shared_code, "name": "Alice's"}])
    done_b = run_batch(bob.client, [{"code": shared_code, "name": "Bob's"}])
    assert done_a["created"] == done_b["created"] == 1

    # The same code in both tenants: each reads only its own record.
    mine_a = alice.client.get(f"/v1/customers/{shared_code}").json()
    mine_b = bob.client.get(f"/v1/customers/{shared_code}").json()
    assert (mine_a["name"], mine_b["name"]) == ("Alice's", "Bob's")
    assert mine_a["customerId"] != mine_b["customerId"]
    assert mine_a["batchId"] == done_a["batchId"]

    # A batch of Alice's still running is as unknown to Bob as a finished one: 404, never 423 with progress.
    prefix = f"R{uuid.uuid4().hex[:8]}"
    running = submit(alice.client, [{"code": f"{prefix}-{i}", "name": "n"} for i in range(10_000)])
    not_found = {"statusCode": 404, "errors": [{"message": "Batch not found"}]}
    for batch_id in (running, done_a["batchId"]):
        for params in ({}, {"status": "CREATED"}, {"offset": 0, "limit": 1}):
            r = bob.client.get(f"/v1/customers/batches/{batch_id}", params=params)
            assert (r.status_code, r.json()) == (404, not_found)
    assert alice.client.get(f"/v1/customers/batches/{running}").status_code == 423, (
        "Alice's batch ended too soon"
    )

    # Paging anchored on Alice's batch shows Bob nothing of hers; Bob's own list holds only his batch.
    for params in ({"before": running}, {"before": done_a["batchId"], "limit": 500}, {"status": "RUNNING"}):
        r = bob.client.get("/v1/customers/batches", params=params)
        assert r.status_code == 200
        assert all(b["batchId"] == done_b["batchId"] for b in r.json()["batches"]), params
    listed = bob.client.get("/v1/customers/batches").json()
    assert [b["batchId"] for b in listed["batches"]] == [done_b["batchId"]]

    # Alice's customers of the running batch stay hers once created.
    done = wait_for_batch(alice.client, running, timeout=180, params={"limit": 1})
    assert done["created"] == 10_000
    r = bob.client.get(f"/v1/customers/{prefix}-9999")
    assert (r.status_code, r.json()) == (
        404,
        {"statusCode": 404, "errors": [{"message": "Customer not found"}]},
    )
    assert alice.client.get(f"/v1/customers/{prefix}-9999").status_code == 200
