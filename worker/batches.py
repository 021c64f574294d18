"""Batches as the receiver stores them and as the status endpoints read them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
from sqlalchemy import CursorResult, delete, func, insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from worker.contracts import Contract
from worker.db import is_postgresql
from worker.models import Batch, BatchStatus, Chunk, IdempotencyKey, ItemResult, ItemStatus, Tenant

# How long an Idempotency-Key is remembered (the IETF httpapi draft leaves it to the server; 24 h is common).
IDEMPOTENCY_KEY_TTL = timedelta(hours=24)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _as_json_number(value: Any) -> orjson.Fragment:
    """Write a number back exactly as it was read (jiter's LosslessFloat keeps the original text)."""
    return orjson.Fragment(bytes(value))


_JSON_INT_RANGE = range(-(2**63), 2**64)


def _big_ints_as_text(value: Any) -> Any:
    """orjson refuses integers beyond 64 bits; JSON does not, so such numbers are written as their text."""
    if isinstance(value, int) and not isinstance(value, bool) and value not in _JSON_INT_RANGE:
        return orjson.Fragment(str(value))
    if isinstance(value, list):
        return [_big_ints_as_text(element) for element in value]
    if isinstance(value, dict):
        return {key: _big_ints_as_text(element) for key, element in value.items()}
    return value


def compact_json(items: Sequence[Any]) -> bytes:
    """Items as compact JSON with every number exactly as the client wrote it."""
    try:
        return orjson.dumps(items, default=_as_json_number)
    except orjson.JSONEncodeError:
        return orjson.dumps(_big_ints_as_text(items), default=_as_json_number)


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
    # FOR NO KEY UPDATE: it serializes submissions, yet does not wait for the chunk transactions, whose
    # customer inserts hold the tenant row's key-share lock through their foreign key.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True))
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


def submit_batch(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    contract: Contract,
    items: Sequence[Any],
    chunk_size: int,
    lease_seconds: int,
) -> Submission:
    """Store a batch, its chunks and the in-batch duplicate facts, in the caller's transaction.

    The first item with a key owns it; every later item with the same key is recorded as its duplicate, so
    the workers decide duplicates the same way whatever order the chunks run in.
    """
    now = utcnow()
    batch_id = uuid.uuid4()
    first_index: dict[str, int] = {}
    chunks: list[dict[str, Any]] = []
    for seq, start in enumerate(range(0, len(items), chunk_size)):
        part = items[start : start + chunk_size]
        duplicates: dict[str, int] = {}
        for position, item in enumerate(part):
            key = contract.key_of(item)
            if key is None:
                continue
            first = first_index.setdefault(key, start + position)
            if first != start + position:
                duplicates[str(position)] = first
        chunks.append(
            {
                "id": uuid.uuid4(),
                "batch_id": batch_id,
                "seq": seq,
                "start_index": start,
                "item_count": len(part),
                "payload": compact_json(part),
                "duplicates": duplicates,
                "available_at": now + timedelta(seconds=lease_seconds),
            }
        )
    session.add(
        Batch(
            id=batch_id,
            tenant_id=tenant_id,
            contract=contract.name,
            status=BatchStatus.QUEUED,
            total=len(items),
            processed=0,
            created=0,
            failed=0,
            chunk_count=len(chunks),
            chunks_ended=0,
            chunks_failed=0,
            submitted_at=now,
        )
    )
    session.flush()
    session.execute(insert(Chunk), chunks)
    return Submission(batch_id=batch_id, total=len(items), chunk_ids=[c["id"] for c in chunks])


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


def results(
    session: Session,
    batch_id: uuid.UUID,
    *,
    statuses: Sequence[str] | None,
    offset: int = 0,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The per-index outcomes in index order, as the status endpoint shows them."""
    query = (
        select(ItemResult.idx, ItemResult.status, ItemResult.code, ItemResult.customer_id, ItemResult.errors)
        .where(ItemResult.batch_id == batch_id)
        .order_by(ItemResult.idx)
        .offset(offset)
    )
    if statuses is not None:
        query = query.where(ItemResult.status.in_(statuses))
    if limit is not None:
        query = query.limit(limit)
    entries: list[dict[str, Any]] = []
    for idx, item_status, code, customer_id, errors in session.execute(query):
        entry: dict[str, Any] = {"index": idx, "status": item_status}
        if customer_id is not None:
            entry["code"] = code
            entry["customerId"] = str(customer_id)
        if errors:
            entry["errors"] = errors
        entries.append(entry)
    return entries


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
