"""Set-wise writes: the one place where PostgreSQL and SQLite differ.

PostgreSQL: one query finds the keys the tenant already has, one COPY writes the new records straight into
their table and another every item's result. SQLite (embedded mode) has no COPY: multi-row ``INSERT …
ON CONFLICT DO NOTHING`` statements instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy import Connection, insert
from sqlalchemy.dialects import sqlite

from worker.contracts import Contract
from worker.db import is_postgresql
from worker.models import ItemResult, ItemStatus


def store_outcomes(
    connection: Connection,
    contract: Contract,
    *,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    now: datetime,
    failed: Sequence[dict[str, Any]],
    valid: Sequence[tuple[int, list[Any]]],
    escapes: bool,
) -> int:
    """Store what a chunk's items came to; return how many records were created.

    ``failed`` are the result rows of the items that failed validation. ``valid`` are (index, values)
    pairs, the values of the contract's fields in table order as ``Contract.read`` returns them (decimals
    as their exact text): a record is inserted unless the tenant already has its key, and its result says
    which happened. ``escapes`` says whether the chunk's JSON text holds an escape (a backslash): without
    one, no value holds a character that would need escaping.
    """
    if is_postgresql(connection):
        return _copy_new_records(connection, contract, tenant_id, batch_id, now, failed, valid, escapes)
    write_results(connection, failed)
    if not valid:
        return 0
    names = contract.value_names
    rows = [
        {"id": uuid.uuid4(), "tenant_id": tenant_id, "batch_id": batch_id, "created_at": now}
        | dict(zip(names, values, strict=True))
        for _, values in valid
    ]
    statement = (
        sqlite.insert(contract.table)
        .on_conflict_do_nothing(index_elements=["tenant_id", contract.key])
        .returning(contract.table.c[contract.key], contract.table.c.id)
    )
    created = {key: new_id for key, new_id in connection.execute(statement, rows)}
    write_results(
        connection,
        [
            {
                "batch_id": batch_id,
                "idx": idx,
                "code": row[contract.key],
                "customer_id": created.get(row[contract.key]),
                "status": ItemStatus.CREATED if row[contract.key] in created else ItemStatus.FAILED,
                "errors": None if row[contract.key] in created else key_exists(contract),
            }
            for (idx, _), row in zip(valid, rows, strict=True)
        ],
    )
    return len(created)


def key_exists(contract: Contract) -> list[dict[str, str]]:
    """The result errors of a valid record whose key the tenant already has."""
    return [{"field": contract.key, "message": f"{contract.key.capitalize()} already exists"}]


class KeyRace(Exception):
    """A concurrent transaction stored one of a chunk's new keys after the chunk looked them up: the chunk's
    transaction is rolled back and processed again, and then finds that key taken."""


# Which of a chunk's keys the tenant already has: one probe of the unique index per key, whatever the
# planner's statistics say (``key = ANY(…)`` can become a scan of all the tenant's records), and the probes
# bring in the index pages the COPY then writes to.
_TAKEN = (
    "SELECT k.key FROM unnest(CAST(%s AS text[])) AS k(key), "
    "LATERAL (SELECT FROM {table} AS t WHERE t.tenant_id = %s AND t.{key} = k.key LIMIT 1) AS found"
)
# The text format of COPY: a value is written as it is unless it holds one of these, \N is null.
_NULL = "\\N"
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_new_records(
    connection: Connection,
    contract: Contract,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    now: datetime,
    failed: Sequence[dict[str, Any]],
    valid: Sequence[tuple[int, list[Any]]],
    escapes: bool,
) -> int:
    """Store the records whose key the tenant does not have yet with ONE COPY into their table, and every
    item's result with another; return how many records were created.

    COPY is the fastest way into a table that PostgreSQL has: rows are written many to a page and to a
    WAL record. Going through a staging table and ``INSERT … SELECT … ON CONFLICT`` instead cost the
    server twice the COPY's work per row, for the conflict check that one query over the chunk's keys does
    here before the COPY. A key that a concurrent chunk stores between that query and the COPY makes the
    COPY fail (it waits for that chunk's transaction first); ``KeyRace`` then has the chunk processed again.
    The records' ids are made here, so their results need nothing back from the server.
    """
    at = contract.key_position
    table = contract.table.name
    batch = str(batch_id)
    results: list[tuple[str, str, str, str | None, str | None, str | None]] = [
        (batch, str(row["idx"]), ItemStatus.FAILED, row["code"], None, orjson.dumps(row["errors"]).decode())
        for row in failed
    ]
    raw = connection.connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor:
        new: list[tuple[int, list[Any]]] = []
        if valid:
            keys = [values[at] for _, values in valid]
            lookup = _TAKEN.format(key=contract.key, table=table)
            taken = {found for (found,) in cursor.execute(lookup, (keys, tenant_id))}
            new = [pair for pair in valid if pair[1][at] not in taken] if taken else list(valid)
            if taken:
                exists = orjson.dumps(key_exists(contract)).decode()
                results += [
                    (batch, str(idx), ItemStatus.FAILED, values[at], None, exists)
                    for idx, values in valid
                    if values[at] in taken
                ]
        if new:
            # Key order: concurrent chunks of one tenant take the unique index's entries in the same order,
            # so one waits for the other instead of both deadlocking.
            new.sort(key=lambda pair: pair[1][at])
            ids = new_ids(len(new))
            lead = (str(tenant_id), batch, now.isoformat())
            columns = ", ".join(["tenant_id", "batch_id", "created_at", "id", *contract.value_names])
            try:
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    rows = [(*lead, new_id, *values) for new_id, (_, values) in zip(ids, new, strict=True)]
                    copy.write(copy_text(rows, escape=escapes))
            except (psycopg.errors.UniqueViolation, psycopg.errors.DeadlockDetected) as exc:
                raise KeyRace from exc
            results += [
                (batch, str(idx), ItemStatus.CREATED, values[at], new_id, None)
                for new_id, (idx, values) in zip(ids, new, strict=True)
            ]
        if results:
            columns = ", ".join(_RESULT_COLUMNS)
            with cursor.copy(f"COPY {ItemResult.__tablename__} ({columns}) FROM STDIN") as copy:
                copy.write(copy_text(results, escape=escapes))
    return len(new)


def copy_text(rows: Sequence[Sequence[str | None]], *, escape: bool) -> str:
    """Rows of text values (None for null) in the text format of COPY; ``escape`` says whether a value may
    hold a character that format escapes (a backslash, tab, line feed or carriage return).

    Such a character can only come from a JSON escape, so a chunk whose text holds no backslash has none,
    and its rows are joined as they are.
    """
    if escape:
        return "".join(
            "\t".join([_NULL if value is None else value.translate(_COPY_ESCAPES) for value in row]) + "\n"
            for row in rows
        )
    try:
        lines = list(map("\t".join, rows))  # type: ignore[arg-type]
    except TypeError:
        lines = [
            "\t".join([_NULL if value is None else value for value in row]) if None in row else "\t".join(row)  # type: ignore[arg-type]
            for row in rows
        ]
    lines.append("")
    return "\n".join(lines)


def new_ids(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as 32 hex digits, made from one read of the system's randomness:
    ``uuid.uuid4()`` reads it once per id and builds an object that only its text is needed of."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT_RFC_4122)
    digits = raw.hex()
    return [digits[i : i + 32] for i in range(0, 32 * count, 32)]


_VERSION_4 = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))


_RESULT_COLUMNS = ("batch_id", "idx", "status", "code", "customer_id", "errors")


def write_results(connection: Connection, results: Sequence[dict[str, Any]]) -> None:
    """One row per item, set-wise: a row-by-row INSERT would cost a round trip and a parse per item."""
    if not results:
        return
    if not is_postgresql(connection):
        connection.execute(insert(ItemResult), list(results))
        return
    raw = connection.connection.driver_connection
    assert raw is not None
    columns = ", ".join(_RESULT_COLUMNS)
    with (
        raw.cursor() as cursor,
        cursor.copy(f"COPY {ItemResult.__tablename__} ({columns}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        # The binary form of json is its UTF-8 text, which is what a text value is sent as.
        copy.set_types(["uuid", "int4", "text", "text", "uuid", "text"])
        for row in results:
            errors = row["errors"]
            copy.write_row(
                (
                    row["batch_id"],
                    row["idx"],
                    row["status"],
                    row["code"],
                    row["customer_id"],
                    None if errors is None else orjson.dumps(errors).decode(),
                )
            )
