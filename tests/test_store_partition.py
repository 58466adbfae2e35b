"""Partitions: a replica cut off from its store stops deciding, within bounded time, and recovers.

The "packets dropped, not refused" failure is simulated with tests/support/blackhole.py,
a TCP forwarder on loopback between Proctor and PostgreSQL that can go silent (open
connections stay open, every byte is swallowed, new connections are accepted and hear
nothing), which is what a firewall dropping traffic looks like to the client.

- Unit: the staleness bound (Store.stale) on any backend; a check returns within its
  deadline on a silent network and ends the calls waiting on the store; calls made while
  the store is in trouble fail at once; TCP keepalive and TCP_USER_TIMEOUT on the pool's
  sockets.
- End to end: a real `proctor run` whose store URL goes through the black hole, and a
  second replica on the direct DSN. Cut: within the bound every request is 503
  fail-closed (forward proxy and gateway), the operator API too, /readyz 503 naming the
  store, and no request waits longer than the timeouts. Meanwhile the second replica
  suspends the agent. Restore: the first replica is ready again by itself and the
  suspension made during the cut is enforced on its very first allowed decision (never
  a 200 in between).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import Proctor, wait_for

from proxy.governance.registry import Governance
from proxy.store import StoreError, Suspension, open_store
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore

sys.path.insert(0, str(Path(__file__).parent))
from support.blackhole import Blackhole  # noqa: E402

PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")
PG_SKIP = "PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)"


def run(coro):
    return asyncio.run(coro)


def pg_target() -> tuple[str, int, str]:
    """(host, port, DSN with the host and port left for the forwarder) of the test PostgreSQL."""
    from urllib.parse import urlsplit

    assert PG_DSN
    parts = urlsplit(PG_DSN)
    return parts.hostname or "127.0.0.1", parts.port or 5432, PG_DSN


def via(bh: Blackhole, schema: str) -> str:
    """The test DSN, through the black hole, in `schema`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(PG_DSN or "")
    user = f"{parts.username}@" if parts.username else ""
    query = f"{parts.query}&schema={schema}" if parts.query else f"schema={schema}"
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{bh.port}", query=query))


def direct(schema: str) -> str:
    sep = "&" if "?" in (PG_DSN or "") else "?"
    return f"{PG_DSN}{sep}schema={schema}"


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


@pytest.fixture
def blackhole():
    if not PG_DSN:
        pytest.skip(PG_SKIP)
    host, port, _ = pg_target()
    bh = Blackhole(host, port)
    yield bh
    bh.close()


# ------------------------------------------------------------------------------ unit
def test_a_store_unheard_of_past_the_staleness_bound_is_a_problem_until_a_check_answers(tmp_path: Path):
    async def main():
        store = open_store(f"sqlite:///{tmp_path}/p.db", staleness_seconds=2)
        await store.open()
        gov = Governance(store)
        await gov.load()
        assert store.problem is None  # no check yet: nothing to be stale against
        await store.check()
        assert store.problem is None and store.stale is None
        store._last_ok = time.monotonic() - 2.5  # the watcher has not heard from the store for 2.5 s
        assert "no answer from the state store" in (store.stale or "")
        assert "store.staleness_seconds: 2" in (store.problem or "")
        with pytest.raises(StoreError, match="suspensions cannot be checked: no answer"):
            gov.agent_suspension("any-bot")
        await store.check()  # the store answers again
        assert store.problem is None
        with pytest.raises(StoreError):  # but the set is re-read before anyone is let through
            gov.agent_suspension("any-bot")
        await gov.refresh()
        assert gov.agent_suspension("any-bot") is None
        await store.close()

    run(main())


def test_staleness_and_timeouts_reach_the_postgres_store():
    s = open_store("postgresql://u@db:5432/x?schema=s1", staleness_seconds=7, command_timeout=3, connect_timeout=2)
    assert isinstance(s, PostgresStore)
    assert (s.staleness_seconds, s.command_timeout, s.connect_timeout) == (7, 3, 2)
    d = open_store("postgresql://u@db:5432/x?connect_timeout=4")
    assert isinstance(d, PostgresStore) and d.connect_timeout == 4 and d.command_timeout == 10
    assert SQLiteStore.staleness_seconds == 10


