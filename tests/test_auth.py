"""Authentication and tenant isolation: exact 401 bodies, and nothing of another tenant is visible."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import jwt
import pytest

from tests.conftest import SECRET_KEY, Tenant
from tests.helpers import UNAUTHORIZED, post_batch, run_batch, unique_code
from tests.services import LOG_FILES, Server


def test_token_endpoint(server: Server, tenant: Tenant) -> None:
    r = httpx.post(f"{server.base_url}/v1/token", headers={"Ocp-Apim-Subscription-Key": tenant.key})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    claims = jwt.decode(body["access_token"], SECRET_KEY, algorithms=["HS256"])
    assert claims["sub"] == tenant.id
    assert 3500 <= claims["exp"] - time.time() <= 3700


@pytest.mark.parametrize("key", [None, "", "wrong-key", "x" * 500])
def test_token_endpoint_refuses_a_bad_key(server: Server, key: str | None) -> None:
    headers = {} if key is None else {"Ocp-Apim-Subscription-Key": key}
    r = httpx.post(f"{server.base_url}/v1/token", headers=headers)
    assert r.status_code == 401
    assert r.json() == UNAUTHORIZED


def token_for(sub: str, exp_offset: int, secret: str = SECRET_KEY) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + exp_offset}, secret, algorithm="HS256")


OTHER_SECRET = "another-secret-another-secret-0123456789"


def bad_credentials(tenant: Tenant, other: Tenant) -> dict[str, dict[str, str]]:
    return {
        "no headers": {},
        "missing key": {"Authorization": f"Bearer {tenant.token}"},
        "wrong key": {"Ocp-Apim-Subscription-Key": "not-a-key", "Authorization": f"Bearer {tenant.token}"},
        "missing token": {"Ocp-Apim-Subscription-Key": tenant.key},
        "not bearer": {"Ocp-Apim-Subscription-Key": tenant.key, "Authorization": f"Basic {tenant.token}"},
        "garbage token": {"Ocp-Apim-Subscription-Key": tenant.key, "Authorization": "Bearer garbage.token.x"},
        "expired token": {
            "Ocp-Apim-Subscription-Key": tenant.key,
            "Authorization": f"Bearer {token_for(tenant.id, -60)}",
        },
        "token signed with another secret": {
            "Ocp-Apim-Subscription-Key": tenant.key,
            "Authorization": f"Bearer {token_for(tenant.id, 600, OTHER_SECRET)}",
        },
        "unsigned token": {
            "Ocp-Apim-Subscription-Key": tenant.key,
            "Authorization": "Bearer "
            + jwt.encode({"sub": tenant.id, "exp": int(time.time()) + 600}, None, algorithm="none"),
        },
        "token of another tenant": {
            "Ocp-Apim-Subscription-Key": tenant.key,
            "Authorization": f"Bearer {other.token}",
        },
        "key of another tenant": {
            "Ocp-Apim-Subscription-Key": other.key,
            "Authorization": f"Bearer {tenant.token}",
        },
    }


def test_every_customers_route_answers_401_for_bad_credentials(
    server: Server, make_tenant: Callable[[], Tenant], workers: object
) -> None:
    tenant, other = make_tenant(), make_tenant()
    code = unique_code("A")
    batch = run_batch(tenant.client, [{"code": code, "name": "mine"}])
    requests = [
        ("POST", "/v1/customers/batch-create"),
        ("GET", f"/v1/customers/batches/{batch['batchId']}"),
        ("GET", "/v1/customers/batches"),
        ("GET", f"/v1/customers/{code}"),
    ]
    failures = []
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        for label, headers in bad_credentials(tenant, other).items():
            for method, path in requests:
                h = {**headers, "Content-Type": "application/json"}
                r = c.request(
                    method,
                    path,
                    headers=h,
                    content=b'[{"code": "Z", "name": "z"}]' if method == "POST" else None,
                )
                if r.status_code != 401 or r.json() != UNAUTHORIZED:
                    failures.append((label, method, path, r.status_code, r.text[:200]))
    assert failures == []
    # Nothing was created by the refused requests.
    listed = tenant.client.get("/v1/customers/batches").json()["batches"]
    assert [b["batchId"] for b in listed] == [batch["batchId"]]


def test_auth_comes_before_envelope_checks(server: Server, tenant: Tenant) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = c.post("/v1/customers/batch-create", content=b"not json", headers={"Content-Type": "text/plain"})
    assert r.status_code == 401
    assert r.json() == UNAUTHORIZED


def test_tenants_see_only_their_own_batches_and_customers(
    make_tenant: Callable[[], Tenant], workers: object
) -> None:
    alice, bob = make_tenant(), make_tenant()
    code = unique_code("I")
    batch = run_batch(alice.client, [{"code": code, "name": "Alice's"}])
    assert batch["created"] == 1

    r = bob.client.get(f"/v1/customers/batches/{batch['batchId']}")
    assert r.status_code == 404
    assert r.json() == {"statusCode": 404, "errors": [{"message": "Batch not found"}]}

    r = bob.client.get(f"/v1/customers/{code}")
    assert r.status_code == 404
    assert r.json() == {"statusCode": 404, "errors": [{"message": "Customer not found"}]}

    assert bob.client.get("/v1/customers/batches").json() == {"batches": [], "nextBefore": None}

    assert alice.client.get(f"/v1/customers/{code}").status_code == 200
    r = alice.client.get("/v1/customers/batches/00000000-0000-0000-0000-000000000000")
    assert r.status_code == 404
    assert r.json() == {"statusCode": 404, "errors": [{"message": "Batch not found"}]}
    r = alice.client.get("/v1/customers/batches/not-a-uuid")
    assert r.status_code == 404
    assert r.json() == {"statusCode": 404, "errors": [{"message": "Batch not found"}]}
    r = alice.client.get(f"/v1/customers/{unique_code('none')}")
    assert r.status_code == 404
    assert r.json() == {"statusCode": 404, "errors": [{"message": "Customer not found"}]}


def test_keys_are_not_stored_in_plain_text(tenant: Tenant, db: Callable[..., list[object]]) -> None:
    tables = [
        r[0] for r in db("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    ]
    for table in tables:
        rows = db(f'SELECT t::text FROM "{table}" t')
        assert not any(tenant.key in str(row[0]) for row in rows), (
            f"subscription key in plain text in {table}"
        )


def test_batch_create_with_prefer_is_also_authenticated(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        r = post_batch(c, [{"code": "x", "name": "y"}], prefer="wait=5")
    assert r.status_code == 401
    assert r.json() == UNAUTHORIZED


def test_no_secret_in_any_log(tenant: Tenant) -> None:
    run_batch(tenant.client, [{"code": unique_code("L"), "name": "logged?"}])
    for name, path in LOG_FILES:
        text = path.read_text(errors="replace") if path.exists() else ""
        assert tenant.key not in text, f"subscription key in the {name} log"
        assert tenant.token not in text, f"access token in the {name} log"
        assert SECRET_KEY not in text, f"secret key in the {name} log"
