"""The reconciler: PostgreSQL is the source of truth, Redis only a nudge.

A chunk still pending past its lease lost its message somewhere (Redis restarted empty, a worker killed
mid-chunk, the receiver crashed between commit and enqueue). Enqueueing it again is always safe: a chunk
that has ended, or that another worker holds, is skipped by the worker.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select, update

from worker.batches import utcnow
from worker.config import Settings
from worker.db import session_scope
from worker.models import Chunk, ChunkStatus

PAGE = 1000


def overdue_chunks(settings: Settings) -> list[uuid.UUID]:
    """Take the chunks whose lease has run out and lease them again; the caller enqueues them."""
    now = utcnow()
    with session_scope() as session:
        chunk_ids = list(
            session.scalars(
                select(Chunk.id)
                .where(Chunk.status == ChunkStatus.PENDING, Chunk.available_at < now)
                .order_by(Chunk.available_at)
                .limit(PAGE)
                .with_for_update(skip_locked=True)
            )
        )
        if chunk_ids:
            session.execute(
                update(Chunk)
                .where(Chunk.id.in_(chunk_ids))
                .values(available_at=now + timedelta(seconds=settings.chunk_lease_seconds))
            )
    return chunk_ids
