"""The `clientela` command line: idempotent migrations, tenant creation, required settings, priorities."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import lz4.frame
import psutil
import sqlalchemy as sa
from alembic import command

from api_stub.local_services import clientela_command, free_port, tail
from tests.services import ClientelaProcess, PostgresServer, Workers, run_cli
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
    proc = subprocess.run(
        [clientela_command(), "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
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


def test_migrations_keep_the_items_of_pending_chunks(
    postgres: PostgresServer, migrated: dict[str, str]
) -> None:
    """A chunk still pending when `clientela migrate` upgrades a schema of revision 0003 (which stored the
    items as text) keeps its items, in the form today's workers read; a downgrade gives them back as text."""
    name = f"upgrade_{uuid.uuid4().hex[:8]}"
    postgres.create_database(name)
    url = postgres.url(name)
    config = alembic_config(url)
    command.upgrade(config, "0003")
    items = '[{"code": "Ñ-1", "name": "x", "quota": 9999999999999999.99}]'
    engine = sa.create_engine(url)
    tenant, batch, chunk = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO tenants (id, name, key_hash) VALUES (:t, :name, :t)"),
                {"t": tenant, "name": name},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO batches (id, tenant_id, contract, status, total, processed, created, failed,"
                    " chunk_count, chunks_ended, chunks_failed, submitted_at)"
                    " VALUES (:b, :t, 'customers', 'QUEUED', 1, 0, 0, 0, 1, 0, 0, now())"
                ),
                {"b": batch, "t": tenant},
            )
            conn.execute(
                sa.text(
                    "INSERT INTO chunks (id, batch_id, seq, start_index, item_count, payload, duplicates,"
                    " status, attempts, available_at)"
                    " VALUES (:c, :b, 0, 0, 1, :items, '{}', 'PENDING', 0, now())"
                ),
                {"c": chunk, "b": batch, "items": items},
            )
        stored = sa.text("SELECT payload FROM chunks WHERE id = :c")

        run_cli(["migrate"], {**migrated, "CLIENTELA_DATABASE_URL": url}, timeout=120)
        with engine.connect() as conn:
            assert lz4.frame.decompress(conn.execute(stored, {"c": chunk}).scalar_one()) == items.encode()

        command.downgrade(config, "0003")
        with engine.connect() as conn:
            assert conn.execute(stored, {"c": chunk}).scalar_one() == items
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
