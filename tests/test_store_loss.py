"""A lost or replaced state store is noticed; an acknowledged suspension is never lost.

- Unit: the store's identity and the `<state_dir>/store-id` marker (a restart
  refuses a missing, emptied or different store and never creates one); a
  SQLite file deleted or replaced under a running store (every operation then
  fails, the check marks it lost); PostgreSQL schemas dropped or swapped;
  suspensions committed with synchronous = FULL; the kill switch refusing
  while the store is in trouble and until its set has been re-read.
- End to end: a real `proctor run` whose store file is deleted or replaced
  while it runs (agents get 503 fail-closed, the upstream sees nothing,
  /readyz 503 with the reason), that refuses to restart on the wrong store
  (exit non-zero, naming the marker) and starts on a fresh one only once the
  marker is deleted; a suspension acknowledged with 201 survives `kill -9`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import Proctor, wait_for

from proxy.governance.registry import Governance
from proxy.store import StoreError, Suspension
from proxy.store.base import StoreLostError
from proxy.store.guard import MARKER_NAME, open_verified, read_marker
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")
PG_SKIP = "PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)"


def run(coro):
    return asyncio.run(coro)


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def make_other_store(path: Path) -> str:
    """A different, valid Proctor store at `path`; its id."""
    other = SQLiteStore(str(path))
    await other.open()
    await other.suspend(Suspension("agent", "someone-else", 1.0, "x", "another store"))
    store_id = other.identity.store_id
    await other.close()
    return store_id


# ------------------------------------------------------------------ startup: the marker
def test_first_start_remembers_the_store_and_a_restart_accepts_it(tmp_path: Path):
    db, marker = tmp_path / "proctor.db", tmp_path / MARKER_NAME

    async def main():
        s = SQLiteStore(str(db))
        await open_verified(s, marker)
        first = s.identity
        await s.suspend(Suspension("agent", "bad-bot", 1.0, "olga", "loop"))
        await s.close()
        again = SQLiteStore(str(db))
        await open_verified(again, marker)
        try:
            assert again.identity == first
            assert [x.target for x in await again.list_suspensions()] == ["bad-bot"]
        finally:
            await again.close()
        return first

    first = run(main())
    m = read_marker(marker)
    assert m is not None and m.store_id == first.store_id and m.created_at == first.created_at
    assert str(db) in m.location
    assert oct(marker.stat().st_mode & 0o777) == "0o600"
    uuid.UUID(first.store_id)  # a random UUID


@pytest.mark.parametrize("damage", ["deleted", "emptied", "replaced"])
def test_restart_refuses_a_missing_empty_or_other_store_and_creates_nothing(tmp_path: Path, damage: str):
    db, marker = tmp_path / "proctor.db", tmp_path / MARKER_NAME

    async def first_run():
        s = SQLiteStore(str(db))
        await open_verified(s, marker)
        await s.suspend(Suspension("agent", "bad-bot", 1.0, "olga", "loop"))
        await s.close()
        return s.identity.store_id

    expected = run(first_run())
    remove_db(db)
    other_id = None
    if damage == "emptied":
        db.write_bytes(b"")
    elif damage == "replaced":
        other_id = run(make_other_store(db))

    async def restart():
        s = SQLiteStore(str(db))
        with pytest.raises(StoreLostError) as ei:
            await open_verified(s, marker)
        await s.close()
        return str(ei.value)

    msg = run(restart())
    assert expected in msg and str(marker) in msg and "delete" in msg, msg
    assert "lift every suspension" in msg
    if damage == "deleted":
        assert "does not exist" in msg
        assert not db.exists()  # nothing was created in its place
    elif damage == "emptied":
        assert "is empty" in msg and db.stat().st_size == 0
    else:
        assert other_id in msg and "not the one this state directory used" in msg
    assert read_marker(marker).store_id == expected  # the marker is left alone


def test_deleting_the_marker_accepts_a_fresh_store(tmp_path: Path):
    db, marker = tmp_path / "proctor.db", tmp_path / MARKER_NAME

    async def main():
        s = SQLiteStore(str(db))
        await open_verified(s, marker)
        old = s.identity.store_id
        await s.close()
        remove_db(db)
        marker.unlink()
        fresh = SQLiteStore(str(db))
        await open_verified(fresh, marker)
        new = fresh.identity.store_id
        await fresh.close()
        return old, new

    old, new = run(main())
    assert old != new and read_marker(marker).store_id == new


def test_a_file_without_proctor_tables_is_not_adopted(tmp_path: Path):
    db, marker = tmp_path / "proctor.db", tmp_path / MARKER_NAME

    async def first_run():
        s = SQLiteStore(str(db))
        await open_verified(s, marker)
        await s.close()

    run(first_run())
    remove_db(db)
    with sqlite3.connect(db) as c:  # some other database, not empty
        c.execute("CREATE TABLE notes (t TEXT)")

    async def restart():
        s = SQLiteStore(str(db))
        with pytest.raises(StoreLostError, match="holds no Proctor state"):
            await open_verified(s, marker)
        await s.close()

    run(restart())
    with sqlite3.connect(db) as c:
        assert [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]


def test_unreadable_marker_refuses_to_start(tmp_path: Path):
    marker = tmp_path / MARKER_NAME
    marker.write_text("not json")
    with pytest.raises(StoreError, match="delete it"):
        run(open_verified(SQLiteStore(str(tmp_path / "proctor.db")), marker))


def test_memory_store_needs_no_marker(tmp_path: Path):
    async def main():
        s = SQLiteStore(":memory:")
        await open_verified(s, tmp_path / MARKER_NAME)
        await s.close()

    run(main())
    assert not (tmp_path / MARKER_NAME).exists()


# ------------------------------------------------------------ while running: SQLite
@pytest.mark.parametrize("how", ["deleted", "main-file-deleted", "replaced", "wal-deleted"])
def test_sqlite_file_lost_while_open_fails_every_operation(tmp_path: Path, how: str):
    db = tmp_path / "proctor.db"

    async def main():
        s = SQLiteStore(str(db))
        await s.open()
        await s.suspend(Suspension("agent", "bad-bot", 1.0, "olga", "loop"))
        await s.check()
        assert s.problem is None and s.last_check is not None
        if how == "deleted":
            remove_db(db)
        elif how == "main-file-deleted":
            db.unlink()
        elif how == "replaced":
            spare = tmp_path / "spare.db"
            await make_other_store(spare)
            os.replace(spare, db)
        else:
            Path(f"{db}-wal").unlink()
        # the next operation notices, whichever it is: a read...
        with pytest.raises(StoreLostError):
            await s.list_suspensions()
        assert s.lost is not None and s.problem == s.lost
        # ...a write (the kill switch) is refused rather than written into a file nobody reads
        with pytest.raises(StoreLostError):
            await s.suspend(Suspension("agent", "other-bot", 2.0, "olga", "x"))
        await s.check()  # and it stays lost
        assert s.lost is not None
        await s.close()
        return s.lost

    lost = run(main())
    assert str(db) in lost
    assert {"deleted": "was deleted", "main-file-deleted": "was deleted", "replaced": "replaced by another file",
            "wal-deleted": "write-ahead log"}[how] in lost
    if how in ("main-file-deleted", "replaced"):
        # The lost store's log is set aside, never replayed onto the next file at the path
        assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()
        assert len(list(tmp_path.glob("proctor.db-wal.lost-*"))) == 1
        assert len(list(tmp_path.glob("proctor.db-shm.lost-*"))) == 1


def test_a_replacement_file_is_not_mixed_with_the_lost_store_log(tmp_path: Path):
    """SQLite replays a -wal it finds next to a database file: had the lost store's log
    stayed at the path, the replacement would have been read with the old store's pages."""
    db = tmp_path / "proctor.db"

    async def main():
        s = SQLiteStore(str(db))
        await s.open()
        for i in range(20):
            await s.suspend(Suspension("agent", f"bot-{i}", 1.0, "olga", "loop"))
        spare = tmp_path / "spare.db"
        other_id = await make_other_store(spare)
        os.replace(spare, db)
        await s.check()
        assert s.lost is not None
        await s.close()
        again = SQLiteStore(str(db))
        await again.open(create=False)
        try:
            return other_id, again.identity.store_id, [x.target for x in await again.list_suspensions()]
        finally:
            await again.close()

    other_id, found, suspended = run(main())
    assert found == other_id and suspended == ["someone-else"]


