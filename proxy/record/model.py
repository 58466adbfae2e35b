"""The decision record and the event lines, typed: one model family for every line
of decisions.jsonl and every audit event.

Each line of the decision record is one of:

- `DecisionRecord`: one decided request (or connection-level refusal); no `type` key;
- `ApprovalEvent` (`"type": "approval"`): an approval state change;
- `SuspensionEvent` (`"type": "suspension"`): the kill switch, on or off;
- `PolicyEvent` (`"type": "policy"`): a policy rollback;
- `ClaimEvent` (`"type": "claim"`): a claim on a resource transferred, handed off or released;
- `DuplicateEvent` (`"type": "duplicate"`): a write not forwarded because it repeated earlier work;
- `WorkflowEvent` (`"type": "workflow"`): a workflow exception (rerouted, gave up, escalated, stalled, decided);
- `BudgetEventRecord` (`"type": "budget"`): a budget window reached its soft threshold, or was exhausted;

and the audit trail adds its own `TrailEvent` (`"type": "audit"`: a gap, a repair),
which is never written to decisions.jsonl. `Record` is their union.

Everything that reads a record uses these types: the line (`to_dict`, `line`), the
OCSF event (proxy/audit/ocsf.py), the activity rows (proxy/audit/activity.py),
replay and explain (proxy/policy/), the metrics labels (proxy/observability/).

Two ways in, on purpose:

- on the request path a record is built from the `Exchange` by plain construction
  of slotted dataclasses: no validation (every value comes from typed objects);
- a line read back (`parse_line`, `parse_record`) is validated with pydantic: older
  lines that lack newer fields get the defaults, anything else that is not a record
  is a `RecordError` that says what is wrong.

The line format is a contract (docs/decision-record.md; SIEM parsers rely on it):
field names, key order, which optional fields are left out when absent and the
rounding of the timings are exactly what `to_dict` writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from ..core.exchange import HOLD_KIND, Exchange, Kind
from ..logredact import redact
from ..store.models import Approval

DecisionValue = Literal["allow", "deny", "hold"]


def iso(ts: float) -> str:
    """Epoch seconds as the record writes times: ISO 8601, UTC, milliseconds, `Z`."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Context keys never recorded: the raw body, the raw query string and MCP tool
# arguments may carry anything (credentials, personal data). Connector-declared
# typed values (params, query_params, fields) are what policies should use.
UNRECORDED_CONTEXT_KEYS = ("body", "query", "arguments")


# ------------------------------------------------------------------ parts of a decision
# JSON objects written as they are: typed dicts (no conversion on the hot path; the
# audit redactor walks them like any JSON).
class RefusalPart(TypedDict):
    kind: str
    title: str
    detail: str  # redacted free text (proxy.logredact)


class CedarInputs(TypedDict):
    """What Cedar evaluated, without the unrecorded context keys."""

    principal: dict[str, Any]
    resource: dict[str, Any]
    context: dict[str, Any]
    unrecorded: NotRequired[list[str]]  # which of UNRECORDED_CONTEXT_KEYS the request had


class ShadowPart(TypedDict):
    """The candidate policy set's verdict, when it disagrees (shadow mode)."""

    decision: str
    reasons: list[str]
    errors: list[str]
    revision: str


class WorkflowPart(TypedDict):
    """The workflow step a call is (docs/workflows.md): the instance may be new (started by it)."""

    name: str
    instance: str
    step: str


# stage_data key under which the workflow stage leaves the record's WorkflowPart
WORKFLOW_RECORD = "workflow.record"


class RateLimitCheck(TypedDict):
    """One rate limit a request counted against (docs/limits.md): `key` is a digest of the
    counter key (never the values it is built from); `remaining` is absent when the counters
    could not be read (`outcome: unavailable`)."""

    name: str
    key: str
    outcome: str  # allowed | throttled | shadow_throttled | unavailable
    limit: int
    period_seconds: float
    shadow: bool
    remaining: NotRequired[int]


