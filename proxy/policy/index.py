"""Partition a policy set by action, and find which context attributes each part reads.

Both are pure optimisations that cannot change a decision:

- Cedar never evaluates a policy whose scope does not match the request, so
  evaluating only the policies whose action scope can match the request's
  action gives the same answer as evaluating all of them. Which `action in X`
  scopes match an action is not guessed from the schema's text: Cedar itself
  answers it, once per action, by evaluating scope-only copies of those
  policies against the entity store built with the schema (which holds the
  schema's action hierarchy). Policies with no action constraint go into
  every part.
- A policy can only read the context attributes it names (`context.x`,
  `context has x`); a policy that uses `context` as a whole value makes its part
  receive the full context. Sending Cedar fewer attributes matters because
  building a request's context dominates the fixed cost of a Cedar call.

Policy ids inside each part are the policies' `@id`s, so Cedar's reasons and
errors name them directly.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import cedarpy

MAX_CACHED_PARTS = 4096
_ACTION_TYPE = "Action"
_PROBE_UID = {"type": "__proctor_probe", "id": "probe"}


@dataclass(frozen=True)
class PolicyPart:
    policy_set: Any  # cedarpy.PolicySet over the @id-keyed policies
    policy_ids: frozenset[str]
    context_need: "_Need | None"  # None: pass the whole context

    def context_for(self, context: dict) -> dict:
        return context if self.context_need is None else prune(context, self.context_need)


class _Need(dict):
    """A tree of context paths a policy reads: {attr: _Need} ; an empty _Need with whole=True keeps everything below."""

    whole: bool = False


def _access_path(n: Any) -> list[str] | None:
    """For `context.a.b` (EST '.' chains, `["x"]` included) the path [a, b]; None if not rooted at context."""
    path: list[str] = []
    while isinstance(n, dict) and isinstance(n.get("."), dict):
        inner = n["."]
        if not isinstance(inner.get("attr"), str):
            return None
        path.append(inner["attr"])
        n = inner.get("left")
    if n == {"Var": "context"}:
        return list(reversed(path))
    return None


def context_paths_used(node: Any) -> _Need | None:
    """The context paths an EST condition reads, as a tree; None if it uses `context` whole."""
    need = _Need()
    whole = False

    def add(path: list[str], keep_subtree: bool) -> None:
        cur = need
        for attr in path:
            if cur.whole:
                return
            cur = cur.setdefault(attr, _Need())
        if keep_subtree:
            cur.whole = True
            cur.clear()

    def walk(n: Any) -> None:
        nonlocal whole
        if whole:
            return
        if isinstance(n, dict):
            path = _access_path(n)
            if path is not None and path:
                add(path, keep_subtree=True)  # the value at the end of the chain is used as a whole
                return
            has = n.get("has")
            if isinstance(has, dict) and isinstance(has.get("attr"), str):
                base = [] if has.get("left") == {"Var": "context"} else _access_path(has.get("left"))
                if base is not None:
                    add([*base, has["attr"]], keep_subtree=False)  # only presence is read
                    return
            if n.get("Var") == "context":
                whole = True
                return
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(node)
    return None if whole else need


def context_keys_used(node: Any) -> set[str] | None:
    """Top-level context attributes an EST condition reads; None if it uses `context` whole."""
    need = context_paths_used(node)
    return None if need is None else set(need)


def merge_needs(a: _Need, b: _Need) -> _Need:
    if a.whole or b.whole:
        out = _Need()
        out.whole = True
        return out
    out = _Need(a)
    for k, v in b.items():
        out[k] = merge_needs(out[k], v) if k in out else v
    return out


def prune(value: Any, need: _Need) -> Any:
    """`value` restricted to the paths in `need` (records only; anything else is kept whole)."""
    if need.whole or not isinstance(value, dict) or "__extn" in value:
        return value
    out = {}
    for k, sub in need.items():
        if k in value:
            # an empty need is a `has` check or a whole-value read: keep the value as it is
            out[k] = prune(value[k], sub) if sub else value[k]
    return out


def _policy_set(policies: dict[str, dict]) -> Any:
    return cedarpy.PolicySet.from_json_str(
        json.dumps({"staticPolicies": policies, "templates": {}, "templateLinks": []}), release_gil=True
    )


class PolicyIndex:
    """Per-action parts of one immutable policy bundle, built on first use and cached."""

    def __init__(self, policies: dict[str, dict], entities: Any) -> None:
        self._policies = policies
        self._entities = entities
        self._ctx_needs = {pid: context_paths_used(est.get("conditions") or []) for pid, est in policies.items()}
        self._by_action: dict[str, list[str]] = {}  # `action == Action::"a"`
        self._wildcard: list[str] = []  # no action constraint (or one we do not index)
        probes: dict[str, dict] = {}  # `action in ...`: resolved by Cedar per action
        for pid, est in policies.items():
            scope = est.get("action") or {"op": "All"}
            op = scope.get("op")
            if op == "==" and scope.get("entity", {}).get("type") == _ACTION_TYPE:
                self._by_action.setdefault(scope["entity"]["id"], []).append(pid)
            elif op == "==":
                pass  # a namespaced action type never equals a request's `Action::"..."`
            elif op == "in":
                probes[pid] = {
                    "effect": "permit",
                    "principal": {"op": "All"},
                    "action": scope,
                    "resource": {"op": "All"},
                    "conditions": [],
                }
            else:
                self._wildcard.append(pid)
        self._probe_set = _policy_set(probes) if probes else None
        self._parts: OrderedDict[str, PolicyPart] = OrderedDict()
        # Warm the actions the policies name, so the first requests pay nothing.
        named = set(self._by_action)
        for est in probes.values():
            scope = est["action"]
            for ent in scope.get("entities") or [scope.get("entity") or {}]:
                if ent.get("type") == _ACTION_TYPE:
                    named.add(ent["id"])
        for action in sorted(named):
            self.part_for(action)

    def _matching_in_policies(self, action: str) -> list[str]:
        if self._probe_set is None:
            return []
        result = cedarpy.is_authorized(
            {"principal": _PROBE_UID, "action": {"type": _ACTION_TYPE, "id": action}, "resource": _PROBE_UID, "context": {}},
            self._probe_set,
            self._entities,
        )
        if result.diagnostics.errors:  # cannot happen for scope-only policies; never guess
            return list(self._probe_set_ids())
        return list(result.diagnostics.reasons)

    def _probe_set_ids(self) -> list[str]:
        return [pid for pid, est in self._policies.items() if (est.get("action") or {}).get("op") == "in"]

    def part_for(self, action: str) -> PolicyPart:
        part = self._parts.get(action)
        if part is not None:
            return part
        ids = self._by_action.get(action, []) + self._matching_in_policies(action) + self._wildcard
        part = self._make(ids)
        self._parts[action] = part
        if len(self._parts) > MAX_CACHED_PARTS:
            self._parts.popitem(last=False)
        return part

    def _make(self, ids: list[str]) -> PolicyPart:
        need: _Need | None = _Need()
        for pid in ids:
            own = self._ctx_needs[pid]
            if own is None:
                need = None
                break
            need = merge_needs(need, own)
        return PolicyPart(
            policy_set=_policy_set({pid: self._policies[pid] for pid in ids}),
            policy_ids=frozenset(ids),
            context_need=need,
        )

    @property
    def cached_actions(self) -> list[str]:
        return list(self._parts)
