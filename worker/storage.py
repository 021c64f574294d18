"""Set-wise writes of new records: the one place where PostgreSQL and SQLite differ.

PostgreSQL: one query finds the keys the tenant already has, and one COPY writes the new records straight
into their table. SQLite (embedded mode) has no COPY: a multi-row ``INSERT … ON CONFLICT DO NOTHING``
instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import datetime
from itertools import compress, repeat

import psycopg
from sqlalchemy import Connection
from sqlalchemy.dialects import sqlite

from worker.contracts import Contract
from worker.contracts.base import COPY_NULL, Records
from worker.db import is_postgresql


class KeyRace(Exception):
    """A concurrent transaction stored one of a chunk's new keys after the chunk looked them up: the chunk's
    transaction is rolled back and processed again, and then finds that key taken."""


def store_records(
    connection: Connection,
    contract: Contract,
    *,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    now: datetime,
    records: Records,
    escapes: bool,
) -> list[str | None]:
    """Insert the records whose key the tenant does not have yet; return, for each record in order, the id
    of the record made for it (a UUID's text), or None where the tenant already had its key.

    No two records share a key. ``escapes`` says whether the chunk's JSON text holds an escape (a
    backslash): without one, no value holds a character that needs escaping.
    """
    if not records:
        return []
    if is_postgresql(connection):
        return _copy_new_records(connection, contract, tenant_id, batch_id, records, escapes)
    ids = new_ids(len(records))
    rows = [
        {"id": uuid.UUID(new_id), "tenant_id": tenant_id, "batch_id": batch_id, "created_at": now}
        | dict(zip(contract.value_names, records.values(k), strict=True))
        for k, new_id in enumerate(ids)
    ]
    statement = (
        sqlite.insert(contract.table)
        .on_conflict_do_nothing(index_elements=["tenant_id", contract.key])
        .returning(contract.table.c.id)
    )
    inserted = {str(found) for (found,) in connection.execute(statement, rows)}
    return [new_id if new_id in inserted else None for new_id in ids]


# Which of a chunk's keys the tenant already has: one probe of the unique index per key, whatever the
# planner's statistics say (``key = ANY(…)`` can become a scan of all the tenant's records), and the probes
# bring in the index pages the COPY then writes to.
_TAKEN = (
    "SELECT k.key FROM unnest({keys}) AS k(key), "
    "LATERAL (SELECT FROM {table} AS t WHERE t.tenant_id = %s AND t.{key} = k.key LIMIT 1) AS found"
)
# The keys as one text, a line each: a fraction of what sending an array of them costs the client. A key
# only holds a line break in a chunk whose JSON holds an escape; those send the array.
_KEYS_BY_LINE = "string_to_array(%s, E'\\n')"
_KEYS_ARRAY = "CAST(%s AS text[])"
# The text format of COPY: a value is written as it is unless it holds one of these.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_new_records(
    connection: Connection,
    contract: Contract,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    records: Records,
    escapes: bool,
) -> list[str | None]:
    """Find which keys the tenant already has, then write the other records with ONE COPY into their table.

    COPY is the fastest way into a table that PostgreSQL has: rows are written many to a page and to a
    WAL record. Going through a staging table and ``INSERT … SELECT … ON CONFLICT`` instead cost the
    server twice the COPY's work per row, for the conflict check that one query over the chunk's keys does
    here before the COPY. A key that a concurrent chunk stores between that query and the COPY makes the
    COPY fail (it waits for that chunk's transaction first); ``KeyRace`` then has the chunk processed again.
    The records' ids are made here, so nothing needs to come back from the server.
    """
    table = contract.table.name
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor:
        keys = records.keys(contract.key_position)
        lookup = _TAKEN.format(keys=_KEYS_ARRAY if escapes else _KEYS_BY_LINE, key=contract.key, table=table)
        sent = keys if escapes else "\n".join(keys)
        taken = {found for (found,) in cursor.execute(lookup, (sent, tenant_id))}
        made = new_ids(len(records))
        ids: list[str | None] = list(made)
        texts, decimals = records.texts, records.decimals
        if taken:
            new = [key not in taken for key in keys]
            ids = [new_id if is_new else None for new_id, is_new in zip(made, new, strict=True)]
            made, keys = list(compress(made, new)), list(compress(keys, new))
            texts, decimals = list(compress(texts, new)), list(compress(decimals, new))
        if not made:
            return ids
        fields = [repeat(f"{tenant_id}\t{batch_id}"), made, copy_fields(texts, escape=escapes)]
        if contract.has_decimals:
            fields.append(decimals)
        # strict=False: the first field is the same text repeated.
        lines = list(map("\t".join, zip(*fields, strict=False)))
        # Key order: concurrent chunks of one tenant take the unique index's entries in the same order, so
        # one waits for the other instead of both deadlocking.
        order = sorted(range(len(lines)), key=keys.__getitem__)
        lines = list(map(lines.__getitem__, order))
        lines.append("")
        # created_at is left to the column's default: now(), the same for every record of the transaction.
        columns = ", ".join(["tenant_id", "batch_id", "id", *contract.value_names])
        try:
            with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                copy.write("\n".join(lines))
        except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected) as exc:
            raise KeyRace from exc
    return ids


def copy_fields(rows: Sequence[Sequence[str | None]], *, escape: bool) -> list[str]:
    """Each row of text values (None for null) as its fields in the text format of COPY, a tab between
    them; ``escape`` says whether a value may hold a character that format escapes (a backslash, tab, line
    feed or carriage return).

    Such a character can only come from a JSON escape, so a chunk whose text holds no backslash has none,
    and its rows are joined as they are.
    """
    if escape:
        return [
            "\t".join([COPY_NULL if value is None else value.translate(_COPY_ESCAPES) for value in row])
            for row in rows
        ]
    try:
        return list(map("\t".join, rows))  # type: ignore[arg-type]
    except TypeError:
        return [
            "\t".join([COPY_NULL if value is None else value for value in row])
            if None in row
            else "\t".join(row)  # type: ignore[arg-type]
            for row in rows
        ]


def new_ids(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as text, made from one read of the system's randomness:
    ``uuid.uuid4()`` reads it once per id and builds an object that only its text is needed of.

    The texts are laid out all at once, a column at a time: each of an id's 32 hex digits is copied into
    its place in every id by one strided slice, where formatting each id on its own cost four times as
    much.
    """
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT_RFC_4122)
    digits = raw.hex().encode()
    # Each id's text and a line break after it; the dashes are already in place.
    texts = bytearray(b"-" * (_ID_LINE * count))
    for digit, at in enumerate(_DIGIT_PLACES):
        texts[at::_ID_LINE] = digits[digit::32]
    texts[_ID_LINE - 1 :: _ID_LINE] = b"\n" * count
    ids = texts.decode().split("\n")
    # The empty text after the last line break.
    ids.pop()
    return ids


# Where each of the 32 hex digits of an id goes in its text, 8-4-4-4-12 digits with a dash between groups.
_DIGIT_PLACES = [*range(0, 8), *range(9, 13), *range(14, 18), *range(19, 23), *range(24, 36)]
_ID_LINE = 37
_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))
