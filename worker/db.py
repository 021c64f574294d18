"""Engine and sessions: one engine per process, created lazily so that forked workers build their own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from worker.config import get_settings

CONNECT_TIMEOUT_SECONDS = 10

_engine: Engine | None = None
_engine_pid: int | None = None
_sessions: sessionmaker[Session] | None = None
# PostgreSQL settings every new connection of this process starts with (see use_server_settings).
_server_settings: dict[str, str] = {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the status endpoint read while the in-process worker writes; busy_timeout waits for the lock.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def build_engine(url: str, server_settings: dict[str, str] | None = None) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    options = " ".join(f"-c {name}={value}" for name, value in (server_settings or {}).items())
    # hide_parameters: a failed statement's error must not carry customer data or secrets into the logs.
    return create_engine(
        url,
        pool_size=5,
        max_overflow=10,
        pool_pre_ping=True,
        pool_recycle=1800,
        hide_parameters=True,
        # A server that never answers must fail a command or a request, not hang it.
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            **({"options": options} if options else {}),
        },
    )


def use_server_settings(settings: dict[str, str]) -> None:
    """Open this process's connections with these PostgreSQL settings from now on."""
    global _engine
    _server_settings.clear()
    _server_settings.update(settings)
    if _engine is not None:
        _engine.dispose(close=False)
        _engine = None


def get_engine() -> Engine:
    """The process's engine; a forked child gets a fresh one instead of sharing its parent's sockets."""
    global _engine, _engine_pid, _sessions
    if _engine is None or _engine_pid != os.getpid():
        if _engine is not None:
            _engine.dispose(close=False)
        _engine = build_engine(get_settings().sqlalchemy_url, _server_settings)
        _engine_pid = os.getpid()
        _sessions = sessionmaker(_engine, expire_on_commit=False)
    return _engine


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: committed when the block ends normally, rolled back when it raises."""
    get_engine()
    assert _sessions is not None
    with _sessions.begin() as session:
        yield session


def connect() -> Connection:
    """A connection from the process's pool, for Core statements and transactions of the caller's own
    (``with connect() as connection, connection.begin(): …``)."""
    return get_engine().connect()


def is_postgresql(bind: Session | Connection | Engine) -> bool:
    dialect = bind.get_bind().dialect if isinstance(bind, Session) else bind.dialect
    return dialect.name == "postgresql"
