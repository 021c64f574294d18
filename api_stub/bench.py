"""``clientela bench``: measure a deployment end to end and print the figures next to their targets.

The bench runs its own receiver and one worker host as subprocesses, on the PostgreSQL and Redis named by
``CLIENTELA_DATABASE_URL`` and ``CLIENTELA_BROKER_URL`` (a Redis database no other worker consumes), or
else on private ones it starts and stops. It
submits generated batches over HTTP, waits until every batch has ended, proves that every result is the
expected one, and measures in the same database the ceiling: a raw COPY of the same rows. Speed is printed,
never asserted: the exit code says whether the run completed with the right results.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import psycopg
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from api_stub.local_services import (
    CommandFailed,
    PostgresServer,
    RedisServer,
    ServiceUnavailable,
    clientela_command,
    free_port,
    run_clientela,
    tail,
    terminate,
)
from worker.config import get_settings
from worker.contracts.customer import CUSTOMER

# Durable, as production is, with room for bulk loading: large WAL and rare checkpoints.
BULK_LOAD_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "30min",
    "max_connections": "100",
}

TARGET_ITEMS_PER_SECOND = 25_000
TARGET_CEILING_SHARE = 0.40
TARGET_POST_P99_MS = 250
TARGET_STATUS_P99_MS = 150
TARGET_WORKER_RSS_MB = 300
# The POST and status targets are for batches of this size; smaller batches are measured but not judged.
TARGET_BATCH_ITEMS = 10_000

INVALID_SHARE = 0.05
DUPLICATE_SHARE = 0.02
EXISTING_PER_BATCH = 3
STATUS_SAMPLES = 20
# Passes of the COPY ceiling, each about a second of one core; their median is the ceiling.
CEILING_PASSES = 3
POLL_SECONDS = 0.1
# The batch list is polled during the timed run as often as a running batch's 423 asks pollers to come back
# (Retry-After: 1): the run ends at the workers' completedAt, so polling more often only loads the receiver.
RUN_POLL_SECONDS = 1.0
SAMPLE_SECONDS = 0.2
END_DEADLINE_SECONDS = 600
READY_SECONDS = 90
HTTP_TIMEOUT = 120
BATCH_LIST_LIMIT = 500
MB = 1_000_000
# WAL files made ready for the timed run, per item sent: a 20 x 10,000 run writes about 0.9 KiB per item.
WAL_PER_ITEM = 2048

COPY_COLUMNS = ["id", "tenant_id", "batch_id", "created_at", *CUSTOMER.field_names]


class BenchError(RuntimeError):
    """The run could not complete, or its results are not the expected ones."""


@dataclass(frozen=True)
class BenchOptions:
    batches: int
    items: int
    processes: int
    receiver_processes: int
    producers: int
    worker_nice: int
    seed: int
    json_line: bool
    statements: bool = False


# ----- generated customers


ItemErrors = list[dict[str, str]]

CITIES = [
    ("Bogotá", "Cundinamarca"),
    ("Medellín", "Antioquia"),
    ("Cali", "Valle del Cauca"),
    ("Barranquilla", "Atlántico"),
    ("Bucaramanga", "Santander"),
    ("Pereira", "Risaralda"),
    ("Cartagena", "Bolívar"),
]
TRADES = ["Distribuidora", "Comercializadora", "Ferretería", "Droguería", "Almacenes", "Importadora"]
PLACES = ["Andina", "del Pacífico", "La Esperanza", "San José", "El Dorado", "Nueva Granada", "Caribe"]
LEGAL_FORMS = ["S.A.S", "S.A.", "Ltda.", "& Cía. S. en C."]
FIRST_NAMES = ["Juan", "María", "Carlos", "Ana", "Luis", "Paola", "Andrés", "Diana", "Jorge", "Camila"]
LAST_NAMES = ["Pérez", "Gómez", "Rodríguez", "Martínez", "López", "García", "Hernández", "Díaz"]
TYPES = ["DISTRIBUIDOR", "MAYORISTA", "MINORISTA", "INSTITUCIONAL"]
PAYMENT_METHODS = ["CRÉDITO", "CONTADO", "TRANSFERENCIA"]
ZONES = ["NORTE", "SUR", "CENTRO", "ORIENTE", "OCCIDENTE"]
SEGMENTS = ["preferencial", "nuevo", "corporativo", "estacional"]
TERMS = [0, 15, 30, 45, 60, 90]
# Decimals arrive as JSON numbers and as strings, as ERPs send them.
DISCOUNTS: list[float | str] = [0.0, 2.5, 5.0, 7.5, "2.50", "12.75"]


def customer(rng: random.Random, code: str) -> dict[str, Any]:
    """A full, valid customer of the reference contract with realistic values."""
    city, region = rng.choice(CITIES)
    trade = f"{rng.choice(TRADES)} {rng.choice(PLACES)}"
    zone = rng.choice(ZONES)
    domain = f"{code.lower()}.com.co"
    quota_units = rng.randrange(10, 1000)
    return {
        "code": code,
        "type": rng.choice(TYPES),
        "name": f"{trade} {rng.choice(LEGAL_FORMS)}",
        "contact": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "phone": f"3{rng.randrange(10**9):09d}",
        "address": f"Calle {rng.randrange(1, 200)} #{rng.randrange(1, 100)}-{rng.randrange(1, 100)} "
        f"Oficina {rng.randrange(100, 999)}",
        "city": city,
        "quota": quota_units * 100_000.0,
        "term": rng.choice(TERMS),
        "payment_method": rng.choice(PAYMENT_METHODS),
        "email": f"contacto@{domain}",
        "email2": f"ventas@{domain}",
        "country": "Colombia",
        "region": region,
        "price_list": f"LP-{rng.randrange(1, 6):03d}",
        "location": f"LOC-{zone}",
        "nit": f"{rng.randrange(800_000_000, 1_000_000_000)}-{rng.randrange(10)}",
        "discount": rng.choice(DISCOUNTS),
        "discount_list": rng.choice(["DESC-PREMIUM", "DESC-BASE", "DESC-MAYORISTA"]),
        "observations": f"Cliente {rng.choice(SEGMENTS)} - Zona {zone.lower()}",
        "name_est": f"{trade} Sede {city}",
        "short_name": trade.split()[0][:4] + " " + trade.split()[-1],
        "operation_center": f"CO-{rng.randrange(1, 20):03d}",
        "block_sales": rng.choice("NNNNY"),
        "commercial_discount": f"{rng.randrange(0, 500_000) / 100:.2f}",
        "discount_base": rng.randrange(1, 100) * 10_000.0,
        "withholding_base": rng.randrange(1, 100) * 5_000.0,
        "withholding": f"{rng.randrange(0, 3_000_000) / 100:.2f}",
        "corporate_client": f"CORP-{rng.randrange(1, 1000):03d}",
        "iva_exempt": rng.choice("NNNY"),
        "real_quota": rng.randrange(1, quota_units + 1) * 100_000.0,
        "state": "Y",
    }


def _error(name: str, message: str) -> ItemErrors:
    return [{"field": name, "message": message}]


def _without_name(item: dict[str, Any]) -> ItemErrors:
    del item["name"]
    return _error("name", "Field is required")


def _code_too_long(item: dict[str, Any]) -> ItemErrors:
    item["code"] += "-SUCURSAL-NORTE"
    return _error("code", "Field exceeds maximum length of 18 characters")


def _comma_decimal(item: dict[str, Any]) -> ItemErrors:
    item["discount"] = "1,5"
    return _error("discount", "Field must be a valid decimal (e.g., 1.5, 10.25)")


def _three_decimal_places(item: dict[str, Any]) -> ItemErrors:
    item["quota"] = "1250.505"
    return _error("quota", "Field exceeds maximum of 2 decimal places")


def _flag_not_y_or_n(item: dict[str, Any]) -> ItemErrors:
    item["block_sales"] = "X"
    return _error("block_sales", "Value must be one of: Y, N")


def _unknown_key(item: dict[str, Any]) -> ItemErrors:
    item["vendedor"] = "Juan Pérez"
    return _error("vendedor", "Unknown field")


def _phone_as_number(item: dict[str, Any]) -> ItemErrors:
    item["phone"] = 3001234567
    return _error("phone", "Field must be a string")


def _term_too_large(item: dict[str, Any]) -> ItemErrors:
    item["term"] = 1000
    return _error("term", "Field exceeds maximum of 3 integer digits")


INVALIDATIONS: list[Callable[[dict[str, Any]], ItemErrors]] = [
    _without_name,
    _code_too_long,
    _comma_decimal,
    _three_decimal_places,
    _flag_not_y_or_n,
    _unknown_key,
    _phone_as_number,
    _term_too_large,
]


@dataclass
class PlannedBatch:
    """A batch serialized before the clock starts, and the outcome expected for each of its indexes."""

    body: bytes
    # The code of each index expected CREATED; None where the item is expected to fail.
    codes: list[str | None]
    failures: dict[int, ItemErrors]
    batch_id: str = ""

    @property
    def total(self) -> int:
        return len(self.codes)

    @property
    def created(self) -> int:
        return self.total - len(self.failures)

    def mismatches(self, body: dict[str, Any]) -> list[str]:
        """How the ended batch's status answer differs from the expected outcome (empty when it does not)."""
        problems = []
        if body["status"] != "COMPLETED":
            problems.append(f"status {body['status']}")
        if (body["created"], body["failed"]) != (self.created, len(self.failures)):
            problems.append(
                f"created/failed {body['created']}/{body['failed']}, expected "
                f"{self.created}/{len(self.failures)}"
            )
        results = body["results"]
        if [r["index"] for r in results] != list(range(self.total)):
            problems.append(f"{len(results)} results, not exactly one per index 0..{self.total - 1}")
            return problems
        for result in results:
            index = result["index"]
            expected = self.failures.get(index)
            if expected is None:
                if result["status"] != "CREATED" or result.get("code") != self.codes[index]:
                    problems.append(f"index {index}: {result}, expected CREATED {self.codes[index]}")
            elif result["status"] != "FAILED" or result.get("errors") != expected:
                problems.append(f"index {index}: {result}, expected FAILED {expected}")
        return problems


