"""The declared rate limits, compiled once: which limits a request counts against (docs/limits.md).

`build_table(config_limits, manifests, workflow_actions)` checks the declarations
against the connectors (every problem at once, as a `LimitConfigError`):

- a config limit's `match` names connectors and actions that exist, and matches at
  least one route; a key on `param:`/`query:`/`field:` names a value at least one
  matched route declares (else every request would share the "absent" counter);
  a key on `workflow` matches at least one workflow step;
- a route limit's name may repeat on several routes (they then share one limit:
  one counter per key across those routes) only with the same declaration, and
  never as a config limit's name.

`LimitTable.for_request` answers the limits of one request, shortest period first;
`usage_actions` says which actions' Cedar context carries `context.usage` (for
the generated schema: True when every route of the action is limited).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .rate import Gcra
from .spec import ConfigRateLimit, RateLimitMatch, RateLimitSpec

GENERIC_CONNECTOR = "generic-http"  # (proxy/connectors/classifier.py: generic egress)
GENERIC_ACTION = "http.request"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_CACHE_MAX = 4096


class LimitConfigError(ValueError):
    """Rate-limit declarations that cannot work; the message lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid rate limits:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Limit:
    """One declared rate limit, ready to count."""

    name: str
    key: tuple[str, ...]
    gcra: Gcra
    shadow: bool
    fail_open: bool
    source: Literal["config", "connector"]
    where: str  # "rate_limits[0]" or "connector ticketing, route POST /api/now/table/incident"
    match: RateLimitMatch | None = None  # config limits
    routes: tuple[str, ...] = ()  # connector limits: "<connector> <METHOD> <path>"

    @property
    def workflow_only(self) -> bool:
        """A limit keyed on the workflow instance counts workflow steps only."""
        return "workflow" in self.key

    @property
    def period_seconds(self) -> float:
        return self.gcra.period_seconds


def _limit(spec: RateLimitSpec, source: Literal["config", "connector"], where: str,
           match: RateLimitMatch | None = None, routes: tuple[str, ...] = ()) -> Limit:
    return Limit(spec.name, tuple(spec.key), spec.gcra, spec.shadow, spec.on_unavailable == "open", source, where,
                 match, routes)


@dataclass(frozen=True)
class _Route:
    """One route (or JSON-RPC operation) as the limits see it."""

    connector: str
    route: str  # "METHOD path", as Classification.route spells it
    method: str
    action: str
    params: frozenset[str]
    query: frozenset[str]
    fields: frozenset[str]
    limits: tuple[RateLimitSpec, ...]


def _routes(manifests: Iterable[Any]) -> list[_Route]:
    out = []
    for m in manifests:
        for r in m.routes:
            route = f"{r.method} {r.path}"
            params = frozenset(_PLACEHOLDER.findall(r.path))
            query = frozenset(r.query)
            limits = tuple(r.rate_limits)
            if r.jsonrpc is not None:
                for op in r.jsonrpc:
                    out.append(_Route(m.name, route, r.method, op.action, params, query, frozenset(op.body), limits))
            else:
                out.append(_Route(m.name, route, r.method, r.action, params, query, frozenset(r.body), limits))
    return out


def _statically(match: RateLimitMatch, r: _Route) -> bool | None:
    """Does a config limit match every request of the route (True), some (None: its method
    filter against a `*` route), or none (False)?"""
    if match.connectors and r.connector not in match.connectors:
        return False
    if not match.action_matches(r.action):
        return False
    if not match.methods:
        return True
    if r.method == "*":
        return None
    return r.method in match.methods


@dataclass
class LimitTable:
    limits: tuple[Limit, ...] = ()
    workflow_actions: frozenset[str] = frozenset()
    _config: tuple[Limit, ...] = ()
    _by_route: dict[tuple[str, str], tuple[Limit, ...]] = field(default_factory=dict)
    _cache: dict[tuple[str, str, str, str], tuple[Limit, ...]] = field(default_factory=dict)
    usage_actions: dict[str, bool] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.limits)

    def get(self, name: str) -> Limit | None:
        return next((lim for lim in self.limits if lim.name == name), None)

    def for_request(self, connector: str, route: str, action: str, method: str) -> tuple[Limit, ...]:
        """The limits a request counts against, shortest period first (then by name)."""
        k = (connector, route, action, method)
        hit = self._cache.get(k)
        if hit is not None:
            return hit
        step = action in self.workflow_actions
        found: dict[str, Limit] = {}
        for lim in self._by_route.get((connector, route), ()):
            if step or not lim.workflow_only:
                found[lim.name] = lim
        for lim in self._config:
            assert lim.match is not None
            if lim.match.matches(connector, action, method) and (step or not lim.workflow_only):
                found[lim.name] = lim
        out = tuple(sorted(found.values(), key=lambda lim: (lim.gcra.period_ms, lim.name)))
        if len(self._cache) < _CACHE_MAX:
            self._cache[k] = out
        return out