class RateLimitPart(RateLimitCheck):
    """The limit that decided (the throttling one, else the tightest), and the others checked."""

    others: NotRequired[list[RateLimitCheck]]


# stage_data key under which the rate-limit stage leaves the record's RateLimitPart
RATE_LIMIT_RECORD = "rate_limit.record"
# stage_data key under which the budget stages leave the record's `budget` part (proxy/limits/budget_stage.py):
# the tightest budget checked (name, key digest, outcome, window, estimate, spent, reserved, result,
# actual), the others under `others`
BUDGET_RECORD = "budget.record"


class MonitoredPart(TypedDict):
    """Monitor mode (docs/governance.md): the refusal a request in a monitored scope would have
    got, not enforced. `decision`, `status` (null for a sync hold: it would have waited for a
    person), `kind`, `title`, `detail` (redacted) and `reasons` are the would-be answer's;
    `forwarded` says whether the request then went to the upstream (false when something that
    monitor mode does not cover refused it afterwards: its refusal is the line's `refusal`; or
    when a stored answer was replayed for an idempotent retry)."""

    decision: DecisionValue
    status: int | None
    kind: str
    title: str
    detail: str
    reasons: list[str]
    forwarded: bool
    approval_groups: NotRequired[dict[str, int]]  # a would-be hold: who would have been asked
    approval_mode: NotRequired[str]  # sync | async


def monitored_part(ex: Exchange) -> MonitoredPart | None:
    would = ex.monitored
    if would is None:
        return None
    hold = would.kind == HOLD_KIND
    sync = hold and would.extra.get("approval_mode") == "sync"
    part: MonitoredPart = {
        "decision": "hold" if hold else "deny",
        "status": None if sync else would.status,
        "kind": would.kind,
        "title": would.title,
        "detail": redact(would.detail),
        "reasons": list(would.reasons),
        "forwarded": ex.forwardable,
    }
    if hold:
        part["approval_groups"] = dict(would.extra.get("approval_groups") or {})
        part["approval_mode"] = str(would.extra.get("approval_mode") or "")
    return part


class RpcPart(TypedDict):
    method: str
    tool: NotRequired[str]


# Flattened into the line (method, host, port, path, mode, client_ip): one of the two.
@dataclass(slots=True)
class RecordedRequest:
    """The HTTP request a decision was about. Lines written by Proctor have all six;
    the optional ones are for hand-made or truncated lines (read leniently)."""

    method: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    mode: str | None = None
    client_ip: str | None = None
    # transparent mode: the address the agent's connection was redirected from ("ip:port"); the
    # request went where it names (host, port), never there (docs/transparent.md)
    original_dst: str | None = None


@dataclass(slots=True)
class RecordedConnection:
    """A connection-level event (non-TLS in a tunnel, TLS failure): no HTTP request."""

    client_ip: str | None = None
    host: str | None = None
    port: int | None = None


_REQUEST_KEYS = ("method", "host", "port", "path", "mode", "client_ip", "original_dst")
_CONNECTION_KEYS = ("client_ip", "host", "port")


def _nest_request(value: Any) -> Any:
    """Line -> model: the flat request (or connection) keys become one nested part."""
    if not isinstance(value, Mapping):
        return value
    out = dict(value)
    if "method" in out:
        out["request"] = {k: out.pop(k) for k in _REQUEST_KEYS if k in out}
    elif any(k in out for k in _CONNECTION_KEYS):
        out["connection"] = {k: out.pop(k) for k in _CONNECTION_KEYS if k in out}
    return out


