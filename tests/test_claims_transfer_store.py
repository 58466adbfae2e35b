"""Claim transfer in the store (both backends): one transaction ends the old tenure, starts
the new holder's with the fence bumped; concurrent transfers and acquirers see exactly one
holder. PostgreSQL runs when PROCTOR_TEST_POSTGRES_DSN is set (as tests/test_store.py does).
"""

from __future__ import annotations

import asyncio

from proxy.store import Store
from test_claims_store import CONN, RES, acquire
from test_store import MakeStore, make_store, run  # noqa: F401 - the fixture is used by name


def test_transfer_moves_the_claim_and_bumps_the_fence(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        a = (await acquire(s, "a", 1000.0, groups=["support"])).claim
        moved = await s.transfer_claim(a.id, to="b", groups=["tier2"], now=1010.0)
        assert moved is not None
        old, new = moved
        assert (old.id, old.holder) == (a.id, "a")
        assert (new.holder, new.holder_groups, new.since, new.expires_at, new.fence) == (
            "b", ["tier2"], 1010.0, 1060.0, 2)
        assert new.id != a.id
        assert [(c.holder, c.fence) for c in await s.claims_on(CONN, RES, 1011.0)] == [("b", 2)]
        # the old holder is now the one refused; the new one renews its tenure
        assert not (await acquire(s, "a", 1012.0)).acquired
        renewed = await acquire(s, "b", 1013.0)
        assert renewed.acquired and renewed.renewed and renewed.claim.id == new.id
        # the old id is gone; an explicit ttl sets the new expiry
        assert await s.transfer_claim(a.id, to="c", groups=[], now=1014.0) is None
        third = await s.transfer_claim(new.id, to="c", groups=[], now=1015.0, ttl=5.0)
        assert third is not None and (third[1].expires_at, third[1].fence) == (1020.0, 3)
        # to the holder itself: nothing changes (no new tenure)
        same = await s.transfer_claim(third[1].id, to="c", groups=[], now=1016.0)
        assert same is not None and same[0] == same[1] and same[1].fence == 3
        # an expired claim cannot be transferred
        assert await s.transfer_claim(third[1].id, to="d", groups=[], now=1021.0) is None

    run(make_store, body)


def test_concurrent_transfers_and_acquires_leave_one_holder(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        a = (await acquire(s, "a", 1000.0)).claim

        async def transfer(to: str) -> object:
            return await s.transfer_claim(a.id, to=to, groups=[], now=1001.0)

        results = await asyncio.gather(*(transfer(f"t{i}") for i in range(5)),
                                       *(acquire(s, f"x{i}", 1001.0) for i in range(5)))
        assert sum(1 for r in results[:5] if r is not None) == 1
        assert not any(r.acquired for r in results[5:])  # type: ignore[attr-defined]
        held = await s.claims_on(CONN, RES, 1002.0)
        assert len(held) == 1 and held[0].holder.startswith("t") and held[0].fence == 2

    run(make_store, body)


def test_expire_claims_returns_each_expired_claim_once(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        a = (await acquire(s, "a", 1000.0, ttl=5.0)).claim
        b = (await acquire(s, "b", 1000.0, ttl=50.0, resource='Incident::"INC2"')).claim
        first, second = await asyncio.gather(s.expire_claims(1010.0), s.expire_claims(1010.0))
        assert sorted(c.id for c in first + second) == [a.id]  # one caller gets it
        assert [c.id for c in await s.list_claims(1010.0)] == [b.id]

    run(make_store, body)
