"""`proctor policy suggest`: least-privilege Cedar permits learned from recorded traffic.

The input is the decision record (docs/decision-record.md): every decision line keeps
the Cedar principal, resource and context it was made on (`cedar`). Only traffic
that was forwarded teaches anything:

- a decision `allow` that reached the upstream (no refusal after the policy: a rate
  limit, a budget, a duplicate refused after an allow teaches nothing);
- a monitored request (monitor mode: `monitor: true` on the line, `decision` the
  would-be verdict) that reached the upstream.

Refused requests, requests held and not released, Proctor's own 5xx answers,
Cedar evaluation errors and lines without policy inputs are skipped and counted.

What is suggested: one `permit` per principal (an agent group, or an agent that is
in none), action and resource type seen, with bounds on the typed values the
request carried (connector fields and query parameters, resource attributes):
a numeric value at most the largest seen (and not negative when none was), a
string or Bool with few distinct values one of those values. A bound is only
written for a value the schema declares with that type (checked with Cedar's
validator, below), guarded by `has`, and never for identifiers (path parameters,
values equal to the resource id, id-shaped values). Generic egress (`http.request`,
resource `HttpHost::"<host>"`) is always granted to the hosts seen only, whatever the
counts and options: the host is what is granted, and the agent chose it; so is a
catch-all MCP `tools/call` (no `tool:`) to the tools seen (its resource is the tool the
agent named). Only permits: forbid policies and approval holds of the active set keep applying on top.

The suggestion is refused (exit 1) unless it validates against the schema and a
replay of the same traffic proves it: every request it learned from is allowed by
the suggested permits alone, and with the active set's forbids added an allowed
request stays allowed (`prove`).

Everything in a record is text an agent (or whoever wrote the file) chose: ids,
group names, values. It reaches Cedar source only as escaped string literals
(`cedar_string`) and comments only as JSON-escaped text on one line (`comment_text`);
the formatted result is parsed back and must hold exactly the permits meant.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import cedarpy

from ..record.model import DecisionRecord, RecordError, parse_record
from .engine import PolicyBundle, PolicyLoadError, PolicySource, PolicyStore, load_bundle
from .formatting import format_text
from .replay import Unreadable, evaluate, record_time

# A string (or Bool) value is bounded to the values seen when there are at most this many
# distinct ones and each was seen twice on average (fewer observations: free text, not an enum).
ENUM_MAX = 5
ENUM_VALUE_MAX_LEN = 64
AGENTS_SHOWN = 10
SLUG_MAX = 48  # a name longer than this is cut in an @id (and a digest of all of it added)
DECIMAL_LIMIT = Decimal("922337203685477.5807")  # Cedar decimal: i64 with 4 fractional digits
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1

# Context groups a connector fills with declared typed values (docs/connectors.md). Path
# parameters (`params`) are left out on purpose: they name the resource (identifiers).
BOUNDED_CONTEXT_GROUPS = ("fields", "query_params")
# Actions whose resource is what is granted (generic egress: the resource is the host itself,
# HttpHost::"<host>"): their permits are ALWAYS bounded to the resources seen (whatever the
# counts, --no-bounds included), never `resource is HttpHost` alone, which would grant every host.
# The host comes from the agent's request: one request to one host (or many to many) must not
# teach "any host".
# The same for the actions of catch-all MCP operations (`tools/call` without `tool:`, the
# resource id the tool the agent named): the tool is the capability (ManifestHints).
GRANTED_BY_RESOURCE = frozenset({"http.request"})
GRANTED_MAX = 1000  # more resources seen than this: no permit suggested (write it by hand)

REDACTED_MARK = "[redacted]"  # what audit.redact leaves of a configured sensitive value

Kind = Literal["long", "decimal", "string", "bool"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Cedar's reserved words (and the scope variables, to be safe) are never written as bare names
_RESERVED = frozenset({"true", "false", "if", "then", "else", "in", "is", "like", "has", "__cedar",
                       "permit", "forbid", "when", "unless", "principal", "action", "resource", "context"})
_DECIMAL_TEXT = re.compile(r"-?[0-9]+\.[0-9]{1,4}")
_ID_NAME = re.compile(r"(?i)(^id$|_id$|[a-z]Id$|_ids$|^uuid$|^guid$)")
_ID_VALUE = re.compile(
    r"(?i)[a-z]{0,4}[-_]?[0-9]{3,}"  # S-100, PO4500001234, INC0010001, 1000
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # UUID
    r"|[0-9a-f]{12,}"  # hex digests, object ids
)
_COMMENT_SAFE = re.compile(r"[A-Za-z0-9 ._:@/+=,()<>\[\]#$%&!?-]*")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class SuggestInputError(Exception):
    """Unusable input: nothing read, a bad filter, a policy set that does not load (exit 2)."""


class NothingToLearn(SuggestInputError):
    """The records were read, but none of them teaches a permit (exit 2, with the reasons)."""


class SuggestionRejected(Exception):
    """The suggestion does not validate, or its replay does not prove it (exit 1)."""

    def __init__(self, problems: list[str], result: SuggestResult | None = None) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.result = result


# ------------------------------------------------------------------ Cedar text, safely
def cedar_string(value: str) -> str:
    """`value` as a Cedar string literal: every character outside printable ASCII escaped,
    so nothing in it can end the literal, start a comment or a new line."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\0":
            out.append("\\0")
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        else:
            out.append("\\u{%x}" % code)
    out.append('"')
    return "".join(out)


def cedar_safe(value: str) -> bool:
    """Whether `value` can be a Cedar string at all (a lone surrogate cannot)."""
    return not any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)


