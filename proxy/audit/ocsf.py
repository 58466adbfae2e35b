"""Decision-record lines as OCSF 1.3.0 API Activity events (class 6003).

One event per decision and per state change (approval, suspension, policy
rollback), plus the trail's own `audit` events (a gap in a file, a repair). The mapping is documented field by field in docs/siem.md; Proctor
specifics that OCSF has no attribute for live under `unmapped.proctor`.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from .. import __version__

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


def _resource(uid: str | None, resource: dict | None = None) -> list[dict[str, Any]]:
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


def decision_event(rec: dict[str, Any]) -> dict[str, Any]:
    """A decision record as an API Activity event."""
    decision = rec.get("decision") or "deny"
    refusal = rec.get("refusal") or {}
    kind = refusal.get("kind")
    allowed = decision == "allow"
    if allowed:
        severity = 1
    elif decision == "hold":
        severity = 2
    elif kind in ("fail-closed", "suspended"):
        severity = 4
    else:
        severity = 3
    status = rec.get("status")
    status_ok = allowed and (status is None or int(status) < 400)
    method = (rec.get("method") or "").upper()
    ev = _base(METHOD_ACTIVITY.get(method, 99 if method else 0), _ms(rec.get("time")), severity, status_ok)
    ev["metadata"]["correlation_uid"] = rec.get("decision_id")
    agent = rec.get("agent")
    cedar = rec.get("cedar") or {}
    principal = cedar.get("principal") or {}
    actor: dict[str, Any] = {}
    if agent:
        user: dict[str, Any] = {"uid": agent, "name": agent, "type_id": 99, "type": "AI agent"}
        groups = [p.get("id") for p in principal.get("parents", []) if isinstance(p, dict) and p.get("id")]
        if groups:
            user["groups"] = [{"name": g} for g in groups]
        actor["user"] = user
    if not agent:
        actor["user"] = {"name": "unauthenticated", "type_id": 0, "type": "Unknown"}
    if rec.get("issuer"):
        actor["idp"] = {"name": rec["issuer"]}
    reasons = rec.get("reasons") or []
    policy_decision = rec.get("policy_decision")
    if policy_decision is not None:
        revision = rec.get("policy_revision")
        if reasons:
            actor["authorizations"] = [
                {"decision": policy_decision, "policy": {"uid": pid, "name": pid, "version": revision, "is_applied": True}}
                for pid in reasons
            ]
        else:
            actor["authorizations"] = [
                {"decision": policy_decision, "policy": {"name": "default-deny" if policy_decision == "deny" else "none",
                                                         "version": revision, "is_applied": True}}
            ]
    elif reasons:  # refused before Cedar, e.g. egress-default-deny
        actor["authorizations"] = [{"decision": "deny", "policy": {"uid": r, "name": r, "is_applied": True}} for r in reasons]
    ev["actor"] = actor
    api: dict[str, Any] = {"operation": rec.get("action") or "http.request", "request": {"uid": rec.get("decision_id") or ""}}
    if rec.get("connector"):
        api["service"] = {"name": rec["connector"]}
    response: dict[str, Any] = {}
    if status is not None:
        response["code"] = int(status)
    if refusal:
        response["error"] = kind or "refused"
        response["error_message"] = refusal.get("title", "")
    if response:
        api["response"] = response
    ev["api"] = api
    ev["resources"] = _resource(rec.get("resource"), cedar.get("resource"))
    if method:
        url: dict[str, Any] = {"hostname": rec.get("host") or "", "path": rec.get("path") or ""}
        if rec.get("port"):
            url["port"] = int(rec["port"])
        ev["http_request"] = {"http_method": method, "url": url}
    ev["src_endpoint"] = {"ip": rec.get("client_ip") or "0.0.0.0"}
    if rec.get("host"):
        ev["dst_endpoint"] = {"hostname": rec["host"], **({"port": int(rec["port"])} if rec.get("port") else {})}
    if rec.get("latency_ms") is not None:
        ev["duration"] = int(round(rec["latency_ms"]))
        ev["start_time"] = ev["time"]
        ev["end_time"] = ev["time"] + ev["duration"]
    if refusal:
        ev["status_detail"] = f"{refusal.get('title', '')}: {refusal.get('detail', '')}"[:2000]
    ev["status_code"] = str(status) if status is not None else None
    if ev["status_code"] is None:
        del ev["status_code"]
    ev["message"] = f"{agent or 'unauthenticated'} {rec.get('action') or rec.get('method') or '?'} " \
                    f"{rec.get('resource') or rec.get('host') or ''}: {decision}".strip()
    proctor = {
        "record": "decision",
        "decision": decision,
        "policy_decision": policy_decision,
        "reasons": reasons,
        "policy_revision": rec.get("policy_revision"),
        "risk": rec.get("risk"),
        "mode": rec.get("mode"),
        "upstream_status": rec.get("upstream_status"),
        "latency_ms": rec.get("latency_ms"),
        "decision_ms": rec.get("decision_ms"),
        "approval_id": rec.get("approval_id"),
        "trace_id": rec.get("trace_id"),
        "span_id": rec.get("span_id"),
        "shadow": rec.get("shadow"),
        "rpc": rec.get("rpc"),
        "context": cedar.get("context"),
        "error": rec.get("error"),
        "errors": rec.get("errors"),
    }
    ev["unmapped"] = {"proctor": {k: v for k, v in proctor.items() if v is not None}}
    return ev


def state_change_event(rec: dict[str, Any]) -> dict[str, Any]:
    """An approval, suspension or policy state-change line as an API Activity event."""
    rtype, event = rec.get("type"), rec.get("event", "")
    by = rec.get("by")
    ev = _base(3 if event not in ("requested",) else 1, _ms(rec.get("time")), 2 if event in ("denied", "suspended", "rollback", "expired") else 1, True)
    if rtype == "approval":
        actor_id = by or rec.get("agent") or "proctor"
        ev["actor"] = {"user": {"uid": actor_id, "name": actor_id, "type_id": 1 if by else 99, "type": "User" if by else "AI agent"}}
        ev["api"] = {"operation": f"proctor.approval.{event}", "request": {"uid": rec.get("approval_id") or ""},
                     "service": {"name": "proctor.approvals"}}
        ev["resources"] = _resource(rec.get("resource")) + [{"uid": rec.get("approval_id") or "", "type": "Approval"}]
        ev["metadata"]["correlation_uid"] = rec.get("decision_id")
        ev["message"] = f"approval {rec.get('approval_id')} {event}" + (f" by {by}" if by else "") + \
                        f" ({rec.get('agent')} {rec.get('action')} {rec.get('resource')})"
    elif rtype == "suspension":
        ev["actor"] = {"user": {"uid": by or "?", "name": by or "?", "type_id": 1, "type": "User"}}
        ev["api"] = {"operation": f"proctor.{'suspend' if event == 'suspended' else 'resume'}",
                     "request": {"uid": f"{rec.get('kind')}:{rec.get('target')}"}, "service": {"name": "proctor.governance"}}
        ev["resources"] = [{"uid": str(rec.get("target")), "type": str(rec.get("kind"))}]
        ev["message"] = f"{rec.get('kind')} {rec.get('target')} {event} by {by}: {rec.get('reason', '')}"
    elif rtype == "audit":
        # the trail about itself: events a file could not take (gap), a torn line cut off (repaired)
        ev = _base(99, _ms(rec.get("time")), 4 if event == "gap" else 2, True)
        ev["actor"] = {"user": {"uid": "proctor", "name": "proctor", "type_id": 3, "type": "System"}}
        ev["api"] = {"operation": f"proctor.audit.{event}", "request": {"uid": str(rec.get("path") or "")},
                     "service": {"name": "proctor.audit"}}
        ev["resources"] = [{"uid": str(rec.get("path") or ""), "type": "AuditFile"}]
        if event == "gap":
            ev["message"] = (f"audit file {rec.get('path')}: {rec.get('count')} event(s) (sequence {rec.get('from')}.."
                             f"{rec.get('to')}) not written: {rec.get('reason')}")
        else:
            ev["message"] = f"audit file {rec.get('path')}: {rec.get('reason')} ({rec.get('removed_bytes')} bytes)"
    else:
        ev["actor"] = {"user": {"uid": by or "?", "name": by or "?", "type_id": 1, "type": "User"}}
        ev["api"] = {"operation": f"proctor.policy.{event}", "request": {"uid": str(rec.get("to_revision") or "")},
                     "service": {"name": "proctor.policies"}}
        ev["resources"] = [{"uid": str(rec.get("to_revision") or ""), "type": "PolicyRevision"}]
        ev["message"] = f"policy {event} {rec.get('from_revision')} -> {rec.get('to_revision')} by {by}"
    ev["src_endpoint"] = {"name": "proctor"}
    details = {k: v for k, v in rec.items() if k not in ("time",)}
    ev["unmapped"] = {"proctor": {"record": rtype, **details}}
    return ev


def to_ocsf(rec: dict[str, Any]) -> dict[str, Any]:
    return state_change_event(rec) if "type" in rec else decision_event(rec)
