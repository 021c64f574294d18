"""Processing one chunk: the whole of a worker's job, as a plain function the tests can call.

A chunk is processed in ONE transaction: its results, its created records, its ``DONE`` mark and the batch's
counters commit together or not at all, so a crash anywhere leaves the chunk exactly as it was and a
retry starts clean. The attempt counter lives in a transaction of its own, so crashes are counted. Both
run on one connection, taken from the pool once per chunk.
"""

from __future__ import annotations

import logging
import operator
import uuid
from datetime import timedelta
from itertools import compress, repeat

import lz4.frame
from sqlalchemy import Connection, Integer, Row, bindparam, case, select, update

from worker import results
from worker.batches import utcnow
from worker.config import Settings
from worker.contracts import Contract, get_contract
from worker.contracts.base import ARRAY_ELEMENTS
from worker.db import connect, is_postgresql
from worker.models import Batch, BatchStatus, Chunk, ChunkStatus, ItemStatus
from worker.reconciler import CHUNK_TRANSACTION
from worker.storage import KeyRace, store_records

UNPROCESSED_ERROR = {"message": "Item could not be processed"}
log = logging.getLogger(__name__)
# Times a chunk transaction is rolled back and done again within one attempt because a concurrent chunk
# stored one of its keys first. Each time takes at least one key off the new ones, so a few suffice.
KEY_RACES = 3

# A locked chunk as _LOCK_CHUNK reads it.
LockedChunk = Row[uuid.UUID, uuid.UUID, int, int, dict[str, int], int, uuid.UUID, str]


def process_chunk(chunk_id: uuid.UUID, settings: Settings) -> str:
    """Process a chunk if it is still pending and nobody else holds it; say what happened."""
    with connect() as connection:
        if not _count_attempt(connection, chunk_id, settings):
            return "skipped"
        for _ in range(KEY_RACES):
            try:
                return _process(connection, chunk_id, settings)
            except KeyRace:
                # Rolled back: the chunk is as it was, and the next lookup finds the other chunk's keys.
                log.info(
                    "chunk %s: a concurrent chunk stored one of its keys first; processing it again", chunk_id
                )
        # A last time: losing this race too fails the task, and the reconciler hands the chunk out again.
        return _process(connection, chunk_id, settings)


