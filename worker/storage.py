"""Set-wise writes: the one place where PostgreSQL and SQLite differ.

PostgreSQL: COPY into a per-connection staging table, then one ``INSERT … SELECT … ON CONFLICT DO NOTHING
RETURNING``. SQLite (embedded mode) has no COPY: a multi-row ``INSERT … ON CONFLICT DO NOTHING RETURNING``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from worker.contracts import Contract
from worker.db import is_postgresql
from worker.models import ItemResult


def insert_new_records(
    session: Session,
    contract: Contract,
    *,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    now: datetime,
    records: Sequence[dict[str, Any]],
) -> dict[str, uuid.UUID]:
    """Insert the records whose key the tenant does not have yet; map each inserted key to its new id."""
    if not records:
        return {}
    rows = [
        {"id": uuid.uuid4(), "tenant_id": tenant_id, "batch_id": batch_id, "created_at": now, **record}
        for record in records
    ]
    if is_postgresql(session):
        return _copy_then_insert(session, contract, rows)
    statement = (
        sqlite.insert(contract.table)
        .on_conflict_do_nothing(index_elements=["tenant_id", contract.key])
        .returning(contract.table.c[contract.key], contract.table.c.id)
    )
    return {key: new_id for key, new_id in session.execute(statement, rows)}


def _copy_then_insert(
    session: Session, contract: Contract, rows: list[dict[str, Any]]
) -> dict[str, uuid.UUID]:
    table = contract.table.name
    stage = f"stage_{table}"
    columns = ["id", "tenant_id", "batch_id", "created_at", *contract.field_names]
    column_list = ", ".join(columns)
    raw = session.connection().connection.driver_connection
    assert raw is not None
    with raw.cursor() as cursor:
        # A temporary table lives as long as the pooled connection; ON COMMIT DELETE ROWS empties it.
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {stage} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(f"COPY {stage} ({column_list}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[name] for name in columns])
        # Key order: concurrent chunks of one tenant lock the unique index in the same order, no deadlock.
        cursor.execute(
            f"INSERT INTO {table} ({column_list}) SELECT {column_list} FROM {stage} ORDER BY {contract.key} "
            f"ON CONFLICT (tenant_id, {contract.key}) DO NOTHING RETURNING {contract.key}, id"
        )
        return {key: new_id for key, new_id in cursor.fetchall()}


def write_results(session: Session, results: Sequence[dict[str, Any]]) -> None:
    """One row per item, in one multi-row statement."""
    if results:
        session.execute(insert(ItemResult), list(results))
