"""What the control API answers: response bodies as pydantic models.

The approval and governance handlers build their answers through these models
(`of(...)` constructors from the store records), so the document generated
from them (proxy/control/openapi.py) is the shape on the wire. Health, policy
status and activity answers are assembled elsewhere (control/api.py,
control/health.py, the activity reader); their models describe them, and
tests/test_openapi.py and the schemathesis run (tests/test_control_api_fuzz.py)
check live answers against that description.

Timestamps are UTC ISO 8601 strings with milliseconds (`2025-01-31T12:00:00.000Z`)
unless a field says epoch seconds.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, with_config
from pydantic.json_schema import SkipJsonSchema
from typing_extensions import TypedDict

from ..record.decisions import iso
from ..store import models as records
from .models import ApprovalState, SuspensionKind

Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"},
                                 description="UTC, ISO 8601 with milliseconds (e.g. 2025-01-31T12:00:00.000Z).")]
EpochSeconds = Annotated[float, Field(description="Epoch seconds.")]


def _absent_when_unset(schema: dict[str, Any]) -> None:
    """For `X | SkipJsonSchema[None] = None` fields: left out when unset, never null on the wire,
    so the document shows no (null) default."""
    schema.pop("default", None)


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True)


def reply(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # exclude_unset: an optional field the handler did not set is left out (required ones are always set)
    return web.json_response(model.model_dump(mode="json", exclude_unset=True), status=status, headers=headers)


def _maybe_iso(t: float | None) -> str | None:
    return iso(t) if t else None


def _resource(a: records.Approval) -> str:
    return f"{a.resource_type}::{json.dumps(a.resource_id, ensure_ascii=False)}"


# ----------------------------------------------------------------------------- errors
class FieldError(_Out):
    field: str = Field(description="The field at fault (dotted path; empty for the whole input).")
    in_: Literal["body", "query"] = Field(alias="in")
    message: str


class Problem(_Out):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldError] | SkipJsonSchema[None] = Field(
        None, description="For a rejected input: each field at fault.", json_schema_extra=_absent_when_unset)


# ----------------------------------------------------------------------------- approvals
class Vote(_Out):
    """One approver's vote."""

    approver: str = Field(description="The approver's id (token subject).")
    groups: list[str] = Field(description="The approval groups this vote counted for.")
    decision: Literal["approve", "deny"]
    reason: str
    at: Timestamp


@with_config(ConfigDict(extra="allow"))
class HeldRequest(TypedDict, total=False):
    """The held request as approvers see it: credentials redacted, body pretty-printed and bounded."""

    method: str
    url: str
    headers: dict[str, str]
    bound_headers: Annotated[dict[str, str | None], Field(
        description="The headers the approval is bound to: a retry is released only with exactly these values "
        "(null: the header must be absent). Missing on approvals stored before fingerprint v2.")]
    fingerprint_version: Annotated[str, Field(description="v3 (missing: stored before headers were bound).")]
    body: str | None
    body_bytes: int
    body_truncated: bool


@with_config(ConfigDict(extra="allow"))
class Derived(TypedDict, total=False):
    """What Proctor derived from the request. Values are Cedar JSON: decimals and other extension values as
    {"__extn": {"fn": ..., "arg": ...}}, entity references as {"__entity": {"type", "id"}}."""

    action: str
    resource: str
    resource_attributes: dict[str, Any]
    connector: str
    risk: str
    route: str | None
    context: Annotated[dict[str, Any], Field(description="The typed values Cedar saw: params, query_params, fields, rpc.")]
    policies: list[str]