def comment_text(value: Any, limit: int = 120) -> str:
    """`value` for a `//` comment: plain when harmless, else JSON-escaped (ASCII, one line)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if _COMMENT_SAFE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def entity_type_ok(name: str) -> bool:
    parts = name.split("::")
    return all(_IDENT.fullmatch(p) and p not in _RESERVED for p in parts)


def entity_ref(type_name: str, entity_id: str) -> str:
    return f"{type_name}::{cedar_string(entity_id)}"


def _attr(base: str, name: str) -> str:
    return f"{base}.{name}" if _IDENT.fullmatch(name) and name not in _RESERVED else f"{base}[{cedar_string(name)}]"


def _has(base: str, name: str) -> str:
    return f"{base} has {name}" if _IDENT.fullmatch(name) and name not in _RESERVED else f"{base} has {cedar_string(name)}"


def access(path: tuple[str, ...]) -> str:
    """`("context", "fields", "total")` -> `context.fields.total`."""
    expr = path[0]
    for name in path[1:]:
        expr = _attr(expr, name)
    return expr


def has_chain(path: tuple[str, ...]) -> str:
    """The `has` tests that make reading `path` safe: `context has fields && context.fields has total`."""
    tests, expr = [], path[0]
    for name in path[1:]:
        tests.append(_has(expr, name))
        expr = _attr(expr, name)
    return " && ".join(tests)


def path_text(path: tuple[str, ...]) -> str:
    return ".".join(path)


def decimal_literal(value: Decimal) -> str | None:
    """A Cedar decimal literal for `value` (at least one, at most four fractional digits)."""
    if not value.is_finite() or abs(value) > DECIMAL_LIMIT:
        return None
    text = format(value, "f")
    if "." not in text:
        text += ".0"
    whole, frac = text.split(".")
    frac = frac.rstrip("0") or "0"
    if len(frac) > 4:
        return None
    text = f"{whole}.{frac}"
    return text if _DECIMAL_TEXT.fullmatch(text) else None


# ------------------------------------------------------------------ reading the record
def decision_files(path: Path) -> list[Path]:
    """The decision record and its rotated siblings (decisions.jsonl.1, .2.gz, -20261207.gz)."""
    path = Path(path)
    out = [path] if path.exists() else []
    rotated = re.compile(re.escape(path.name) + r"[.-][0-9][A-Za-z0-9_.-]*")
    if path.parent.is_dir():
        out += sorted(p for p in path.parent.iterdir() if p.is_file() and rotated.fullmatch(p.name))
    return out


def _open(path: Path) -> Any:
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise SuggestInputError(f"cannot read the decision record {path}: {e}") from None


def read_decisions(paths: Iterable[Path], unreadable: Unreadable | None = None) -> Iterator[tuple[DecisionRecord, bool]]:
    """(record, monitored) for every decision line of `paths` (event lines skipped, lines
    that are not records counted in `unreadable`). `monitored`: the line says `monitor: true`."""
    for path in paths:
        f = _open(path)
        with f:
            try:
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        data = json.loads(raw)
                    except ValueError as e:
                        if unreadable is not None:
                            unreadable.add(lineno, f"{path.name}: not JSON: {e}")
                        continue
                    if isinstance(data, dict) and "type" in data:
                        continue  # an event line (approval, suspension, policy, ...)
                    try:
                        rec = parse_record(data)
                    except RecordError as e:
                        if unreadable is not None:
                            unreadable.add(lineno, f"{path.name}: {e}")
                        continue
                    if isinstance(rec, DecisionRecord):
                        yield rec, is_monitored(rec, data)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise SuggestInputError(f"cannot read the decision record {path}: {e}") from None


def is_monitored(rec: DecisionRecord, line: dict[str, Any]) -> bool:
    """Monitor mode: the request would have been refused (denied, held) and was forwarded
    all the same. The line's `monitored` part says so (`forwarded: true`); a line without
    one that says `monitor: true` with a deny or hold counts when it reached the upstream
    (skip_reason checks that). `monitor: true` alone is on every line in a monitored scope,
    allowed ones included."""
    part = getattr(rec, "monitored", None)
    if part is None:
        part = line.get("monitored")
    if isinstance(part, dict):
        return part.get("forwarded") is True
    flag = getattr(rec, "monitor", None)
    if not flag:
        flag = line.get("monitor")
    return flag is True and rec.decision != "allow"


@dataclass(frozen=True)
class Filters:
    since: float | None = None
    until: float | None = None
    agents: frozenset[str] = frozenset()
    connectors: frozenset[str] = frozenset()

    def keep(self, rec: DecisionRecord) -> bool:
        if self.agents and rec.agent not in self.agents:
            return False
        if self.connectors and rec.connector not in self.connectors:
            return False
        if self.since is not None or self.until is not None:
            t = record_time(rec)
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t >= self.until:
                return False
        return True


# why a record teaches nothing (the keys of SuggestResult.skipped)
SKIP_NO_INPUTS = "no policy inputs (refused before policy, or recorded without inputs)"
SKIP_REFUSED = "denied or held by policy, not forwarded"
SKIP_REFUSED_LATER = "refused after the policy allowed it (rate limit, budget, duplicate, ...), not forwarded"
SKIP_PROCTOR_5XX = "answered 5xx by Proctor (fail-closed, upstream unreachable), not forwarded"
SKIP_NOT_FORWARDED = "not forwarded"
SKIP_ERRORS = "Cedar evaluation errors"
SKIP_UNUSABLE = "principal or resource unusable in Cedar source"
SKIP_NOT_IN_SCHEMA = "action or resource type not in the current schema"
SKIP_GRANTED_UNBOUNDED = (f"more than {GRANTED_MAX} hosts (generic egress) or tools (a catch-all tools/call) "
                          "seen for one permit: it must name them; write it by hand")


def skip_reason(rec: DecisionRecord, monitored: bool) -> str | None:
    """None when `rec` teaches a permit (forwarded traffic with policy inputs), else why not."""
    cedar = rec.cedar
    if cedar is None or not rec.action or rec.policy_decision is None:
        return SKIP_NO_INPUTS
    if rec.errors:
        return SKIP_ERRORS
    if rec.status is not None and rec.status >= 500 and rec.upstream_status is None:
        return SKIP_PROCTOR_5XX
    if not monitored:
        if rec.decision != "allow":
            return SKIP_REFUSED
        if rec.refusal is not None:
            return SKIP_REFUSED_LATER
    if rec.upstream_status is None:
        return SKIP_NOT_FORWARDED
    return None


# ------------------------------------------------------------------ observed values
def _value_kind(value: Any) -> tuple[Kind, Any] | None:
    """(kind, comparable value) of a recorded Cedar JSON scalar; None for anything else."""
    if isinstance(value, bool):
        return "bool", value
    if isinstance(value, int):
        return ("long", value) if LONG_MIN <= value <= LONG_MAX else None
    if isinstance(value, str):
        return "string", value
    if isinstance(value, dict) and set(value) == {"__extn"}:
        ext = value["__extn"]
        if (isinstance(ext, dict) and ext.get("fn") == "decimal" and isinstance(ext.get("arg"), str)
                and _DECIMAL_TEXT.fullmatch(ext["arg"])):
            try:
                return "decimal", Decimal(ext["arg"])
            except InvalidOperation:
                return None
    return None


@dataclass
class FieldStats:
    """What was seen of one value (a context field, a resource attribute) over some requests."""

    path: tuple[str, ...]
    kinds: set[str] = field(default_factory=set)
    present: int = 0
    lo: Any = None
    hi: Any = None
    values: set[Any] | None = field(default_factory=set)  # None: more than ENUM_MAX distinct
    idlike: bool = False
    unusable: str | None = None  # why the values cannot be bounded (redacted, a set, ...)

    def add(self, value: Any, ids: set[str]) -> None:
        self.present += 1
        kv = _value_kind(value)
        if kv is None:
            what = ("a set" if isinstance(value, list) else "an entity" if isinstance(value, dict) and "__entity" in value
                    else "not a plain value")
            self.unusable = self.unusable or what
            return
        kind, v = kv
        self.kinds.add(kind)
        if kind in ("long", "decimal"):
            self.lo = v if self.lo is None or v < self.lo else self.lo
            self.hi = v if self.hi is None or v > self.hi else self.hi
            return
        if kind == "string":
            if REDACTED_MARK in v:
                self.unusable = self.unusable or "redacted in the record"
            elif not cedar_safe(v):
                self.unusable = self.unusable or "not a Cedar string"
            if v in ids or _ID_VALUE.fullmatch(v) or len(v) > ENUM_VALUE_MAX_LEN:
                self.idlike = True
        if self.values is not None:
            self.values.add(v)
            if len(self.values) > ENUM_MAX:
                self.values = None

    def merge(self, other: FieldStats) -> None:
        self.kinds |= other.kinds
        self.present += other.present
        for v in (other.lo, other.hi):
            if v is not None:
                self.lo = v if self.lo is None or v < self.lo else self.lo
                self.hi = v if self.hi is None or v > self.hi else self.hi
        if self.values is None or other.values is None:
            self.values = None
        else:
            self.values |= other.values
            if len(self.values) > ENUM_MAX:
                self.values = None
        self.idlike |= other.idlike
        self.unusable = self.unusable or other.unusable


@dataclass
class Observed:
    """The requests of one agent (or one permit) for one action and resource type."""

    count: int = 0
    agents: set[str] = field(default_factory=set)
    verdicts: Counter[str] = field(default_factory=Counter)  # allow | monitored:deny | monitored:hold | ...
    first: tuple[float, str] | None = None
    last: tuple[float, str] | None = None
    fields: dict[tuple[str, ...], FieldStats] = field(default_factory=dict)
    # monitored requests a forbid policy (its @id) denied or held: they stay so with the permit
    forbidden_by: Counter[str] = field(default_factory=Counter)
    # monitored requests denied because no permit covered them (default deny): the permit
    # learned from them ALLOWS them, so it is flagged for review (what an agent did while
    # nothing was enforced is not evidence that it should be allowed)
    denied_unpermitted: int = 0
    # the resource ids seen, for actions whose resource is what is granted (GRANTED_BY_RESOURCE)
    resources: set[str] = field(default_factory=set)

    def merge(self, other: Observed) -> None:
        self.count += other.count
        self.agents |= other.agents
        self.verdicts.update(other.verdicts)
        self.forbidden_by.update(other.forbidden_by)
        self.denied_unpermitted += other.denied_unpermitted
        self.resources |= other.resources
        for t in (other.first, other.last):
            if t is not None:
                self.first = t if self.first is None or t[0] < self.first[0] else self.first
                self.last = t if self.last is None or t[0] > self.last[0] else self.last
        for path, fs in other.fields.items():
            mine = self.fields.get(path)
            if mine is None:
                mine = self.fields[path] = FieldStats(path, values=set())
            mine.merge(fs)


@dataclass(frozen=True)
class ManifestHints:
    """Per action, resource attributes not worth bounding: static ones (the same on every
    request of a route) and copies of request values (bounded in the context already)."""

    skip_resource_attrs: dict[str, frozenset[str]] = field(default_factory=dict)
    # actions whose resource id is the capability the agent named (GRANTED_BY_RESOURCE too)
    granted: frozenset[str] = GRANTED_BY_RESOURCE

    @classmethod
    def of(cls, manifests: Iterable[Any]) -> ManifestHints:
        skip: dict[str, set[str]] = {}
        granted = set(GRANTED_BY_RESOURCE)
        for m in manifests:
            for r in m.routes:
                ops = r.jsonrpc if r.jsonrpc is not None else [r]
                for op in ops:
                    names = skip.setdefault(op.action, set())
                    names |= set(op.attributes) | set(op.resource_attributes)
                for op in r.jsonrpc or []:
                    # a catch-all tools/call: the resource is whichever tool the agent named
                    if op.method == "tools/call" and op.tool is None and (
                            op.resource.id is None or "{tool}" in op.resource.id):
                        granted.add(op.action)
        return cls({k: frozenset(v) for k, v in skip.items()}, frozenset(granted))


def _observe(obs: Observed, rec: DecisionRecord, monitored: bool, hints: ManifestHints, bounds: bool) -> None:
    cedar = rec.cedar
    assert cedar is not None and rec.action
    obs.count += 1
    t = (record_time(rec), rec.time)
    obs.first = t if obs.first is None or t[0] < obs.first[0] else obs.first
    obs.last = t if obs.last is None or t[0] > obs.last[0] else obs.last
    obs.verdicts[f"monitored:{rec.decision}" if monitored else rec.decision] += 1
    if monitored and rec.decision != "allow":
        forbids = [r for r in rec.reasons if isinstance(r, str)]  # (a deny's reasons are forbids)
        obs.forbidden_by.update(forbids)
        if not forbids:  # denied by default: no permit covered it, and the one learned here would
            obs.denied_unpermitted += 1
    context, resource = cedar.get("context") or {}, cedar.get("resource") or {}
    if rec.action in hints.granted:  # (build checked the id is usable)
        obs.resources.add(resource["uid"]["id"])
    if not bounds:
        return
    # identifiers of this request: the resource id and the path parameters
    ids: set[str] = set()
    uid = resource.get("uid") if isinstance(resource, dict) else None
    if isinstance(uid, dict) and isinstance(uid.get("id"), str):
        ids.add(uid["id"])
    params = context.get("params")
    if isinstance(params, dict):
        ids |= {str(v) for v in params.values() if isinstance(v, (str, int)) and not isinstance(v, bool)}

    def see(path: tuple[str, ...], value: Any, ids: set[str]) -> None:
        fs = obs.fields.get(path)
        if fs is None:
            fs = obs.fields[path] = FieldStats(path)
        fs.add(value, ids)

    for group in BOUNDED_CONTEXT_GROUPS:
        values = context.get(group)
        if isinstance(values, dict):
            for name, value in values.items():
                see(("context", group, name), value, ids)
    attrs = resource.get("attrs") if isinstance(resource, dict) else None
    if isinstance(attrs, dict):
        skip = hints.skip_resource_attrs.get(rec.action, frozenset())
        for name, value in attrs.items():
            if name not in skip:
                see(("resource", name), value, ids)


# ------------------------------------------------------------------ the schema, asked
class SchemaOracle:
    """Asks Cedar's validator what the schema declares (cedarpy has no schema reflection).

    - A permit's scope is valid for the action, resource type and principal: validated as is.
    - A value is declared: `if <has chain> then <type error> else true` fails to validate.
      The validator types a `has` test on an attribute the schema does not declare as
      `False` and does not type-check a branch that cannot run, so the deliberate type
      error is only seen when every step of the path is declared.
    - It is declared with the type a bound needs: `<has chain> && <bound>` validates.
    """

    def __init__(self, schema: Any) -> None:
        self.schema = schema
        self._cache: dict[str, list[str]] = {}

    def errors(self, policy: str) -> list[str]:
        got = self._cache.get(policy)
        if got is None:
            try:
                result = cedarpy.validate_policies(policy, self.schema)
                got = [] if result.validation_passed else [str(e.error) for e in result.errors]
            except ValueError as e:  # (a syntax error: never expected, treated as invalid)
                got = [str(e)]
            self._cache[policy] = got
        return got

    def scope_ok(self, scope: str) -> bool:
        return not self.errors(f"permit ({scope});")

    def declares(self, scope: str, path: tuple[str, ...]) -> bool:
        return bool(self.errors(f'permit ({scope}) when {{ if {has_chain(path)} then ("" < 0) else true }};'))

    def accepts(self, scope: str, condition: str) -> bool:
        return not self.errors(f"permit ({scope}) when {{ {condition} }};")


# ------------------------------------------------------------------ the suggestion
@dataclass
class Bound:
    path: tuple[str, ...]
    kind: str
    condition: str
    required: bool  # present in every request seen: required (else bounded when present)
    lo: str | None = None
    hi: str | None = None
    values: list[Any] | None = None
    guards: list[str] = field(default_factory=list)  # the `has` tests a required value needs
    body: str = ""  # the bound itself (behind its own `if ... has` when the value is optional)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": path_text(self.path), "kind": self.kind, "required": self.required,
                               "condition": self.condition}
        if self.values is not None:
            out["values"] = self.values
        else:
            out["min"], out["max"] = self.lo, self.hi
        return out


@dataclass
class SuggestedPermit:
    policy_id: str
    principal_kind: str  # group | agent
    principal_type: str
    principal_id: str
    action: str
    resource_type: str
    observed: Observed
    members_seen: list[str]  # group: every agent of the group seen in the traffic
    bounds: list[Bound] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # values seen but not bounded, and why

    @property
    def scope(self) -> str:
        op = "in" if self.principal_kind == "group" else "=="
        return (f"principal {op} {entity_ref(self.principal_type, self.principal_id)}, "
                f"action == Action::{cedar_string(self.action)}, resource is {self.resource_type}")

    def as_dict(self) -> dict[str, Any]:
        o = self.observed
        return {
            "id": self.policy_id,
            "principal": {"kind": self.principal_kind, "type": self.principal_type, "id": self.principal_id},
            "action": self.action,
            "resource_type": self.resource_type,
            "requests": o.count,
            "agents": sorted(o.agents),
            "members_seen": self.members_seen,
            "first": o.first[1] if o.first else None,
            "last": o.last[1] if o.last else None,
            "verdicts": dict(sorted(o.verdicts.items())),
            "monitored_forbidden_by": dict(sorted(o.forbidden_by.items())),
            # monitored requests the active policies denied by default, which this permit allows
            "monitored_denied_without_permit": o.denied_unpermitted,
            "review": o.denied_unpermitted > 0,
            "bounds": [b.as_dict() for b in self.bounds],
            "notes": self.notes,
        }


@dataclass
class Options:
    filters: Filters = field(default_factory=Filters)
    group_by: Literal["group", "agent"] = "group"
    bounds: bool = True
    min_count: int = 1


@dataclass
class Proof:
    """The replay of the traffic in scope against the suggestion."""

    replayed: int = 0
    learned: int = 0
    covered: int = 0  # learned requests the suggested permits alone allow
    uncovered: list[dict[str, Any]] = field(default_factory=list)
    # forwarded requests (not monitored) decided as recorded with the active forbids on top:
    # allowed stays allowed, released after approval (policy_decision hold) stays a hold
    kept: int = 0
    changed: list[dict[str, Any]] = field(default_factory=list)
    monitored_outcome: Counter[str] = field(default_factory=Counter)  # enforcement preview of monitored requests
    others_unchanged: int = 0
    others_changed: list[dict[str, Any]] = field(default_factory=list)  # not learned from, verdict differs
    unreplayable: int = 0  # lines Cedar cannot take as a request (hand-made, damaged): not evaluated
    forbids: list[str] = field(default_factory=list)  # the active set's forbid policies kept in the candidate

    @property
    def ok(self) -> bool:
        """The suggestion covers every request it learned from (else it is refused)."""
        return not self.uncovered

    @property
    def unchanged(self) -> bool:
        """Nothing recorded is decided otherwise with the forbids on top (what --check asks)."""
        return not self.uncovered and not self.changed and not self.others_changed

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "unchanged": self.unchanged,
            "replayed": self.replayed,
            "learned": self.learned,
            "covered": self.covered,
            "uncovered": self.uncovered,
            "kept": self.kept,
            "changed": self.changed,
            "monitored_outcome": dict(sorted(self.monitored_outcome.items())),
            "others_unchanged": self.others_unchanged,
            "others_changed": self.others_changed,
            "unreplayable": self.unreplayable,
            "forbids_kept": self.forbids,
        }


@dataclass
class SuggestResult:
    files: list[str]
    considered: int = 0  # decision lines read
    filtered_out: int = 0
    learned: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    unreadable: Unreadable = field(default_factory=Unreadable)
    permits: list[SuggestedPermit] = field(default_factory=list)
    left_out: list[dict[str, Any]] = field(default_factory=list)  # under --min-count
    text: str = ""
    proof: Proof | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "considered": self.considered,
            "filtered_out": self.filtered_out,
            "learned": self.learned,
            "skipped": dict(sorted(self.skipped.items())),
            "unreadable": self.unreadable.count,
            "policies": [p.as_dict() for p in self.permits],
            "left_out": self.left_out,
            "cedar": self.text,
            "proof": self.proof.as_dict() if self.proof is not None else None,
        }


def _slug(text: str) -> str:
    slug = _SLUG_UNSAFE.sub("_", text).strip("_")[:SLUG_MAX] or "_"
    if slug != text:  # lossy: keep distinct names distinct
        slug += "~" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:6]
    return slug


def policy_id(kind: str, principal_id: str, action: str, resource_type: str | None) -> str:
    """`suggested-<group>-<action>`, `suggested-agent:<agent>-<action>`; `-<resource type>` when an
    action was seen on several. Stable: only made of what it covers."""
    who = _slug(principal_id) if kind == "group" else "agent:" + _slug(principal_id)
    pid = f"suggested-{who}-{_slug(action)}"
    if resource_type is not None:
        pid += "-" + _slug(resource_type)
    return pid


def _principal(cedar: dict[str, Any]) -> tuple[str, str, list[tuple[str, str]]] | None:
    """(type, id, [(group type, group id)]) of a recorded principal; None when not usable."""
    p = cedar.get("principal")
    if not isinstance(p, dict) or not isinstance(p.get("uid"), dict):
        return None
    uid = p["uid"]
    ptype, pid = uid.get("type"), uid.get("id")
    if not isinstance(ptype, str) or not isinstance(pid, str) or not entity_type_ok(ptype) or not cedar_safe(pid):
        return None
    groups = []
    for parent in p.get("parents") or []:
        if (isinstance(parent, dict) and isinstance(parent.get("type"), str) and isinstance(parent.get("id"), str)
                and entity_type_ok(parent["type"]) and cedar_safe(parent["id"])):
            groups.append((parent["type"], parent["id"]))
    return ptype, pid, groups


def _resource_id(cedar: dict[str, Any]) -> str | None:
    r = cedar.get("resource")
    uid = r.get("uid") if isinstance(r, dict) else None
    rid = uid.get("id") if isinstance(uid, dict) else None
    return rid if isinstance(rid, str) and cedar_safe(rid) else None


def _resource_type(cedar: dict[str, Any]) -> str | None:
    r = cedar.get("resource")
    uid = r.get("uid") if isinstance(r, dict) else None
    rtype = uid.get("type") if isinstance(uid, dict) else None
    return rtype if isinstance(rtype, str) and entity_type_ok(rtype) else None


def _bound_for(fs: FieldStats, count: int) -> tuple[Bound | None, str | None]:
    """The bound on a value seen in `count` requests, or (None, why not)."""
    path = fs.path
    name = path[-1]
    if fs.unusable:
        return None, f"not bounded ({fs.unusable})"
    if len(fs.kinds) != 1:
        return None, "not bounded (seen with several types)"
    kind = next(iter(fs.kinds))
    required = fs.present == count
    expr = access(path)
    if kind in ("long", "decimal"):
        if _ID_NAME.search(name):
            return None, "not bounded (an identifier)"
        lo = fs.lo if fs.lo < 0 else (0 if kind == "long" else Decimal(0))
        if kind == "long":
            conds = [f"{expr} >= {lo}", f"{expr} <= {fs.hi}"]
            lo_t, hi_t = str(lo), str(fs.hi)
        else:
            lo_l, hi_l = decimal_literal(Decimal(lo)), decimal_literal(fs.hi)
            if lo_l is None or hi_l is None:
                return None, "not bounded (not a Cedar decimal)"
            conds = [f'{expr}.greaterThanOrEqual(decimal("{lo_l}"))', f'{expr}.lessThanOrEqual(decimal("{hi_l}"))']
            lo_t, hi_t = lo_l, hi_l
        bound = Bound(path, kind, "", required, lo=lo_t, hi=hi_t)
    else:
        if kind == "string" and (fs.idlike or _ID_NAME.search(name)):
            return None, "not bounded (values look like identifiers)"
        if fs.values is None:
            return None, f"not bounded (more than {ENUM_MAX} distinct values)"
        if fs.present < 2 * len(fs.values):
            return None, "not bounded (too few requests to tell an enumeration from free text)"
        values = sorted(fs.values, key=lambda v: (str(type(v)), v))
        lit = [cedar_string(v) if isinstance(v, str) else ("true" if v else "false") for v in values]
        conds = [f"{expr} == {lit[0]}" if len(lit) == 1 else f"[{', '.join(lit)}].contains({expr})"]
        bound = Bound(path, kind, "", required, values=values)
    body = " && ".join(conds)
    guard = has_chain(path)
    bound.guards = guard.split(" && ") if guard and required else []
    bound.body = body if required or not guard else f"(if {guard} then {body} else true)"
    bound.condition = " && ".join([*bound.guards, bound.body])
    return bound, None


def conjunction(bounds: list[Bound]) -> str:
    """The bounds as one condition, each `has` test written once (before its first use)."""
    terms: list[str] = []
    for b in bounds:
        for t in [*b.guards, b.body]:
            if t not in terms:
                terms.append(t)
    return " && ".join(terms)


def _observed_text(fs: FieldStats, count: int) -> str:
    if fs.unusable or len(fs.kinds) != 1:
        what = "seen"
    elif fs.lo is not None:
        what = f"{fs.lo} .. {fs.hi}"
    elif fs.values is not None:
        what = ", ".join(json.dumps(v, ensure_ascii=True) for v in sorted(fs.values, key=lambda v: (str(type(v)), v)))
    else:
        what = f"more than {ENUM_MAX} distinct values"
    presence = "" if fs.present == count else f" (in {fs.present} of {count} requests)"
    return f"{what}{presence}"


def _assign(per_agent: dict[tuple[str, str, str], Observed], agent_info: dict[str, tuple[str, list[tuple[str, str]]]],
            group_by: str) -> tuple[dict[tuple[str, str, str, str, str], Observed], dict[tuple[str, str], set[str]]]:
    """Merge per-agent observations into per-permit ones: each agent's requests go to the
    group of its that the most agents doing the same thing share (then the group with the
    fewest members seen, then the name), or to the agent itself when it is in no group."""
    members: dict[tuple[str, str], set[str]] = {}
    for agent, (_, groups) in agent_info.items():
        for g in groups:
            members.setdefault(g, set()).add(agent)
    doers: dict[tuple[str, str], set[str]] = {}
    for (agent, action, rtype) in per_agent:
        doers.setdefault((action, rtype), set()).add(agent)
    permits: dict[tuple[str, str, str, str, str], Observed] = {}
    for (agent, action, rtype), obs in sorted(per_agent.items()):
        ptype, groups = agent_info[agent]
        if group_by == "group" and groups:
            who = doers[(action, rtype)]
            g = min(groups, key=lambda g: (-len(members[g] & who), len(members[g]), g))
            key = ("group", g[0], g[1], action, rtype)
        else:
            key = ("agent", ptype, agent, action, rtype)
        permits.setdefault(key, Observed()).merge(obs)
    return permits, members


def _comment(p: SuggestedPermit) -> list[str]:
    o = p.observed
    agents = sorted(o.agents)
    shown = ", ".join(comment_text(a, 60) for a in agents[:AGENTS_SHOWN])
    if len(agents) > AGENTS_SHOWN:
        shown += f" and {len(agents) - AGENTS_SHOWN} more"
    lines = [review_text(o.denied_unpermitted)] if o.denied_unpermitted else []
    lines.append(f"{o.count} request{'s' if o.count != 1 else ''}, "
                 f"{comment_text(o.first[1], 40) if o.first else '?'} .. {comment_text(o.last[1], 40) if o.last else '?'}")
    if p.principal_kind == "group":
        lines.append(f"group {comment_text(p.principal_id, 60)}: agents {shown}")
        others = [m for m in p.members_seen if m not in o.agents]
        if others:
            more = ", ".join(comment_text(a, 60) for a in others[:AGENTS_SHOWN])
            if len(others) > AGENTS_SHOWN:
                more += f" and {len(others) - AGENTS_SHOWN} more"
            lines.append(f"also grants members seen doing other things: {more}")
    else:
        lines.append(f"agent {shown}")
    verdicts = ", ".join(f"{k.replace('monitored:', 'monitored, would have been ')} {n}"
                         for k, n in sorted(o.verdicts.items()))
    lines.append(f"verdicts: {verdicts}")
    if o.forbidden_by:
        lines.append("monitored requests refused by forbid policies, which still apply: "
                     + ", ".join(f"{comment_text(r, 80)} ({n})" for r, n in sorted(o.forbidden_by.items())))
    by_path = {b.path: b for b in p.bounds}
    granted = by_path.get(("resource",))
    if granted is not None and granted.values is not None:
        shown_ids = ", ".join(comment_text(v, 80) for v in granted.values[:AGENTS_SHOWN])
        if len(granted.values) > AGENTS_SHOWN:
            shown_ids += f" and {len(granted.values) - AGENTS_SHOWN} more"
        lines.append(f"resource: only the {len(granted.values)} seen ({shown_ids}): the resource (a host, a tool) "
                     "is what is granted")
    for path, fs in sorted(o.fields.items()):
        b = by_path.get(path)
        seen = _observed_text(fs, o.count)
        if b is not None:
            if b.values is not None:
                limit = "the value seen" if len(b.values) == 1 else "one of the values seen"
            else:
                limit = f"bounded {b.lo} .. {b.hi}"
            lines.append(f"{comment_text(path_text(path), 80)}: {seen}; {limit}"
                         f"{'' if b.required else ' when present'}")
    for note in p.notes:
        lines.append(note)
    return ["// " + line for line in lines]


def review_text(n: int) -> str:
    """The flag on a permit learned from monitored requests the active policies denied by default."""
    return (f"REVIEW: {n} of these request{'s' if n != 1 else ''} {'were' if n != 1 else 'was'} DENIED by the "
            "active policies (no permit covered them), forwarded only in monitor mode: this permit would ALLOW "
            "them. Adopt it only if intended (what an agent did unenforced is no evidence it should be allowed).")


def _render(permits: list[SuggestedPermit], header: list[str]) -> str:
    rule = "// " + "-" * 77
    parts = ["\n".join(["// " + h if h else "//" for h in header] + [rule]), ""]
    for p in permits:
        conds = conjunction(p.bounds)
        when = f"\nwhen {{ {conds} }}" if conds else ""
        parts.append("\n".join(_comment(p)) + f"\n@id({cedar_string(p.policy_id)})\npermit ({p.scope}){when};\n")
    return "\n".join(parts)


def _check_shape(text: str, permits: list[SuggestedPermit]) -> list[str]:
    """The text parses to exactly the permits meant (an injected policy would show here)."""
    try:
        est = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as e:
        return [f"the suggestion does not parse: {e}"]
    got = [(pol.get("effect"), (pol.get("annotations") or {}).get("id"))
           for pol in (est.get("staticPolicies") or {}).values()]
    want = [("permit", p.policy_id) for p in permits]
    if sorted(got, key=str) != sorted(want, key=str) or est.get("templates"):
        return [f"the suggestion parses to other policies than the {len(want)} permits meant"]
    return []


def build(records: Iterable[tuple[DecisionRecord, bool]], bundle: PolicyBundle, options: Options,
          hints: ManifestHints, result: SuggestResult) -> list[SuggestedPermit]:
    """Learn the permits; `result` gets the counts (considered, skipped, ...)."""
    oracle = SchemaOracle(bundle.schema)
    per_agent: dict[tuple[str, str, str], Observed] = {}
    agent_info: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    scope_cache: dict[tuple[str, str], bool] = {}
    for rec, monitored in records:
        result.considered += 1
        if not options.filters.keep(rec):
            result.filtered_out += 1
            continue
        why = skip_reason(rec, monitored)
        if why is not None:
            result.skipped[why] += 1
            continue
        assert rec.cedar is not None and rec.action
        principal = _principal(dict(rec.cedar))
        rtype = _resource_type(dict(rec.cedar))
        if principal is None or rtype is None or not cedar_safe(rec.action) or (
                rec.action in hints.granted and _resource_id(dict(rec.cedar)) is None):
            result.skipped[SKIP_UNUSABLE] += 1
            continue
        seen_scope = (rec.action, rtype)
        if seen_scope not in scope_cache:
            scope_cache[seen_scope] = oracle.scope_ok(f"principal, action == Action::{cedar_string(rec.action)}, "
                                                      f"resource is {rtype}")
        if not scope_cache[seen_scope]:
            result.skipped[SKIP_NOT_IN_SCHEMA] += 1
            continue
        ptype, agent, groups = principal
        have = agent_info.get(agent)
        merged = sorted(set(groups) | set(have[1] if have else []))
        agent_info[agent] = (ptype, merged)
        obs = per_agent.setdefault((agent, rec.action, rtype), Observed())
        obs.agents.add(agent)
        _observe(obs, rec, monitored, hints, options.bounds)
        result.learned += 1

    grouped, members = _assign(per_agent, agent_info, options.group_by)
    types_per_action: dict[tuple[str, str, str, str], set[str]] = {}
    for (kind, ptype, pid, action, rtype) in grouped:
        types_per_action.setdefault((kind, ptype, pid, action), set()).add(rtype)

    permits: list[SuggestedPermit] = []
    for key in sorted(grouped):
        kind, ptype, pid, action, rtype = key
        obs = grouped[key]
        several = len(types_per_action[(kind, ptype, pid, action)]) > 1
        permit = SuggestedPermit(
            policy_id=policy_id(kind, pid, action, rtype if several else None),
            principal_kind=kind, principal_type=ptype, principal_id=pid, action=action, resource_type=rtype,
            observed=obs, members_seen=sorted(members.get((ptype, pid), set())) if kind == "group" else [],
        )
        if obs.count < options.min_count:
            result.left_out.append({"id": permit.policy_id, "requests": obs.count})
            result.learned -= obs.count
            continue
        if not oracle.scope_ok(permit.scope):
            if kind == "group":  # (a group type the schema does not have Agent in): per agent instead
                for agent in sorted(obs.agents):
                    sub = per_agent[(agent, action, rtype)]
                    finished = _finish(SuggestedPermit(
                        policy_id=policy_id("agent", agent, action, rtype if several else None),
                        principal_kind="agent", principal_type=agent_info[agent][0], principal_id=agent,
                        action=action, resource_type=rtype, observed=sub, members_seen=[],
                        notes=[f"per agent: the schema does not allow `principal in` group type {ptype}"]),
                        oracle, options, hints.granted)
                    if finished is None:
                        result.skipped[SKIP_GRANTED_UNBOUNDED] += sub.count
                        result.learned -= sub.count
                    else:
                        permits.append(finished)
                continue
            result.skipped[SKIP_NOT_IN_SCHEMA] += obs.count
            result.learned -= obs.count
            continue
        finished = _finish(permit, oracle, options, hints.granted)
        if finished is None:
            result.skipped[SKIP_GRANTED_UNBOUNDED] += obs.count
            result.learned -= obs.count
            continue
        permits.append(finished)
    # ids are unique by construction (lossy names carry a digest); make sure
    seen: dict[str, int] = Counter(p.policy_id for p in permits)
    for p in permits:
        if seen[p.policy_id] > 1:
            p.policy_id += "~" + hashlib.sha256(repr((p.principal_kind, p.principal_type, p.principal_id, p.action,
                                                       p.resource_type)).encode("utf-8", "surrogatepass")).hexdigest()[:6]
    permits.sort(key=lambda p: p.policy_id)
    return permits


def _granted_bound(permit: SuggestedPermit) -> Bound:
    """The resources seen, for an action whose resource is what is granted (the generic host)."""
    ids = sorted(permit.observed.resources)
    refs = [entity_ref(permit.resource_type, i) for i in ids]
    cond = f"resource == {refs[0]}" if len(refs) == 1 else f"resource in [{', '.join(refs)}]"
    return Bound(("resource",), "entity", cond, True, values=ids, body=cond)


def _finish(permit: SuggestedPermit, oracle: SchemaOracle, options: Options,
            granted_actions: frozenset[str] = GRANTED_BY_RESOURCE) -> SuggestedPermit | None:
    """Add the bounds the schema declares and Cedar accepts. None: no permit can be suggested
    (an action whose resource is what is granted, and the resources seen cannot be written)."""
    if permit.action in granted_actions:
        resources = permit.observed.resources
        if not resources or len(resources) > GRANTED_MAX:
            return None
        granted = _granted_bound(permit)
        if not oracle.accepts(permit.scope, granted.condition):
            return None
        permit.bounds.append(granted)
    if not options.bounds:
        return permit
    scope = permit.scope
    for path, fs in sorted(permit.observed.fields.items()):
        bound, why = _bound_for(fs, permit.observed.count)
        label = comment_text(path_text(path), 80)
        if bound is None:
            permit.notes.append(f"{label}: {_observed_text(fs, permit.observed.count)}; {why}")
            continue
        if not oracle.declares(scope, path) or not oracle.accepts(scope, bound.condition):
            permit.notes.append(f"{label}: {_observed_text(fs, permit.observed.count)}; not bounded "
                                f"(the schema does not declare it as {bound.kind})")
            continue
        permit.bounds.append(bound)
    conds = conjunction(permit.bounds)
    if conds and not oracle.accepts(scope, conds):  # (each was accepted alone: never expected)
        permit.notes.append("bounds left out: together they do not validate")
        permit.bounds = [b for b in permit.bounds if b.path == ("resource",)]
    return permit


def header_lines(result: SuggestResult, options: Options) -> list[str]:
    f = options.filters
    filters = []
    if f.since is not None:
        filters.append("since " + comment_text(_iso(f.since)))
    if f.until is not None:
        filters.append("until " + comment_text(_iso(f.until)))
    if f.agents:
        filters.append("agents " + ", ".join(comment_text(a, 60) for a in sorted(f.agents)))
    if f.connectors:
        filters.append("connectors " + ", ".join(comment_text(c, 60) for c in sorted(f.connectors)))
    lines = [
        "Suggested by `proctor policy suggest`: least-privilege permits learned from",
        f"{result.learned} forwarded request{'s' if result.learned != 1 else ''} (allowed, or monitored) of "
        f"{result.considered} decisions read"
        + (f" ({'; '.join(filters)})" if filters else "") + ".",
        "One permit per agent group (an agent in no group: the agent), action and resource",
        "type seen" + (", bounded to the typed values seen" if options.bounds else "") + ".",
        "Permits only: the forbid policies and approval holds (@approval) of the policy",
        "set stay in force on top of these. Review every permit before adopting it; the",
        "rollout path is monitor -> suggest -> review -> shadow -> enforce (docs/policies.md).",
    ]
    flagged = review_flagged(result)
    if flagged:
        lines.append(f"REVIEW: {len(flagged)} permit{'s' if len(flagged) != 1 else ''} (marked REVIEW below) "
                     f"{'allow' if len(flagged) != 1 else 'allows'} requests the active policies DENIED, forwarded "
                     "only because of monitor mode.")
    if result.skipped:
        lines.append("Not learned from: " + "; ".join(f"{n} {why}" for why, n in sorted(result.skipped.items())) + ".")
    if result.left_out:
        lines.append(f"Left out (seen fewer than {options.min_count} times): "
                     + ", ".join(f"{comment_text(x['id'], 80)} ({x['requests']})" for x in result.left_out) + ".")
    return lines


def _iso(ts: float) -> str:
    from ..record.model import iso

    return iso(ts)


def render(result: SuggestResult, options: Options) -> str:
    """The suggestion as formatted Cedar; raises SuggestionRejected when it is not what was meant."""
    text = _render(result.permits, header_lines(result, options))
    problems = _check_shape(text, result.permits)
    if problems:
        raise SuggestionRejected(problems, result)
    try:
        formatted = format_text(text)
        again = format_text(formatted)
    except ValueError as e:
        raise SuggestionRejected([f"the suggestion cannot be formatted: {e}"], result) from None
    problems = _check_shape(again, result.permits)
    if problems:
        raise SuggestionRejected(problems, result)
    return again


# ------------------------------------------------------------------ validation and proof
def forbids_text(bundle: PolicyBundle) -> tuple[str, list[str]]:
    """The active set's forbid policies (annotations kept: @approval holds stay holds) as text."""
    forbids = {pid: est for pid, est in bundle.policy_est.items() if est.get("effect") == "forbid"}
    if not forbids:
        return "", []
    doc = {"staticPolicies": forbids, "templates": {}, "templateLinks": []}
    return cedarpy.policies_from_json_str(json.dumps(doc)), sorted(forbids)


