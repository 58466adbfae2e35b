"""The budget stages: spend per calendar window, reserved when a call is decided and settled
on its answer (docs/limits.md, "Budgets").

`BudgetCheck` runs before `authorize`, after the rate limits. For each budget the request
counts in (one ledger per key: per agent, per group, ...), it computes the call's
estimated cost (static, a request value, or an LLM estimate), reads the window's spend
and reservations, and puts the tightest into `context.budget` so policies can see it. A
call that would go over a budget with `on_exceed: refuse` is refused here (429
`budget-exhausted`, `Retry-After` = when the window renews), unless the duplicate-work
check may answer it from an earlier call (an Idempotency-Key, a dedupe route): then the
reserve refuses it, after that check, so a retry of a call already charged is replayed. Over a budget with
`on_exceed: hold`, `context.budget.exceeded` is true and the bundled policy
`budget-extension` (policies/budgets.cedar, `@approval`) holds the call for a person.

A call over a budget that the duplicate-work store will answer (its Idempotency-Key or
dedupe key is already held: a replay, or a 409/422 without forwarding) costs nothing:
`BudgetCheck` asks the store (`answered`, only for such a write over a budget) and then
counts it as free (`context.budget.exceeded` false, `estimated_cost` 0), so it is neither
refused nor held for the spend its first call already made. Cedar still decides it, and
everything before the check (authentication, kill switches) still applies. Should the
entry be gone by the time the duplicate check looks (released, lapsed), the reserve
refuses it (429, `retry_refusal`): it was decided as free, so it is not forwarded on that
decision; its retry is decided afresh. (One an approval released skips the duplicate check:
a person saw it; it reserves the real estimate atomically.)

`BudgetReserve` runs late, after every refusal a policy, a claim or a duplicate check
can give, and reserves the estimate, atomically (spend + reserved + estimate <= limit
in the ledger itself, so concurrent calls on any replica never overspend). A call
that no longer fits (others reserved meanwhile) is refused 429 unless a person approved
a budget extension for it (`@budget("extension")` policies): then it is reserved over
the limit. On the way back the reservation is settled with the actual cost (the answer's
cost for `response` and `llm` costs, else the estimate) when the upstream answered
below 400, and released otherwise (not forwarded, refused later, upstream failure, the
agent hung up); one nobody settles lapses after `reservation_ttl_seconds`.

Shadow budgets reserve and settle like the others (their ledger shows what would have
been spent) but never refuse or hold. A ledger that cannot answer fails the call
closed (503) unless the budget says `on_unavailable: open`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation, localcontext
from typing import Any

from ..approvals.stage import RELEASED
from ..coordination.dedupe import SAFE_METHODS
from ..coordination.idempotency import KEY_HEADER as IDEMPOTENCY_KEY
from ..core.chain import Stage
from ..core.exchange import Exchange
from ..core.model import Refusal
from ..policy.stage import CONTEXT_EXTRA, EVALUATION
from ..record.model import BUDGET_RECORD
from ..store.counters import BudgetUsage
from .budget_events import BudgetEvent, BudgetObserver, NoBudgetObserver
from .budget_spec import MAX_AMOUNT, MAX_FRACTION_DIGITS, CostSpec, FieldCost, LlmPrices
from .budget_table import Budget, BudgetTable, Charge, budget_key
from .errors import CounterUnavailable
from .ledger import BudgetLedger
from .stage import (GroupsOf, PeriodicSweep, TooManyGroups, digest, key_combos, too_many_groups_refusal,
                    value_text)
from .windows import Window, utc_iso, window_for

log = logging.getLogger("proctor.limits")

EXHAUSTED_KIND = "budget-exhausted"  # Refusal.kind of a 429 for a budget
CHECKS = "budget.checks"  # stage_data: the Checks of this request
EXTENSION_ANNOTATION = "budget"  # @budget("extension") on the policies that hold for a budget extension
# The largest answer read for its cost (8 MiB: what llm_cost parses; a bigger one is streamed and
# settles at the estimate, so an agent cannot make a long answer cheap by leaving out max tokens
# unless its answer passes 8 MiB)
MAX_RESPONSE_BODY = 8 << 20
UNAVAILABLE_RETRY_AFTER = 5
CEDAR_DECIMAL_MAX = Decimal("922337203685477.5807")
_FOUR = Decimal("0.0001")
_TWELVE = Decimal(1).scaleb(-MAX_FRACTION_DIGITS)
_LOG_EVERY_SECONDS = 60.0


@dataclass(slots=True)
class Check:
    """One budget ledger a request counts in."""

    charge: Charge
    key: str
    shown: dict[str, str | None]
    window: Window
    estimate: Decimal
    usage: BudgetUsage | None  # None: the ledger could not answer (fail-open budgets only)
    outcome: str = "reserved"
    # the duplicate-work store answers this call (replay, 409, 422): it costs nothing unless it
    # reaches the reserve after all (the entry released meanwhile): refused there, or, released by an
    # approval, it reserves `estimate`
    duplicate: bool = False
    over: str | None = None  # a duplicate's outcome before it was counted free (exhausted | held)
    reservation: str | None = None
    actual: Decimal | None = None
    result: str | None = None  # settled | released | late
    actual_source: str = "estimate"  # estimate | response | llm

    @property
    def budget(self) -> Budget:
        return self.charge.budget

    @property
    def committed(self) -> Decimal:
        u = self.usage
        return u.spent + u.reserved if u is not None else Decimal(0)

    @property
    def cost(self) -> Decimal:
        """What this call would add to the window as decided: nothing when it is a duplicate."""
        return Decimal(0) if self.duplicate else self.estimate

    @property
    def exceeded(self) -> bool:
        # (a free call never exceeds: a window already over its limit still serves a model list,
        # and neither does a duplicate the store answers: it gets its replay)
        return (self.usage is not None and self.cost > 0 and self.committed + self.cost > self.budget.limit)

    def headroom(self) -> Decimal:
        """The fraction of the limit left once this call is reserved (lower is tighter)."""
        return (self.budget.limit - self.committed - self.cost) / self.budget.limit

    def rank(self) -> tuple[bool, bool, bool, Decimal, str]:
        return (self.budget.shadow, not self.exceeded, self.usage is None, self.headroom(), self.budget.name)


class CostUnknown(Exception):
    """The call's cost cannot be computed (a missing value, an unpriced model)."""


