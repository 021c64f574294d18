"""The pipeline's guarantees under faults: whatever dies, freezes or is delivered twice mid-stream, every
accepted item ends with exactly one result and every created customer is stored exactly once.

Each fault hits a stream of 50,000 mixed items (five 10,000-item batches over two tenants) run through a
private stack: its own receiver, Redis, two workers and beat, with a 5 s lease and a 1 s reconciler, on the
session's PostgreSQL, so that killing things never disturbs the session's processes. `check_stream` proves
the same invariants after every fault and prints one figure line per fault:
``<fault> | items=<n> | lost=<n> | duplicated=<n> | recovery=<s>s | all ended=<s>s``, where recovery is the
time from the fault until a chunk whose attempt began after the fault completes, and all ended the time
from the fault until the last batch of the stream ended."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import celery
import httpx
import psutil
import pytest
import sqlalchemy as sa

from tests.conftest import Tenant
from tests.helpers import (
    Payload,
    mixed_payload,
    post_batch,
    run_batch,
    stored_results,
    strip_ids,
    submit,
    wait_until,
)
from tests.report import figure
from tests.services import (
    ClientelaProcess,
    PostgresServer,
    RedisServer,
    Server,
    Workers,
    start_server,
)
from worker.reconciler import CHUNK_TRANSACTION

LEASE_SECONDS = 5
# Low, so that a poison chunk gives up within seconds; the faults below cost a chunk an attempt or two.
MAX_ATTEMPTS = 3
STREAM_BATCHES = 10
# Chunks of a few hundred milliseconds, so that a fault aimed at a running chunk has time to land in it.
CHUNK_SIZE = 2_500
BATCH_ITEMS = 10_000
# The stream submits a batch at most this often, so that it still runs when the second fault of a test
# comes: unpaced, the workers finish 50,000 items within seconds of the last POST.
SUBMIT_EVERY = 1.0
# In-batch duplicates across chunks (index -> first occurrence), away from the existing codes at the end.
DUPLICATES = {2_500: 1_500, 5_000: 4_999, 9_990: 10}
# Items processed before a fault is injected: the stream is well under way, and most of it still to come.
FAULT_AFTER = 5_000
# How long a stream may take to end after its fault (healthy, it takes about ten seconds).
END_WITHIN = 240
QUEUE = "ingest"
UNPROCESSED = [{"message": "Item could not be processed"}]
TASK_LINE = re.compile(r"Task clientela\.process_chunk\[([0-9a-f-]+)\] (\w+)")
CHUNK_RUN = re.compile(r"Task clientela\.process_chunk\[[0-9a-f-]+\] succeeded in [0-9.e-]+s: '(\w+)'")

Db = Callable[..., list[Any]]


@dataclass
class Stack:
    redis: RedisServer
    server: Server
    workers: Workers
    beat: ClientelaProcess

    def client_for(self, tenant: Tenant) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, headers=tenant.client.headers, timeout=120)

    def ensure_running(self) -> None:
        """Bring back whatever an earlier test left dead, so each test starts on a whole stack."""
        if self.redis.proc is None or self.redis.proc.poll() is not None:
            self.redis.start()
        if not self.server.process.running:
            self.server.start()
        if not self.beat.running:
            self.beat.start()
        self.workers.start()


@pytest.fixture(scope="module")
def stack(
    migrated: dict[str, str], session_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A separate receiver + Redis + 2 workers + beat on the session's database, shared by this module."""
    redis = RedisServer(tmp_path_factory.mktemp("faults") / "redis")
    started: list[Any] = []
    try:
        redis.start()
        started.append(redis)
        env = {
            **migrated,
            "CLIENTELA_BROKER_URL": redis.url,
            "CLIENTELA_CHUNK_LEASE_SECONDS": str(LEASE_SECONDS),
            "CLIENTELA_RECONCILE_INTERVAL_SECONDS": "1",
            "CLIENTELA_MAX_CHUNK_ATTEMPTS": str(MAX_ATTEMPTS),
            "CLIENTELA_CHUNK_SIZE": str(CHUNK_SIZE),
        }
        logs = session_dir / "logs"
        server = start_server("faults-server", env, logs)
        started.append(server)
        workers = Workers(env, logs, count=2)
        for p in workers.processes:
            p.name = f"faults-{p.name}"
        started.append(workers)
        workers.start()
        beat = ClientelaProcess("faults-beat", ["beat"], env, logs)
        started.append(beat)
        beat.start()
        yield Stack(redis, server, workers, beat)
    finally:
        for thing in reversed(started):
            thing.stop()


