"""Item results: one entry per item, kept with its chunk as one document.

A chunk's results are written once, by the transaction that ends the chunk, and only ever read for a whole
batch in index order (the status endpoint, the answer to ``Prefer: wait``). So a chunk keeps its items'
entries together: the JSON text of each, exactly as the status endpoint shows it, joined in index order and
compressed (an lz4 frame), in the row that the same transaction already updates to mark the chunk ended.
A 10,000-item batch's results are then ten values, not ten thousand rows with their index entries, and its
status answer is those values decompressed and joined.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lz4.frame
import orjson

from worker.models import ItemStatus

# An entry of a created item; its code and id are put in place as JSON strings.
_CREATED = '{"index":%d,"status":"' + ItemStatus.CREATED + '","code":%s,"customerId":"%s"}'


def created(indexes: Iterable[int], codes: Iterable[str], ids: Iterable[str], *, plain: bool) -> list[str]:
    """The entries of items whose records were created. ``plain`` says that no code holds anything JSON
    escapes (a quote, backslash or control character), as in a chunk whose JSON held no escape."""
    texts = map('"%s"'.__mod__, codes) if plain else map(bytes.decode, map(orjson.dumps, codes))
    return list(map(_CREATED.__mod__, zip(indexes, texts, ids, strict=True)))


def failed(index: int, errors: Sequence[dict[str, str]], status: str = ItemStatus.FAILED) -> str:
    """The entry of an item that was not created, with its errors."""
    return f'{{"index":{index},"status":"{status}","errors":{orjson.dumps(errors).decode()}}}'


def pack(entries: Iterable[str]) -> bytes:
    """A chunk's entries, in index order, as the value its row keeps."""
    packed: bytes = lz4.frame.compress(",".join(entries).encode())
    return packed


def document(packed: Iterable[bytes]) -> bytes:
    """The JSON array of the entries of the given chunks, in the order given."""
    return b"[" + b",".join(lz4.frame.decompress(value) for value in packed) + b"]"


def entries(packed: Iterable[bytes]) -> list[dict[str, Any]]:
    """The entries of the given chunks as objects."""
    found: list[dict[str, Any]] = orjson.loads(document(packed))
    return found