def plan_batch(rng: random.Random, prefix: str, size: int, existing: list[str], mixed: bool) -> PlannedBatch:
    """`size` customers coded ``<prefix>-<index>``; when `mixed`, some invalid, some repeating an earlier
    item's code (most of them in an earlier chunk) and a few reusing the `existing` codes."""
    reuse = min(EXISTING_PER_BATCH, size // 10, len(existing)) if mixed else 0
    reused_at = dict(zip(rng.sample(range(size), reuse), rng.sample(existing, reuse), strict=True))
    items: list[dict[str, Any]] = []
    codes: list[str | None] = []
    failures: dict[int, ItemErrors] = {}
    owners: list[int] = []
    for index in range(size):
        item = customer(rng, f"{prefix}-{index:05d}")
        roll = rng.random() if mixed else 1.0
        if index in reused_at:
            item["code"] = reused_at[index]
            failures[index] = _error("code", "Code already exists")
        elif roll < INVALID_SHARE:
            failures[index] = rng.choice(INVALIDATIONS)(item)
        elif roll < INVALID_SHARE + DUPLICATE_SHARE and owners:
            first = rng.choice(owners)
            item["code"] = codes[first]
            failures[index] = _error("code", f"Duplicate code in batch (first at index {first})")
        else:
            owners.append(index)
        items.append(item)
        codes.append(None if index in failures else item["code"])
    return PlannedBatch(orjson.dumps(items), codes, failures)


# ----- services and processes


def psycopg_dsn(url: str) -> str:
    """A SQLAlchemy database URL as psycopg takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Services:
    """The PostgreSQL and Redis the run uses, and a line telling the reader which they are."""

    database_url: str
    broker_url: str
    secret_key: str
    description: str
    # The servers' main processes when the bench started them: their CPU is measured too.
    server_pids: dict[str, int] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return psycopg_dsn(self.database_url)


@contextlib.contextmanager
def services(
    workdir: Path, say: Callable[[str], None], wal_bytes: int, *, statements: bool = False
) -> Iterator[Services]:
    """The services of the run; with ``statements``, a PostgreSQL that counts its time by statement."""
    settings = get_settings()
    if not settings.embedded:
        database = make_url(settings.sqlalchemy_url)
        if database.get_backend_name() != "postgresql":
            raise BenchError("the bench needs PostgreSQL: CLIENTELA_DATABASE_URL names another database")
        broker = make_url(settings.celery_broker_url)
        server = f"{database.host}:{database.port}/{database.database}"
        given = Services(
            settings.sqlalchemy_url,
            settings.celery_broker_url,
            settings.signing_key(),
            f"given: PostgreSQL {server}, Redis {broker.host}:{broker.port}/{broker.database}",
        )
        if statements:
            check_statement_counts(given.dsn, server)
        yield given
        return
    say("starting private PostgreSQL and Redis")
    server_settings = dict(BULK_LOAD_SETTINGS)
    if statements:
        server_settings["shared_preload_libraries"] = STATEMENT_LIBRARY
    postgres = PostgresServer(workdir / "postgres", settings=server_settings)
    redis = RedisServer(workdir / "redis")
    try:
        try:
            postgres.start()
            redis.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"cannot start private services: {exc}") from exc
        postgres.create_database("clientela")
        files = recycle_wal(postgres.url("clientela"), wal_bytes)
        say(f"{files} WAL files made ready ahead of the server's WAL, as a server in service has them")
        buffers = fill_shared_buffers(postgres.url("clientela"))
        say(f"{buffers} shared buffers used once, as a server in service has them")
        private = Services(
            postgres.url("clientela"),
            redis.url,
            secrets.token_urlsafe(48),
            f"private: PostgreSQL 127.0.0.1:{postgres.port}, Redis 127.0.0.1:{redis.port} "
            "(started and stopped by the bench)",
            {
                name: server.proc.pid
                for name, server in (("PostgreSQL", postgres), ("Redis", redis))
                if server.proc
            },
        )
        if statements:
            check_statement_counts(private.dsn, "the private PostgreSQL")
        yield private
    finally:
        redis.stop()
        postgres.stop()


@dataclass
class ChildProcess:
    """A `clientela …` process the bench started, leading its own process group, its output in a log."""

    name: str
    args: list[str]
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [clientela_command(), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self.env,
                start_new_session=True,
            )

    def check_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} exited ({code}):\n{tail(self.log, 30)}")

    def stop(self, grace: float) -> None:
        if self.proc is not None:
            terminate(self.proc, signal.SIGTERM, grace=grace, group=True)
            self.proc = None


@dataclass
class Deployment:
    """The bench's own receiver and worker host, and an authenticated client of its tenant."""

    base_url: str
    headers: dict[str, str]
    tenant: str
    receiver: ChildProcess
    worker: ChildProcess

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=HTTP_TIMEOUT)


