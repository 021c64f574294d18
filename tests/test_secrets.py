"""No secret in a log line, an HTTP answer or a Redis message.

A private stack (Redis with a password, a receiver and a worker) runs a whole session of a client: tokens,
batches carrying secret-looking values, status polls, record reads, refused requests. Every log line of
those processes, every answer received and every command Redis saw (MONITOR, with Celery's base64 message
bodies decoded) is then searched for the subscription key, the access token, the signing secret, the Redis
password and the values sent inside items."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import wait_for_batch
from tests.report import figure
from tests.services import RedisServer, Server, Workers, create_tenant, start_server

MONITOR_STOP = "secrets-test-monitor-stop"
MAX_MONITOR_LINES = 200_000


@dataclass
class Monitor:
    """Every command Redis executes, recorded by a MONITOR connection in a thread until told to stop."""

    redis: RedisServer
    lines: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None
    failure: BaseException | None = None

    def start(self) -> None:
        ready = threading.Event()

        def record() -> None:
            try:
                with self.redis.client(timeout=120).monitor() as monitor:
                    ready.set()
                    while len(self.lines) < MAX_MONITOR_LINES:
                        command = monitor.next_command()["command"]
                        if MONITOR_STOP in command:
                            return
                        self.lines.append(command)
            except BaseException as exc:
                self.failure = exc
                ready.set()

        self.thread = threading.Thread(target=record, name="redis-monitor", daemon=True)
        self.thread.start()
        assert ready.wait(30), "MONITOR did not start"
        # MONITOR is in effect once this command shows up in it.
        self.redis.client().echo("monitor-started")
        deadline = time.monotonic() + 30
        while not any("monitor-started" in line for line in self.lines):
            assert self.failure is None, self.failure
            assert time.monotonic() < deadline, "MONITOR saw nothing"
            time.sleep(0.05)

    def stop(self) -> None:
        self.redis.client().echo(MONITOR_STOP)
        assert self.thread is not None
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "MONITOR thread did not stop"
        assert self.failure is None, self.failure
        assert len(self.lines) < MAX_MONITOR_LINES, "MONITOR capture was cut short"


def decoded_bodies(lines: list[str]) -> list[str]:
    """The message bodies Celery pushes to Redis, which kombu base64-encodes inside its JSON envelope."""
    bodies = []
    for line in lines:
        for encoded in re.findall(r'"body": "([A-Za-z0-9+/=]+)"', line):
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                bodies.append(base64.b64decode(encoded).decode())
    return bodies


@dataclass
class Stack:
    redis: RedisServer
    server: Server
    workers: Workers
    logs: Path


@pytest.fixture
def stack(migrated: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    """Redis with a password, a receiver and one worker, with their own signing secret, logs in tmp_path."""
    store = RedisServer(tmp_path / "redis", password=secrets.token_urlsafe(24))
    started: list[Any] = [store]
    try:
        store.start()
        env = {
            **migrated,
            "CLIENTELA_BROKER_URL": store.url,
            "CLIENTELA_SECRET_KEY": secrets.token_urlsafe(48),
            "CLIENTELA_CHUNK_SIZE": "3",
        }
        logs = tmp_path / "logs"
        server = start_server("secrets-server", env, logs)
        started.append(server)
        workers = Workers(env, logs, count=1)
        workers.processes[0].name = "secrets-worker"
        started.append(workers)
        workers.start()
        yield Stack(store, server, workers, logs)
    finally:
        for thing in reversed(started):
            thing.stop()


@dataclass
class Capture:
    """Every answer a client received, headers and body, in the order received."""

    responses: list[httpx.Response] = field(default_factory=list)

    def hook(self, response: httpx.Response) -> None:
        response.read()
        self.responses.append(response)

    def client(self, base_url: str, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=base_url, headers=headers, timeout=60, event_hooks={"response": [self.hook]}
        )


def as_text(response: httpx.Response) -> str:
    head = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    return f"{response.status_code}\n{head}\n\n{response.text}"


def test_no_secret_in_logs_answers_or_broker_traffic(
    stack: Stack, migrated: dict[str, str], db: Callable[..., list[Any]]
) -> None:
    monitor = Monitor(stack.redis)
    monitor.start()
    capture = Capture()
    env = {**migrated, "CLIENTELA_BROKER_URL": stack.redis.url}
    key = create_tenant(f"t-{uuid.uuid4().hex[:12]}", env)["subscriptionKey"]
    base = stack.server.base_url
    item_password = f"pw-{secrets.token_urlsafe(16)}"
    item_document = f"id-{secrets.token_urlsafe(16)}"
    codes = [f"S-{uuid.uuid4().hex[:10]}" for _ in range(4)]
    items = [
        {"code": codes[0], "name": "with a password", "password": item_password},
        {"code": codes[1], "name": "with an identity document", "identityDocument": item_document},
        {"code": codes[2], "name": {"password": item_password}, "quota": item_document},
        {"code": codes[3], "name": "plain"},
        {"code": codes[0], "name": "duplicate", "password": item_password, "identityDocument": item_document},
    ]

    with capture.client(base) as anonymous:
        token = anonymous.post("/v1/token", headers={"Ocp-Apim-Subscription-Key": key}).json()["access_token"]
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
        refused = [
            anonymous.post("/v1/token", headers={"Ocp-Apim-Subscription-Key": key + "x"}),
            anonymous.get("/v1/customers/batches", headers={"Ocp-Apim-Subscription-Key": key}),
            anonymous.get("/v1/customers/batches", headers={"Authorization": f"Bearer {token}"}),
            anonymous.get(
                "/v1/customers/batches",
                headers={"Ocp-Apim-Subscription-Key": key, "Authorization": f"Bearer {token}x"},
            ),
        ]
        assert [r.status_code for r in refused] == [401] * 4
    auth = {"Ocp-Apim-Subscription-Key": key, "Authorization": f"Bearer {token}"}
    with capture.client(base, auth) as client:
        batch_ids = []
        for _ in range(2):
            r = client.post("/v1/customers/batch-create", json=items)
            assert r.status_code == 202, r.text
            batch_ids.append(r.json()["batchId"])
        r = client.post(
            "/v1/customers/batch-create", json=items, headers={"Prefer": "wait=30", "Idempotency-Key": "k-1"}
        )
        assert r.status_code == 422, r.text
        batch_ids.append(r.json()["batchId"])
        bodies = [wait_for_batch(client, b, timeout=120) for b in batch_ids]
        # Unknown keys are refused per item, so only the plain item is created (once).
        assert [b["created"] for b in bodies] == [1, 0, 0]
        assert client.get("/v1/customers/batches").status_code == 200
        for code in codes:
            assert client.get(f"/v1/customers/{code}").status_code == (200 if code == codes[3] else 404)
        assert (
            client.post(
                "/v1/customers/batch-create",
                content=b'[{"password": "' + item_password.encode() + b'",}]',
                headers={"Content-Type": "application/json"},
            ).status_code
            == 400
        )
    monitor.stop()

    # The capture saw what the search is about: each chunk's message, with its body decoded, and the
    # worker's log of each task.
    chunk_ids = [str(r[0]) for r in db("SELECT id FROM chunks WHERE batch_id::text = ANY(:b)", b=batch_ids)]
    assert len(chunk_ids) == 6
    decoded = decoded_bodies(monitor.lines)
    assert all(any(chunk in body for body in decoded) for chunk in chunk_ids), "chunk messages not captured"
    worker_log = stack.workers.processes[0].log.read_text(errors="replace")
    assert worker_log.count("clientela.process_chunk[") >= len(chunk_ids), "the worker log shows no tasks"
    # The items themselves are gone once processed: no chunk keeps its payload.
    assert db(
        "SELECT count(*) FROM chunks WHERE batch_id::text = ANY(:b) AND payload IS NOT NULL", b=batch_ids
    ) == [(0,)]

    logs = {path.name: path.read_text(errors="replace") for path in sorted(stack.logs.glob("*.log"))}
    logs["redis.log"] = stack.redis.log.read_text(errors="replace")
    answers = [(f"{r.request.method} {r.request.url.path}", as_text(r)) for r in capture.responses]
    searched = [
        *(("log " + name, text) for name, text in logs.items()),
        *(("MONITOR", line) for line in monitor.lines),
        *(("MONITOR body", body) for body in decoded),
        *(("answer to " + label, text) for label, text in answers),
    ]
    secrets_sent = {
        "subscription key": key,
        "access token": token,
        "signing secret": stack.server.process.env["CLIENTELA_SECRET_KEY"],
        "Redis password": stack.redis.password,
        "item password": item_password,
        "item identity document": item_document,
    }

    def places(value: str) -> list[str]:
        return [where for where, text in searched if value in text]

    found = [
        (name, where)
        for name, value in secrets_sent.items()
        for where in places(value)
        if not (name == "access token" and where == "answer to POST /v1/token")
    ]
    log_bytes = sum(len(text.encode()) for text in logs.values())
    figure(
        "secrets",
        f"{len(secrets_sent)} secrets searched in {log_bytes} log bytes ({len(logs)} files), "
        f"{len(monitor.lines)} MONITOR lines ({len(decoded)} message bodies decoded), "
        f"{len(answers)} HTTP answers: {len(found)} found",
    )
    assert found == []
    # What is no secret is found where it belongs, so a secret in the same places would have been found.
    assert places(token) == ["answer to POST /v1/token"]
    assert "log secrets-server.log" in places(f"/v1/customers/{codes[3]}")
    assert f"answer to GET /v1/customers/{codes[3]}" in places(codes[3])
    assert "MONITOR body" in places(chunk_ids[0])
