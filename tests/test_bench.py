"""`clientela bench` as a user runs it: it completes against real services, prints its table and one JSON
line of consistent figures, and leaves no process it started behind. Speed is never asserted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from api_stub.bench import fill_shared_buffers, recycle_wal
from api_stub.local_services import ServiceUnavailable, clientela_command, postgres_bindir
from tests.conftest import SECRET_KEY, running, unavailable
from tests.services import REPO, PostgresServer, RedisServer, clean_env

FIGURE_NAMES = [
    "end-to-end rate",
    "COPY ceiling (same rows, binary)",
    "end-to-end / COPY ceiling",
    "text COPY (same rows)",
    "end-to-end / text COPY",
    "POST accepted p50",
    "POST accepted p99",
    "status p50",
    "status p99",
    "worker peak RSS",
    "429 answers",
    "items created / failed",
]
POSITIVE = [
    "items_per_second",
    "copy_rows_per_second",
    "ratio",
    "text_copy_rows_per_second",
    "text_ratio",
    "post_p50_ms",
    "post_p99_ms",
    "status_p50_ms",
    "status_p99_ms",
    "worker_peak_rss_mb",
    "elapsed_seconds",
    "created",
    "failed",
]
# Every process the bench starts inherits its environment: this variable finds them all afterwards.
MARKER = "CLIENTELA_TESTS_BENCH_RUN"


def processes_marked(marker: str) -> list[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get(MARKER) == marker and process.status() != psutil.STATUS_ZOMBIE:
                found.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])}")
        except psutil.Error:
            continue
    return found


def bench_ended(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run the bench until it exits; return its exit code, standard output and standard error, once every
    process it started has ended too."""
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [clientela_command(), "bench", *args, "--json"],
        env={**env, MARKER: marker},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # SIGTERM, as Ctrl-C: the bench stops what it started before it exits.
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=90)
        pytest.fail(f"the bench did not end in 240 s:\n{stdout}\n{stderr}")
    deadline = time.monotonic() + 10
    while (left := processes_marked(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"processes the bench started are still running: {left}"
    return proc.returncode, stdout, stderr


def run_bench(args: list[str], env: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """Run the bench to its end; return its standard output and its JSON figures."""
    code, stdout, stderr = bench_ended(args, env)
    assert code == 0, f"exit {code}\n{stdout}\n{stderr}"

    # One warm-up batch per producer, of a chunk per worker process.
    assert re.search(r"warm-up: 2 batches of [\d,]+ items sent at once, completed before timing", stdout)
    for name in FIGURE_NAMES:
        assert name in stdout, f"{name!r} missing from the table:\n{stdout}"
    last = stdout.strip().splitlines()[-1]
    figures: dict[str, Any] = json.loads(last)
    return stdout, figures


def check_figures(figures: dict[str, Any], batches: int, items: int) -> None:
    assert figures["batches"] == batches
    assert figures["items"] == batches * items
    assert figures["created"] + figures["failed"] == figures["items"]
    # The COPY ceiling writes again exactly the rows the pipeline created.
    assert figures["copy_rows"] == figures["created"]
    for key in POSITIVE:
        assert figures[key] > 0, (key, figures)
    # Each format's ceiling is the median of its passes, and the share is the rate over it.
    for prefix in ("", "text_"):
        assert figures[f"{prefix}ratio"] == pytest.approx(
            figures["items_per_second"] / figures[f"{prefix}copy_rows_per_second"], rel=1e-3, abs=1e-4
        )
        passes = figures[f"{prefix}copy_passes_rows_per_second"]
        assert len(passes) == 3
        assert all(rate > 0 for rate in passes)
        assert figures[f"{prefix}copy_rows_per_second"] == pytest.approx(sorted(passes)[1], rel=1e-3)
    assert figures["post_p50_ms"] <= figures["post_p99_ms"]
    assert figures["status_p50_ms"] <= figures["status_p99_ms"]
    assert figures["throttled"] >= 0
    # Where the CPU went: each process group the bench started, and itself, did work in the timed run.
    cpu = figures["cpu_us_per_item"]
    for group in ("worker_host", "receiver", "bench_client"):
        assert cpu[group] > 0, cpu
    assert 0 < figures["cpu_busy"] <= 1
    # Below 10,000 items per batch the size-bound targets are not judged; the others are, either way.
    assert figures["met"]["post_p99_ms"] is None
    assert figures["met"]["status_p99_ms"] is None
    assert isinstance(figures["met"]["items_per_second"], bool)
    assert isinstance(figures["met"]["worker_peak_rss_mb"], bool)


def test_bench_makes_wal_files_ready_ahead_of_its_server(postgres: PostgresServer) -> None:
    """What the timed run will write finds WAL files ready, as on a server in service, instead of the
    server adding (zero-filling) each one while the clock runs."""
    database = f"wal_{uuid.uuid4().hex[:8]}"
    postgres.create_database(database)
    # More than the few files a server keeps on its own after a checkpoint (min_wal_size is 80 MB).
    wanted = 256 * 2**20
    ahead = recycle_wal(postgres.url(database), wanted)
    assert ahead >= wanted // (16 * 2**20)


def _shared_memory_in_use() -> int:
    """Bytes of shared memory the kernel holds in pages, all processes together (/proc/meminfo)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("/proc/meminfo has no Shmem line")


def test_bench_has_every_shared_buffer_of_its_server_used_once(session_dir: Path) -> None:
    """A new server's shared buffers are memory the kernel has not handed out yet: the bench's step takes
    every one of them once, as a server in service has, instead of the timed run faulting them in."""
    buffers = 64 * 2**20
    pg = PostgresServer(
        session_dir / f"fill-{uuid.uuid4().hex[:8]}", settings={"shared_buffers": "64MB", "fsync": "off"}
    )
    with running(pg):
        pg.create_database("fill")
        before = _shared_memory_in_use()
        pages = fill_shared_buffers(pg.url("fill"))
        grown = _shared_memory_in_use() - before
    assert pages == buffers // 8192
    # Other processes of the machine may hold or free a little shared memory meanwhile.
    assert grown >= buffers * 3 // 4
    assert grown <= buffers * 2


def given_services(postgres: PostgresServer, redis_server: RedisServer, database: str) -> dict[str, str]:
    """The environment that points the bench at the suite's servers."""
    return clean_env(
        CLIENTELA_DATABASE_URL=postgres.url(database),
        # Another Redis database, so that the session's own workers do not take the bench's messages.
        CLIENTELA_BROKER_URL=redis_server.url.removesuffix("/0") + "/3",
        CLIENTELA_SECRET_KEY=SECRET_KEY,
    )


def test_bench_on_given_postgres_and_redis(postgres: PostgresServer, redis_server: RedisServer) -> None:
    database = f"bench_{uuid.uuid4().hex[:8]}"
    postgres.create_database(database)
    env = given_services(postgres, redis_server, database)
    stdout, figures = run_bench(["--batches", "3", "--items", "2000", "--processes", "1"], env)
    assert "services: given: PostgreSQL 127.0.0.1" in stdout
    # A server the bench did not start is not its to measure.
    assert "postgresql" not in figures["cpu_us_per_item"]
    check_figures(figures, batches=3, items=2000)
    assert "statements" not in figures
    assert "time by statement" not in stdout


def test_bench_statements_refused_by_a_server_that_does_not_count_them(
    postgres: PostgresServer, redis_server: RedisServer
) -> None:
    env = given_services(postgres, redis_server, "postgres")
    code, stdout, stderr = bench_ended(["--batches", "1", "--items", "100", "--statements"], env)
    assert code == 1, f"exit {code}\n{stdout}\n{stderr}"
    assert (
        "bench failed: --statements needs pg_stat_statements in shared_preload_libraries of 127.0.0.1:"
        in stderr
    ), stderr
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_bench_starts_and_stops_its_own_services() -> None:
    try:
        postgres_bindir()
    except ServiceUnavailable as exc:
        unavailable(str(exc))
    if shutil.which("redis-server") is None:
        unavailable("redis-server not found")
    stdout, figures = run_bench(
        ["--batches", "1", "--items", "500", "--processes", "1", "--statements"], clean_env()
    )
    assert "fsync=on synchronous_commit=on" in stdout
    # The server's own account of the run: every created record went through the one COPY per chunk.
    assert "PostgreSQL's time by statement over the timed run (pg_stat_statements)" in stdout
    copies = [s for s in figures["statements"] if s["query"].startswith("COPY customers ")]
    assert len(copies) == 1, figures["statements"]
    assert copies[0]["rows"] == figures["created"]
    assert copies[0]["calls"] == 1
    assert not any("pg_stat_statements" in s["query"] for s in figures["statements"])
    assert figures["cpu_us_per_item"]["postgresql"] > 0
    check_figures(figures, batches=1, items=500)
    # Redis overwrites its environment with its process title, so its port tells whether it still runs.
    services = re.search(
        r"services: private: PostgreSQL 127\.0\.0\.1:(\d+), Redis 127\.0\.0\.1:(\d+)", stdout
    )
    assert services is not None, stdout
    ports = {int(port) for port in services.groups()}
    listening = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert not ports & listening, f"private servers still listening on {ports & listening}"