def test_a_check_that_asyncpg_times_out_first_still_names_the_store():
    """asyncpg's own deadline (check_timeout) often fires just before check()'s: the reason on
    /readyz must still say which store did not answer (seen in CI: 'check failed: TimeoutError: ')."""

    class SilentPool:
        async def fetchrow(self, *a, **kw):
            raise asyncio.TimeoutError()

    class RefusingPool:
        async def fetchrow(self, *a, **kw):
            raise ConnectionRefusedError(111, "Connect call failed")

    async def main():
        for pool, expected in ((SilentPool(), "did not answer a check within 5 s"),
                               (RefusingPool(), "check failed: ConnectionRefusedError")):
            store = PostgresStore("postgresql://u:pw@db.internal:6432/x?schema=s9")
            store._p = lambda gated=True, pool=pool: pool  # type: ignore[method-assign]
            await store.check()
            problem = store.problem or ""
            assert "db.internal:6432" in problem and "schema s9" in problem, problem
            assert expected in problem and "pw" not in problem, problem

    run(main())


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_silent_store_check_returns_in_time_and_ends_the_calls_waiting_on_it(blackhole: Blackhole, pg_schema: str):
    async def main():
        store = PostgresStore(via(blackhole, pg_schema), staleness_seconds=3, command_timeout=20)
        await store.open()
        await store.suspend(Suspension("agent", "bad-bot", 1.0, "olga", "loop"))
        await store.check()
        assert store.problem is None
        blackhole.cut()
        # more calls than the pool has connections: some wait on a query, some for a connection
        calls = [asyncio.ensure_future(store.list_suspensions()) for _ in range(store.max_size + 3)]
        await asyncio.sleep(0.2)
        t = time.monotonic()
        await store.check()  # never more than its deadline, however asyncpg cleans up
        took = time.monotonic() - t
        assert 2.5 < took < 3.5, took
        assert "did not answer a check within 3 s" in (store.problem or "")
        t = time.monotonic()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - t < 1.0  # ended by the check giving up, not by the 20 s command timeout
        assert all(isinstance(r, StoreError) for r in results), results
        t = time.monotonic()
        with pytest.raises(StoreError, match="state store unavailable"):
            await store.list_suspensions()
        assert time.monotonic() - t < 0.1  # refused at once while the store is known to be in trouble
        blackhole.restore()
        deadline = time.monotonic() + 15
        while store.problem is not None and time.monotonic() < deadline:
            await store.check()
            await asyncio.sleep(0.2)
        assert store.problem is None
        assert [s.target for s in await store.list_suspensions()] == ["bad-bot"]
        await store.close()

    run(main())


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket option")
def test_pool_sockets_carry_keepalives_and_a_user_timeout(pg_schema: str):
    async def main():
        store = PostgresStore(direct(pg_schema), staleness_seconds=6, command_timeout=4)
        await store.open()
        async with store._p().acquire() as conn:
            sock = conn._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 4000
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 6
        await store.close()

    run(main())


# ------------------------------------------------------------------------ end to end
def operator_token(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def get_item(p: Proctor, upstream, agent: str, token: str, marker: str, timeout: float = 30) -> httpx.Response:
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=timeout) as c:
        return c.get(f"http://127.0.0.1:{upstream.port}/items/{marker}")


def readyz(p: Proctor) -> httpx.Response:
    return httpx.get(f"{p.control_url}/readyz", timeout=10)