# ------------------------------------------------------------------------- the records
@dataclass(slots=True, kw_only=True)
class DecisionRecord:
    """What one request was answered, and why."""

    record_type: ClassVar[str] = "decision"

    decision_id: str
    time: str
    decision: DecisionValue
    # monitor mode: the request was in a monitored scope (written on every line; older lines: false)
    monitor: bool = False
    agent: str | None = None
    issuer: str | None = None
    action: str | None = None
    resource: str | None = None
    connector: str | None = None
    risk: str | None = None
    reasons: list[str] = field(default_factory=list)
    policy_revision: str | None = None
    status: int | None = None
    upstream_status: int | None = None
    latency_ms: float | None = None
    decision_ms: float | None = None
    request: RecordedRequest | None = None
    connection: RecordedConnection | None = None
    # left out of the line when absent:
    refusal: RefusalPart | None = None
    monitored: MonitoredPart | None = None  # monitor mode: the refusal it would have got, not enforced
    errors: list[str] = field(default_factory=list)
    shadow: ShadowPart | None = None
    rpc: RpcPart | None = None
    approval_id: str | None = None
    policy_decision: DecisionValue | None = None
    trace_id: str | None = None
    span_id: str | None = None
    cedar: CedarInputs | None = None
    error: str | None = None
    workflow: WorkflowPart | None = None
    rate_limit: RateLimitPart | None = None
    budget: dict[str, Any] | None = None
    # the replica that decided (config.replica_id): stamped by the recorder, last on the line
    replica: str | None = None

    # -- where (the request's, else the connection's) -------------------------------
    @property
    def method(self) -> str | None:
        return self.request.method if self.request is not None else None

    @property
    def host(self) -> str | None:
        where = self.request if self.request is not None else self.connection
        return where.host if where is not None else None

    @property
    def port(self) -> int | None:
        where = self.request if self.request is not None else self.connection
        return where.port if where is not None else None

    @property
    def path(self) -> str | None:
        return self.request.path if self.request is not None else None

    @property
    def mode(self) -> str | None:
        return self.request.mode if self.request is not None else None

    @property
    def client_ip(self) -> str | None:
        where = self.request if self.request is not None else self.connection
        return where.client_ip if where is not None else None

    @property
    def refusal_kind(self) -> str:
        """The refusal's kind, or `allowed` (the metrics label). A monitored request that was
        forwarded counts with the kind of the refusal it would have got."""
        if self.refusal is not None:
            return self.refusal["kind"]
        return self.monitored["kind"] if self.monitored is not None else "allowed"

    @property
    def forwarded_monitored(self) -> bool:
        """Monitor mode: a would-be deny or hold that was forwarded all the same."""
        return self.monitored is not None and bool(self.monitored.get("forwarded"))

    # -- from the exchange (the hot path: no validation) -------------------------------
    @classmethod
    def from_exchange(cls, ex: Exchange, with_inputs: bool = True) -> DecisionRecord:
        """The record of one exchange, at the end of its response phase."""
        c = ex.classification
        refusal = ex.refusal
        resp = ex.response
        req = ex.request
        if resp is not None:
            status, upstream_status, error = resp.status, resp.upstream_status, resp.error
        else:
            status, upstream_status, error = (refusal.status or None) if refusal is not None else None, None, None
        identity = ex.identity
        inputs = ex.policy_inputs
        rpc = c.rpc if c is not None else None
        monitored = monitored_part(ex) if ex.monitored is not None else None
        trace = ex.trace_ids
        if req is not None:
            od = req.original_destination
            where_req = RecordedRequest(req.method, req.host, req.port, req.path, req.mode, req.client_ip,
                                        None if od is None else f"[{od[0]}]:{od[1]}" if ":" in od[0] else f"{od[0]}:{od[1]}")
            where_conn = None
        else:
            conn = ex.connection
            where_req = None
            where_conn = RecordedConnection(conn.client_ip, conn.host, conn.port) if conn is not None else None
        return cls(
            decision_id=ex.decision_id,
            time=iso(ex.timestamp),
            agent=identity.agent_id if identity is not None else None,
            issuer=identity.issuer if identity is not None else None,
            action=c.action if c is not None else None,
            resource=c.resource_uid if c is not None else None,
            connector=c.connector if c is not None else None,
            risk=c.risk if c is not None else None,
            # (Decision's values are DecisionValue); monitor mode: what it would have been
            decision=monitored["decision"] if monitored is not None else ex.decision.value,
            monitor=ex.monitor,
            reasons=ex.reasons if refusal is None else refusal.reasons,
            policy_revision=ex.policy_revision or None,
            status=status,
            upstream_status=upstream_status,
            latency_ms=None if ex.kind is Kind.CONNECTION or ex.request is None else round(ex.elapsed_ms(), 3),
            decision_ms=None if ex.decision_ms is None else round(ex.decision_ms, 3),
            request=where_req,
            connection=where_conn,
            # Free text (details, engine and upstream error messages) may quote request data:
            # no query string, userinfo or header value is recorded from it.
            refusal={"kind": refusal.kind, "title": refusal.title, "detail": redact(refusal.detail)}
            if refusal is not None else None,
            monitored=monitored,
            errors=[redact(e) if isinstance(e, str) else e for e in ex.errors] if ex.errors else [],
            shadow=ex.shadow,  # type: ignore[arg-type]  # (ShadowResult.as_dict)
            rpc=rpc,  # type: ignore[arg-type]  # JSON-RPC method and tool (never the arguments)
            approval_id=ex.approval_id or None,
            policy_decision=ex.policy_decision,  # type: ignore[arg-type]
            trace_id=trace[0] if trace is not None else None,
            span_id=trace[1] if trace is not None else None,
            cedar=policy_inputs_record(inputs) if with_inputs and inputs is not None else None,
            error=redact(error) if error else None,
            workflow=ex.stage_data.get(WORKFLOW_RECORD),
            rate_limit=ex.stage_data.get(RATE_LIMIT_RECORD),
            budget=ex.stage_data.get(BUDGET_RECORD),
        )

    # -- to the line -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The line as a dict, in the line's key order (absent optional fields left out)."""
        d: dict[str, Any] = {
            "decision_id": self.decision_id,
            "time": self.time,
            "agent": self.agent,
            "issuer": self.issuer,
            "action": self.action,
            "resource": self.resource,
            "connector": self.connector,
            "risk": self.risk,
            "decision": self.decision,
            "monitor": self.monitor,
            "reasons": self.reasons,
            "policy_revision": self.policy_revision,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "latency_ms": self.latency_ms,
            "decision_ms": self.decision_ms,
        }
        req = self.request
        if req is not None:
            d["method"] = req.method
            d["host"] = req.host
            d["port"] = req.port
            d["path"] = req.path
            d["mode"] = req.mode
            d["client_ip"] = req.client_ip
            if req.original_dst is not None:
                d["original_dst"] = req.original_dst
        elif self.connection is not None:
            conn = self.connection
            d["client_ip"] = conn.client_ip
            d["host"] = conn.host
            d["port"] = conn.port
        if self.refusal is not None:
            d["refusal"] = self.refusal
        if self.monitored is not None:
            d["monitored"] = self.monitored
        if self.errors:
            d["errors"] = self.errors
        if self.shadow is not None:
            d["shadow"] = self.shadow
        if self.rpc is not None:
            d["rpc"] = self.rpc
        if self.approval_id:
            d["approval_id"] = self.approval_id
        if self.policy_decision is not None:
            d["policy_decision"] = self.policy_decision
        if self.trace_id is not None:
            d["trace_id"] = self.trace_id
            d["span_id"] = self.span_id
        if self.cedar is not None:
            d["cedar"] = self.cedar
        if self.error:
            d["error"] = self.error
        if self.workflow is not None:
            d["workflow"] = self.workflow
        if self.rate_limit is not None:
            d["rate_limit"] = self.rate_limit
        if self.budget is not None:
            d["budget"] = self.budget
        if self.replica is not None:
            d["replica"] = self.replica
        return d

    def line(self) -> bytes:
        return _line(self.to_dict())


