"""Listing budget ledgers (`budget_windows`, docs/limits.md "Seeing budgets") on every backend,
against the real servers (memory, SQLite, PostgreSQL, Redis: the fixtures of
tests/test_limits_backends.py), and reading their keys back (proxy/limits/budget_keys.py).

Every key with spend or held (unexpired) reservations in the window, under the prefix, with
its usage and nothing else: not another budget sharing the name's first letters, not another
window, not a reservation released or expired; in key order, at most `limit`; written by one
client and listed by another; values with `:`, `%`, `*`, `[` and non-ASCII read back exactly,
and a key long enough to be shortened to a digest listed and shown as such.
"""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal as D

import pytest

from proxy.limits.budget_keys import is_hashed, listing_prefix, parse_budget_key, unescape
from proxy.limits.budget_table import budget_key
from proxy.limits.keys import limit_key
from proxy.limits.redis_backend import RedisCounters
from proxy.store.counters import MAX_KEY_LENGTH, BudgetUsage
from test_limits_backends import REDIS_SKIP, REDIS_URL, SKIP_REDIS, Backend, _redis_cleanup, backend, drive  # noqa: F401

WINDOW = "month:2026-12@Europe/Berlin"
OTHER_WINDOW = "month:2026-11@Europe/Berlin"
NOW = 1000.0
DIMS = ("agent", "field:customer")


def key(agent: str | None, customer: str | None = "c1", name: str = "po") -> str:
    return budget_key(name, DIMS, (agent, customer))


# ---- the key parser (pure) ---------------------------------------------------------------------
def test_keys_read_back_exactly() -> None:
    for agent, customer in [("bot", "c1"), ("a:b", "x%3Ay"), ("-", "="), ("ünï", None), (None, None),
                            ("*[?]\\", "tab\there"), ("", "")]:
        parsed = parse_budget_key(budget_key("po.monthly-1", DIMS, (agent, customer)))
        assert parsed is not None and not parsed.hashed
        assert parsed.name == "po.monthly-1" and parsed.values == {"agent": agent, "field:customer": customer}
    assert parse_budget_key(budget_key("shared", (), ())) == parse_budget_key("bg:shared")
    assert parse_budget_key("bg:shared").values == {}  # type: ignore[union-attr]
    for foreign in ["rl:x:agent:=a", "bg", "bg:po:agent", "bg:po:agent:value-without-equals", "nothing"]:
        assert parse_budget_key(foreign) is None, foreign
    assert unescape("a%3Ab%25c%09") == "a:b%c\t"


def test_a_shortened_key_shows_what_its_prefix_keeps() -> None:
    long = "x" * 600
    k = budget_key("po", ("agent", "field:note", "group"), ("bot", long, "ops"))
    assert len(k) == MAX_KEY_LENGTH and is_hashed(k)
    parsed = parse_budget_key(k)
    assert parsed is not None and parsed.hashed and parsed.name == "po"
    assert parsed.values == {"agent": "bot"}  # the note was cut, and the group after it
    assert not is_hashed(key("bot"))


def test_listing_prefixes_follow_the_leading_values() -> None:
    assert listing_prefix("po", DIMS, {}) == "bg:po:"
    assert listing_prefix("po", DIMS, {"agent": "a:b"}) == "bg:po:agent:=a%3Ab:"
    assert key("a:b").startswith(listing_prefix("po", DIMS, {"agent": "a:b"}))
    assert listing_prefix("po", DIMS, {"field:customer": "c1"}) == "bg:po:"  # not a leading dimension
    assert listing_prefix("po", ("agent", "group", "action"), {"agent": "x", "group": "g"}) == limit_key(
        "bg", "po", "agent", "=x", "group", "=g") + ":"
    assert listing_prefix("po", DIMS, {"agent": "y" * 500}) == "bg:po:"  # too long to narrow safely


