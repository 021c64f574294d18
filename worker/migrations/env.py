"""Alembic environment: the URL comes from clientela's settings, the metadata from its models."""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

import worker.contracts  # noqa: F401  (registers the contracts' tables on the metadata)
from worker.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
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