@pytest.fixture
def faults(stack: Stack) -> Stack:
    stack.ensure_running()
    return stack


# ----- processes, by the pids the tests started


def pool_children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (a worker's prefork pool), read from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def main_pid(p: ClientelaProcess) -> int:
    assert p.running, f"{p.name} is not running"
    assert p.proc is not None
    return p.proc.pid


@contextlib.contextmanager
def frozen(*processes: ClientelaProcess) -> Iterator[None]:
    """SIGSTOP each process's group (main process and pool children), SIGCONT on the way out."""
    groups = [main_pid(p) for p in processes]
    for group in groups:
        os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        for group in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGCONT)


def log_size(p: ClientelaProcess) -> int:
    return p.log.stat().st_size if p.log.exists() else 0


def log_since(p: ClientelaProcess, offset: int) -> str:
    with p.log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def chunk_in_flight(p: ClientelaProcess, offset: int = 0) -> str | None:
    """The task id of the chunk the worker is running, from its log (since `offset` and its last start):
    received and not yet ended. With one pool process and a prefetch of one, only the last chunk task it
    received can be running."""
    text = log_since(p, offset)
    text = text[max(text.rfind("----- start #"), 0) :]
    last: tuple[str, str] | None = None
    for match in TASK_LINE.finditer(text):
        if match[2] == "received" or (last is not None and match[1] == last[0]):
            last = (match[1], match[2])
    return last[0] if last is not None and last[1] == "received" else None


def wait_in_flight(stream: Stream, db: Db, worker: ClientelaProcess, offset: int = 0) -> str:
    """Wait until the worker runs a chunk while at least a batch of the stream is still to be processed."""
    deadline = time.monotonic() + 120
    while True:
        task = chunk_in_flight(worker, offset)
        if task:
            return task
        mid_stream = stream.processed(db) < stream.items - 2 * CHUNK_SIZE
        assert mid_stream, f"{worker.name} not seen running a chunk while the stream ran"
        assert time.monotonic() < deadline, f"{worker.name} not seen running a chunk within 120s"
        time.sleep(0.02)


def now() -> datetime:
    return datetime.now(UTC)


# ----- the stream of batches


@dataclass
class Accepted:
    """A batch the receiver accepted, with the end status and per-index results it must reach."""

    tenant: Tenant
    batch_id: str
    expected: list[dict[str, Any]]
    status: str = "COMPLETED"


def submit_until_accepted(client: httpx.Client, body: str, retry_for: float = 120) -> tuple[str, int]:
    """POST a batch until it is accepted, as a careful client does: the same Idempotency-Key on every
    retry, so that an answer lost after the commit cannot store the batch twice. Returns the batch id and
    the number of retries it took."""
    key = uuid.uuid4().hex
    deadline = time.monotonic() + retry_for
    retries = 0
    while True:
        try:
            r = post_batch(client, raw=body, headers={"Idempotency-Key": key})
            if r.status_code == 202:
                return str(r.json()["batchId"]), retries
            retry, last = r.status_code >= 500 or r.status_code == 409, f"{r.status_code} {r.text[:300]}"
        except httpx.TransportError as exc:
            retry, last = True, repr(exc)
        assert retry, f"batch refused: {last}"
        assert time.monotonic() < deadline, f"batch not accepted within {retry_for}s: {last}"
        time.sleep(0.5)
        retries += 1


