"""Budgets without processes (docs/limits.md, "Budgets"): declarations and their errors, the
budget table, the generated schema's context.budget, and the budget stages on hand-made
exchanges with an in-memory ledger and an injected clock: reserve at decision, settle on the
answer (with the answer's cost), release on failure and on a later refusal, exact rollover
at a calendar boundary in a time zone, lapsed reservations."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import cedarpy
import pytest
from pydantic import ValidationError

from proxy.connectors.manifest import ConnectorManifest
from proxy.connectors.schema_gen import declared_in, generate_schema
from proxy.core.chain import Chain, Stage
from proxy.core.exchange import Exchange, ResponseSummary
from proxy.core.model import AgentIdentity, AgentRequest, Classification, Refusal
from proxy.limits.budget_spec import BudgetSpec, CostSpec, LlmPrices
from proxy.limits.budget_stage import CHECKS, BudgetCheck, BudgetReserve, budget_context
from proxy.limits.budget_table import BudgetConfigError, budget_actions, budget_key, build_budget_table
from proxy.limits.memory import MemoryCounterStore
from proxy.limits.store_backend import StoreCounters
from proxy.limits.windows import window_for
from proxy.policy.stage import CONTEXT_EXTRA
from proxy.record.model import BUDGET_RECORD

MANIFEST = {
    "name": "erp", "hosts": ["erp.example.com"],
    "routes": [
        {"method": "POST", "path": "/orders", "action": "erp.order.create", "resource": {"type": "Order", "id": "new"},
         "body": {"net": {"path": "net_amount", "type": "decimal"}, "vendor": {"path": "vendor", "type": "string"}},
         "cost": {"field": "net"}},
        {"method": "POST", "path": "/quotes", "action": "erp.quote.create", "resource": {"type": "Order", "id": "new"},
         "cost": {"response": "billing.cost", "estimate": "3", "scale": "0.01"}},
        {"method": "GET", "path": "/orders/{id}", "action": "erp.order.read", "resource": {"type": "Order", "id": "{id}"}},
    ],
}
BERLIN = ZoneInfo("Europe/Berlin")
ROOT = Path(__file__).resolve().parent.parent


def manifest() -> ConnectorManifest:
    return ConnectorManifest.model_validate(json.loads(json.dumps(MANIFEST)))


def budget(**kw: Any) -> BudgetSpec:
    base: dict[str, Any] = {"name": "po", "limit": "100", "period": "month", "timezone": "Europe/Berlin",
                            "match": {"connectors": ["erp"], "actions": ["erp.order.create"]}}
    base.update(kw)
    return BudgetSpec.model_validate(base)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=BERLIN).timestamp()


def _ex(net: str | None = "10", action: str = "erp.order.create", route: str = "POST /orders",
        agent: str = "buyer") -> Exchange:
    req = AgentRequest(method="POST", scheme="http", host="erp.example.com", port=80, path=route.split()[1], query="",
                       headers={}, body=b"", client_ip="127.0.0.1", mode="forward")
    ex = Exchange(req)
    ex.identity = AgentIdentity(agent, "https://idp", {"groups": ["buyers"]}, None)
    fields = {} if net is None else {"net": {"__extn": {"fn": "decimal", "arg": net}}}
    ex.classification = Classification("erp", action, "Order", "new", route=route, fields=fields)
    return ex


class Later(Stage):
    """A stage after the reservation that refuses (as the audit gate or a claim conflict would)."""

    name = "later"

    def __init__(self) -> None:
        self.refuse = False

    async def on_request(self, ex: Exchange) -> None:
        if self.refuse:
            ex.refuse(Refusal(503, "Audit unavailable", "the audit trail cannot record", kind="fail-closed"))


class Env:
    def __init__(self, *budgets: BudgetSpec, t: float = 0.0, prices: LlmPrices | None = None) -> None:
        self.clock = Clock(t or at(2026, 1, 15, 12, 0, 0))
        self.store = MemoryCounterStore()
        self.ledger = StoreCounters(self.store)
        self.table = build_budget_table(list(budgets), [manifest()], llm_prices=prices)
        self.later = Later()
        groups = lambda i: list(i.claims.get("groups", []))  # noqa: E731
        self.chain = Chain([BudgetCheck(self.table, self.ledger, groups, clock=self.clock),
                            BudgetReserve(self.ledger, prices, clock=self.clock), self.later])

    def call(self, ex: Exchange, status: int | None = 200, body: bytes | None = None) -> Exchange:
        async def go() -> None:
            await self.chain.request(ex)
            if ex.allowed:
                ex.response = ResponseSummary(status, upstream_status=status, body=body,
                                              headers={"content-type": "application/json"})
            await self.chain.response(ex)
        asyncio.run(go())
        return ex

    def spent(self, name: str = "po", agent: str = "buyer", t: float | None = None) -> tuple[Decimal, Decimal]:
        b = self.table.get(name)
        assert b is not None
        w = window_for(t or self.clock.t, b.period, b.timezone)
        u = asyncio.run(self.ledger.usage(budget_key(name, b.key, (agent,)), w.id, t or self.clock.t))
        return u.spent, u.reserved


# ------------------------------------------------------------------ declarations
@pytest.mark.parametrize("kw, message", [
    ({"limit": 0.5}, "floats are not exact"),
    ({"limit": "0"}, "more than 0"),
    ({"limit": "-3"}, "more than 0"),
    ({"limit": "1e20"}, "at most"),
    ({"limit": "NaN"}, "more than 0"),
    ({"limit": "0.0000000000001"}, "digits after the point"),
    ({"period": "fortnight"}, "calendar window"),
    ({"timezone": "Mars/Olympus"}, "Mars/Olympus"),
    ({"soft_threshold": 1}, "between 0 and 1"),
    ({"soft_threshold": 0}, "more than 0"),
    ({"on_exceed": "warn"}, "on_exceed"),
    ({"key": ["tenant"]}, "unknown key dimension"),
    ({"name": "a b"}, "budget name"),
    ({"cost": {}}, "exactly one"),
    ({"cost": {"static": "1", "llm": True}}, "exactly one"),
    ({"cost": {"response": "usage.cost"}}, "needs an estimate"),
    ({"cost": {"static": "1", "estimate": "2"}}, "estimate is for"),
    ({"cost": {"response": "a..b", "estimate": "1"}}, "dot path"),
    ({"cost": {"static": 0.1}}, "floats are not exact"),
    ({"reservation_ttl_seconds": 1}, "reservation_ttl_seconds"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_declarations(kw: dict, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        budget(**kw)
    assert message in str(e.value)


def test_table_checks_every_budget_against_the_connectors() -> None:
    with pytest.raises(BudgetConfigError) as e:
        build_budget_table([
            budget(name="a", match={"connectors": ["crm"]}),
            budget(name="b", match={"actions": ["erp.nope"]}),
            budget(name="c", match={"connectors": ["erp"]}, cost={"field": "net"}),  # GET /orders/{id} has no net
            budget(name="d", match={"connectors": ["erp"]}, cost={"llm": True}),
            budget(name="e", key=["field:missing"]),
        ], [manifest()])
    text = str(e.value)
    assert "'crm'" in text and "'erp.nope'" in text and "does not declare" in text
    assert "llm_prices" in text and "field:missing" in text
    # route costs: every route of the match that declares none counts calls
    t = build_budget_table([budget(match={"connectors": ["erp"]})], [manifest()])
    costs = {c.budget.name + " " + r: c.cost.kind for r in ("POST /orders", "POST /quotes", "GET /orders/{id}")
             for c in t.for_request("erp", r, "erp.order.create" if r == "POST /orders" else "x", "POST")}
    assert costs["po POST /orders"] == "field"


def test_manifest_cost_must_read_declared_values() -> None:
    m = json.loads(json.dumps(MANIFEST))
    m["routes"][0]["cost"] = {"field": "gross"}
    with pytest.raises(ValidationError) as e:
        ConnectorManifest.model_validate(m)
    assert "gross" in str(e.value)


def test_generated_schema_declares_context_budget_and_cedar_validates_policies_over_it() -> None:
    actions = budget_actions([budget()], [manifest()])
    assert actions == {"erp.order.create": True}
    base = (ROOT / "proxy" / "defaults" / "policies" / "schema.cedarschema").read_text()
    text = base + "\n" + generate_schema([manifest()], declared_in(base), budget_actions=actions)
    assert "budget: { name: String" in text
    cedarpy.Schema.from_str(text)  # valid Cedar
    policy = ('forbid (principal, action == Action::"erp.order.create", resource) when { context has budget && '
              'context.budget.estimated_cost.greaterThan(context.budget.remaining) && context.budget.used_percent > 90 };')
    res = cedarpy.validate_policies(policy, text)
    assert res.validation_passed, res.errors


# ------------------------------------------------------------------ the stages
def test_reserve_settle_and_context() -> None:
    env = Env(budget(soft_threshold="0.5"))
    ex = env.call(_ex("40"))
    assert ex.allowed
    ctx = ex.stage_data[CONTEXT_EXTRA]["budget"]
    assert ctx["estimated_cost"] == {"__extn": {"fn": "decimal", "arg": "40.0"}}
    assert ctx["remaining"] == {"__extn": {"fn": "decimal", "arg": "100.0"}} and ctx["exceeded"] is False
    assert ex.stage_data[BUDGET_RECORD]["result"] == "settled"
    assert env.spent() == (Decimal(40), Decimal(0))
    ex2 = env.call(_ex("60"))
    assert ex2.allowed and env.spent() == (Decimal(100), Decimal(0))
    ex3 = env.call(_ex("0.0001"))
    assert ex3.refusal is not None and ex3.refusal.status == 429 and ex3.refusal.kind == "budget-exhausted"


def test_failure_and_later_refusal_release_the_reservation() -> None:
    env = Env(budget())
    assert env.call(_ex("30"), status=502).stage_data[BUDGET_RECORD]["result"] == "released"
    assert env.call(_ex("30"), status=None).stage_data[BUDGET_RECORD]["result"] == "released"  # hung up
    assert env.spent() == (Decimal(0), Decimal(0))
    env.later.refuse = True
    ex = env.call(_ex("30"))
    assert ex.refusal is not None and ex.stage_data[BUDGET_RECORD]["result"] == "released"
    assert env.spent() == (Decimal(0), Decimal(0))


def test_a_call_without_its_cost_value_is_refused_not_counted_as_free() -> None:
    env = Env(budget())
    ex = env.call(_ex(None))
    assert ex.refusal is not None and ex.refusal.status == 400 and "net" in ex.refusal.detail


def test_actual_cost_from_the_answer_replaces_the_estimate() -> None:
    env = Env(budget(name="quotes", match={"actions": ["erp.quote.create"]}, key=[]))
    ex = env.call(_ex(None, action="erp.quote.create", route="POST /quotes"), body=b'{"billing": {"cost": 250}}')
    rec = ex.stage_data[BUDGET_RECORD]
    assert (rec["estimate"], rec["actual"], rec["actual_source"]) == ("3", "2.5", "response")
    # an answer without a readable cost settles at the estimate
    ex = env.call(_ex(None, action="erp.quote.create", route="POST /quotes"), body=b'{"billing": {"cost": "lots"}}')
    assert ex.stage_data[BUDGET_RECORD]["actual"] == "3"
    assert ex.plan.read_response_body > 0


def test_rollover_at_the_calendar_boundary_in_the_time_zone_is_exact() -> None:
    env = Env(budget(limit="50"))
    env.clock.t = at(2026, 1, 31, 23, 59, 59) + 0.999
    assert env.call(_ex("50")).allowed
    late = env.call(_ex("1"))
    assert late.refusal is not None and late.refusal.headers["Retry-After"] == "1"
    env.clock.t = at(2026, 2, 1, 0, 0, 0)  # midnight in Berlin (23:00 UTC): a new month
    fresh = env.call(_ex("50"))
    assert fresh.allowed, fresh.refusal
    assert fresh.stage_data[CHECKS][0].window.id == "month:2026-02@Europe/Berlin"
    assert env.spent(t=at(2026, 1, 31, 12, 0, 0)) == (Decimal(50), Decimal(0))


def test_a_lapsed_reservation_no_longer_holds_the_budget() -> None:
    env = Env(budget(limit="10", reservation_ttl_seconds=30))
    stuck = _ex("10")
    asyncio.run(env.chain.request(stuck))  # decided and reserved; the answer never comes (process died)
    assert stuck.allowed and env.spent() == (Decimal(0), Decimal(10))
    assert env.call(_ex("1")).refusal is not None
    env.clock.t += 31
    assert env.call(_ex("10")).allowed


def test_group_keys_and_shadow_budgets() -> None:
    env = Env(budget(name="team", key=["group"], limit="15"), budget(name="shadow", limit="1", shadow=True))
    assert env.call(_ex("10", agent="a")).allowed
    over = env.call(_ex("10", agent="b"))  # same group: 20 > 15
    assert over.refusal is not None and json.loads(json.dumps(over.refusal.extra))["budget"]["key"] == {
        "group": "buyers"}
    ok = env.call(_ex("5", agent="b"))
    outcomes = {c.budget.name: c.outcome for c in ok.stage_data[CHECKS]}
    assert outcomes == {"team": "reserved", "shadow": "shadow_exhausted"}
    assert budget_context(min(ok.stage_data[CHECKS], key=lambda c: c.rank()))["name"] == "team"


def test_cost_spec_kinds() -> None:
    assert CostSpec.model_validate({"field": "net", "scale": "0.01"}).kind == "field"
    assert CostSpec.model_validate({"llm": True}).fields == set()
    assert CostSpec.model_validate({"response": "u.c", "estimate": {"field": "max"}}).fields == {"max"}


def test_a_free_call_is_served_when_the_window_is_over_its_limit() -> None:
    env = Env(budget(limit="10", cost={"static": "0"}, name="free"), budget(limit="10"))
    assert env.call(_ex("10")).allowed  # "po": 10 of 10
    assert env.call(_ex("10")).refusal is not None
    free_only = Env(budget(limit="1", match={"connectors": ["erp"], "actions": ["erp.order.read"]}, name="reads",
                           cost={"static": "0"}))
    for _ in range(3):
        ex = free_only.call(_ex(None, action="erp.order.read", route="GET /orders/{id}"))
        assert ex.allowed and ex.stage_data[CHECKS][0].outcome == "reserved"


def test_llm_budget_currency_must_match_the_price_table() -> None:
    m = json.loads(json.dumps(MANIFEST))
    m["routes"][0]["body"]["model"] = {"path": "model", "type": "string"}
    with pytest.raises(BudgetConfigError) as e:
        build_budget_table([budget(currency="EUR", cost={"llm": True})], [ConnectorManifest.model_validate(m)],
                           llm_prices=LlmPrices.model_validate({"currency": "USD", "models": {"*": {"input": "1",
                                                                                                   "output": "2"}}}))
    assert "priced in 'USD'" in str(e.value)


def test_a_hold_budget_without_a_holding_policy_refuses_over_the_limit() -> None:
    """Fail closed: if no @budget("extension") policy held the call (the bundled one was removed),
    a call over a hold budget is refused, never forwarded over the limit."""
    env = Env(budget(limit="10", on_exceed="hold"))
    assert env.call(_ex("8")).allowed
    ex = env.call(_ex("5"))
    assert ex.refusal is not None and ex.refusal.status == 429
    assert "reserved the rest while" not in ex.refusal.detail and "budget extension" in ex.refusal.detail
    assert ex.stage_data[BUDGET_RECORD]["outcome"] == "exhausted"


def test_a_shadow_budget_that_cannot_price_a_call_counts_it_as_free() -> None:
    env = Env(budget(name="shadow-po", shadow=True))
    ex = env.call(_ex(None))
    assert ex.allowed and ex.stage_data[CONTEXT_EXTRA]["budget"]["estimated_cost"]["__extn"]["arg"] == "0.0"


def test_settled_and_lapsed_reservations_are_swept_in_the_background() -> None:
    env = Env(budget(limit="1000", reservation_ttl_seconds=5))
    reserve = next(s for s in env.chain if isinstance(s, BudgetReserve))
    reserve.sweeper.interval_seconds = 10
    for _ in range(3):
        assert env.call(_ex("1")).allowed
    assert len(env.store.reservations) == 3  # settled, kept for late settles until expiry + grace

    async def later() -> None:
        env.clock.t += 3600  # past expiry and grace
        reserve.sweeper.maybe()
        assert reserve.sweeper._running is not None
        await reserve.sweeper._running
    asyncio.run(later())
    assert env.store.reservations == {}
    assert env.spent(t=env.clock.t - 3600) == (Decimal(3), Decimal(0))