def _number(value: Any) -> Decimal | None:
    """A non-negative finite number from a Cedar/JSON value (int, decimal extension, numeric text)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, Decimal):  # (a number of an answer, parsed exactly)
        text: str | None = str(value)
    else:
        text = value_text(value) if not isinstance(value, float) else repr(value)
    if text is None or len(text) > 64:
        return None
    try:
        d = Decimal(text)
    except InvalidOperation:
        return None
    if not d.is_finite() or d < 0:
        return None
    # (request values are typed below this; an answer's cost above it books the most the ledger takes)
    return canonical(min(d, MAX_AMOUNT))


def canonical(d: Decimal) -> Decimal:
    """Without trailing zeros and without an exponent (45.0 -> 45, 1E+2 -> 100): one spelling per amount.
    Exact: the default context's 28 digits would round a longer amount (and fail on 1E+40)."""
    with localcontext() as ctx:
        ctx.prec = max(60, len(d.as_tuple().digits) + 1)
        ctx.Emax, ctx.Emin = 999999, -999999
        d = d.normalize()
        exp = d.as_tuple().exponent
        return d.quantize(Decimal(1)) if isinstance(exp, int) and exp > 0 else d


def _exact(fn: Callable[[], Decimal]) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 60
        return fn()


def cedar_decimal(value: Decimal, rounding: str) -> dict[str, Any]:
    """An amount as a Cedar decimal (4 places, rounded the safe way for policies; clamped to range)."""
    v = min(max(value, -CEDAR_DECIMAL_MAX), CEDAR_DECIMAL_MAX).quantize(_FOUR, rounding=rounding)
    text = format(v.normalize(), "f")
    return {"__extn": {"fn": "decimal", "arg": text if "." in text else text + ".0"}}