class Stream:
    """Batches submitted one after the other from a thread, while the workers process the earlier ones."""

    def __init__(self, stack: Stack, tenants: list[Tenant], existing: dict[str, list[str]], tag: str) -> None:
        self.stack = stack
        self.plan: list[tuple[Tenant, Payload]] = []
        for i in range(STREAM_BATCHES):
            tenant = tenants[i % len(tenants)]
            self.plan.append(
                (tenant, mixed_payload(BATCH_ITEMS, f"{tag}{i}", existing[tenant.id], DUPLICATES))
            )
        self.tenant_ids = [t.id for t in tenants]
        self.accepted: list[Accepted] = []
        self.retries = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._submit_all, name=f"stream-{tag}", daemon=True)

    @property
    def items(self) -> int:
        return sum(len(payload.items) for _, payload in self.plan)

    def _submit_all(self) -> None:
        try:
            bodies = [json.dumps(payload.items) for _, payload in self.plan]
            started = time.monotonic()
            for i, ((tenant, payload), body) in enumerate(zip(self.plan, bodies, strict=True)):
                time.sleep(max(0.0, started + i * SUBMIT_EVERY - time.monotonic()))
                with self.stack.client_for(tenant) as client:
                    batch_id, retries = submit_until_accepted(client, body)
                self.retries += retries
                self.accepted.append(Accepted(tenant, batch_id, payload.expected))
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> Stream:
        self.thread.start()
        return self

    def join(self) -> list[Accepted]:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive(), "the stream's submissions did not end"
        if self.errors:
            raise self.errors[0]
        assert len(self.accepted) == len(self.plan)
        return self.accepted

    def processed(self, db: Db) -> int:
        [(n,)] = db(
            "SELECT coalesce(sum(processed), 0) FROM batches WHERE tenant_id = ANY(CAST(:t AS uuid[]))",
            t=self.tenant_ids,
        )
        return int(n)

    def wait_processed(self, db: Db, at_least: int = FAULT_AFTER) -> None:
        wait_until(lambda: self.processed(db) >= at_least, 120, f"{at_least} items of the stream processed")


