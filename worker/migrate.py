"""Schema upgrades through Alembic, applied by ``clientela migrate`` (and by embedded ``serve`` itself)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from worker.config import get_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", (url or get_settings().sqlalchemy_url).replace("%", "%%"))
    return config


def upgrade(url: str | None = None) -> None:
    """Bring the schema to the newest revision; running it again changes nothing."""
    command.upgrade(alembic_config(url), "head")
