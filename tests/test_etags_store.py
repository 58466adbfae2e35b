"""The ETags agents saw (store/etags.py + both backends): remember, read, forget, expiry,
sweep, per-agent isolation, and the schema migration from version 3.

PostgreSQL runs when PROCTOR_TEST_POSTGRES_DSN is set (as tests/test_store.py does).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import pytest

from proxy.store import Store, open_store
from proxy.store.base import SCHEMA_VERSION
from proxy.store.etags import MAX_ETAG_LENGTH, SeenETag
from proxy.store.postgres import PostgresStore
from test_store import PG_DSN, PG_SKIP, MakeStore, _pg_admin, make_store, run  # noqa: F401 - the fixture is used by name

CONN, RES = "tickets", 'Ticket::"T-1"'


def seen(agent: str = "alice", etag: str = '"v1"', at: float = 1000.0, ttl: float = 60.0, resource: str = RES,
         connector: str = CONN, decision: str = "d-1") -> SeenETag:
    return SeenETag(connector=connector, resource=resource, agent_id=agent, etag=etag, seen_at=at,
                    expires_at=at + ttl, decision_id=decision)


def test_remember_read_replace_forget(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        assert await s.etag_seen(CONN, RES, "alice", 1000.0) is None
        await s.remember_etag(seen())
        got = await s.etag_seen(CONN, RES, "alice", 1001.0)
        assert got == seen()
        # the latest answer wins (upsert), with its own time and decision
        await s.remember_etag(seen(etag='"v2"', at=1010.0, decision="d-2"))
        got = await s.etag_seen(CONN, RES, "alice", 1011.0)
        assert got is not None and (got.etag, got.seen_at, got.expires_at, got.decision_id) == ('"v2"', 1010.0, 1070.0, "d-2")
        assert await s.forget_etag(CONN, RES, "alice")
        assert await s.etag_seen(CONN, RES, "alice", 1011.0) is None
        assert not await s.forget_etag(CONN, RES, "alice")

    run(make_store, body)


def test_per_agent_connector_and_resource(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        await s.remember_etag(seen("alice", '"a"'))
        await s.remember_etag(seen("bob", '"b"'))
        await s.remember_etag(seen("alice", '"other"', resource='Ticket::"T-2"'))
        await s.remember_etag(seen("alice", '"conn"', connector="crm"))
        assert (await s.etag_seen(CONN, RES, "alice", 1000.5)).etag == '"a"'  # type: ignore[union-attr]
        assert (await s.etag_seen(CONN, RES, "bob", 1000.5)).etag == '"b"'  # type: ignore[union-attr]
        assert await s.etag_seen(CONN, RES, "carol", 1000.5) is None  # never read it: nothing
        # forgetting one agent's view leaves everyone else's
        assert await s.forget_etag(CONN, RES, "bob")
        assert (await s.etag_seen(CONN, RES, "alice", 1000.5)).etag == '"a"'  # type: ignore[union-attr]
        assert (await s.etag_seen(CONN, 'Ticket::"T-2"', "alice", 1000.5)).etag == '"other"'  # type: ignore[union-attr]
        assert (await s.etag_seen("crm", RES, "alice", 1000.5)).etag == '"conn"'  # type: ignore[union-attr]

    run(make_store, body)


def test_expired_rows_are_ignored_then_swept(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        await s.remember_etag(seen("alice", ttl=10.0))
        await s.remember_etag(seen("bob", ttl=100.0))
        assert await s.etag_seen(CONN, RES, "alice", 1009.9) is not None
        assert await s.etag_seen(CONN, RES, "alice", 1010.0) is None  # expires_at <= now: gone for readers
        assert await s.sweep_etags(1010.0) == 1
        assert await s.sweep_etags(1010.0) == 0
        assert await s.etag_seen(CONN, RES, "bob", 1050.0) is not None
        # an expired row is replaced by the next answer like any other
        await s.remember_etag(seen("alice", '"v9"', at=2000.0))
        assert (await s.etag_seen(CONN, RES, "alice", 2000.0)).etag == '"v9"'  # type: ignore[union-attr]

    run(make_store, body)


def test_values_are_stored_exactly(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        odd = '"' + "x" * (MAX_ETAG_LENGTH - 2) + '"'
        resource = 'Ticket::"naïve \\"quoted\\" ✓"'
        await s.remember_etag(seen("agent with spaces", odd, resource=resource))
        got = await s.etag_seen(CONN, resource, "agent with spaces", 1000.0)
        assert got is not None and got.etag == odd and got.resource == resource

    run(make_store, body)


@pytest.mark.parametrize("bad", [
    seen(etag=""),
    seen(etag='"' + "x" * MAX_ETAG_LENGTH + '"'),
    seen(at=float("nan")),
    seen(ttl=float("inf")),
])
def test_invalid_values_are_refused(make_store: MakeStore, bad: SeenETag) -> None:
    async def body(s: Store) -> None:
        with pytest.raises(ValueError):
            await s.remember_etag(bad)
        assert await s.etag_seen(CONN, RES, "alice", 1000.0) is None

    run(make_store, body)


def test_concurrent_writers_leave_one_row(make_store: MakeStore) -> None:
    """Many connections (replicas) remembering for the same agent and record: one row, one of their values."""
    async def main() -> None:
        stores = [make_store() for _ in range(4)]
        for s in stores:
            await s.open()
        try:
            await asyncio.gather(*(stores[i % 4].remember_etag(seen(etag=f'"v{i}"', at=1000.0 + i, decision=f"d{i}"))
                                   for i in range(40)))
            got = await stores[0].etag_seen(CONN, RES, "alice", 1000.0)
            assert got is not None and got.etag == f'"v{got.decision_id[1:]}"'
            assert await stores[1].sweep_etags(5000.0) == 1
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())


# What schema versions after 3 added (dropped to stand for a store written by the release with schema 3)
LATER_TABLES = ("proctor_etags", "proctor_wf_instances", "proctor_wf_objects", "proctor_wf_events",
                "proctor_rate_limits", "proctor_budget_usage", "proctor_budget_reservations", "proctor_replicas")


def test_sqlite_store_at_version_3_migrates_to_the_latest(tmp_path: Path) -> None:
    """A store written by an earlier release (schema 3) gains the tables and keeps its id."""
    path = tmp_path / "old.db"
    assert SCHEMA_VERSION >= 4

    async def open_and(fn):  # type: ignore[no-untyped-def]
        s = open_store(f"sqlite://{path}")
        await s.open()
        try:
            return await fn(s)
        finally:
            await s.close()

    async def identity(s: Store) -> str:
        assert s.identity is not None
        return s.identity.store_id

    first = asyncio.run(open_and(identity))
    db = sqlite3.connect(path)
    for table in LATER_TABLES:
        db.execute(f"DROP TABLE {table}")
    db.execute("DELETE FROM proctor_schema_version WHERE version > 3")
    db.commit()
    db.close()

    async def use(s: Store) -> str:
        await s.remember_etag(seen())
        assert (await s.etag_seen(CONN, RES, "alice", 1000.0)) == seen()
        return await identity(s)

    assert asyncio.run(open_and(use)) == first
    db = sqlite3.connect(path)
    versions = [r[0] for r in db.execute("SELECT version FROM proctor_schema_version ORDER BY version")]
    assert versions[-(SCHEMA_VERSION - 2):] == list(range(3, SCHEMA_VERSION + 1))
    db.close()


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_postgres_store_at_version_3_migrates_to_the_latest() -> None:
    schema = "proctor_test_" + uuid.uuid4().hex[:16]

    def make() -> Store:
        return PostgresStore(PG_DSN, schema=schema, connect_timeout=5)  # type: ignore[arg-type]

    async def open_and(fn):  # type: ignore[no-untyped-def]
        s = make()
        await s.open()
        try:
            return await fn(s)
        finally:
            await s.close()

    async def identity(s: Store) -> str:
        assert s.identity is not None
        return s.identity.store_id

    async def use(s: Store) -> str:
        await s.remember_etag(seen())
        assert (await s.etag_seen(CONN, RES, "alice", 1000.0)) == seen()
        return await identity(s)

    try:
        first = asyncio.run(open_and(identity))
        drops = "; ".join(f'DROP TABLE "{schema}".{t}' for t in LATER_TABLES)
        asyncio.run(_pg_admin(f'{drops}; DELETE FROM "{schema}".proctor_schema_version WHERE version > 3'))
        assert asyncio.run(open_and(use)) == first
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
