"""Rate limits and budget ledgers on every backend, against the real servers: memory (unit
only), SQLite (several store objects on one file), PostgreSQL (several stores on one schema;
PROCTOR_TEST_POSTGRES_DSN, as tests/test_store.py) and Redis (several clients on one prefix;
PROCTOR_TEST_REDIS_URL, default redis://127.0.0.1:6379/0, skipped only when that is unset and
nothing answers there; CI sets it, so there an unreachable Redis fails).

Every decision is exact under concurrency (N hits against a limit of M: exactly M pass, within
one process and across processes), every backend answers the same as the pure GCRA, amounts are
exact decimals, expired reservations are reclaimed, and a backend that cannot be reached raises
CounterUnavailable.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal as D
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from proxy.limits import BudgetLedger, CounterUnavailable, Gcra, RateLimiter, StoreCounters
from proxy.limits.memory import MemoryCounterStore
from proxy.limits.redis_backend import RedisCounters
from proxy.store.postgres import PostgresStore
from proxy.store.sqlite import SQLiteStore
from test_store import PG_DSN, PG_SKIP, _pg_admin

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("PROCTOR_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
REDIS_REQUIRED = bool(os.environ.get("PROCTOR_TEST_REDIS_URL"))


def _redis_problem(url: str) -> str | None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    try:
        with socket.create_connection((host, port), timeout=1.0) as s:
            s.sendall(b"PING\r\n")
            if not s.recv(16).startswith(b"+PONG"):
                return f"{host}:{port} answered but not as Redis"
    except OSError as e:
        return f"nothing answers at {host}:{port} ({e})"
    return None


_REDIS_DOWN = _redis_problem(REDIS_URL)
REDIS_SKIP = f"Redis not reachable: {_REDIS_DOWN}; PROCTOR_TEST_REDIS_URL is unset (CI sets it and then requires Redis)"
SKIP_REDIS = _REDIS_DOWN is not None and not REDIS_REQUIRED
LIMIT_SECONDS = 3600  # long periods: a fixed injected `now`, nothing refills during a test
WINDOW = "month:2026-12@Europe/Berlin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Backend:
    """Opens clients that share one backend (a file, a schema, a key prefix)."""

    name: str
    make: Callable[[], Awaitable[Any]]
    where: dict[str, str] = field(default_factory=dict)  # what a worker process needs to reach it
    opened: list[Any] = field(default_factory=list)

    async def clients(self, n: int) -> list[Any]:
        out = [await self.make() for _ in range(n)]
        self.opened.extend(out)
        return out

    async def close(self) -> None:
        for c in self.opened:
            if isinstance(c, RedisCounters):
                await c.close()
            elif hasattr(c.store, "close"):
                await c.store.close()
        self.opened.clear()


async def _redis_cleanup(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=[
    "memory",
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)),
    pytest.param("redis", marks=pytest.mark.skipif(SKIP_REDIS, reason=REDIS_SKIP)),
])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    name = request.param
    if name == "memory":
        shared = MemoryCounterStore()

        async def make_memory() -> StoreCounters:
            return StoreCounters(shared)

        yield Backend(name, make_memory)
    elif name == "sqlite":
        path = str(tmp_path / "state" / "proctor.db")

        async def make_sqlite() -> StoreCounters:
            s = SQLiteStore(path)
            await s.open()
            return StoreCounters(s)

        yield Backend(name, make_sqlite, {"path": path})
    elif name == "postgres":
        schema = "proctor_test_" + uuid.uuid4().hex[:16]

        async def make_pg() -> StoreCounters:
            s = PostgresStore(PG_DSN, schema=schema, connect_timeout=5)  # type: ignore[arg-type]
            await s.open()
            return StoreCounters(s)

        try:
            yield Backend(name, make_pg, {"dsn": PG_DSN or "", "schema": schema})
        finally:
            asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    else:
        prefix = f"proctor-test-{uuid.uuid4().hex[:12]}:"

        async def make_redis() -> RedisCounters:
            return RedisCounters(REDIS_URL, prefix=prefix)

        try:
            yield Backend(name, make_redis, {"url": REDIS_URL, "prefix": prefix})
        finally:
            asyncio.run(_redis_cleanup(prefix))


def drive(backend: Backend, body: Callable[[Backend], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        try:
            return await body(backend)
        finally:
            await backend.close()

    return asyncio.run(main())


# ---- rate limits ------------------------------------------------------------------------------
def test_concurrent_hits_pass_exactly_the_limit(backend: Backend) -> None:
    """60 concurrent hits from 4 clients against 17 per hour: exactly 17 pass, each seeing a
    different `remaining` (16 .. 0); other keys are untouched."""
    async def body(b: Backend) -> None:
        cs = await b.clients(4)
        assert all(isinstance(c, RateLimiter) and isinstance(c, BudgetLedger) and c.backend == b.name.replace(
            "postgres", "postgresql") for c in cs)
        ds = await asyncio.gather(*(cs[i % 4].hit("agent:alice", 17, LIMIT_SECONDS, 1000.0) for i in range(60)))
        allowed = [d for d in ds if d.allowed]
        assert len(allowed) == 17
        assert sorted(d.remaining for d in allowed) == list(range(17))
        assert all(d.retry_after > 0 and d.remaining == 0 for d in ds if not d.allowed)
        other = await cs[1].hit("agent:bob", 17, LIMIT_SECONDS, 1000.0)
        assert other.allowed and other.remaining == 16

    drive(backend, body)


def test_every_backend_answers_as_the_pure_gcra(backend: Backend) -> None:
    """A scripted sequence (bursts, costs, asking with cost 0, waiting, a changed limit) decided by the
    backend equals the pure function's decisions, field by field."""
    steps: list[tuple[float, int, int, float, int | None]] = [
        # (now, cost, limit, period, burst)
        (100.0, 1, 3, 1, None), (100.0, 1, 3, 1, None), (100.0, 0, 3, 1, None), (100.0, 2, 3, 1, None),
        (100.0, 1, 3, 1, None), (100.2, 1, 3, 1, None), (100.334, 1, 3, 1, None), (100.5, 4, 3, 1, None),
        (101.0, 1, 4, 1, None),  # the limit changed: the stored state is rescaled
        (101.0, 3, 4, 1, None), (101.0, 1, 4, 1, None), (105.0, 1, 7, 60, 2), (105.0, 1, 7, 60, 2),
        (105.0, 1, 7, 60, 2), (113.572, 1, 7, 60, 2), (1000.0, 5, 10, 10, 5), (1000.999, 1, 10, 10, 5),
        (1001.0, 1, 10, 10, 5),
    ]

    async def body(b: Backend) -> None:
        (c,) = await b.clients(1)
        state = None
        for now, cost, limit, period, burst in steps:
            got = await c.hit("k", limit, period, now, cost=cost, burst=burst)
            new, want = Gcra.of(limit, period, burst).decide(state, now, cost)
            if new is not None:
                state = new
            assert got == want, (now, cost, limit)

    drive(backend, body)