def test_periodic_check_notices_a_deleted_file_without_any_traffic(tmp_path: Path):
    db = tmp_path / "proctor.db"

    async def main():
        s = SQLiteStore(str(db))
        await s.open()
        from proxy.store.guard import watch_store

        watcher = asyncio.create_task(watch_store(s, interval=0.05))
        remove_db(db)
        deadline = time.monotonic() + 3
        while s.lost is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert s.lost is not None and "was deleted" in s.lost
        await asyncio.wait_for(watcher, 1)  # a lost store is final: the watcher ends
        await s.close()

    run(main())


def test_suspend_and_resume_commit_with_synchronous_full(tmp_path: Path):
    """An acknowledged suspension survives a power loss, not just a process crash: in WAL
    mode `synchronous = NORMAL` may lose the last commits, FULL fsyncs the log at COMMIT."""
    statements: list[str] = []

    async def main():
        s = SQLiteStore(str(tmp_path / "proctor.db"))
        await s.open()
        await s._db.set_trace_callback(statements.append)
        await s.suspend(Suspension("agent", "bad-bot", 1.0, "olga", "loop"))
        suspend_sql = list(statements)
        statements.clear()
        await s.resume("agent", "bad-bot")
        resume_sql = list(statements)
        statements.clear()
        await s.record_creator("Item", "1", "bot", "d1", 1.0)  # bookkeeping: no fsync on the request path
        other_sql = list(statements)
        sync = (await s._db.execute_fetchall("PRAGMA synchronous"))[0][0]
        await s.close()
        return suspend_sql, resume_sql, other_sql, sync

    suspend_sql, resume_sql, other_sql, sync = run(main())
    for sql, verb in ((suspend_sql, "INSERT INTO proctor_suspensions"), (resume_sql, "DELETE FROM proctor_suspensions")):
        i_full = sql.index("PRAGMA synchronous = FULL")
        i_write = next(i for i, q in enumerate(sql) if q.startswith(verb))
        i_commit = sql.index("COMMIT")
        i_normal = sql.index("PRAGMA synchronous = NORMAL")
        assert i_full < i_write < i_commit < i_normal, sql
    assert not any("synchronous" in q for q in other_sql), other_sql
    assert sync == 1  # back to NORMAL


