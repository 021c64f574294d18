"""Embedded mode: `clientela serve` with no database or broker URL runs the reference example by itself."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers import REFERENCE_EXAMPLE, REFERENCE_STORED, post_batch, strip_ids, submit, wait_for_batch
from tests.services import Server, clean_env, create_tenant, start_server


@contextmanager
def embedded_server(tmp_path: Path, **settings: str) -> Iterator[tuple[Server, Path, dict[str, str]]]:
    workdir = tmp_path / "embedded"
    workdir.mkdir()
    env = clean_env(**settings)
    server = start_server("embedded-server", env, tmp_path / "logs", cwd=workdir)
    try:
        yield server, workdir, env
    finally:
        server.stop()


def tenant_client(server: Server, workdir: Path, env: dict[str, str], name: str) -> httpx.Client:
    key = create_tenant(name, env, cwd=workdir)["subscriptionKey"]
    token = httpx.post(f"{server.base_url}/v1/token", headers={"Ocp-Apim-Subscription-Key": key})
    assert token.status_code == 200, token.text
    headers = {"Ocp-Apim-Subscription-Key": key, "Authorization": f"Bearer {token.json()['access_token']}"}
    return httpx.Client(base_url=server.base_url, headers=headers, timeout=60)


def test_concurrent_submissions_cannot_overshoot_the_cap_in_embedded_mode(tmp_path: Path) -> None:
    """SQLite has no row lock to count a tenant's submissions one after another; they still are."""
    with embedded_server(tmp_path, CLIENTELA_MAX_ITEMS_IN_PROGRESS="10000") as (server, workdir, env):
        busy = [tenant_client(server, workdir, env, f"busy-{b}") for b in range(4)]
        capped = tenant_client(server, workdir, env, "capped")
        # Any two of these are over the cap together.
        bodies = [[{"code": f"CAP-{b}-{i}", "name": "c"} for i in range(5_001)] for b in range(8)]
        # The one worker thread kept busy with other tenants (a batch each, their cap too), so that no batch
        # of this one ends meanwhile.
        busy_batches = [submit(c, [{"code": f"BUSY-{i}", "name": "b"} for i in range(10_000)]) for c in busy]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda items: post_batch(capped, items), bodies))
        assert busy[-1].get(f"/v1/customers/batches/{busy_batches[-1]}").status_code == 423, "not kept busy"
        assert sorted(r.status_code for r in answers) == [202] + [429] * 7


def test_reference_example_in_embedded_mode(tmp_path: Path) -> None:
    with embedded_server(tmp_path) as (server, workdir, env):
        data = create_tenant("embedded-tenant", env, cwd=workdir)
        assert data["tenant"] == "embedded-tenant"
        key = data["subscriptionKey"]
        token = httpx.post(f"{server.base_url}/v1/token", headers={"Ocp-Apim-Subscription-Key": key})
        assert token.status_code == 200, token.text
        headers = {
            "Ocp-Apim-Subscription-Key": key,
            "Authorization": f"Bearer {token.json()['access_token']}",
        }
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
            r = post_batch(client, raw=REFERENCE_EXAMPLE)
            assert r.status_code == 202, r.text
            batch_id = r.json()["batchId"]
            assert r.json() == {
                "statusCode": 202,
                "message": "Batch accepted",
                "batchId": batch_id,
                "status": "QUEUED",
                "total": 1,
            }
            body = wait_for_batch(client, batch_id, timeout=60)
            assert body["status"] == "COMPLETED"
            assert (body["total"], body["processed"], body["created"], body["failed"]) == (1, 1, 1, 0)
            assert strip_ids(body["results"]) == [{"index": 0, "status": "CREATED", "code": "CLI-001"}]
            customer = client.get("/v1/customers/CLI-001")
            assert customer.status_code == 200
            assert {k: customer.json().get(k) for k in REFERENCE_STORED} == REFERENCE_STORED
            assert httpx.get(f"{server.base_url}/readyz").status_code == 200

            # Idempotency-Key works on SQLite too.
            items = [{"code": "CLI-002", "name": "Second"}]
            first = post_batch(client, items, headers={"Idempotency-Key": "emb-1"})
            again = post_batch(client, items, headers={"Idempotency-Key": "emb-1"})
            assert first.status_code == again.status_code == 202
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json() == first.json()
            other = post_batch(
                client, [{"code": "CLI-003", "name": "Third"}], headers={"Idempotency-Key": "emb-1"}
            )
            assert other.status_code == 422

            # Zero keeps no sign on SQLite either, whichever way the worker read it.
            zeros = {"ZERO-0": "-0", "ZERO-1": "-0.0", "ZERO-2": "-0e99999999999999999999"}
            raw = ", ".join(f'{{"code": "{c}", "name": "z", "quota": {n}}}' for c, n in zeros.items())
            body = wait_for_batch(client, post_batch(client, raw=f"[{raw}]").json()["batchId"], timeout=60)
            assert body["created"] == len(zeros)
            assert [client.get(f"/v1/customers/{c}").json()["quota"] for c in zeros] == ["0.00"] * 3
        assert (workdir / "clientela.db").exists(), sorted(p.name for p in workdir.iterdir())


def test_a_killed_embedded_server_finishes_its_batches_as_soon_as_it_is_back(tmp_path: Path) -> None:
    """The in-process queue dies with the server; the chunks left pending are handed out when it starts
    again, not a lease (60 s) later, and every item ends once."""
    with embedded_server(tmp_path) as (server, workdir, env):
        client = tenant_client(server, workdir, env, "restarted")
        batch_ids = [
            submit(client, [{"code": f"K-{b}-{i}", "name": "k"} for i in range(10_000)]) for b in range(4)
        ]
        server.process.stop(signal.SIGKILL)
        server.start()
        started = time.monotonic()
        for batch_id in batch_ids:
            done = wait_for_batch(client, batch_id, timeout=60)
            assert (done["status"], done["created"], len(done["results"])) == ("COMPLETED", 10_000, 10_000)
        assert time.monotonic() - started < 30, "the pending chunks waited for their lease"
        assert client.get("/v1/customers/batches", params={"status": "RUNNING"}).json()["batches"] == []