def _candidate_source(source: PolicySource, directory: Path, files: dict[str, str]) -> PolicySource:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    entities = None
    if source.entities_path is not None and source.entities_path.exists():
        entities = directory / "entities.json"
        shutil.copyfile(source.entities_path, entities)
    return dataclasses.replace(source, policy_dir=directory, entities_path=entities)


def _change(rec: DecisionRecord, was: str, now: str, reasons: list[str], errors: list[str]) -> dict[str, Any]:
    return {"decision_id": rec.decision_id, "time": rec.time, "agent": rec.agent, "action": rec.action,
            "resource": rec.resource, "was": was, "now": now, "now_reasons": reasons, "errors": errors}


def prove(records: Iterable[tuple[DecisionRecord, bool]], alone: PolicyStore, candidate: PolicyStore,
          learned_keys: set[tuple[str, str, str]], options: Options, proof: Proof, limit: int = 50) -> None:
    """Replay the traffic in scope. `alone`: the suggestion by itself; `candidate`: the active
    set's forbids plus the suggestion. `learned_keys`: (agent, action, resource type) of the
    permits suggested (requests left out by --min-count are not expected to be covered)."""
    for rec, monitored in records:
        if not options.filters.keep(rec) or rec.cedar is None or not rec.action or rec.policy_decision is None:
            continue
        learned = skip_reason(rec, monitored) is None
        if learned:
            principal, rtype = _principal(dict(rec.cedar)), _resource_type(dict(rec.cedar))
            learned = (principal is not None and rtype is not None
                       and (principal[1], rec.action, rtype) in learned_keys)
        try:
            now, reasons, errors = evaluate(candidate, rec)
            if learned:
                by_itself, why, errs = evaluate(alone, rec)
        except (ValueError, KeyError, TypeError, AttributeError):  # entities Cedar cannot parse
            proof.unreplayable += 1
            continue
        proof.replayed += 1
        if learned:
            proof.learned += 1
            if by_itself == "allow":
                proof.covered += 1
            elif len(proof.uncovered) < limit:
                proof.uncovered.append(_change(rec, rec.policy_decision, by_itself, why, errs))
            if monitored:
                proof.monitored_outcome[now] += 1
            elif now == rec.policy_decision and not errors:
                proof.kept += 1
            elif len(proof.changed) < limit:
                proof.changed.append(_change(rec, rec.policy_decision, now, reasons, errors))
            continue
        if now == rec.policy_decision:
            proof.others_unchanged += 1
        elif len(proof.others_changed) < limit:
            proof.others_changed.append(_change(rec, rec.policy_decision, now, reasons, errors))


