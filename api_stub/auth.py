"""Tenants, subscription keys and access tokens.

A request to ``/v1/customers…`` carries the tenant's subscription key and a bearer token issued for that
same tenant by ``POST /v1/token``. Keys are stored as SHA-256 digests; tokens are HS256 JWTs.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import timedelta

import jwt
from fastapi import Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from api_stub.errors import UNAUTHORIZED, ApiError
from worker.batches import utcnow
from worker.config import Settings, get_settings
from worker.db import session_scope
from worker.models import Tenant

KEY_HEADER = "Ocp-Apim-Subscription-Key"
ALGORITHM = "HS256"


class TenantExists(Exception):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(name: str) -> str:
    """Create a tenant and return its subscription key, which is shown once and never stored in clear."""
    key = secrets.token_urlsafe(32)
    try:
        with session_scope() as session:
            session.add(Tenant(name=name, key_hash=hash_key(key)))
    except IntegrityError:
        raise TenantExists(name) from None
    return key


def _tenant_for_key(key: str) -> uuid.UUID | None:
    with session_scope() as session:
        return session.scalar(select(Tenant.id).where(Tenant.key_hash == hash_key(key)))


async def tenant_for_key(request: Request) -> uuid.UUID:
    key = request.headers.get(KEY_HEADER)
    if not key:
        raise ApiError(401, UNAUTHORIZED)
    tenant_id = await run_in_threadpool(_tenant_for_key, key)
    if tenant_id is None:
        raise ApiError(401, UNAUTHORIZED)
    return tenant_id


def issue_token(tenant_id: uuid.UUID, settings: Settings) -> str:
    now = utcnow()
    claims = {"sub": str(tenant_id), "iat": now, "exp": now + timedelta(seconds=settings.token_ttl_seconds)}
    return jwt.encode(claims, settings.signing_key(), algorithm=ALGORITHM)


async def authenticated_tenant(request: Request) -> uuid.UUID:
    """The tenant of the subscription key, if the bearer token was issued to that same tenant."""
    tenant_id = await tenant_for_key(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, UNAUTHORIZED)
    try:
        claims = jwt.decode(
            token.strip(),
            get_settings().signing_key(),
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"]},
        )
    except jwt.PyJWTError:
        raise ApiError(401, UNAUTHORIZED) from None
    if claims["sub"] != str(tenant_id):
        raise ApiError(401, UNAUTHORIZED)
    return tenant_id