STALENESS = 4.0
COMMAND_TIMEOUT = 3.0
# The longest any request may take while the store is silent: the check's deadline
# (min(5, staleness)) plus the 1 s between checks, plus slack for a loaded machine.
WORST = STALENESS + 1.0 + 3.0


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_replica_cut_off_from_postgres_refuses_then_recovers_with_the_suspensions_made_meanwhile(
    proctor_factory, idp, upstream, blackhole: Blackhole, pg_schema: str
):
    store_cfg = {"url_env": "PROCTOR_TEST_STORE_URL", "staleness_seconds": STALENESS,
                 "command_timeout_seconds": COMMAND_TIMEOUT, "connect_timeout_seconds": 2}
    cut_off = proctor_factory({"store": store_cfg}, name="cut",
                              env={"PROCTOR_TEST_STORE_URL": via(blackhole, pg_schema)})
    other = proctor_factory({"store": {"url_env": "PROCTOR_TEST_STORE_URL"}}, name="other",
                            env={"PROCTOR_TEST_STORE_URL": direct(pg_schema)})
    agent, op = "part-bot", operator_token(idp)
    tok = idp.token(agent, groups=["readers"], ttl=600)
    m = "part-" + uuid.uuid4().hex[:12]
    assert get_item(cut_off, upstream, agent, tok, f"{m}-before").status_code == 200
    assert readyz(cut_off).status_code == 200

    # traffic all through the cut and the recovery: (sent at, took, status)
    seen: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            t = time.monotonic()
            try:
                status = get_item(cut_off, upstream, agent, tok, f"{m}-t{i}").status_code
            except httpx.HTTPError:
                status = -1
            seen.append((t, time.monotonic() - t, status))
            time.sleep(0.05)

    workers = [threading.Thread(target=traffic, daemon=True) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    cut_at = time.monotonic()
    blackhole.cut()
    try:
        # within the bound: not ready, naming the store and the bound
        wait_for(lambda: readyz(cut_off).status_code == 503, timeout=WORST, interval=0.1,
                 what="/readyz 503 after the cut")
        not_ready_after = time.monotonic() - cut_at
        ready = readyz(cut_off).json()
        assert ready["ready"] is False
        assert any(pg_schema in r and f"127.0.0.1:{blackhole.port}" in r for r in ready["reasons"]), ready

        # agents are refused fail-closed (forward proxy and gateway), at once
        t = time.monotonic()
        r = get_item(cut_off, upstream, agent, tok, f"{m}-cut")
        assert time.monotonic() - t < 1.0
        assert r.status_code == 503, r.text
        body = r.json()
        assert r.headers["content-type"].startswith("application/problem+json")
        assert body["title"] == "State store unavailable" and body["reasons"] == ["store-unavailable"], body
        assert body["type"].endswith("/fail-closed") and r.headers["retry-after"] == "5"
        r = httpx.get(f"{cut_off.gateway_url}/svc/items/{m}-gw", headers={"Authorization": f"Bearer {tok}"},
                      timeout=30)
        assert r.status_code == 503 and r.json()["reasons"] == ["store-unavailable"], r.text
        # the operator API cannot write the kill switch into a store it cannot reach: 503, quickly
        t = time.monotonic()
        r = httpx.post(f"{cut_off.control_url}/v1/suspensions", headers={"Authorization": f"Bearer {op}"},
                       json={"kind": "agent", "target": "late-bot", "reason": "x"}, timeout=30)
        assert r.status_code == 503 and time.monotonic() - t < 1.0, r.text

        # meanwhile the other replica, which reaches the store, suspends the agent
        r = httpx.post(f"{other.control_url}/v1/suspensions", headers={"Authorization": f"Bearer {op}"},
                       json={"kind": "agent", "target": agent, "reason": "incident 9"}, timeout=10)
        assert r.status_code == 201, r.text
        time.sleep(2 * STALENESS)  # a long partition: many failed checks, a pool full of dead connections
    finally:
        blackhole.restore()
    restored_at = time.monotonic()
    wait_for(lambda: readyz(cut_off).status_code == 200, timeout=20, interval=0.1,
             what="/readyz 200 after the restore")
    ready_after = time.monotonic() - restored_at
    r = get_item(cut_off, upstream, agent, tok, f"{m}-after")
    assert r.status_code == 403 and r.json()["reasons"] == [f"suspended:agent:{agent}"], r.text
    time.sleep(1.0)
    stop.set()
    for w in workers:
        w.join(60)

    assert not_ready_after <= WORST, not_ready_after
    assert ready_after < 10, ready_after
    # no request hung: each answered within the bound, none failed at the transport
    assert seen and max(took for _, took, _ in seen) <= WORST, sorted(took for _, took, _ in seen)[-5:]
    assert all(status in (200, 403, 503) for _, _, status in seen), {s for _, _, s in seen}
    # refused from the bound on, and never let through once the suspension could be known
    refused_from = cut_at + WORST
    assert all(status == 503 for t, took, status in seen if refused_from <= t and t + took <= restored_at)
    assert all(status != 200 for t, _, status in seen if t >= restored_at)
    assert any(status == 403 for t, _, status in seen if t >= restored_at)
    # what the upstream saw from this agent after the cut: only requests already under way then
    late = [e["path"] for e in upstream.received() if f"{m}-t" in e["path"]]
    assert len(late) == sum(1 for _, _, s in seen if s == 200)


def test_the_store_location_never_shows_part_of_a_badly_escaped_password():
    for dsn in ("postgresql://proctor:pa/SECRET#XYZZY@db.internal:5432/x", "postgresql://proctor:pa?SECRET@db:5432/x",
                "postgresql://proctor:p#SECRET@db:5432/x"):
        where = PostgresStore(dsn).location
        assert "SECRET" not in where and "XYZZY" not in where, where
        # ('?' starts the query, which the store re-encodes: nothing of it is shown either way)
        assert "percent-encode" in where or "?" in dsn.split("@")[0], where
    assert PostgresStore("postgresql://u:p%2Fss@db.internal:6432/x?schema=s1").location == \
        "postgresql db.internal:6432/x schema s1"
