"""The Cedar schema for connector actions and resource types, generated from the manifests.

A connector already says which actions and resource types it produces, which
attributes a resource carries and which typed values reach the context; writing
that again by hand in the schema is how the two drift apart. The policy loader
appends this text to the hand-written schema (which keeps the shared types:
`Time`, `Headers`, `RequestContext`, `Agent`, `AgentGroup`, `HttpHost`) and
validates the policies against both.

A declaration in the hand-written schema wins: an entity type or action declared
there is not generated, so a team can refine a generated type (e.g. type a
`context.body`) without turning generation off. `proctor connector schema`
prints the generated text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .manifest import BodyFieldSpec, ConnectorManifest, ManifestError, RouteSpec, ValueSpec

_CEDAR_TYPES = {"string": "String", "long": "Long", "decimal": "decimal", "bool": "Bool"}

# Context keys the pipeline always sets (see proxy/core/context.py), as in RequestContext.
BASE_CONTEXT_FIELDS = (
    ("method", "String"),
    ("path", "String"),
    ("query", "String"),
    ("host", "String"),
    ("port", "Long"),
    ("headers", "Headers"),
    ("connector", "String"),
    ("risk", "String"),
    ("time", "Time"),
    ("source_ip", "ipaddr"),
    ("mode", "String"),
)
# Optional keys some requests carry; declared in every generated context type
# whose schema declares the named common type (the bundled one does).
OPTIONAL_CONTEXT_FIELDS: tuple[tuple[str, str], ...] = (("approval", "Approval"), ("payload", "Payload"))
# context.claim on claim-bearing routes (proxy/coordination/claims.py builds it; docs/coordination.md).
CLAIM_CONTEXT_TYPE = ("{ held: Bool, holder: String, holder_groups: Set<String>, mine: Bool, mode: String, "
                      "since: Long, expires_at: Long, write: Bool, conflict: Bool }")

# context.workflow on workflow-governed actions (proxy/workflows/stage.py builds it; docs/workflows.md).
WORKFLOW_CONTEXT_TYPE = ("{ name: String, instance: String, step: String, known: Bool, completed: Set<String>, "
                         "ready: Bool, missing: Set<String>, next: Set<String>, started_at: Long, attempts: Long, "
                         "failures: Long, escalated: Bool, gave_up: Bool, rerouted_to: String, rerouted_away: Bool, "
                         "closed: Bool }")

# context.usage on rate-limited actions (proxy/limits/stage.py builds it; docs/limits.md).
USAGE_CONTEXT_TYPE = ("{ name: String, limit: Long, period: Long, remaining: Long, reset_after: Long, throttled: Bool, "
                      "shadow: Bool, known: Bool }")

# context.budget on budgeted actions (proxy/limits/budget_stage.py builds it; docs/limits.md, "Budgets").
BUDGET_CONTEXT_TYPE = ("{ name: String, currency: String, limit: decimal, spent: decimal, reserved: decimal, "
                       "remaining: decimal, estimated_cost: decimal, used_percent: Long, exceeded: Bool, "
                       "soft_reached: Bool, on_exceed: String, shadow: Bool, known: Bool, window_end: Long }")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _value_type(spec: ValueSpec) -> str:
    base = _CEDAR_TYPES[spec.type]
    if isinstance(spec, BodyFieldSpec) and "[*]" in spec.path and spec.aggregate is None:
        return f"Set<{base}>"
    return base


def _static_type(value: Any) -> str | None:
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, int):
        return "Long"
    if isinstance(value, float):
        return "decimal"
    if isinstance(value, str):
        return "String"
    if isinstance(value, list):
        inner = {_static_type(v) for v in value}
        if len(inner) == 1 and None not in inner:
            return f"Set<{inner.pop()}>"
    return None  # records and mixed sets: not generated (declare the type by hand)


@dataclass
class _Values:
    """One typed-value group (params, query_params or fields) of one route."""

    types: dict[str, str] = field(default_factory=dict)
    always: set[str] = field(default_factory=set)  # keys present whenever the route matches


@dataclass
class _Shape:
    """What one route (or JSON-RPC operation) puts in the context for its action."""

    groups: dict[str, _Values]
    rpc: bool = False
    claim: bool = False  # the route claims its resource: context.claim is always set


@dataclass
class _ActionDecl:
    resource_types: list[str] = field(default_factory=list)
    shapes: list[_Shape] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def _route_groups(route: RouteSpec, body: dict[str, BodyFieldSpec]) -> dict[str, _Values]:
    params = _Values()
    for name in _PLACEHOLDER.findall(route.path):
        spec = route.params.get(name)
        params.types[name] = _value_type(spec) if spec else "String"
        params.always.add(name)
    query = _Values()
    for name, spec in route.query.items():
        query.types[name] = _value_type(spec)
        if spec.required:
            query.always.add(name)
    fields = _Values()
    for name, spec in body.items():
        fields.types[name] = _value_type(spec)
        if spec.required or spec.aggregate == "count":
            fields.always.add(name)
    return {"params": params, "query_params": query, "fields": fields}


class _Conflict(Exception):
    pass


def _merge_attr(attrs: dict[str, str], name: str, cedar_type: str, where: str, origins: dict[str, str]) -> None:
    have = attrs.get(name)
    if have is not None and have != cedar_type:
        raise _Conflict(f"attribute {name!r} is {have} in {origins[name]} but {cedar_type} in {where}")
    attrs[name] = cedar_type
    origins.setdefault(name, where)


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _attr_name(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) else _quote(name)


def _record(values: dict[str, str], required: set[str]) -> str:
    parts = [f"{_attr_name(k)}{'' if k in required else '?'}: {t}" for k, t in sorted(values.items())]
    return "{ " + ", ".join(parts) + " }"


def _context_type_name(action: str, taken: set[str]) -> str:
    words = re.split(r"[^A-Za-z0-9]+", action)
    base = "".join(w[:1].upper() + w[1:] for w in words if w) + "Context"
    if not base[0].isalpha():
        base = "C" + base
    name, n = base, 2
    while name in taken:
        name, n = f"{base}{n}", n + 1
    taken.add(name)
    return name


def generate_schema(
    manifests: list[ConnectorManifest],
    declared: "Declared | None" = None,
    tracked_types: set[str] | None = None,
    workflow_actions: "frozenset[str] | set[str]" = frozenset(),
    usage_actions: "Mapping[str, bool] | None" = None,
    budget_actions: "Mapping[str, bool] | None" = None,
) -> str:
    """Cedar schema text declaring every connector action and resource type not already `declared`.

    `tracked_types` are resource types whose creator Proctor records
    (`track_creator`); they gain an optional `created_by: Agent` attribute.
    `usage_actions` are the rate-limited actions (proxy/limits/table.py): their context
    declares `usage` (required when every request of the action is limited).
    """
    usage_actions = usage_actions or {}
    budget_actions = budget_actions or {}
    declared = declared or Declared()
    tracked_types = set(tracked_types or ())
    for m in manifests:
        for r in m.routes:
            if r.track_creator is not None and r.resource is not None:
                tracked_types.add(r.resource.type)
    entities: dict[str, dict[str, str]] = {}
    origins: dict[str, dict[str, str]] = {}
    actions: dict[str, _ActionDecl] = {}

    def add(action: str, rtype: str, attrs: dict[str, Any], resource_names: list[str],
            groups: dict[str, _Values], rpc: bool, where: str, claim: bool = False) -> None:
        ent = entities.setdefault(rtype, {})
        org = origins.setdefault(rtype, {})
        try:
            for k, v in attrs.items():
                t = _static_type(v)
                if t is not None:
                    _merge_attr(ent, k, t, where, org)
            for name in resource_names:
                for g in groups.values():
                    if name in g.types:
                        _merge_attr(ent, name, g.types[name], where, org)
                        break
        except _Conflict as e:
            raise ManifestError(f"resource type {rtype}: {e}; one resource type needs one type per attribute") from None
        decl = actions.setdefault(action, _ActionDecl())
        if rtype not in decl.resource_types:
            decl.resource_types.append(rtype)
        decl.shapes.append(_Shape(groups, rpc, claim))
        decl.sources.append(where)

    for m in manifests:
        for r in m.routes:
            where = f"{m.name} {r.method} {r.path}"
            if r.jsonrpc is not None:
                for op in r.jsonrpc:
                    groups = _route_groups(r, op.body)
                    add(op.action, op.resource.type, op.attributes, op.resource_attributes, groups, True,
                        f"{where} ({op.method}{' ' + op.tool if op.tool else ''})")
            else:
                assert r.resource is not None
                groups = _route_groups(r, r.body)
                add(r.action, r.resource.type, r.attributes, r.resource_attributes, groups, False, where,
                    r.claim is not None)
                if r.lookup is not None:
                    try:
                        for name, spec in r.lookup.attributes.items():
                            _merge_attr(entities[r.resource.type], name, _value_type(spec), where + " lookup",
                                        origins[r.resource.type])
                    except _Conflict as e:
                        raise ManifestError(f"resource type {r.resource.type}: {e}") from None

    namespaced = sorted(t for t in entities if "::" in t and t not in declared.entities)
    if namespaced:
        raise ManifestError(
            f"resource types {namespaced} are namespaced: declare them in schema.cedarschema (inside their "
            "namespace) — generated declarations are top-level only"
        )
    lines = ["// Generated from the connector manifests by Proctor; do not edit.",
             "// Declare a type or action in schema.cedarschema to override it."]
    for rtype in sorted(entities):
        if rtype in declared.entities:
            continue
        attrs = dict(entities[rtype])
        if rtype in tracked_types:
            attrs.setdefault("created_by", "Agent")
        body = " " + _record(attrs, set()) if attrs else ""
        lines.append(f"entity {rtype}{body};")

    taken = set(declared.types)
    for action in sorted(actions):
        if action in declared.actions:
            continue
        decl = actions[action]
        ctx_fields: list[str] = [f"{k}: {t}" for k, t in BASE_CONTEXT_FIELDS]
        ctx_fields += [f"{k}?: {t}" for k, t in OPTIONAL_CONTEXT_FIELDS if t in declared.types]
        extra = False
        for group in ("params", "query_params", "fields"):
            types: dict[str, str] = {}
            for shape in decl.shapes:
                for k, t in shape.groups[group].types.items():
                    if types.get(k, t) != t:
                        raise ManifestError(
                            f"action {action}: context.{group}.{k} is declared with two types "
                            f"({types[k]} and {t}) by its routes {decl.sources}"
                        )
                    types[k] = t
            if not types:
                continue
            extra = True
            always = set.intersection(*(s.groups[group].always for s in decl.shapes))
            everywhere = set.intersection(*(set(s.groups[group].types) for s in decl.shapes))
            always &= everywhere
            opt = "" if always else "?"
            ctx_fields.append(f"{group}{opt}: {_record(types, always)}")
        if any(s.rpc for s in decl.shapes):
            extra = True
            opt = "" if all(s.rpc for s in decl.shapes) else "?"
            ctx_fields.append(f"rpc{opt}: {{ method: String, tool?: String }}")
        if any(s.claim for s in decl.shapes):
            extra = True
            opt = "" if all(s.claim for s in decl.shapes) else "?"
            ctx_fields.append(f"claim{opt}: {CLAIM_CONTEXT_TYPE}")
        if action in workflow_actions:
            extra = True
            ctx_fields.append(f"workflow: {WORKFLOW_CONTEXT_TYPE}")
        if action in usage_actions:
            extra = True
            ctx_fields.append(f"usage{'' if usage_actions[action] else '?'}: {USAGE_CONTEXT_TYPE}")
        if action in budget_actions:
            extra = True
            ctx_fields.append(f"budget{'' if budget_actions[action] else '?'}: {BUDGET_CONTEXT_TYPE}")
        if extra:
            ctx_name = _context_type_name(action, taken)
            lines.append(f"type {ctx_name} = {{ {', '.join(ctx_fields)} }};")
        else:
            ctx_name = "RequestContext"
        resources = decl.resource_types[0] if len(decl.resource_types) == 1 else "[" + ", ".join(decl.resource_types) + "]"
        lines.append(
            f"action {_quote(action)} appliesTo {{ principal: Agent, resource: {resources}, context: {ctx_name} }};"
        )
    return "\n".join(lines) + "\n"


# ---- what the hand-written schema already declares ----------------------------------


@dataclass
class Declared:
    entities: set[str] = field(default_factory=set)
    actions: set[str] = field(default_factory=set)
    types: set[str] = field(default_factory=set)


def _strip_comments(text: str) -> str:
    """The schema text with `//` comments blanked (string literals kept intact)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        else:
            out.append(c)
            i += 1
    return "".join(out)


_NAME = r'(?:"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*)'
_ENTITY_DECL = re.compile(r"\bentity\s+(" + _NAME + r"(?:\s*,\s*" + _NAME + r")*)")
_ACTION_DECL = re.compile(r"\baction\s+(" + _NAME + r"(?:\s*,\s*" + _NAME + r")*)")
_TYPE_DECL = re.compile(r"\btype\s+([A-Za-z_][A-Za-z0-9_]*)\s*=")


def _names(group: str) -> set[str]:
    out = set()
    for raw in re.findall(_NAME, group):
        out.add(raw[1:-1].replace('\\"', '"').replace("\\\\", "\\") if raw.startswith('"') else raw)
    return out


def declared_in(schema_text: str) -> Declared:
    """Top-level entity types, actions and common types a human-format schema declares."""
    text = _strip_comments(schema_text)
    d = Declared()
    for m in _ENTITY_DECL.finditer(text):
        d.entities |= _names(m.group(1))
    for m in _ACTION_DECL.finditer(text):
        d.actions |= _names(m.group(1))
    d.types = set(_TYPE_DECL.findall(text))
    return d
