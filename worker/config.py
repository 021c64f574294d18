"""Settings: one object, built once from the CLIENTELA_* environment.

With neither ``CLIENTELA_DATABASE_URL`` nor ``CLIENTELA_BROKER_URL`` set, clientela runs in embedded mode:
a SQLite file and a generated secret in the data directory, and an in-process broker.
"""

from __future__ import annotations

import logging
import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_SECRET_LENGTH = 32
_PLACEHOLDER_SECRETS = {"changethis", "change-me", "changeme", "secret"}
EMBEDDED_BROKER_URL = "memory://localhost/"
DATABASE_SCHEME = "postgresql+psycopg://"
# SQLAlchemy reads these as psycopg2, which is not installed; psycopg 3 takes the same URLs.
_POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
BROKER_SCHEMES = ("redis://", "rediss://", "redis+socket://")


class Settings(BaseSettings):
    # An empty variable is an unset one: `CLIENTELA_DATABASE_URL=` in a shell or a compose file means none.
    model_config = SettingsConfigDict(env_prefix="CLIENTELA_", extra="ignore", env_ignore_empty=True)

    database_url: str | None = None
    broker_url: str | None = None
    secret_key: str | None = None
    data_dir: Path = Path()

    chunk_size: int = Field(default=1000, ge=1, le=10_000)
    max_batch_items: int = 10_000
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # A chunk claimed or enqueued longer ago than this is handed out again by the reconciler.
    # At most a day, already longer than a lost chunk should wait; the task time limit follows from it.
    chunk_lease_seconds: int = Field(default=60, ge=2, le=86_400)
    reconcile_interval_seconds: float = Field(default=10.0, gt=0, le=3_600, allow_inf_nan=False)
    # Attempts after which a chunk that keeps failing is given up and its items marked UNPROCESSED.
    max_chunk_attempts: int = Field(default=5, ge=1)
    # Items a tenant may have accepted but not yet processed; past it batch-create answers 429.
    max_items_in_progress: int = Field(default=200_000, ge=1)
    token_ttl_seconds: int = 3600
    max_prefer_wait_seconds: int = 60

    @property
    def embedded(self) -> bool:
        return self.database_url is None and self.broker_url is None

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'clientela.db').resolve()}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or EMBEDDED_BROKER_URL

    @property
    def task_time_limit_seconds(self) -> int:
        # Below the lease, so a chunk still running cannot be handed to a second worker by the reconciler.
        return max(1, self.chunk_lease_seconds - 1)

    @field_validator("database_url")
    @classmethod
    def _postgresql_with_psycopg(cls, url: str | None) -> str | None:
        if url is None:
            return None
        url = url.strip()
        for scheme in _POSTGRESQL_SCHEMES:
            if url.startswith(scheme):
                return DATABASE_SCHEME + url.removeprefix(scheme)
        if not url.startswith(DATABASE_SCHEME):
            raise ValueError(f"must be a PostgreSQL URL, {DATABASE_SCHEME}user:password@host:5432/database")
        return url

    @field_validator("broker_url")
    @classmethod
    def _redis(cls, url: str | None) -> str | None:
        if url is None:
            return None
        url = url.strip()
        if not url.startswith(BROKER_SCHEMES):
            raise ValueError("must be a Redis URL, redis://host:6379/0 (or rediss:// for TLS)")
        return url

    @model_validator(mode="after")
    def _secret_required_outside_embedded(self) -> Settings:
        if self.embedded:
            return self
        if self.database_url is None or self.broker_url is None:
            raise ValueError(
                "set both CLIENTELA_DATABASE_URL and CLIENTELA_BROKER_URL, or neither (embedded mode)"
            )
        if not self.secret_key:
            raise ValueError(
                "CLIENTELA_SECRET_KEY is required when CLIENTELA_DATABASE_URL or BROKER_URL is set"
            )
        secret = self.secret_key.strip()
        if secret.lower() in _PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"CLIENTELA_SECRET_KEY must be a random string of at least {MIN_SECRET_LENGTH} chars"
            )
        return self

    def signing_key(self) -> str:
        """The token-signing secret; in embedded mode generated once and kept in the data directory."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "clientela.secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(48))
        return path.read_text().strip()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def configure_logging() -> None:
    """Log lines with time, level and logger to stderr, once per process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
