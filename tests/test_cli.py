"""The `clientela` command line: idempotent migrations, tenant creation, required settings, priorities,
several receiver processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import lz4.frame
import orjson
import psutil
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.orm import Session

from api_stub.local_services import clientela_outcome, free_port, tail
from tests.conftest import Tenant
from tests.helpers import (
    created,
    reference_example,
    strip_ids,
    submit,
    unique_code,
    wait_for_batch,
    wait_until,
)
from tests.services import ClientelaProcess, PostgresServer, Server, Workers, clean_env, run_cli
from worker import batches
from worker.migrate import alembic_config


def test_migrate_is_idempotent(migrated: dict[str, str]) -> None:
    run_cli(["migrate"], migrated, timeout=120)
    run_cli(["migrate"], migrated, timeout=120)


def test_tenant_create_prints_one_json_line(migrated: dict[str, str]) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    out = run_cli(["tenant", "create", name], migrated)
    lines = out.strip().splitlines()
    assert len(lines) == 1
    data = json.loads(lines[0])
    assert set(data) == {"tenant", "subscriptionKey"}
    assert data["tenant"] == name
    assert len(data["subscriptionKey"]) >= 20
    other = json.loads(run_cli(["tenant", "create", f"{name}-2"], migrated))
    assert other["subscriptionKey"] != data["subscriptionKey"]


def test_serve_refuses_to_start_without_a_secret_key(migrated: dict[str, str], tmp_path: Path) -> None:
    env = {k: v for k, v in migrated.items() if k != "CLIENTELA_SECRET_KEY"}
    proc = clientela_outcome(["serve", "--host", "127.0.0.1", "--port", str(free_port())], env, tmp_path, 60)
    assert proc.returncode != 0
    assert "CLIENTELA_SECRET_KEY" in proc.stdout + proc.stderr


def test_the_worker_host_gives_up_cpu_priority(workers: Workers) -> None:
    """`clientela worker` runs at nice 10 by default, pool processes included; leading its own session (as
    the tests start it), its scheduling group does too, so the receiver on the same machine runs first."""
    for started in workers.processes:
        assert started.proc is not None
        host = psutil.Process(started.proc.pid)
        pool = host.children(recursive=True)
        assert pool, "the prefork pool has started"
        assert [p.nice() for p in [host, *pool]] == [10] * (1 + len(pool))
        autogroup = Path(f"/proc/{host.pid}/autogroup")
        if autogroup.exists():
            assert autogroup.read_text().split()[-1] == "10"


def insert_batch(conn: sa.Connection, tenant: uuid.UUID, name: str, batch: uuid.UUID, state: str) -> None:
    """A tenant and its batch, written as an older schema holds them; ``state`` gives the batch's status
    and counters (total, processed, created, failed, chunk_count, chunks_ended, chunks_failed) as SQL."""
    conn.execute(
        sa.text("INSERT INTO tenants (id, name, key_hash) VALUES (:t, :name, :t)"),
        {"t": tenant, "name": name},
    )
    conn.execute(
        sa.text(
            "INSERT INTO batches (id, tenant_id, contract, status, total, processed, created, failed,"
            " chunk_count, chunks_ended, chunks_failed, submitted_at)"
            f" VALUES (:b, :t, 'customers', {state}, now())"
        ),
        {"b": batch, "t": tenant},
    )


def test_migrations_keep_the_items_of_pending_chunks(
    postgres: PostgresServer, migrated: dict[str, str]
) -> None:
    """A chunk still pending when `clientela migrate` upgrades a schema of revision 0003 (which stored the
    items as a JSON array in text) keeps its items, in the form today's workers read (one per line, a line
    break between an item's tokens a space); a downgrade gives them back as an array in text."""
    name = f"upgrade_{uuid.uuid4().hex[:8]}"
    postgres.create_database(name)
    url = postgres.url(name)
    config = alembic_config(url)
    command.upgrade(config, "0003")
    first = '{"code": "Ñ-1", "name": "x", "quota": 9999999999999999.99}'
    second = '{"code": "Ñ-2",\n "name": "y, z"}'
    engine = sa.create_engine(url)
    tenant, batch, chunk = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        with engine.begin() as conn:
            insert_batch(conn, tenant, name, batch, "'QUEUED', 2, 0, 0, 0, 1, 0, 0")
            conn.execute(
                sa.text(
                    "INSERT INTO chunks (id, batch_id, seq, start_index, item_count, payload, duplicates,"
                    " status, attempts, available_at)"
                    " VALUES (:c, :b, 0, 0, 2, :items, '{}', 'PENDING', 0, now())"
                ),
                {"c": chunk, "b": batch, "items": f"[{first},{second}]"},
            )
        stored = sa.text("SELECT payload FROM chunks WHERE id = :c")

        run_cli(["migrate"], {**migrated, "CLIENTELA_DATABASE_URL": url}, timeout=120)
        with engine.connect() as conn:
            payload = lz4.frame.decompress(conn.execute(stored, {"c": chunk}).scalar_one())
        assert payload.decode() == f"{first}\n{second.replace(chr(10), ' ')}\n"

        command.downgrade(config, "0003")
        with engine.connect() as conn:
            assert (
                conn.execute(stored, {"c": chunk}).scalar_one() == f"[{first},{second.replace(chr(10), ' ')}]"
            )
    finally:
        engine.dispose()


