"""The envelope checks of ``batch-create``: everything the receiver decides before storing a batch.

Items themselves are not looked at here; the workers validate them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import jiter
import msgspec
from fastapi import Request
from msgspec import UNSET, UnsetType

from api_stub.errors import ApiError
from worker.contracts.base import ARRAY_ELEMENTS, Contract

JSON_MEDIA_TYPE = "application/json"
# A customer is one object of some 30 scalar fields. Allowing 100 JSON values per item leaves room for
# unknown keys, yet keeps the parsed form of any body small: 60 MiB of `[]` would otherwise become 20
# million Python lists (about 2 GB) before a single item is looked at.
VALUES_PER_ITEM = 100
# jiter refuses documents nested deeper than this, and integers longer than Python's 4,300-digit limit for
# converting a string: an element at most this long cannot hold one.
MAX_DEPTH = 200
MAX_DIGITS = 4300
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# Any JSON document, its syntax checked without building it.
_SKIP = msgspec.json.Decoder(msgspec.Raw)


def check_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        raise ApiError(415, "Content-Type: application/json is required")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = _too_large()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    # The parts are joined once at the end: a bytearray grown part by part is copied again each time it
    # outgrows its block, and copied once more into bytes.
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        parts.append(part)
        size += len(part)
        if size > limit:
            raise too_large
    return b"".join(parts)


@dataclass(frozen=True)
class Items:
    """The array's elements exactly as the client wrote them, and the uniqueness key of each (``None`` for
    an element without a key the key field could accept)."""

    elements: list[msgspec.Raw]
    keys: list[str | None]


def parse_items(body: bytes, max_items: int, contract: Contract) -> Items:
    """The array's elements, each kept byte for byte as sent, so numbers keep their exact text.

    The body must be JSON in valid UTF-8, without NaN or Infinity (not JSON at all). Nesting deeper than
    200 levels and integers of more than about 4,300 digits are refused too: no customer field needs
    them, and they would only cost memory and time. A key given twice within an item is not refused
    here: the worker fails that item, and its batch's other items stand.

    Neither the body nor an element is built as Python objects: msgspec splits the array into the texts
    of its elements, checking their syntax as it skips them, then reads each element's key and skips the
    rest. Only an element that might be too deep or hold too long a number is parsed in full, to refuse
    it. A 10,000-item body costs about half of what parsing each element did, and never becomes one
    tree of 300,000 Python objects.
    """
    # isspace() stops at the first byte that is not whitespace; strip() would copy the whole body first.
    if not body or body.isspace():
        raise ApiError(422, "Request body cannot be empty")
    invalid = _invalid_json()
    try:
        # msgspec skips strings without checking their UTF-8.
        body.decode()
    except UnicodeDecodeError:
        raise invalid from None
    max_values = max_items * VALUES_PER_ITEM
    # The split builds one object per element, and every element but the first follows a ','.
    few_commas = body.count(b",") < max_values
    if not few_commas and _more_values_than(body, max_values):
        raise _too_many_values(body, max_items)
    try:
        elements = ARRAY_ELEMENTS.decode(body)
    except msgspec.ValidationError:
        raise _not_an_array(body) from None
    except (msgspec.DecodeError, RecursionError):
        raise invalid from None
    if b"\n" in body:
        # Chunks keep one element per line. The split has checked the JSON, and JSON allows no raw line
        # break inside a string: every one is whitespace between tokens, and a space means the same.
        body = body.replace(b"\n", b" ")
        elements = ARRAY_ELEMENTS.decode(body)
    if not elements:
        raise ApiError(422, "Array must contain at least 1 item")
    if len(elements) > max_items:
        raise ApiError(422, f"Array must contain at most {max_items} items")
    keys = contract.keys_of(body)
    if keys is None:
        # Some element is not an object, or its key not a plain value: each element is parsed on its own,
        # which also makes the checks below, and builds every value the body holds (counted above already
        # unless the commas were few).
        if few_commas and _more_values_than(body, max_values):
            raise _too_large()
        return Items(elements, [contract.key_of(_parse(bytes(element))) for element in elements])
    # Each element holds at least its own '{': only a body with 200 brackets more than that can hold an
    # element nested deeper than jiter's limit of 200. Counted only as far as that decides it.
    count = len(elements)
    deep = (
        _occurrences(body, b"{", count + MAX_DEPTH) + _occurrences(body, b"[", MAX_DEPTH + 1) - 1 - count
        >= MAX_DEPTH
    )
    for element in elements:
        if len(element) > MAX_DIGITS:
            _parse(bytes(element))
        elif deep:
            text = bytes(element)
            if text.count(b"{") + text.count(b"[") > MAX_DEPTH:
                _parse(text)
    return Items(elements, keys)


def _invalid_json() -> ApiError:
    return ApiError(400, "Invalid JSON in request body")


def _too_large() -> ApiError:
    # The contract's one message for a body over a limit, whether of its bytes or of the values it holds.
    return ApiError(413, "Request body too large")


def _not_an_array(body: bytes) -> ApiError:
    """The answer for a body that does not start as an array: msgspec stops at its first byte, and only
    checks the rest, skipping it unbuilt, when asked to."""
    try:
        _SKIP.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return _invalid_json()
    return ApiError(422, "Request body must be a JSON array")


def _too_many_values(body: bytes, max_items: int) -> ApiError:
    """The answer for a body of too many values to split: whatever the contract says first, found
    without building more than ``max_items`` + 1 elements."""
    try:
        elements = _elements_up_to(max_items).decode(body)
    except msgspec.ValidationError:
        return _not_an_array(body)
    except (msgspec.DecodeError, RecursionError):
        return _invalid_json()
    if getattr(elements, f"e{max_items}") is not UNSET:
        return ApiError(422, f"Array must contain at most {max_items} items")
    return _too_large()


@functools.lru_cache(maxsize=2)
def _elements_up_to(max_items: int) -> msgspec.json.Decoder[Any]:
    """Reads the first ``max_items`` + 1 elements of an array into a struct of as many fields; msgspec
    checks the syntax of any further element as it skips it, without building it."""
    fields = [(f"e{i}", msgspec.Raw | UnsetType, UNSET) for i in range(max_items + 1)]
    return msgspec.json.Decoder(msgspec.defstruct("Elements", fields, array_like=True))


def _parse(document: bytes) -> Any:
    try:
        # Plain floats: the receiver reads no number (the worker parses the stored text losslessly), and a
        # float is cheaper to build than a lossless one; both modes refuse exactly the same documents.
        return jiter.from_json(document, float_mode="float", allow_inf_nan=False, cache_mode="all")
    except ValueError:
        raise _invalid_json() from None


def _occurrences(text: bytes, byte: bytes, enough: int) -> int:
    """How often ``byte`` occurs in ``text``, counted up to ``enough``.

    For a byte as sparse as the brackets of a body of objects (one '{' in some 800 bytes): each find is a
    memchr, and the whole takes a third of what bytes.count does, which compares every byte.
    """
    found = 0
    at = text.find(byte)
    while at >= 0 and found < enough:
        found += 1
        at = text.find(byte, at + 1)
    return found


def _more_values_than(body: bytes, limit: int) -> bool:
    """Whether the body holds more than ``limit`` JSON values, decided without parsing it.

    Every value opens a container or follows a ',' or ':'. Counting those bytes is fast and can only
    overcount (strings may contain them too), so only a body that looks too big is counted again with
    its strings blanked out.
    """

    def structural(text: bytes) -> int:
        # One pass in C: the bytes that translate() deletes are the ones counted.
        return len(text) - len(text.translate(None, b",:[{")) + 1

    return structural(body) > limit and structural(_JSON_STRING.sub(b'""', body)) > limit
