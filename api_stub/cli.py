"""The ``clientela`` command: migrate, serve, worker, beat, tenant create, bench, on top of both packages."""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import orjson
import typer
from pydantic import ValidationError

from worker.config import configure_logging, get_settings

cli = typer.Typer(
    help="clientela: customer master-data batch ingestion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
tenant_cli = typer.Typer(help="Manage tenants.", no_args_is_help=True)
cli.add_typer(tenant_cli, name="tenant")

# The worker host is the part that can wait: a producer waits for its POST's answer, a chunk only for its
# turn. Measured with the bench on this 2-core machine, the worker host at nice 10 against 0: POST p99 258
# and 188 ms against 326 and 364, at the same rate.
WORKER_NICE = 10


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


def _settings_or_exit() -> None:
    try:
        get_settings()
    except ValidationError as exc:
        # Each error under its variable's name, and never with the value given: it may be the secret key.
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"CLIENTELA_{str(error['loc'][0]).upper()}: {message}" if error["loc"] else message)
        _configuration_error("; ".join(lines))
    except ValueError as exc:
        # pydantic-settings' own refusals, before any field is validated, name the variable themselves.
        _configuration_error(str(exc))


def _configuration_error(message: str) -> NoReturn:
    typer.echo(f"configuration error: {message}", err=True)
    raise typer.Exit(2) from None