def seed_codes(stack: Stack, tenant: Tenant) -> list[str]:
    """Codes the tenant already has, so that every batch of the stream also meets 'Code already exists'."""
    codes = [f"S{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    with stack.client_for(tenant) as client:
        body = run_batch(client, [{"code": c, "name": "Seed"} for c in codes])
    assert (body["status"], body["created"]) == ("COMPLETED", 3), body
    return codes


def new_stream(stack: Stack, make_tenant: Callable[[], Tenant], tag: str) -> Stream:
    tenants = [make_tenant(), make_tenant()]
    existing = {t.id: seed_codes(stack, t) for t in tenants}
    return Stream(stack, tenants, existing, f"{tag}{uuid.uuid4().hex[:5]}")


# ----- the invariants every fault must keep

BATCH_STATS = """
SELECT id::text AS id, tenant_id::text AS tenant_id, status, total, processed, created, failed, completed_at
FROM batches WHERE id = ANY(CAST(:ids AS uuid[]))
"""


@dataclass
class StoredResults:
    """What a batch's chunks keep as its results, counted."""

    results: int
    indexes: int
    first: int
    last: int
    created: set[tuple[str, str, str]]

    @classmethod
    def of(cls, db: Db, batch_id: str) -> StoredResults:
        entries = stored_results(db, batch_id)
        indexes = [entry["index"] for entry in entries]
        return cls(
            results=len(entries),
            indexes=len(set(indexes)),
            first=min(indexes, default=0),
            last=max(indexes, default=-1),
            created={
                (batch_id, entry["code"], entry["customerId"])
                for entry in entries
                if entry["status"] == "CREATED"
            },
        )


def unfinished(db: Db, ids: list[str]) -> int:
    [(n,)] = db(
        "SELECT count(*) FROM batches "
        "WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('QUEUED', 'RUNNING')",
        ids=ids,
    )
    return int(n)


def resumed_after(db: Db, ids: list[str], moment: datetime) -> float | None:
    """Seconds from `moment` until a chunk whose (last) attempt began after it ended; a chunk's attempt
    sets its lease to start + lease, so `available_at` tells when the attempt began."""
    [(first,)] = db(
        "SELECT min(ended_at) FROM chunks WHERE batch_id = ANY(CAST(:ids AS uuid[])) AND status = 'DONE' "
        "AND available_at >= :since",
        ids=ids,
        since=moment + timedelta(seconds=LEASE_SECONDS),
    )
    return None if first is None else (first - moment).total_seconds()


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def check_stream(name: str, stack: Stack, db: Db, batches: list[Accepted], fault_at: list[datetime]) -> None:
    """Wait for the batches to end, print the fault's figure line, then check every invariant: each batch
    ended as expected, each item has exactly one result (the expected one), each created customer exists
    exactly once and matches its CREATED result, and the counters agree with the results."""
    ids = [b.batch_id for b in batches]
    deadline = time.monotonic() + END_WITHIN
    while unfinished(db, ids) and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = {row.id: row for row in db(BATCH_STATS, ids=ids)}
    stored = {batch_id: StoredResults.of(db, batch_id) for batch_id in stats}
    created_results = set().union(*(s.created for s in stored.values()))
    customers = {
        tuple(row)
        for row in db(
            "SELECT batch_id::text, code, id::text FROM customers WHERE batch_id = ANY(CAST(:ids AS uuid[]))",
            ids=ids,
        )
    }
    tenant_ids = sorted({b.tenant.id for b in batches})
    per_tenant = db(
        "SELECT tenant_id::text, count(*), count(DISTINCT code) FROM customers "
        "WHERE tenant_id = ANY(CAST(:t AS uuid[])) GROUP BY tenant_id",
        t=tenant_ids,
    )
    items = sum(len(b.expected) for b in batches)
    lost = sum(len(b.expected) - (stored[b.batch_id].indexes if b.batch_id in stored else 0) for b in batches)
    lost += len(created_results - customers)
    duplicated = sum(s.results - s.indexes for s in stored.values())
    duplicated += sum(count - distinct for _, count, distinct in per_tenant) + len(
        customers - created_results
    )
    ended = [s.completed_at for s in stats.values()]
    all_ended = None if None in ended or not ended else (max(ended) - fault_at[0]).total_seconds()
    recoveries = [resumed_after(db, ids, moment) for moment in fault_at]
    recovery = None if None in recoveries else max(r for r in recoveries if r is not None)
    figure(
        "fault",
        f"{name} | items={items} | lost={lost} | duplicated={duplicated} | recovery={seconds(recovery)}s "
        f"| all ended={seconds(all_ended)}s",
    )

    assert unfinished(db, ids) == 0, f"{name}: batches still not ended {END_WITHIN}s after the fault"
    assert (lost, duplicated) == (0, 0), name
    assert customers == created_results
    for b in batches:
        s, kept = stats[b.batch_id], stored[b.batch_id]
        created = sum(1 for e in b.expected if e["status"] == "CREATED")
        assert s.status == b.status
        assert kept.results == kept.indexes == s.total == s.processed == len(b.expected)
        assert (kept.first, kept.last) == (0, len(b.expected) - 1)
        assert s.created == len(kept.created) == created
        assert s.failed == s.total - created
        with stack.client_for(b.tenant) as client:
            r = client.get(f"/v1/customers/batches/{b.batch_id}")
        assert r.status_code == 200, r.text[:300]
        body = r.json()
        assert (body["status"], body["processed"], body["created"]) == (b.status, len(b.expected), created)
        assert strip_ids(body["results"]) == b.expected
    for _, count, distinct in per_tenant:
        assert count == distinct


# ----- the five faults


# The statements of the transaction that counts a chunk's attempt, before the one that does the chunk.
COUNTING_AN_ATTEMPT = ("UPDATE chunks SET attempts=%", "UPDATE batches SET status=%, started_at=%")


def holds_chunk_transaction(
    db: Db, pid: int, begun_before: datetime | None = None, *, past_its_count: bool = False
) -> bool:
    """Whether the process has a chunk's transaction open in PostgreSQL (begun before the given moment);
    with `past_its_count`, the transaction that does the chunk, not the one that counts its attempt (which,
    ended unfinished, leaves the attempt uncounted)."""
    try:
        ports = [c.laddr.port for c in psutil.Process(pid).net_connections("tcp")]
    except psutil.Error:
        return False
    counting = " AND query NOT LIKE ALL(CAST(:counting AS text[]))" if past_its_count else ""
    [(open_,)] = db(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = :name "
        "AND client_port = ANY(CAST(:ports AS int[])) AND xact_start < :before" + counting,
        name=CHUNK_TRANSACTION,
        ports=ports,
        before=begun_before or now(),
        **({"counting": list(COUNTING_AN_ATTEMPT)} if past_its_count else {}),
    )
    return bool(open_)


def in_chunk_transaction(db: Db, pid: int, timeout: float = 2) -> bool:
    """Whether the process gets into a chunk's transaction within `timeout` seconds: killed before that,
    it may not have told Celery yet that it took its task."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if holds_chunk_transaction(db, pid):
            return True
        time.sleep(0.01)
    return False


def kill_child_mid_chunk(stream: Stream, db: Db, worker: ClientelaProcess) -> datetime:
    """SIGKILL the worker's pool child while it runs a chunk (seen by Celery as WorkerLostError)."""
    pid = main_pid(worker)
    for _ in range(10):
        mark = log_size(worker)
        wait_in_flight(stream, db, worker)
        [child] = wait_until(lambda: pool_children(pid), 30, f"{worker.name}'s pool child")
        if not in_chunk_transaction(db, child):
            continue
        moment = now()
        os.kill(child, signal.SIGKILL)
        # Celery sees the loss at once (WorkerLostError), or now and then only when the task's time limit
        # comes: either way the chunk is handed out again.
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda m=mark: re.search("WorkerLostError|Hard time limit", log_since(worker, m)),
                LEASE_SECONDS + 2,
                "Celery saw it",
                pause=0.2,
            )
            return moment
    raise AssertionError(f"{worker.name}'s pool child never killed mid-chunk")


