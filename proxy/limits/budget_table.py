"""The declared budgets, compiled once: which budgets a request counts in, at what cost
(docs/limits.md, "Budgets").

`build_budget_table(budgets, manifests, workflow_actions, llm_prices)` checks every
declaration against the connectors (every problem at once, as a `BudgetConfigError`):

- `match` names connectors and actions that exist and selects at least one route;
- a key on `param:`/`query:`/`field:` names a value some matched route declares, and a
  key on `workflow` matches a workflow step (as for rate limits);
- the cost is the budget's own `cost:`, else the route's `cost:`, else 1 per call; a
  `field` cost (or estimate) must be a value every matched route declares, and an
  `llm` cost needs `llm_prices` and a `model` value on the route.

`BudgetTable.for_request` answers the (budget, cost) pairs of one request, by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .budget_spec import BudgetSpec, CostSpec, LlmPrices
from .keys import limit_key
from .spec import RateLimitMatch
from .table import _Route, _routes, _statically, check_match

PER_CALL = CostSpec(static=Decimal(1))  # a budget over routes that declare no cost counts calls
_CACHE_MAX = 4096


class BudgetConfigError(ValueError):
    """Budget declarations that cannot work; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid budgets:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Budget:
    """One declared budget, ready to reserve in."""

    name: str
    key: tuple[str, ...]
    limit: Decimal
    currency: str
    period: str
    timezone: str
    soft_threshold: Decimal | None
    on_exceed: str  # refuse | hold
    shadow: bool
    fail_open: bool
    reservation_ttl_seconds: int
    match: RateLimitMatch
    cost: CostSpec | None  # the budget's own cost (None: the route's, else 1 per call)
    where: str

    @property
    def workflow_only(self) -> bool:
        return "workflow" in self.key

    @classmethod
    def of(cls, spec: BudgetSpec, where: str) -> "Budget":
        return cls(spec.name, tuple(spec.key), spec.limit, spec.currency, spec.period, spec.timezone,
                   spec.soft_threshold, spec.on_exceed, spec.shadow, spec.on_unavailable == "open",
                   spec.reservation_ttl_seconds, spec.match, spec.cost, where)


@dataclass(frozen=True)
class Charge:
    """A budget a request counts in, and how its cost is computed on that route."""

    budget: Budget
    cost: CostSpec


@dataclass
class BudgetTable:
    budgets: tuple[Budget, ...] = ()
    llm_prices: LlmPrices | None = None
    workflow_actions: frozenset[str] = frozenset()
    _route_costs: dict[tuple[str, str], CostSpec] = field(default_factory=dict)
    _cache: dict[tuple[str, str, str, str], tuple[Charge, ...]] = field(default_factory=dict)
    budget_actions: dict[str, bool] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.budgets)

    def get(self, name: str) -> Budget | None:
        return next((b for b in self.budgets if b.name == name), None)

    def for_request(self, connector: str, route: str, action: str, method: str) -> tuple[Charge, ...]:
        k = (connector, route, action, method)
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        step = action in self.workflow_actions
        route_cost = self._route_costs.get((connector, route))
        out = tuple(Charge(b, b.cost or route_cost or PER_CALL) for b in self.budgets
                    if b.match.matches(connector, action, method) and (step or not b.workflow_only))
        if len(self._cache) < _CACHE_MAX:
            self._cache[k] = out
        return out


def _route_fields(r: _Route) -> frozenset[str]:
    return r.fields | r.params | r.query


def _route_costs(manifests: Iterable[Any]) -> dict[tuple[str, str], CostSpec]:
    out: dict[tuple[str, str], CostSpec] = {}
    for m in manifests:
        for r in m.routes:
            cost = getattr(r, "cost", None)
            if cost is not None:
                out[(m.name, f"{r.method} {r.path}")] = cost
    return out


def _budget_actions(routes: list[_Route], budgets: Sequence[BudgetSpec],
                    workflow_actions: frozenset[str]) -> dict[str, bool]:
    """action -> whether context.budget is always set (False: on some of its requests only)."""
    per_action: dict[str, list[bool | None]] = {}
    for r in routes:
        step = r.action in workflow_actions
        verdict: bool | None = False
        for b in budgets:
            if "workflow" in b.key and not step:
                continue
            v = _statically(b.match, r)
            if v is True:
                verdict = True
                break
            if v is None:
                verdict = None
        per_action.setdefault(r.action, []).append(verdict)
    return {a: all(v is True for v in vs) for a, vs in per_action.items() if any(v is not False for v in vs)}


def budget_actions(budgets: Sequence[BudgetSpec], manifests: Iterable[Any],
                   workflow_actions: frozenset[str] = frozenset()) -> dict[str, bool]:
    """Which actions carry `context.budget` (for the generated schema), leniently."""
    return _budget_actions(_routes(manifests), budgets, workflow_actions)


def build_budget_table(budgets: Sequence[BudgetSpec], manifests: Iterable[Any],
                       workflow_actions: frozenset[str] = frozenset(),
                       llm_prices: LlmPrices | None = None) -> BudgetTable:
    manifests = list(manifests)
    routes = _routes(manifests)
    route_costs = _route_costs(manifests)
    problems: list[str] = []
    compiled = []
    for i, b in enumerate(budgets):
        where = f"budgets[{i}] ({b.name})"
        matched = check_match(where, b.match, b.key, manifests, routes, frozenset(workflow_actions), problems,
                              "ledger")
        for r in matched:
            cost = b.cost or route_costs.get((r.connector, r.route)) or PER_CALL
            missing = sorted(cost.fields - _route_fields(r))
            if missing:
                problems.append(f"{where}: its cost reads {missing}, which route {r.connector} {r.route} "
                                f"({r.action}) does not declare; narrow match, or declare the value on the route")
            if cost.llm:
                if llm_prices is None:
                    problems.append(f"{where}: route {r.connector} {r.route} costs LLM tokens, which needs "
                                    "llm_prices (the token price table) in proctor.yaml")
                if "model" not in r.fields:
                    problems.append(f"{where}: route {r.connector} {r.route} costs LLM tokens but declares no "
                                    "`model` body value to price them by")
        llm_priced = (b.cost is not None and b.cost.llm) or any(
            (route_costs.get((r.connector, r.route)) or PER_CALL).llm for r in matched if b.cost is None)
        if llm_priced and llm_prices is not None and b.currency and b.currency != llm_prices.currency:
            problems.append(f"{where}: currency {b.currency!r}, but its LLM calls are priced in "
                            f"{llm_prices.currency!r} (llm_prices.currency)")
        if b.cost is not None and b.cost.llm and llm_prices is None:
            problems.append(f"{where}: cost {{llm: true}} needs llm_prices")
        compiled.append(Budget.of(b, where))
    if problems:
        # (an llm-priced route matched by several budgets repeats its problem: say it once)
        raise BudgetConfigError(list(dict.fromkeys(problems)))
    return BudgetTable(
        budgets=tuple(compiled),
        llm_prices=llm_prices,
        workflow_actions=frozenset(workflow_actions),
        _route_costs=route_costs,
        budget_actions=_budget_actions(routes, budgets, frozenset(workflow_actions)),
    )


def budget_key(name: str, dims: Sequence[str], values: Sequence[str | None]) -> str:
    """The ledger key of one budget window owner: the budget's name and each key dimension with
    its value (`=v`) or absent (`-`), escaped by limit_key so no value can pose as another part."""
    parts = ["bg", name]
    for dim, v in zip(dims, values):
        parts += [dim, "-" if v is None else "=" + v]
    return limit_key(*parts)
