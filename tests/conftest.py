"""Session fixtures: a private PostgreSQL and Redis, a migrated database, a running receiver and two
Celery worker processes, all started here and stopped by pid at the end of the session.

A missing service binary skips the suite locally and fails it when CI=true.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from api_stub.local_services import ServiceUnavailable
from tests.report import FIGURES
from tests.services import (
    LOG_FILES,
    ClientelaProcess,
    PostgresServer,
    RedisServer,
    Server,
    Workers,
    clean_env,
    create_tenant,
    run_cli,
    start_server,
    tail,
)

SECRET_KEY = "test-secret-key-0123456789abcdef-0123456789abcdef"
CHUNK_SIZE = 1000
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"required service missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and call.when in ("setup", "call"):
        for name, path in LOG_FILES:
            report.sections.append((f"log tail: {name} ({path})", tail(path, 40)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("measured figures")
    width = max(len(section) for section, _ in FIGURES)
    for section, text in FIGURES:
        terminalreporter.write_line(f"{section:<{width}}  {text}")


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="clientela-tests-"))
    yield path
    if not os.environ.get("CLIENTELA_TESTS_KEEP_LOGS"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running(service: PostgresServer | RedisServer) -> Iterator[None]:
    """Start a private service for the session (skip, or fail in CI, if its binary is missing); stop it."""
    try:
        service.start()
    except ServiceUnavailable as exc:
        service.stop()
        unavailable(str(exc))
    except BaseException:
        service.stop()
        raise
    try:
        yield
    finally:
        service.stop()


@pytest.fixture(scope="session")
def postgres(session_dir: Path) -> Iterator[PostgresServer]:
    pg = PostgresServer(session_dir / "postgres")
    with running(pg):
        yield pg


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(session_dir / "redis")
    with running(server):
        yield server


@pytest.fixture(scope="session")
def database_url(postgres: PostgresServer) -> str:
    postgres.create_database("clientela")
    return postgres.url("clientela")


@pytest.fixture(scope="session")
def env(database_url: str, redis_server: RedisServer) -> dict[str, str]:
    """The environment every clientela process of the session runs with."""
    return clean_env(
        CLIENTELA_DATABASE_URL=database_url,
        CLIENTELA_BROKER_URL=redis_server.url,
        CLIENTELA_SECRET_KEY=SECRET_KEY,
        CLIENTELA_CHUNK_SIZE=str(CHUNK_SIZE),
    )


@pytest.fixture(scope="session")
def migrated(env: dict[str, str]) -> dict[str, str]:
    try:
        run_cli(["migrate"], env, timeout=120)
    except ServiceUnavailable as exc:
        unavailable(str(exc))
    return env


@pytest.fixture(scope="session")
def engine(migrated: dict[str, str]) -> Iterator[sa.Engine]:
    eng = sa.create_engine(migrated["CLIENTELA_DATABASE_URL"], pool_pre_ping=True)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def server(migrated: dict[str, str], session_dir: Path) -> Iterator[Server]:
    srv = start_server("server", migrated, session_dir / "logs")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def session_workers(migrated: dict[str, str], session_dir: Path) -> Iterator[Workers]:
    workers = Workers(migrated, session_dir / "logs", count=2)
    try:
        workers.start()
        yield workers
    finally:
        workers.stop()


@pytest.fixture
def workers(session_workers: Workers) -> Iterator[Workers]:
    """The two worker processes, running when the test starts and again when it ends."""
    session_workers.start()
    yield session_workers
    session_workers.start()


@pytest.fixture
def stopped_workers(workers: Workers) -> Workers:
    """The workers, stopped for the test (they are started again afterwards by `workers`)."""
    workers.stop()
    return workers


class Tenant:
    """A fresh tenant: its subscription key, an access token and an authenticated HTTP client."""

    def __init__(self, name: str, key: str, token: str, base_url: str) -> None:
        self.name = name
        self.key = key
        self.token = token
        self.id = str(jwt.decode(token, options={"verify_signature": False})["sub"])
        self.client = httpx.Client(
            base_url=base_url,
            headers={"Ocp-Apim-Subscription-Key": key, "Authorization": f"Bearer {token}"},
            timeout=120,
        )


@pytest.fixture
def make_tenant(server: Server, migrated: dict[str, str]) -> Iterator[Callable[[], Tenant]]:
    created: list[Tenant] = []

    def make() -> Tenant:
        name = f"t-{uuid.uuid4().hex[:12]}"
        data = create_tenant(name, migrated)
        assert data["tenant"] == name
        key = data["subscriptionKey"]
        r = httpx.post(f"{server.base_url}/v1/token", headers={"Ocp-Apim-Subscription-Key": key}, timeout=30)
        assert r.status_code == 200, r.text
        tenant = Tenant(name, key, r.json()["access_token"], server.base_url)
        created.append(tenant)
        return tenant

    yield make
    for t in created:
        with contextlib.suppress(Exception):
            t.client.close()


@pytest.fixture
def tenant(make_tenant: Callable[[], Tenant], workers: Workers) -> Tenant:
    return make_tenant()


@pytest.fixture
def db(engine: sa.Engine) -> Callable[..., list[Any]]:
    """Run one read-only SQL statement against the test database and return its rows."""

    def query(sql: str, **params: Any) -> list[Any]:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    return query


@pytest.fixture
def extra_server(migrated: dict[str, str], session_dir: Path) -> Iterator[Callable[..., Server]]:
    """Start another `clientela serve` with some settings changed; stopped after the test."""
    started: list[Server] = []

    def start(name: str, **overrides: str) -> Server:
        env = {**migrated, **overrides}
        srv = start_server(name, env, session_dir / "logs")
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def beat(migrated: dict[str, str], session_dir: Path) -> Iterator[Callable[..., ClientelaProcess]]:
    """Start `clientela beat` (the reconciler) with extra settings; stopped after the test."""
    started: list[ClientelaProcess] = []

    def start(**overrides: str) -> ClientelaProcess:
        proc = ClientelaProcess("beat", ["beat"], {**migrated, **overrides}, session_dir / "logs")
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
