"""The Redis counter backend in particular (proxy/limits/redis_backend.py), on the real server:
scripts re-sent when the server does not know them, every key under the prefix and with a TTL,
the Lua decimal arithmetic equal to Python's Decimal, and GCRA exact up to its range bound.

Runs against PROCTOR_TEST_REDIS_URL (CI sets it; then an unreachable Redis fails), else
redis://127.0.0.1:6379/0, skipped only when nothing answers there.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal as D
from typing import Any

import pytest

from proxy.limits import Gcra
from proxy.limits.rate import MAX_SCALED, now_ms
from proxy.limits.redis_backend import GCRA_LUA, RedisCounters, _Script
from proxy.store.counters import EXACT
from test_limits_backends import REDIS_SKIP, REDIS_URL, SKIP_REDIS, _redis_cleanup

pytestmark = pytest.mark.skipif(SKIP_REDIS, reason=REDIS_SKIP)
WINDOW = "day:2026-12-06@UTC"


def with_redis(body: Callable[[RedisCounters, str], Awaitable[Any]], **kw: Any) -> Any:
    prefix = f"proctor-test-{uuid.uuid4().hex[:12]}:"

    async def main() -> Any:
        c = RedisCounters(REDIS_URL, prefix=prefix, **kw)
        try:
            return await body(c, prefix)
        finally:
            await c.close()
            await _redis_cleanup(prefix)

    return asyncio.run(main())


def test_a_script_the_server_does_not_know_is_sent_whole() -> None:
    """EVALSHA answers NOSCRIPT (restart, flush, failover): the client sends it with EVAL, which
    caches it; the decision is the same. (A fresh variant of the script stands for a flushed cache,
    so the shared server's script cache is left alone.)"""
    async def body(c: RedisCounters, prefix: str) -> None:
        fresh = _Script(GCRA_LUA + f"\n-- {uuid.uuid4().hex}\n")
        assert (await c.client.script_exists(fresh.sha)) == [False]
        g = Gcra.of(2, 10)
        reply = await c._run("test", fresh, [prefix + "rl:x"], [now_ms(1000.0), 1, g.limit, g.period_ms, g.burst])
        assert [int(x) for x in reply] == [1, 10000, 0]  # TAT - now in 1/limit ms: one interval
        assert (await c.client.script_exists(fresh.sha)) == [True]
        reply = await c._run("test", fresh, [prefix + "rl:x"], [now_ms(1000.0), 1, g.limit, g.period_ms, g.burst])
        assert [int(x) for x in reply] == [1, 20000, 0]

    with_redis(body)


def test_every_key_is_under_the_prefix_and_expires() -> None:
    async def body(c: RedisCounters, prefix: str) -> None:
        await c.hit("agent:a%b:ü", 10, 60, 1000.0, cost=3)  # TAT = now + 18 s
        await c.reserve("team", WINDOW, D("1"), D("5"), "r1", 60, 1000.0)
        await c.reserve("team", WINDOW, D("1"), D("5"), "r2", 30, 1000.0)
        await c.settle("r1", D("0.5"), 1001.0)
        await c.charge("other", WINDOW, D("2"), 1001.0)
        keys = sorted([k.decode() async for k in c.client.scan_iter(match=prefix + "*", count=1000)])
        window = WINDOW.replace(":", "%3A")
        assert keys == sorted(prefix + k for k in [
            "rl:agent%3Aa%25b%3Aü", f"bu:team:{window}", f"br:team:{window}", f"bz:team:{window}", "rs:r1", "rs:r2",
            f"bu:other:{window}"])
        ttl = {k[len(prefix):]: await c.client.pttl(k) for k in keys}
        assert all(t > 0 for t in ttl.values())  # nothing lives forever
        assert 17_000 < ttl["rl:agent%3Aa%25b%3Aü"] <= 18_001  # until the TAT
        assert 55_000 + 300_000 < ttl["rs:r1"] <= 60_000 + 300_000  # expiry + grace
        assert 25_000 + 300_000 < ttl["rs:r2"] <= 30_000 + 300_000
        assert ttl[f"br:team:{window}"] >= ttl["rs:r1"] - 1_000  # as long as its longest reservation
        assert ttl[f"bz:team:{window}"] >= ttl["rs:r1"] - 1_000
        assert ttl[f"bu:team:{window}"] > 399 * 86400 * 1000  # spent: kept for the retention

    with_redis(body)


def test_prefixes_are_separate_counters() -> None:
    async def body(c: RedisCounters, prefix: str) -> None:
        other = RedisCounters(REDIS_URL, prefix=prefix + "other:")
        try:
            assert (await c.hit("k", 1, 60, 1000.0)).allowed
            assert not (await c.hit("k", 1, 60, 1000.0)).allowed
            assert (await other.hit("k", 1, 60, 1000.0)).allowed
        finally:
            await other.close()
        with pytest.raises(ValueError):
            RedisCounters(REDIS_URL, prefix="with space:")

    with_redis(body)


def random_amount(rng: random.Random) -> D:
    whole = rng.choice([0, rng.randint(0, 9), rng.randint(0, 10**6), rng.randint(0, 10**25)])
    scale = rng.choice([0, 1, 2, 6, 9, 18, 30])
    frac = rng.randint(0, 10**scale - 1) if scale else 0
    text = f"{whole}.{frac:0{scale}d}" if scale else str(whole)
    if rng.random() < 0.2:
        text += "000" if "." in text else ".000"  # trailing zeros: the same amount
    return D(text)


def test_lua_decimal_arithmetic_equals_python() -> None:
    """Hundreds of random amounts (0 to 26 digits before the point, up to 30 after, trailing zeros):
    Redis' sums equal Decimal sums exactly, and a reservation that fills the limit to the last digit
    fits while one more unit in the last place does not."""
    rng = random.Random(14)

    async def body(c: RedisCounters, prefix: str) -> None:
        for budget in range(20):
            amounts = [random_amount(rng) for _ in range(rng.randint(1, 25))]
            total = D(0)
            for a in amounts:
                total = EXACT.add(total, a)
                got = await c.charge(f"b{budget}", WINDOW, a, 1000.0)
                assert got.spent == total, (amounts, got.spent, total)
            amount = random_amount(rng)
            limit = EXACT.add(total, amount)
            ulp = D(1).scaleb(min(limit.as_tuple().exponent, amount.as_tuple().exponent, 0) - 1)  # type: ignore[arg-type]
            tight = EXACT.subtract(limit, ulp)
            no = await c.reserve(f"b{budget}", WINDOW, amount, tight, f"n{budget}", 60, 1000.0)
            yes = await c.reserve(f"b{budget}", WINDOW, amount, limit, f"y{budget}", 60, 1000.0)
            assert not no.ok and no.over == ulp
            assert yes.ok and yes.remaining == 0 and yes.reserved == amount

    with_redis(body)


def test_gcra_is_exact_up_to_its_range_bound() -> None:
    """Near the 2**53 bound of Lua's doubles (a million per 100 days, costs included) the script's
    integers still equal the pure function's, rescaling a state written under another limit too."""
    period = 100 * 86400
    g = Gcra.of(1_000_000, period)
    assert (g.burst + 40_000) * g.period_ms <= MAX_SCALED < (g.burst + 60_000) * g.period_ms
    steps = [(1000.0, 40_000)] * 24 + [(1000.0, 39_999), (1000.0, 1), (1000.0, 1), (1000.001, 1), (1000.0087, 1),
                                        (1863.9, 7), (2000.5, 40_000), (9_000_000.0, 3)]

    async def body(c: RedisCounters, prefix: str) -> None:
        state = None
        for now, cost in steps:
            got = await c.hit("big", 1_000_000, period, now, cost=cost)
            new, want = g.decide(state, now, cost)
            state = new or state
            assert got == want, (now, cost)
        g2 = Gcra.of(999_983, period)  # a prime denominator: the stored fraction is rescaled
        new2, want2 = g2.decide(state, 9_000_000.0, 1)
        assert await c.hit("big", 999_983, period, 9_000_000.0) == want2
        with pytest.raises(ValueError):
            await c.hit("big", 1_000_000, period, 9_000_000.0, cost=60_000)

    with_redis(body)
