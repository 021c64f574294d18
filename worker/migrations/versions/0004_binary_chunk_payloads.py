"""chunk payloads as bytea again, read in PostgreSQL's binary format

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 23:00:00

0003 made payloads text because bytea travelled hex-encoded. Read in the binary format, bytea travels as it
is stored, and neither side converts between bytes and str: the receiver has the items as UTF-8 bytes, and
the worker's JSON decoder wants bytes. Measured on the 10 chunks of a 10,000-item batch, both with lz4:
inserting 29.8 ms as text against 24.7 ms as bytea, reading 48.5 ms as text (and encoding it) against
15.7 ms as bytea read in binary.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        with op.batch_alter_table("chunks") as batch:
            batch.alter_column("payload", type_=sa.LargeBinary(), existing_type=sa.Text())
        # SQLite keeps each value's own type: payloads of pending chunks are still text until cast.
        op.execute("UPDATE chunks SET payload = CAST(payload AS BLOB) WHERE payload IS NOT NULL")
        return
    _retype_payload("bytea USING convert_to(payload, 'UTF8')")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("chunks") as batch:
            batch.alter_column("payload", type_=sa.Text(), existing_type=sa.LargeBinary())
        op.execute("UPDATE chunks SET payload = CAST(payload AS TEXT) WHERE payload IS NOT NULL")
        return
    _retype_payload("text USING convert_from(payload, 'UTF8')")


def _retype_payload(type_using: str) -> None:
    """Changing a column's type resets its compression: the lz4 that 0003 set, where it could, is kept."""
    lz4 = op.get_bind().scalar(
        sa.text(
            "SELECT attcompression = 'l' FROM pg_attribute "
            "WHERE attrelid = 'chunks'::regclass AND attname = 'payload'"
        )
    )
    op.execute(f"ALTER TABLE chunks ALTER COLUMN payload TYPE {type_using}")
    if lz4:
        op.execute("ALTER TABLE chunks ALTER COLUMN payload SET COMPRESSION lz4")
