"""The claim store (store/claims.py + both backends): acquire, renew, conflict, expiry,
fencing, release, and atomicity under concurrency (many connections / stores racing).

PostgreSQL runs when PROCTOR_TEST_POSTGRES_DSN is set (as tests/test_store.py does).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.store import Store
from proxy.store.claims import Claim, conflicting, decide
from test_store import MakeStore, make_store, run  # noqa: F401 - the fixture is used by name

CONN, RES = "ticketing", 'Incident::"INC1"'


async def acquire(s: Store, agent: str, now: float, mode: str = "exclusive", ttl: float = 60.0,
                  groups: list[str] | None = None, resource: str = RES) -> Any:
    return await s.acquire_claim(connector=CONN, resource=resource, agent=agent, groups=groups or [],
                                 mode=mode, ttl=ttl, now=now)


def test_acquire_renew_conflict_expire(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        first = await acquire(s, "a", 1000.0, groups=["support"])
        assert first.acquired and not first.renewed
        assert (first.claim.holder, first.claim.since, first.claim.expires_at, first.claim.fence) == ("a", 1000.0, 1060.0, 1)
        # another agent: refused, told who holds it until when
        other = await acquire(s, "b", 1010.0)
        assert not other.acquired
        assert (other.claim.holder, other.claim.expires_at, other.claim.holder_groups) == ("a", 1060.0, ["support"])
        # the holder renews: same tenure (id, since, fence), later expiry
        renewed = await acquire(s, "a", 1030.0)
        assert renewed.acquired and renewed.renewed
        assert (renewed.claim.id, renewed.claim.since, renewed.claim.expires_at, renewed.claim.fence) == (
            first.claim.id, 1000.0, 1090.0, 1)
        assert [c.holder for c in await s.claims_on(CONN, RES, 1089.0)] == ["a"]
        # expired claims are free: b takes over, the fence moves on
        assert await s.claims_on(CONN, RES, 1090.0) == []
        took = await acquire(s, "b", 1091.0)
        assert took.acquired and took.claim.fence == 2 and took.claim.id != first.claim.id
        assert [(c.holder, c.fence) for c in await s.list_claims(1091.0)] == [("b", 2)]
        # an operator releases it: gone, and the next holder is a new tenure
        released = await s.release_claim(took.claim.id)
        assert released is not None and released.holder == "b"
        assert await s.release_claim(took.claim.id) is None
        again = await acquire(s, "a", 1092.0)
        assert again.acquired and again.claim.fence == 3
        # sweeping deletes expired claims only; the fence carries on after it
        assert (await acquire(s, "b", 1092.0, resource='Incident::"INC9"', ttl=1.0)).acquired
        assert await s.sweep_claims(1093.5) == 1
        assert [c.holder for c in await s.list_claims(1093.5)] == ["a"]
        assert await s.sweep_claims(1093.5) == 0
        assert (await acquire(s, "c", 2000.0)).claim.fence == 4

    run(make_store, body)


def test_renew_in_one_statement(make_store: MakeStore) -> None:
    """The holder's fast renewal: same tenure, expiry never earlier, groups refreshed; None
    (the caller then takes the full path) for another agent, another mode, an expired,
    released or transferred claim."""
    async def body(s: Store) -> None:
        first = (await acquire(s, "a", 1000.0, groups=["support"])).claim
        r = await s.renew_claim(first.id, agent="a", groups=["support", "tier2"], mode="exclusive", ttl=60, now=1030.0)
        assert r is not None and (r.id, r.since, r.expires_at, r.fence, r.holder_groups) == (
            first.id, 1000.0, 1090.0, 1, ["support", "tier2"])
        # a shorter TTL never moves the expiry earlier
        r = await s.renew_claim(first.id, agent="a", groups=[], mode="exclusive", ttl=1, now=1031.0)
        assert r is not None and r.expires_at == 1090.0
        assert [c.expires_at for c in await s.claims_on(CONN, RES, 1031.0)] == [1090.0]
        for kw in ({"agent": "b", "mode": "exclusive", "now": 1032.0},   # not the holder
                   {"agent": "a", "mode": "shared", "now": 1032.0},      # another mode: the full path decides
                   {"agent": "a", "mode": "exclusive", "now": 1090.0}):  # expired: a new tenure is due
            assert await s.renew_claim(first.id, groups=[], ttl=60, **kw) is None
        moved = await s.transfer_claim(first.id, to="b", groups=[], now=1040.0)
        assert moved is not None
        assert await s.renew_claim(first.id, agent="a", groups=[], mode="exclusive", ttl=60, now=1041.0) is None
        assert [c.holder for c in await s.claims_on(CONN, RES, 1041.0)] == ["b"]

    run(make_store, body)


def test_shared_claims_coexist_but_exclude_exclusive(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        assert (await acquire(s, "a", 1000.0, mode="shared")).acquired
        assert (await acquire(s, "b", 1001.0, mode="shared")).acquired
        blocked = await acquire(s, "c", 1002.0, mode="exclusive")
        assert not blocked.acquired and blocked.claim.holder == "a"
        assert sorted(c.holder for c in await s.claims_on(CONN, RES, 1002.0)) == ["a", "b"]
        assert [c.holder for c in await s.list_claims(1002.0, connector="other")] == []

    run(make_store, body)


def test_claims_on_other_resources_are_independent(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        assert (await acquire(s, "a", 1000.0)).acquired
        assert (await acquire(s, "b", 1000.0, resource='Incident::"INC2"')).acquired
        assert len(await s.list_claims(1000.5)) == 2

    run(make_store, body)


def test_racing_stores_exactly_one_holder(make_store: MakeStore) -> None:
    """Eight separately opened stores (eight connections / pools) race for one resource:
    exactly one acquires, and every other is told that holder."""

    async def main() -> None:
        stores = [make_store() for _ in range(8)]
        for st in stores:
            await st.open()
        try:
            outcomes = await asyncio.gather(*(acquire(st, f"agent-{i}", 1000.0) for i, st in enumerate(stores)))
            winners = [o for o in outcomes if o.acquired]
            assert len(winners) == 1
            holder = winners[0].claim.holder
            assert all(o.claim.holder == holder for o in outcomes)
            assert [c.holder for c in await stores[0].claims_on(CONN, RES, 1000.5)] == [holder]
            assert winners[0].claim.fence == 1
        finally:
            for st in stores:
                await st.close()

    asyncio.run(main())


def test_decide_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="claim mode"):
        decide([], 0, connector=CONN, resource=RES, agent="a", groups=[], mode="both", ttl=1, now=0)


def test_conflicting_prefers_exclusive_and_ignores_expired_and_own() -> None:
    def c(holder: str, mode: str, since: float, exp: float) -> Claim:
        return Claim(f"clm_{holder}", CONN, RES, holder, [], mode, since, exp, 1)

    claims = [c("a", "shared", 1, 100), c("b", "exclusive", 2, 100), c("x", "exclusive", 0, 5), c("me", "exclusive", 0, 100)]
    assert conflicting(claims, "me", "shared", 10) == claims[1]
    assert conflicting([claims[0]], "me", "shared", 10) is None
    assert conflicting([claims[0]], "me", "exclusive", 10) == claims[0]
    assert conflicting([claims[2], claims[3]], "me", "exclusive", 10) is None