class ApprovalSummary(_Out):
    """A held request and its approval state (as listed; without the request preview)."""

    id: str = Field(examples=["apr_Q2xhdWRlIHdhcyBoZXJl"])
    state: ApprovalState = Field(description="pending -> approved | denied | expired; approved -> forwarded (the one "
                                 "request released) or expired (not retried in time).")
    agent: str = Field(description="The agent whose request is held.")
    action: str = Field(examples=["erp.purchase_order.create"])
    resource: str = Field(description='Cedar entity reference, Type::"id".', examples=['PurchaseOrder::"new"'])
    connector: str
    groups: dict[str, Annotated[int, Field(ge=1)]] = Field(
        description="Approval group -> approvals required from it (N-of-M).")
    mode: Literal["sync", "async"] = Field(description="How the agent waits.")
    created_at: Timestamp
    expires_at: Timestamp
    escalated: bool
    decided_at: Timestamp | None
    decided_by: str | None
    reason: str | None = Field(description="The deciding approver's reason (or why it expired).")
    forwarded_at: Timestamp | None
    decision_id: str = Field(description="The decision record entry that held the request.")
    policies: list[str] = Field(description="The @approval policies asking.")
    votes: list[Vote]
    method: str | None
    url: str | None

    @classmethod
    def fields_of(cls, a: records.Approval) -> dict[str, Any]:
        return {
            "id": a.id,
            "state": a.state,
            "agent": a.agent_id,
            "action": a.action,
            "resource": _resource(a),
            "connector": a.connector,
            "groups": a.groups,
            "mode": a.mode,
            "created_at": iso(a.created_at),
            "expires_at": iso(a.expires_at),
            "escalated": a.escalated,
            "decided_at": _maybe_iso(a.decided_at),
            "decided_by": a.decided_by,
            "reason": a.reason,
            "forwarded_at": _maybe_iso(a.forwarded_at),
            "decision_id": a.decision_id,
            "policies": a.derived.get("policies", []),
            "votes": [
                {"approver": v.approver, "groups": v.group.split(","), "decision": v.decision, "reason": v.reason,
                 "at": iso(v.at)}
                for v in a.votes
            ],
            "method": a.request.get("method"),
            "url": a.request.get("url"),
        }

    @classmethod
    def of(cls, a: records.Approval) -> "ApprovalSummary":
        return cls.model_validate(cls.fields_of(a))


class Approval(ApprovalSummary):
    """One approval in full: the summary, the held request and what was derived from it."""

    request: HeldRequest
    derived: Derived
    you_may_decide: bool | SkipJsonSchema[None] = Field(
        None, description="GET only: whether the calling approver may still vote on it (absent elsewhere).",
        json_schema_extra=_absent_when_unset)

    @classmethod
    def of(cls, a: records.Approval, you_may_decide: bool | None = None) -> "Approval":
        fields = {**cls.fields_of(a), "request": a.request, "derived": a.derived}
        if you_may_decide is not None:  # left unset otherwise: absent from the answer
            fields["you_may_decide"] = you_may_decide
        return cls.model_validate(fields)


class ApprovalList(_Out):
    approvals: list[ApprovalSummary]
    total: int = Field(description="Approvals in the selected states (agent and action filters not applied).")
    limit: int
    offset: int


class ApprovalStatus(_Out):
    """What a held agent may learn about its own request."""

    id: str
    state: ApprovalState
    action: str
    resource: str
    expires_at: Timestamp
    decided_by: str | None
    reason: str | None

    @classmethod
    def of(cls, a: records.Approval) -> "ApprovalStatus":
        return cls.model_validate({"id": a.id, "state": a.state, "action": a.action, "resource": _resource(a),
                                   "expires_at": iso(a.expires_at), "decided_by": a.decided_by, "reason": a.reason})


class ApprovalEvent(_Out):
    """The data of one server-sent `approval` event."""

    event: Literal["requested", "voted", "approved", "denied", "expired", "escalated", "forwarded", "cancelled"] | str
    approval: ApprovalSummary


class WhoAmI(_Out):
    approver: str
    groups: list[str]


# ----------------------------------------------------------------------------- governance
class Suspension(_Out):
    """A kill-switch entry: requests from this agent, to this connector or for this action are refused."""

    kind: SuspensionKind
    target: str
    since: Timestamp
    by: str
    reason: str

    @classmethod
    def of(cls, s: records.Suspension) -> "Suspension":
        return cls.model_validate({"kind": s.kind, "target": s.target, "since": iso(s.since), "by": s.by,
                                   "reason": s.reason})


