"""No duplicate approvals across replicas (issue 15 item 4; docs/approvals.md#replicas).

The store, not a process lock, keeps one approval per request: holds of the same request
from separate store connections (as replicas have) attach to one approval, on SQLite and
PostgreSQL; a request whose approval was already forwarded is answered 409 "Already
forwarded" (for approvals.forwarded_retry_seconds), never held anew, on any replica.

The end-to-end tests run two real Proctor processes on one PostgreSQL schema
(PROCTOR_TEST_POSTGRES_DSN) with the hold policies of tests/test_approvals.py.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Proctor, start_proctor, wait_for
from proxy.approvals.service import ApprovalService
from proxy.approvals.stage import _settled_refusal
from proxy.config import ApprovalsConfig
from proxy.core.model import AgentIdentity, AgentRequest, Classification
from proxy.store import Approval, Store, StoreError, open_store
from proxy.store.approval_holds import CANCEL_REASON, MIGRATION_V8
from proxy.store.base import APPROVAL_COLUMNS, APPROVAL_SELECT, approval_params
from proxy.store.postgres import PostgresStore
from test_approvals import (  # noqa: F401 - hold_policies is a fixture
    AGENT,
    MANAGERS,
    agent_client,
    agent_token,
    approver_token,
    hits,
    hold_policies,
    marker,
    order,
    order_url,
    vote,
)
from test_store import _pg_admin, approval

PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")
PG_SKIP = "PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)"
N = 16  # concurrent holders (each its own store connection, as replicas have)


# ----------------------------------------------------------------- store level
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.skipif(not PG_DSN, reason=PG_SKIP))])
def stores(request, tmp_path: Path):
    """A factory of separate, unopened store objects on one fresh database (one connection each)."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "proctor.db"
        yield lambda: open_store(f"sqlite://{path}")
        return
    schema = "proctor_apr_" + uuid.uuid4().hex[:12]
    try:
        yield lambda: PostgresStore(PG_DSN, schema=schema, connect_timeout=5, min_size=1, max_size=2)
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


async def _opened(make: Any, n: int) -> list[Store]:
    first = make()
    await first.open()  # creates and migrates the schema; the others find it
    rest = [make() for _ in range(n - 1)]
    await asyncio.gather(*(s.open() for s in rest))
    return [first, *rest]


async def _close(stores: list[Store]) -> None:
    await asyncio.gather(*(s.close() for s in stores))


async def _hold_together(stores: list[Store], make_approval: Any, **kw: Any) -> list[tuple[Approval, bool]]:
    """Every store holds its own approval object for the same request at the same moment."""
    gate = asyncio.Event()

    async def one(i: int, s: Store) -> tuple[Approval, bool]:
        await gate.wait()
        return await s.hold_approval(make_approval(i), **kw)

    tasks = [asyncio.create_task(one(i, s)) for i, s in enumerate(stores)]
    await asyncio.sleep(0.05)
    gate.set()
    return list(await asyncio.gather(*tasks))


def _answering(rows: list[Approval]) -> list[Approval]:
    return [a for a in rows if a.state in ("pending", "approved", "denied")]


@pytest.mark.parametrize("keyed", [False, True], ids=["by-fingerprint", "by-idempotency-key"])
def test_concurrent_holds_from_separate_connections_make_one_approval(stores, keyed: bool) -> None:
    fp = "v3:" + "ab" * 32
    key = "order-17" if keyed else None

    async def body() -> None:
        opened = await _opened(stores, N)
        try:
            # Each holder's own fingerprint differs when keyed: the key alone names the request.
            results = await _hold_together(opened, lambda i: approval(
                100 + i, fingerprint=fp if not keyed else f"v3:{i:064x}", idempotency_key=key))
            created = [a for a, new in results if new]
            assert len(created) == 1, [a.id for a, _ in results]
            assert {a.id for a, _ in results} == {created[0].id}  # every holder got the one approval
            stored = await opened[0].list_approvals(agent_id="agent-a", limit=100)
            assert [a.id for a in stored] == [created[0].id]
            # another agent's identical request is its own
            other, new = await opened[1].hold_approval(approval(200, agent_id="agent-b", fingerprint=fp,
                                                                idempotency_key=key))
            assert new and other.id != created[0].id
        finally:
            await _close(opened)

    asyncio.run(body())