@pytest.mark.slow
def test_worker_child_then_main_process_sigkilled_mid_stream(
    faults: Stack, make_tenant: Callable[[], Tenant], db: Db
) -> None:
    stream = new_stream(faults, make_tenant, "K").start()
    first, second = faults.workers.processes
    stream.wait_processed(db)
    child_killed = kill_child_mid_chunk(stream, db, first)
    ids = [b.batch_id for b in stream.accepted]
    wait_until(lambda: resumed_after(db, ids, child_killed) is not None, 60, "chunks completing again")

    # Now the other worker's main process, mid-chunk; its orphaned pool child is ours to clean up.
    wait_in_flight(stream, db, second)
    pid = main_pid(second)
    orphans = pool_children(pid)
    main_killed = now()
    os.kill(pid, signal.SIGKILL)
    assert second.proc is not None
    second.proc.wait(timeout=10)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not any(alive(o) for o in orphans), 15, "orphans exit")
    for orphan in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    faults.workers.start()

    check_stream("worker child + main SIGKILL", faults, db, stream.join(), [child_killed, main_killed])


@pytest.mark.slow
def test_redis_killed_and_restarted_empty_mid_stream(
    faults: Stack, make_tenant: Callable[[], Tenant], db: Db
) -> None:
    stream = new_stream(faults, make_tenant, "R").start()
    stream.wait_processed(db)
    moment = now()
    faults.redis.restart_empty()
    check_stream("redis kill -9 + restart empty", faults, db, stream.join(), [moment])

    # The receiver and the workers keep working with the restarted Redis.
    again = mixed_payload(50, f"RA{uuid.uuid4().hex[:6]}", [], {40: 2})
    with faults.client_for(stream.plan[0][0]) as client:
        body = run_batch(client, again.items)
    assert strip_ids(body["results"]) == again.expected


@pytest.mark.slow
def test_postgres_stopped_immediately_and_restarted_mid_stream(
    faults: Stack,
    postgres: PostgresServer,
    server: Server,
    tenant: Tenant,
    make_tenant: Callable[[], Tenant],
    db: Db,
) -> None:
    stream = new_stream(faults, make_tenant, "P").start()
    # Early, so that the later batches are submitted while PostgreSQL is down.
    stream.wait_processed(db, at_least=1_000)
    moment = now()
    try:
        postgres.stop_immediate()
        time.sleep(2)
    finally:
        if postgres.proc is None:
            postgres.launch()
    batches = stream.join()
    check_stream("postgres stop -m immediate + start", faults, db, batches, [moment])
    figure("fault detail", f"postgres down: {stream.retries} submission retries until accepted")

    # Every session process works again: the session's receiver is ready and its workers process a batch.
    wait_until(
        lambda: httpx.get(f"{server.base_url}/readyz", timeout=10).status_code == 200,
        60,
        "the session receiver ready again",
        pause=0.5,
    )
    again = mixed_payload(50, f"PS{uuid.uuid4().hex[:6]}", [], {40: 2})
    body = run_batch(tenant.client, again.items)
    assert body["status"] == "COMPLETED"
    assert strip_ids(body["results"]) == again.expected