class Agent(_Out):
    """An agent in the registry (registered in advance, or recorded when first seen)."""

    id: str
    owner: str
    team: str
    description: str
    registered: bool
    first_seen: Timestamp | None
    last_seen: Timestamp | None
    requests: int
    allowed: int
    denied: int
    status: Literal["active", "suspended"]
    suspension: Suspension | None

    @classmethod
    def of(cls, a: records.AgentRecord, suspended: records.Suspension | None) -> "Agent":
        return cls(
            id=a.id, owner=a.owner, team=a.team, description=a.description, registered=a.registered,
            first_seen=_maybe_iso(a.first_seen), last_seen=_maybe_iso(a.last_seen), requests=a.requests,
            allowed=a.allowed, denied=a.denied, status="suspended" if suspended else "active",
            suspension=Suspension.of(suspended) if suspended else None,
        )


class AgentList(_Out):
    agents: list[Agent]


class SuspensionList(_Out):
    suspensions: list[Suspension]


class ResumeResult(_Out):
    kind: SuspensionKind
    target: str
    resumed_by: str


class Revision(_Out):
    revision: str
    loaded_at: Timestamp
    active: bool
    files: list[str]


class RevisionList(_Out):
    active_revision: str
    revisions: list[Revision] = Field(description="Newest first.")


class RollbackResult(_Out):
    active_revision: str
    previous_revision: str
    files_changed: list[str]


# ----------------------------------------------------------------------------- health and policies
class ReloadStatus(_Out):
    """The outcome of the latest policy (re)load."""

    ok: bool = Field(description="False while the last reload was rejected (the previous policies stay active).")
    revision: str | None
    loaded_at: EpochSeconds | None
    last_attempt_at: EpochSeconds | None
    last_error: list[str]
    reloads: int
    failed_reloads: int


class ShadowStatus(_Out):
    """Shadow (candidate) policies evaluated beside the active ones."""

    dir: str
    loaded: bool
    revision: str | None
    load_error: list[str] | str | None
    reload_ok: bool
    evaluations: int
    disagreements: int
    failures: int


class Component(_Out):
    """One component; its other fields depend on the component (see docs/configuration.md)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    status: Literal["ok", "degraded", "down", "disabled"]
    reasons: list[str] = Field(default_factory=list, description="Why it keeps Proctor from being ready.")


class Components(_Out):
    listeners: Component
    store: Component
    policies: Component
    audit: Component
    identity: Component
    workload_identity: Component = Field(description="Transparent mode's workload identity (docs/transparent.md): "
                                         "token_file, agent_id, issuer, expires_at, loaded_at, checked_at, rotations, "
                                         "error; disabled without transparent mode.")


class MonitorMode(_Out):
    """Monitor mode (docs/governance.md): where policies are not enforced (denies and holds are
    recorded as what they would have been, and the request is forwarded)."""

    enabled: bool = Field(description="false: every request is enforced.")
    global_: bool = Field(alias="global", description="Every request is monitored.")
    connectors: list[str]
    agents: list[str]
    groups: list[str]


class Health(_Out):
    status: Literal["ok", "degraded"] = Field(
        description="degraded: the last policy reload was rejected, or a component is not ok.")
    version: str
    uptime_seconds: float
    policy: ReloadStatus
    engine_running: bool
    ready: bool = Field(description="What /readyz answers.")
    monitor: MonitorMode
    components: Components


class Ready(_Out):
    ready: bool
    reasons: list[str] = Field(description="Empty when ready.")


class Stats(_Out):
    engine: dict[str, int] = Field(description="Engine counters.")
    records_written: int


class ReplicaOut(_Out):
    """One replica as it last reported (docs/policies.md, "One policy set for the fleet")."""

    replica_id: str
    hostname: str
    policy_source: Literal["directory", "store"]
    revision: str = Field(description="The revision it enforces (its own hash of what it loaded).")
    following: str | None = Field(description="Store mode: the fleet revision it follows.")
    reload_ok: bool
    last_seen: EpochSeconds
    agrees: bool = Field(description="It enforces the fleet's active revision (false: flag it).")


class FleetStatus(_Out):
    """The fleet's policy set: the active revision in the store and every replica seen lately."""

    source: Literal["directory", "store"] = Field(description="This replica's policies.source.")
    replica_id: str
    active_revision: str | None = Field(description="The fleet's active revision (the store's).")
    following: str | None
    error: str | None = Field(description="Why this replica does not enforce the revision it follows.")
    disagreeing: list[str] = Field(description="Replicas that do not enforce the fleet's active revision.")
    replicas: list[ReplicaOut]


