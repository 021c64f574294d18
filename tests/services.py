"""Private PostgreSQL, Redis and clientela processes for the test session.

Everything here is started by the tests themselves, on free ports bound to 127.0.0.1, in temporary
directories, and stopped by pid at the end. The machine's shared servers are never touched. The servers
themselves are `api_stub.local_services`' (``clientela bench`` runs them too); this module adds the
suite's settings and log registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from api_stub import local_services
from api_stub.local_services import clientela_command, free_port, run_clientela, tail, terminate

REPO = Path(__file__).resolve().parent.parent


# Every log file of a process the session started, so that a failing test can show their tails.
LOG_FILES: list[tuple[str, Path]] = []


def register_log(name: str, path: Path) -> None:
    """Show this log's tail when a test fails; a service started again keeps its one entry."""
    if (name, path) not in LOG_FILES:
        LOG_FILES.append((name, path))


# Durability off: the session's cluster is thrown away, and the tests measure behaviour, not disks.
TEST_POSTGRES_SETTINGS = {"fsync": "off", "full_page_writes": "off", "max_connections": "200"}


@dataclass
class PostgresServer(local_services.PostgresServer):
    """The session's throwaway PostgreSQL, tuned for tests, its log shown when a test fails."""

    settings: dict[str, str] = field(default_factory=lambda: dict(TEST_POSTGRES_SETTINGS))

    def start(self) -> None:
        register_log("postgres", self.log)
        super().start()


@dataclass
class RedisServer(local_services.RedisServer):
    """A throwaway Redis of the tests, its log shown when a test fails."""

    def start(self) -> None:
        register_log("redis", self.log)
        super().start()


@dataclass
class ClientelaProcess:
    """One `clientela …` process (server, worker or beat), its output captured to a log file."""

    name: str
    args: list[str]
    env: Mapping[str, str]
    logdir: Path
    cwd: Path = REPO
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.logdir / f"{self.name}.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} already running"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = self.log.open("ab")
        log.write(f"\n----- start #{self.starts}: clientela {' '.join(self.args)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [clientela_command(), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.cwd),
            env=dict(self.env),
            start_new_session=True,
        )
        log.close()
        register_log(self.name, self.log)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 30) -> None:
        """Stop the process and its children (the prefork pool) by the group we started it in."""
        if self.proc is not None:
            terminate(self.proc, sig, grace=grace, group=True)
            self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL, grace=10)


def wait_http_ok(proc: ClientelaProcess, base_url: str, path: str = "/healthz", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.proc is not None and proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{tail(proc.log)}")
        try:
            r = httpx.get(base_url + path, timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not answering {path} after {timeout}s ({last}):\n{tail(proc.log)}")


@dataclass
class Server:
    """A running `clientela serve` and its base URL."""

    process: ClientelaProcess
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        self.process.start()
        try:
            wait_http_ok(self.process, self.base_url, timeout=timeout)
        except Exception:
            self.process.stop()
            raise

    def stop(self) -> None:
        self.process.stop()


def start_server(name: str, env: Mapping[str, str], logdir: Path, cwd: Path = REPO) -> Server:
    port = free_port()
    proc = ClientelaProcess(name, ["serve", "--host", "127.0.0.1", "--port", str(port)], env, logdir, cwd)
    server = Server(proc, port)
    server.start()
    return server


@dataclass
class Workers:
    """The session's Celery worker processes; tests may stop them and start them again."""

    env: Mapping[str, str]
    logdir: Path
    count: int = 2
    processes: list[ClientelaProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.processes = [
            ClientelaProcess(f"worker{i + 1}", ["worker", "--concurrency", "1"], self.env, self.logdir)
            for i in range(self.count)
        ]

    def start(self) -> None:
        for p in self.processes:
            if not p.running:
                p.start()
        self.wait_consuming()

    def stop(self) -> None:
        for p in self.processes:
            if p.proc is not None and p.proc.poll() is None:
                # Warm shutdown: finish the current chunk, give unacknowledged messages back.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.proc.pid, signal.SIGTERM)
        for p in self.processes:
            p.stop(signal.SIGTERM, grace=60)

    def wait_consuming(self, timeout: float = 60) -> None:
        """Wait until every worker logged that it is ready (Celery prints 'ready.')."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.processes:
                if p.proc is not None and p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{tail(p.log)}")
            if all(self._ready_since_last_start(p) for p in self.processes):
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"workers not ready after {timeout}s:\n" + "\n".join(tail(p.log, 30) for p in self.processes)
        )

    @staticmethod
    def _ready_since_last_start(p: ClientelaProcess) -> bool:
        text = p.log.read_text(errors="replace") if p.log.exists() else ""
        last_start = text.rfind("----- start #")
        return "ready." in text[last_start:]


def run_cli(args: list[str], env: Mapping[str, str], cwd: Path = REPO, timeout: float = 60) -> str:
    """Run a short `clientela` command and return its stdout; a non-zero exit fails loudly."""
    return run_clientela(args, env, cwd, timeout)


def create_tenant(name: str, env: Mapping[str, str], cwd: Path = REPO) -> dict[str, str]:
    stdout = run_cli(["tenant", "create", name], env, cwd)
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"tenant create must print one JSON line, got: {stdout!r}"
    data: dict[str, str] = json.loads(lines[0])
    return data


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for clientela processes: ours, minus any CLIENTELA_* inherited from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIENTELA_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env