def test_migrations_keep_the_results_of_ended_batches(
    postgres: PostgresServer, migrated: dict[str, str]
) -> None:
    """Results stored as one row per item (revision 0005) read the same after `clientela migrate` keeps them
    with their chunks, and come back as the same rows after a downgrade."""
    name = f"results_{uuid.uuid4().hex[:8]}"
    postgres.create_database(name)
    url = postgres.url(name)
    config = alembic_config(url)
    command.upgrade(config, "0005")
    tenant, batch, customer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    chunks = [uuid.uuid4(), uuid.uuid4()]
    rows = [
        {"idx": 0, "status": "CREATED", "code": "A-1", "customer_id": customer, "errors": None},
        {
            "idx": 1,
            "status": "FAILED",
            "code": None,
            "customer_id": None,
            "errors": '[{"field": "name", "message": "Field is required"}]',
        },
        {
            "idx": 2,
            "status": "UNPROCESSED",
            "code": None,
            "customer_id": None,
            "errors": '[{"message": "Item could not be processed"}]',
        },
    ]
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            insert_batch(conn, tenant, name, batch, "'FAILED', 3, 3, 1, 2, 2, 2, 1")
            for seq, (chunk, start, count, status) in enumerate(
                [(chunks[0], 0, 2, "DONE"), (chunks[1], 2, 1, "FAILED")]
            ):
                conn.execute(
                    sa.text(
                        "INSERT INTO chunks (id, batch_id, seq, start_index, item_count, duplicates,"
                        " status, attempts, available_at)"
                        " VALUES (:c, :b, :seq, :start, :n, '{}', :s, 1, now())"
                    ),
                    {"c": chunk, "b": batch, "seq": seq, "start": start, "n": count, "s": status},
                )
            conn.execute(
                sa.text(
                    "INSERT INTO item_results (batch_id, idx, status, code, customer_id, errors)"
                    " VALUES (:b, :idx, :status, :code, :customer_id, CAST(:errors AS json))"
                ),
                [{"b": batch, **row} for row in rows],
            )

        run_cli(["migrate"], {**migrated, "CLIENTELA_DATABASE_URL": url}, timeout=120)
        with Session(engine) as session:
            assert orjson.loads(orjson.dumps(batches.results_json(session, batch, statuses=None))) == [
                {"index": 0, "status": "CREATED", "code": "A-1", "customerId": str(customer)},
                {
                    "index": 1,
                    "status": "FAILED",
                    "errors": [{"field": "name", "message": "Field is required"}],
                },
                {"index": 2, "status": "UNPROCESSED", "errors": [{"message": "Item could not be processed"}]},
            ]
            assert batches.failed_items(session, batch) == [
                {"index": 1, "errors": [{"field": "name", "message": "Field is required"}]},
                {"index": 2, "errors": [{"message": "Item could not be processed"}]},
            ]

        command.downgrade(config, "0005")
        with engine.connect() as conn:
            back = conn.execute(
                sa.text(
                    "SELECT idx, status, code, customer_id, errors::text FROM item_results"
                    " WHERE batch_id = :b ORDER BY idx"
                ),
                {"b": batch},
            ).all()
        assert [(r[0], r[1], r[2], r[3], None if r[4] is None else json.loads(r[4])) for r in back] == [
            (
                row["idx"],
                row["status"],
                row["code"],
                row["customer_id"],
                row["errors"] and json.loads(row["errors"]),
            )
            for row in rows
        ]
    finally:
        engine.dispose()