@contextlib.contextmanager
def deployment(
    svc: Services, options: BenchOptions, workdir: Path, say: Callable[[str], None]
) -> Iterator[Deployment]:
    env = {
        **os.environ,
        "CLIENTELA_DATABASE_URL": svc.database_url,
        "CLIENTELA_BROKER_URL": svc.broker_url,
        "CLIENTELA_SECRET_KEY": svc.secret_key,
        "PYTHONUNBUFFERED": "1",
    }
    say("migrating, creating a tenant, starting the receiver and the worker host")
    run_clientela(["migrate"], env, workdir, READY_SECONDS)
    tenant = f"bench-{secrets.token_hex(4)}"
    key = orjson.loads(run_clientela(["tenant", "create", tenant], env, workdir, READY_SECONDS))[
        "subscriptionKey"
    ]
    port = free_port()
    receiver = ChildProcess(
        "receiver",
        ["serve", "--host", "127.0.0.1", "--port", str(port), "--processes", str(options.receiver_processes)],
        env,
        workdir,
    )
    worker = ChildProcess(
        "worker",
        ["worker", "--concurrency", str(options.processes), "--nice", str(options.worker_nice)],
        env,
        workdir,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        receiver.start()
        worker.start()
        _wait_ready(receiver, worker, base_url)
        r = httpx.post(f"{base_url}/v1/token", headers={"Ocp-Apim-Subscription-Key": key}, timeout=30)
        if r.status_code != 200:
            raise BenchError(f"POST /v1/token answered {r.status_code}: {r.text[:300]}")
        headers = {"Ocp-Apim-Subscription-Key": key, "Authorization": f"Bearer {r.json()['access_token']}"}
        yield Deployment(base_url, headers, tenant, receiver, worker)
    except BenchError as exc:
        logs = "\n".join(f"--- last lines of {p.name}.log\n{tail(p.log, 30)}" for p in (receiver, worker))
        raise BenchError(f"{exc}\n{logs}") from exc
    finally:
        # SIGTERM is Celery's warm shutdown: a chunk in flight finishes, queued ones stay queued.
        worker.stop(grace=30)
        receiver.stop(grace=15)


def _wait_ready(receiver: ChildProcess, worker: ChildProcess, base_url: str) -> None:
    """Until the receiver answers /readyz and the worker has logged Celery's "ready."."""
    deadline = time.monotonic() + READY_SECONDS
    receiver_ready = False
    while time.monotonic() < deadline:
        receiver.check_running()
        worker.check_running()
        if not receiver_ready:
            with contextlib.suppress(httpx.HTTPError):
                receiver_ready = httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200
        if receiver_ready and "ready." in worker.log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise BenchError(f"receiver or worker not ready after {READY_SECONDS}s")


# ----- measuring


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _peak_rss(process: psutil.Process) -> int:
    """The process's peak resident set where the kernel keeps it (VmHWM), else its current one."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(process.memory_info().rss)


@dataclass
class Sampler:
    """The largest resident set any single process of the worker host (main or pool child) reached, and the
    machine's CPU times with when they were read, every SAMPLE_SECONDS."""

    pid: int
    peak: int = 0
    machine: list[tuple[float, Any]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def sample(self) -> None:
        self.machine.append((time.time(), psutil.cpu_times()))
        with contextlib.suppress(psutil.Error):
            main = psutil.Process(self.pid)
            for process in [main, *main.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    self.peak = max(self.peak, _peak_rss(process))

    def _run(self) -> None:
        while not self.stopping.wait(SAMPLE_SECONDS):
            self.sample()

    def start(self) -> None:
        self.sample()
        self.thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join()
        self.sample()

    def busy_until(self, moment: float) -> float:
        """The share of the machine's CPUs busy from the start until the first reading at or after
        ``moment`` (a time.time())."""
        end = next((cpu for at, cpu in self.machine if at >= moment), self.machine[-1][1])
        return _busy_share(self.machine[0][1], end)


# Where Linux counts a CPU's time; guest time is already within user time.
_CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _busy_share(before: Any, after: Any) -> float:
    """The share of all CPUs' time between two readings spent neither idle nor waiting for I/O."""
    spent = {state: getattr(after, state, 0.0) - getattr(before, state, 0.0) for state in _CPU_STATES}
    total = sum(spent.values())
    return 1 - (spent["idle"] + spent["iowait"]) / total if total > 0 else 0.0


def _on_cpu_seconds(pid: int) -> float:
    """The time a process's threads have run, from the scheduler's nanosecond counters.

    /proc/<pid>/stat, which psutil reads, counts in 10 ms steps: more than a small run's whole share.
    """
    nanoseconds = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # the thread ended after the listing
            nanoseconds += int((task / "schedstat").read_text().split()[0])
    return nanoseconds / 1e9


@dataclass
class CpuMeter:
    """CPU seconds used over the timed run by each group of processes: in ``trees`` a main process and its
    descendants, in ``alone`` a process without its children (the bench, whose children are the others).

    Read from the scheduler's per-thread counters at the start and the end; a process or thread that ends in
    between loses its share, which the run's processes (pool processes, pooled connections) do not do.
    """

    trees: dict[str, int]
    alone: dict[str, int]
    started: dict[str, dict[int, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, dict[int, float]]:
        found: dict[str, dict[int, float]] = {}
        for name, pid in {**self.trees, **self.alone}.items():
            found[name] = {}
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                members = [root, *root.children(recursive=True)] if name in self.trees else [root]
                for process in members:
                    with contextlib.suppress(OSError):
                        found[name][process.pid] = _on_cpu_seconds(process.pid)
        return found

    def start(self) -> None:
        self.started = self._read()

    def stop(self) -> None:
        ended = self._read()
        self.seconds = {
            name: sum(cpu - self.started[name].get(pid, 0.0) for pid, cpu in ended[name].items())
            for name in ended
        }


@dataclass
class Submissions:
    """What the producer threads share: the batches still to send, and what sending them measured."""

    pending: queue.Queue[PlannedBatch]
    lock: threading.Lock = field(default_factory=threading.Lock)
    first_post: float = math.inf
    accepted_seconds: list[float] = field(default_factory=list)
    throttled: int = 0
    errors: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, batches: list[PlannedBatch]) -> Submissions:
        run = cls(pending=queue.Queue())
        for batch in batches:
            run.pending.put(batch)
        return run

    def producers(self, deploy: Deployment, deadline: float, count: int) -> list[threading.Thread]:
        """Producer threads, not yet started, that POST this run's batches until none is left."""
        return [
            threading.Thread(target=produce, args=(deploy, self, deadline), name=f"producer-{n}", daemon=True)
            for n in range(count)
        ]


def produce(deploy: Deployment, run: Submissions, deadline: float) -> None:
    """POST batches until none is left; a 429 is retried after its Retry-After."""
    headers = {"Content-Type": "application/json"}
    with deploy.client() as client:
        while True:
            try:
                batch = run.pending.get_nowait()
            except queue.Empty:
                return
            while True:
                wall, started = time.time(), time.perf_counter()
                try:
                    r = client.post("/v1/customers/batch-create", content=batch.body, headers=headers)
                except httpx.HTTPError as exc:
                    with run.lock:
                        run.errors.append(f"POST: {exc!r}")
                    return
                seconds = time.perf_counter() - started
                with run.lock:
                    run.first_post = min(run.first_post, wall)
                    if r.status_code == 429:
                        run.throttled += 1
                    elif r.status_code == 202:
                        run.accepted_seconds.append(seconds)
                    else:
                        run.errors.append(f"POST answered {r.status_code}: {r.text[:300]}")
                        return
                if r.status_code == 202:
                    batch.batch_id = str(r.json()["batchId"])
                    break
                if time.monotonic() > deadline:
                    with run.lock:
                        run.errors.append("still answered 429 at the deadline")
                    return
                time.sleep(float(r.headers.get("Retry-After", "1")))


def batch_summaries(client: httpx.Client, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """The tenant's batch summaries by id, paging until every wanted batch is seen or the list ends."""
    found: dict[str, dict[str, Any]] = {}
    params: dict[str, Any] = {"limit": BATCH_LIST_LIMIT}
    while True:
        r = client.get("/v1/customers/batches", params=params)
        if r.status_code != 200:
            raise BenchError(f"GET /v1/customers/batches answered {r.status_code}: {r.text[:300]}")
        page = r.json()
        found.update((b["batchId"], b) for b in page["batches"])
        if wanted <= found.keys() or page["nextBefore"] is None:
            return found
        params["before"] = page["nextBefore"]


def wait_until_ended(
    client: httpx.Client, planned: list[PlannedBatch], run: Submissions, producers: list[threading.Thread]
) -> tuple[float, float]:
    """Poll the batch list until every batch is COMPLETED; return (latest completedAt, when that was seen)."""
    deadline = time.monotonic() + END_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        with run.lock:
            if run.errors:
                raise BenchError("; ".join(run.errors[:5]))
        sending = any(t.is_alive() for t in producers)
        ids = {b.batch_id for b in planned if b.batch_id}
        summaries = batch_summaries(client, ids)
        ours = [summaries[i] for i in ids if i in summaries]
        failed = [s["batchId"] for s in ours if s["status"] == "FAILED"]
        if failed:
            raise BenchError(f"batches ended FAILED: {', '.join(failed)}")
        if not sending and len(ours) == len(planned) and all(s["status"] == "COMPLETED" for s in ours):
            seen = time.time()
            return max(datetime.fromisoformat(s["completedAt"]).timestamp() for s in ours), seen
        time.sleep(RUN_POLL_SECONDS)
    raise BenchError(f"not every batch ended within {END_DEADLINE_SECONDS}s")


def ended_status(client: httpx.Client, batch: PlannedBatch, timeout: float) -> dict[str, Any]:
    """The batch's status answer once it has ended (423 until then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/customers/batches/{batch.batch_id}")
        if r.status_code == 200:
            body: dict[str, Any] = r.json()
            return body
        if r.status_code != 423:
            raise BenchError(f"GET batch {batch.batch_id} answered {r.status_code}: {r.text[:300]}")
        time.sleep(POLL_SECONDS)
    raise BenchError(f"batch {batch.batch_id} not ended after {timeout}s")


def verify(client: httpx.Client, planned: list[PlannedBatch]) -> None:
    problems: list[str] = []
    for number, batch in enumerate(planned, 1):
        body = ended_status(client, batch, timeout=30)
        problems.extend(f"batch {number} ({batch.batch_id}): {p}" for p in batch.mismatches(body))
    if problems:
        raise BenchError(
            f"{len(problems)} differences from the expected results:\n" + "\n".join(problems[:20])
        )


def status_latencies(client: httpx.Client, batch: PlannedBatch) -> list[float]:
    """Seconds each GET of the finished batch's full status (every result) took."""
    samples = []
    for _ in range(STATUS_SAMPLES):
        started = time.perf_counter()
        r = client.get(f"/v1/customers/batches/{batch.batch_id}")
        samples.append(time.perf_counter() - started)
        if r.status_code != 200 or len(r.json()["results"]) != batch.total:
            raise BenchError(f"GET batch {batch.batch_id} answered {r.status_code}: {r.text[:300]}")
    return samples


@dataclass
class Ceiling:
    """The COPY ceiling's passes: the rows every pass writes, and the seconds each pass took, per format."""

    rows: int
    # Seconds of each pass, by COPY format: the binary passes are the ceiling the target is set against.
    seconds: dict[str, list[float]]


# The formats of the ceiling's passes, in the order they alternate; the first is the target's ceiling.
CEILING_FORMATS = ("binary", "text")


def copy_ceiling(dsn: str, tenant: str, planned: list[PlannedBatch]) -> Ceiling:
    """COPY the created rows again into a scratch table shaped like the customers table, one COPY and
    commit per batch, in CEILING_PASSES passes per format; return the rows of a pass and the seconds each
    pass's COPYs and commits took.

    The rows are read back from the customers table as COPY data before the clock starts, so the ceiling
    times the database taking them, not Python encoding them (binary numerics alone would cost the client
    about 8 µs a row). The binary passes are the ceiling: the server does the least work for them. The
    text passes, in the format COPY reads by default and the workers write, show what that format costs the
    server; they alternate with the binary ones, so that both meet the same moments of the machine. One pass
    lasts about a second on one core, and the machine's speed changes from second to second: the median of
    a format's passes is its ceiling.
    """
    table = CUSTOMER.table_name
    columns = ", ".join(COPY_COLUMNS)
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT 1 FROM tenants WHERE name = %s", (tenant,)).fetchone() is None:
            raise BenchError(f"tenant {tenant} not found in the database")
        data: dict[str, list[bytes]] = {}
        for form in CEILING_FORMATS:
            data[form] = []
            for batch in planned:
                with (
                    conn.cursor() as cursor,
                    cursor.copy(
                        f"COPY (SELECT {columns} FROM {table} WHERE batch_id = %s) TO STDOUT (FORMAT {form})",
                        (batch.batch_id,),
                    ) as out,
                ):
                    data[form].append(b"".join(out))
        conn.commit()
        seconds: dict[str, list[float]] = {form: [] for form in CEILING_FORMATS}
        rows = set()
        for _ in range(CEILING_PASSES):
            for form in CEILING_FORMATS:
                written, took = _copy_pass(conn, table, columns, form, data[form])
                rows.add(written)
                seconds[form].append(took)
    assert len(rows) == 1, f"the passes wrote different numbers of rows: {sorted(rows)}"
    return Ceiling(rows.pop(), seconds)


STATEMENT_LIBRARY = "pg_stat_statements"
# The statements the table shows, those that took the most time first; the JSON line has them all.
STATEMENTS_SHOWN = 8
# The statement column's width, so that the table fits the 120 columns printed off a terminal; rich cuts
# a longer text with an ellipsis.
STATEMENT_WIDTH = 56
_STATEMENT_COUNTS = (
    "SELECT userid, queryid, query, calls, rows, total_exec_time FROM pg_stat_statements "
    "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


@dataclass(frozen=True)
class Statement:
    """A statement as pg_stat_statements counts it over the timed run: its text with the values as $n, and
    the time the server spent in it, on CPU or waiting (for a lock, the disk, or the rows of a COPY)."""

    query: str
    calls: int
    rows: int
    milliseconds: float

    @property
    def ms_per_call(self) -> float:
        return self.milliseconds / self.calls

    def as_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "calls": self.calls,
            "rows": self.rows,
            "ms": round(self.milliseconds, 1),
            "ms_per_call": round(self.ms_per_call, 3),
        }


# Each statement's text, calls, rows and milliseconds, by its user and query id.
StatementCounts = dict[tuple[int, int], tuple[str, int, int, float]]


def check_statement_counts(dsn: str, where: str) -> None:
    """Refuse a server that does not load pg_stat_statements; create its view where it is missing.

    The counts are read before and after the timed run, never reset, so that a given server keeps its
    other users' statistics.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW shared_preload_libraries").fetchone()
        loaded = {name.strip() for name in str(row[0] if row else "").split(",")}
        if STATEMENT_LIBRARY not in loaded:
            raise BenchError(f"--statements needs {STATEMENT_LIBRARY} in shared_preload_libraries of {where}")
        conn.execute(f"CREATE EXTENSION IF NOT EXISTS {STATEMENT_LIBRARY}")


def statement_counts(dsn: str) -> StatementCounts:
    """What pg_stat_statements has counted so far in the bench's database."""
    with psycopg.connect(dsn) as conn:
        return {
            (user, query_id): (text, calls, rows, ms)
            for user, query_id, text, calls, rows, ms in conn.execute(_STATEMENT_COUNTS)
            # The bench's own reads of the view.
            if STATEMENT_LIBRARY not in text
        }


def statements_since(before: StatementCounts, after: StatementCounts) -> list[Statement]:
    """The statements run between two counts, those that took the most time first."""
    run = []
    for key, (text, calls, rows, ms) in after.items():
        _, calls_before, rows_before, ms_before = before.get(key, ("", 0, 0, 0.0))
        if calls > calls_before:
            run.append(
                Statement(" ".join(text.split()), calls - calls_before, rows - rows_before, ms - ms_before)
            )
    return sorted(run, key=lambda statement: statement.milliseconds, reverse=True)


def _copy_pass(
    conn: psycopg.Connection[Any], table: str, columns: str, form: str, data: list[bytes]
) -> tuple[int, float]:
    """One pass of the ceiling into a new scratch table: the rows written and the seconds it took."""
    scratch = f"bench_copy_{secrets.token_hex(6)}"
    # INCLUDING ALL brings the unique index on (tenant_id, code) along: the ceiling pays for it too.
    conn.execute(f"CREATE TABLE {scratch} (LIKE {table} INCLUDING ALL)")
    conn.commit()
    _checkpoint(conn)
    rows, seconds = 0, 0.0
    try:
        for batch in data:
            started = time.perf_counter()
            with conn.cursor() as cursor:
                with cursor.copy(f"COPY {scratch} ({columns}) FROM STDIN (FORMAT {form})") as copy:
                    copy.write(batch)
                rows += cursor.rowcount
            conn.commit()
            seconds += time.perf_counter() - started
    finally:
        conn.rollback()
        conn.execute(f"DROP TABLE IF EXISTS {scratch}")
        conn.commit()
    return rows, seconds


def _checkpoint(conn: psycopg.Connection[Any]) -> None:
    """Write out what the run left dirty, so that the ceiling does not pay for the run's writes: the
    run ends seconds before, while the server and the kernel are still writing its pages back. A role that
    may not checkpoint (superuser or pg_checkpoint) measures without."""
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        conn.rollback()
    else:
        conn.commit()


def recycle_wal(url: str, nbytes: int) -> int:
    """Give a new server the WAL files that a server in service has: at least ``nbytes`` of them, written
    and then recycled by a checkpoint, ready to be written over; return how many files lie ahead of the
    server's WAL.

    A new cluster has one WAL file, and PostgreSQL fills each file it adds with zeros and syncs it, 16 MB
    at a time, under the lock that every commit's flush waits for. A server in service renames the files a
    checkpoint has finished with instead. Left new, the timed run would pay for adding each file of the WAL
    it writes (a tenth of its backends' CPU in perf, and every commit stalled while a file was added), and
    the ceiling, which runs after checkpoints, for none.
    """
    with psycopg.connect(psycopg_dsn(url), autocommit=True) as conn:
        for _ in range(math.ceil(nbytes / _setting(conn, "wal_segment_size"))):
            # A switch needs a record since the last one; a message is one that touches no table.
            conn.execute("SELECT pg_logical_emit_message(false, 'clientela-bench', '')")
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        found = conn.execute(
            "SELECT count(*) FROM pg_ls_waldir()"
            " WHERE name ~ '^[0-9A-F]{24}$' AND name > pg_walfile_name(pg_current_wal_insert_lsn())"
        ).fetchone()
    assert found is not None
    return int(found[0])


def _setting(conn: psycopg.Connection[Any], name: str) -> int:
    """A numeric server setting, in its own unit (bytes for wal_segment_size, 8 KiB pages for
    shared_buffers)."""
    row = conn.execute("SELECT setting::bigint FROM pg_settings WHERE name = %s", (name,)).fetchone()
    assert row is not None, f"the server has no setting {name}"
    return int(row[0])


def fill_shared_buffers(url: str) -> int:
    """Have every shared buffer of a new server in use once, as in a server in service; return how many.

    A new server maps its shared buffers but has touched none: each buffer that the run takes for the
    first time costs a page fault, and the kernel zeroes the page first (13% of PostgreSQL's CPU samples
    in perf of a run). A server in service took all of them long ago; the ceiling, which runs after the
    timed run, takes buffers the run already used. An unlogged table one page per row, as large as the
    buffers, is written (a plain INSERT takes buffers from the free list, where COPY would cycle through
    a small ring), then dropped: its buffers go back to the free list, their pages mapped.
    """
    with psycopg.connect(psycopg_dsn(url), autocommit=True) as conn:
        pages = _setting(conn, "shared_buffers")
        table = f"bench_fill_{secrets.token_hex(6)}"
        conn.execute(f"CREATE UNLOGGED TABLE {table} (filler text)")
        try:
            conn.execute(f"ALTER TABLE {table} ALTER COLUMN filler SET STORAGE PLAIN")
            # 7,000 bytes a row: one row per 8 KiB page, stored as it is (PLAIN: never compressed).
            conn.execute(
                f"INSERT INTO {table} SELECT repeat('x', 7000) FROM generate_series(1, %s)", (pages,)
            )
        finally:
            conn.execute(f"DROP TABLE {table}")
    return pages


def server_facts(dsn: str) -> tuple[str, str]:
    """The PostgreSQL version and the values in force of the settings the bench tunes."""
    with psycopg.connect(dsn) as conn:

        def show(name: str) -> str:
            row = conn.execute(f"SHOW {name}").fetchone()
            return "?" if row is None else str(row[0])

        return show("server_version"), " ".join(f"{name}={show(name)}" for name in BULK_LOAD_SETTINGS)


# ----- the report


@dataclass
class Figures:
    batches: int
    items_per_batch: int
    created: int
    failed: int
    throttled: int
    elapsed_seconds: float
    ceiling: Ceiling
    post_seconds: list[float]
    status_seconds: list[float]
    worker_peak_rss: int
    # CPU seconds each group of processes used over the timed run, and the share of the machine's CPUs busy.
    cpu_seconds: dict[str, float]
    cpu_busy: float
    # With --statements: the server's time by statement over the timed run.
    statements: list[Statement] | None = None

    @property
    def items(self) -> int:
        return self.batches * self.items_per_batch

    @property
    def items_per_second(self) -> float:
        return self.items / self.elapsed_seconds

    def copy_passes(self, form: str = CEILING_FORMATS[0]) -> list[float]:
        """Rows per second of each pass of the ceiling in this COPY format."""
        return [self.ceiling.rows / seconds for seconds in self.ceiling.seconds[form]]

    def copy_rows_per_second(self, form: str = CEILING_FORMATS[0]) -> float:
        return statistics.median(self.copy_passes(form))

    def ratio(self, form: str = CEILING_FORMATS[0]) -> float:
        return self.items_per_second / self.copy_rows_per_second(form)

    def ms(self, samples: list[float], q: float) -> float:
        return percentile(samples, q) * 1000

    def met(self) -> dict[str, bool | None]:
        """Each target and whether it was met; None for the size-bound ones when batches are smaller."""
        full_size = self.items_per_batch == TARGET_BATCH_ITEMS
        return {
            "items_per_second": self.items_per_second >= TARGET_ITEMS_PER_SECOND,
            "ratio": self.ratio() >= TARGET_CEILING_SHARE,
            "post_p99_ms": self.ms(self.post_seconds, 0.99) <= TARGET_POST_P99_MS if full_size else None,
            "status_p99_ms": self.ms(self.status_seconds, 0.99) <= TARGET_STATUS_P99_MS
            if full_size
            else None,
            "worker_peak_rss_mb": self.worker_peak_rss / MB <= TARGET_WORKER_RSS_MB,
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "items_per_second": round(self.items_per_second, 1),
            "copy_rows_per_second": round(self.copy_rows_per_second(), 1),
            "ratio": round(self.ratio(), 4),
            "text_copy_rows_per_second": round(self.copy_rows_per_second("text"), 1),
            "text_ratio": round(self.ratio("text"), 4),
            "post_p50_ms": round(self.ms(self.post_seconds, 0.5), 1),
            "post_p99_ms": round(self.ms(self.post_seconds, 0.99), 1),
            "status_p50_ms": round(self.ms(self.status_seconds, 0.5), 1),
            "status_p99_ms": round(self.ms(self.status_seconds, 0.99), 1),
            "worker_peak_rss_mb": round(self.worker_peak_rss / MB, 1),
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "copy_rows": self.ceiling.rows,
            "copy_passes_rows_per_second": [round(rate, 1) for rate in self.copy_passes()],
            "text_copy_passes_rows_per_second": [round(rate, 1) for rate in self.copy_passes("text")],
            "batches": self.batches,
            "items": self.items,
            "created": self.created,
            "failed": self.failed,
            "throttled": self.throttled,
            "cpu_us_per_item": {
                name.replace(" ", "_").lower(): round(seconds / self.items * 1e6, 1)
                for name, seconds in self.cpu_seconds.items()
            },
            "cpu_busy": round(self.cpu_busy, 3),
            "met": self.met(),
        } | ({} if self.statements is None else {"statements": [s.as_json() for s in self.statements]})

    def table(self) -> Table:
        met = self.met()
        size = f"{self.items_per_batch:,}-item batch"
        target_size = f"{TARGET_BATCH_ITEMS:,} items"

        def verdict(name: str) -> str:
            value = met[name]
            return "n/a" if value is None else ("yes" if value else "NO")

        table = Table(title="clientela bench")
        for column in ("figure", "measured", "target", "met"):
            table.add_column(column)
        table.add_row(
            "end-to-end rate",
            f"{self.items_per_second:,.0f} items/s ({self.items:,} items in {self.elapsed_seconds:.1f} s)",
            f">= {TARGET_ITEMS_PER_SECOND:,} items/s",
            verdict("items_per_second"),
        )

        def ceiling(form: str) -> str:
            passes = self.copy_passes(form)
            return (
                f"{self.copy_rows_per_second(form):,.0f} rows/s, median of {len(passes)} passes of "
                f"{self.ceiling.rows:,} rows ({', '.join(f'{rate:,.0f}' for rate in passes)})"
            )

        table.add_row("COPY ceiling (same rows, binary)", ceiling("binary"), "", "")
        table.add_row(
            "end-to-end / COPY ceiling",
            f"{self.ratio():.1%}",
            f">= {TARGET_CEILING_SHARE:.0%}",
            verdict("ratio"),
        )
        table.add_row("text COPY (same rows)", ceiling("text"), "", "")
        table.add_row("end-to-end / text COPY", f"{self.ratio('text'):.1%}", "", "")
        table.add_row(f"POST accepted p50 ({size})", f"{self.ms(self.post_seconds, 0.5):.0f} ms", "", "")
        table.add_row(
            f"POST accepted p99 ({size})",
            f"{self.ms(self.post_seconds, 0.99):.0f} ms",
            f"<= {TARGET_POST_P99_MS} ms ({target_size})",
            verdict("post_p99_ms"),
        )
        table.add_row(f"status p50 (finished {size})", f"{self.ms(self.status_seconds, 0.5):.0f} ms", "", "")
        table.add_row(
            f"status p99 (finished {size})",
            f"{self.ms(self.status_seconds, 0.99):.0f} ms",
            f"<= {TARGET_STATUS_P99_MS} ms ({target_size})",
            verdict("status_p99_ms"),
        )
        table.add_row(
            "worker peak RSS (largest process)",
            f"{self.worker_peak_rss / MB:.0f} MB",
            f"<= {TARGET_WORKER_RSS_MB} MB",
            verdict("worker_peak_rss_mb"),
        )
        table.add_row("429 answers (retried)", f"{self.throttled:,}", "", "")
        table.add_row("items created / failed", f"{self.created:,} / {self.failed:,}", "", "")
        for name, seconds in self.cpu_seconds.items():
            per_item = seconds / self.items * 1e6
            table.add_row(f"CPU per item: {name}", f"{per_item:.1f} µs ({seconds:.2f} s in all)", "", "")
        table.add_row("CPUs busy over the run", f"{self.cpu_busy:.0%} of {os.cpu_count()}", "", "")
        return table

    def statement_table(self) -> Table | None:
        if self.statements is None:
            return None
        total = sum(statement.milliseconds for statement in self.statements)
        table = Table(title="PostgreSQL's time by statement over the timed run (pg_stat_statements)")
        table.add_column("statement", no_wrap=True, max_width=STATEMENT_WIDTH)
        for column in ("calls", "rows", "ms", "ms per call", "share"):
            table.add_column(column, justify="right")
        for statement in self.statements[:STATEMENTS_SHOWN]:
            table.add_row(
                # Text, not markup: SQL such as ARRAY[tenant_id] would read as a style tag.
                Text(statement.query),
                f"{statement.calls:,}",
                f"{statement.rows:,}",
                f"{statement.milliseconds:,.1f}",
                f"{statement.ms_per_call:.3f}",
                f"{statement.milliseconds / total:.1%}" if total else "",
            )
        table.add_row(
            f"all {len(self.statements)} statements",
            f"{sum(statement.calls for statement in self.statements):,}",
            "",
            f"{total:,.1f}",
            "",
            "",
        )
        return table


# ----- the run


def plan(options: BenchOptions) -> tuple[list[PlannedBatch], list[PlannedBatch]]:
    """The warm-up batches (all valid: their codes are the existing ones later batches reuse) and the timed
    batches. Only codes the warm-up created are reused: it has ended before the timed batches are sent,
    whereas a code of another timed batch could be created after the item reusing it is processed.

    One warm-up batch per producer and receiver process, each of a chunk per worker process, sent at once:
    every worker process, receiver process and connection the receiver opens for concurrent requests has
    started before the clock does (the first chunk a process takes, and the first request on a new
    connection, pay for connecting and for building statements and caches)."""
    rng = random.Random(options.seed)
    size = min(options.items, get_settings().chunk_size * options.processes)
    count = options.producers * options.receiver_processes
    warmups = [plan_batch(rng, f"WARM{n}", size, [], mixed=False) for n in range(count)]
    existing = [code for warmup in warmups for code in warmup.codes if code is not None]
    timed = [
        plan_batch(rng, f"CLI-{number:04d}", options.items, existing, mixed=True)
        for number in range(1, options.batches + 1)
    ]
    return warmups, timed


def warm_up(deploy: Deployment, warmups: list[PlannedBatch]) -> None:
    """POST the warm-up batches at once and wait until each has ended as expected."""
    run = Submissions.of(warmups)
    producers = run.producers(deploy, time.monotonic() + READY_SECONDS, len(warmups))
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join()
    if run.errors:
        raise BenchError("warm-up: " + "; ".join(run.errors[:3]))
    with deploy.client() as client:
        for warmup in warmups:
            problems = warmup.mismatches(ended_status(client, warmup, timeout=READY_SECONDS))
            if problems:
                raise BenchError("warm-up batch: " + "; ".join(problems[:5]))


def measure(
    deploy: Deployment,
    svc: Services,
    options: BenchOptions,
    timed: list[PlannedBatch],
    say: Callable[[str], None],
) -> Figures:
    run = Submissions.of(timed)
    sampler = Sampler(deploy.worker.pid)
    meter = CpuMeter(
        trees={"worker host": deploy.worker.pid, **svc.server_pids, "receiver": deploy.receiver.pid},
        alone={"bench client": os.getpid()},
    )
    producers = run.producers(deploy, time.monotonic() + END_DEADLINE_SECONDS, options.producers)
    counted = statement_counts(svc.dsn) if options.statements else None
    with deploy.client() as client:
        sampler.start()
        meter.start()
        try:
            for producer in producers:
                producer.start()
            completed_at, seen = wait_until_ended(client, timed, run, producers)
        finally:
            sampler.stop()
        meter.stop()
        statements = None if counted is None else statements_since(counted, statement_counts(svc.dsn))
        say("every batch has ended; verifying every result, then the status latency and the COPY ceiling")
        # completedAt is the workers' clock: fall back on the poll's when the two plainly disagree.
        end = completed_at if run.first_post < completed_at <= seen + 1 else seen
        verify(client, timed)
        status_seconds = status_latencies(client, timed[0])
    ceiling = copy_ceiling(svc.dsn, deploy.tenant, timed)
    created = sum(b.created for b in timed)
    return Figures(
        batches=len(timed),
        items_per_batch=options.items,
        created=created,
        failed=sum(b.total for b in timed) - created,
        throttled=run.throttled,
        elapsed_seconds=end - run.first_post,
        ceiling=ceiling,
        post_seconds=run.accepted_seconds,
        status_seconds=status_seconds,
        worker_peak_rss=sampler.peak,
        cpu_seconds=meter.seconds,
        cpu_busy=sampler.busy_until(end),
        statements=statements,
    )


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM ends the bench as Ctrl-C does, so that its finally blocks stop what it started.
    raise KeyboardInterrupt


def run(options: BenchOptions) -> int:
    """Run the bench; 0 when it completed with the expected results, whether or not targets were met."""
    out = Console(highlight=False)
    if not out.is_terminal:
        out.width = 120
    err = Console(stderr=True, highlight=False)

    def say(text: str) -> None:
        err.print(f"... {text}", markup=False, soft_wrap=True)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        say(f"generating {options.batches} x {options.items:,} customers (seed {options.seed})")
        warmups, timed = plan(options)
        with (
            tempfile.TemporaryDirectory(prefix="clientela-bench-") as tmp,
            services(
                Path(tmp), say, WAL_PER_ITEM * options.batches * options.items, statements=options.statements
            ) as svc,
            deployment(svc, options, Path(tmp), say) as deploy,
        ):
            warming = f"{len(warmups)} batches of {warmups[0].total:,} items sent at once"
            say(f"warm-up: {warming}, so that every process and receiver connection has started")
            warm_up(deploy, warmups)
            version, settings = server_facts(svc.dsn)
            out.print(
                f"clientela bench: {options.batches} batches x {options.items:,} items; worker processes: "
                f"{options.processes} (one host, nice {options.worker_nice}); "
                f"receiver processes: {options.receiver_processes}; "
                f"producers: {options.producers}; seed: {options.seed}\n"
                f"machine: {os.cpu_count()} CPUs; PostgreSQL {version}\n"
                f"services: {svc.description}\n"
                f"PostgreSQL settings: {settings}\n"
                f"warm-up: {warming}, completed before timing",
                markup=False,
                soft_wrap=True,
            )
            say("timed run: submitting, waiting for every batch to complete, verifying every result")
            figures = measure(deploy, svc, options, timed, say)
        out.print(figures.table())
        statement_table = figures.statement_table()
        if statement_table is not None:
            out.print(statement_table)
        out.print(
            f"every result of the {figures.items:,} items verified against the generated expectations",
            markup=False,
        )
        if options.json_line:
            sys.stdout.write(orjson.dumps(figures.as_json()).decode() + "\n")
        return 0
    except (BenchError, CommandFailed, ServiceUnavailable, httpx.HTTPError, psycopg.Error) as exc:
        err.print(f"bench failed: {exc}", markup=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("bench interrupted; the processes it started are stopped", markup=False)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
