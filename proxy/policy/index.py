"""Partition a policy set by action, and find which context attributes each part reads.

Both are pure optimisations that cannot change a decision:

- Cedar never evaluates a policy whose scope does not match the request, so
  evaluating only the policies whose action constraint can match the request's
  action gives the same answer as evaluating all of them (policies with no action
  constraint, or one we cannot resolve statically, go into every part).
- A policy can only read the context attributes it names (`context.x`,
  `context has x`); a policy that uses `context` as a whole value makes its part
  receive the full context. Sending Cedar fewer attributes matters because
  building a request's context dominates the fixed cost of a Cedar call.

Policy ids inside each part are the policies' `@id`s, so Cedar's reasons and
errors name them directly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import cedarpy

ALL_CONTEXT = None  # marker: this part needs the whole context


@dataclass(frozen=True)
class PolicyPart:
    policy_set: Any  # cedarpy.PolicySet over the @id-keyed policies
    policy_ids: frozenset[str]
    context_keys: frozenset[str] | None  # None: pass the whole context


def context_keys_used(node: Any) -> set[str] | None:
    """Top-level context attributes an EST condition reads; None if it uses `context` whole."""
    keys: set[str] = set()
    whole = False

    def walk(n: Any) -> None:
        nonlocal whole
        if whole:
            return
        if isinstance(n, dict):
            for op in (".", "has"):
                inner = n.get(op)
                if isinstance(inner, dict) and inner.get("left") == {"Var": "context"} and isinstance(inner.get("attr"), str):
                    keys.add(inner["attr"])
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
    return None if whole else keys


def schema_has_action_groups(schema_text: str, is_json: bool) -> bool:
    """Does the schema put actions into groups? Then `action in X` is resolved at runtime only."""
    if is_json:
        return '"memberOf"' in schema_text
    stripped = re.sub(r"//[^\n]*", "", schema_text)
    return re.search(r"\baction\b[^;{]*\bin\b", stripped) is not None


def _actions_of(constraint: dict, groups: bool) -> set[str] | None:
    """The action ids a scope constraint can match, or None for 'any / unknown statically'."""
    op = constraint.get("op")
    if op == "==":
        return {constraint["entity"]["id"]}
    if op == "in" and not groups:
        ents = constraint.get("entities") or ([constraint["entity"]] if "entity" in constraint else [])
        return {e["id"] for e in ents}
    return None


def build_parts(
    policies: dict[str, dict], schema_text: str, schema_is_json: bool
) -> tuple[dict[str, PolicyPart], PolicyPart]:
    """Parts keyed by action id, plus the part for actions no policy names."""
    groups = schema_has_action_groups(schema_text, schema_is_json)
    wildcard: list[str] = []
    by_action: dict[str, list[str]] = {}
    ctx_needs: dict[str, set[str] | None] = {}
    for pid, est in policies.items():
        ctx_needs[pid] = context_keys_used(est.get("conditions") or [])
        actions = _actions_of(est.get("action") or {"op": "All"}, groups)
        if actions is None:
            wildcard.append(pid)
        else:
            for a in actions:
                by_action.setdefault(a, []).append(pid)

    def make(ids: list[str]) -> PolicyPart:
        keys: set[str] | None = set()
        for pid in ids:
            need = ctx_needs[pid]
            if need is None:
                keys = None
                break
            keys |= need
        doc = {"staticPolicies": {pid: policies[pid] for pid in ids}, "templates": {}, "templateLinks": []}
        return PolicyPart(
            policy_set=cedarpy.PolicySet.from_json_str(json.dumps(doc)),
            policy_ids=frozenset(ids),
            context_keys=None if keys is None else frozenset(keys),
        )

    parts = {action: make(ids + wildcard) for action, ids in by_action.items()}
    return parts, make(wildcard)