def policy_inputs_record(inputs: tuple[Any, Any, Any]) -> CedarInputs:
    principal, resource, context = inputs
    # (an empty value is kept: it carries nothing, and replay then sees exactly what policy saw)
    ctx = {k: v for k, v in context.items() if k not in UNRECORDED_CONTEXT_KEYS or v in (None, "")}
    dropped = [k for k in UNRECORDED_CONTEXT_KEYS if context.get(k) not in (None, "")]
    out: CedarInputs = {"principal": principal, "resource": resource, "context": ctx}
    if dropped:
        out["unrecorded"] = dropped
    return out


@dataclass(slots=True, kw_only=True)
class _Event:
    """Event lines: every field is on the line, in field order, except optional ones
    that are None (`_OMIT_NONE`); `replica` (the replica where the change happened,
    stamped by the recorder) comes last, and only when known."""

    record_type: ClassVar[str]
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    replica: str | None = None

    def to_dict(self) -> dict[str, Any]:
        omit = self._OMIT_NONE
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "replica":
                continue
            value = getattr(self, f.name)
            if value is None and f.name in omit:
                continue
            out[f.metadata.get("key", f.name)] = value
        if self.replica is not None:
            out["replica"] = self.replica
        return out

    def line(self) -> bytes:
        return _line(self.to_dict())


