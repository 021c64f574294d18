"""The HTTP surface: token, batch-create, batch status, batch list, one customer, health."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from decimal import Decimal
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api_stub.auth import authenticated_tenant, issue_token, tenant_for_key
from api_stub.envelope import check_content_type, parse_items, read_body
from api_stub.errors import ApiError, JSONBody
from worker import batches
from worker.config import get_settings
from worker.contracts import Contract
from worker.contracts.customer import CUSTOMER
from worker.db import get_engine, session_scope
from worker.models import Batch, BatchStatus
from worker.tasks import enqueue_chunks

log = logging.getLogger(__name__)

Tenant = Annotated[uuid.UUID, Depends(authenticated_tenant)]
ItemStatusFilter = Literal["CREATED", "FAILED", "UNPROCESSED"]
BatchStatusFilter = Literal["QUEUED", "RUNNING", "COMPLETED", "FAILED"]

_PREFER_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?(\d+)\"?\s*(?=$|[,;])", re.IGNORECASE)
# While a batch runs, pollers are asked to come back after this many seconds.
RETRY_AFTER_SECONDS = 1
# Parsing and storing a batch costs a few times its size in memory and a core while it lasts: a few at a
# time keep a burst of large bodies within bounds, and the others wait their turn with their bytes read.
STORES_AT_ONCE = 4
# A tenant over its in-progress limit is asked to come back after this many seconds: about the time the
# workers of a small deployment need to work off one full batch.
BACKPRESSURE_RETRY_AFTER_SECONDS = 5
# The IETF httpapi draft sends the key as a structured-field string ("…"); a bare value is taken as it is.
_IDEMPOTENCY_KEY = re.compile(r'"([\x20\x21\x23-\x7e]{1,255})"|([\x21\x23-\x7e][\x20\x21\x23-\x7e]{0,254})')

router = APIRouter()


@router.post("/v1/token")
async def token(request: Request) -> JSONBody:
    tenant_id = await tenant_for_key(request)
    settings = get_settings()
    return JSONBody(
        {
            "access_token": issue_token(tenant_id, settings),
            "token_type": "Bearer",
            "expires_in": settings.token_ttl_seconds,
        }
    )


@router.get("/healthz")
async def healthz() -> JSONBody:
    return JSONBody({"status": "ok"})


@router.get("/readyz")
async def readyz() -> JSONBody:
    checks = await run_in_threadpool(_readiness)
    ready = all(state == "ok" for state in checks.values())
    return JSONBody({"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503)


def _readiness() -> dict[str, str]:
    checks = {"database": "ok", "broker": "ok"}
    try:
        with get_engine().connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception:
        log.warning("readiness: database unreachable", exc_info=True)
        checks["database"] = "unreachable"
    broker_url = get_settings().broker_url
    if broker_url is not None:
        try:
            redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2).ping()
        except Exception:
            log.warning("readiness: broker unreachable", exc_info=True)
            checks["broker"] = "unreachable"
    return checks


def _idempotency_key(request: Request) -> str | None:
    raw = request.headers.get("idempotency-key")
    if raw is None:
        return None
    match = _IDEMPOTENCY_KEY.fullmatch(raw.strip())
    if match is None:
        raise ApiError(400, "Idempotency-Key must be 1 to 255 printable ASCII characters, without quotes")
    return match.group(1) or match.group(2)


def _prefer_wait(request: Request) -> int | None:
    """Seconds asked for with ``Prefer: wait=N`` (RFC 7240), capped at the configured maximum."""
    match = _PREFER_WAIT.search(request.headers.get("prefer", ""))
    if match is None:
        return None
    most = get_settings().max_prefer_wait_seconds
    # Any number of digits is a valid wait, but Python converts no more than 4,300 of them to an int.
    digits = match.group(1).lstrip("0")
    return most if len(digits) > len(str(most)) else min(int(digits or "0"), most)


def contract_routes(contract: Contract, prefix: str, noun: str) -> APIRouter:
    """The batch endpoints of one contract; the pipeline behind them is the same for every contract."""
    routes = APIRouter(prefix=prefix)
    not_found = f"{noun} not found"
    storing = asyncio.Semaphore(STORES_AT_ONCE)

    item_schema = contract.model.model_json_schema()
    body_schema = {
        "type": "array",
        "minItems": 1,
        "maxItems": get_settings().max_batch_items,
        "items": item_schema,
    }

    @routes.post(
        "/batch-create",
        status_code=202,
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}},
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "description": "Retries with the same key and body answer the batch stored first.",
                    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                }
            ],
        },
    )
    async def batch_create(request: Request, tenant_id: Tenant) -> JSONBody:
        settings = get_settings()
        check_content_type(request)
        key = _idempotency_key(request)
        wait = _prefer_wait(request)
        body = await read_body(request, settings.max_body_bytes)
        async with storing:
            submission = await run_in_threadpool(_store, body, tenant_id, key)
        if submission.chunk_ids:
            await run_in_threadpool(_enqueue, submission.chunk_ids)
        replayed = {"Idempotent-Replayed": "true"} if submission.replayed else {}
        accepted = JSONBody(
            {
                "statusCode": 202,
                "message": "Batch accepted",
                "batchId": str(submission.batch_id),
                "status": BatchStatus.QUEUED,
                "total": submission.total,
            },
            202,
            headers={"Location": f"{prefix}/batches/{submission.batch_id}", **replayed},
        )
        if not wait:
            return accepted
        outcome = await _wait_for_end(tenant_id, submission.batch_id, wait)
        if outcome is None:
            return accepted
        outcome.headers.update({"Preference-Applied": f"wait={wait}", **replayed})
        return outcome

    def _store(body: bytes, tenant_id: uuid.UUID, key: str | None) -> batches.Submission:
        """Store the batch; with an Idempotency-Key, answer with the batch an earlier request stored."""
        if key is None:
            return _store_new(body, tenant_id, None)
        fingerprint = hashlib.sha256(body).hexdigest()
        try:
            with session_scope() as session:
                earlier = batches.replay(session, tenant_id, key, fingerprint)
            if earlier is not None:
                return earlier
            try:
                return _store_new(body, tenant_id, (key, fingerprint))
            except batches.KeyTaken:
                # A concurrent request with the same key committed first: its batch is the answer.
                with session_scope() as session:
                    earlier = batches.replay(session, tenant_id, key, fingerprint)
        except batches.KeyReused:
            raise ApiError(422, "Idempotency-Key reused with a different payload") from None
        if earlier is None:
            raise ApiError(409, "A request with this Idempotency-Key is in progress; retry it")
        return earlier

    def _store_new(body: bytes, tenant_id: uuid.UUID, key: tuple[str, str] | None) -> batches.Submission:
        settings = get_settings()
        items = parse_items(body, settings.max_batch_items, contract)
        batch = batches.new_batch(
            contract=contract, items=items.elements, keys=items.keys, chunk_size=settings.chunk_size
        )
        with session_scope() as session:
            try:
                batches.reserve_capacity(session, tenant_id, batch.total, settings.max_items_in_progress)
            except batches.TooManyInProgress:
                raise ApiError(
                    429,
                    "Too many items in progress",
                    headers={"Retry-After": str(BACKPRESSURE_RETRY_AFTER_SECONDS)},
                ) from None
            submission = batches.store_batch(
                session, tenant_id=tenant_id, batch=batch, lease_seconds=settings.chunk_lease_seconds
            )
            if key is not None:
                batches.claim_key(session, tenant_id, *key, submission.batch_id)
            return submission

    async def _wait_for_end(tenant_id: uuid.UUID, batch_id: uuid.UUID, wait: int) -> JSONBody | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        pause = 0.05
        while True:
            outcome = await run_in_threadpool(_final_outcome, tenant_id, batch_id)
            remaining = deadline - loop.time()
            if outcome is not None or remaining <= 0:
                return outcome
            # The last look is taken at the deadline itself, so a batch ending just in time still counts.
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.5)

    def _final_outcome(tenant_id: uuid.UUID, batch_id: uuid.UUID) -> JSONBody | None:
        with session_scope() as session:
            batch = batches.find_batch(session, tenant_id, batch_id)
            if batch is None or batch.status not in BatchStatus.ENDED:
                return None
            if batch.status == BatchStatus.COMPLETED and batch.failed == 0:
                return JSONBody(
                    {
                        "statusCode": 201,
                        "message": "Customers created successfully",
                        "batchId": str(batch_id),
                    },
                    201,
                )
            return JSONBody(
                {
                    "statusCode": 422,
                    "batchId": str(batch_id),
                    "created": batch.created,
                    "errors": batches.failed_items(session, batch_id),
                },
                422,
            )

    @routes.get("/batches")
    async def list_batches(
        tenant_id: Tenant,
        status: BatchStatusFilter | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        before: uuid.UUID | None = None,
    ) -> JSONBody:
        def read() -> dict[str, Any]:
            with session_scope() as session:
                page, next_before = batches.list_batches(
                    session, tenant_id, status=status, limit=limit, before=before
                )
                return {
                    "batches": [batches.summary(batch) for batch in page],
                    "nextBefore": str(next_before) if next_before else None,
                }

        return JSONBody(await run_in_threadpool(read))

    @routes.get("/batches/{batch_id}")
    async def batch_status(
        batch_id: str,
        tenant_id: Tenant,
        status: ItemStatusFilter | None = None,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
    ) -> JSONBody:
        def read() -> JSONBody:
            with session_scope() as session:
                batch = _tenant_batch(session, tenant_id, batch_id)
                if batch.status not in BatchStatus.ENDED:
                    raise ApiError(
                        423,
                        "Resource is locked and cannot be accessed",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                        extra=batches.progress(batch),
                    )
                statuses = None if status is None else [status]
                # Past the last index every page is empty; the bound also keeps offset + limit within the
                # database's integers.
                start = min(offset, batch.total)
                entries = batches.results_json(
                    session, batch.id, statuses=statuses, offset=start, limit=limit
                )
                return JSONBody({**batches.summary(batch), "results": entries})

        return await run_in_threadpool(read)

    def _tenant_batch(session: Session, tenant_id: uuid.UUID, batch_id: str) -> Batch:
        try:
            parsed = uuid.UUID(batch_id)
        except ValueError:
            raise ApiError(404, "Batch not found") from None
        batch = batches.find_batch(session, tenant_id, parsed)
        if batch is None:
            raise ApiError(404, "Batch not found")
        return batch

    @routes.get("/{key:path}")
    async def record(key: str, tenant_id: Tenant) -> JSONBody:
        if "\x00" in key:
            # No stored text holds NUL (PostgreSQL's cannot), so no record has that key.
            raise ApiError(404, not_found)

        def read() -> dict[str, Any] | None:
            table = contract.table
            with session_scope() as session:
                row = session.execute(
                    select(table).where(table.c.tenant_id == tenant_id, table.c[contract.key] == key)
                ).one_or_none()
            if row is None:
                return None
            return _record_json(contract, row._mapping)

        found = await run_in_threadpool(read)
        if found is None:
            raise ApiError(404, not_found)
        return JSONBody(found)

    return routes


def _record_json(contract: Contract, row: Any) -> dict[str, Any]:
    """Every field of the table; decimals as strings with their scale so that no client rounds them."""
    document: dict[str, Any] = {"customerId": str(row["id"])}
    for spec in contract.fields:
        value = row[spec.name]
        if isinstance(value, Decimal):
            value = f"{value:.{getattr(spec, 'scale', 0)}f}"
        document[spec.name] = value
    document["batchId"] = str(row["batch_id"])
    document["createdAt"] = batches.iso(row["created_at"])
    return document


def _enqueue(chunk_ids: list[uuid.UUID]) -> None:
    """Send the chunk messages; if the broker is unreachable the batch is still stored, and the
    reconciler enqueues it once the lease runs out."""
    try:
        enqueue_chunks(chunk_ids)
    except Exception:
        log.warning("enqueue failed for %d chunks; the reconciler will retry", len(chunk_ids), exc_info=True)


router.include_router(contract_routes(CUSTOMER, "/v1/customers", "Customer"))