@pytest.mark.slow
def test_every_chunk_delivered_twice_at_once(
    faults: Stack, make_tenant: Callable[[], Tenant], db: Db
) -> None:
    stream = new_stream(faults, make_tenant, "D")
    faults.workers.stop()
    # No reconciler while the queue is replaced: chunks pending past their lease would be enqueued again
    # in between, and the queue would not hold exactly the two copies of each.
    faults.beat.stop()
    batches = stream.start().join()
    ids = [b.batch_id for b in batches]
    chunk_ids = [
        row[0]
        for row in db(
            "SELECT c.id::text FROM chunks c JOIN batches b ON b.id = c.batch_id "
            "WHERE c.batch_id = ANY(CAST(:ids AS uuid[])) ORDER BY b.submitted_at, c.seq",
            ids=ids,
        )
    ]
    assert len(chunk_ids) == STREAM_BATCHES * BATCH_ITEMS // CHUNK_SIZE
    # The queue is first in, first out: copies published behind the receiver's messages would only arrive
    # once their chunk is done. Replace the queue with two adjacent copies of each chunk's message, so
    # that the two workers take the two copies of a chunk at the same moment.
    broker = faults.redis.client()
    assert broker.llen(QUEUE) >= len(chunk_ids)
    broker.delete(QUEUE)
    publisher = celery.Celery(broker=faults.redis.url)
    try:
        for chunk_id in chunk_ids:
            for _ in range(2):
                publisher.send_task("clientela.process_chunk", args=[chunk_id], queue=QUEUE)
    finally:
        publisher.close()
    assert broker.llen(QUEUE) == 2 * len(chunk_ids)
    marks = [log_size(p) for p in faults.workers.processes]
    moment = now()
    faults.workers.start()
    faults.beat.start()

    check_stream("same chunk delivered twice at once", faults, db, batches, [moment])
    logs = "".join(log_since(p, mark) for p, mark in zip(faults.workers.processes, marks, strict=True))
    runs = CHUNK_RUN.findall(logs)
    done, skipped = runs.count("done"), runs.count("skipped")
    [(both,)] = db(
        "SELECT count(*) FROM chunks WHERE id = ANY(CAST(:c AS uuid[])) AND attempts > 1", c=chunk_ids
    )
    figure(
        "fault detail",
        f"same chunk delivered twice: {done} chunk runs done, {skipped} copies skipped, {both} chunks "
        "claimed by both copies",
    )
    assert done == len(chunk_ids)
    assert skipped >= len(chunk_ids)
    # Both workers ran chunks and skipped copies: the two copies of a chunk met in both directions.
    for p, mark in zip(faults.workers.processes, marks, strict=True):
        assert set(CHUNK_RUN.findall(log_since(p, mark))) >= {"done", "skipped"}, p.name


def handed_out_again(db: Db, stream: Stream, since: datetime) -> int:
    """Chunks of the stream that ended after `since` on a second (or later) attempt."""
    [(n,)] = db(
        "SELECT count(*) FROM chunks c JOIN batches b ON b.id = c.batch_id "
        "WHERE b.tenant_id = ANY(CAST(:t AS uuid[])) AND c.attempts > 1 AND c.ended_at > :since",
        t=stream.tenant_ids,
        since=since,
    )
    return int(n)