def test_the_store_refuses_a_second_open_approval_whatever_the_code_path(stores) -> None:
    """The partial unique indexes hold the rule, not only hold_approval: a plain insert of a
    second open approval of the same request fails; closed ones never block a new one."""
    fp = "v3:" + "cd" * 32

    async def body() -> None:
        (s,) = await _opened(stores, 1)
        try:
            first = approval(1, fingerprint=fp)
            await s.create_approval(first)
            for state in ("pending", "approved", "denied"):
                with pytest.raises(StoreError, match=BY_FP):
                    await s.create_approval(approval(2, fingerprint=fp, state=state))
            await s.create_approval(approval(3, fingerprint=fp, idempotency_key="k"))  # keyed: its own request
            with pytest.raises(StoreError, match=BY_KEY):
                await s.create_approval(approval(4, fingerprint="v3:other", idempotency_key="k"))
            await s.create_approval(approval(5, fingerprint=fp, agent_id="agent-b"))
            # once it is no longer open, the same request may be held again
            first.state, first.forwarded_at = "forwarded", 1500.0
            assert await s.update_approval(first, expect_version=1)
            await s.create_approval(approval(6, fingerprint=fp))
            for n, state in enumerate(("expired", "forwarded", "cancelled"), start=10):
                await s.create_approval(approval(n, fingerprint=fp, state=state))
        finally:
            await s.close()

    asyncio.run(body())


# What each backend's unique-violation message names (SQLite: the columns; PostgreSQL: the index)
BY_FP = "fingerprint|one_per_request"
BY_KEY = "idempotency_key|one_per_key"


def test_a_forwarded_approval_answers_holds_within_the_window(stores) -> None:
    fp = "v3:" + "ef" * 32

    async def body() -> None:
        a_store, b_store = await _opened(stores, 2)
        try:
            a, new = await a_store.hold_approval(approval(1, fingerprint=fp), forwarded_since=0.0)
            assert new
            a.state, a.decided_at, a.decided_by = "approved", 1100.0, "alice"
            assert await a_store.update_approval(a, expect_version=1)
            a.state, a.forwarded_at = "forwarded", 1200.0
            assert await a_store.update_approval(a, expect_version=2)
            # another replica, a late retry: forwarded at 1200 >= since, so that one answers
            got, new = await b_store.hold_approval(approval(2, fingerprint=fp), forwarded_since=1200.0)
            assert not new and got.id == a.id and got.state == "forwarded" and got.forwarded_at == 1200.0
            found = await b_store.find_open_approval(agent_id="agent-a", fingerprint=fp, idempotency_key=None,
                                                     forwarded_since=1000.0)
            assert found is not None and found.id == a.id
            # without a window (None), or once it has passed, the same request is a new one
            assert await b_store.find_open_approval(agent_id="agent-a", fingerprint=fp, idempotency_key=None) is None
            fresh, new = await b_store.hold_approval(approval(3, fingerprint=fp), forwarded_since=1200.001)
            assert new and fresh.id == approval(3).id
            # by key: the same, and a new key is a new request at once
            k, new = await a_store.hold_approval(approval(10, idempotency_key="k1"), forwarded_since=0.0)
            k.state, k.forwarded_at = "forwarded", 1300.0
            assert await a_store.update_approval(k, expect_version=1)
            again, new = await b_store.hold_approval(approval(11, idempotency_key="k1"), forwarded_since=1000.0)
            assert not new and again.id == k.id
            other, new = await b_store.hold_approval(approval(12, idempotency_key="k2"), forwarded_since=1000.0)
            assert new
        finally:
            await _close([a_store, b_store])

    asyncio.run(body())