def test_beat_leaves_no_schedule_file_behind(beat: Callable[..., ClientelaProcess], tmp_path: Path) -> None:
    """`clientela beat` keeps its schedule under TMPDIR while it runs and takes it along when it stops, so
    restarts do not pile files up there."""
    scheduler = beat(TMPDIR=str(tmp_path))
    deadline = time.monotonic() + 60
    while not any(path.is_file() for path in tmp_path.rglob("*")) and time.monotonic() < deadline:
        assert scheduler.running, tail(scheduler.log)
        time.sleep(0.2)
    assert any(path.is_file() for path in tmp_path.rglob("*")), "beat writes its schedule where TMPDIR says"
    scheduler.stop()
    assert list(tmp_path.iterdir()) == []


def test_serve_runs_several_receiver_processes_on_one_port(
    migrated: dict[str, str], tenant: Tenant, session_dir: Path
) -> None:
    """`clientela serve --processes 2` answers on one port from two processes; one that dies is replaced,
    and the port goes on answering meanwhile."""
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--processes", "2"]
    server = Server(ClientelaProcess("serve-processes", args, migrated, session_dir / "logs"), port)
    server.start()
    try:
        assert server.process.proc is not None
        supervisor = psutil.Process(server.process.proc.pid)
        receivers = wait_until(lambda: _receivers(supervisor, 2), 60, "two receiver processes")
        client = _client(server, tenant)
        codes = [[unique_code("RP") for _ in range(300)] for _ in range(4)]
        with ThreadPoolExecutor(len(codes)) as pool:
            ids = list(pool.map(lambda batch: submit(client, [_item(code) for code in batch]), codes))
        for batch_id, batch in zip(ids, codes, strict=True):
            body = wait_for_batch(client, batch_id)
            assert (body["status"], body["created"]) == ("COMPLETED", len(batch))
            assert strip_ids(body["results"]) == [created(i, code) for i, code in enumerate(batch)]

        # A connection kept open to the killed process dies with it; new ones go to the other.
        client.close()
        os.kill(receivers[0], signal.SIGKILL)
        client = _client(server, tenant)
        assert client.get("/healthz").status_code == 200
        replaced = wait_until(
            lambda: [pid for pid in _receivers(supervisor, 2) if pid not in receivers], 60, "a replacement"
        )
        assert _receivers(supervisor, 2) == sorted([receivers[1], *replaced])
        code = unique_code("RP")
        body = wait_for_batch(client, submit(client, [_item(code)]))
        assert strip_ids(body["results"]) == [created(0, code)]
        client.close()
    finally:
        server.stop()
    assert not supervisor.is_running() or supervisor.status() == psutil.STATUS_ZOMBIE


def _client(server: Server, tenant: Tenant) -> httpx.Client:
    """A new connection to ``server``, authenticated as ``tenant``."""
    return httpx.Client(base_url=server.base_url, headers=dict(tenant.client.headers), timeout=120)


def _receivers(supervisor: psutil.Process, count: int) -> list[int]:
    """The pids of the supervisor's receiver processes once they are ``count`` and each listens (else
    none)."""
    found = [
        child.pid
        for child in supervisor.children()
        if any(c.status == psutil.CONN_LISTEN for c in child.net_connections(kind="tcp"))
    ]
    return sorted(found) if len(found) == count else []


def _item(code: str) -> dict[str, object]:
    """The reference example's one customer, with another code."""
    [item] = json.loads(reference_example(code))
    return dict(item)


def test_embedded_mode_refuses_several_receiver_processes(tmp_path: Path) -> None:
    proc = clientela_outcome(
        ["serve", "--port", str(free_port()), "--processes", "2"], clean_env(), tmp_path, 60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "configuration error: embedded mode runs in one process; --processes above 1 needs "
        "CLIENTELA_DATABASE_URL and CLIENTELA_BROKER_URL"
    )
    assert not list(tmp_path.iterdir()), "nothing is created before the refusal"


def production_env(**overrides: str) -> dict[str, str]:
    """Settings of a deployment whose servers are never reached: the refusals below come first."""
    settings = {
        "CLIENTELA_DATABASE_URL": "postgresql+psycopg://clientela:pw@127.0.0.1:1/clientela",
        "CLIENTELA_BROKER_URL": "redis://127.0.0.1:1/0",
        "CLIENTELA_SECRET_KEY": "k" * 40,
    }
    return clean_env(**{**settings, **overrides})


