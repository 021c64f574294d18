"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22 14:01:09.001351
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _decimal(precision: int, scale: int) -> sa.types.TypeEngine[Any]:
    # SQLite has no exact decimal type: embedded mode keeps the decimal's text.
    return sa.Numeric(precision, scale).with_variant(sa.String(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("contract", sa.String(length=50), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("processed", sa.Integer(), nullable=False),
        sa.Column("created", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("chunks_ended", sa.Integer(), nullable=False),
        sa.Column("chunks_failed", sa.Integer(), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('QUEUED', 'RUNNING', 'COMPLETED', 'FAILED')", name="ck_batches_status"
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_batches_tenant_submitted", "batches", ["tenant_id", "submitted_at"], unique=False)
    op.create_table(
        "customers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("code", sa.String(length=18), nullable=False),
        sa.Column("type", sa.String(length=30), nullable=True),
        sa.Column("name", sa.String(length=150), nullable=False),
        sa.Column("contact", sa.String(length=150), nullable=True),
        sa.Column("phone", sa.String(length=100), nullable=True),
        sa.Column("address", sa.String(length=300), nullable=True),
        sa.Column("city", sa.String(length=50), nullable=True),
        sa.Column("quota", _decimal(18, 2), nullable=True),
        sa.Column("term", _decimal(3, 0), nullable=True),
        sa.Column("payment_method", sa.String(length=50), nullable=True),
        sa.Column("email", sa.String(length=150), nullable=True),
        sa.Column("email2", sa.String(length=150), nullable=True),
        sa.Column("country", sa.String(length=50), nullable=True),
        sa.Column("region", sa.String(length=50), nullable=True),
        sa.Column("price_list", sa.String(length=20), nullable=True),
        sa.Column("location", sa.String(length=20), nullable=True),
        sa.Column("nit", sa.String(length=20), nullable=True),
        sa.Column("discount", _decimal(10, 2), nullable=True),
        sa.Column("discount_list", sa.String(length=20), nullable=True),
        sa.Column("observations", sa.String(length=500), nullable=True),
        sa.Column("name_est", sa.String(length=200), nullable=True),
        sa.Column("short_name", sa.String(length=200), nullable=True),
        sa.Column("operation_center", sa.String(length=10), nullable=True),
        sa.Column("block_sales", sa.String(length=1), nullable=True),
        sa.Column("commercial_discount", _decimal(18, 2), nullable=True),
        sa.Column("discount_base", _decimal(18, 2), nullable=True),
        sa.Column("withholding_base", _decimal(18, 2), nullable=True),
        sa.Column("withholding", _decimal(18, 2), nullable=True),
        sa.Column("corporate_client", sa.String(length=18), nullable=True),
        sa.Column("iva_exempt", sa.String(length=1), nullable=True),
        sa.Column("real_quota", _decimal(18, 2), nullable=True),
        sa.Column("state", sa.String(length=1), nullable=True),
        sa.CheckConstraint("block_sales IN ('Y', 'N')", name="ck_customers_block_sales"),
        sa.CheckConstraint("iva_exempt IN ('Y', 'N')", name="ck_customers_iva_exempt"),
        sa.CheckConstraint("state IN ('Y', 'N')", name="ck_customers_state"),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "code", name="uq_customers_tenant_code"),
    )
    op.create_table(
        "chunks",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("start_index", sa.Integer(), nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("duplicates", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_chunks_batch", "chunks", ["batch_id", "seq"], unique=False)
    op.create_index(
        "ix_chunks_pending", "chunks", ["available_at"], unique=False, postgresql_where="status = 'PENDING'"
    )
    op.create_table(
        "item_results",
        sa.Column("batch_id", sa.Uuid(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("code", sa.String(), nullable=True),
        sa.Column("customer_id", sa.Uuid(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
        ),
        sa.PrimaryKeyConstraint("batch_id", "idx"),
    )


def downgrade() -> None:
    op.drop_table("item_results")
    op.drop_index("ix_chunks_pending", table_name="chunks", postgresql_where="status = 'PENDING'")
    op.drop_index("ix_chunks_batch", table_name="chunks")
    op.drop_table("chunks")
    op.drop_table("customers")
    op.drop_index("ix_batches_tenant_submitted", table_name="batches")
    op.drop_table("batches")
    op.drop_table("tenants")