def suggest(paths: list[Path], source: PolicySource, options: Options, manifests: Iterable[Any] = ()) -> SuggestResult:
    """Read, learn, render, validate and prove. Raises SuggestInputError (exit 2: unusable
    input, or nothing to learn) or SuggestionRejected (exit 1)."""
    if not paths:
        raise SuggestInputError("no decision record to read (no file given, and the configured one does not exist)")
    try:
        bundle = load_bundle(source)
    except PolicyLoadError as e:
        raise SuggestInputError("the policy set does not load (its schema and forbids are needed): "
                                + "; ".join(e.problems)) from None
    result = SuggestResult(files=[str(p) for p in paths])
    hints = ManifestHints.of(manifests)
    result.permits = build(read_decisions(paths, result.unreadable), bundle, options, hints, result)
    if not result.permits:
        why = "; ".join(f"{n} {reason}" for reason, n in sorted(result.skipped.items())) or "none"
        f = options.filters
        named = [f"--agent {a}" for a in sorted(f.agents)] + [f"--connector {c}" for c in sorted(f.connectors)] + (
            ["--since"] if f.since is not None else []) + (["--until"] if f.until is not None else [])
        extra = (f"; {result.filtered_out} outside the filters ({', '.join(named) or 'none named'})"
                 if result.filtered_out else "")
        left = f"; {len(result.left_out)} permits under --min-count" if result.left_out else ""
        raise NothingToLearn(
            f"nothing to learn from: {result.considered} decisions read{extra}{left}; not learned from: {why}"
            + (f"; {result.unreadable.count} unreadable lines" if result.unreadable.count else ""))
    result.text = render(result, options)

    forbid_text, forbid_ids = forbids_text(bundle)
    clash = sorted({p.policy_id for p in result.permits} & set(forbid_ids))
    if clash:
        raise SuggestionRejected([f"the policy set has forbid policies with the suggested @ids {clash}"], result)
    with tempfile.TemporaryDirectory(prefix="proctor-suggest-") as tmp:
        alone_src = _candidate_source(source, Path(tmp) / "alone", {"suggested.cedar": result.text})
        files = {"suggested.cedar": result.text}
        if forbid_text:
            files["forbids.cedar"] = forbid_text
        cand_src = _candidate_source(source, Path(tmp) / "candidate", files)
        try:
            alone = PolicyStore(alone_src)
            candidate = PolicyStore(cand_src)
        except PolicyLoadError as e:
            raise SuggestionRejected([f"the suggestion does not validate: {p}" for p in e.problems], result) from None
    learned_keys: set[tuple[str, str, str]] = set()
    for p in result.permits:
        for agent in p.observed.agents:
            learned_keys.add((agent, p.action, p.resource_type))
    proof = Proof(forbids=forbid_ids)
    prove(read_decisions(paths), alone, candidate, learned_keys, options, proof)
    result.proof = proof
    if not proof.ok:
        raise SuggestionRejected([f"{len(proof.uncovered)} learned request(s) not allowed by the suggestion"], result)
    return result