def amount_text(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text


def request_values(ex: Exchange) -> dict[str, Any]:
    """Every typed value of the request by name: path params, query values, body fields (in that
    order of precedence: body fields win, as a cost names the body's amount)."""
    cls = ex.classification
    assert cls is not None
    return {**cls.params, **cls.query_params, **cls.fields}


def estimate_cost(cost: CostSpec, ex: Exchange, prices: LlmPrices | None) -> Decimal:
    values = request_values(ex)

    def field_value(name: str) -> Decimal:
        v = _number(values.get(name))
        if v is None:
            raise CostUnknown(f"the request gives no non-negative number in `{name}`, which the budget's cost is "
                              "computed from")
        return v

    kind = cost.kind
    if kind == "static":
        assert cost.static is not None
        return cost.static
    if kind == "field":
        assert cost.field is not None
        v, scale = field_value(cost.field), cost.scale
        return _exact(lambda: v * scale) if scale is not None else v
    if kind == "response":
        est = cost.estimate
        if isinstance(est, FieldCost):
            return field_value(est.field)
        assert est is not None
        return est
    from .llm_cost import llm_estimate, llm_model

    assert prices is not None
    model = llm_model(values)
    try:
        out = llm_estimate(prices, model, values)
    except ValueError as e:  # (a max-tokens or n value that is not a whole number >= 1)
        raise CostUnknown(str(e)) from None
    if out is None:
        raise CostUnknown(f"model {model!r} has no price in llm_prices (and there is no '*' entry), so its cost "
                          "cannot be counted")
    return out


def bookable(amount: Decimal) -> Decimal:
    """An amount an upstream answered, as the ledger can book it: rounded up at the 12th digit after
    the point (never less than the call cost) and at most MAX_AMOUNT (the ledger refuses more than 60
    digits; a settle that failed would leave the reservation held until it lapses)."""
    if amount > MAX_AMOUNT:
        return MAX_AMOUNT
    return canonical(_exact(lambda: amount.quantize(_TWELVE, rounding=ROUND_CEILING)))


def _dot(doc: Any, path: str) -> Any:
    for step in path.split("."):
        if isinstance(doc, dict):
            doc = doc.get(step)
        elif isinstance(doc, list) and step.isdigit() and int(step) < len(doc):
            doc = doc[int(step)]
        else:
            return None
    return doc


def actual_cost(cost: CostSpec, ex: Exchange, prices: LlmPrices | None) -> tuple[Decimal | None, str]:
    """The call's actual cost from the answer, and where it came from (None: use the estimate)."""
    resp = ex.response
    body = resp.body if resp is not None else None
    if cost.kind == "response":
        assert cost.response is not None
        if not body:
            return None, "estimate"
        try:
            doc = json.loads(body, parse_float=Decimal)  # (exact: a float would round 0.30000000000000001)
        except (ValueError, RecursionError):
            return None, "estimate"
        v, scale = _number(_dot(doc, cost.response)), cost.scale
        if v is None:
            return None, "estimate"
        return bookable(_exact(lambda: v * scale) if scale is not None else v), "response"
    if cost.kind == "llm":
        from .llm_cost import llm_actual, llm_model

        assert prices is not None and resp is not None
        out = llm_actual(prices, llm_model(request_values(ex)), body, resp.headers.get("content-type"))
        return out, ("llm" if out is not None else "estimate")
    return None, "estimate"


def _key_text(shown: dict[str, str | None]) -> str:
    if not shown:
        return "shared by every call it covers"
    return "for " + ", ".join(f"{dim} {'(none)' if v is None else repr(v)}" for dim, v in shown.items())


def _money(value: Decimal, currency: str) -> str:
    return f"{amount_text(value)} {currency}".rstrip()


def exhausted_refusal(c: Check, agent: str, now: float, held_before: bool = False) -> Refusal:
    """429 naming the budget, its window and when it renews."""
    b, w = c.budget, c.window
    wait = max(1, math.ceil(w.end - now))
    u = c.usage
    spent, reserved = (u.spent, u.reserved) if u is not None else (Decimal(0), Decimal(0))
    raced = " (other calls reserved the rest while this one was being decided)" if held_before else ""
    more = (" A person in the budget's approver group can approve a budget extension for a retry of this call."
            if b.on_exceed == "hold" else "")
    detail = (f"{agent} would spend {_money(c.estimate, b.currency)} against budget '{b.name}' "
              f"{_key_text(c.shown)}: {_money(spent, b.currency)} spent and {_money(reserved, b.currency)} "
              f"reserved of {_money(b.limit, b.currency)} this {b.period} (window {w.id}){raced}. This request "
              f"was not forwarded. The budget renews at {utc_iso(w.end)} (Retry-After); a smaller call may "
              f"still fit.{more}")
    return Refusal(
        429, "Budget exhausted", detail, reasons=[f"budget:{b.name}"], headers={"Retry-After": str(wait)},
        kind=EXHAUSTED_KIND,
        extra={"budget": {"name": b.name, "currency": b.currency, "limit": amount_text(b.limit),
                          "spent": amount_text(spent), "reserved": amount_text(reserved),
                          "estimated_cost": amount_text(c.estimate), "window": w.id,
                          "renews_at": utc_iso(w.end), "key": dict(c.shown), "retry_after": wait}},
    )


def retry_refusal(c: Check, agent: str) -> Refusal:
    """429 for a call decided as a free retry whose earlier request's key was gone before the
    duplicate check could answer it: send it again, to be decided as the new call it is."""
    b = c.budget
    detail = (f"this request was decided as a retry of an earlier request with the same Idempotency-Key (or "
              f"dedupe key), which costs nothing, but that request's key was released before it could be "
              f"answered (the earlier request failed or lapsed). As a new call {agent} would spend "
              f"{_money(c.estimate, b.currency)} against budget '{b.name}' {_key_text(c.shown)}, which was over "
              f"its limit of {_money(b.limit, b.currency)} when decided. This request was not forwarded; send it "
              f"again to have it decided as a new call"
              + (" (held for a person while the budget is over)." if b.on_exceed == "hold" else "."))
    return Refusal(
        429, "Budget exhausted", detail, reasons=[f"budget:{b.name}"], headers={"Retry-After": "1"},
        kind=EXHAUSTED_KIND,
        extra={"budget": {"name": b.name, "currency": b.currency, "limit": amount_text(b.limit),
                          "estimated_cost": amount_text(c.estimate), "window": c.window.id,
                          "key": dict(c.shown), "retry_after": 1, "retry_released": True}},
    )


def unavailable_refusal(b: Budget, backend: str) -> Refusal:
    return Refusal(
        503, "Budget unavailable",
        f"the ledger of budget '{b.name}' ({backend}) cannot be reached right now, and the budget fails closed, "
        "so this request was not forwarded; retry later",
        reasons=[f"budget:{b.name}"], headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
        kind="fail-closed", extra={"budget": {"name": b.name, "unavailable": True}},
    )


def cost_refusal(b: Budget, why: str) -> Refusal:
    return Refusal(
        400, "Cost unknown",
        f"budget '{b.name}' cannot price this call: {why}. It was not forwarded; send the value, or use another "
        "model or route", reasons=[f"budget:{b.name}"], kind="request",
        extra={"budget": {"name": b.name}},
    )


def budget_context(c: Check) -> dict[str, Any]:
    """context.budget: the tightest budget (an exceeded one first; shadow ones only when all are)."""
    b = c.budget
    u = c.usage
    spent = u.spent if u is not None else Decimal(0)
    reserved = u.reserved if u is not None else Decimal(0)
    committed = spent + reserved
    left = b.limit - committed
    soft = b.soft_threshold
    return {
        "name": b.name,
        "currency": b.currency,
        "limit": cedar_decimal(b.limit, ROUND_FLOOR),
        "spent": cedar_decimal(spent, ROUND_CEILING),
        "reserved": cedar_decimal(reserved, ROUND_CEILING),
        "remaining": cedar_decimal(left if left > 0 else Decimal(0), ROUND_FLOOR),
        "estimated_cost": cedar_decimal(c.cost, ROUND_CEILING),
        "used_percent": min(int(_exact(lambda: committed * 100 / b.limit)), 10**9),
        "exceeded": c.exceeded,
        "soft_reached": soft is not None and u is not None and committed + c.cost >= soft * b.limit,
        "on_exceed": b.on_exceed,
        "shadow": b.shadow,
        "known": u is not None,
        "window_end": int(c.window.end),
    }


def _check_record(c: Check) -> dict[str, Any]:
    out: dict[str, Any] = {"name": c.budget.name, "key": digest(c.key), "outcome": c.outcome,
                           "window": c.window.id, "estimate": amount_text(c.estimate), "shadow": c.budget.shadow}
    if c.usage is not None:
        out["spent"] = amount_text(c.usage.spent)
        out["reserved"] = amount_text(c.usage.reserved)
    if c.result is not None:
        out["result"] = c.result
    if c.actual is not None:
        out["actual"] = amount_text(c.actual)
        out["actual_source"] = c.actual_source
    return out


def record_part(checks: list[Check]) -> dict[str, Any]:
    ordered = sorted(checks, key=Check.rank)
    part = _check_record(ordered[0])
    if len(ordered) > 1:
        part["others"] = [_check_record(c) for c in ordered[1:]]
    return part


def _crossed(before: Decimal, after: Decimal, mark: Decimal) -> bool:
    return before < mark <= after


@dataclass
class _Reporting:
    observer: BudgetObserver
    logged: dict[str, float] = field(default_factory=dict)

    def event(self, kind: str, c: Check, ex: Exchange, outcome: str, spent: Decimal, reserved: Decimal) -> None:
        b, cls, identity = c.budget, ex.classification, ex.identity
        self.observer.event(BudgetEvent(
            kind="soft_threshold" if kind == "soft_threshold" else "exhausted", budget=b.name, key=dict(c.shown),
            window_id=c.window.id, window_start=c.window.start, window_end=c.window.end, limit=b.limit,
            spent=spent, reserved=reserved, currency=b.currency,
            threshold=b.soft_threshold if kind == "soft_threshold" else None,
            agent=identity.agent_id if identity is not None else "", decision_id=ex.decision_id,
            action=cls.action if cls is not None else "", connector=cls.connector if cls is not None else "",
            outcome=outcome,
        ))

    def unavailable(self, b: Budget, e: CounterUnavailable, decision_id: str) -> None:
        now = time.monotonic()
        if now - self.logged.get(b.name, -math.inf) >= _LOG_EVERY_SECONDS:
            self.logged[b.name] = now
            log.error("budget %s: ledger unavailable (decision %s), failing %s: %s", b.name, decision_id,
                      "open: calls pass uncounted" if b.fail_open else "closed: calls are refused (503)", e)


class BudgetCheck(Stage):
    """Before authorization: the call's estimated cost against its budgets; context.budget."""

    name = "budget"

    def __init__(self, table: BudgetTable, ledger: BudgetLedger, groups_of: GroupsOf,
                 observer: BudgetObserver | None = None, clock: Callable[[], float] = time.time,
                 answered: Answered | None = None) -> None:
        self.table = table
        self.ledger = ledger
        self.groups_of = groups_of
        self.report = _Reporting(observer or NoBudgetObserver())
        self.clock = clock
        self.answered = answered  # the duplicate-work store: does it answer this write (IdempotencyCheck.answers)?

    async def on_request(self, ex: Exchange) -> None:
        cls, identity, req = ex.classification, ex.identity, ex.request
        if cls is None or identity is None or req is None or not cls.action:
            return
        charges = self.table.for_request(cls.connector, cls.route, cls.action, req.method)
        if not charges:
            return
        now = self.clock()
        checks: list[Check] = []
        refusal: Refusal | None = None
        for charge in charges:
            b = charge.budget
            try:
                estimate = estimate_cost(charge.cost, ex, self.table.llm_prices)
            except CostUnknown as e:
                if not b.shadow:
                    refusal = cost_refusal(b, str(e))
                    break
                estimate = Decimal(0)  # (a shadow budget never refuses: it counts this call as free)
            window = window_for(now, b.period, b.timezone)
            try:
                combos = list(key_combos(b.key, ex, self.groups_of))
            except TooManyGroups as e:
                refusal = too_many_groups_refusal(f"budget '{b.name}'", identity.agent_id, e.args[0])
                break
            for combo, shown in combos:
                key = budget_key(b.name, b.key, combo)
                try:
                    usage: BudgetUsage | None = await self.ledger.usage(key, window.id, now)
                except CounterUnavailable as e:
                    self.report.observer.checked(b.name, "unavailable")
                    self.report.unavailable(b, e, ex.decision_id)
                    if not b.fail_open:
                        ex.errors.append(f"budget {b.name}: {e}")
                        refusal = unavailable_refusal(b, e.backend)
                        break
                    usage = None
                c = Check(charge, key, shown, window, estimate, usage)
                checks.append(c)
                if c.usage is None:
                    c.outcome = "unavailable"
                elif c.exceeded:
                    if b.shadow:
                        c.outcome = "shadow_exhausted"
                    elif b.on_exceed == "refuse":
                        c.outcome = "exhausted"
                        if not _may_be_replayed(ex):
                            refusal = exhausted_refusal(c, identity.agent_id, now)
                        # (else the reserve refuses it, after the duplicate-work check: a retry of a call
                        # that was already charged is answered from its replay, not refused for its own spend)
                    else:
                        c.outcome = "held"  # (until the policy holds it, or an approval releases it)
            if refusal is not None:
                break
        if (refusal is None and self.answered is not None and _may_be_replayed(ex)
                and any(c.outcome in ("exhausted", "held") for c in checks) and await self.answered(ex)):
            # a retry the duplicate-work check answers from its first call (replay, 409, 422): free,
            # so neither refused nor held for the spend that first call made (Cedar still decides it)
            for c in checks:
                c.duplicate = True
                if c.outcome in ("exhausted", "held"):
                    c.over = c.outcome
                if c.outcome in ("exhausted", "held", "shadow_exhausted"):
                    c.outcome = "reserved"
        if checks:
            ex.stage_data[CHECKS] = checks
            ex.stage_data[BUDGET_RECORD] = record_part(checks)
        if refusal is not None:
            for c in checks:
                if c.outcome in ("exhausted", "shadow_exhausted"):
                    self.report.observer.checked(c.budget.name, c.outcome)
                    u = c.usage
                    assert u is not None
                    self.report.event("exhausted", c, ex, c.outcome, u.spent, u.reserved)
                    self.report.observer.window(c.budget.name, c.key, c.budget.limit, u.spent, u.reserved,
                                                c.window.end)
            ex.refuse(refusal)
            return
        if checks:
            ex.stage_data.setdefault(CONTEXT_EXTRA, {})["budget"] = budget_context(min(checks, key=Check.rank))

    async def on_response(self, ex: Exchange) -> None:
        """A call over a hold budget that was held (or refused before its reservation): report it once."""
        checks: list[Check] | None = ex.stage_data.get(CHECKS)
        if not checks or ex.refusal is None:
            return
        for c in checks:
            if c.outcome == "held" and c.reservation is None and c.usage is not None:
                self.report.observer.checked(c.budget.name, "held")
                self.report.event("exhausted", c, ex, "held", c.usage.spent, c.usage.reserved)


Answered = Callable[[Exchange], Awaitable[bool]]


def _may_be_replayed(ex: Exchange) -> bool:
    """Can the duplicate-work check (after authorize) answer this call from an earlier one's
    replay: a write with an Idempotency-Key, or a write on a route with a dedupe window?"""
    req, cls = ex.request, ex.classification
    if req is None or req.method.upper() in SAFE_METHODS:
        return False
    return IDEMPOTENCY_KEY in req.headers or getattr(getattr(cls, "spec", None), "dedupe", None) is not None


def _extension_approved(ex: Exchange) -> bool:
    """Was this call released by a person's approval of a budget-extension policy?"""
    approval = ex.stage_data.get(RELEASED)
    evaluation = ex.stage_data.get(EVALUATION)
    if approval is None or evaluation is None:
        return False
    policies = evaluation.bundle.policies
    ids = approval.derived.get("policies", []) if isinstance(approval.derived, dict) else []
    return any(pid in policies and policies[pid].annotations.get(EXTENSION_ANNOTATION) == "extension" for pid in ids)


class BudgetReserve(Stage):
    """Late in the chain: reserve the estimate atomically; on the way back settle or release it."""

    name = "budget-reserve"

    def __init__(self, ledger: BudgetLedger, prices: LlmPrices | None, observer: BudgetObserver | None = None,
                 clock: Callable[[], float] = time.time, sweep_interval_seconds: float = 60.0) -> None:
        self.ledger = ledger
        self.prices = prices
        self.report = _Reporting(observer or NoBudgetObserver())
        self.clock = clock
        self.sweeper = PeriodicSweep(ledger, sweep_interval_seconds, clock)  # settled and lapsed reservations

    async def on_request(self, ex: Exchange) -> None:
        checks: list[Check] | None = ex.stage_data.get(CHECKS)
        if not checks:
            return
        identity = ex.identity
        assert identity is not None
        self.sweeper.maybe()
        extension = _extension_approved(ex)
        now = self.clock()
        obs = self.report.observer
        over = [c for c in checks if c.duplicate and c.over is not None]
        if over and ex.approval_id is None:
            # Decided as a retry the duplicate-work store answers (free: neither refused nor held
            # for a person), yet the store did not answer it: its key was released or lapsed
            # meanwhile (the first request failed). It was never decided as the new call over the
            # budget it is, so it is not forwarded on that decision, even where the spend released
            # meanwhile would let it fit; its retry is decided afresh. (A call an approval released
            # skips the duplicate check; a person saw it: it reserves its real estimate below.)
            for c in over:
                c.outcome = c.over or "exhausted"
                obs.checked(c.budget.name, c.outcome)
            ex.stage_data[BUDGET_RECORD] = record_part(checks)
            ex.refuse(retry_refusal(over[0], identity.agent_id))
            return
        refusal: Refusal | None = None
        for i, c in enumerate(checks):
            b = c.budget
            if c.usage is None:
                obs.checked(b.name, "unavailable")
                continue  # (fail-open: the ledger did not answer at the check)
            rid = f"{ex.decision_id}.{i}"
            try:
                r = await self.ledger.reserve(c.key, c.window.id, c.estimate, b.limit, rid,
                                              b.reservation_ttl_seconds, now,
                                              force=b.shadow or extension or c.estimate == 0)
            except CounterUnavailable as e:
                obs.checked(b.name, "unavailable")
                self.report.unavailable(b, e, ex.decision_id)
                c.outcome = "unavailable"
                if not b.fail_open:
                    ex.errors.append(f"budget {b.name}: {e}")
                    refusal = unavailable_refusal(b, e.backend)
                    break
                continue
            # (it fitted when checked: others reserved the rest meanwhile)
            raced = c.outcome not in ("held", "exhausted")
            if r.placed:
                c.reservation = rid
            before = r.spent + r.reserved - (c.estimate if r.placed else Decimal(0))
            c.usage = BudgetUsage(r.spent, before - r.spent)
            if r.ok or c.estimate == 0:
                c.outcome = "reserved"
            elif b.shadow:
                c.outcome = "shadow_exhausted"
            elif extension:
                c.outcome = "extended"
            else:
                c.outcome = "exhausted"
                refusal = exhausted_refusal(c, identity.agent_id, now, held_before=raced)
            obs.checked(b.name, c.outcome)
            if c.outcome in ("exhausted", "shadow_exhausted", "extended"):
                self.report.event("exhausted", c, ex, c.outcome, r.spent, r.reserved)
            elif b.soft_threshold is not None and r.placed and _crossed(before, r.spent + r.reserved,
                                                                        b.soft_threshold * b.limit):
                self.report.event("soft_threshold", c, ex, c.outcome, r.spent, r.reserved)
            obs.window(b.name, c.key, b.limit, r.spent, r.reserved, c.window.end)
            if refusal is not None:
                break
        ex.stage_data[BUDGET_RECORD] = record_part(checks)
        if refusal is not None:
            ex.refuse(refusal)
            return
        if any(c.reservation and c.charge.cost.kind in ("response", "llm") for c in checks):
            ex.plan.read_response_body = max(ex.plan.read_response_body, MAX_RESPONSE_BODY)

    async def on_response(self, ex: Exchange) -> None:
        checks: list[Check] | None = ex.stage_data.get(CHECKS)
        if not checks or not any(c.reservation for c in checks):
            return
        resp = ex.response
        forwarded = (ex.refusal is None and ex.local_reply is None and resp is not None
                     and resp.upstream_status is not None and resp.upstream_status < 400)
        now = self.clock()
        obs = self.report.observer
        for c in checks:
            rid = c.reservation
            if rid is None:
                continue
            b = c.budget
            try:
                if not forwarded:
                    await self.ledger.release(rid)
                    c.result = "released"
                    obs.settled(b.name, "released", Decimal(0), b.currency)
                    continue
                actual, source = actual_cost(c.charge.cost, ex, self.prices)
                c.actual, c.actual_source = (actual, source) if actual is not None else (c.estimate, "estimate")
                out = await self.ledger.settle(rid, c.actual, now)
                if out is None:  # (purged: long past its lapse) book it plainly
                    u = await self.ledger.charge(c.key, c.window.id, c.actual, now)
                    spent, reserved, late = u.spent, u.reserved, True
                else:
                    spent, reserved, late = out.spent, out.reserved, out.late
            except CounterUnavailable as e:
                # (the reservation lapses by itself; the spend of this call is lost to the ledger: say so)
                log.error("budget %s: could not %s reservation %s (decision %s): %s", b.name,
                          "settle" if forwarded else "release", rid, ex.decision_id, e)
                ex.errors.append(f"budget {b.name}: settle failed: {e}")
                c.result = "unsettled"
                continue
            c.result = "late" if late else "settled"
            obs.settled(b.name, c.result, c.actual, b.currency)
            obs.window(b.name, c.key, b.limit, spent, reserved, c.window.end)
            if b.soft_threshold is not None:
                after = spent + reserved
                before = after - c.actual + c.estimate
                if _crossed(before, after, b.soft_threshold * b.limit):
                    self.report.event("soft_threshold", c, ex, c.outcome, spent, reserved)
        ex.stage_data[BUDGET_RECORD] = record_part(checks)
