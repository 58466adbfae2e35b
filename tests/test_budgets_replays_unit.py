"""The budget check asks the duplicate-work store about a write over a budget (docs/limits.md,
"Reserve, settle, release"), without processes: the store is asked only for a write that has
a key and is over a budget; a retry the store answers is free in context.budget; and should
the key be gone before the duplicate check looks again (released, lapsed), the reserve refuses
it (429: it was decided as free, so no hold policy saw its cost; its retry is decided afresh):
a retry never spends over a budget (tests/test_budgets_replays_race.py).
(End to end, on both gateway engines: tests/test_budgets_replays.py.)"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from proxy.core.chain import Chain
from proxy.core.exchange import Exchange
from proxy.limits.budget_stage import BudgetCheck, BudgetReserve
from proxy.policy.stage import CONTEXT_EXTRA
from proxy.record.model import BUDGET_RECORD
from test_budgets_unit import Env, _ex, budget


class Store:
    """What the duplicate-work store answers about a key (IdempotencyCheck.answers' part)."""

    def __init__(self) -> None:
        self.held = False
        self.asked = 0

    async def answers(self, ex: Exchange) -> bool:
        self.asked += 1
        return self.held


def setup(on_exceed: str) -> tuple[Env, Store]:
    env = Env(budget(on_exceed=on_exceed))
    store = Store()
    groups = lambda i: list(i.claims.get("groups", []))  # noqa: E731
    env.chain = Chain([BudgetCheck(env.table, env.ledger, groups, clock=env.clock, answered=store.answers),
                       BudgetReserve(env.ledger, None, clock=env.clock), env.later])
    return env, store


def keyed(net: str, key: str | None = "k-1") -> Exchange:
    ex = _ex(net)
    assert ex.request is not None
    if key is not None:
        ex.request.headers["idempotency-key"] = key
    return ex


def decide(env: Env, ex: Exchange) -> Exchange:
    asyncio.run(env.chain.request(ex))
    return ex


@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_the_store_is_asked_only_for_a_keyed_write_over_a_budget(on_exceed: str) -> None:
    env, store = setup(on_exceed)
    assert env.call(keyed("60")).allowed and store.asked == 0  # fits: nothing to ask
    assert env.spent() == (Decimal(60), Decimal(0))
    decide(env, keyed("60", key=None))  # over, but no key: nothing can answer it from an earlier call
    assert store.asked == 0
    ex = keyed("60")  # over, with a key the store does not hold: as before
    asyncio.run(env.chain.stages[0].on_request(ex))
    assert store.asked == 1 and ex.refusal is None
    assert ex.stage_data[CONTEXT_EXTRA]["budget"]["exceeded"] is True
    assert ex.stage_data[BUDGET_RECORD]["outcome"] == ("held" if on_exceed == "hold" else "exhausted")
    # (no policy holds it here, and no approval extends it: the reserve refuses it)
    ex = decide(env, keyed("60"))
    assert ex.refusal is not None and ex.refusal.status == 429
    assert env.spent() == (Decimal(60), Decimal(0))


@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_a_retry_the_store_answers_is_free_but_a_released_key_never_spends_over(on_exceed: str) -> None:
    env, store = setup(on_exceed)
    assert env.call(keyed("100")).allowed
    store.held = True
    ex = keyed("100")
    asyncio.run(env.chain.stages[0].on_request(ex))
    ctx = ex.stage_data[CONTEXT_EXTRA]["budget"]
    assert ctx["exceeded"] is False and ctx["estimated_cost"] == {"__extn": {"fn": "decimal", "arg": "0.0"}}
    assert ex.refusal is None and ex.stage_data[BUDGET_RECORD]["outcome"] == "reserved"
    assert ex.stage_data[BUDGET_RECORD]["estimate"] == "100"  # (what it would cost, if forwarded after all)
    # nothing answered it after all (the key was released meanwhile): the reserve refuses it
    ex = env.call(keyed("100"))
    assert ex.refusal is not None and ex.refusal.status == 429 and ex.refusal.kind == "budget-exhausted"
    assert env.spent() == (Decimal(100), Decimal(0))
    # a free call (nothing over) is not asked about
    asked = store.asked
    ex = env.call(keyed("0"))
    assert ex.allowed and store.asked == asked
