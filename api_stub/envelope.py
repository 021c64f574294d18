"""The envelope checks of ``batch-create``: everything the receiver decides before storing a batch.

Items themselves are not looked at here; the workers validate them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jiter
import msgspec
from fastapi import Request

from api_stub.errors import ApiError
from worker.contracts.base import ARRAY_ELEMENTS

JSON_MEDIA_TYPE = "application/json"
# A customer is one object of some 30 scalar fields. Allowing 100 JSON values per item leaves room for
# unknown keys, yet keeps the parsed form of any body small: 60 MiB of `[]` would otherwise become 20
# million Python lists (about 2 GB) before a single item is looked at.
VALUES_PER_ITEM = 100
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def check_content_type(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        raise ApiError(415, "Content-Type: application/json is required")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = ApiError(413, "Request body too large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


@dataclass(frozen=True)
class Items:
    """The array's elements exactly as the client wrote them, and the uniqueness key of each (``None`` for
    an element without a key the key field could accept)."""

    elements: list[msgspec.Raw]
    keys: list[str | None]


def parse_items(body: bytes, max_items: int, key_of: Callable[[Any], str | None]) -> Items:
    """The array's elements, each kept byte for byte as sent, so numbers keep their exact text.

    The body must be I-JSON (RFC 7493): valid UTF-8, no NaN or Infinity (not JSON at all), and no object
    with the same key twice, since which of two values a client meant cannot be known. Nesting deeper than
    about 200 levels and integers of more than about 4,300 digits are refused too: no customer field needs
    them, and they would only cost memory and time.

    The array is first split into its elements without building them (msgspec checks each one's syntax as
    it skips it). Each element is then parsed on its own, for what the split does not check and for its
    key, and dropped before the next: a 10,000-item body never becomes one tree of 300,000 Python objects,
    which would cost its memory and, through the garbage collector, several times its parse time.
    """
    if not body.strip():
        raise ApiError(422, "Request body cannot be empty")
    max_values = max_items * VALUES_PER_ITEM
    if _more_values_than(body, max_values):
        raise ApiError(413, f"Request body must not hold more than {max_values} JSON values")
    invalid = ApiError(400, "Invalid JSON in request body")
    try:
        elements = ARRAY_ELEMENTS.decode(body)
    except msgspec.ValidationError:
        # Not an array, and maybe not JSON at all: the split stops at the first byte, a full parse tells.
        _parse(body)
        raise ApiError(422, "Request body must be a JSON array") from None
    except (msgspec.DecodeError, RecursionError):
        raise invalid from None
    if not elements:
        raise ApiError(422, "Array must contain at least 1 item")
    if len(elements) > max_items:
        raise ApiError(422, f"Array must contain at most {max_items} items")
    return Items(elements, [key_of(_parse_element(bytes(element))) for element in elements])


def _parse_element(element: bytes) -> Any:
    """One element, parsed; a key repeated within any of its objects is refused like invalid JSON.

    Looking for repeated keys while parsing doubles the cost of the parse. But every ':' outside a string
    ends a key, so an object whose text holds no more ':' than it has keys after parsing has no nested
    object and lost no key to a repeat. Only other elements (nested objects, ':' inside strings, repeated
    keys, no object at all) are parsed again with the check.
    """
    value = _parse(element, catch_duplicate_keys=False)
    if type(value) is not dict or element.count(b":") != len(value):
        _parse(element, catch_duplicate_keys=True)
    return value


def _parse(document: bytes, *, catch_duplicate_keys: bool = True) -> Any:
    try:
        # Plain floats: the receiver reads no number (the worker parses the stored text losslessly), and a
        # float is cheaper to build than a lossless one; both modes refuse exactly the same documents.
        return jiter.from_json(
            document,
            float_mode="float",
            catch_duplicate_keys=catch_duplicate_keys,
            allow_inf_nan=False,
            cache_mode="all",
        )
    except ValueError:
        raise ApiError(400, "Invalid JSON in request body") from None


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
