"""GCRA maths (proxy/limits/rate.py) with an injected clock, the IETF RateLimit fields
(proxy/limits/headers.py), counter keys (proxy/limits/keys.py) and the ledger's result arithmetic."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from proxy.limits import Gcra, RateDecision, decide, limit_key, ratelimit, ratelimit_policy, retry_after
from proxy.limits.headers import policy_item, service_item, sf_string
from proxy.limits.ledger import reserve_result
from proxy.limits.rate import now_ms
from proxy.store.counters import MAX_KEY_LENGTH, RateState, ReserveOutcome, check_amount, check_key


def run(g: Gcra, steps: list[tuple[float, int]]) -> list[RateDecision]:
    state: RateState | None = None
    out = []
    for now, cost in steps:
        new, d = g.decide(state, now, cost)
        if new is not None:
            state = new
        out.append(d)
    return out


def test_a_full_bucket_admits_exactly_the_burst_then_one_per_interval() -> None:
    g = Gcra.of(10, 60)  # T = 6 s, burst 10
    ds = run(g, [(1000.0, 1)] * 11)
    assert [d.allowed for d in ds] == [True] * 10 + [False]
    assert [d.remaining for d in ds] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    assert [d.reset_after for d in ds[:3]] == [6.0, 12.0, 18.0]
    assert ds[9].reset_after == 60.0 and ds[9].refill_after == 6.0 and ds[9].retry_after == 0.0
    assert ds[10].retry_after == 6.0 and ds[10].reset_after == 60.0  # refused: nothing changed
    assert (ds[0].limit, ds[0].period_seconds, ds[0].burst) == (10, 60.0, 10)


def test_retry_after_is_exact_to_the_millisecond() -> None:
    g = Gcra.of(3, 1)  # T = 333.33... ms
    state: RateState | None = None
    for _ in range(3):
        state, d = g.decide(state, 50.0)
        assert d.allowed
    _, refused = g.decide(state, 50.0)
    assert not refused.allowed and refused.retry_after == 0.334  # 333.33 ms rounded up
    assert not g.decide(state, 50.333)[1].allowed  # a millisecond early: still refused
    new, ok = g.decide(state, 50.0 + refused.retry_after)  # exactly when told: admitted
    assert ok.allowed and new is not None


def test_sustained_rate_is_exact_over_many_intervals() -> None:
    """7 per minute, a client that always retries when told: 7 at once, then the k-th more at
    exactly ceil(k * 60000 / 7) ms; 77 in the first 600 s (the 70th extra exactly at 600 s). Float
    TATs drift off these instants; scaled integers do not."""
    g = Gcra.of(7, 60)
    state: RateState | None = None
    now, admitted = 0.0, []
    while now <= 600.0:
        new, d = g.decide(state, now)
        if d.allowed:
            state = new
            admitted.append(now_ms(now))
        else:
            now = round(now + d.retry_after, 3)
    assert len(admitted) == 77
    assert admitted[7:] == [-(-k * 60000 // 7) for k in range(1, 71)]
    assert admitted[-1] == 600000


def test_burst_smaller_than_the_limit() -> None:
    g = Gcra.of(10, 60, burst=3)
    ds = run(g, [(0.0, 1)] * 4 + [(6.0, 1), (6.0, 1)])
    assert [d.allowed for d in ds] == [True, True, True, False, True, False]
    assert [d.remaining for d in ds] == [2, 1, 0, 0, 0, 0]
    assert ds[3].retry_after == 6.0 and ds[2].reset_after == 18.0
    assert ratelimit_policy([("agents", ds[0])]) == '"agents";q=10;w=60;proctor-burst=3'


def test_costs_and_asking_without_spending() -> None:
    g = Gcra.of(10, 10)  # T = 1 s
    state, d = g.decide(None, 0.0, cost=8)
    assert d.allowed and d.remaining == 2
    peek_state, peek = g.decide(state, 0.5, cost=0)
    assert peek_state is None and peek.allowed and peek.remaining == 2  # nothing spent
    same, refused = g.decide(state, 0.5, cost=3)
    assert same is None and not refused.allowed and refused.retry_after == 0.5 and refused.remaining == 2
    never, impossible = g.decide(state, 0.5, cost=11)  # more than the burst: never
    assert never is None and not impossible.allowed and math.isinf(impossible.retry_after)
    assert retry_after([impossible]) is None


def test_an_old_state_is_the_same_as_none() -> None:
    g = Gcra.of(5, 5)
    state, _ = g.decide(None, 100.0, cost=5)
    assert state is not None and state.expires_at == 105.0
    assert g.decide(state, 105.0)[1] == g.decide(None, 105.0)[1]


def test_a_state_written_under_another_limit_is_rescaled() -> None:
    state, _ = Gcra.of(3, 1).decide(None, 10.0)  # TAT 10.333.. s, stored in thirds of a ms
    assert state is not None and state.den == 3
    new, d = Gcra.of(4, 1).decide(state, 10.0)  # now in quarters of a ms
    assert d.allowed and new is not None and new.den == 4
    assert (new.tat_ms, new.frac) == (10583, 1)  # 10333 + 1/3 (floored to 1/4) + 250 ms


def test_pure_decide_function() -> None:
    new, d = decide(None, 1.0, limit=2, period_seconds=2)
    assert d.allowed and d.remaining == 1 and new == RateState(2000, 0, 2)


@pytest.mark.parametrize("kw", [
    dict(limit=0, period_seconds=1), dict(limit=1.5, period_seconds=1), dict(limit=True, period_seconds=1),
    dict(limit=10**8, period_seconds=1), dict(limit=1, period_seconds=0), dict(limit=1, period_seconds=-1),
    dict(limit=1, period_seconds=0.0005), dict(limit=1, period_seconds=float("nan")),
    dict(limit=1, period_seconds=1, burst=0), dict(limit=10**7, period_seconds=86400 * 365),
])
def test_bad_rates_are_value_errors(kw: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        Gcra.of(**kw)


@pytest.mark.parametrize("now,cost", [(float("nan"), 1), (-1.0, 1), (1.0, -1), (1.0, 1.5), (1.0, True)])
def test_bad_hits_are_value_errors(now: float, cost: int) -> None:
    with pytest.raises(ValueError):
        Gcra.of(1, 1).decide(None, now, cost)


# ---- IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-11) ----------------------
def test_header_fields_follow_the_draft_syntax() -> None:
    g = Gcra.of(100, 60)  # T = 0.6 s
    state: RateState | None = None
    for _ in range(58):
        state, d = g.decide(state, 0.0)
    assert ratelimit_policy([("per-agent", d)]) == '"per-agent";q=100;w=60'
    assert ratelimit([("per-agent", d)]) == '"per-agent";r=42;t=1'  # next unit back in 0.6 s
    full = g.decide(None, 0.0, cost=0)[1]
    assert ratelimit([("per-agent", full)]) == '"per-agent";r=100'  # full: no effective window
    two = [("minute", d), ("hour", Gcra.of(1000, 3600).decide(None, 0.0)[1])]
    assert ratelimit_policy(two) == '"minute";q=100;w=60, "hour";q=1000;w=3600'
    assert ratelimit(two) == '"minute";r=42;t=1, "hour";r=999;t=4'


def test_header_items_escape_and_refuse() -> None:
    assert sf_string('a "b" \\c') == '"a \\"b\\" \\\\c"'
    assert policy_item("p", 5, 0.5, unit="content-bytes", partition=b"\x00\xff") == \
        '"p";q=5;qu="content-bytes";w=1;pk=:AP8=:'
    assert service_item("p", 0, 2.001) == '"p";r=0;t=3'
    for bad in ("naïve", "line\nbreak", "", "x" * 65):
        with pytest.raises(ValueError):
            policy_item(bad, 1, 1)
    with pytest.raises(ValueError):
        ratelimit([])


def test_retry_after_covers_every_refused_limit() -> None:
    g = Gcra.of(2, 10)  # T = 5 s
    s1, _ = g.decide(None, 0.0, cost=2)
    refused = g.decide(s1, 0.0)[1]
    slow = Gcra.of(1, 3600).decide(Gcra.of(1, 3600).decide(None, 0.0)[0], 0.0)[1]
    ok = Gcra.of(5, 1).decide(None, 0.0)[1]
    assert retry_after([ok]) is None
    assert retry_after([refused, ok]) == 5
    assert retry_after([refused, slow]) == 3600
    quick = Gcra.of(1000, 1).decide(Gcra.of(1000, 1).decide(None, 0.0, cost=1000)[0], 0.0)[1]
    assert quick.retry_after == 0.001 and retry_after([quick]) == 1  # never 0


# ---- keys -------------------------------------------------------------------------------
def test_keys_are_unambiguous_and_safe() -> None:
    assert limit_key("agent", "a:b") != limit_key("agent", "a", "b")
    assert limit_key("a%3Ab") != limit_key("a:b")
    k = limit_key("agent", "x\ny\x00z\x7f")
    assert check_key("key", k) == k and "\n" not in k
    long1, long2 = limit_key("a" * 600), limit_key("a" * 599 + "b")
    assert len(long1) <= MAX_KEY_LENGTH and long1 != long2 and check_key("key", long1)
    assert limit_key("") == "%"
    with pytest.raises(ValueError):
        limit_key()
    for bad in ("", "a\nb", "x" * 513, 5):
        with pytest.raises(ValueError):
            check_key("key", bad)  # type: ignore[arg-type]


# ---- ledger arithmetic ----------------------------------------------------------------------
def test_reserve_result_arithmetic() -> None:
    D = Decimal
    r = reserve_result(ReserveOutcome(fits=False, placed=False, spent=D("0.7"), reserved=D("0.2")), D("0.2"), D("1"))
    assert (r.ok, r.placed, r.remaining, r.over) == (False, False, D("0.1"), D("0.1"))
    forced = reserve_result(ReserveOutcome(fits=False, placed=True, spent=D("0.7"), reserved=D("0.4")), D("0.2"),
                            D("1"))
    assert (forced.remaining, forced.over, forced.reserved) == (D(0), D("0.1"), D("0.4"))
    exact = reserve_result(ReserveOutcome(fits=True, placed=True, spent=D("0.1"), reserved=D("0.2")), D("0.2"),
                           D("0.3"))
    assert exact.ok and exact.remaining == 0 and exact.over == 0


@pytest.mark.parametrize("bad", [0.1, Decimal("NaN"), Decimal("-1"), Decimal("Infinity"), Decimal("1E+70"),
                                 Decimal("1E-70"), "1", True])
def test_amounts_must_be_exact_finite_non_negative(bad: object) -> None:
    with pytest.raises(ValueError):
        check_amount("amount", bad)  # type: ignore[arg-type]