@pytest.mark.slow
def test_frozen_worker_outlives_its_lease(faults: Stack, make_tenant: Callable[[], Tenant], db: Db) -> None:
    """A worker frozen mid-chunk (SIGSTOP of its process group) past the lease: PostgreSQL ends its
    transaction, the reconciler hands the chunk out again and the other worker does it while the first is
    still frozen; thawed, the first one must not write it a second time."""
    stream = new_stream(faults, make_tenant, "F").start()
    stuck, _ = faults.workers.processes
    stream.wait_processed(db)
    stopped: datetime | None = None
    while stopped is None:
        wait_in_flight(stream, db, stuck)
        with frozen(stuck):
            moment = now()
            time.sleep(1)
            # Its chunk transaction, begun before the freeze and still open: the worker stopped mid-chunk.
            children = pool_children(main_pid(stuck))
            if any(holds_chunk_transaction(db, child, moment, past_its_count=True) for child in children):
                stopped = moment
                wait_until(
                    lambda m=moment: (
                        now() - m > timedelta(seconds=LEASE_SECONDS + 1) and handed_out_again(db, stream, m)
                    ),
                    60,
                    "the frozen worker's chunk done by the other worker",
                    pause=0.2,
                )
        # Caught between two transactions: let it get into the next one before trying again.
        time.sleep(0.2)
    check_stream("worker frozen past its lease (SIGSTOP/SIGCONT)", faults, db, stream.join(), [stopped])


# ----- poison chunks and a deploy


def unprocessed(payload: Payload, start: int, stop: int) -> list[dict[str, Any]]:
    return [
        {"index": e["index"], "status": "UNPROCESSED", "errors": UNPROCESSED}
        if start <= e["index"] < stop
        else e
        for e in payload.expected
    ]