# ---- every backend -----------------------------------------------------------------------------
def test_every_key_with_spend_or_reservations_in_the_window(backend: Backend) -> None:  # noqa: F811
    async def body(b: Backend) -> None:
        c, other = await b.clients(2)
        await c.charge(key("bot-a"), WINDOW, D("10.50"), NOW)
        await other.charge(key("bot-a"), WINDOW, D("0.25"), NOW)
        await c.charge(key("a:b"), WINDOW, D("0.1"), NOW)
        await c.charge(key("a:b"), WINDOW, D("0.2"), NOW)
        assert (await c.reserve(key("bot-b"), WINDOW, D("3"), D("100"), f"r1-{b.name}", 60, NOW)).placed  # held only
        assert (await c.reserve(key("bot-a"), WINDOW, D("1"), D("100"), f"r2-{b.name}", 60, NOW)).placed
        # not listed: released, expired, zero, another window, another budget whose name starts alike
        assert (await c.reserve(key("gone"), WINDOW, D("2"), D("100"), f"r3-{b.name}", 60, NOW)).placed
        assert await c.release(f"r3-{b.name}")
        assert (await c.reserve(key("lapsed"), WINDOW, D("2"), D("100"), f"r4-{b.name}", 5, NOW - 10)).placed
        await c.charge(key("zero"), WINDOW, D("0"), NOW)
        await c.charge(key("bot-a"), OTHER_WINDOW, D("99"), NOW)
        await c.charge(key("bot-a", name="po2"), WINDOW, D("7"), NOW)
        await c.charge(budget_key("po", ("agent",), ("bot-z",)), "day:2026-12-01@UTC", D("1"), NOW)

        listed = await other.budget_windows(WINDOW, "bg:po:", 100, NOW)
        assert listed == sorted([
            (key("a:b"), BudgetUsage(D("0.3"), D(0))),
            (key("bot-a"), BudgetUsage(D("10.75"), D("1"))),
            (key("bot-b"), BudgetUsage(D(0), D("3"))),
        ])
        assert await c.budget_windows(OTHER_WINDOW, "bg:po:", 100, NOW) == [(key("bot-a"), BudgetUsage(D("99"), D(0)))]
        assert [k for k, _ in await c.budget_windows(WINDOW, "bg:po2:", 100, NOW)] == [key("bot-a", name="po2")]
        assert [k for k, _ in await c.budget_windows(WINDOW, "", 100, NOW)] == sorted(
            [key("a:b"), key("bot-a"), key("bot-b"), key("bot-a", name="po2")])
        # narrowed to one agent by the prefix of its leading value
        narrowed = await c.budget_windows(WINDOW, listing_prefix("po", DIMS, {"agent": "a:b"}), 100, NOW)
        assert [k for k, _ in narrowed] == [key("a:b")]
        # at most `limit`: the first ones by key on the stores; Redis answers `limit` of them
        two = await c.budget_windows(WINDOW, "bg:po:", 2, NOW)
        assert len(two) == 2 and set(two) <= set(listed)
        if not isinstance(c, RedisCounters):
            assert two == listed[:2]
        assert await c.budget_windows("day:2026-12-02@UTC", "bg:po:", 100, NOW) == []
        # the reservation counts until it expires, then the key is gone unless it spent
        assert [k for k, _ in await c.budget_windows(WINDOW, "bg:po:", 100, NOW + 61)] == [key("a:b"), key("bot-a")]

    drive(backend, body)


def test_odd_values_and_shortened_keys_are_listed(backend: Backend) -> None:  # noqa: F811
    """Glob characters, percent signs and non-ASCII in values and names, and a key so long it was
    shortened to a digest: listed, and read back (the shortened one as far as its prefix goes)."""
    async def body(b: Backend) -> None:
        (c,) = await b.clients(1)
        odd = [key("*"), key("[a-z]?"), key("100%"), key("ünï\\"), key(None, None)]
        for i, k in enumerate(odd):
            await c.charge(k, WINDOW, D(i + 1), NOW)
        long = budget_key("po", DIMS, ("long-bot", "n" * 700))
        assert is_hashed(long)
        assert (await c.reserve(long, WINDOW, D("4.5"), D("10"), f"long-{b.name}", 60, NOW)).placed
        await c.charge(budget_key("p*", DIMS, ("x", "y")), WINDOW, D(1), NOW)  # a glob in another budget's name
        listed = dict(await c.budget_windows(WINDOW, "bg:po:", 100, NOW))
        assert set(listed) == {*odd, long}
        assert listed[long] == BudgetUsage(D(0), D("4.5"))
        assert [listed[k].spent for k in odd] == [D(1), D(2), D(3), D(4), D(5)]
        parsed = parse_budget_key(long)
        assert parsed is not None and parsed.hashed and parsed.values == {"agent": "long-bot"}
        assert parse_budget_key(key("[a-z]?")).values["agent"] == "[a-z]?"  # type: ignore[union-attr]
        star = await c.budget_windows(WINDOW, "bg:p*:", 100, NOW)
        assert [k for k, _ in star] == [budget_key("p*", DIMS, ("x", "y"))]

    drive(backend, body)


def test_bad_listing_arguments_are_value_errors(backend: Backend) -> None:  # noqa: F811
    async def body(b: Backend) -> None:
        (c,) = await b.clients(1)
        for window, prefix, limit in [("", "bg:", 10), (WINDOW, "bg:\n", 10), (WINDOW, "x" * 513, 10),
                                      (WINDOW, "bg:", 0), (WINDOW, "bg:", 10_001), (WINDOW, "bg:", True)]:
            with pytest.raises(ValueError):
                await c.budget_windows(window, prefix, limit, NOW)  # type: ignore[arg-type]

    drive(backend, body)


# ---- Redis in particular -----------------------------------------------------------------------
@pytest.mark.skipif(SKIP_REDIS, reason=REDIS_SKIP)
def test_redis_lists_keys_written_before_the_hash_named_them() -> None:
    """Usage hashes written before they carried their budget key and window (`k`, `w`) are listed
    from their Redis key's name; a shortened one without them cannot be attributed and is left out."""
    prefix = f"proctor-test-{uuid.uuid4().hex[:12]}:"

    async def main() -> None:
        c = RedisCounters(REDIS_URL, prefix=prefix)
        try:
            plain, long = key("old-bot"), budget_key("po", DIMS, ("old-long", "n" * 700))
            await c.charge(plain, WINDOW, D("2"), NOW)
            await c.charge(long, WINDOW, D("3"), NOW)
            for k in (plain, long):
                u = c._k("bu", k, WINDOW)
                assert await c.client.hmget(u, "k", "w") == [k.encode(), WINDOW.encode()]
                await c.client.hdel(u, "k", "w")
            assert await c.budget_windows(WINDOW, "bg:po:", 10, NOW) == [(plain, BudgetUsage(D("2"), D(0)))]
            # every key the listing touched keeps its TTL
            for name in [n async for n in c.client.scan_iter(match=prefix + "*")]:
                assert await c.client.pttl(name) > 0, name
        finally:
            await c.close()
            await _redis_cleanup(prefix)

    asyncio.run(main())
