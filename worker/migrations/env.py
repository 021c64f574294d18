"""Alembic environment: the URL comes from clientela's settings, the metadata from its models."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

import worker.contracts  # noqa: F401  (registers the contracts' tables on the metadata)
from worker.db import CONNECT_TIMEOUT_SECONDS
from worker.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    section = config.get_section(config.config_ini_section, {})
    postgresql = not section["sqlalchemy.url"].startswith("sqlite")
    connectable = engine_from_config(
        section,
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS} if postgresql else {},
    )
    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
