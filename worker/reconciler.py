"""The reconciler: PostgreSQL is the source of truth, Redis only a nudge.

A chunk still pending past its lease lost its message somewhere (Redis restarted empty, a worker killed
mid-chunk, the receiver crashed between commit and enqueue). Enqueueing it again is always safe: a chunk
that has ended, or that another worker holds, is skipped by the worker.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from sqlalchemy import select, text, update

from worker.batches import utcnow
from worker.config import Settings
from worker.db import is_postgresql, session_scope
from worker.models import Chunk, ChunkStatus

PAGE = 1000
# The application_name of a worker's chunk transactions, so that stale ones can be told apart.
CHUNK_TRANSACTION = "clientela-chunk"

log = logging.getLogger(__name__)


def overdue_chunks(settings: Settings, *, every_pending: bool = False) -> list[uuid.UUID]:
    """Take the chunks whose lease has run out and lease them again; the caller enqueues them.
    ``every_pending`` takes every pending chunk at once, leased or not: for a broker known to hold no
    message, such as embedded mode's in-process one when it starts."""
    _end_stale_chunk_transactions(settings)
    now = utcnow()
    query = select(Chunk.id).where(Chunk.status == ChunkStatus.PENDING)
    if not every_pending:
        query = query.where(Chunk.available_at < now).limit(PAGE)
    with session_scope() as session:
        chunk_ids = list(
            session.scalars(query.order_by(Chunk.available_at).with_for_update(skip_locked=True))
        )
        if chunk_ids:
            session.execute(
                update(Chunk)
                .where(Chunk.id.in_(chunk_ids))
                .values(available_at=now + timedelta(seconds=settings.chunk_lease_seconds))
            )
    return chunk_ids


def _end_stale_chunk_transactions(settings: Settings) -> None:
    """Terminate the chunk transactions open for two leases, which keep their chunks locked.

    By then the task time limit has ended the attempt of any live worker, so such a transaction belongs to a
    worker that is frozen or gone, in a state its own timeouts cannot reach (waiting for the COPY data of a
    frozen client, say). Terminating it releases the chunk for the next pass; if that worker thaws, its
    commit fails, so the chunk is written once.
    """
    with session_scope() as session:
        if not is_postgresql(session):
            return
        ended = session.scalar(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND usename = current_user "
                "AND application_name = :name AND xact_start < now() - make_interval(secs => :age)"
            ),
            {"name": CHUNK_TRANSACTION, "age": 2 * settings.chunk_lease_seconds},
        )
    if ended:
        log.warning("ended %d chunk transactions older than two leases", ended)
