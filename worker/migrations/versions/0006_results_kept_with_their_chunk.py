"""item results kept with their chunk: one packed document per chunk instead of a row per item

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 22:00:00

A chunk's results are written once, when the chunk ends, and read only for a whole batch in index order.
As rows, each item cost the server a heap tuple, an index entry and their WAL, written by a COPY that
parsed two UUIDs per row: measured, two to three microseconds of the server's CPU per item, about a
quarter of what storing a chunk cost it. Kept as one value in the chunk's row (the entries' JSON text in
index order, as the status endpoint shows them, compressed by the worker as an lz4 frame and stored as it
is), they are written by the UPDATE that already marks the chunk ended.

The results of chunks that have ended are moved into their chunks, one chunk at a time, and the table is
dropped; downgrading moves them back.
"""

import uuid
from collections.abc import Sequence
from typing import Any

import lz4.frame
import orjson
import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_chunks = sa.table(
    "chunks",
    sa.column("id", sa.Uuid()),
    sa.column("batch_id", sa.Uuid()),
    sa.column("start_index", sa.Integer()),
    sa.column("item_count", sa.Integer()),
    sa.column("status", sa.String()),
    sa.column("results", sa.LargeBinary()),
)
_results = sa.table(
    "item_results",
    sa.column("batch_id", sa.Uuid()),
    sa.column("idx", sa.Integer()),
    sa.column("status", sa.String()),
    sa.column("code", sa.String()),
    sa.column("customer_id", sa.Uuid()),
    sa.column("errors", sa.JSON()),
)


def upgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(sa.Column("results", sa.LargeBinary(), nullable=True))
    if bind.dialect.name == "postgresql":
        # Compressed by the worker: stored out of line as it is, never compressed again.
        op.execute("ALTER TABLE chunks ALTER COLUMN results SET STORAGE EXTERNAL")
    ended = bind.execute(
        sa.select(_chunks.c.id, _chunks.c.batch_id, _chunks.c.start_index, _chunks.c.item_count).where(
            _chunks.c.status != "PENDING"
        )
    ).all()
    for chunk_id, batch_id, start, count in ended:
        rows = bind.execute(
            sa.select(_results)
            .where(
                _results.c.batch_id == batch_id,
                _results.c.idx >= start,
                _results.c.idx < start + count,
            )
            .order_by(_results.c.idx)
        ).all()
        packed = lz4.frame.compress(b",".join(orjson.dumps(_entry(*row[1:])) for row in rows))
        bind.execute(sa.update(_chunks).where(_chunks.c.id == chunk_id).values(results=packed))
    op.drop_table("item_results")


def _entry(idx: int, status: str, code: str | None, customer_id: Any, errors: Any) -> dict[str, Any]:
    """A result entry as the status endpoint has always shown it."""
    entry: dict[str, Any] = {"index": idx, "status": status}
    if customer_id is not None:
        entry["code"] = code
        entry["customerId"] = str(customer_id)
    if errors:
        entry["errors"] = errors
    return entry


def downgrade() -> None:
    bind = op.get_bind()
    postgresql = bind.dialect.name == "postgresql"
    op.create_table(
        "item_results",
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("code", sa.String(), nullable=True),
        sa.Column("customer_id", sa.Uuid(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        # 0003 dropped this foreign key on PostgreSQL, for the cost of its per-row check.
        *([] if postgresql else [sa.ForeignKeyConstraint(["batch_id"], ["batches.id"])]),
        sa.PrimaryKeyConstraint("batch_id", "idx"),
    )
    ended = bind.execute(
        sa.select(_chunks.c.id, _chunks.c.batch_id).where(_chunks.c.results.is_not(None))
    ).all()
    for chunk_id, batch_id in ended:
        packed = bind.execute(sa.select(_chunks.c.results).where(_chunks.c.id == chunk_id)).scalar_one()
        entries = orjson.loads(b"[" + lz4.frame.decompress(packed) + b"]")
        bind.execute(
            sa.insert(_results),
            [
                {
                    "batch_id": batch_id,
                    "idx": entry["index"],
                    "status": entry["status"],
                    "code": entry.get("code"),
                    "customer_id": None if "customerId" not in entry else uuid.UUID(entry["customerId"]),
                    "errors": entry.get("errors"),
                }
                for entry in entries
            ],
        )
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("results")