@dataclass(slots=True, kw_only=True)
class ApprovalEvent(_Event):
    """One approval state change (docs/approvals.md)."""

    record_type: ClassVar[str] = "approval"
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"policies", "mode", "by", "reason", "to"})

    type: Literal["approval"] = "approval"
    # requested, voted, approved, denied, escalated, expired, forwarded
    event: str
    time: str
    approval_id: str
    decision_id: str
    agent: str
    action: str
    resource: str
    state: str  # the approval's state after the event
    groups: dict[str, int]  # approval group -> approvals required
    policies: list[str] | None = None  # requested: the @approval policies
    mode: str | None = None  # requested: sync | async
    by: str | None = None  # voted, approved, denied: the approver
    reason: str | None = None
    to: str | None = None  # escalated: the escalation group

    @classmethod
    def of(cls, approval: Approval, event: str, when: float, **extra: Any) -> ApprovalEvent:
        """From a store `Approval` (proxy/store/models.py); extras that are None are left out."""
        return cls(
            event=event,
            time=iso(when),
            approval_id=approval.id,
            decision_id=approval.decision_id,
            agent=approval.agent_id,
            action=approval.action,
            resource=f"{approval.resource_type}::\"{approval.resource_id}\"",
            state=approval.state,
            groups=approval.groups,
            **extra,
        )


@dataclass(slots=True, kw_only=True)
class SuspensionEvent(_Event):
    """The kill switch: an agent, connector or action suspended or resumed (docs/governance.md)."""

    record_type: ClassVar[str] = "suspension"

    type: Literal["suspension"] = "suspension"
    event: Literal["suspended", "resumed"]
    time: str
    kind: Literal["agent", "connector", "action"]
    target: str
    by: str
    reason: str | None = None  # optional on resumed (written as null)

    @classmethod
    def of(cls, event: Literal["suspended", "resumed"], kind: Any, target: str, by: str, reason: str | None,
           when: float) -> SuspensionEvent:
        return cls(event=event, time=iso(when), kind=kind, target=target, by=by, reason=reason)


@dataclass(slots=True, kw_only=True)
class PolicyEvent(_Event):
    """A policy rollback, or a policy set pushed to the fleet (docs/governance.md)."""

    record_type: ClassVar[str] = "policy"

    type: Literal["policy"] = "policy"
    event: str  # rollback | push
    time: str
    from_revision: str
    to_revision: str
    by: str
    reason: str
    files_changed: list[str]

    @classmethod
    def rollback(cls, from_revision: str, to_revision: str, by: str, reason: str, files_changed: list[str],
                 when: float) -> PolicyEvent:
        return cls(event="rollback", time=iso(when), from_revision=from_revision, to_revision=to_revision, by=by,
                   reason=reason, files_changed=files_changed)

    @classmethod
    def push(cls, from_revision: str, to_revision: str, by: str, reason: str, files: list[str],
             when: float) -> PolicyEvent:
        return cls(event="push", time=iso(when), from_revision=from_revision, to_revision=to_revision, by=by,
                   reason=reason, files_changed=files)