class PolicyStatus(_Out):
    active_revision: str
    policy_count: int
    loaded_at: EpochSeconds
    files: list[str]
    reload: ReloadStatus
    shadow: ShadowStatus | None = Field(description="null when no shadow policies are configured.")
    fleet: FleetStatus | None = Field(None, description="null before the store is open, or when it cannot be read.")


class PushResult(_Out):
    active_revision: str = Field(description="The pushed revision, now the fleet's active one.")
    previous_revision: str | None
    enforced_here: str = Field(description="The revision this replica enforces now.")


class ReloadResult(_Out):
    reloaded: bool
    active_revision: str
    reload: ReloadStatus


# ----------------------------------------------------------------------------- activity
class ActivityEvent(_Out):
    """One audit event as the console's activity view shows it (no request context, no chain).
    Fields without a value are left out; which appear depends on `record`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    sequence: int = Field(description="The audit trail's sequence number.")
    time: Timestamp | None = None
    record: str = Field(description="decision, approval, suspension or policy.")
    operation: str | None = None
    agent: str | None = None
    action: str | None = None
    resource: str | None = None
    connector: str | None = None
    decision: str | None = Field(None, description="allow, deny or hold; for other records the state change. "
                                 "Monitor mode: what it would have been.")
    monitor: bool | None = Field(None, description="true: the request was in a monitor-mode scope (absent otherwise).")
    monitored: dict[str, Any] | None = Field(None, description="Monitor mode: the refusal it would have got, not "
                                             "enforced (decision, status, kind, title, detail, reasons, forwarded).")
    status: int | None = Field(None, description="The HTTP status the agent got.")
    reasons: list[str] | None = None
    decision_id: str | None = None
    approval_id: str | None = None


class MissingReplica(_Out):
    """A replica a fleet view could not ask (down, unreachable, refused the forwarded token)."""

    replica: str
    error: str


class DecisionExplanation(_Out):
    """A recorded decision re-evaluated under the current policies of the replica that made it
    (the same document as `proctor policy explain --decision ID --json`)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    decision_id: str
    replica: str = Field(description="The replica that made the decision and explains it.")
    recorded: dict[str, Any] = Field(description="What was decided then: decision, reasons, policy_revision, status.")
    now: dict[str, Any] = Field(description="What the current policies decide: decision, reasons, errors, "
                                "policy_revision.")
    policies: list[dict[str, Any]] = Field(description="Every policy that applies to the action, and its verdict.")


class ActivityPage(_Out):
    events: list[ActivityEvent] = Field(description="Newest first.")
    next_before_sequence: int | None = Field(description="Pass back as `before_sequence` for older events; null: none.")
    limit: int | None = None
    audit: Literal["disabled"] | None = Field(None, description='"disabled" when no audit file is configured.')
    replica: str | None = Field(None, description="The replica that answered (config.replica_id).")
    next_cursor: str | None = Field(None, description="Fleet answers: pass back as `cursor` for older events; "
                                    "null: none.")
    replicas: list[str] | None = Field(None, description="Fleet answers: the replicas whose events are merged in.")
    incomplete: bool | None = Field(None, description="Fleet answers: true when a replica did not answer (its "
                                    "events are missing; see `missing`).")
    missing: list[MissingReplica] | None = None
