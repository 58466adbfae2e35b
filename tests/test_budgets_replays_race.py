"""A call decided as a free retry, whose duplicate-work entry is gone before the duplicate check
looks (its first request failed upstream and released the key and the reservation, or the entry
lapsed): it was authorized on context.budget saying it costs nothing (exceeded false,
estimated_cost 0), so no hold policy asked a person about it. It must not be forwarded on that
decision even if the released spend now makes it fit: refused (429, retry), and its retry is
decided afresh as the new call it is. (A race between the budget check and the duplicate check:
driven here step by step with the real stages; end to end: tests/test_budgets_replays*.py.)"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from proxy.core.exchange import ResponseSummary
from proxy.policy.stage import CONTEXT_EXTRA
from proxy.record.model import BUDGET_RECORD
from test_budgets_replays_unit import keyed, setup


@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_a_retry_whose_key_was_released_meanwhile_is_not_forwarded_on_the_free_decision(on_exceed: str) -> None:
    env, store = setup(on_exceed)
    check, reserve = env.chain.stages[0], env.chain.stages[1]
    assert env.call(keyed("40", key="other")).allowed  # 40 spent by another call
    first = keyed("60")  # the first call of key k-1: reserved 60, in flight
    asyncio.run(env.chain.request(first))
    assert first.allowed and env.spent() == (Decimal(40), Decimal(60))

    store.held = True  # its key is in progress: the retry is decided as free (409 expected from the store)
    retry = keyed("60")
    asyncio.run(check.on_request(retry))
    ctx = retry.stage_data[CONTEXT_EXTRA]["budget"]
    assert retry.refusal is None and ctx["exceeded"] is False  # (no person asked, no budget refusal)

    # the first call fails upstream: its key and its reservation are released
    first.response = ResponseSummary(502, upstream_status=502, body=None, headers={})
    asyncio.run(env.chain.response(first))
    store.held = False
    assert env.spent() == (Decimal(40), Decimal(0))

    # the duplicate check finds nothing; the reserve must not forward it on the free decision
    asyncio.run(reserve.on_request(retry))
    assert retry.refusal is not None and retry.refusal.status == 429, retry.refusal
    assert retry.refusal.headers.get("Retry-After") == "1"
    assert retry.stage_data[BUDGET_RECORD]["outcome"] == ("held" if on_exceed == "hold" else "exhausted")
    assert env.spent() == (Decimal(40), Decimal(0))  # nothing reserved for it

    # its retry is decided afresh: it now fits (40 + 60), so it is reserved and forwarded, charged
    again = env.call(keyed("60"))
    assert again.allowed and env.spent() == (Decimal(100), Decimal(0))


def test_a_free_retry_an_approval_released_reserves_its_real_estimate() -> None:
    """An approval (of another policy) released it: the duplicate check is skipped for it, a person
    saw it, so it is not refused as a vanished retry: it reserves its real estimate, atomically."""
    env, store = setup("hold")
    check, reserve = env.chain.stages[0], env.chain.stages[1]
    first = keyed("60")
    asyncio.run(env.chain.request(first))
    assert first.allowed and env.spent() == (Decimal(0), Decimal(60))
    store.held = True
    retry = keyed("60")
    asyncio.run(check.on_request(retry))
    assert retry.stage_data[CONTEXT_EXTRA]["budget"]["exceeded"] is False
    first.response = ResponseSummary(502, upstream_status=502, body=None, headers={})
    asyncio.run(env.chain.response(first))
    retry.approval_id = "apr-1"  # (what the approval stage sets when an approval releases it)
    asyncio.run(reserve.on_request(retry))
    assert retry.refusal is None and env.spent() == (Decimal(0), Decimal(60))
