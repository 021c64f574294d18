"""Embedded mode: `clientela serve` with no database or broker URL runs the reference example by itself."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.helpers import REFERENCE_EXAMPLE, REFERENCE_STORED, post_batch, strip_ids, wait_for_batch
from tests.services import clean_env, create_tenant, start_server


def test_reference_example_in_embedded_mode(tmp_path: Path) -> None:
    workdir = tmp_path / "embedded"
    workdir.mkdir()
    env = clean_env()
    server = start_server("embedded-server", env, tmp_path / "logs", cwd=workdir)
    try:
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
    finally:
        server.stop()
