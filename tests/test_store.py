"""The durable state store, run against SQLite (a temp file) and PostgreSQL.

PostgreSQL runs when PROCTOR_TEST_POSTGRES_DSN is set (CI sets it), each test
in a fresh schema that is dropped afterwards. Tests are sync functions that
drive the async store with asyncio.run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import stat
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from proxy.store import (
    AgentRecord,
    Approval,
    PolicyRevision,
    Store,
    StoreError,
    Suspension,
    Vote,
    open_store,
)
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")
PG_SKIP = "PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)"

MakeStore = Callable[[], Store]


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)),
    ]
)
def make_store(request, tmp_path: Path):
    """A factory of (unopened) stores that all point at the same fresh database."""
    if request.param == "sqlite":
        path = tmp_path / "state" / "proctor.db"
        yield lambda: open_store(f"sqlite://{path}")
        return
    schema = "proctor_test_" + uuid.uuid4().hex[:16]
    try:
        yield lambda: PostgresStore(PG_DSN, schema=schema, connect_timeout=5)
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def run(make: MakeStore, body: Callable[[Store], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        store = make()
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def approval(n: int = 1, **kw: Any) -> Approval:
    base = dict(
        id=f"apr_{n:020d}",
        state="pending",
        created_at=1000.0 + n,
        expires_at=2000.0 + n,
        agent_id="agent-a",
        action="crm:orders.approve",
        resource_type="order",
        resource_id=f"ord-{n}",
        connector="crm",
        groups={"finance": 2, "security": 1},
        fingerprint=f"{n:064x}",
        idempotency_key=None,
        mode="async",
        decision_id=f"dec-{n}",
        request={
            "method": "POST",
            "url": "https://crm.test/orders/1/approve",
            "headers": {"authorization": "[redacted]"},
        },
        derived={"action": "crm:orders.approve", "policies": ["p1"], "attributes": {"amount": 12.5}},
    )
    base.update(kw)
    return Approval(**base)


# ---------------------------------------------------------------------------
# approvals


def test_approval_create_get_roundtrip(make_store):
    a = approval(
        1,
        escalate_at=1500.25,
        escalated=True,
        votes=[Vote("alice", "finance", "approve", "ok", 1001.5)],
        decided_at=None,
        reason="because",
        idempotency_key="idem-1",
    )

    async def body(s: Store):
        await s.create_approval(a)
        got = await s.get_approval(a.id)
        assert got == a
        assert await s.get_approval("apr_missing") is None
        with pytest.raises(StoreError):  # duplicate id
            await s.create_approval(a)

    run(make_store, body)


def test_list_approvals_filters_order_pagination(make_store):
    async def body(s: Store):
        for n in range(1, 8):
            await s.create_approval(
                approval(
                    n,
                    state="approved" if n % 2 else "pending",
                    agent_id="agent-a" if n <= 4 else "agent-b",
                    action="crm:orders.approve" if n != 3 else "crm:orders.delete",
                )
            )
        ids = lambda xs: [int(x.id[4:]) for x in xs]  # noqa: E731
        assert ids(await s.list_approvals()) == [7, 6, 5, 4, 3, 2, 1]  # newest first
        assert ids(await s.list_approvals(limit=3)) == [7, 6, 5]
        assert ids(await s.list_approvals(limit=3, offset=3)) == [4, 3, 2]
        assert ids(await s.list_approvals(limit=3, offset=6)) == [1]
        assert ids(await s.list_approvals(states=["pending"])) == [6, 4, 2]
        assert ids(await s.list_approvals(states=["pending", "approved"], agent_id="agent-b")) == [7, 6, 5]
        assert ids(await s.list_approvals(action="crm:orders.delete")) == [3]
        assert ids(await s.list_approvals(states=["approved"], agent_id="agent-a", action="crm:orders.approve")) == [1]
        assert await s.list_approvals(states=[]) == []
        assert await s.list_approvals(agent_id="nobody") == []
        assert await s.count_approvals() == 7
        assert await s.count_approvals(states=["pending"]) == 3
        assert await s.count_approvals(states=["pending", "approved"]) == 7
        assert await s.count_approvals(states=["expired"]) == 0
        assert await s.count_approvals(states=[]) == 0
        with pytest.raises(ValueError):
            await s.list_approvals(limit=-1)

    run(make_store, body)


def test_find_open_approval(make_store):
    async def body(s: Store):
        fp = "ab" * 32
        # by idempotency key: the open one wins, other agents and closed states never match
        # (one open approval per key and agent: the store refuses a second, test_approvals_replicas.py)
        await s.create_approval(approval(1, fingerprint=fp, idempotency_key="k1", state="expired"))
        await s.create_approval(approval(2, fingerprint=fp, idempotency_key="k1", state="pending"))
        await s.create_approval(approval(3, fingerprint=fp, idempotency_key="k1", state="forwarded"))
        await s.create_approval(approval(4, fingerprint=fp, idempotency_key="k1", agent_id="agent-b"))
        got = await s.find_open_approval(agent_id="agent-a", fingerprint="zz", idempotency_key="k1")
        assert got is not None and got.id == approval(2).id
        assert await s.find_open_approval(agent_id="agent-a", fingerprint=fp, idempotency_key="k2") is None
        got = await s.find_open_approval(agent_id="agent-b", fingerprint="zz", idempotency_key="k1")
        assert got is not None and got.id == approval(4).id

        # by fingerprint when no key is given
        fp2 = "cd" * 32
        await s.create_approval(approval(10, fingerprint=fp2, state="approved"))
        await s.create_approval(approval(11, fingerprint=fp2, state="forwarded"))
        await s.create_approval(approval(12, fingerprint=fp2, state="expired"))
        await s.create_approval(approval(13, fingerprint=fp2, state="cancelled"))
        got = await s.find_open_approval(agent_id="agent-a", fingerprint=fp2, idempotency_key=None)
        assert got is not None and got.id == approval(10).id and got.state == "approved"
        assert await s.find_open_approval(agent_id="agent-b", fingerprint=fp2, idempotency_key=None) is None

        # once forwarded, it no longer matches
        a10 = await s.get_approval(approval(10).id)
        a10.state, a10.forwarded_at = "forwarded", 1500.0
        assert await s.update_approval(a10, expect_version=a10.version)
        assert await s.find_open_approval(agent_id="agent-a", fingerprint=fp2, idempotency_key=None) is None

    run(make_store, body)


def test_update_approval_compare_and_set(make_store):
    async def body(s: Store):
        a = approval(1)
        await s.create_approval(a)

        # a normal update writes the mutable fields and bumps the version
        a.votes.append(Vote("alice", "finance", "approve", "looks fine", 1100.0))
        a.escalated = True
        assert await s.update_approval(a, expect_version=1) is True
        assert a.version == 2
        assert await s.get_approval(a.id) == a

        # a stale writer loses and its copy is left alone
        stale = replace(a, state="denied", version=1)
        assert await s.update_approval(stale, expect_version=1) is False
        assert stale.version == 1
        assert (await s.get_approval(a.id)).state == "pending"

        # unknown id
        assert await s.update_approval(approval(99), expect_version=1) is False

        # two concurrent deciders with the same expected version: exactly one wins
        x = replace(a, votes=list(a.votes), state="approved", decided_by="alice", decided_at=1200.0)
        y = replace(a, votes=list(a.votes), state="denied", decided_by="bob", decided_at=1201.0)
        results = await asyncio.gather(s.update_approval(x, expect_version=2), s.update_approval(y, expect_version=2))
        assert sorted(results) == [False, True]
        winner = x if results[0] else y
        stored = await s.get_approval(a.id)
        assert stored.state == winner.state and stored.decided_by == winner.decided_by and stored.version == 3

    run(make_store, body)


def test_update_approval_race_between_two_store_instances(make_store):
    """Two replicas (separate store instances, separate connections) racing on one approval."""

    async def main():
        s1, s2 = make_store(), make_store()
        await asyncio.gather(s1.open(), s2.open())  # concurrent schema creation is safe too
        try:
            for n in range(1, 11):
                a = approval(n)
                await s1.create_approval(a)
                x = replace(a, state="approved", decided_by="alice")
                y = replace(a, state="denied", decided_by="bob")
                results = await asyncio.gather(
                    s1.update_approval(x, expect_version=1), s2.update_approval(y, expect_version=1)
                )
                assert sorted(results) == [False, True], results
                stored = await s2.get_approval(a.id)
                assert stored.version == 2
                assert stored.state == ("approved" if results[0] else "denied")
        finally:
            await asyncio.gather(s1.close(), s2.close())

    asyncio.run(main())


def test_due_approvals(make_store):
    async def body(s: Store):
        await s.create_approval(approval(1, expires_at=100.0))  # expired
        await s.create_approval(approval(2, expires_at=500.0, escalate_at=150.0))  # needs escalation
        await s.create_approval(approval(3, expires_at=500.0, escalate_at=150.0, escalated=True))  # already escalated
        await s.create_approval(approval(4, expires_at=500.0, escalate_at=300.0))  # not yet
        await s.create_approval(approval(5, expires_at=100.0, state="approved"))  # decided: not due
        await s.create_approval(approval(6, expires_at=200.0))  # exactly now
        due = await s.due_approvals(200.0)
        assert [a.id for a in due] == [approval(n).id for n in (1, 2, 6)]
        assert await s.due_approvals(50.0) == []
        assert {a.id for a in await s.due_approvals(1000.0)} == {approval(n).id for n in (1, 2, 3, 4, 6)}

    run(make_store, body)


# ---------------------------------------------------------------------------
# resource creators, agents, suspensions, revisions


def test_resource_creators_upsert(make_store):
    async def body(s: Store):
        assert await s.creator_of("order", "o-1") is None
        await s.record_creator("order", "o-1", "agent-a", "dec-1", 10.0)
        await s.record_creator("order", "o-2", "agent-b", "dec-2", 11.0)
        await s.record_creator("invoice", "o-1", "agent-c", "dec-3", 12.0)
        assert await s.creator_of("order", "o-1") == "agent-a"
        assert await s.creator_of("order", "o-2") == "agent-b"
        assert await s.creator_of("invoice", "o-1") == "agent-c"
        await s.record_creator("order", "o-1", "agent-z", "dec-9", 20.0)  # upsert
        assert await s.creator_of("order", "o-1") == "agent-z"
        assert await s.creator_of("order", "o-3") is None

    run(make_store, body)


def test_agent_activity_and_registration(make_store):
    async def body(s: Store):
        assert await s.get_agent("a") is None
        await s.record_agent_activity({})  # no-op
        await s.record_agent_activity({"a": (100.0, 110.0, 5, 4, 1), "b": (105.0, 105.0, 1, 0, 1)})
        await s.record_agent_activity({"a": (90.0, 108.0, 3, 3, 0)})
        await s.record_agent_activity({"a": (120.0, 130.0, 2, 1, 1)})
        a = await s.get_agent("a")
        assert a == AgentRecord(
            id="a", registered=False, first_seen=90.0, last_seen=130.0, requests=10, allowed=8, denied=2
        )

        # registration keeps counts and seen times; counts in the record are ignored
        await s.upsert_agent(AgentRecord(id="a", owner="ops@x", team="payments", description="bot", requests=999))
        a = await s.get_agent("a")
        assert (a.owner, a.team, a.description, a.registered) == ("ops@x", "payments", "bot", True)
        assert (a.first_seen, a.last_seen, a.requests, a.allowed, a.denied) == (90.0, 130.0, 10, 8, 2)

        # registering an agent never seen, then activity keeps the registration
        await s.upsert_agent(AgentRecord(id="c", owner="o", team="t", description="d"))
        c = await s.get_agent("c")
        assert c.registered and c.requests == 0 and c.first_seen is None
        await s.record_agent_activity({"c": (200.0, 201.0, 2, 2, 0)})
        c = await s.get_agent("c")
        assert (c.owner, c.registered, c.first_seen, c.last_seen, c.requests) == ("o", True, 200.0, 201.0, 2)

        # re-registration updates the descriptive fields only
        await s.upsert_agent(AgentRecord(id="a", owner="new@x", team="", description=""))
        a = await s.get_agent("a")
        assert (a.owner, a.team, a.requests) == ("new@x", "", 10)

        assert [r.id for r in await s.list_agents()] == ["a", "b", "c"]

    run(make_store, body)


def test_agent_activity_concurrent_batches(make_store):
    """Batches flushed at once (as by several replicas) all count."""

    async def main():
        s1, s2 = make_store(), make_store()
        await s1.open()
        await s2.open()
        try:
            batch = {f"agent-{i:02d}": (float(i), float(i) + 1, 1, 1, 0) for i in range(20)}
            await asyncio.gather(*(st.record_agent_activity(batch) for st in (s1, s2) for _ in range(5)))
            agents = await s1.list_agents()
            assert len(agents) == 20
            assert all(a.requests == 10 and a.allowed == 10 and a.denied == 0 for a in agents)
        finally:
            await s1.close()
            await s2.close()

    asyncio.run(main())


def test_suspensions_and_version(make_store):
    async def body(s: Store):
        assert await s.list_suspensions() == []
        assert await s.suspensions_version() == 0
        await s.suspend(Suspension("agent", "agent-a", 10.0, "alice", "runaway loop"))
        await s.suspend(Suspension("connector", "crm", 11.0, "bob", "incident"))
        assert await s.suspensions_version() == 2
        # upsert by (kind, target)
        await s.suspend(Suspension("agent", "agent-a", 12.0, "carol", "still looping"))
        assert await s.suspensions_version() == 3
        assert await s.list_suspensions() == [
            Suspension("agent", "agent-a", 12.0, "carol", "still looping"),
            Suspension("connector", "crm", 11.0, "bob", "incident"),
        ]
        assert await s.resume("agent", "agent-a") is True
        assert await s.suspensions_version() == 4
        assert await s.resume("agent", "agent-a") is False
        assert await s.resume("action", "crm:orders.delete") is False
        assert await s.suspensions_version() == 4  # nothing changed
        assert await s.list_suspensions() == [Suspension("connector", "crm", 11.0, "bob", "incident")]
        with pytest.raises(ValueError):
            await s.suspend(Suspension("planet", "x", 1.0, "a", "b"))

    run(make_store, body)


def test_policy_revisions_prune_keeps_active(make_store):
    async def body(s: Store):
        for i in range(1, 6):
            files = {"main.cedar": f"// {i}\npermit(principal, action, resource);"}
            await s.save_revision(PolicyRevision(f"rev{i}", 100.0 + i, files), keep=3)
        revs = await s.list_revisions()
        assert [r.revision for r in revs] == ["rev5", "rev4", "rev3"]
        assert [r.active for r in revs] == [True, False, False]
        assert revs[0].files == {"main.cedar": "// 5\npermit(principal, action, resource);"}

        # activating an old revision (loaded_at older than everything kept): it stays although it is not
        # among the newest `keep`
        await s.save_revision(PolicyRevision("rev0", 50.0, {"a.cedar": "a", "b.cedar": "b"}), keep=3)
        revs = await s.list_revisions()
        assert [(r.revision, r.active) for r in revs] == [
            ("rev5", False),
            ("rev4", False),
            ("rev3", False),
            ("rev0", True),
        ]

        # re-saving an existing revision re-activates it (upsert) and prunes
        await s.save_revision(PolicyRevision("rev4", 200.0, {"main.cedar": "forbid"}), keep=2)
        revs = await s.list_revisions()
        assert [(r.revision, r.active) for r in revs] == [("rev4", True), ("rev5", False)]
        got = await s.get_revision("rev4")
        assert got == PolicyRevision("rev4", 200.0, {"main.cedar": "forbid"}, active=True)
        assert await s.get_revision("rev0") is None

        # keep=0 leaves only the active one
        await s.save_revision(PolicyRevision("rev9", 300.0, {}), keep=0)
        assert [(r.revision, r.active) for r in await s.list_revisions()] == [("rev9", True)]

    run(make_store, body)


# ---------------------------------------------------------------------------
# durability, hostile values, failures


def test_data_survives_close_and_reopen(make_store):
    a = approval(1, idempotency_key="k")

    async def write(s: Store):
        await s.create_approval(a)
        await s.record_creator("order", "o-1", "agent-a", "dec-1", 1.0)
        await s.record_agent_activity({"agent-a": (1.0, 2.0, 3, 2, 1)})
        await s.upsert_agent(AgentRecord(id="agent-a", owner="o"))
        await s.suspend(Suspension("action", "crm:orders.delete", 5.0, "alice", "freeze"))
        await s.save_revision(PolicyRevision("r1", 7.0, {"p.cedar": "permit(principal, action, resource);"}))

    async def read(s: Store):
        assert await s.get_approval(a.id) == a
        assert await s.creator_of("order", "o-1") == "agent-a"
        agent = await s.get_agent("agent-a")
        assert agent.registered and agent.requests == 3 and agent.owner == "o"
        assert await s.list_suspensions() == [Suspension("action", "crm:orders.delete", 5.0, "alice", "freeze")]
        assert await s.suspensions_version() == 1
        assert [(r.revision, r.active) for r in await s.list_revisions()] == [("r1", True)]

    run(make_store, write)
    run(make_store, read)  # a new store instance on the same database
    run(make_store, read)  # opening again (schema already there) is idempotent


def test_sql_metacharacters_round_trip(make_store):
    nasty = "x'); DROP TABLE proctor_approvals; -- \"q\" \\ % _ ? $1 :name \u00e9\u4e2d\U0001f600 \t\n"
    a = approval(
        1,
        id="apr_" + "'\"%_;--",
        agent_id=nasty,
        action=nasty,
        resource_type=nasty,
        resource_id=nasty,
        connector=nasty,
        groups={nasty: 3},
        fingerprint=nasty,
        idempotency_key=nasty,
        decision_id=nasty,
        request={"body": nasty, nasty: [nasty, {"k": nasty}], "lone": "\ud800", "nul": "a\x00b"},
        derived={"attributes": {"q": nasty, "n": 1.5, "b": True, "none": None}},
        votes=[Vote(nasty, nasty, "deny", nasty, 3.25)],
        decided_by=nasty,
        reason=nasty,
    )

    async def body(s: Store):
        await s.create_approval(a)
        assert await s.get_approval(a.id) == a
        assert await s.find_open_approval(agent_id=nasty, fingerprint="", idempotency_key=nasty) == a
        assert await s.find_open_approval(agent_id=nasty, fingerprint=nasty, idempotency_key=None) == a
        assert [x.id for x in await s.list_approvals(agent_id=nasty, action=nasty)] == [a.id]
        await s.record_creator(nasty, nasty, nasty, nasty, 1.0)
        assert await s.creator_of(nasty, nasty) == nasty
        await s.upsert_agent(AgentRecord(id=nasty, owner=nasty, team=nasty, description=nasty))
        await s.record_agent_activity({nasty: (1.0, 2.0, 1, 1, 0)})
        assert (await s.get_agent(nasty)).owner == nasty
        await s.suspend(Suspension("agent", nasty, 1.0, nasty, nasty))
        assert await s.list_suspensions() == [Suspension("agent", nasty, 1.0, nasty, nasty)]
        assert await s.resume("agent", nasty) is True
        await s.save_revision(PolicyRevision(nasty, 1.0, {nasty: nasty}))
        assert await s.get_revision(nasty) == PolicyRevision(nasty, 1.0, {nasty: nasty}, active=True)
        assert await s.count_approvals() == 1  # the table is still there

    run(make_store, body)


def test_cancelled_writes_leave_store_usable(make_store):
    """A caller cancelled mid-write (client gone, timeout) must not wedge the store."""

    async def body(s: Store):
        for i in range(24):
            if i % 2:
                write = s.suspend(Suspension("agent", f"agent-{i}", 1.0, "alice", "x"))
            else:
                write = s.create_approval(approval(100 + i))
            task = asyncio.create_task(write)
            for _ in range(i % 6):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await s.create_approval(approval(1))
        assert (await s.get_approval(approval(1).id)).id == approval(1).id
        await s.suspend(Suspension("connector", "crm", 1.0, "alice", "x"))
        # every suspension that landed bumped the version in the same transaction
        assert await s.suspensions_version() == len(await s.list_suspensions())

    run(make_store, body)


def test_not_open_raises_store_error(make_store):
    async def main():
        s = make_store()
        with pytest.raises(StoreError):
            await s.get_approval("apr_x")
        await s.close()  # closing a never-opened store is fine

    asyncio.run(main())


def test_sqlite_store_error_on_unwritable_location(tmp_path: Path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")

    async def main():
        s = SQLiteStore(str(blocker / "state" / "proctor.db"))
        with pytest.raises(StoreError) as ei:
            await s.open()
        assert ei.value.__cause__ is not None

    asyncio.run(main())


def test_sqlite_store_error_on_corrupt_file(tmp_path: Path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database, just some bytes " * 200)

    async def main():
        with pytest.raises(StoreError) as ei:
            await SQLiteStore(str(path)).open()
        assert "not a database" in str(ei.value)

    asyncio.run(main())


def test_sqlite_newer_schema_refused(tmp_path: Path):
    path = tmp_path / "proctor.db"
    run(lambda: SQLiteStore(str(path)), lambda s: s.count_approvals())
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO proctor_schema_version (version, applied_at) VALUES (999, 0)")

    async def main():
        with pytest.raises(StoreError, match="newer"):
            await SQLiteStore(str(path)).open()

    asyncio.run(main())


def test_sqlite_file_setup(tmp_path: Path):
    path = tmp_path / "deep" / "state" / "proctor.db"
    assert run(lambda: open_store(f"sqlite://{path}"), lambda s: s.count_approvals()) == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"proctor_approvals_state_created", "proctor_approvals_agent_fp", "proctor_approvals_agent_idem"} <= names


def test_postgres_store_error_on_closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed

    async def main():
        s = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/test", connect_timeout=2)
        with pytest.raises(StoreError) as ei:
            await s.open()
        assert ei.value.__cause__ is not None
        await s.close()

    asyncio.run(main())


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_postgres_indexes_and_schema_from_url():
    schema = "proctor_test_" + uuid.uuid4().hex[:16]
    sep = "&" if "?" in PG_DSN else "?"

    async def main():
        s = open_store(f"{PG_DSN}{sep}schema={schema}&connect_timeout=5")
        assert isinstance(s, PostgresStore) and s.schema == schema and s.connect_timeout == 5.0
        await s.open()
        try:
            names = {
                r[0]
                for r in await s._p().fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1", schema)
            }
            assert {
                "proctor_approvals_state_created",
                "proctor_approvals_agent_fp",
                "proctor_approvals_agent_idem",
            } <= names
        finally:
            await s.close()

    try:
        asyncio.run(main())
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def test_open_store_urls(tmp_path: Path):
    s = open_store(f"sqlite://{tmp_path}/a.db")
    assert isinstance(s, SQLiteStore) and s.path == f"{tmp_path}/a.db"
    assert open_store("sqlite:///:memory:").path == ":memory:"
    assert isinstance(open_store("postgresql://u@h/db"), PostgresStore)
    assert isinstance(open_store("postgres://u@h/db"), PostgresStore)
    for bad in ("", "sqlite://relative.db", "sqlite:relative.db", "sqlite:///", "mysql://u:secret@h/db", "/tmp/x.db"):
        with pytest.raises(ValueError) as ei:
            open_store(bad)
        assert "secret" not in str(ei.value)
    with pytest.raises(ValueError):
        PostgresStore("postgresql://u@h/db", schema="Bad-Name; DROP")


def test_memory_store_works():
    async def body(s: Store):
        await s.create_approval(approval(1))
        return await s.count_approvals()

    assert run(lambda: open_store("sqlite:///:memory:"), body) == 1