# The statements of a chunk's two transactions, built once: they run for every chunk, and building a
# statement (and its cache key) cost more than running it. Plain statements on the connection, not ORM
# objects, for the same reason: the ORM's loading, flush and bookkeeping cost more than the SQL.
# FOR UPDATE SKIP LOCKED: a second delivery of a chunk that another worker holds returns at once, not waits
# (SQLite, which has neither, serializes its writers instead).
_COUNT_ATTEMPT = (
    update(Chunk)
    .where(
        Chunk.id
        == select(Chunk.id)
        .where(Chunk.id == bindparam("chunk_id"), Chunk.status == ChunkStatus.PENDING)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    .values(attempts=Chunk.attempts + 1, available_at=bindparam("lease_until"))
    .returning(Chunk.batch_id)
)
_START_BATCH = (
    update(Batch)
    .where(Batch.id == bindparam("batch_id"), Batch.status == BatchStatus.QUEUED)
    .values(status=BatchStatus.RUNNING, started_at=bindparam("now"))
)
# The chunk with its items, and what its batch says of them.
_LOCK_CHUNK = (
    select(
        Chunk.id,
        Chunk.batch_id,
        Chunk.start_index,
        Chunk.item_count,
        Chunk.duplicates,
        Chunk.attempts,
        Batch.tenant_id,
        Batch.contract,
    )
    .join(Batch, Batch.id == Chunk.batch_id)
    .where(Chunk.id == bindparam("chunk_id"), Chunk.status == ChunkStatus.PENDING)
    .with_for_update(of=Chunk, skip_locked=True)
)
_PAYLOAD = select(Chunk.payload).where(Chunk.id == bindparam("chunk_id"))
# bytea comes as hex text unless asked for in the binary format: twice its size, encoded by the server and
# decoded here.
_PAYLOAD_BINARY = "SELECT payload FROM chunks WHERE id = %s"
_END_CHUNK = (
    update(Chunk)
    .where(Chunk.id == bindparam("chunk_id"))
    .values(status=bindparam("status"), payload=None, results=bindparam("results"), ended_at=bindparam("now"))
)
_ENDED = Batch.chunks_ended + 1
_CHUNK_FAILED = bindparam("chunk_failed", type_=Integer)
# The UPDATE takes the batch row's lock, so concurrent chunks of one batch count in turn and exactly one of
# them sees the last chunk end.
_COUNT_INTO_BATCH = (
    update(Batch)
    .where(Batch.id == bindparam("batch_id"))
    .values(
        processed=Batch.processed + bindparam("items", type_=Integer),
        created=Batch.created + bindparam("created", type_=Integer),
        failed=Batch.failed + bindparam("items_failed", type_=Integer),
        chunks_ended=_ENDED,
        chunks_failed=Batch.chunks_failed + _CHUNK_FAILED,
        started_at=case((Batch.started_at.is_(None), bindparam("now")), else_=Batch.started_at),
        status=case(
            (Batch.chunk_count > _ENDED, BatchStatus.RUNNING),
            (Batch.chunks_failed + _CHUNK_FAILED > 0, BatchStatus.FAILED),
            else_=BatchStatus.COMPLETED,
        ),
        completed_at=case((Batch.chunk_count <= _ENDED, bindparam("now")), else_=None),
    )
)


def chunk_server_settings(settings: Settings) -> dict[str, str]:
    """PostgreSQL settings for the connections of a worker process, so that none of its transactions can keep
    a chunk locked long after the chunk's lease.

    A pool process killed by the task time limit leaves its backend running the current statement (a
    backend notices a lost client only when it next writes to it, so one waiting on a lock waits on), and a
    frozen worker leaves its transaction open. Either keeps the chunk row locked, and the reconciler skips
    locked chunks, so the chunk would wait for as long as the statement or the freeze lasts. With these
    timeouts PostgreSQL ends such a transaction a lease after its current statement began or it went idle
    (the time limit, one second below the lease, still fires first on a worker that is alive); the name
    lets the reconciler end the few a timeout cannot reach, such as one waiting for COPY data. They are the
    connection's own, not each transaction's: a worker process runs nothing but these transactions and the
    reconciler's short ones, and that saves a statement per transaction.
    """
    limit = f"{settings.chunk_lease_seconds}s"
    return {
        "statement_timeout": limit,
        "idle_in_transaction_session_timeout": limit,
        "application_name": CHUNK_TRANSACTION,
    }


def _count_attempt(connection: Connection, chunk_id: uuid.UUID, settings: Settings) -> bool:
    """Record one more attempt and push the lease forward; False when the chunk is not ours to take."""
    now = utcnow()
    lease_until = now + timedelta(seconds=settings.chunk_lease_seconds)
    with connection.begin():
        batch_id = connection.execute(
            _COUNT_ATTEMPT, {"chunk_id": chunk_id, "lease_until": lease_until}
        ).scalar_one_or_none()
        if batch_id is None:
            return False
        connection.execute(_START_BATCH, {"batch_id": batch_id, "now": now})
    return True


def _process(connection: Connection, chunk_id: uuid.UUID, settings: Settings) -> str:
    with connection.begin():
        chunk = connection.execute(_LOCK_CHUNK, {"chunk_id": chunk_id}).one_or_none()
        if chunk is None:
            return "skipped"
        if chunk.attempts > settings.max_chunk_attempts:
            entries = [
                results.failed(chunk.start_index + position, [UNPROCESSED_ERROR], ItemStatus.UNPROCESSED)
                for position in range(chunk.item_count)
            ]
            created = 0
            chunk_status = ChunkStatus.FAILED
        else:
            created, entries = _validate_and_store(connection, get_contract(chunk.contract), chunk)
            chunk_status = ChunkStatus.DONE
        _end_chunk(connection, chunk, chunk_status, created, results.pack(entries))
    return chunk_status.lower()


def _payload(connection: Connection, chunk_id: uuid.UUID) -> bytes:
    if is_postgresql(connection):
        with connection.connection.driver_connection.cursor(binary=True) as cursor:  # type: ignore[union-attr]
            row = cursor.execute(_PAYLOAD_BINARY, (chunk_id,)).fetchone()
        payload = None if row is None else row[0]
    else:
        payload = connection.execute(_PAYLOAD, {"chunk_id": chunk_id}).scalar_one()
    assert payload is not None, "a pending chunk keeps its payload"
    items: bytes = lz4.frame.decompress(payload)
    return items


def _elements(items: bytes) -> list[bytes]:
    """The JSON text of each of a chunk's items: one per line, each line ended by a line break; or, from a
    receiver of before migration 0008 still running while a deployment is upgraded, a JSON array."""
    if not items.endswith(b"\n"):
        return [bytes(element) for element in ARRAY_ELEMENTS.decode(items)]
    lines = items.split(b"\n")
    # The empty text after the last line break.
    lines.pop()
    return lines


def _validate_and_store(
    connection: Connection, contract: Contract, chunk: LockedChunk
) -> tuple[int, list[str]]:
    """Validate the chunk's items and store the new records; return how many were created, and each item's
    result entry in index order."""
    # Each element's text as the client sent it: the contract reads every number from its exact text.
    items = _payload(connection, chunk.id)
    # Without a JSON escape in the chunk no value holds a character that COPY or JSON would escape.
    escapes = b"\\" in items
    elements = _elements(items)
    records, errors = contract.read_chunk(elements, escapes=escapes)
    if chunk.duplicates:
        duplicates = {int(position): first for position, first in chunk.duplicates.items()}
        for position, first in duplicates.items():
            found = errors.get(position, [])
            if not any(error.get("field") == contract.key for error in found):
                message = f"Duplicate {contract.key} in batch (first at index {first})"
                errors[position] = contract.ordered([*found, {"field": contract.key, "message": message}])
        records = records.without(set(duplicates))
    ids = store_records(
        connection,
        contract,
        tenant_id=chunk.tenant_id,
        batch_id=chunk.batch_id,
        now=utcnow(),
        records=records,
        escapes=escapes,
    )
    start = chunk.start_index
    entries: list[str] = [""] * len(elements)
    for position, item_errors in errors.items():
        entries[position] = results.failed(start + position, item_errors)
    exists = [{"field": contract.key, "message": f"{contract.key.capitalize()} already exists"}]
    positions, keys = records.positions, records.keys(contract.key_position)
    made: list[str] = [new_id for new_id in ids if new_id is not None]
    if len(made) < len(ids):
        for k in compress(range(len(ids)), map(operator.is_, ids, repeat(None))):
            entries[positions[k]] = results.failed(start + positions[k], exists)
        positions, keys = list(compress(positions, ids)), list(compress(keys, ids))
    created = results.created(map(operator.add, positions, repeat(start)), keys, made, plain=not escapes)
    for position, entry in zip(positions, created, strict=True):
        entries[position] = entry
    return len(positions), entries


def _end_chunk(connection: Connection, chunk: LockedChunk, status: str, created: int, packed: bytes) -> None:
    """Mark the chunk ended with its results and count it into its batch; the last chunk to end closes the
    batch."""
    now = utcnow()
    connection.execute(_END_CHUNK, {"chunk_id": chunk.id, "status": status, "now": now, "results": packed})
    connection.execute(
        _COUNT_INTO_BATCH,
        {
            "batch_id": chunk.batch_id,
            "items": chunk.item_count,
            "created": created,
            "items_failed": chunk.item_count - created,
            "chunk_failed": 1 if status == ChunkStatus.FAILED else 0,
            "now": now,
        },
    )
