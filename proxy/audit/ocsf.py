"""Records (proxy/record/model.py) as OCSF 1.3.0 API Activity events (class 6003).

One event per decision and per state change (approval, suspension, policy
rollback), plus the trail's own `audit` events (a gap in a file, a repair). The mapping is documented field by field in docs/siem.md; Proctor
specifics that OCSF has no attribute for live under `unmapped.proctor`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from .. import __version__
from ..record.model import (
    EVENT_TYPES,
    ApprovalEvent,
    BudgetEventRecord,
    ClaimEvent,
    DuplicateEvent,
    DecisionRecord,
    EventRecord,
    PolicyEvent,
    Record,
    RecordedConnection,
    RecordedRequest,
    SuspensionEvent,
    TrailEvent,
    WorkflowEvent,
    as_record,
    construct,
    iso,
)

OCSF_VERSION = "1.3.0"
CLASS_UID, CATEGORY_UID = 6003, 6
ACTIVITY = {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 99: "Other", 0: "Unknown"}
METHOD_ACTIVITY = {"GET": 2, "HEAD": 2, "OPTIONS": 2, "POST": 1, "PUT": 3, "PATCH": 3, "DELETE": 4}
SEVERITY = {0: "Unknown", 1: "Informational", 2: "Low", 3: "Medium", 4: "High", 5: "Critical", 6: "Fatal"}
PRODUCT = {"name": "Proctor", "vendor_name": "Proctor", "version": __version__}


def _ms(iso: str | None) -> int:
    if not iso:
        return 0
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return 0


def _resource(uid: str | None, resource: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    if not uid:
        return []
    rtype, _, rid = uid.partition("::")
    try:
        rid = json.loads(rid)
    except ValueError:
        pass
    out: dict[str, Any] = {"uid": str(rid), "type": rtype, "name": uid}
    if resource is not None and resource.get("attrs"):
        out["data"] = resource["attrs"]
    return [out]


def _base(activity_id: int, when_ms: int, severity_id: int, status_ok: bool) -> dict[str, Any]:
    return {
        "class_uid": CLASS_UID,
        "class_name": "API Activity",
        "category_uid": CATEGORY_UID,
        "category_name": "Application Activity",
        "activity_id": activity_id,
        "activity_name": ACTIVITY[activity_id],
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": f"API Activity: {ACTIVITY[activity_id]}",
        "time": when_ms,
        "severity_id": severity_id,
        "severity": SEVERITY[severity_id],
        "status_id": 1 if status_ok else 2,
        "status": "Success" if status_ok else "Failure",
        "metadata": {
            "version": OCSF_VERSION,
            "product": dict(PRODUCT),
            "uid": str(uuid.uuid4()),
            "log_name": "proctor.audit",
        },
    }


def operation_of(rec: DecisionRecord) -> str:
    """The OCSF `api.operation` of a decision: its Cedar action (the activity view shows it too)."""
    return rec.action or "http.request"


def severity_of(rec: DecisionRecord) -> int:
    if rec.decision == "allow":
        return 1
    if rec.decision == "hold":
        return 2
    return 4 if rec.refusal is not None and rec.refusal["kind"] in ("fail-closed", "suspended") else 3


def decision_event(rec: DecisionRecord) -> dict[str, Any]:
    """A decision record as an API Activity event."""
    decision = rec.decision or "deny"
    refusal = rec.refusal
    kind = refusal["kind"] if refusal is not None else None
    # (monitor mode: a would-be deny or hold that was forwarded succeeded as an API call)
    allowed = decision == "allow" or rec.forwarded_monitored
    status = rec.status
    status_ok = allowed and (status is None or int(status) < 400)
    req = rec.request
    method = (req.method or "").upper() if req is not None else ""
    ev = _base(METHOD_ACTIVITY.get(method, 99 if method else 0), _ms(rec.time), severity_of(rec), status_ok)
    ev["metadata"]["correlation_uid"] = rec.decision_id
    if rec.monitor:  # monitor mode: a SIEM can filter on it without reading unmapped data
        ev["metadata"]["labels"] = ["monitor"]
    agent = rec.agent
    cedar: Mapping[str, Any] = rec.cedar or {}
    principal = cedar.get("principal") or {}
    actor: dict[str, Any] = {}
    if agent:
        user: dict[str, Any] = {"uid": agent, "name": agent, "type_id": 99, "type": "AI agent"}
        parents = principal.get("parents", []) if isinstance(principal, dict) else []
        groups = [p.get("id") for p in parents if isinstance(p, dict) and p.get("id")]
        if groups:
            user["groups"] = [{"name": g} for g in groups]
        actor["user"] = user
    if not agent:
        actor["user"] = {"name": "unauthenticated", "type_id": 0, "type": "Unknown"}
    if rec.issuer:
        actor["idp"] = {"name": rec.issuer}
    reasons = rec.reasons or []
    policy_decision = rec.policy_decision
    if policy_decision is not None:
        # OCSF's policy.version is a string: left out when the record names no revision
        # (a record from before revisions, or hand-made) rather than sent as null
        version = {"version": rec.policy_revision} if rec.policy_revision is not None else {}
        if reasons:
            actor["authorizations"] = [
                {"decision": policy_decision, "policy": {"uid": pid, "name": pid, **version, "is_applied": True}}
                for pid in reasons
            ]
        else:
            actor["authorizations"] = [
                {"decision": policy_decision, "policy": {"name": "default-deny" if policy_decision == "deny" else "none",
                                                         **version, "is_applied": True}}
            ]
    elif reasons:  # refused before Cedar, e.g. egress-default-deny
        actor["authorizations"] = [{"decision": "deny", "policy": {"uid": r, "name": r, "is_applied": True}} for r in reasons]
    ev["actor"] = actor
    api: dict[str, Any] = {"operation": operation_of(rec), "request": {"uid": rec.decision_id or ""}}
    if rec.connector:
        api["service"] = {"name": rec.connector}
    response: dict[str, Any] = {}
    if status is not None:
        response["code"] = int(status)
    if refusal:
        response["error"] = kind or "refused"
        response["error_message"] = refusal.get("title", "")
    if response:
        api["response"] = response
    ev["api"] = api
    resource = cedar.get("resource")
    ev["resources"] = _resource(rec.resource, resource if isinstance(resource, dict) else None)
    host, port = rec.host, rec.port
    if method:
        assert req is not None
        url: dict[str, Any] = {"hostname": req.host or "", "path": req.path or ""}
        if req.port:
            url["port"] = int(req.port)
        ev["http_request"] = {"http_method": method, "url": url}
    ev["src_endpoint"] = {"ip": rec.client_ip or "0.0.0.0"}
    if host:
        ev["dst_endpoint"] = {"hostname": host, **({"port": int(port)} if port else {})}
    if rec.latency_ms is not None:
        ev["duration"] = int(round(rec.latency_ms))
        ev["start_time"] = ev["time"]
        ev["end_time"] = ev["time"] + ev["duration"]
    if refusal:
        ev["status_detail"] = f"{refusal.get('title', '')}: {refusal.get('detail', '')}"[:2000]
    if status is not None:
        ev["status_code"] = str(status)
    ev["message"] = f"{agent or 'unauthenticated'} {rec.action or rec.method or '?'} " \
                    f"{rec.resource or host or ''}: {decision}".strip()
    if rec.monitored is not None:
        ev["message"] += " (monitor mode: not enforced, " + \
            ("forwarded)" if rec.forwarded_monitored else "refused by a check monitor mode does not cover)")
    proctor = {
        "record": "decision",
        "decision": decision,
        "monitor": rec.monitor,
        "monitored": rec.monitored,
        "policy_decision": policy_decision,
        "reasons": reasons,
        "policy_revision": rec.policy_revision,
        "risk": rec.risk,
        "mode": rec.mode,
        "upstream_status": rec.upstream_status,
        "latency_ms": rec.latency_ms,
        "decision_ms": rec.decision_ms,
        "approval_id": rec.approval_id,
        "trace_id": rec.trace_id,
        "span_id": rec.span_id,
        "shadow": rec.shadow,
        "rpc": rec.rpc,
        "context": cedar.get("context"),
        "error": rec.error,
        "errors": rec.errors or None,
        "rate_limit": rec.rate_limit,
        "budget": rec.budget,
        "replica": rec.replica,
    }
    ev["unmapped"] = {"proctor": {k: v for k, v in proctor.items() if v is not None}}
    return ev


def _state_change(rec: EventRecord) -> dict[str, Any]:
    event = rec.event
    return _base(1 if event == "requested" else 3, _ms(rec.time),
                 2 if event in ("denied", "suspended", "rollback", "expired") else 1, True)


def approval_event(rec: ApprovalEvent) -> dict[str, Any]:
    event, by = rec.event, rec.by
    ev = _state_change(rec)
    actor_id = by or rec.agent or "proctor"
    ev["actor"] = {"user": {"uid": actor_id, "name": actor_id, "type_id": 1 if by else 99, "type": "User" if by else "AI agent"}}
    ev["api"] = {"operation": f"proctor.approval.{event}", "request": {"uid": rec.approval_id or ""},
                 "service": {"name": "proctor.approvals"}}
    ev["resources"] = _resource(rec.resource) + [{"uid": rec.approval_id or "", "type": "Approval"}]
    ev["metadata"]["correlation_uid"] = rec.decision_id
    ev["message"] = f"approval {rec.approval_id} {event}" + (f" by {by}" if by else "") + \
                    f" ({rec.agent} {rec.action} {rec.resource})"
    return ev


def suspension_event(rec: SuspensionEvent) -> dict[str, Any]:
    event, by = rec.event, rec.by
    ev = _state_change(rec)
    ev["actor"] = {"user": {"uid": by or "?", "name": by or "?", "type_id": 1, "type": "User"}}
    ev["api"] = {"operation": f"proctor.{'suspend' if event == 'suspended' else 'resume'}",
                 "request": {"uid": f"{rec.kind}:{rec.target}"}, "service": {"name": "proctor.governance"}}
    ev["resources"] = [{"uid": str(rec.target), "type": str(rec.kind)}]
    ev["message"] = f"{rec.kind} {rec.target} {event} by {by}: {rec.reason}"
    return ev


def policy_event(rec: PolicyEvent) -> dict[str, Any]:
    event, by = rec.event, rec.by
    ev = _state_change(rec)
    ev["actor"] = {"user": {"uid": by or "?", "name": by or "?", "type_id": 1, "type": "User"}}
    ev["api"] = {"operation": f"proctor.policy.{event}", "request": {"uid": str(rec.to_revision or "")},
                 "service": {"name": "proctor.policies"}}
    ev["resources"] = [{"uid": str(rec.to_revision or ""), "type": "PolicyRevision"}]
    ev["message"] = f"policy {event} {rec.from_revision} -> {rec.to_revision} by {by}"
    return ev


def trail_event(rec: TrailEvent) -> dict[str, Any]:
    """The trail about itself: events a file could not take (gap), a torn line cut off (repaired)."""
    event = rec.event
    ev = _base(99, _ms(rec.time), 4 if event == "gap" else 2, True)
    ev["actor"] = {"user": {"uid": "proctor", "name": "proctor", "type_id": 3, "type": "System"}}
    ev["api"] = {"operation": f"proctor.audit.{event}", "request": {"uid": str(rec.path or "")},
                 "service": {"name": "proctor.audit"}}
    ev["resources"] = [{"uid": str(rec.path or ""), "type": "AuditFile"}]
    if event == "gap":
        ev["message"] = (f"audit file {rec.path}: {rec.count} event(s) (sequence {rec.from_}.."
                         f"{rec.to}) not written: {rec.reason}")
    else:
        ev["message"] = f"audit file {rec.path}: {rec.reason} ({rec.removed_bytes} bytes)"
    return ev


def claim_event(rec: ClaimEvent) -> dict[str, Any]:
    """A claim transferred, handed off or released (docs/coordination.md): the actor is the
    operator or the agent whose write handed off; both parties are in the message."""
    by = rec.by or rec.holder
    ev = _state_change(rec)
    ev["actor"] = {"user": {"uid": by or "?", "name": by or "?", "type_id": 1, "type": "User"}}
    ev["api"] = {"operation": f"proctor.claim.{rec.event}", "request": {"uid": rec.claim_id or ""},
                 "service": {"name": "proctor.coordination"}}
    ev["resources"] = _resource(rec.resource) + [{"uid": rec.claim_id or "", "type": "Claim"}]
    if rec.decision_id:
        ev["metadata"]["correlation_uid"] = rec.decision_id
    target = rec.to or (f"human queue {rec.to_queue}" if rec.to_queue else None)
    ev["message"] = (f"claim {rec.claim_id} on {rec.resource} {rec.event}: {rec.holder}"
                     + (f" -> {target}" if target else "") + (f" by {by}" if rec.by else ""))
    return ev


def duplicate_event(rec: DuplicateEvent) -> dict[str, Any]:
    """A write not forwarded because it repeated earlier work: the actor is the agent whose
    write it was; correlated with its decision, the request it repeated named in the message."""
    ev = _base(99, _ms(rec.time), 1 if rec.event == "replayed" else 2, rec.event == "replayed")
    ev["actor"] = {"user": {"uid": rec.agent, "name": rec.agent, "type_id": 99, "type": "AI agent"}}
    ev["api"] = {"operation": f"proctor.duplicate.{rec.event}", "request": {"uid": rec.decision_id},
                 "service": {"name": "proctor.coordination"}}
    ev["resources"] = _resource(rec.resource)
    ev["metadata"]["correlation_uid"] = rec.decision_id
    first = rec.first_decision_id + (f" by {rec.first_agent}" if rec.first_agent and rec.first_agent != rec.agent else "")
    ev["message"] = (f"{rec.agent} {rec.action} {rec.resource} not forwarded ({rec.mechanism}, {rec.event}"
                     + (f": {rec.kind}" if rec.kind else "") + f"): repeats {first}")
    return ev


def workflow_event(rec: WorkflowEvent) -> dict[str, Any]:
    """A workflow exception (docs/workflows.md, "Exceptions"): the actor is the person who
    decided, else the agent whose failed call it followed, else Proctor (a stalled instance);
    the instance is the resource, correlated with the call when there is one."""
    event = rec.event
    if rec.by:
        actor = {"uid": rec.by, "name": rec.by, "type_id": 1, "type": "User"}
    elif rec.agent:
        actor = {"uid": rec.agent, "name": rec.agent, "type_id": 99, "type": "AI agent"}
    else:
        actor = {"uid": "proctor", "name": "proctor", "type_id": 3, "type": "System"}
    ev = _base(1 if event == "escalated" else 3, _ms(rec.time),
               3 if event in ("gave-up", "stalled", "escalated") else 1, event not in ("gave-up", "stalled"))
    ev["actor"] = {"user": actor}
    ev["api"] = {"operation": f"proctor.workflow.{event}", "request": {"uid": rec.escalation_id or rec.instance or ""},
                 "service": {"name": "proctor.workflows"}}
    ev["resources"] = [{"uid": rec.instance or "", "name": rec.workflow or "", "type": "WorkflowInstance"}]
    if rec.decision_id:
        ev["metadata"]["correlation_uid"] = rec.decision_id
    where = f"workflow {rec.workflow} instance {rec.instance}" + (f" step {rec.step}" if rec.step else "")
    what = {
        "rerouted": f"rerouted from {rec.agent} to {rec.to} after {rec.failures} failure(s)",
        "gave-up": f"gave up after {rec.failures} failure(s) (last by {rec.agent})",
        "escalated": f"escalated ({rec.reason}) to {rec.group or 'operators'}",
        "stalled": f"stalled: no progress for {rec.idle_seconds} s",
        "decided": f"{rec.resolution} decided by {rec.by}",
        "resolved": f"escalation resolved: the step was completed by {rec.agent}",
    }.get(event, event)
    ev["message"] = f"{where}: {what}"
    return ev


# what a call that found a budget exhausted became (BudgetEventRecord.outcome), for the message
_BUDGET_OUTCOME = {"exhausted": "refused (429)", "held": "held for a budget extension",
                   "shadow_exhausted": "let through (shadow budget)", "extended": "let through (budget extension)"}


def _key_text(key: Mapping[str, Any]) -> str:
    return ", ".join(f"{dim} {'(none)' if v is None else v}" for dim, v in key.items()) or "shared"


def _percent(fraction: str | None) -> str:
    """"0.8" -> "80" (a hand-made line's text that is not a number is shown as it is)."""
    try:
        return format((Decimal(fraction or "0") * 100).normalize(), "f")
    except ArithmeticError:
        return str(fraction)


def budget_event(rec: BudgetEventRecord) -> dict[str, Any]:
    """A budget window at its soft threshold, or exhausted (docs/limits.md, "Budget metrics and
    events"): the actor is the agent whose call found it so, correlated with that call; the
    budget is the resource. Only a refused call is a Failure: a held, shadow or extended call
    is not (yet) refused."""
    exhausted = rec.event == "exhausted"
    ev = _base(99, _ms(rec.time), 3 if exhausted else 2, rec.outcome != "exhausted")
    ev["actor"] = {"user": {"uid": rec.agent, "name": rec.agent, "type_id": 99, "type": "AI agent"}}
    ev["api"] = {"operation": f"proctor.budget.{rec.event}", "request": {"uid": rec.decision_id},
                 "service": {"name": "proctor.limits"}}
    ev["resources"] = [{"uid": f"{rec.budget}/{rec.window_id}", "name": rec.budget, "type": "Budget"}]
    ev["metadata"]["correlation_uid"] = rec.decision_id
    amounts = f"spent {rec.spent} + reserved {rec.reserved} of {rec.limit}" + (f" {rec.currency}" if rec.currency else "")
    where = f"budget {rec.budget} ({_key_text(rec.key)}), window {rec.window_id}"
    if exhausted:
        what = f"exhausted ({amounts}): {rec.agent} {rec.action} {_BUDGET_OUTCOME.get(rec.outcome, rec.outcome)}"
    else:
        share = f"{_percent(rec.threshold)} %"
        what = f"soft threshold {share} reached ({amounts}) by {rec.agent} {rec.action}"
    ev["message"] = f"{where}: {what}"
    return ev


_STATE_CHANGE: dict[type, Callable[[Any], dict[str, Any]]] = {
    ApprovalEvent: approval_event, SuspensionEvent: suspension_event, PolicyEvent: policy_event, TrailEvent: trail_event,
    ClaimEvent: claim_event, DuplicateEvent: duplicate_event, WorkflowEvent: workflow_event,
    BudgetEventRecord: budget_event,
}


def state_change_event(rec: EventRecord) -> dict[str, Any]:
    """An approval, suspension, policy or audit-trail event line as an API Activity event."""
    ev = _STATE_CHANGE[type(rec)](rec)
    ev["src_endpoint"] = {"name": "proctor"}
    # the whole line (but its time, which is the event's) for the SIEM
    details = rec.to_dict()
    details.pop("time", None)
    ev["unmapped"] = {"proctor": {"record": rec.record_type, **details}}
    return ev


def to_ocsf(rec: Record | Mapping[str, Any]) -> dict[str, Any]:
    """One record as one OCSF event. A line-shaped dict is validated into a record first
    (RecordError when it is not one)."""
    rec = as_record(rec)
    return decision_event(rec) if isinstance(rec, DecisionRecord) else state_change_event(rec)


# ----------------------------------------------------------------------- reading back
@dataclass(slots=True)
class EventEnvelope:
    """What an audit event says about itself, beside the record it was made from."""

    sequence: Any  # metadata.sequence (an int in every event the trail wrote)
    time: str | None  # the event's time as the record writes times
    record: str  # unmapped.proctor.record: decision, approval, suspension, policy, audit
    event: Any  # unmapped.proctor.event (state changes)
    operation: Any  # api.operation
    severity: Any
    message: Any
    status_detail: Any  # a refusal as the trail wrote it (redacted, at most 2000 characters)
    correlation_uid: Any


def _obj(parent: Any, key: str) -> dict[str, Any]:
    value = parent.get(key) if isinstance(parent, dict) else None
    return value if isinstance(value, dict) else {}


def read_event(ev: dict[str, Any]) -> tuple[EventEnvelope, Record | None]:
    """An audit event read back into the record it was made from, as far as the event
    carries it: the inverse of `to_ocsf`, kept next to it so the two cannot drift apart.

    Lenient on purpose (the activity view reads files older versions wrote, and lines
    still being written): nothing is validated, what is missing is None. Redacted
    values stay redacted; of a decision's Cedar inputs only the context is in the event,
    and it is not read back. An unknown `record` gives no record (None)."""
    meta = _obj(ev, "metadata")
    p = _obj(_obj(ev, "unmapped"), "proctor")
    t = ev.get("time")
    env = EventEnvelope(
        sequence=meta.get("sequence"),
        time=iso(t / 1000) if isinstance(t, (int, float)) and t > 0 else None,
        record=p.get("record") or "decision",
        event=p.get("event"),
        operation=_obj(ev, "api").get("operation"),
        severity=ev.get("severity"),
        message=ev.get("message"),
        status_detail=ev.get("status_detail"),
        correlation_uid=meta.get("correlation_uid"),
    )
    if env.record == "decision":
        return env, _decision_of(ev, env, p)
    cls = EVENT_TYPES.get(env.record)
    if cls is None:
        return env, None
    data = {k: v for k, v in p.items() if k != "record"}
    data["time"] = env.time
    return env, cast(Record, construct(cls, data))


def _decision_of(ev: dict[str, Any], env: EventEnvelope, p: dict[str, Any]) -> DecisionRecord:
    actor, api = _obj(ev, "actor"), _obj(ev, "api")
    response, http = _obj(api, "response"), _obj(ev, "http_request")
    url, src, dst = _obj(http, "url"), _obj(ev, "src_endpoint"), _obj(ev, "dst_endpoint")
    resources = ev.get("resources")
    first = resources[0] if isinstance(resources, list) and resources and isinstance(resources[0], dict) else {}
    refusal = None
    if "error" in response:
        title = response.get("error_message") or ""
        shown = env.status_detail if isinstance(env.status_detail, str) else ""
        refusal = {"kind": response["error"], "title": title,
                   "detail": shown[len(title) + 2:] if shown.startswith(f"{title}: ") else shown}
    request = connection = None
    if http or p.get("mode") is not None:  # (a damaged event may lack the method: None then)
        request = RecordedRequest(http.get("http_method"), url.get("hostname"), url.get("port"),  # type: ignore[arg-type]
                                  url.get("path"), p.get("mode"), src.get("ip"))
    elif dst:
        connection = RecordedConnection(src.get("ip"), dst.get("hostname"), dst.get("port"))
    operation = env.operation
    return construct(DecisionRecord, {
        "decision_id": env.correlation_uid or _obj(api, "request").get("uid"),
        "time": env.time,
        "agent": _obj(actor, "user").get("uid"),
        "issuer": _obj(actor, "idp").get("name"),
        "action": operation if operation != "http.request" else None,
        "resource": first.get("name") or first.get("uid"),
        "connector": _obj(api, "service").get("name"),
        "request": request,
        "connection": connection,
        "status": response.get("code"),
        "refusal": refusal,
        "reasons": p.get("reasons") or [],
        "errors": p.get("errors") or [],
        "monitor": p.get("monitor") is True,
        **{k: p.get(k) for k in ("decision", "monitored", "policy_decision", "policy_revision", "risk", "upstream_status",
                                 "latency_ms", "decision_ms", "approval_id", "trace_id", "span_id", "shadow", "rpc",
                                 "error", "replica")},
    })
