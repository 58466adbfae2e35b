"""GET /v1/duplicates (proxy/control/duplicates_api.py) and Store.list_idempotency behind it.

Fast tests: the real control app in process on loopback (aiohttp TestServer) over a
real SQLite store, tokens from the embedded dev issuer; the store listing also on
PostgreSQL (PROCTOR_TEST_POSTGRES_DSN, as in tests/test_store.py). What an operator
sees of a live key or window, and what never leaves the store: the agent's key, the
dedupe digest, the fingerprint, the stored body, other headers, a Location's query.
The end-to-end view (agents through a real proxy, the console) is in
tests/test_console_coordination.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import load_config
from proxy.control.api import build_app
from proxy.control.openapi import OPENAPI
from proxy.identity.dev_issuer import DevIssuer
from proxy.server import build_runtime
from proxy.store import Store
from proxy.store.idempotency import COMPLETED, IdempotencyEntry
from test_store import make_store, run  # noqa: F401 - the parametrised (sqlite, postgres) fixture

SECRET_KEY = "order-4711-for-jane.doe@example.com"  # an agent's own, telling Idempotency-Key
DIGEST = "v1:" + "ab" * 32
FINGERPRINT = "fp-" + "cd" * 16
BODY = b'{"iban": "DE89370400440532013000"}'


def entry(owner: str, *, scope: str = "idem:bot-a", key: str = SECRET_KEY, agent: str = "bot-a",
          created: float, ttl: float = 600, completed: bool = False, location: str | None = None,
          body: bytes | None = None) -> IdempotencyEntry:
    e = IdempotencyEntry(scope=scope, key=key, fingerprint=FINGERPRINT, owner=owner, agent_id=agent,
                         created_at=created, expires_at=created + ttl)
    if completed:
        e.state, e.status = COMPLETED, 201
        e.headers = {"content-type": "application/json", "etag": '"v1"', **({"location": location} if location else {})}
        e.body, e.body_stored = body, body is not None
    return e


async def fill(store: Store, now: float) -> None:
    """Four live entries (two keys, two windows) and one expired."""
    assert await store.reserve_idempotency(entry("d-key-a", created=now - 30), now - 30) is None
    done = entry("d-key-a", created=now - 30, completed=True, body=BODY,
                 location="https://user:pw@erp.example/orders/17?token=s3cr3t#frag")
    assert await store.complete_idempotency(done)
    assert await store.reserve_idempotency(
        entry("d-key-b", scope="idem:bot-b", key="k-b", agent="bot-b", created=now - 20), now - 20) is None
    win = entry("d-win-1", scope="dedupe:erp:POST /orders", key=DIGEST, agent="bot-b", created=now - 10)
    assert await store.reserve_idempotency(win, now - 10) is None
    win_done = entry("d-win-1", scope="dedupe:erp:POST /orders", key=DIGEST, agent="bot-b", created=now - 10,
                     completed=True, location="/orders/18")  # too large to keep: no body
    assert await store.complete_idempotency(win_done)
    assert await store.reserve_idempotency(
        entry("d-win-2", scope="dedupe:crm:PUT /accounts/{id}", key="v1:" + "ef" * 32, agent="bot-a",
              created=now - 5), now - 5) is None
    assert await store.reserve_idempotency(
        entry("d-gone", scope="idem:bot-c", key="old", agent="bot-c", created=now - 900, ttl=60), now - 900) is None


# ----------------------------------------------------------------------------- the store
def test_store_lists_live_entries_newest_first_without_bodies(make_store):  # noqa: F811
    now = 1_800_000_000.0

    async def body(store: Store):
        await fill(store, now)
        got = await store.list_idempotency(now)
        assert [e.owner for e in got] == ["d-win-2", "d-win-1", "d-key-b", "d-key-a"]  # newest first, expired out
        assert all(e.body is None for e in got)  # never read
        key_a = got[-1]
        assert key_a.state == COMPLETED and key_a.body_stored and key_a.status == 201
        assert [e.owner for e in await store.list_idempotency(now, kind="dedupe")] == ["d-win-2", "d-win-1"]
        assert [e.owner for e in await store.list_idempotency(now, kind="idempotency")] == ["d-key-b", "d-key-a"]
        assert [e.owner for e in await store.list_idempotency(now, agent="bot-a")] == ["d-win-2", "d-key-a"]
        assert [e.owner for e in await store.list_idempotency(now, kind="idempotency", agent="bot-b")] == ["d-key-b"]
        assert [e.owner for e in await store.list_idempotency(now, limit=2)] == ["d-win-2", "d-win-1"]
        assert await store.list_idempotency(now, agent="nobody") == []
        # a scope that merely contains the prefix text is not matched by it
        assert await store.reserve_idempotency(
            entry("d-odd", scope="xidem:z", key="z", agent="z", created=now), now) is None
        assert "d-odd" not in [e.owner for e in await store.list_idempotency(now, kind="idempotency")]

    run(make_store, body)


# ----------------------------------------------------------------------------- the route
@pytest.fixture
def runtime(tmp_path: Path):
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": "state", "control": {"listen": {"host": "127.0.0.1", "port": 0}}}))
    return build_runtime(load_config(cfg))


def _validator(name: str) -> jsonschema.Draft202012Validator:
    root = {**OPENAPI, "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())


def test_duplicates_route(runtime):
    cfg = runtime.config
    issuer = DevIssuer(cfg.dev_issuer_dir, cfg.dev_issuer)

    def person(user: str, *groups: str, ttl: str = "5m") -> dict:
        token = issuer.issue(user, {cfg.approvals.approver_groups_claim: list(groups)}, ttl,
                             audience=cfg.approvals.approver_audience)
        return {"Authorization": f"Bearer {token}"}

    operator = person("olga", cfg.control.admin_group)
    approver = person("ann", "procurement-managers")
    agent = {"Authorization": f"Bearer {issuer.issue('bot-a', {}, '5m')}"}

    async def main() -> None:
        await runtime.store.open()
        try:
            await fill(runtime.store, time.time())
            async with TestClient(TestServer(build_app(runtime))) as client:
                # who may look: operators only
                r = await client.get("/v1/duplicates")
                assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
                assert r.headers["Content-Type"].startswith("application/problem+json")
                assert (await client.get("/v1/duplicates", headers=agent)).status == 401  # an agent token
                assert (await client.get("/v1/duplicates", headers={"Authorization": "Bearer x.y.z"})).status == 401
                r = await client.get("/v1/duplicates", headers=approver)
                assert r.status == 403 and "not in the" in (await r.json())["detail"]

                # bad input: 400 naming the field
                for query, field in (("kind=%3Cscript%3E", "kind"), ("limit=many", "limit"),
                                     ("agent=" + "a" * 300, "agent")):
                    r = await client.get(f"/v1/duplicates?{query}", headers=operator)
                    assert r.status == 400, query
                    problem = await r.json()
                    assert problem["title"] in ("Bad filter", "Bad paging", "Agent too long"), problem
                    assert problem["errors"][0]["field"] == field and problem["errors"][0]["in"] == "query"
                    assert "<script>" not in json.dumps(problem) and "aaaa" not in problem["detail"]  # never echoed

                # the happy path
                r = await client.get("/v1/duplicates", headers=operator)
                assert r.status == 200
                raw = await r.text()
                data = json.loads(raw)
                _validator("DuplicateList").validate(data)
                assert data["limit"] == 200
                entries = data["entries"]
                assert [e["first_decision_id"] for e in entries] == ["d-win-2", "d-win-1", "d-key-b", "d-key-a"]
                win2, win1, key_b, key_a = entries
                assert win1 == {
                    "kind": "dedupe", "scope": "dedupe:erp:POST /orders", "connector": "erp", "route": "POST /orders",
                    "agent": "bot-b", "first_decision_id": "d-win-1", "state": "completed", "status": 201,
                    "replayable": False, "first_result": "/orders/18",
                    "created_at": win1["created_at"], "expires_at": win1["expires_at"],
                }
                assert win2["route"] == "PUT /accounts/{id}" and win2["state"] == "in-progress" and win2["status"] is None
                assert key_a["kind"] == "idempotency" and key_a["scope"] == "idem:bot-a" and key_a["connector"] is None
                assert key_a["replayable"] is True and key_a["status"] == 201
                # a Location is shown without userinfo, query or fragment
                assert key_a["first_result"] == "https://erp.example/orders/17"
                assert key_b["state"] == "in-progress" and key_b["replayable"] is False
                assert key_a["created_at"].endswith("Z") and key_a["expires_at"] > key_a["created_at"]
                # never the keys, digests, fingerprints, bodies or other headers
                for secret in (SECRET_KEY, "jane.doe", DIGEST, "ef" * 32, FINGERPRINT, "DE89370400440532013000",
                               "s3cr3t", "user:pw", "etag", '\\"v1\\"', "d-gone"):
                    assert secret not in raw, secret

                # filters and paging
                r = await client.get("/v1/duplicates?kind=dedupe", headers=operator)
                assert [e["first_decision_id"] for e in (await r.json())["entries"]] == ["d-win-2", "d-win-1"]
                r = await client.get("/v1/duplicates?kind=idempotency&agent=bot-a", headers=operator)
                assert [e["first_decision_id"] for e in (await r.json())["entries"]] == ["d-key-a"]
                r = await client.get("/v1/duplicates?limit=1", headers=operator)
                assert [e["first_decision_id"] for e in (await r.json())["entries"]] == ["d-win-2"]
                r = await client.get("/v1/duplicates?limit=0", headers=operator)  # clamped, not refused
                body = await r.json()
                assert r.status == 200 and body["limit"] == 1 and len(body["entries"]) == 1
                r = await client.get("/v1/duplicates?limit=999999", headers=operator)
                assert r.status == 200 and (await r.json())["limit"] == 1000

                # the suppressed requests themselves are audit records: record=duplicate is a valid filter
                r = await client.get("/v1/activity?record=duplicate,claim", headers=approver)
                assert r.status == 200, await r.text()
                r = await client.get("/v1/activity?record=duplicates", headers=approver)
                assert r.status == 400 and (await r.json())["title"] == "Bad filter"
        finally:
            await runtime.store.close()

    asyncio.run(main())


def test_a_store_failure_is_503(runtime):
    cfg = runtime.config
    issuer = DevIssuer(cfg.dev_issuer_dir, cfg.dev_issuer)
    token = issuer.issue("olga", {cfg.approvals.approver_groups_claim: [cfg.control.admin_group]}, "5m",
                         audience=cfg.approvals.approver_audience)

    async def main() -> None:
        await runtime.store.open()
        try:
            async with TestClient(TestServer(build_app(runtime))) as client:
                await runtime.store.close()  # the store is gone under the running API
                r = await client.get("/v1/duplicates", headers={"Authorization": f"Bearer {token}"})
                assert r.status == 503 and (await r.json())["title"] == "Store unavailable"
        finally:
            await runtime.store.close()

    asyncio.run(main())