def test_a_keyless_hold_attaches_to_a_keyed_approval_of_the_same_bytes(stores) -> None:
    """As find_for_retry matches: without a key by fingerprint (any key), with one by the key only."""
    fp = "v3:" + "12" * 32

    async def body() -> None:
        (s,) = await _opened(stores, 1)
        try:
            keyed, _ = await s.hold_approval(approval(1, fingerprint=fp, idempotency_key="k"))
            plain, new = await s.hold_approval(approval(2, fingerprint=fp))
            assert not new and plain.id == keyed.id
            fresh_key, new = await s.hold_approval(approval(3, fingerprint=fp, idempotency_key="k2"))
            assert new and fresh_key.id != keyed.id
        finally:
            await s.close()

    asyncio.run(body())


def _duplicates() -> list[Approval]:
    fp = "v3:" + "77" * 32
    return [
        approval(1, fingerprint=fp, state="approved"),  # older duplicates made before schema 8 ...
        approval(2, fingerprint=fp, state="pending"),
        approval(3, fingerprint=fp, state="pending"),  # ... the newest stays
        approval(4, fingerprint=fp, state="forwarded"),  # closed: untouched
        approval(5, idempotency_key="k", state="denied"),
        approval(6, idempotency_key="k", state="pending", fingerprint="v3:x"),
        approval(7, fingerprint=fp, agent_id="agent-b"),  # another agent: untouched
    ]


def _check_migrated(by_id: dict[str, Approval]) -> None:
    states = {i: by_id[approval(i).id].state for i in range(1, 8)}
    assert states == {1: "cancelled", 2: "cancelled", 3: "pending", 4: "forwarded", 5: "cancelled", 6: "pending",
                      7: "pending"}
    assert by_id[approval(1).id].reason == CANCEL_REASON and by_id[approval(1).id].version == 2
    assert by_id[approval(3).id].version == 1


_INSERT = f"INSERT INTO proctor_approvals ({APPROVAL_SELECT}) VALUES ({', '.join('?' for _ in APPROVAL_COLUMNS)})"
# A store as schema 7 left it: no unique indexes (then duplicates from a race are inserted).
_NO_INDEXES = ("DROP INDEX proctor_approvals_one_per_request", "DROP INDEX proctor_approvals_one_per_key")


def test_sqlite_migration_cancels_older_duplicates_then_enforces(tmp_path: Path) -> None:
    """Schema 8's statements (as the migration runs them, in one transaction) on a store with
    duplicates; later schema versions are not undone, so this runs MIGRATION_V8 itself."""
    path = tmp_path / "old.db"

    async def create() -> None:
        s = open_store(f"sqlite://{path}")
        await s.open()
        await s.close()

    asyncio.run(create())
    db = sqlite3.connect(path)
    for stmt in _NO_INDEXES:
        db.execute(stmt)
    db.executemany(_INSERT, [approval_params(a) for a in _duplicates()])
    db.commit()
    with pytest.raises(sqlite3.IntegrityError):  # the index cannot be built over the duplicates ...
        db.execute(MIGRATION_V8[-2])
    for stmt in MIGRATION_V8:  # ... so the migration first cancels the older ones
        db.execute(stmt)
    db.commit()
    db.close()

    async def reopen() -> None:
        s = open_store(f"sqlite://{path}")
        await s.open()
        try:
            _check_migrated({a.id: a for a in await s.list_approvals(limit=100)})
            with pytest.raises(StoreError, match=BY_FP):
                await s.create_approval(approval(9, fingerprint="v3:" + "77" * 32))
            with pytest.raises(StoreError, match=BY_KEY):
                await s.create_approval(approval(10, idempotency_key="k"))
        finally:
            await s.close()

    asyncio.run(reopen())


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_postgres_migration_cancels_older_duplicates_then_enforces() -> None:
    schema = "proctor_apr_" + uuid.uuid4().hex[:12]

    def make() -> PostgresStore:
        return PostgresStore(PG_DSN, schema=schema, connect_timeout=5)  # type: ignore[arg-type]

    async def body() -> None:
        import asyncpg

        s = make()
        await s.open()
        await s.close()
        conn = await asyncpg.connect(PG_DSN, timeout=10, server_settings={"search_path": schema})
        try:
            for stmt in _NO_INDEXES:
                await conn.execute(stmt)
            n = len(APPROVAL_COLUMNS)
            insert = f"INSERT INTO proctor_approvals ({APPROVAL_SELECT}) VALUES ({', '.join(f'${i}' for i in range(1, n + 1))})"
            await conn.executemany(insert, [approval_params(a) for a in _duplicates()])
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(MIGRATION_V8[-2])
            async with conn.transaction():  # as _migrate runs them
                for stmt in MIGRATION_V8:
                    await conn.execute(stmt)
        finally:
            await conn.close()
        s = make()
        await s.open()
        try:
            _check_migrated({a.id: a for a in await s.list_approvals(limit=100)})
            with pytest.raises(StoreError, match=BY_FP):
                await s.create_approval(approval(9, fingerprint="v3:" + "77" * 32))
            with pytest.raises(StoreError, match=BY_KEY):
                await s.create_approval(approval(10, idempotency_key="k"))
        finally:
            await s.close()

    try:
        asyncio.run(body())
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