def render_proof(proof: Proof) -> str:
    lines = [f"replay: {proof.replayed} decisions replayed; {proof.covered} of {proof.learned} learned requests "
             f"allowed by the suggested permits alone; {proof.kept} forwarded requests decided as recorded with "
             f"the policy set's {len(proof.forbids)} forbid policies on top"]
    if proof.monitored_outcome:
        lines.append("monitored requests under enforcement with the suggestion: "
                     + ", ".join(f"{k} {n}" for k, n in sorted(proof.monitored_outcome.items()))
                     + " (holds and denials come from the forbid policies)")
    lines.append(f"not learned from: {proof.others_unchanged} unchanged, {len(proof.others_changed)} would change")
    if proof.unreplayable:
        lines.append(f"{proof.unreplayable} decision(s) not replayed: Cedar cannot take their recorded inputs")
    for c in proof.uncovered + proof.changed + proof.others_changed:
        why = ", ".join(c["now_reasons"]) or ("error: " + "; ".join(c["errors"]) if c["errors"] else "default")
        lines.append(f"  {comment_text(c['time'], 40)}  {comment_text(c['decision_id'], 60)}  {comment_text(c['agent'])}  "
                     f"{comment_text(c['action'])}  {comment_text(c['resource'])}: {c['was']} -> {c['now']} "
                     f"({comment_text(why)})")
    return "\n".join(lines)


def review_flagged(result: SuggestResult) -> list[SuggestedPermit]:
    """The permits that allow monitored requests the active policies denied by default."""
    return [p for p in result.permits if p.observed.denied_unpermitted]


def summary(result: SuggestResult) -> str:
    n = len(result.permits)
    lines = [f"{n} permit{'s' if n != 1 else ''} suggested from {result.learned} forwarded requests "
             f"({result.considered} decisions read" + (f", {result.filtered_out} outside the filters" if result.filtered_out else "") + ")"]
    for p in review_flagged(result):
        lines.append(f"REVIEW {comment_text(p.policy_id, 120)}: allows {p.observed.denied_unpermitted} monitored "
                     "request(s) the active policies denied (no permit covered them)")
    for why, count in sorted(result.skipped.items()):
        lines.append(f"skipped {count}: {why}")
    if result.left_out:
        lines.append(f"left out under --min-count: {len(result.left_out)} permits")
    if result.unreadable.count:
        lines.append(f"{result.unreadable.count} line(s) skipped: not decision records (first: {result.unreadable.first})")
    if result.proof is not None:
        lines.append(render_proof(result.proof))
    return "\n".join(lines)