@dataclass(slots=True, kw_only=True)
class ClaimEvent(_Event):
    """A claim on a resource began, changed hands or ended (docs/coordination.md): `acquired`
    (a new tenure by an agent's write), `conflict` (a write by `by` refused with 409: `holder`
    has it), `transferred` by an operator, `handoff` by a handoff route (to an agent, or to a
    human queue: `to_queue`), `taken` from a queue by a person, `released` (an operator or
    the person holding it), `expired` (deleted by the sweep). Both parties are on the line:
    `holder` had it, `to` has it now."""

    record_type: ClassVar[str] = "claim"
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset(
        {"to", "to_queue", "by", "new_claim_id", "fence", "decision_id", "reason"})

    type: Literal["claim"] = "claim"
    event: str  # acquired | conflict | transferred | handoff | taken | released | expired
    time: str
    claim_id: str
    connector: str
    resource: str
    holder: str  # the agent that held the claim before the event
    to: str | None = None  # the agent that holds it after a transfer or handoff
    to_queue: str | None = None  # handoff to people: the human group whose inbox has it now
    by: str | None = None  # the operator (transferred, released) or the agent whose write handed off
    new_claim_id: str | None = None
    fence: int | None = None  # the new tenure's fence
    decision_id: str | None = None  # handoff: the request that handed off
    reason: str | None = None

    @classmethod
    def of(cls, event: str, claim: Any, when: float, **extra: Any) -> ClaimEvent:
        """From a store `Claim` (proxy/store/claims.py), the one that ended or moved."""
        return cls(event=event, time=iso(when), claim_id=claim.id, connector=claim.connector,
                   resource=claim.resource, holder=claim.holder, **extra)


@dataclass(slots=True, kw_only=True)
class DuplicateEvent(_Event):
    """A write Proctor did not forward because it repeated earlier work (docs/coordination.md,
    "Duplicate work"): `replayed` (the first request's stored response was answered),
    `refused` (409: still in progress, a duplicate inside a dedupe window, or not replayable),
    `mismatch` (422: an Idempotency-Key reused for a different request). `mechanism` says
    which check found it: the agent's `idempotency` key or the route's `dedupe` window."""

    record_type: ClassVar[str] = "duplicate"
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset(
        {"first_agent", "first_status", "first_result", "kind", "reason"})

    type: Literal["duplicate"] = "duplicate"
    event: str  # replayed | refused | mismatch
    time: str
    mechanism: str  # idempotency | dedupe
    decision_id: str  # the request that was not forwarded
    agent: str
    connector: str
    action: str
    resource: str
    first_decision_id: str  # the request it repeated
    first_agent: str | None = None  # dedupe: the agent whose write came first (may be another agent)
    first_status: int | None = None  # the first request's upstream status, once it completed
    first_result: str | None = None  # its Location, when the upstream gave one
    kind: str | None = None  # the refusal kind (duplicate, idempotency-in-progress, ...), None for a replay
    reason: str | None = None  # (unused: every event line may carry one)


