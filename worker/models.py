"""Tables of the pipeline itself: tenants, batches and their chunks, which keep their items' results.

The customer tables belong to the contracts (``worker.contracts``); they share this metadata.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class BatchStatus:
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    ENDED = (COMPLETED, FAILED)
    IN_PROGRESS = (QUEUED, RUNNING)
    ALL = (QUEUED, RUNNING, COMPLETED, FAILED)


class ChunkStatus:
    PENDING = "PENDING"
    DONE = "DONE"
    FAILED = "FAILED"


class ItemStatus:
    CREATED = "CREATED"
    FAILED = "FAILED"
    UNPROCESSED = "UNPROCESSED"
    ALL = (CREATED, FAILED, UNPROCESSED)


# `clientela tenant create` refuses a longer name before it reaches the column.
TENANT_NAME_LENGTH = 200


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(TENANT_NAME_LENGTH), unique=True)
    # SHA-256 of a 256-bit random key: a slow password hash buys nothing against a key that cannot be guessed.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


_IN_PROGRESS = text("status IN ('QUEUED', 'RUNNING')")


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_tenant_submitted", "tenant_id", "submitted_at"),
        # The backpressure check sums the tenant's unfinished batches on every submission.
        Index(
            "ix_batches_tenant_in_progress",
            "tenant_id",
            postgresql_where=_IN_PROGRESS,
            sqlite_where=_IN_PROGRESS,
        ),
        CheckConstraint("status IN ('QUEUED', 'RUNNING', 'COMPLETED', 'FAILED')", name="ck_batches_status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"))
    contract: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.QUEUED)
    total: Mapped[int] = mapped_column(Integer)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    chunk_count: Mapped[int] = mapped_column(Integer)
    chunks_ended: Mapped[int] = mapped_column(Integer, default=0)
    chunks_failed: Mapped[int] = mapped_column(Integer, default=0)
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (
        Index("ix_chunks_pending", "available_at", postgresql_where="status = 'PENDING'"),
        Index("ix_chunks_batch", "batch_id", "seq"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"))
    seq: Mapped[int] = mapped_column(Integer)
    start_index: Mapped[int] = mapped_column(Integer)
    item_count: Mapped[int] = mapped_column(Integer)
    # The chunk's items, the JSON text of each as sent on a line of its own, compressed by the receiver (an
    # lz4 frame); cleared once the chunk has ended, so raw input does not linger.
    payload: Mapped[bytes | None] = mapped_column(LargeBinary)
    # {position in chunk: batch index of the first item with the same key}, decided at submission.
    duplicates: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    # Once the chunk has ended: one result entry per item, in index order, as worker.results packs them.
    results: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default=ChunkStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Until then the chunk is enqueued or being processed; after it, the reconciler enqueues it again.
    available_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Base):
    """An ``Idempotency-Key`` a tenant sent with a batch, kept so that a retried request finds its batch."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created", "created_at"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # SHA-256 of the request body: the same key with another body is a client error, not a retry.
    fingerprint: Mapped[str] = mapped_column(String(64))
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