@contextlib.contextmanager
def _database() -> Iterator[None]:
    """Turn a database that cannot be reached or used into one line that says which, and exit 1."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    settings = get_settings()
    try:
        if settings.embedded:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        yield
    except (SQLAlchemyError, OSError) as exc:
        where = make_url(settings.sqlalchemy_url).render_as_string(hide_password=True)
        cause = getattr(exc, "orig", None) or exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        typer.echo(f"cannot use the database at {where}: {reason}", err=True)
        raise typer.Exit(1) from None


def _needs_services(command: str) -> None:
    if get_settings().embedded:
        _configuration_error(
            f"embedded mode runs its worker and reconciler inside `clientela serve`; `clientela {command}` "
            "needs CLIENTELA_DATABASE_URL and CLIENTELA_BROKER_URL"
        )


@cli.command()
def migrate() -> None:
    """Create or upgrade the schema (Alembic upgrade head); idempotent."""
    _settings_or_exit()
    configure_logging()
    from worker.migrate import upgrade

    with _database():
        upgrade()
    typer.echo("schema is at head")


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Receiver processes sharing the port; more than one only outside embedded mode. The bodies "
            "one process parses take turns at Python's lock; each process parses its own.",
        ),
    ] = 1,
) -> None:
    """Run the HTTP receiver; in embedded mode also a worker and the reconciler, in-process."""
    _settings_or_exit()
    configure_logging()
    import uvicorn

    settings = get_settings()
    if processes > 1:
        if settings.embedded:
            _configuration_error(
                "embedded mode runs in one process; --processes above 1 needs "
                "CLIENTELA_DATABASE_URL and CLIENTELA_BROKER_URL"
            )
        # uvicorn starts each process afresh and has it build the app from this name.
        uvicorn.run(
            "api_stub.app:served_app", factory=True, host=host, port=port, workers=processes, log_level="info"
        )
        return

    from api_stub.app import served_app

    runtime = None
    if settings.embedded:
        from api_stub.embedded import EmbeddedRuntime
        from worker.migrate import upgrade

        with _database():
            upgrade()
        runtime = EmbeddedRuntime(settings)
        runtime.start()
        typer.echo(
            f"clientela (embedded mode: {settings.sqlalchemy_url}, in-process worker) on http://{host}:{port}\n"
            "Get a subscription key:  clientela tenant create NAME   (run it in this same directory)\n"
            f"Then a token:            curl -X POST http://{host}:{port}/v1/token "
            '-H "Ocp-Apim-Subscription-Key: KEY"'
        )
    try:
        uvicorn.run(served_app(), host=host, port=port, log_level="info")
    finally:
        if runtime is not None:
            runtime.stop()


@cli.command()
def worker(
    concurrency: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 2,
    loglevel: Annotated[LogLevel, typer.Option(help="Celery log level.")] = LogLevel.INFO,
    nice: Annotated[
        int,
        typer.Option(
            min=0,
            max=19,
            help="CPU priority to give up (a nice value): what shares the machine, the receiver above all, "
            "runs first. 0 keeps it.",
        ),
    ] = WORKER_NICE,
) -> None:
    """Run a Celery worker for the ingestion queue."""
    _settings_or_exit()
    _needs_services("worker")
    from worker.tasks import QUEUE, app, keep_freed_memory

    _give_up_cpu_priority(nice)
    # Before the pool processes are forked: they inherit the setting.
    keep_freed_memory()

    app.worker_main(
        [
            "worker",
            f"--queues={QUEUE}",
            f"--concurrency={concurrency}",
            f"--loglevel={loglevel.value}",
            f"--hostname=ingest-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _give_up_cpu_priority(nice: int) -> None:
    """Lower the priority of this process and the pool processes it will fork.

    Linux schedules the processes of one session as a group (autogroup) against other sessions, and a
    process's nice value only weighs within its group: a worker host leading its own session (a service,
    a container, or started with setsid) lowers its group's priority too. A worker started from a shell
    shares that shell's group, which is left alone.
    """
    if nice == 0:
        return
    os.nice(nice)
    if os.getsid(0) == os.getpid():
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(str(nice))


@cli.command()
def beat(loglevel: Annotated[LogLevel, typer.Option(help="Celery log level.")] = LogLevel.INFO) -> None:
    """Run the periodic scheduler (the reconciler); one per deployment."""
    _settings_or_exit()
    _needs_services("beat")
    from worker.tasks import app

    # The schedule file only remembers when the reconciler last ran, which a restart may forget: a private
    # directory keeps two beats apart and goes with this one, where a file per pid piled up in /tmp.
    with tempfile.TemporaryDirectory(prefix="clientela-beat-") as directory:
        app.start(["beat", f"--loglevel={loglevel.value}", f"--schedule={Path(directory) / 'schedule'}"])


@tenant_cli.command("create")
def tenant_create(name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)]) -> None:
    """Create a tenant and print its subscription key as one JSON line."""
    _settings_or_exit()
    from api_stub.auth import TenantExists, create_tenant
    from worker.models import TENANT_NAME_LENGTH as longest

    if not name.strip() or len(name) > longest or any(unicodedata.category(c) == "Cc" for c in name):
        typer.echo(
            f"a tenant name is 1 to {longest} characters, not all spaces, and no control characters", err=True
        )
        raise typer.Exit(2)

    with _database():
        if get_settings().embedded:
            from worker.migrate import upgrade

            upgrade()
        try:
            key = create_tenant(name)
        except TenantExists:
            typer.echo(f"tenant {name!r} already exists", err=True)
            raise typer.Exit(1) from None
    sys.stdout.write(orjson.dumps({"tenant": name, "subscriptionKey": key}).decode() + "\n")


@cli.command()
def bench(
    batches: Annotated[int, typer.Option(min=1, help="Batches in the timed run.")] = 20,
    items: Annotated[int, typer.Option(min=1, max=10_000, help="Items per batch.")] = 10_000,
    processes: Annotated[int, typer.Option(min=1, help="Processes of the one worker host.")] = 2,
    receiver_processes: Annotated[
        int, typer.Option(min=1, help="Processes of the receiver (its serve --processes).")
    ] = 1,
    producers: Annotated[int, typer.Option(min=1, help="Threads submitting batches at once.")] = 2,
    worker_nice: Annotated[int, typer.Option(min=0, max=19, help="The worker host's --nice.")] = WORKER_NICE,
    seed: Annotated[int, typer.Option(help="Seed of the generated customers: same seed, same batches.")] = 1,
    json_line: Annotated[
        bool, typer.Option("--json", help="Also print every figure as one JSON line.")
    ] = False,
    statements: Annotated[
        bool,
        typer.Option(
            "--statements",
            help="Also print PostgreSQL's time by statement (pg_stat_statements: the private server loads "
            "it; a given one must have it in shared_preload_libraries).",
        ),
    ] = False,
) -> None:
    """Measure a deployment end to end and print the figures next to their targets.

    Runs its own receiver and worker host, on private PostgreSQL and Redis unless the URLs are set.
    Point CLIENTELA_BROKER_URL at a Redis database that no other worker consumes.
    """
    _settings_or_exit()
    from api_stub.bench import BenchOptions, run

    options = BenchOptions(
        batches, items, processes, receiver_processes, producers, worker_nice, seed, json_line, statements
    )
    raise typer.Exit(run(options))


def main() -> None:
    cli()
