"""Batches as the receiver stores them and as the status endpoints read them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import compress
from operator import ne
from typing import Any, cast

import lz4.frame
import orjson
from sqlalchemy import CursorResult, delete, func, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from typing_extensions import Buffer

from worker import results as item_results
from worker.contracts import Contract
from worker.db import is_postgresql
from worker.models import Batch, BatchStatus, Chunk, IdempotencyKey, ItemStatus, Tenant

# How long an Idempotency-Key is remembered (the IETF httpapi draft leaves it to the server; 24 h is common).
IDEMPOTENCY_KEY_TTL = timedelta(hours=24)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Submission:
    batch_id: uuid.UUID
    total: int
    chunk_ids: list[uuid.UUID]
    # True when an Idempotency-Key led back to a batch stored by an earlier request.
    replayed: bool = False


class TooManyInProgress(Exception):
    """The tenant already has as many items waiting as it may."""


class KeyReused(Exception):
    """An Idempotency-Key sent again with a different body."""


class KeyTaken(Exception):
    """An Idempotency-Key that a concurrent request has just tied to its own batch."""


def reserve_capacity(session: Session, tenant_id: uuid.UUID, items: int, limit: int) -> None:
    """Refuse a batch that would take the tenant's unprocessed items past ``limit``.

    The tenant row is locked until the caller's transaction ends, so concurrent submissions of one tenant
    are counted one after the other and cannot overshoot together. A batch is always accepted when the
    tenant has nothing in progress, so a limit below the batch size cannot block a tenant for good.
    """
    if is_postgresql(session):
        # FOR NO KEY UPDATE: it serializes submissions, yet does not wait for anything that holds the tenant
        # row's key-share lock (the foreign keys of new batches and Idempotency-Keys).
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
    else:
        # SQLite has no row locks, and its driver begins a transaction only at the first write: a write
        # first takes the database's one write lock, which serializes submissions as the row lock does.
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id))
    in_progress = session.scalar(
        select(func.coalesce(func.sum(Batch.total - Batch.processed), 0)).where(
            Batch.tenant_id == tenant_id, Batch.status.in_(BatchStatus.IN_PROGRESS)
        )
    )
    if in_progress and in_progress + items > limit:
        raise TooManyInProgress


def replay(session: Session, tenant_id: uuid.UUID, key: str, fingerprint: str) -> Submission | None:
    """The batch an earlier request with this key stored, or None if the key is unknown or expired."""
    earlier = session.execute(
        select(IdempotencyKey.fingerprint, Batch.id, Batch.total)
        .join(Batch, Batch.id == IdempotencyKey.batch_id)
        .where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            IdempotencyKey.created_at >= utcnow() - IDEMPOTENCY_KEY_TTL,
        )
    ).one_or_none()
    if earlier is None:
        return None
    if earlier.fingerprint != fingerprint:
        raise KeyReused
    return Submission(batch_id=earlier.id, total=earlier.total, chunk_ids=[], replayed=True)


def claim_key(
    session: Session, tenant_id: uuid.UUID, key: str, fingerprint: str, batch_id: uuid.UUID
) -> None:
    """Tie the key to the batch being stored; KeyTaken if a live earlier request holds it.

    A concurrent request with the same key waits here on the other's uncommitted row, and then sees it:
    two retries racing each other store one batch between them. An expired key is taken over.
    """
    now = utcnow()
    dialect = postgresql if is_postgresql(session) else sqlite
    statement = dialect.insert(IdempotencyKey).values(
        tenant_id=tenant_id, key=key, fingerprint=fingerprint, batch_id=batch_id, created_at=now
    )
    statement = statement.on_conflict_do_update(
        index_elements=[IdempotencyKey.tenant_id, IdempotencyKey.key],
        set_={
            "fingerprint": statement.excluded.fingerprint,
            "batch_id": statement.excluded.batch_id,
            "created_at": statement.excluded.created_at,
        },
        where=IdempotencyKey.created_at < now - IDEMPOTENCY_KEY_TTL,
    ).returning(IdempotencyKey.batch_id)
    if session.execute(statement).first() is None:
        raise KeyTaken


def purge_expired_keys(session: Session) -> int:
    """Forget the Idempotency-Keys older than their time to live."""
    expired = delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - IDEMPOTENCY_KEY_TTL)
    return cast("CursorResult[Any]", session.execute(expired)).rowcount


@dataclass(frozen=True)
class NewBatch:
    """A batch's rows, made before the transaction that stores them: making them costs tens of
    milliseconds, which concurrent submissions of the tenant would otherwise wait for on its row lock."""

    id: uuid.UUID
    contract: str
    chunks: list[dict[str, Any]]

    @property
    def total(self) -> int:
        return sum(chunk["item_count"] for chunk in self.chunks)


def new_batch(
    *, contract: Contract, items: Sequence[Buffer], keys: Sequence[str | None], chunk_size: int
) -> NewBatch:
    """A batch of ``items``: its chunks, each with its payload and its in-batch duplicate facts.

    ``items`` are the JSON texts of the items, as UTF-8 without a line break, stored as they are (numbers
    keep their exact text), each on a line of its own; ``keys`` the uniqueness key of each, or None. The
    first item with a key owns it; every later item with the same key is recorded as its duplicate, so the
    workers decide duplicates the same way whatever order the chunks run in.
    """
    batch_id = uuid.uuid4()
    count = len(items)
    # Built in C, not a Python step per item: a dict from the last item to the first keeps each key's
    # earliest index, and only the items whose key has an earlier index are visited in Python.
    first_index = dict(zip(reversed(keys), range(count - 1, -1, -1), strict=True))
    later = compress(range(count), map(ne, map(first_index.__getitem__, keys), range(count)))
    duplicates: list[dict[str, int]] = [{} for _ in range(0, count, chunk_size)]
    for index in later:
        key = keys[index]
        if key is not None:
            duplicates[index // chunk_size][str(index % chunk_size)] = first_index[key]
    chunks: list[dict[str, Any]] = []
    for seq, start in enumerate(range(0, count, chunk_size)):
        part = items[start : start + chunk_size]
        chunks.append(
            {
                "id": uuid.uuid4(),
                "batch_id": batch_id,
                "seq": seq,
                "start_index": start,
                "item_count": len(part),
                # Each item ends its line, so a payload always ends with a line break; one written as a
                # JSON array, before migration 0008, ends with "]".
                "payload": lz4.frame.compress(b"\n".join([*part, b""])),
                "duplicates": duplicates[seq],
            }
        )
    return NewBatch(batch_id, contract.name, chunks)


def store_batch(session: Session, *, tenant_id: uuid.UUID, batch: NewBatch, lease_seconds: int) -> Submission:
    """Store a batch and its chunks in the caller's transaction."""
    now = utcnow()
    session.add(
        Batch(
            id=batch.id,
            tenant_id=tenant_id,
            contract=batch.contract,
            status=BatchStatus.QUEUED,
            total=batch.total,
            processed=0,
            created=0,
            failed=0,
            chunk_count=len(batch.chunks),
            chunks_ended=0,
            chunks_failed=0,
            submitted_at=now,
        )
    )
    session.flush()
    available_at = now + timedelta(seconds=lease_seconds)
    session.execute(insert(Chunk), [chunk | {"available_at": available_at} for chunk in batch.chunks])
    return Submission(batch_id=batch.id, total=batch.total, chunk_ids=[c["id"] for c in batch.chunks])


