"""Private PostgreSQL, Redis and clientela processes for the test session.

Everything here is started by the tests themselves, on free ports bound to 127.0.0.1, in temporary
directories, and stopped by pid at the end. The machine's shared servers are never touched.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


class ServiceUnavailable(RuntimeError):
    """A binary the tests need is not installed (skips locally, fails in CI)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clientela_bin() -> str:
    """The `clientela` console script of the interpreter running the tests."""
    candidate = Path(sys.executable).parent / "clientela"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("clientela")
    if found is None:
        raise ServiceUnavailable("the clientela console script is not installed (pip install -e '.[test]')")
    return found


def postgres_bindir() -> Path:
    """Where initdb and postgres live: pg_config, then Debian's layout, then PATH."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(p) for p in versions)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for c in candidates:
        if (c / "initdb").exists() and (c / "postgres").exists():
            return c
    raise ServiceUnavailable("PostgreSQL server binaries (initdb, postgres) not found")


def _terminate(proc: subprocess.Popen[bytes], sig: int, grace: float, group: bool) -> None:
    """Signal a process we started (and its group when it leads one), escalating to SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    if group:
        # Children of the group (prefork pool) may outlive their parent for a moment.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# Every log file of a process the session started, so that a failing test can show their tails.
LOG_FILES: list[tuple[str, Path]] = []


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster owned by this test session."""

    base: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    @property
    def sockdir(self) -> Path:
        return self.base / "sock"

    @property
    def log(self) -> Path:
        return self.base / "postgres.log"

    def _as_owner(self) -> dict[str, object]:
        # PostgreSQL refuses to run as root: run it as the `postgres` user then.
        if os.geteuid() != 0:
            return {}
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ServiceUnavailable("running as root and there is no `postgres` user") from exc
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def start(self) -> None:
        bindir = postgres_bindir()
        owner = self._as_owner()
        self.base.mkdir(parents=True, exist_ok=True)
        # The postgres user must traverse the session's temporary directory to reach its own.
        for d in (self.base.parent, self.base):
            d.chmod(0o755)
        for d in (self.datadir, self.sockdir):
            d.mkdir(exist_ok=True)
            d.chmod(0o700)
            if owner:
                os.chown(d, int(owner["user"]), int(owner["group"]))  # type: ignore[call-overload]
        with self.log.open("ab") as log:
            subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.datadir),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=120,
                cwd="/",
                **owner,  # type: ignore[arg-type]
            )
        self.port = free_port()
        self.launch()
        LOG_FILES.append(("postgres", self.log))

    def launch(self) -> None:
        """Start the postmaster on the existing data directory (also used to restart it)."""
        bindir = postgres_bindir()
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                str(bindir / "postgres"),
                "-D",
                str(self.datadir),
                "-p",
                str(self.port),
                "-k",
                str(self.sockdir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
            **self._as_owner(),  # type: ignore[arg-type]
        )
        log.close()
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"postgres not ready after {timeout}s: {last}\n{tail(self.log)}")

    def dsn(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL, as CLIENTELA_DATABASE_URL expects it."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        if self.proc is not None:
            # SIGINT is PostgreSQL's "fast" shutdown; SIGKILL after the grace period.
            _terminate(self.proc, signal.SIGINT, grace=30, group=True)
            self.proc = None

    def stop_immediate(self) -> None:
        """`pg_ctl stop -m immediate`: every backend quits at once, as in a crash; `launch` starts again."""
        assert self.proc is not None
        subprocess.run(
            [str(postgres_bindir() / "pg_ctl"), "stop", "-D", str(self.datadir), "-m", "immediate", "-w"],
            capture_output=True,
            check=True,
            timeout=90,
            cwd="/",
            **self._as_owner(),  # type: ignore[arg-type]
        )
        self.proc.wait(timeout=30)
        self.proc = None


@dataclass
class RedisServer:
    """A throwaway Redis owned by this test session (no persistence)."""

    base: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    # When set, Redis requires it (AUTH); it is kept in a 0600 config file, never on a command line.
    password: str | None = None

    @property
    def log(self) -> Path:
        return self.base / "redis.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceUnavailable("redis-server not found")
        self.base.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        config: list[str] = []
        if self.password:
            path = self.base / "redis.conf"
            path.write_text(f"requirepass {self.password}\n")
            path.chmod(0o600)
            config.append(str(path))
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                *config,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.base),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        if ("redis", self.log) not in LOG_FILES:
            LOG_FILES.append(("redis", self.log))
        self.wait_ready()

    def client(self, timeout: float = 5):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=timeout)

    def wait_ready(self, timeout: float = 30) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                if self.client().ping():
                    return
            except redis.RedisError:
                time.sleep(0.1)
        raise RuntimeError(f"redis not ready after {timeout}s\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, signal.SIGTERM, grace=15, group=True)
            self.proc = None

    def restart_empty(self) -> None:
        """kill -9 this Redis (it keeps nothing on disk) and start it again on the same port."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None
        self.start()


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
            [clientela_bin(), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(self.cwd),
            env=dict(self.env),
            start_new_session=True,
        )
        log.close()
        if (self.name, self.log) not in LOG_FILES:
            LOG_FILES.append((self.name, self.log))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 30) -> None:
        """Stop the process and its children (the prefork pool) by the group we started it in."""
        if self.proc is not None:
            _terminate(self.proc, sig, grace=grace, group=True)
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
    out = subprocess.run(
        [clientela_bin(), *args],
        env=dict(env),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"clientela {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out.stdout


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