# --------------------------------------------------------------- service level
class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


CLS = Classification(connector="erp", action="test.order.create", resource_type="Order", resource_id="new")
CONTEXT_HEADERS = ["content-type", "user-agent", "idempotency-key", "x-request-id"]  # limits.context_headers
IDENT = AgentIdentity(agent_id="bot", issuer="i", claims={}, expires_at=None)


def _request(**headers: str) -> AgentRequest:
    return AgentRequest(method="POST", scheme="https", host="erp.example", port=443, path="/orders", query="",
                        headers={"content-type": "application/json", **headers}, body=b'{"total": 750}',
                        client_ip="127.0.0.1", mode="forward")


def test_a_late_retry_is_told_already_forwarded_until_the_window_ends(tmp_path: Path) -> None:
    """Replica B (its own service and store connection) is asked the same request hours after
    replica A forwarded it: 409 Already forwarded, naming the approval and what would work,
    until approvals.forwarded_retry_seconds after forwarding; then it is a new request."""
    config = ApprovalsConfig(expire_after_seconds=3600, forwarded_retry_seconds=86400)
    clock = Clock(1_000_000.0)
    path = tmp_path / "state.db"

    async def body() -> None:
        a_store, b_store = open_store(f"sqlite://{path}"), open_store(f"sqlite://{path}")
        await a_store.open()
        await b_store.open()
        a = ApprovalService(a_store, config, record=lambda rec: None, clock=clock)
        b = ApprovalService(b_store, config, record=lambda rec: None, clock=clock)
        for svc in (a, b):  # as the proxy does by default: the Idempotency-Key is bound too
            svc.bind_headers(CONTEXT_HEADERS)
        try:
            req = _request()
            kw: dict[str, Any] = dict(identity=IDENT, req=req, cls=CLS, groups={MANAGERS: 1}, policy_ids=["p"],
                                      mode="async", derived={})
            held = await a.hold(decision_id="d1", **kw)
            same = await b.hold(decision_id="d2", **kw)  # B holds the same request: the same approval
            assert same.id == held.id and same.decision_id == "d1"
            held.state, held.decided_at, held.decided_by = "approved", clock.now, "alice"
            assert await a_store.update_approval(held, expect_version=1)
            assert (await a.claim_for_forwarding(held))[0]
            forwarded_at = held.forwarded_at
            assert forwarded_at == clock.now

            clock.now += 23 * 3600  # the row is old, the approval long past its expiry: still remembered
            late = await b.find_for_retry(IDENT, req)
            assert late is not None and late.id == held.id and late.state == "forwarded"
            refusal = _settled_refusal(late, config)
            assert refusal is not None and refusal.status == 409 and refusal.title == "Already forwarded"
            assert refusal.kind == "approval-used" and refusal.extra["approval_id"] == held.id
            assert "new Idempotency-Key" in refusal.detail and "until" in refusal.detail
            assert (await b.hold(decision_id="d3", **kw)).id == held.id  # a hold attaches to it too
            # a new Idempotency-Key is a new request at once
            keyed = await b.hold(decision_id="d4", **{**kw, "req": _request(**{"idempotency-key": "k-2"})})
            assert keyed.id != held.id and keyed.state == "pending"

            clock.now = forwarded_at + 86400 + 1  # the window has ended: the same request is new again
            assert await b.find_for_retry(IDENT, req) is None
            fresh = await b.hold(decision_id="d5", **kw)
            assert fresh.id not in (held.id, keyed.id) and fresh.state == "pending"
        finally:
            await a_store.close()
            await b_store.close()

    asyncio.run(body())