def find_batch(session: Session, tenant_id: uuid.UUID, batch_id: uuid.UUID) -> Batch | None:
    """The batch if it exists and belongs to the tenant; another tenant's batch is as good as unknown."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != tenant_id:
        return None
    return batch


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def progress(batch: Batch) -> dict[str, Any]:
    return {
        "batchId": str(batch.id),
        "status": batch.status,
        "total": batch.total,
        "processed": batch.processed,
        "created": batch.created,
        "failed": batch.failed,
    }


def summary(batch: Batch) -> dict[str, Any]:
    return {
        **progress(batch),
        "submittedAt": iso(batch.submitted_at),
        "startedAt": iso(batch.started_at),
        "completedAt": iso(batch.completed_at),
    }


def _packed_results(session: Session, batch_id: uuid.UUID) -> list[bytes]:
    query = select(Chunk.results).where(Chunk.batch_id == batch_id).order_by(Chunk.seq)
    return [packed for packed in session.scalars(query) if packed is not None]


def results(
    session: Session,
    batch_id: uuid.UUID,
    *,
    statuses: Sequence[str] | None,
    offset: int = 0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The per-index outcomes of an ended batch in index order, as the status endpoint shows them."""
    if statuses is None:
        # Without a filter an entry's place is its index: only the chunks that hold the page are read.
        query = select(Chunk.start_index, Chunk.results).where(
            Chunk.batch_id == batch_id, Chunk.start_index + Chunk.item_count > offset
        )
        if limit is not None:
            query = query.where(Chunk.start_index < offset + limit)
        held = session.execute(query.order_by(Chunk.seq)).all()
        if not held:
            return []
        page = item_results.entries(packed for _, packed in held if packed is not None)
        skip = offset - held[0].start_index
        return page[skip:] if limit is None else page[skip : skip + limit]
    found = item_results.entries(_packed_results(session, batch_id))
    found = [entry for entry in found if entry["status"] in statuses]
    return found[offset:] if limit is None else found[offset : offset + limit]


def results_json(
    session: Session,
    batch_id: uuid.UUID,
    *,
    statuses: Sequence[str] | None,
    offset: int = 0,
    limit: int | None = None,
) -> orjson.Fragment:
    """What results() gives, already serialized, for a response to embed as it is: without a filter or a
    page, the chunks' entries joined as they are kept, never parsed."""
    if statuses is None and offset == 0 and limit is None:
        return orjson.Fragment(item_results.document(_packed_results(session, batch_id)))
    entries = results(session, batch_id, statuses=statuses, offset=offset, limit=limit)
    return orjson.Fragment(orjson.dumps(entries))


def failed_items(session: Session, batch_id: uuid.UUID) -> list[dict[str, Any]]:
    """The reference document's per-item error list: every item that was not created."""
    return [
        {"index": entry["index"], "errors": entry.get("errors", [])}
        for entry in results(session, batch_id, statuses=(ItemStatus.FAILED, ItemStatus.UNPROCESSED))
    ]


def list_batches(
    session: Session, tenant_id: uuid.UUID, *, status: str | None, limit: int, before: uuid.UUID | None
) -> tuple[list[Batch], uuid.UUID | None]:
    """The tenant's batches, newest first, one page at a time (keyset on submission time and id)."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if status is not None:
        query = query.where(Batch.status == status)
    if before is not None:
        anchor = find_batch(session, tenant_id, before)
        if anchor is None:
            return [], None
        query = query.where(tuple_(Batch.submitted_at, Batch.id) < (anchor.submitted_at, anchor.id))
    page = list(session.scalars(query.order_by(Batch.submitted_at.desc(), Batch.id.desc()).limit(limit + 1)))
    next_before = page[limit - 1].id if len(page) > limit else None
    return page[:limit], next_before