# ---------------------------------------------------------- while running: PostgreSQL
@pytest.fixture
def pg_schema():
    import asyncpg

    schema = "proctor_test_" + uuid.uuid4().hex[:16]
    yield schema

    async def drop():
        conn = await asyncpg.connect(PG_DSN, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    run(drop())


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_postgres_schema_dropped_is_lost_and_never_recreated_on_restart(tmp_path: Path, pg_schema: str):
    marker = tmp_path / MARKER_NAME

    async def main():
        s = PostgresStore(PG_DSN, schema=pg_schema, connect_timeout=5)
        await open_verified(s, marker)
        await s.suspend(Suspension("agent", "bad-bot", 1.0, "olga", "loop"))
        await s.check()
        assert s.problem is None
        await _pg(f'DROP SCHEMA "{pg_schema}" CASCADE')
        await s.check()
        assert s.lost is not None and "no Proctor tables" in s.lost
        with pytest.raises(StoreLostError):
            await s.list_suspensions()
        await s.close()
        again = PostgresStore(PG_DSN, schema=pg_schema, connect_timeout=5)
        with pytest.raises(StoreLostError) as ei:
            await open_verified(again, marker)
        await again.close()
        import asyncpg

        conn = await asyncpg.connect(PG_DSN, timeout=10)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", pg_schema)
        finally:
            await conn.close()
        return str(ei.value), exists

    msg, exists = run(main())
    assert "holds no Proctor state" in msg and str(marker) in msg
    assert exists is None  # nothing was created in its place


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_postgres_other_store_is_refused_and_a_swapped_id_is_lost(tmp_path: Path, pg_schema: str):
    marker = tmp_path / MARKER_NAME
    other_schema = pg_schema + "_b"

    async def main():
        s = PostgresStore(PG_DSN, schema=pg_schema, connect_timeout=5)
        await open_verified(s, marker)
        expected = s.identity.store_id
        # swapped under a running proxy (e.g. a restore from another environment)
        await _pg(f"UPDATE \"{pg_schema}\".proctor_store_identity SET store_id = 'someone-else'")
        await s.check()
        assert s.lost is not None and "someone-else" in s.lost and expected in s.lost
        await s.close()
        # the same state directory pointed at another (valid) store
        other = PostgresStore(PG_DSN, schema=other_schema, connect_timeout=5)
        await other.open()
        await other.close()
        wrong = PostgresStore(PG_DSN, schema=other_schema, connect_timeout=5)
        with pytest.raises(StoreLostError, match="not the one this state directory used"):
            await open_verified(wrong, marker)
        await wrong.close()

    try:
        run(main())
    finally:
        run(_pg(f'DROP SCHEMA IF EXISTS "{other_schema}" CASCADE'))


# ------------------------------------------------------------- the kill switch's cache
class FlakyStore(SQLiteStore):
    """A real SQLite store whose health check (the store 'down') or suspension reads can be made to fail."""

    failing = False
    reads_failing = False

    async def _verify(self) -> None:
        if self.failing:
            raise StoreError("state store: connection refused")
        await super()._verify()

    async def suspensions_version(self) -> int:
        if self.reads_failing:
            raise StoreError("state store: suspensions_version failed: disk I/O error")
        return await super().suspensions_version()


def test_kill_switch_refuses_while_the_store_is_in_trouble_and_until_re_read(tmp_path: Path):
    async def main():
        store = FlakyStore(str(tmp_path / "proctor.db"))
        await store.open()
        gov = Governance(store)
        await gov.load()
        assert gov.agent_suspension("bot") is None
        # the store goes down: the cached set (empty) must not answer "not suspended"
        store.failing = True
        await store.check()
        assert store.problem and "connection refused" in store.problem
        for ask in (lambda: gov.agent_suspension("bot"), lambda: gov.suspension_for("bot", "c", "a")):
            with pytest.raises(StoreError, match="suspensions cannot be checked"):
                ask()
        # meanwhile another replica suspends "bot" directly in the store
        other = SQLiteStore(store.path)
        await other.open()
        await other.suspend(Suspension("agent", "bot", 5.0, "olga", "from replica 2"))
        await other.close()
        store.failing = False
        await store.check()
        assert store.problem is None
        assert gov.stale
        with pytest.raises(StoreError, match="being re-read"):
            gov.agent_suspension("bot")  # recovered, but the set is not re-read yet
        assert "being re-read" in gov.stale_reason
        await gov.refresh()
        assert not gov.stale
        s = gov.agent_suspension("bot")
        assert s is not None and s.reason == "from replica 2"
        await store.close()

    run(main())


def test_kill_switch_refuses_while_its_set_cannot_be_refreshed(tmp_path: Path):
    """The store answers its health check, but reading the suspensions fails: the set may
    miss a suspension made on another replica, so requests are refused until a read succeeds."""

    async def main():
        store = FlakyStore(str(tmp_path / "proctor.db"))
        await store.open()
        gov = Governance(store, refresh_seconds=0.02)
        await gov.load()
        poller = asyncio.create_task(gov.run())
        try:
            store.reads_failing = True
            deadline = time.monotonic() + 3
            while not gov.stale and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert gov.stale and store.problem is None
            with pytest.raises(StoreError, match="cannot be read from the state store: .*disk I/O error"):
                gov.agent_suspension("bot")
            store.reads_failing = False
            deadline = time.monotonic() + 3
            while gov.stale and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert gov.agent_suspension("bot") is None
        finally:
            poller.cancel()
            await store.close()

    run(main())


def test_kill_switch_refuses_once_the_store_is_lost(tmp_path: Path):
    async def main():
        db = tmp_path / "proctor.db"
        store = SQLiteStore(str(db))
        await store.open()
        gov = Governance(store)
        await gov.load()
        await gov.suspend("agent", "bad-bot", "olga", "loop")
        remove_db(db)
        await store.check()
        with pytest.raises(StoreError, match="was deleted"):
            gov.agent_suspension("good-bot")
        with pytest.raises(StoreError):  # and nothing can be suspended into the lost file
            await gov.suspend("agent", "other-bot", "olga", "x")
        assert [s.target for s in gov.suspensions()] == ["bad-bot"]
        await store.close()

    run(main())


# ------------------------------------------------------------------------ end to end
def operator_token(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def suspend(p: Proctor, op: str, agent: str) -> httpx.Response:
    return httpx.post(f"{p.control_url}/v1/suspensions", headers={"Authorization": f"Bearer {op}"},
                      json={"kind": "agent", "target": agent, "reason": "incident 7"}, timeout=10)


def relaunch(p: Proctor) -> Proctor:
    """A new `proctor run` on p's config and state directory (same ports); waits for /readyz."""
    log_path = p.dir / f"proctor-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path)],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=str(p.dir), env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    new = Proctor(p.dir, p.config_path, p.port, p.control_port, p.gateway_port, proc, log_path, p.ca_pem, p.policies_dir)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"proctor exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            return httpx.get(f"{new.control_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, what="restarted proctor readiness")
    return new


def start_fails(p: Proctor) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path)],
                         cwd=str(p.dir), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0, out.stderr
    return out


def get_item(p: Proctor, upstream, agent: str, token: str, marker: str) -> httpx.Response:
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=10) as c:
        return c.get(f"http://127.0.0.1:{upstream.port}/items/{marker}")


