"""records timestamped by the server: created_at defaults to the transaction's time

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 23:00:00

A chunk's records all carry the same creation time, which COPY had the server parse from text once per
row. With the column defaulting to now() (the start of the chunk's transaction) the COPY leaves it out.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every contract's table, as of this revision.
TABLES = ("customers",)


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                "created_at",
                server_default=sa.func.now(),
                existing_type=sa.DateTime(timezone=True),
                existing_nullable=False,
            )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                "created_at",
                server_default=None,
                existing_type=sa.DateTime(timezone=True),
                existing_nullable=False,
            )