@dataclass(slots=True, kw_only=True)
class WorkflowEvent(_Event):
    """An exception on a workflow instance (docs/workflows.md, "Exceptions"): a step
    `rerouted` to another agent, a step that `gave-up` after its retries, an `escalated`
    inbox item for people (`reason`: failures, gave-up or stalled), a `stalled` instance (no
    progress for longer than its SLA), a person's `decided` (`resolution`: retry, take-over,
    complete, close), an item `resolved` because an agent completed the step."""

    record_type: ClassVar[str] = "workflow"
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset(
        {"step", "agent", "decision_id", "failures", "to", "group", "escalation_id", "reason", "by", "resolution",
         "note", "idle_seconds"})

    type: Literal["workflow"] = "workflow"
    event: str  # rerouted | gave-up | escalated | stalled | decided | resolved
    time: str
    workflow: str
    instance: str
    step: str | None = None
    agent: str | None = None  # the agent whose call it followed (rerouted, gave-up, escalated by failures)
    decision_id: str | None = None  # that call
    failures: int | None = None  # the step's failures counted when it happened
    to: str | None = None  # rerouted: the agent the step moved to
    group: str | None = None  # escalated: the people group whose inbox has it (None: operators)
    escalation_id: str | None = None  # the inbox item (escalated, decided, resolved)
    reason: str | None = None  # escalated: failures | gave-up | stalled
    by: str | None = None  # decided: the person
    resolution: str | None = None  # decided: retry | take-over | complete | close
    note: str | None = None  # decided: the person's note
    idle_seconds: float | None = None  # stalled: seconds without progress


@dataclass(slots=True, kw_only=True)
class BudgetEventRecord(_Event):
    """A budget window reached its soft threshold (`soft_threshold`), or a call found it
    exhausted (`exhausted`: refused, held for an extension, or let through by a shadow
    budget: `outcome`) (docs/limits.md, "Budgets"). Made from the budget stage's
    `proxy.limits.budget_events.BudgetEvent`. Amounts are exact decimals written as text;
    `key` is the key as a refusal shows it (request and token values digested)."""

    record_type: ClassVar[str] = "budget"
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset({"threshold", "reason"})

    type: Literal["budget"] = "budget"
    event: str  # soft_threshold | exhausted
    time: str
    budget: str
    key: dict[str, str | None]
    window_id: str
    window_start: str
    window_end: str
    limit: str
    spent: str
    reserved: str
    currency: str
    threshold: str | None = None  # soft_threshold: the fraction of the limit (0.8)
    outcome: str  # exhausted | held | shadow_exhausted | reserved (the call that crossed the soft threshold)
    agent: str
    decision_id: str  # the call that found the window there
    action: str
    connector: str
    reason: str | None = None  # (unused: every event line may carry one)


@dataclass(slots=True, kw_only=True)
class TrailEvent(_Event):
    """The audit trail about itself (proxy/audit/filesink.py): events a file could not take
    (`gap`), or a torn last line cut off (`repaired`). Only in the audit trail."""

    record_type: ClassVar[str] = "audit"
    _OMIT_NONE: ClassVar[frozenset[str]] = frozenset(
        {"time", "path", "from_", "to", "count", "decisions", "removed_bytes", "removed_sha256", "reason"})

    type: Literal["audit"] = "audit"
    event: str  # gap | repaired
    time: str | None = None
    path: str | None = None
    from_: Annotated[int | None, Field(alias="from")] = field(default=None, metadata={"key": "from"})  # gap
    to: int | None = None
    count: int | None = None
    decisions: dict[str, int] | None = None  # gap: the missing events by decision
    removed_bytes: int | None = None  # repaired
    removed_sha256: str | None = None
    reason: str | None = None


Record = Union[DecisionRecord, ApprovalEvent, SuspensionEvent, PolicyEvent, TrailEvent, ClaimEvent, DuplicateEvent,
               WorkflowEvent, BudgetEventRecord]
EventRecord = Union[ApprovalEvent, SuspensionEvent, PolicyEvent, TrailEvent, ClaimEvent, DuplicateEvent, WorkflowEvent,
                    BudgetEventRecord]
EVENT_TYPES: dict[str, type[_Event]] = {
    "approval": ApprovalEvent, "suspension": SuspensionEvent, "policy": PolicyEvent, "audit": TrailEvent,
    "claim": ClaimEvent, "duplicate": DuplicateEvent, "workflow": WorkflowEvent, "budget": BudgetEventRecord,
}