def test_bad_rate_arguments_are_value_errors(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        (c,) = await b.clients(1)
        for args in [("", 1, 1, 0.0), ("k\n", 1, 1, 0.0), ("k", 0, 1, 0.0), ("k", 1, 1, float("nan")),
                     ("k", 1, 1, 0.0, -1)]:
            with pytest.raises(ValueError):
                await c.hit(*args)

    drive(backend, body)


# ---- budget ledger ------------------------------------------------------------------------------
def test_concurrent_reservations_never_exceed_the_limit(backend: Backend) -> None:
    """50 concurrent reservations of 0.1 against 1.7 from 4 clients: exactly 17 are held; then
    settles (for other amounts), releases and new reservations race: every reservation that was
    told it fits does, and spent + reserved never passes the limit."""
    limit = D("1.7")

    async def body(b: Backend) -> None:
        cs = await b.clients(4)
        rs = await asyncio.gather(*(cs[i % 4].reserve("team:ops", WINDOW, D("0.1"), limit, f"r{i}", 60, 1000.0)
                                    for i in range(50)))
        held = [i for i, r in enumerate(rs) if r.placed]
        assert len(held) == 17 and all(r.ok == r.placed for r in rs)
        assert all(r.spent + r.reserved <= limit for r in rs)
        usage = await cs[0].usage("team:ops", WINDOW, 1000.0)
        assert (usage.spent, usage.reserved) == (D(0), limit)

        ops: list[Awaitable[Any]] = []
        for n, i in enumerate(held):
            c = cs[n % 4]
            if n % 3 == 0:
                ops.append(c.settle(f"r{i}", D("0.05"), 1001.0))  # cheaper than reserved
            elif n % 3 == 1:
                ops.append(c.release(f"r{i}"))
            ops.append(c.reserve("team:ops", WINDOW, D("0.07"), limit, f"s{n}", 60, 1001.0))
        results = await asyncio.gather(*ops)
        for r in results:
            if hasattr(r, "placed") and r.placed:
                assert r.ok and r.spent + r.reserved <= limit
        final = await cs[1].usage("team:ops", WINDOW, 1001.0)
        assert final.spent == D("0.05") * 6
        assert final.spent + final.reserved <= limit

    drive(backend, body)


def test_settle_release_charge_and_exact_decimals(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        c, other = await b.clients(2)
        r1 = await c.reserve("b", WINDOW, D("0.1"), D("0.3"), "r1", 60, 1000.0)
        r2 = await other.reserve("b", WINDOW, D("0.2"), D("0.3"), "r2", 60, 1000.0)
        assert (r1.ok, r1.placed, r1.reserved, r1.remaining) == (True, True, D("0.1"), D("0.2"))
        # 0.1 + 0.2 fills 0.3 exactly (binary floats would say 0.30000000000000004 > 0.3)
        assert (r2.ok, r2.reserved, r2.remaining, r2.over) == (True, D("0.3"), D(0), D(0))
        r3 = await c.reserve("b", WINDOW, D("0.0000001"), D("0.3"), "r3", 60, 1000.0)
        assert (r3.ok, r3.placed, r3.over, r3.reserved) == (False, False, D("0.0000001"), D("0.3"))

        s1 = await other.settle("r1", D("0.25"), 1001.0)  # more than reserved: the actual counts
        assert s1 is not None and (s1.status, s1.actual, s1.amount, s1.late) == ("settled", D("0.25"), D("0.1"), False)
        assert (s1.budget_key, s1.window_id, s1.spent, s1.reserved) == ("b", WINDOW, D("0.25"), D("0.2"))
        again = await c.settle("r1", D("9"), 1002.0)  # a repeat books nothing
        assert again is not None and (again.status, again.actual, again.spent) == ("already-settled", D("0.25"), D("0.25"))
        assert await c.release("r2") and not await other.release("r2")
        released = await c.settle("r2", D("1"), 1002.0)
        assert released is not None and (released.status, released.actual, released.spent) == ("released", D(0), D("0.25"))
        assert not await c.release("r1")  # settled: nothing to release
        assert await c.settle("nope", D("1"), 1002.0) is None and not await c.release("nope")

        u = await c.charge("b", WINDOW, D("0.05"), 1003.0)
        assert (u.spent, u.reserved) == (D("0.3"), D(0))
        # over the limit by settling: reported, never hidden
        r4 = await c.reserve("b", WINDOW, D("0.01"), D("0.3"), "r4", 60, 1004.0)
        assert not r4.ok and r4.remaining == 0 and r4.over == D("0.01")

        # the same window in another budget, and another window of the same budget, are separate
        assert (await c.usage("b2", WINDOW, 1004.0)).spent == 0
        assert (await c.usage("b", "month:2027-01@Europe/Berlin", 1004.0)).spent == 0

        # big and tiny amounts add exactly
        big = D("12345678901234567890123456789.123456789012345678901234567")
        await c.charge("big", WINDOW, big, 1005.0)
        u = await other.charge("big", WINDOW, D("0.000000000000000000000000001"), 1005.0)
        assert u.spent == D("12345678901234567890123456789.123456789012345678901234568")  # (57 digits: no rounding)
        for _ in range(10):
            u = await c.charge("tiny", WINDOW, D("0.1"), 1005.0)
        assert u.spent == D(1)

    drive(backend, body)


def test_expired_reservations_are_reclaimed(backend: Backend) -> None:
    """A reservation nobody settles stops counting at its expiry (injected clock), the next reserve
    reclaims it, and a late settle still books the actual spend once."""
    async def body(b: Backend) -> None:
        c, other = await b.clients(2)
        assert (await c.reserve("b", WINDOW, D("0.6"), D("1"), "hung-up", 30, 1000.0)).placed
        early = await other.reserve("b", WINDOW, D("0.5"), D("1"), "x1", 30, 1029.999)
        assert not early.ok and early.reserved == D("0.6")
        assert (await c.usage("b", WINDOW, 1029.999)).reserved == D("0.6")
        assert (await c.usage("b", WINDOW, 1030.0)).reserved == 0  # expired: reads ignore it
        later = await other.reserve("b", WINDOW, D("0.5"), D("1"), "x2", 30, 1030.0)
        assert later.ok and later.reserved == D("0.5")
        late = await c.settle("hung-up", D("0.55"), 1031.0)
        assert late is not None and (late.status, late.late, late.spent, late.reserved) == ("settled", True, D("0.55"),
                                                                                           D("0.5"))
        assert not await c.release("hung-up")

    drive(backend, body)


def test_records_past_their_grace_are_gone(backend: Backend) -> None:
    """After expiry + grace the record is purged (real time here: Redis expires keys by its own
    clock): a settle answers None, the caller charges instead, and sweeps leave nothing behind."""
    async def body(b: Backend) -> None:
        (c,) = await b.clients(1)
        c.grace_seconds = 0.2
        now = time.time()
        assert (await c.reserve("b", WINDOW, D("1"), D("5"), "gone", 0.2, now)).placed
        await asyncio.sleep(0.6)
        now = time.time()
        assert await c.settle("gone", D("1"), now) is None
        assert (await c.charge("b", WINDOW, D("1"), now)).spent == D("1")
        assert (await c.usage("b", WINDOW, now)).reserved == 0
        swept = await c.sweep(now)
        assert swept >= (0 if isinstance(c, RedisCounters) else 1)
        assert await c.sweep(now) == 0

    drive(backend, body)


def test_forced_reservations_and_reused_ids(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        (c,) = await b.clients(1)
        full = await c.reserve("b", WINDOW, D("1"), D("1"), "a", 60, 1000.0)
        assert full.ok and full.remaining == 0
        forced = await c.reserve("b", WINDOW, D("0.5"), D("1"), "held-for-approval", 60, 1000.0, force=True)
        assert (forced.ok, forced.placed, forced.reserved, forced.over) == (False, True, D("1.5"), D("0.5"))
        with pytest.raises(ValueError):
            await c.reserve("b", WINDOW, D("0"), D("10"), "a", 60, 1000.0)
        with pytest.raises(ValueError):
            await c.reserve("b", WINDOW, 0.1, D("10"), "float", 60, 1000.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await c.reserve("b", WINDOW, D("1"), D("10"), "ttl", 0, 1000.0)
        with pytest.raises(ValueError):
            await c.charge("b", WINDOW, D("-1"), 1000.0)
        assert (await c.usage("b", WINDOW, 1000.0)).reserved == D("1.5")

    drive(backend, body)


def test_sweeps_remove_idle_state(backend: Backend) -> None:
    async def body(b: Backend) -> None:
        (c,) = await b.clients(1)
        await c.hit("k", 1, 10, 1000.0)
        await c.charge("b", WINDOW, D("1"), 1000.0)
        await c.reserve("b", "w2", D("1"), D("5"), "r", 10, 1000.0)
        if isinstance(c, RedisCounters):
            assert await c.sweep(5000.0, idle_before=4000.0) == 0  # Redis: TTLs do it
            return
        assert await c.sweep(1005.0) == 0
        # rate state (TAT 1010), the reservation (purged at 1010 + grace) and the idle usage row(s)
        # (PostgreSQL also keeps the row a reservation locked)
        assert await c.sweep(1010.0 + c.grace_seconds, idle_before=1001.0) >= 3
        assert await c.sweep(1010.0 + c.grace_seconds, idle_before=1001.0) == 0
        assert (await c.usage("b", WINDOW, 1011.0)).spent == 0

    drive(backend, body)


def test_random_ledger_histories_match_the_reference(backend: Backend) -> None:
    """Random histories of reserves (some forced), settles (more, less, twice), releases, charges and
    reads, with the clock jumping past expiries and grace periods, give every backend the same
    answers as the in-memory reference, step by step."""
    import random

    from proxy.limits import memory_counters

    rng = random.Random(2026)

    async def body(b: Backend) -> None:
        (c,) = await b.clients(1)
        ref = memory_counters()
        c.grace_seconds = ref.grace_seconds = 50.0
        now, ids = 1000.0, [f"r{i}" for i in range(40)]
        used: set[str] = set()
        for step in range(400):
            now += rng.choice([0.0, 0.0, 0.5, 3.0, 20.0, 70.0])
            window = rng.choice([WINDOW, "day:2026-12-06@UTC"])
            op = rng.random()
            if op < 0.4:
                rid = f"{rng.choice(ids)}-{step}"
                used.add(rid)
                args = ("b", window, D(rng.choice(["0.1", "0.25", "1", "0.05"])), D(rng.choice(["1", "2.5"])),
                        rid, rng.choice([10, 30, 60]), now)
                force = rng.random() < 0.1
                got, want = await c.reserve(*args, force=force), await ref.reserve(*args, force=force)
            elif op < 0.65 and used:
                rid = rng.choice(sorted(used))
                actual = D(rng.choice(["0", "0.07", "0.3", "1.5"]))
                got, want = await c.settle(rid, actual, now), await ref.settle(rid, actual, now)
            elif op < 0.8 and used:
                rid = rng.choice(sorted(used))
                got, want = await c.release(rid), await ref.release(rid)
                if isinstance(c, RedisCounters) and got and not want:
                    # (Redis drops a record by its own clock, the others when a reserve purges the window;
                    # releasing one past its expiry changes no count either way, which later steps check)
                    got = want
            elif op < 0.9:
                got, want = await c.charge("b", window, D("0.01"), now), await ref.charge("b", window, D("0.01"), now)
            else:
                got, want = await c.usage("b", window, now), await ref.usage("b", window, now)
            assert got == want, (step, op, got, want)

    drive(backend, body)


# ---- across processes --------------------------------------------------------------------------
WORKER = r"""
import asyncio, json, sys, time
from decimal import Decimal
from proxy.limits import StoreCounters

async def main(spec, start, n, tag):
    if spec["kind"] == "sqlite":
        from proxy.store.sqlite import SQLiteStore
        store = SQLiteStore(spec["path"]); await store.open(); c = StoreCounters(store)
    elif spec["kind"] == "postgres":
        from proxy.store.postgres import PostgresStore
        store = PostgresStore(spec["dsn"], schema=spec["schema"]); await store.open(); c = StoreCounters(store)
    else:
        from proxy.limits.redis_backend import RedisCounters
        store = None; c = RedisCounters(spec["url"], prefix=spec["prefix"])
    while time.time() < start:
        await asyncio.sleep(0.002)
    hits = await asyncio.gather(*(c.hit("shared", 25, 3600, 1000.0) for _ in range(n)))
    res = await asyncio.gather(*(c.reserve("team", "month:2026-12@UTC", Decimal("0.1"), Decimal("2.5"),
                                           f"{tag}-{i}", 60, 1000.0) for i in range(n)))
    print(json.dumps([sum(h.allowed for h in hits), sum(r.placed for r in res)]), flush=True)
    await (store.close() if spec["kind"] != "redis" else c.close())

spec = json.loads(sys.argv[1])
asyncio.run(main(spec, float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
"""


@pytest.mark.parametrize("backend", [  # (not memory: it is per process by design)
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)),
    pytest.param("redis", marks=pytest.mark.skipif(SKIP_REDIS, reason=REDIS_SKIP)),
], indirect=True)
def test_exact_across_processes(backend: Backend) -> None:
    """Four processes, 20 hits and 20 reservations each, at once: exactly 25 hits pass and exactly
    25 reservations of 0.1 fit 2.5, whichever process made them."""
    import json

    spec = {"kind": backend.name, **backend.where}
    if backend.name == "sqlite":
        asyncio.run(_init_sqlite(backend.where["path"]))
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(spec), str(start), "20", f"p{i}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        counts.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(h for h, _ in counts) == 25
    assert sum(r for _, r in counts) == 25


async def _init_sqlite(path: str) -> None:
    s = SQLiteStore(path)  # (create the file and schema once, so the workers race on counters, not on setup)
    await s.open()
    await s.close()


# ---- unreachable backends -----------------------------------------------------------------------
class Forwarder:
    """A TCP forwarder on a free loopback port to a real server, that the test can cut."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = free_port()
        self.server: asyncio.base_events.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        self.writers.clear()
        await asyncio.sleep(0.05)


async def _all_unavailable(c: Any, now: float = 1000.0) -> None:
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: c.hit("k", 5, 60, now),
        lambda: c.reserve("b", WINDOW, D("1"), D("5"), f"r-{uuid.uuid4().hex}", 60, now),
        lambda: c.settle("r", D("1"), now),
        lambda: c.release("r"),
        lambda: c.charge("b", WINDOW, D("1"), now),
        lambda: c.usage("b", WINDOW, now),
    ]
    for call in calls:
        with pytest.raises(CounterUnavailable) as info:
            await call()
        assert info.value.backend == c.backend


def test_memory_store_down_is_counter_unavailable() -> None:
    async def body() -> None:
        store = MemoryCounterStore()
        c = StoreCounters(store)
        assert (await c.hit("k", 5, 60, 1000.0)).allowed
        store.fail = True
        await _all_unavailable(c)

    asyncio.run(body())


def test_sqlite_store_lost_is_counter_unavailable(tmp_path: Path) -> None:
    async def body() -> None:
        path = tmp_path / "proctor.db"
        store = SQLiteStore(str(path))
        await store.open()
        c = StoreCounters(store)
        try:
            assert (await c.hit("k", 5, 60, 1000.0)).allowed
            path.unlink()  # the store's file is gone: lost, every operation fails closed
            await _all_unavailable(c)
        finally:
            await store.close()

    asyncio.run(body())


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_postgres_unreachable_is_counter_unavailable() -> None:
    parts = urlsplit(PG_DSN or "")
    schema = "proctor_test_" + uuid.uuid4().hex[:16]

    async def body() -> None:
        fwd = Forwarder(parts.hostname or "127.0.0.1", parts.port or 5432)
        await fwd.start()
        dsn = parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{fwd.port}").geturl()
        store = PostgresStore(dsn, schema=schema, connect_timeout=2, command_timeout=5, min_size=1, max_size=2)
        await store.open()
        c = StoreCounters(store)
        try:
            assert (await c.hit("k", 5, 60, 1000.0)).allowed
            await fwd.cut()  # the server is unreachable from now on
            await _all_unavailable(c)
        finally:
            store._pool.terminate()  # type: ignore[union-attr]

    try:
        asyncio.run(body())
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def test_redis_on_an_unused_port_is_counter_unavailable() -> None:
    async def body() -> None:
        c = RedisCounters(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
        try:
            with pytest.raises(CounterUnavailable):
                await c.ping()
            await _all_unavailable(c)
        finally:
            await c.close()

    asyncio.run(body())


@pytest.mark.skipif(SKIP_REDIS, reason=REDIS_SKIP)
def test_redis_connection_lost_then_back() -> None:
    parts = urlsplit(REDIS_URL)
    prefix = f"proctor-test-{uuid.uuid4().hex[:12]}:"

    async def body() -> None:
        fwd = Forwarder(parts.hostname or "127.0.0.1", parts.port or 6379)
        await fwd.start()
        url = parts._replace(netloc=f"127.0.0.1:{fwd.port}").geturl()
        c = RedisCounters(url, prefix=prefix, timeout=1.0)
        try:
            assert (await c.hit("k", 2, 60, 1000.0)).allowed
            await fwd.cut()
            await _all_unavailable(c)
            fwd2 = Forwarder(parts.hostname or "127.0.0.1", parts.port or 6379)
            fwd2.port = fwd.port
            await fwd2.start()
            d = await c.hit("k", 2, 60, 1000.0)  # reconnects; the state survived in Redis
            assert d.allowed and d.remaining == 0
            await fwd2.cut()
        finally:
            await c.close()

    try:
        asyncio.run(body())
    finally:
        asyncio.run(_redis_cleanup(prefix))