def hits(upstream, marker: str) -> list[dict]:
    return [e for e in upstream.received() if marker in e["path"]]


def test_acknowledged_suspension_survives_kill_9(proctor_factory, idp, upstream):
    p = proctor_factory()
    agent, op = "sl-kill9-bot", operator_token(idp)
    tok = idp.token(agent, groups=["readers"], ttl=600)
    m = "sl-" + uuid.uuid4().hex[:12]
    assert get_item(p, upstream, agent, tok, f"{m}-0").status_code == 200
    r = suspend(p, op, agent)
    assert r.status_code == 201, r.text
    p.proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed
    p.proc.wait(10)
    p = relaunch(p)
    try:
        r = get_item(p, upstream, agent, tok, f"{m}-1")
        assert r.status_code == 403 and r.json()["reasons"] == [f"suspended:agent:{agent}"], r.text
        assert [e["path"] for e in hits(upstream, m)] == [f"/items/{m}-0"]
        # the resume is just as durable
        assert httpx.delete(f"{p.control_url}/v1/suspensions/agent/{agent}",
                            headers={"Authorization": f"Bearer {op}"}, timeout=10).status_code == 200
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait(10)
        p = relaunch(p)
        assert get_item(p, upstream, agent, tok, f"{m}-2").status_code == 200
    finally:
        p.stop()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_store_file_lost_while_running_fails_closed_and_blocks_a_silent_restart(
    proctor_factory, idp, upstream, upstream_tls, how: str
):
    p = proctor_factory()
    state = p.dir / "state"
    db, marker = state / "proctor.db", state / MARKER_NAME
    agent, op = f"sl-{how}-bot", operator_token(idp)
    tok = idp.token(agent, groups=["readers"], ttl=600)
    m = "sl-" + uuid.uuid4().hex[:12]
    assert suspend(p, op, "sl-suspended-bot").status_code == 201
    assert get_item(p, upstream, agent, tok, f"{m}-0").status_code == 200
    expected = json.loads(marker.read_text())["store_id"]
    assert p.health()["components"]["store"]["store_id"] == expected

    if how == "deleted":
        remove_db(db)
    else:
        spare = p.dir / "spare.db"
        run(make_other_store(spare))
        os.replace(spare, db)

    def not_ready() -> bool:
        return httpx.get(f"{p.control_url}/readyz", timeout=2).status_code == 503

    wait_for(not_ready, timeout=5, interval=0.1, what="/readyz to notice the lost store")
    ready = httpx.get(f"{p.control_url}/readyz", timeout=2).json()
    assert ready["ready"] is False
    assert any("state store lost" in r and str(db) in r for r in ready["reasons"]), ready
    store = p.health()["components"]["store"]
    assert store["status"] == "down" and store["lost"] is True

    # agents are refused, fail closed: nothing reaches the upstream
    r = get_item(p, upstream, agent, tok, f"{m}-1")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["type"].endswith("/fail-closed") and body["decision_id"]
    assert r.headers["x-proctor-decision-id"] == body["decision_id"]
    with httpx.Client(proxy=p.proxy_url_with(agent, tok), timeout=10) as c:
        assert c.post(f"http://127.0.0.1:{upstream.port}/items", json={"m": m}).status_code == 503
    # the gateway and CONNECT tunnels too
    r = httpx.get(f"{p.gateway_url}/svc/items/{m}-gw", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 503 and r.json()["type"].endswith("/fail-closed"), r.text
    tls_before = len(upstream_tls.received())
    with pytest.raises(httpx.ProxyError, match="503"):
        with httpx.Client(proxy=p.proxy_url_with(agent, tok), verify=ssl.create_default_context(cafile=str(p.ca_pem)),
                          timeout=10) as c:
            c.get(f"https://localhost:{upstream_tls.port}/items/{m}-tls")
    assert len(upstream_tls.received()) == tls_before
    assert [e["path"] for e in hits(upstream, m)] == [f"/items/{m}-0"]
    (rec,) = [d for d in p.decisions() if d.get("decision_id") == body["decision_id"]]
    assert rec["refusal"]["kind"] == "fail-closed" and any(str(db) in e for e in rec["errors"]), rec
    # the refusal says why (not "internal error"), and the log is not a traceback per request
    assert body["title"] == "State store unavailable" and body["reasons"] == ["store-unavailable"], body
    assert get_item(p, upstream, agent, tok, f"{m}-2").headers["retry-after"] == "5"
    assert p.log().count("Traceback") == 0 and p.log().count("refusing requests while the state store") == 1
    # the kill switch cannot be written into a file nobody will read: 5xx, not 201
    r = suspend(p, op, "sl-late-bot")
    assert r.status_code == 503, r.text
    # the operator views answer 503 (not 500, not a stale "not suspended")
    r = httpx.get(f"{p.control_url}/v1/agents", headers={"Authorization": f"Bearer {op}"}, timeout=10)
    assert r.status_code == 503, r.text

    # a restart refuses the store it finds (missing, or another one) instead of starting empty
    p.stop()
    out = start_fails(p)
    assert "refusing to start" in out.stderr and expected in out.stderr and str(marker) in out.stderr, out.stderr
    if how == "deleted":
        assert not db.exists()  # and no empty store was created

    # deleting the marker is the deliberate way to accept the store as it is
    marker.unlink()
    if how == "replaced":
        db_before = db.stat().st_ino
    p = relaunch(p)
    try:
        assert json.loads(marker.read_text())["store_id"] != expected
        if how == "replaced":
            assert db.stat().st_ino == db_before
        r = get_item(p, upstream, agent, tok, f"{m}-2")
        assert r.status_code == 200, r.text
    finally:
        p.stop()


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_postgres_schema_dropped_under_a_running_proxy(proctor_factory, idp, upstream, pg_schema: str):
    sep = "&" if "?" in PG_DSN else "?"
    p = proctor_factory({"store": {"url_env": "PROCTOR_TEST_STORE_URL"}},
                        env={"PROCTOR_TEST_STORE_URL": f"{PG_DSN}{sep}schema={pg_schema}"})
    agent, op = "sl-pg-bot", operator_token(idp)
    tok = idp.token(agent, groups=["readers"], ttl=600)
    m = "sl-" + uuid.uuid4().hex[:12]
    assert get_item(p, upstream, agent, tok, f"{m}-0").status_code == 200
    assert p.health()["components"]["store"]["backend"] == "postgresql"
    assert "@" not in p.health()["components"]["store"]["location"]  # never the user (or a password)
    expected = json.loads((p.dir / "state" / MARKER_NAME).read_text())["store_id"]

    run(_pg(f'DROP SCHEMA "{pg_schema}" CASCADE'))  # e.g. a migration gone wrong, a wrong restore

    def lost() -> bool:
        r = httpx.get(f"{p.control_url}/readyz", timeout=2)
        return r.status_code == 503 and any("state store lost" in x for x in r.json()["reasons"])

    wait_for(lost, timeout=5, interval=0.1, what="/readyz to report the dropped schema")
    reasons = httpx.get(f"{p.control_url}/readyz", timeout=2).json()["reasons"]
    assert any("no Proctor tables" in r and pg_schema in r for r in reasons), reasons
    r = get_item(p, upstream, agent, tok, f"{m}-1")
    assert r.status_code == 503 and r.json()["type"].endswith("/fail-closed"), r.text
    assert suspend(p, op, "sl-late-bot").status_code == 503
    assert [e["path"] for e in hits(upstream, m)] == [f"/items/{m}-0"]

    p.stop()
    env = dict(os.environ, PROCTOR_TEST_STORE_URL=f"{PG_DSN}{sep}schema={pg_schema}")
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path)],
                         cwd=str(p.dir), capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0 and "refusing to start" in out.stderr and expected in out.stderr, out.stderr
