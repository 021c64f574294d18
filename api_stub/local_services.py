"""Private PostgreSQL and Redis servers, for the test suite and for ``clientela bench``.

Each server runs from a temporary directory on a free port bound to 127.0.0.1 and is stopped by the pid
it was started with: servers already running on the machine, on standard ports, are never touched.
"""

from __future__ import annotations

import contextlib
import glob
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis


class ServiceUnavailable(RuntimeError):
    """A server binary (or the user to run it as) is not installed on this machine."""


def clientela_command() -> str:
    """The `clientela` console script of this interpreter, so that children run the same installation."""
    beside = Path(sys.executable).parent / "clientela"
    found = str(beside) if beside.exists() else shutil.which("clientela")
    if found is None:
        raise ServiceUnavailable("the clientela console script is not installed (pip install -e .)")
    return found


class CommandFailed(RuntimeError):
    """A `clientela` command exited with an error; the message holds its output."""


def clientela_outcome(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a short `clientela` command to its end, whatever its exit code; its output captured."""
    return subprocess.run(
        [clientela_command(), *args],
        env=dict(env),
        cwd=str(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_clientela(args: list[str], env: Mapping[str, str], cwd: Path, timeout: float) -> str:
    """Run a short `clientela` command and return its standard output; a failure raises CommandFailed."""
    out = clientela_outcome(args, env, cwd, timeout)
    if out.returncode != 0:
        raise CommandFailed(
            f"clientela {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
        )
    return out.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def terminate(proc: subprocess.Popen[bytes], sig: int, grace: float, group: bool) -> None:
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


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster in ``base``; ``settings`` are passed to the server as ``-c`` pairs."""

    base: Path
    settings: dict[str, str] = field(default_factory=dict)
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

    def _as_owner(self) -> dict[str, Any]:
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
        # The postgres user must traverse the caller's temporary directory to reach its own.
        for d in (self.base.parent, self.base):
            d.chmod(0o755)
        for d in (self.datadir, self.sockdir):
            d.mkdir(exist_ok=True)
            d.chmod(0o700)
            if owner:
                os.chown(d, owner["user"], owner["group"])
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
                    # The cluster is thrown away with its directory; what runs on it syncs per `settings`.
                    "--no-sync",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=120,
                cwd="/",
                **owner,
            )
        self.port = free_port()
        self.launch()

    def launch(self) -> None:
        """Start the postmaster on the existing data directory (also used to restart it)."""
        bindir = postgres_bindir()
        settings = {"listen_addresses": "127.0.0.1", **self.settings}
        options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
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
                *options,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
            **self._as_owner(),
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
            terminate(self.proc, signal.SIGINT, grace=30, group=True)
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
            **self._as_owner(),
        )
        self.proc.wait(timeout=30)
        self.proc = None


@dataclass
class RedisServer:
    """A throwaway Redis in ``base`` (no persistence)."""

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
        self.wait_ready()

    def client(self, timeout: float = 5) -> redis.Redis[bytes]:
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
            terminate(self.proc, signal.SIGTERM, grace=15, group=True)
            self.proc = None

    def restart_empty(self) -> None:
        """kill -9 this Redis (it keeps nothing on disk) and start it again on the same port."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None
        self.start()
