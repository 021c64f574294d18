"""Processing one chunk: the whole of a worker's job, as a plain function the tests can call.

A chunk is processed in ONE transaction: its results, its created records, its ``DONE`` mark and the batch's
counters commit together or not at all, so a crash anywhere leaves the chunk exactly as it was and a
retry starts clean. The attempt counter lives in a transaction of its own, so crashes are counted.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import msgspec
from sqlalchemy import case, select, text, update
from sqlalchemy.orm import Session, defer

from worker.batches import utcnow
from worker.config import Settings
from worker.contracts import Contract, get_contract
from worker.db import is_postgresql, session_scope
from worker.models import Batch, BatchStatus, Chunk, ChunkStatus, ItemStatus
from worker.reconciler import CHUNK_TRANSACTION
from worker.storage import store_outcomes, write_results

UNPROCESSED_ERROR = {"message": "Item could not be processed"}


def process_chunk(chunk_id: uuid.UUID, settings: Settings) -> str:
    """Process a chunk if it is still pending and nobody else holds it; say what happened."""
    if not _count_attempt(chunk_id, settings):
        return "skipped"
    with _chunk_transaction(settings) as session:
        chunk = _lock_pending(session, chunk_id)
        if chunk is None:
            return "skipped"
        batch = session.get(Batch, chunk.batch_id)
        assert batch is not None
        contract = get_contract(batch.contract)
        if chunk.attempts > settings.max_chunk_attempts:
            write_results(session, _unprocessed(chunk))
            created = 0
            chunk_status = ChunkStatus.FAILED
        else:
            created = _validate_and_store(session, contract, batch, chunk)
            chunk_status = ChunkStatus.DONE
        _end_chunk(session, chunk, batch.id, chunk_status, created)
    return chunk_status.lower()


def _count_attempt(chunk_id: uuid.UUID, settings: Settings) -> bool:
    """Record one more attempt and push the lease forward; False when the chunk is not ours to take."""
    with _chunk_transaction(settings) as session:
        chunk = _lock_pending(session, chunk_id, with_payload=False)
        if chunk is None:
            return False
        now = utcnow()
        # Plain statements on the session's connection, here and in _end_chunk: the ORM's flush and its
        # synchronizing of loaded objects cost more than the statements, for objects read no more.
        connection = session.connection()
        connection.execute(
            update(Chunk)
            .where(Chunk.id == chunk.id)
            .values(
                attempts=Chunk.attempts + 1,
                available_at=now + timedelta(seconds=settings.chunk_lease_seconds),
            )
        )
        connection.execute(
            update(Batch)
            .where(Batch.id == chunk.batch_id, Batch.status == BatchStatus.QUEUED)
            .values(status=BatchStatus.RUNNING, started_at=now)
        )
        return True


@contextmanager
def _chunk_transaction(settings: Settings) -> Iterator[Session]:
    """A transaction that cannot keep its chunk locked long after the chunk's lease.

    A pool process killed by the task time limit leaves its backend running the current statement (a
    backend notices a lost client only when it next writes to it, so one waiting on a lock waits on), and a
    frozen worker leaves its transaction open. Either keeps the chunk row locked, and the reconciler skips
    locked chunks, so the chunk would wait for as long as the statement or the freeze lasts. With these
    timeouts PostgreSQL ends such a transaction a lease after its current statement began or it went idle
    (the time limit, one second below the lease, still fires first on a worker that is alive); the name
    lets the reconciler end the few a timeout cannot reach, such as one waiting for COPY data.
    """
    with session_scope() as session:
        if is_postgresql(session):
            limit = f"{settings.chunk_lease_seconds}s"
            session.execute(
                text(
                    "SELECT set_config('statement_timeout', :limit, true), "
                    "set_config('idle_in_transaction_session_timeout', :limit, true), "
                    "set_config('application_name', :name, true)"
                ),
                {"limit": limit, "name": CHUNK_TRANSACTION},
            )
        yield session


def _lock_pending(session: Session, chunk_id: uuid.UUID, *, with_payload: bool = True) -> Chunk | None:
    # SKIP LOCKED: a second delivery of a chunk that another worker holds returns at once, not waits.
    query = select(Chunk).where(Chunk.id == chunk_id, Chunk.status == ChunkStatus.PENDING)
    if not with_payload:
        # Counting an attempt needs none of the chunk's items, which are most of its bytes.
        query = query.options(defer(Chunk.payload))
    return session.scalars(query.with_for_update(skip_locked=True)).one_or_none()


def _validate_and_store(session: Session, contract: Contract, batch: Batch, chunk: Chunk) -> int:
    """Validate the chunk's items and store what they came to; return how many records were created."""
    assert chunk.payload is not None
    # Each element's text as the client sent it: the contract reads every number from its exact text.
    elements = _ELEMENTS.decode(chunk.payload.encode())
    failed: list[dict[str, Any]] = []
    valid: list[tuple[int, list[Any]]] = []
    # Read once: the loop runs per item, and the chunk's attributes go through the ORM.
    start = chunk.start_index
    duplicates = {int(position): first for position, first in chunk.duplicates.items()}
    for position, element in enumerate(elements):
        values, errors, key = contract.read(bytes(element))
        first = duplicates.get(position)
        if first is not None and not any(error.get("field") == contract.key for error in errors):
            message = f"Duplicate {contract.key} in batch (first at index {first})"
            errors = contract.ordered([*errors, {"field": contract.key, "message": message}])
        idx = start + position
        if errors:
            failed.append(
                {
                    "batch_id": batch.id,
                    "idx": idx,
                    "status": ItemStatus.FAILED,
                    "code": key,
                    "customer_id": None,
                    "errors": errors,
                }
            )
        else:
            assert values is not None
            valid.append((idx, values))
    return store_outcomes(
        session,
        contract,
        tenant_id=batch.tenant_id,
        batch_id=batch.id,
        now=utcnow(),
        failed=failed,
        valid=valid,
    )


_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])


def _unprocessed(chunk: Chunk) -> list[dict[str, Any]]:
    return [
        {
            "batch_id": chunk.batch_id,
            "idx": chunk.start_index + position,
            "status": ItemStatus.UNPROCESSED,
            "code": None,
            "customer_id": None,
            "errors": [UNPROCESSED_ERROR],
        }
        for position in range(chunk.item_count)
    ]


def _end_chunk(session: Session, chunk: Chunk, batch_id: uuid.UUID, status: str, created: int) -> None:
    """Mark the chunk ended and count it into its batch; the last chunk to end closes the batch."""
    now = utcnow()
    connection = session.connection()
    connection.execute(
        update(Chunk).where(Chunk.id == chunk.id).values(status=status, payload=None, ended_at=now)
    )
    chunk_failed = 1 if status == ChunkStatus.FAILED else 0
    ended = Batch.chunks_ended + 1
    # The UPDATE takes the batch row's lock, so concurrent chunks of one batch count in turn and exactly
    # one of them sees the last chunk end.
    connection.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(
            processed=Batch.processed + chunk.item_count,
            created=Batch.created + created,
            failed=Batch.failed + chunk.item_count - created,
            chunks_ended=ended,
            chunks_failed=Batch.chunks_failed + chunk_failed,
            started_at=case((Batch.started_at.is_(None), now), else_=Batch.started_at),
            status=case(
                (ended < Batch.chunk_count, BatchStatus.RUNNING),
                (Batch.chunks_failed + chunk_failed > 0, BatchStatus.FAILED),
                else_=BatchStatus.COMPLETED,
            ),
            completed_at=case((ended >= Batch.chunk_count, now), else_=None),
        )
    )