def _usage(routes: list[_Route], config: Sequence[ConfigRateLimit], workflow_actions: frozenset[str]) -> dict[str, bool]:
    """action -> whether context.usage is always set (False: on some of its requests only)."""
    per_action: dict[str, list[bool | None]] = {}
    for r in routes:
        step = r.action in workflow_actions
        verdict: bool | None = False
        if any(step or "workflow" not in s.key for s in r.limits):
            verdict = True
        else:
            for c in config:
                if "workflow" in c.key and not step:
                    continue
                v = _statically(c.match, r)
                if v is True:
                    verdict = True
                    break
                if v is None:
                    verdict = None
        per_action.setdefault(r.action, []).append(verdict)
    return {a: all(v is True for v in vs) for a, vs in per_action.items() if any(v is not False for v in vs)}


def usage_actions(config: Sequence[ConfigRateLimit], manifests: Iterable[Any],
                  workflow_actions: frozenset[str] = frozenset()) -> dict[str, bool]:
    """Which actions carry `context.usage` (True: on every request; False: on some), leniently:
    for the generated schema, before (or without) the strict checks of `build_table`."""
    return _usage(_routes(manifests), config, workflow_actions)


def check_match(where: str, m: RateLimitMatch, key: Sequence[str], manifests: list[Any], routes: list[_Route],
                workflow_actions: frozenset[str], problems: list[str], counted_in: str) -> list[_Route]:
    """Check a config declaration's `match` and `key` against the connectors' routes (shared by
    rate limits and budgets): problems are appended; answers the routes it may match."""
    connectors = {mf.name for mf in manifests} | {GENERIC_CONNECTOR}
    actions = {r.action for r in routes} | {GENERIC_ACTION}
    before = len(problems)
    for name in m.connectors:
        if name not in connectors:
            problems.append(f"{where}: match.connectors names {name!r}, which no connector manifest declares "
                            f"(known: {', '.join(sorted(connectors))})")
    for a in m.actions:
        known = any(x.startswith(a[:-1]) for x in actions) if a.endswith("*") else a in actions
        if not known:
            problems.append(f"{where}: match.actions names {a!r}, which no connector route has")
    matched = [r for r in routes if _statically(m, r) is not False]
    generic = m.matches(GENERIC_CONNECTOR, GENERIC_ACTION, m.methods[0] if m.methods else "GET")
    if not matched and not generic and len(problems) == before:
        problems.append(f"{where}: match selects no route of any connector")
    for dim in key:
        kind, _, value = dim.partition(":")
        if kind in ("param", "query", "field"):
            attr = {"param": "params", "query": "query", "field": "fields"}[kind]
            if not any(value in getattr(r, attr) for r in matched):
                problems.append(f"{where}: key {dim}: none of the routes it matches declares that value "
                                f"(every request would share one {counted_in})")
        elif dim == "workflow" and not any(r.action in workflow_actions for r in matched):
            problems.append(f"{where}: key workflow: none of the actions it matches is a workflow step")
    return matched


def build_table(config: Sequence[ConfigRateLimit], manifests: Iterable[Any],
                workflow_actions: frozenset[str] = frozenset()) -> LimitTable:
    """Compile and check every declaration (LimitConfigError lists every problem)."""
    manifests = list(manifests)
    routes = _routes(manifests)
    problems: list[str] = []

    # route limits: one Limit per name, shared by every route that declares it
    named: dict[str, tuple[RateLimitSpec, str]] = {}
    members: dict[str, list[str]] = {}
    for r in routes:
        for s in r.limits:
            where = f"connector {r.connector}, route {r.route}"
            seen = named.get(s.name)
            if seen is None:
                named[s.name] = (s, where)
            elif not seen[0].same_as(s) and seen[1] != where:
                problems.append(f"rate limit {s.name!r} is declared differently on {seen[1]} and on {where}: "
                                "routes that share a limit name share its counters, so they need one declaration")
            ids = members.setdefault(s.name, [])
            if f"{r.connector} {r.route}" not in ids:
                ids.append(f"{r.connector} {r.route}")
    route_limits = {n: _limit(s, "connector", w, routes=tuple(members[n])) for n, (s, w) in named.items()}

    config_limits = []
    for i, c in enumerate(config):
        where = f"rate_limits[{i}] ({c.name})"
        if c.name in route_limits:
            problems.append(f"{where}: the name is also a route limit's ({route_limits[c.name].where}); "
                            "limit names are unique")
        m = c.match
        check_match(where, m, c.key, manifests, routes, frozenset(workflow_actions), problems, "counter")
        config_limits.append(_limit(c, "config", where, match=m))

    if problems:
        raise LimitConfigError(problems)
    by_route: dict[tuple[str, str], tuple[Limit, ...]] = {}
    for r in routes:
        lims = tuple(route_limits[s.name] for s in r.limits)
        if lims:
            by_route[(r.connector, r.route)] = lims
    return LimitTable(
        limits=tuple(config_limits) + tuple(route_limits.values()),
        workflow_actions=frozenset(workflow_actions),
        _config=tuple(config_limits),
        _by_route=by_route,
        usage_actions=_usage(routes, config, frozenset(workflow_actions)),
    )
