"""The activity view's rows (GET /v1/activity, the console's Activity view): one audit
event read back into its typed record (`ocsf.read_event`), then shown.

A row is flat and leaves out what has no value. Every row has the event's envelope
(`sequence`, `time`, `record`, `operation`, `severity`, `message`); the rest comes
from the record: for a decision what the agent asked and was answered, for a state
change who changed what. No request context and no chain: a row is a summary.
"""

from __future__ import annotations

from typing import Any

from ..record.model import (ApprovalEvent, BudgetEventRecord, DecisionRecord, DuplicateEvent, PolicyEvent, Record,
                             SuspensionEvent)
from .ocsf import EventEnvelope, read_event


def activity_row(env: EventEnvelope, rec: Record | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "sequence": env.sequence,
        "time": env.time,
        "record": env.record,
        "operation": env.operation,
        "severity": env.severity,
        "message": env.message,
        "replica": rec.replica if rec is not None else None,  # where it happened (fleet views merge replicas)
    }
    if isinstance(rec, DecisionRecord):
        req = rec.request
        out.update({
            "agent": rec.agent,
            "action": rec.action if rec.action is not None else env.operation,  # unclassified: http.request
            "resource": rec.resource,
            "connector": rec.connector,
            "decision": rec.decision,
            "monitor": True if rec.monitor else None,  # monitor mode (only shown when on)
            "monitored": rec.monitored,  # what it would have been, not enforced
            "status": rec.status,
            "refusal": rec.refusal["kind"] if rec.refusal is not None else None,
            "detail": env.status_detail,  # as the trail wrote it (redacted)
            "reasons": rec.reasons,
            "policy_decision": rec.policy_decision,
            "policy_revision": rec.policy_revision,
            "approval_id": rec.approval_id,
            "decision_id": rec.decision_id,
            "method": req.method if req is not None else None,
            "host": req.host if req is not None else None,
            "path": req.path if req is not None else None,
            "mode": rec.mode,
            "risk": rec.risk,
            "latency_ms": rec.latency_ms,
            "shadow": rec.shadow,
            "error": rec.error,
        })
    else:
        # a state change; an unknown kind of record shows its envelope and event only
        out.update({"decision": env.event, "event": env.event})
        if rec is not None:
            out.update({"by": getattr(rec, "by", None), "reason": rec.reason})
        if isinstance(rec, ApprovalEvent):
            out.update({
                "agent": rec.agent,
                "action": rec.action,
                "resource": rec.resource,
                "approval_id": rec.approval_id,
                "decision_id": rec.decision_id or env.correlation_uid,
            })
        elif isinstance(rec, SuspensionEvent):
            kind, target = rec.kind, rec.target
            out.update({
                "agent": target if kind == "agent" else None,
                "action": target if kind == "action" else None,
                "connector": target if kind == "connector" else None,
                "resource": f"{kind}:{target}",
                "kind": kind,
                "target": target,
            })
        elif isinstance(rec, DuplicateEvent):
            out.update({
                "agent": rec.agent,
                "action": rec.action,
                "resource": rec.resource,
                "connector": rec.connector,
                "decision_id": rec.decision_id,
                "first_decision_id": rec.first_decision_id,
                "kind": rec.kind or rec.mechanism,
            })
        elif isinstance(rec, BudgetEventRecord):
            out.update({
                "agent": rec.agent,
                "action": rec.action,
                "resource": rec.budget,
                "connector": rec.connector,
                "decision_id": rec.decision_id,
                "kind": rec.outcome,
            })
        elif isinstance(rec, PolicyEvent):
            out.update({
                "resource": rec.to_revision,
                "from_revision": rec.from_revision,
                "to_revision": rec.to_revision,
            })
    return {k: v for k, v in out.items() if v is not None}


def summarize(ev: dict[str, Any]) -> dict[str, Any]:
    """One OCSF event (a line of the audit file) as the activity view's row."""
    return activity_row(*read_event(ev))