def _line(d: dict[str, Any]) -> bytes:
    # default=str: a value JSON has no type for (a Decimal in a context) is written as text
    return (json.dumps(d, separators=(",", ":"), default=str) + "\n").encode()


# ------------------------------------------------------------------------- reading back
class RecordError(ValueError):
    """A line (or dict) that is not a record; the message says why."""


def _line_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        kind = value.get("type")
        return "decision" if kind is None else kind if isinstance(kind, str) else None
    if isinstance(value, (DecisionRecord, _Event)):
        return value.record_type
    return None


RecordLine = Annotated[
    Union[
        Annotated[DecisionRecord, BeforeValidator(_nest_request), Tag("decision")],
        Annotated[ApprovalEvent, Tag("approval")],
        Annotated[SuspensionEvent, Tag("suspension")],
        Annotated[PolicyEvent, Tag("policy")],
        Annotated[TrailEvent, Tag("audit")],
        Annotated[ClaimEvent, Tag("claim")],
        Annotated[DuplicateEvent, Tag("duplicate")],
        Annotated[WorkflowEvent, Tag("workflow")],
        Annotated[BudgetEventRecord, Tag("budget")],
    ],
    Discriminator(
        _line_kind,
        custom_error_type="record_type",
        custom_error_message="not a record: an object with no `type` (a decision) or `type` one of "
                             "approval, suspension, policy, audit, claim, duplicate, workflow, budget",
    ),
]
RECORD_LINE: TypeAdapter[Record] = TypeAdapter(RecordLine)


def _problem(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        if err["type"] == "record_type":
            got = err["input"]
            kind = got.get("type") if isinstance(got, Mapping) else None
            parts.append(f"unknown record type {kind!r} (known: {', '.join(EVENT_TYPES)}; a decision has none)"
                         if kind is not None else f"not a record: a JSON object is expected, not {type(got).__name__}")
            continue
        # the first element of loc is the union tag: the record kind, said separately
        loc = ".".join(str(x) for x in err["loc"][1:]) or "(record)"
        parts.append(f"{loc}: {err['msg']}")
    more = e.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def parse_line(line: bytes | str) -> Record:
    """One line of decisions.jsonl as a record (validated); RecordError when it is not one."""
    try:
        return RECORD_LINE.validate_json(line)
    except ValidationError as e:
        if any(err["type"] == "json_invalid" for err in e.errors()):
            raise RecordError(f"not JSON: {e.errors()[0]['msg']}") from None
        raise RecordError(_problem(e)) from None


def parse_record(data: Any) -> Record:
    """A record given as a line-shaped dict (validated); RecordError when it is not one."""
    try:
        return RECORD_LINE.validate_python(data)
    except ValidationError as e:
        raise RecordError(_problem(e)) from None


def as_record(value: Record | Mapping[str, Any]) -> Record:
    """A record as it is, a line-shaped dict validated into one."""
    if isinstance(value, (DecisionRecord, _Event)):  # (the request path: no ABC check)
        return value
    return parse_record(value)


_T = TypeVar("_T")


def construct(cls: type[_T], data: Mapping[str, Any]) -> _T:
    """A record from data that is not checked (events read back from the audit trail for
    display): known fields taken as they are, missing ones None or their default."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        key = f.metadata.get("key", f.name)
        if key in data:
            value = data[key]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        object.__setattr__(obj, f.name, value)
    return obj


RECORD_KEY = "record"  # the record stage's name: its entry in Exchange.stage_data


def record_of(ex: Exchange, with_inputs: bool = False) -> DecisionRecord:
    """The exchange's decision record: the one the record stage wrote (proxy/record/stage.py
    keeps it in the exchange's stage data), else built now. Stages that run after the record
    stage on the way back (metrics) read the same typed fields the line was written from."""
    rec = ex.stage_data.get(RECORD_KEY)
    if isinstance(rec, DecisionRecord):
        return rec
    return DecisionRecord.from_exchange(ex, with_inputs=with_inputs)