def test_window_zero_forgets_forwarded_approvals(tmp_path: Path) -> None:
    config = ApprovalsConfig(forwarded_retry_seconds=0)
    clock = Clock(1_000_000.0)

    async def body() -> None:
        store = open_store(f"sqlite://{tmp_path / 'state.db'}")
        await store.open()
        svc = ApprovalService(store, config, record=lambda rec: None, clock=clock)
        try:
            kw: dict[str, Any] = dict(identity=IDENT, req=_request(), cls=CLS, groups={MANAGERS: 1},
                                      policy_ids=["p"], mode="async", derived={})
            held = await svc.hold(decision_id="d1", **kw)
            held.state = "approved"
            assert await store.update_approval(held, expect_version=1)
            assert (await svc.claim_for_forwarding(held))[0]
            assert await svc.find_for_retry(IDENT, _request()) is None
            assert (await svc.hold(decision_id="d2", **kw)).id != held.id
            # (and the 409 of a lost race names no window it does not keep)
            refusal = _settled_refusal(held, config)
            assert refusal is not None and refusal.status == 409 and "until" not in refusal.detail
        finally:
            await store.close()

    asyncio.run(body())


def test_only_one_replica_announces_the_hold(tmp_path: Path) -> None:
    """The `requested` event (record, webhooks, console) comes from the replica whose hold created it."""
    path = tmp_path / "state.db"

    async def body() -> None:
        stores = [open_store(f"sqlite://{path}") for _ in range(4)]
        for s in stores:
            await s.open()
        seen: list[str] = []
        services = [ApprovalService(s, ApprovalsConfig(), record=lambda rec: seen.append(rec.event)) for s in stores]
        try:
            kw: dict[str, Any] = dict(identity=IDENT, req=_request(), cls=CLS, groups={MANAGERS: 1},
                                      policy_ids=["p"], mode="sync", derived={})
            got = await asyncio.gather(*(svc.hold(decision_id=f"d{i}", **kw) for i, svc in enumerate(services)))
            assert len({a.id for a in got}) == 1
            assert seen == ["requested"]
        finally:
            for s in stores:
                await s.close()

    asyncio.run(body())


# -------------------------------------------------------- two real replicas (PostgreSQL)
def _replicas(tmp_path: Path, idp, pki, upstream, upstream_tls, hold_policies: Path,  # noqa: F811
              approvals: dict, schema: str) -> list[Proctor]:
    sep = "&" if "?" in PG_DSN else "?"  # type: ignore[operator]
    env = {"PROCTOR_TEST_APR_STORE": f"{PG_DSN}{sep}schema={schema}"}
    cfg = {"approvals": {"expire_after_seconds": 120, **approvals}, "store": {"url_env": "PROCTOR_TEST_APR_STORE"}}
    return [start_proctor(tmp_path / f"replica{i}", idp, pki, upstream, upstream_tls, cfg, policies_src=hold_policies,
                          env=env) for i in range(2)]