@pytest.mark.slow
def test_poison_chunk_that_kills_its_worker_every_time_is_given_up(
    faults: Stack, make_tenant: Callable[[], Tenant], db: Db, engine: sa.Engine
) -> None:
    """The test holds an uncommitted customer with the code of an item of the middle chunk: the worker's
    INSERT … ON CONFLICT waits on it until Celery's hard time limit SIGKILLs the pool child. After
    MAX_ATTEMPTS such crashes the chunk is given up (its items UNPROCESSED) without touching customers,
    and the workers live on."""
    tenant = make_tenant()
    payload = mixed_payload(3 * CHUNK_SIZE, f"PB{uuid.uuid4().hex[:6]}", [], {5 * CHUNK_SIZE // 2: 7})
    blocked = payload.items[3 * CHUNK_SIZE // 2]["code"]
    assert payload.expected[3 * CHUNK_SIZE // 2]["status"] == "CREATED"
    workers = faults.workers.processes
    pids = [main_pid(p) for p in workers]
    children = [set(pool_children(pid)) for pid in pids]
    marks = [log_size(p) for p in workers]
    with engine.connect() as blocker, faults.client_for(tenant) as client:
        # Submitted first (the uncommitted row's foreign key share-locks the tenant, which the receiver
        # locks to count its items in progress), while the workers are frozen so none starts before it.
        with frozen(*workers):
            submitted = now()
            batch_id = submit(client, payload.items)
            blocker.execute(
                sa.text(
                    "INSERT INTO customers (id, tenant_id, batch_id, created_at, code, name) "
                    "VALUES (:id, CAST(:t AS uuid), :id, now(), :code, 'blocker')"
                ),
                {"id": uuid.uuid4(), "t": tenant.id, "code": blocked},
            )
        batch = Accepted(tenant, batch_id, unprocessed(payload, CHUNK_SIZE, 2 * CHUNK_SIZE), "FAILED")
        wait_until(lambda: not unfinished(db, [batch.batch_id]), 120, "the poisoned batch ended", pause=0.2)
        blocker.rollback()
    [(status, attempts)] = db(
        "SELECT status, attempts FROM chunks WHERE batch_id = CAST(:b AS uuid) AND seq = 1", b=batch.batch_id
    )
    logs = [log_since(p, mark) for p, mark in zip(workers, marks, strict=True)]
    crashes = sum(text.count("Hard time limit") for text in logs)
    lives = [main_pid(p) for p in workers]
    figure(
        "fault detail",
        f"poison chunk (insert blocked, pool child SIGKILLed by the time limit) | attempts={attempts} "
        f"(max {MAX_ATTEMPTS}) | crashes={crashes} | chunk={status} | batch ended after "
        f"{seconds((now() - submitted).total_seconds())}s | worker pids unchanged={lives == pids}",
    )
    check_stream("poison chunk (killed by the time limit)", faults, db, [batch], [submitted])
    assert (status, attempts) == ("FAILED", MAX_ATTEMPTS + 1)
    assert crashes == MAX_ATTEMPTS
    assert lives == pids
    crashed = [i for i, text in enumerate(logs) if "Hard time limit" in text]
    for i in crashed:
        wait_until(
            lambda i=i: (now_children := set(pool_children(pids[i]))) and not now_children & children[i],
            30,
            f"{workers[i].name}'s killed pool child replaced",
        )
    [(stored,)] = db(
        "SELECT count(*) FROM customers WHERE tenant_id = CAST(:t AS uuid) AND code = :c",
        t=tenant.id,
        c=blocked,
    )
    assert stored == 0

    # The workers that crashed still take work: later batches are processed, by each of them. A worker
    # whose pool child was just replaced may need a few seconds before it takes a message again, while
    # the other one works a small batch off in a fraction of a second: send batches for up to 30 s.
    waiting = set(crashed)
    deadline = time.monotonic() + 30
    with faults.client_for(tenant) as client:
        for _ in range(30):
            if time.monotonic() > deadline:
                break
            marks = [log_size(p) for p in workers]
            later = mixed_payload(2 * CHUNK_SIZE, f"PL{uuid.uuid4().hex[:6]}", [], {})
            body = run_batch(client, later.items)
            assert strip_ids(body["results"]) == later.expected
            waiting -= {i for i in waiting if ": 'done'" in log_since(workers[i], marks[i])}
            if not waiting:
                break
    assert not waiting, f"{[workers[i].name for i in waiting]} took no chunk after crashing"


@pytest.mark.slow
def test_poison_chunk_that_cannot_be_read_is_given_up(
    faults: Stack, make_tenant: Callable[[], Tenant], db: Db, engine: sa.Engine
) -> None:
    """A chunk whose stored items cannot be read (corrupted on purpose) fails on every attempt: after
    MAX_ATTEMPTS the batch ends FAILED with that chunk's items UNPROCESSED, instead of looping forever."""
    tenant = make_tenant()
    payload = mixed_payload(3 * CHUNK_SIZE, f"PC{uuid.uuid4().hex[:6]}", [], {})
    with faults.client_for(tenant) as client, frozen(*faults.workers.processes):
        submitted = now()
        batch = Accepted(
            tenant, submit(client, payload.items), unprocessed(payload, CHUNK_SIZE, 2 * CHUNK_SIZE), "FAILED"
        )
        with engine.begin() as conn:
            corrupted = conn.execute(
                sa.text("UPDATE chunks SET payload = :p WHERE batch_id = CAST(:b AS uuid) AND seq = 1"),
                {"p": b"\\ not json", "b": batch.batch_id},
            ).rowcount
        assert corrupted == 1
    check_stream("poison chunk (unreadable payload)", faults, db, [batch], [submitted])
    [(status, attempts)] = db(
        "SELECT status, attempts FROM chunks WHERE batch_id = CAST(:b AS uuid) AND seq = 1", b=batch.batch_id
    )
    assert (status, attempts) == ("FAILED", MAX_ATTEMPTS + 1)


@pytest.mark.slow
def test_worker_sigterm_mid_chunk_loses_and_duplicates_nothing(
    faults: Stack, make_tenant: Callable[[], Tenant], db: Db
) -> None:
    """A deploy stops a worker with SIGTERM while it runs a chunk: Celery's warm shutdown finishes the chunk
    (or gives it back); a new worker takes over and nothing is lost or duplicated."""
    stream = new_stream(faults, make_tenant, "T").start()
    leaving, _ = faults.workers.processes
    stream.wait_processed(db)
    mark = log_size(leaving)
    task = wait_in_flight(stream, db, leaving, mark)
    moment = now()
    os.kill(main_pid(leaving), signal.SIGTERM)
    assert leaving.proc is not None
    code = leaving.proc.wait(timeout=60)
    tail = log_since(leaving, mark)
    finished = f"process_chunk[{task}] succeeded" in tail
    faults.workers.start()
    check_stream("worker SIGTERM (deploy)", faults, db, stream.join(), [moment])
    figure(
        "fault detail",
        f"worker SIGTERM: exit code {code}, chunk in flight "
        f"{'finished by the warm shutdown' if finished else 'handed back'}",
    )
    assert code == 0
    assert "Warm shutdown" in tail