@pytest.mark.parametrize(
    ("overrides", "command", "message"),
    [
        (
            {"CLIENTELA_DATABASE_URL": "mysql://u:p@127.0.0.1/x"},
            "migrate",
            "CLIENTELA_DATABASE_URL: must be a PostgreSQL URL, postgresql+psycopg://user:password@host:5432/database",
        ),
        (
            {"CLIENTELA_BROKER_URL": "http://127.0.0.1/"},
            "worker",
            "CLIENTELA_BROKER_URL: must be a Redis URL, redis://host:6379/0 (or rediss:// for TLS)",
        ),
        (
            {"CLIENTELA_SECRET_KEY": "short-but-secret"},
            "migrate",
            "CLIENTELA_SECRET_KEY must be a random string of at least 32 chars",
        ),
        (
            {"CLIENTELA_SECRET_KEY": " " * 40},
            "migrate",
            "CLIENTELA_SECRET_KEY must be a random string of at least 32 chars",
        ),
        (
            {"CLIENTELA_RECONCILE_INTERVAL_SECONDS": "inf"},
            "beat",
            "CLIENTELA_RECONCILE_INTERVAL_SECONDS: Input should be a finite number",
        ),
        (
            {"CLIENTELA_CHUNK_SIZE": "abc", "CLIENTELA_MAX_CHUNK_ATTEMPTS": "0"},
            "migrate",
            "CLIENTELA_CHUNK_SIZE: Input should be a valid integer, unable to parse string as an integer; "
            "CLIENTELA_MAX_CHUNK_ATTEMPTS: Input should be greater than or equal to 1",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_its_variable_never_its_value(
    tmp_path: Path, overrides: dict[str, str], command: str, message: str
) -> None:
    proc = clientela_outcome([command], production_env(**overrides), tmp_path, 60)
    assert (proc.returncode, proc.stderr.strip()) == (2, f"configuration error: {message}")
    assert "short-but-secret" not in proc.stdout + proc.stderr


def test_empty_urls_are_unset_ones(tmp_path: Path) -> None:
    """`CLIENTELA_DATABASE_URL=` is no URL: with the broker's empty too, that is embedded mode."""
    env = clean_env(CLIENTELA_DATABASE_URL="", CLIENTELA_BROKER_URL="")
    proc = clientela_outcome(["worker"], env, tmp_path, 60)
    assert proc.returncode == 2
    assert "embedded mode runs its worker and reconciler inside `clientela serve`" in proc.stderr


def test_a_database_that_cannot_be_used_is_one_line_without_its_password(tmp_path: Path) -> None:
    """Refused, or a server that never answers (a socket nobody reads): the command says which database
    and why within its connect timeout, and exits 1."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        for port, reason in (
            (free_port(), "Connection refused"),
            (silent.getsockname()[1], "timeout expired"),
        ):
            url = f"postgresql+psycopg://clientela:hunter2@127.0.0.1:{port}/clientela"
            started = time.monotonic()
            proc = clientela_outcome(["migrate"], production_env(CLIENTELA_DATABASE_URL=url), tmp_path, 60)
            assert proc.returncode == 1, proc.stderr
            [line] = proc.stderr.strip().splitlines()
            assert line.startswith(
                f"cannot use the database at postgresql+psycopg://clientela:***@127.0.0.1:{port}/"
            )
            assert reason in line
            assert "hunter2" not in proc.stdout + proc.stderr
            assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker"], "`clientela worker` needs CLIENTELA_DATABASE_URL and CLIENTELA_BROKER_URL"),
        (["beat"], "`clientela beat` needs CLIENTELA_DATABASE_URL and CLIENTELA_BROKER_URL"),
        (["tenant", "create", "   "], "a tenant name is 1 to 200 characters"),
        (["tenant", "create", "x" * 201], "a tenant name is 1 to 200 characters"),
        (["tenant", "create", "a\nb"], "a tenant name is 1 to 200 characters"),
        (["serve", "--port", "70000"], "Invalid value for '--port'"),
        (["worker", "--concurrency", "0"], "Invalid value for '--concurrency'"),
        (["worker", "--loglevel", "LOUD"], "Invalid value for '--loglevel'"),
    ],
)
def test_commands_refuse_what_cannot_work_in_embedded_mode(
    tmp_path: Path, args: list[str], message: str
) -> None:
    proc = clientela_outcome(args, clean_env(), tmp_path, 60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