def _together(calls: list[Any]) -> list[Any]:
    """Run the calls at the same moment (a barrier), each in its own thread; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Any) -> Any:
        barrier.wait(10)
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _post(p: Proctor, token: str, url: str, body: dict, headers: dict[str, str] | None = None,
          timeout: float = 60) -> Any:
    def call() -> httpx.Response:
        with agent_client(p, token, timeout=timeout) as c:
            return c.post(url, json=body, headers=headers or {})
    return call


def _approvals_of(p: Proctor, token: str) -> list[dict]:
    r = httpx.get(f"{p.control_url}/v1/approvals", params={"agent": AGENT, "limit": 1000},
                  headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json()["approvals"])


def _events(procs: list[Proctor], aid: str) -> list[str]:
    return sorted(r["event"] for p in procs for r in p.decisions()
                  if r.get("type") == "approval" and r["approval_id"] == aid)


def _request_records(procs: list[Proctor], aid: str) -> list[dict]:
    return [r for p in procs for r in p.decisions() if r.get("type") != "approval" and r.get("approval_id") == aid]


@pytest.mark.integration
@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_two_replicas_async_one_approval_one_forward(tmp_path, idp, pki, upstream, upstream_tls,
                                                     hold_policies) -> None:  # noqa: F811
    schema = "proctor_apr_" + uuid.uuid4().hex[:12]
    window = 12.0
    procs: list[Proctor] = []
    try:
        procs = _replicas(tmp_path, idp, pki, upstream, upstream_tls, hold_policies,
                          {"mode": "async", "forwarded_retry_seconds": window}, schema)
        a, b = procs
        tok, alice = agent_token(idp), approver_token(idp, "alice", MANAGERS)
        mark = marker()
        url, body = order_url(upstream), order(mark)

        # identical requests on both replicas at the same moment: one approval in every answer
        held = _together([_post(procs[i % 2], tok, url, body) for i in range(12)])
        assert [r.status_code for r in held] == [202] * 12, [r.text for r in held]
        (aid,) = {r.json()["approval_id"] for r in held}
        assert [x["id"] for x in _approvals_of(a, alice)] == [aid] == [x["id"] for x in _approvals_of(b, alice)]
        wait_for(lambda: _events(procs, aid) == ["requested"], what="the requested event")
        assert hits(upstream, mark) == []

        assert vote(b, aid, alice).status_code == 200  # decided through B's control API
        # retries on both replicas at once: one forwarded, the other told it was already forwarded
        retries = _together([_post(a, tok, url, body), _post(b, tok, url, body)])
        assert sorted(r.status_code for r in retries) == [200, 409], [r.text for r in retries]
        lost = next(r for r in retries if r.status_code == 409)
        assert lost.json()["title"] == "Already forwarded" and lost.json()["approval_id"] == aid
        assert lost.json()["type"].endswith("/approval-used")
        assert len(hits(upstream, mark)) == 1

        # late retries, on either replica: 409 naming the approval, never a new hold
        for p in (a, b, a):
            late = _post(p, tok, url, body)()
            assert late.status_code == 409, late.text
            doc = late.json()
            assert doc["title"] == "Already forwarded" and doc["approval_id"] == aid
            assert doc["approval_state"] == "forwarded" and "new Idempotency-Key" in doc["detail"]
        assert len(hits(upstream, mark)) == 1 and len(_approvals_of(a, alice)) == 1
        wait_for(lambda: _events(procs, aid) == ["approved", "forwarded", "requested"], what="approval events")
        recs = _request_records(procs, aid)
        assert sorted((r["decision"], r["status"]) for r in recs) == sorted(
            [("hold", 202)] * 12 + [("allow", 200)] + [("deny", 409)] * 4)

        # with an Idempotency-Key: the same on both replicas at once, one approval
        key, keyed = uuid.uuid4().hex, marker()
        kheld = _together([_post(procs[i % 2], tok, url, order(keyed), {"Idempotency-Key": key}) for i in range(6)])
        assert [r.status_code for r in kheld] == [202] * 6
        (kid,) = {r.json()["approval_id"] for r in kheld}
        assert kid != aid and len(_approvals_of(b, alice)) == 2

        # once the window has passed, the same request is a new request: held anew
        forwarded_at = time.time()
        wait_for(lambda: time.time() > forwarded_at + window + 0.5, timeout=window + 5, interval=0.2,
                 what="the end of the forwarded window")
        again = _post(b, tok, url, body)()
        assert again.status_code == 202, again.text
        assert again.json()["approval_id"] not in (aid, kid)
        assert len(hits(upstream, mark)) == 1
    finally:
        for p in procs:
            p.stop()
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.mark.integration
@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_two_replicas_sync_both_wait_on_one_approval(tmp_path, idp, pki, upstream, upstream_tls,
                                                     hold_policies) -> None:  # noqa: F811
    schema = "proctor_apr_" + uuid.uuid4().hex[:12]
    procs: list[Proctor] = []
    try:
        procs = _replicas(tmp_path, idp, pki, upstream, upstream_tls, hold_policies,
                          {"mode": "sync", "sync_wait_seconds": 40}, schema)
        a, b = procs
        tok, alice = agent_token(idp), approver_token(idp, "alice", MANAGERS)
        mark = marker()
        url, body = order_url(upstream), order(mark)

        # identical requests held open on both replicas (started together)
        barrier = threading.Barrier(4)
        results: dict[int, httpx.Response] = {}

        def agent(i: int) -> None:
            barrier.wait(10)
            results[i] = _post(procs[i % 2], tok, url, body)()

        threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(_approvals_of(a, alice)) >= 1, timeout=20, what="the hold")
        wait_for(lambda: [_held_connections(p) for p in procs] == [2, 2], timeout=20,
                 what="both replicas holding both their requests")
        time.sleep(0.5)  # give a duplicate approval every chance to appear
        (held,) = _approvals_of(b, alice)
        aid = held["id"]
        assert held["state"] == "pending" and hits(upstream, mark) == []

        assert vote(a, aid, alice).status_code == 200
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        answers = [results[i] for i in range(4)]
        assert sorted(r.status_code for r in answers) == [200, 409, 409, 409], [r.text for r in answers]
        for r in answers:
            if r.status_code == 409:
                assert r.json()["title"] == "Already forwarded" and r.json()["approval_id"] == aid
            else:
                assert r.json()["echo"] is True  # the upstream's own answer
        assert len(hits(upstream, mark)) == 1
        # both replicas' records name the one approval
        recs = _request_records(procs, aid)
        assert len(recs) == 4 and {r["approval_id"] for r in recs} == {aid}
        assert {p.dir.name for p in procs if any(r.get("approval_id") == aid for r in p.decisions())} == \
            {"replica0", "replica1"}
        wait_for(lambda: _events(procs, aid) == ["approved", "forwarded", "requested"], what="approval events")
        # a late retry on either replica is told, not held
        for p in (a, b):
            late = _post(p, tok, url, body)()
            assert late.status_code == 409 and late.json()["approval_id"] == aid, late.text
        assert len(hits(upstream, mark)) == 1 and len(_approvals_of(a, alice)) == 1
    finally:
        for p in procs:
            p.stop()
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def _held_connections(p: Proctor) -> int:
    """Agent connections this replica holds open waiting for an approval (its metrics gauge)."""
    for line in httpx.get(f"{p.control_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("proctor_approvals_held_connections "):
            return int(float(line.split()[1]))
    raise AssertionError("proctor_approvals_held_connections not exported")


def test_used_detail_without_forwarded_at_is_still_an_answer() -> None:
    """A forwarded approval from an old store row (no forwarded_at) still gets a clear 409."""
    a = replace(approval(1), state="forwarded", forwarded_at=None)
    refusal = _settled_refusal(a, ApprovalsConfig())
    assert refusal is not None and refusal.status == 409 and "already forwarded once" in refusal.detail
