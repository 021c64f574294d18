"""The customer contract's validator on its own: every message, decided from the exact input text."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import jiter
import pytest

from tests.helpers import read_item
from worker.contracts import CONTRACTS
from worker.contracts.customer import CUSTOMER


def errors_of(item: Any) -> list[dict[str, str]]:
    values, errors = CUSTOMER.validate(item)
    assert (values is None) == bool(errors)
    return errors


# The worker reads numbers as lossless floats (their exact text); callers may also pass Decimals. The
# validator must decide both the same way, so the value tests run with each.
NUMBER_MODES = pytest.mark.parametrize("number_mode", ["lossless-float", "decimal"])


def one(field: str, raw_json: str, number_mode: str) -> list[dict[str, str]]:
    """Errors of a valid item whose ``field`` holds the given JSON value, its numbers read as asked."""
    item = jiter.from_json(
        f'{{"code": "C1", "name": "N", "{field}": {raw_json}}}'.encode(),
        float_mode=number_mode,  # type: ignore[arg-type]
    )
    return errors_of(item)


def test_registry_holds_the_customer_contract() -> None:
    assert CONTRACTS["customers"] is CUSTOMER
    assert CUSTOMER.key == "code"
    assert len(CUSTOMER.fields) == 32


@pytest.mark.parametrize(
    ("field", "raw", "message"),
    [
        ("quota", "true", "Field must be of type decimal"),
        ("quota", "{}", "Field must be of type decimal"),
        ("quota", "[1]", "Field must be of type decimal"),
        ("quota", '"abc"', "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("quota", '"1,5"', "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("quota", '"1e5"', "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("quota", '""', "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("quota", '"12."', "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("quota", '".5"', "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("quota", '"-"', "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("quota", '" 1.5"', "Field must be a valid decimal (e.g., 1.5, 10.25)"),
        ("quota", '"1.234"', "Field exceeds maximum of 2 decimal places"),
        ("quota", '"12345678901234567"', "Field exceeds maximum of 16 integer digits"),
        ("term", '"30.5"', "Field exceeds maximum of 0 decimal places"),
        ("quota", '"NaN"', "Field must be a valid decimal number"),
        ("quota", '"-Infinity"', "Field must be a valid decimal number"),
        ("quota", "NaN", "Field must be a valid decimal number"),
        ("quota", "12345678901234567.5", "Field exceeds maximum of 16 integer digits"),
        ("quota", "1e17", "Field exceeds maximum of 16 integer digits"),
        ("quota", "1.234", "Field exceeds maximum of 2 decimal places"),
        ("quota", "0.001", "Field exceeds maximum of 2 decimal places"),
        ("quota", "1.2300000000000000000000000000001", "Field exceeds maximum of 2 decimal places"),
        ("quota", "99999999999999999", "Field exceeds maximum of 16 integer digits"),
        ("quota", "99999999999999999.0", "Field exceeds maximum of 16 integer digits"),
        ("quota", "-99999999999999999.0", "Field exceeds maximum of 16 integer digits"),
        ("term", "1000.0", "Field exceeds maximum of 3 integer digits"),
        ("term", "-1000", "Field exceeds maximum of 3 integer digits"),
        ("term", "30.5", "Field exceeds maximum of 0 decimal places"),
        ("term", "1000", "Field exceeds maximum of 3 integer digits"),
        ("discount", '"123456789.5"', "Field exceeds maximum of 8 integer digits"),
        ("phone", "3001234567", "Field must be a string"),
        ("city", "true", "Field must be a string"),
        ("nit", '"' + "9" * 21 + '"', "Field exceeds maximum length of 20 characters"),
        ("state", '"S"', "Value must be one of: Y, N"),
        ("block_sales", '"y"', "Value must be one of: Y, N"),
        ("iva_exempt", "1", "Value must be one of: Y, N"),
        ("email", '"a\\u0000b"', "Field must not contain NUL characters"),
        ("colour", '"red"', "Unknown field"),
    ],
)
@NUMBER_MODES
def test_each_message(field: str, raw: str, message: str, number_mode: str) -> None:
    assert one(field, raw, number_mode) == [{"field": field, "message": message}]


@pytest.mark.parametrize(
    ("raw", "stored"),
    [
        ("9999999999999999.99", Decimal("9999999999999999.99")),
        ('"9999999999999999.99"', Decimal("9999999999999999.99")),
        ('"-12.50"', Decimal("-12.50")),
        ('"007.50"', Decimal("7.5")),
        ('"+3"', Decimal("3")),
        ('"1.2300"', Decimal("1.23")),
        ('"-0"', Decimal("0")),
        ("10.250", Decimal("10.250")),
        ("1e5", Decimal("1e5")),
        ("0.00", Decimal("0")),
        ("-0.0", Decimal("0")),
        ("9999999999999999", Decimal("9999999999999999")),
        ("-9999999999999999.990", Decimal("-9999999999999999.99")),
        ("0.10000000000000000000000000000000", Decimal("0.1")),
        ("null", None),
    ],
)
@NUMBER_MODES
def test_decimals_keep_their_exact_value(raw: str, stored: Decimal | None, number_mode: str) -> None:
    item = jiter.from_json(
        f'{{"code": "C1", "name": "N", "quota": {raw}}}'.encode(),
        float_mode=number_mode,  # type: ignore[arg-type]
    )
    values, errors = CUSTOMER.validate(item)
    assert errors == []
    assert values is not None
    assert values["quota"] == stored


@pytest.mark.parametrize("missing", [{}, {"code": None}, {"code": ""}])
def test_code_is_required(missing: dict[str, Any]) -> None:
    item = {"code": "C1", "name": "N", **missing}
    if not missing:
        del item["code"]
    assert errors_of(item) == [{"field": "code", "message": "Field is required"}]


def test_errors_follow_the_field_table_then_unknown_keys_in_input_order() -> None:
    item = {"zeta": 1, "state": "X", "quota": "x", "alpha": 2, "name": None, "code": "C" * 19}
    assert errors_of(item) == [
        {"field": "code", "message": "Field exceeds maximum length of 18 characters"},
        {"field": "name", "message": "Field is required"},
        {"field": "quota", "message": "Field must be a valid decimal (e.g., 1.5, 10.25)"},
        {"field": "state", "message": "Value must be one of: Y, N"},
        {"field": "zeta", "message": "Unknown field"},
        {"field": "alpha", "message": "Unknown field"},
    ]


@pytest.mark.parametrize("item", [[], "x", 3, None, True])
def test_an_item_must_be_an_object(item: Any) -> None:
    assert errors_of(item) == [{"message": "Item must be an object"}]


def test_plainly_valid_items_take_the_fast_path_and_keep_their_exact_text() -> None:
    text = b'{"code": "C1", "name": "N", "quota": 50000000.10, "term": "30", "discount": null, "state": "Y"}'
    records = CUSTOMER.plain_records([text], escapes=b"\\" in text)
    assert records.positions == [0]
    values = records.values(0)
    stored = dict(zip(CUSTOMER.value_names, values, strict=True))
    assert (stored["code"], stored["quota"], stored["term"], stored["discount"]) == (
        "C1",
        "50000000.10",
        "30",
        None,
    )
    assert read_item(text) == (values, [])


@pytest.mark.parametrize(
    "fields",
    [
        '"quota": 1e5',
        '"quota": "007.50"',
        '"quota": "\\u0031"',
        '"quota": 1.234',
        '"quota": true',
        '"contact": "a\\u0000b"',
        '"contact": "a\\\\u0000b"',
        '"state": "X"',
        '"extra": 1',
        '"contact": "' + "x" * 151 + '"',
        '"phone": 3001234567',
    ],
)
def test_other_items_are_left_to_the_model(fields: str) -> None:
    text = f'{{"code": "C1", "name": "N", {fields}}}'.encode()
    assert CUSTOMER.plain_records([text], escapes=b"\\" in text).positions == []
    values, errors = CUSTOMER.validate(jiter.from_json(text, float_mode="lossless-float"))
    read_values, read_errors = read_item(text)
    assert read_errors == errors
    if values is None:
        assert read_values is None
    else:
        assert read_values == [
            None if v is None else str(v) if isinstance(v, Decimal) else v
            for v in (values[name] for name in CUSTOMER.value_names)
        ]


@pytest.mark.parametrize(
    ("number", "field", "message", "stored"),
    [
        ("1e1000000000000000000", "quota", "Field exceeds maximum of 16 integer digits", None),
        ("-1e99999999999999999999", "quota", "Field exceeds maximum of 16 integer digits", None),
        ("10E+999999999999999999", "term", "Field exceeds maximum of 3 integer digits", None),
        ("-506799.0e999999999999999999", "discount", "Field exceeds maximum of 8 integer digits", None),
        ("5E-99999999999999999999", "quota", "Field exceeds maximum of 2 decimal places", None),
        ("1E-1000000000000000019", "term", "Field exceeds maximum of 0 decimal places", None),
        ("0E+99999999999999999999", "quota", None, "0.00"),
        ("-0.000e-99999999999999999999", "term", None, "-0"),
    ],
)
def test_exponents_beyond_pythons_decimal(
    number: str, field: str, message: str | None, stored: str | None
) -> None:
    """Python's Decimal holds exponents up to about 10**18; past that a JSON number is still an error of its
    field, or zero, never an exception that would fail the item's whole chunk."""
    values, errors = read_item(f'{{"code": "C1", "name": "N", "{field}": {number}}}'.encode())
    if message is None:
        assert errors == []
        assert values is not None
        assert values[CUSTOMER.value_names.index(field)] == stored
    else:
        assert (values, errors) == (None, [{"field": field, "message": message}])
