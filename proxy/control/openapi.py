"""The control API described as OpenAPI 3.1, served at GET /v1/openapi.json.

Field names follow proxy/control/api.py and approvals_api.py (`approval_json`)
exactly; tests/test_openapi.py checks that every route the app registers is
described here and that approval bodies match their schemas.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .. import __version__
from ..store.models import APPROVAL_STATES as _STATES

APPROVAL_STATES = list(_STATES)

PROBLEM = "application/problem+json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _problem(description: str) -> dict:
    return {"$ref": f"#/components/responses/{description}"}


def _nullable(type_: str, **extra: Any) -> dict:
    return {"type": [type_, "null"], **extra}


TIMESTAMP = {"type": "string", "format": "date-time", "description": "UTC, ISO 8601 with milliseconds (e.g. 2025-01-31T12:00:00.000Z)."}
NULLABLE_TIMESTAMP = {**TIMESTAMP, "type": ["string", "null"]}
APPROVAL_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Approval id (`apr_` and 20 URL-safe characters).",
    "schema": {"type": "string"},
}
APPROVER_ONLY = [{"approverBearer": []}]
PUBLIC: list = []  # health and status endpoints: the control port is meant for operators, not agents

_RELOAD_STATUS = {
    "type": "object",
    "description": "The outcome of the latest policy (re)load.",
    "required": ["ok", "revision", "loaded_at", "last_attempt_at", "last_error", "reloads", "failed_reloads"],
    "properties": {
        "ok": {"type": "boolean", "description": "False while the last reload was rejected (the previous policies stay active)."},
        "revision": _nullable("string"),
        "loaded_at": _nullable("number", description="Epoch seconds."),
        "last_attempt_at": _nullable("number", description="Epoch seconds."),
        "last_error": {"type": "array", "items": {"type": "string"}},
        "reloads": {"type": "integer"},
        "failed_reloads": {"type": "integer"},
    },
}

_SHADOW_STATUS = {
    "type": ["object", "null"],
    "description": "Shadow (candidate) policies evaluated beside the active ones; null when none are configured.",
    "properties": {
        "dir": {"type": "string"},
        "loaded": {"type": "boolean"},
        "revision": _nullable("string"),
        "load_error": {"type": ["array", "string", "null"]},
        "reload_ok": {"type": "boolean"},
        "evaluations": {"type": "integer"},
        "disagreements": {"type": "integer"},
        "failures": {"type": "integer"},
    },
}

_VOTE = {
    "type": "object",
    "description": "One approver's vote.",
    "required": ["approver", "groups", "decision", "reason", "at"],
    "properties": {
        "approver": {"type": "string", "description": "The approver's id (token subject)."},
        "groups": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The approval groups this vote counted for.",
        },
        "decision": {"type": "string", "enum": ["approve", "deny"]},
        "reason": {"type": "string"},
        "at": TIMESTAMP,
    },
}

_APPROVAL_SUMMARY = {
    "type": "object",
    "description": "A held request and its approval state (as listed; without the request preview).",
    "required": [
        "id", "state", "agent", "action", "resource", "connector", "groups", "mode", "created_at", "expires_at",
        "escalated", "decided_at", "decided_by", "reason", "forwarded_at", "decision_id", "policies", "votes",
        "method", "url",
    ],
    "properties": {
        "id": {"type": "string", "examples": ["apr_Q2xhdWRlIHdhcyBoZXJl"]},
        "state": {
            "type": "string",
            "enum": APPROVAL_STATES,
            "description": "pending -> approved | denied | expired; approved -> forwarded (the one request "
            "released) or expired (not retried in time).",
        },
        "agent": {"type": "string", "description": "The agent whose request is held."},
        "action": {"type": "string", "examples": ["erp.purchase_order.create"]},
        "resource": {"type": "string", "description": 'Cedar entity reference, Type::"id".', "examples": ['PurchaseOrder::"new"']},
        "connector": {"type": "string"},
        "groups": {
            "type": "object",
            "additionalProperties": {"type": "integer", "minimum": 1},
            "description": "Approval group -> approvals required from it (N-of-M).",
        },
        "mode": {"type": "string", "enum": ["sync", "async"], "description": "How the agent waits."},
        "created_at": TIMESTAMP,
        "expires_at": TIMESTAMP,
        "escalated": {"type": "boolean"},
        "decided_at": NULLABLE_TIMESTAMP,
        "decided_by": _nullable("string"),
        "reason": _nullable("string", description="The deciding approver's reason (or why it expired)."),
        "forwarded_at": NULLABLE_TIMESTAMP,
        "decision_id": {"type": "string", "description": "The decision record entry that held the request."},
        "policies": {"type": "array", "items": {"type": "string"}, "description": "The @approval policies asking."},
        "votes": {"type": "array", "items": _ref("Vote")},
        "method": _nullable("string"),
        "url": _nullable("string"),
    },
}

_HELD_REQUEST = {
    "type": "object",
    "description": "The held request as approvers see it: credentials redacted, body pretty-printed and bounded.",
    "properties": {
        "method": {"type": "string"},
        "url": {"type": "string"},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "bound_headers": {
            "type": "object",
            "additionalProperties": _nullable("string"),
            "description": "The headers the approval is bound to: a retry is released only with exactly these "
            "values (null: the header must be absent). Missing on approvals stored before fingerprint v2.",
        },
        "fingerprint_version": {"type": "string", "description": "v3 (missing: stored before headers were bound)."},
        "body": _nullable("string"),
        "body_bytes": {"type": "integer"},
        "body_truncated": {"type": "boolean"},
    },
}

_DERIVED = {
    "type": "object",
    "description": "What Proctor derived from the request. Values are Cedar JSON: decimals and other "
    'extension values as {"__extn": {"fn": ..., "arg": ...}}, entity references as {"__entity": {"type", "id"}}.',
    "properties": {
        "action": {"type": "string"},
        "resource": {"type": "string"},
        "resource_attributes": {"type": "object"},
        "connector": {"type": "string"},
        "risk": {"type": "string"},
        "route": {"type": ["string", "null"]},
        "context": {
            "type": "object",
            "description": "The typed values Cedar saw: params, query_params, fields, rpc.",
        },
        "policies": {"type": "array", "items": {"type": "string"}},
    },
}

_APPROVAL = {
    "description": "One approval in full: the summary, the held request and what was derived from it.",
    "allOf": [
        _ref("ApprovalSummary"),
        {
            "type": "object",
            "required": ["request", "derived"],
            "properties": {
                "request": _ref("HeldRequest"),
                "derived": _ref("Derived"),
                "you_may_decide": {
                    "type": "boolean",
                    "description": "GET only: whether the calling approver may still vote on it.",
                },
            },
        },
    ],
}

_APPROVAL_STATUS = {
    "type": "object",
    "description": "What a held agent may learn about its own request.",
    "required": ["id", "state", "action", "resource", "expires_at", "decided_by", "reason"],
    "properties": {
        "id": {"type": "string"},
        "state": {"type": "string", "enum": APPROVAL_STATES},
        "action": {"type": "string"},
        "resource": {"type": "string"},
        "expires_at": TIMESTAMP,
        "decided_by": _nullable("string"),
        "reason": _nullable("string"),
    },
}

_APPROVAL_LIST = {
    "type": "object",
    "required": ["approvals", "total", "limit", "offset"],
    "properties": {
        "approvals": {"type": "array", "items": _ref("ApprovalSummary")},
        "total": {"type": "integer", "description": "Approvals in the selected states (agent and action filters not applied)."},
        "limit": {"type": "integer"},
        "offset": {"type": "integer"},
    },
}

_DECISION_REQUEST = {
    "type": "object",
    "required": ["reason"],
    "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 2000, "description": "Mandatory; recorded."}},
}

_PROBLEM = {
    "type": "object",
    "description": "RFC 9457 problem details.",
    "required": ["title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "default": "about:blank"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}

_COMPONENT = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "degraded", "down", "disabled"]},
        "reasons": {"type": "array", "items": {"type": "string"}, "description": "Why it keeps Proctor from being ready."},
    },
    "additionalProperties": True,
    "description": "One component; its other fields depend on the component (see docs/configuration.md).",
}

_HEALTH = {
    "type": "object",
    "required": ["status", "version", "uptime_seconds", "policy", "engine_running", "ready", "components"],
    "properties": {
        "status": {
            "type": "string",
            "enum": ["ok", "degraded"],
            "description": "degraded: the last policy reload was rejected, or a component is not ok.",
        },
        "version": {"type": "string"},
        "uptime_seconds": {"type": "number"},
        "policy": _ref("ReloadStatus"),
        "engine_running": {"type": "boolean"},
        "ready": {"type": "boolean", "description": "What /readyz answers."},
        "components": {
            "type": "object",
            "required": ["listeners", "store", "policies", "audit", "identity"],
            "properties": {k: _COMPONENT for k in ("listeners", "store", "policies", "audit", "identity")},
        },
    },
}

_POLICY_STATUS = {
    "type": "object",
    "required": ["active_revision", "policy_count", "loaded_at", "files", "reload", "shadow"],
    "properties": {
        "active_revision": {"type": "string"},
        "policy_count": {"type": "integer"},
        "loaded_at": {"type": "number", "description": "Epoch seconds."},
        "files": {"type": "array", "items": {"type": "string"}},
        "reload": _ref("ReloadStatus"),
        "shadow": _ref("ShadowStatus"),
    },
}

_RELOAD_RESULT = {
    "type": "object",
    "required": ["reloaded", "active_revision", "reload"],
    "properties": {
        "reloaded": {"type": "boolean"},
        "active_revision": {"type": "string"},
        "reload": _ref("ReloadStatus"),
    },
}

_STATS = {
    "type": "object",
    "required": ["engine", "records_written"],
    "properties": {
        "engine": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "Engine counters."},
        "records_written": {"type": "integer"},
    },
}

_WHOAMI = {
    "type": "object",
    "required": ["approver", "groups"],
    "properties": {"approver": {"type": "string"}, "groups": {"type": "array", "items": {"type": "string"}}},
}

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before asking again (pending only).", "schema": {"type": "integer"}}}

_RESPONSES = {
    "BadRequest": {"description": "The request is malformed (bad filter, paging, JSON or reason).",
                   "content": {PROBLEM: {"schema": _ref("Problem")}}},
    "Unauthorized": {
        "description": "No token, or the token failed verification (expired, wrong audience, unknown issuer...).",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": {PROBLEM: {"schema": _ref("Problem")}},
    },
    "Forbidden": {
        "description": "Refused: a cross-site Origin; for approvals, the approver's own request or not in an approving "
        "group; for governance, not in the operators' group.",
        "content": {PROBLEM: {"schema": _ref("Problem")}},
    },
    "NotFound": {"description": "No such approval (for this caller).", "content": {PROBLEM: {"schema": _ref("Problem")}}},
    "Conflict": {
        "description": "The approval is no longer pending (decided or expired), or this approver already voted.",
        "content": {PROBLEM: {"schema": _ref("Problem")}},
    },
    "UnsupportedMediaType": {"description": "The body must be application/json.", "content": {PROBLEM: {"schema": _ref("Problem")}}},
    "Unavailable": {
        "description": "The approval store or the identity provider cannot be reached; try again.",
        "content": {PROBLEM: {"schema": _ref("Problem")}},
    },
}


def _op(summary: str, responses: dict, security: list, tags: list[str], op_id: str, **extra: Any) -> dict:
    return {"summary": summary, "operationId": op_id, "tags": tags, "security": security, "responses": responses, **extra}


def _decide_op(decision: str) -> dict:
    verb = "Approve" if decision == "approve" else "Deny"
    return _op(
        f"{verb} a held request",
        {
            "200": _json(_ref("Approval"), "The vote was recorded; the approval as it now stands (still `pending` "
                         "while other groups' quorums are not met)."),
            "400": _problem("BadRequest"),
            "401": _problem("Unauthorized"),
            "403": _problem("Forbidden"),
            "404": _problem("NotFound"),
            "409": _problem("Conflict"),
            "415": _problem("UnsupportedMediaType"),
            "503": _problem("Unavailable"),
        },
        APPROVER_ONLY,
        ["approvals"],
        f"{decision}Approval",
        description="Requires a JSON body with a reason. An approver cannot decide their own request, must be in "
        "one of the approval's groups (or the escalation group once escalated) and votes once. Requests with a "
        "foreign `Origin` header are refused (CSRF).",
        parameters=[APPROVAL_ID],
        requestBody={"required": True, "content": {"application/json": {"schema": _ref("DecisionRequest")}}},
    )


OPERATOR_ONLY = [{"operatorBearer": []}]
SUSPENSION_KINDS = ["agent", "connector", "action"]

_SUSPENSION = {
    "type": "object",
    "description": "A kill-switch entry: requests from this agent, to this connector or for this action are refused.",
    "required": ["kind", "target", "since", "by", "reason"],
    "properties": {
        "kind": {"type": "string", "enum": SUSPENSION_KINDS},
        "target": {"type": "string"},
        "since": TIMESTAMP,
        "by": {"type": "string"},
        "reason": {"type": "string"},
    },
}

_AGENT = {
    "type": "object",
    "description": "An agent in the registry (registered in advance, or recorded when first seen).",
    "required": ["id", "owner", "team", "description", "registered", "first_seen", "last_seen", "requests",
                 "allowed", "denied", "status", "suspension"],
    "properties": {
        "id": {"type": "string"},
        "owner": {"type": "string"},
        "team": {"type": "string"},
        "description": {"type": "string"},
        "registered": {"type": "boolean"},
        "first_seen": NULLABLE_TIMESTAMP,
        "last_seen": NULLABLE_TIMESTAMP,
        "requests": {"type": "integer"},
        "allowed": {"type": "integer"},
        "denied": {"type": "integer"},
        "status": {"type": "string", "enum": ["active", "suspended"]},
        "suspension": {"oneOf": [_ref("Suspension"), {"type": "null"}]},
    },
}

_REASON_BODY = {
    "type": "object",
    "required": ["reason"],
    "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 2000}},
}


def _gov_op(summary: str, ok: dict, op_id: str, errors: tuple[str, ...] = (), **extra: Any) -> dict:
    responses = dict(ok)
    names = {"400": "BadRequest", "401": "Unauthorized", "403": "Forbidden", "404": "NotFound",
             "415": "UnsupportedMediaType", "503": "Unavailable"}
    for code in ("401", "403", *errors, "503"):
        responses[code] = _problem(names[code])
    return _op(summary, responses, OPERATOR_ONLY, ["governance"], op_id, **extra)


def _json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


AGENT_ID = {**APPROVAL_ID, "description": "Agent id."}

_GOVERNANCE_PATHS = {
    "/v1/agents": {
        "get": _gov_op("The agent registry", {"200": _json(_ref("AgentList"), "Every known agent.")}, "listAgents"),
        "post": _gov_op(
            "Register (or update) an agent",
            {"201": _json(_ref("Agent"), "The agent as registered.")}, "registerAgent", ("400", "415"),
            requestBody=_json_body(_ref("AgentRegistration")),
        ),
    },
    "/v1/agents/{id}": {
        "get": _gov_op("One agent", {"200": _json(_ref("Agent"), "The agent.")}, "getAgent", ("404",),
                       parameters=[AGENT_ID]),
    },
    "/v1/agents/{id}/suspend": {
        "post": _gov_op(
            "Suspend an agent (kill switch)", {"201": _json(_ref("Suspension"), "Suspended.")}, "suspendAgent",
            ("400", "415"), parameters=[AGENT_ID], requestBody=_json_body(_REASON_BODY),
        ),
    },
    "/v1/agents/{id}/resume": {
        "post": _gov_op(
            "Lift an agent's suspension", {"200": _json(_ref("ResumeResult"), "Resumed.")}, "resumeAgent",
            ("400", "404", "415"), parameters=[AGENT_ID],
            requestBody=_json_body({"type": "object", "properties": {"reason": {"type": "string"}}}),
        ),
    },
    "/v1/suspensions": {
        "get": _gov_op("Active suspensions", {"200": _json(_ref("SuspensionList"), "Suspensions.")}, "listSuspensions"),
        "post": _gov_op(
            "Suspend an agent, connector or action", {"201": _json(_ref("Suspension"), "Suspended.")},
            "createSuspension", ("400", "415"), requestBody=_json_body(_ref("SuspensionRequest")),
        ),
    },
    "/v1/suspensions/{kind}/{target}": {
        "delete": _gov_op(
            "Lift a suspension", {"200": _json(_ref("ResumeResult"), "Resumed.")}, "deleteSuspension", ("404",),
            parameters=[
                {"name": "kind", "in": "path", "required": True, "schema": {"type": "string", "enum": SUSPENSION_KINDS}},
                {"name": "target", "in": "path", "required": True, "schema": {"type": "string"}},
                {"name": "reason", "in": "query", "description": "Recorded with the resumption.", "schema": {"type": "string"}},
            ],
        ),
    },
}

_GOVERNANCE_SCHEMAS = {
    "Agent": _AGENT,
    "AgentList": {"type": "object", "required": ["agents"], "properties": {"agents": {"type": "array", "items": _ref("Agent")}}},
    "AgentRegistration": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 256},
            "owner": {"type": "string", "maxLength": 1000},
            "team": {"type": "string", "maxLength": 1000},
            "description": {"type": "string", "maxLength": 1000},
        },
    },
    "Suspension": _SUSPENSION,
    "SuspensionList": {
        "type": "object",
        "required": ["suspensions"],
        "properties": {"suspensions": {"type": "array", "items": _ref("Suspension")}},
    },
    "SuspensionRequest": {
        "type": "object",
        "required": ["kind", "target", "reason"],
        "properties": {
            "kind": {"type": "string", "enum": SUSPENSION_KINDS},
            "target": {"type": "string", "minLength": 1, "maxLength": 256},
            "reason": {"type": "string", "minLength": 1, "maxLength": 2000},
        },
    },
    "ResumeResult": {
        "type": "object",
        "required": ["kind", "target", "resumed_by"],
        "properties": {
            "kind": {"type": "string", "enum": SUSPENSION_KINDS},
            "target": {"type": "string"},
            "resumed_by": {"type": "string"},
        },
    },
}


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Proctor control API",
        "version": __version__,
        "description": "Health, policy status, metrics, human approval of held agent requests, the agent "
        "registry and the kill switch. Served on the "
        "control port (default 127.0.0.1:8081).",
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "tags": [
        {"name": "health", "description": "Liveness, readiness, metrics and counters."},
        {"name": "policies", "description": "The active policy set."},
        {"name": "approvals", "description": "Requests held by @approval policies, decided by people."},
        {"name": "governance", "description": "The agent registry and the kill switch (operators only)."},
        {"name": "meta", "description": "This document."},
    ],
    "paths": {
        "/healthz": {
            "get": _op("Liveness, the policy reload status and each component's state",
                       {"200": _json(_ref("Health"), "Alive (always 200 while the process answers).")}, PUBLIC,
                       ["health"], "healthz")
        },
        "/readyz": {
            "get": _op(
                "Readiness: listeners bound, store verified, policies loaded, audit gate open",
                {
                    "200": _json(_ref("Ready"), "Ready to take agent traffic."),
                    "503": _json(_ref("Ready"), "Not ready: `reasons` says which part is down."),
                },
                PUBLIC, ["health"], "readyz",
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                {"200": {"description": "Prometheus text exposition format.",
                         "content": {"text/plain": {"schema": {"type": "string"}}}}},
                PUBLIC, ["health"], "metrics",
            )
        },
        "/v1/stats": {
            "get": _op("Engine counters", {"200": _json(_ref("Stats"), "Counters.")}, PUBLIC, ["health"], "stats")
        },
        "/v1/policies": {
            "get": _op("The active policy set and reload status", {"200": _json(_ref("PolicyStatus"), "Status.")},
                       PUBLIC, ["policies"], "policyStatus")
        },
        "/v1/policies/reload": {
            "post": _op(
                "Reload the policies now (loopback callers only)",
                {
                    "200": _json(_ref("ReloadResult"), "Reloaded."),
                    "403": _json(
                        {"type": "object", "properties": {"title": {"type": "string"}, "detail": {"type": "string"}}},
                        "The caller is not on loopback.",
                    ),
                    "422": _json(_ref("ReloadResult"), "The new policies were rejected; the previous ones stay active."),
                },
                PUBLIC, ["policies"], "reloadPolicies",
            )
        },
        "/v1/policies/revisions": {
            "get": _op(
                "The policy revisions kept (newest first) and the active one",
                {"200": _json({"type": "object", "required": ["active_revision", "revisions"], "properties": {
                    "active_revision": {"type": "string"},
                    "revisions": {"type": "array", "items": {"type": "object", "properties": {
                        "revision": {"type": "string"}, "loaded_at": {"type": "string", "format": "date-time"},
                        "active": {"type": "boolean"}, "files": {"type": "array", "items": {"type": "string"}}}}}}},
                    "Revisions."),
                 "401": _problem("Unauthorized"), "403": _problem("Forbidden"), "503": _problem("Unavailable")},
                OPERATOR_ONLY, ["policies"], "policyRevisions",
            )
        },
        "/v1/policies/rollback": {
            "post": _op(
                "Restore an earlier revision: its files are written back into the policy directory and loaded",
                {"200": _json({"type": "object", "properties": {
                    "active_revision": {"type": "string"}, "previous_revision": {"type": "string"},
                    "files_changed": {"type": "array", "items": {"type": "string"}}}}, "Rolled back."),
                 "400": _problem("BadRequest"), "401": _problem("Unauthorized"),
                 "403": _problem("Forbidden"), "404": _problem("NotFound"),
                 "409": _problem("Conflict"),
                 "415": _problem("UnsupportedMediaType"), "503": _problem("Unavailable")},
                OPERATOR_ONLY, ["policies"], "rollbackPolicies",
                requestBody=_json_body({"type": "object", "required": ["revision", "reason"], "properties": {
                    "revision": {"type": "string"}, "reason": {"type": "string", "minLength": 1}}}),
            )
        },
        "/v1/activity": {
            "get": _op(
                "Recent audit events (newest first), summarised",
                {"200": _json({"type": "object", "required": ["events"], "properties": {
                    "events": {"type": "array", "items": {"type": "object"}},
                    "next_before_sequence": {"type": ["integer", "null"]},
                    "limit": {"type": "integer"},
                    "audit": {"type": "string", "description": "\"disabled\" when no audit file is configured."}}},
                    "A page of events."),
                 "400": _problem("BadRequest"), "401": _problem("Unauthorized"), "503": _problem("Unavailable")},
                APPROVER_ONLY, ["governance"], "activity",
                parameters=[
                    {"name": n, "in": "query", "schema": {"type": t}} for n, t in (
                        ("limit", "integer"), ("agent", "string"), ("action", "string"), ("decision", "string"),
                        ("record", "string"), ("before_sequence", "integer"))
                ],
            )
        },
        "/v1/whoami": {
            "get": _op(
                "The calling approver and their approval groups",
                {"200": _json(_ref("WhoAmI"), "The verified approver."), "401": _problem("Unauthorized"),
                 "503": _problem("Unavailable")},
                APPROVER_ONLY, ["approvals"], "whoami",
            )
        },
        "/v1/approvals": {
            "get": _op(
                "List approvals, newest first",
                {
                    "200": _json(_ref("ApprovalList"), "A page of approvals."),
                    "400": _problem("BadRequest"),
                    "401": _problem("Unauthorized"),
                    "503": _problem("Unavailable"),
                },
                APPROVER_ONLY, ["approvals"], "listApprovals",
                parameters=[
                    {"name": "state", "in": "query", "description": "Comma-separated states; all states when absent.",
                     "schema": {"type": "string"}, "examples": {"open": {"value": "pending,approved"}}},
                    {"name": "agent", "in": "query", "description": "Only this agent's requests.", "schema": {"type": "string"}},
                    {"name": "action", "in": "query", "description": "Only this action.", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "description": "Page size (clamped to 1..1000).",
                     "schema": {"type": "integer", "default": 100, "minimum": 1, "maximum": 1000}},
                    {"name": "offset", "in": "query", "schema": {"type": "integer", "default": 0, "minimum": 0}},
                ],
            )
        },
        "/v1/approvals/events": {
            "get": _op(
                "Live approval changes (server-sent events)",
                {
                    "200": {
                        "description": "One `approval` event per state change, data "
                        '`{"event": "requested|voted|approved|denied|expired|escalated|forwarded", "approval": '
                        "ApprovalSummary}`; comment lines keep the stream alive every 15 s.",
                        "content": {"text/event-stream": {"schema": {"type": "string"},
                                                          "x-event-data": _ref("ApprovalEvent")}},
                    },
                    "401": _problem("Unauthorized"),
                    "503": _problem("Unavailable"),
                },
                APPROVER_ONLY, ["approvals"], "approvalEvents",
            )
        },
        "/v1/approvals/{id}": {
            "get": _op(
                "One approval in full",
                {
                    "200": _json(_ref("Approval"), "The approval, with `you_may_decide`."),
                    "401": _problem("Unauthorized"),
                    "404": _problem("NotFound"),
                    "503": _problem("Unavailable"),
                },
                APPROVER_ONLY, ["approvals"], "getApproval", parameters=[APPROVAL_ID],
            )
        },
        "/v1/approvals/{id}/status": {
            "get": _op(
                "The state of a held request, for the agent that sent it",
                {
                    "200": _json(_ref("ApprovalStatus"), "The approval's state.", headers=_RETRY_AFTER),
                    "401": _problem("Unauthorized"),
                    "404": _problem("NotFound"),
                    "503": _problem("Unavailable"),
                },
                [{"agentBearer": []}, {"approverBearer": []}], ["approvals"], "approvalStatus",
                description="The held agent authenticates with its own agent token (Authorization or "
                "Proxy-Authorization: Bearer) and sees only its own approvals; an approver token sees any.",
                parameters=[APPROVAL_ID],
            )
        },
        "/v1/approvals/{id}/approve": {"post": _decide_op("approve")},
        "/v1/approvals/{id}/deny": {"post": _decide_op("deny")},
        **_GOVERNANCE_PATHS,
        "/v1/openapi.json": {
            "get": _op(
                "This document",
                {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {"type": "object"}}}}},
                PUBLIC, ["meta"], "openapi",
            )
        },
    },
    "components": {
        "securitySchemes": {
            "approverBearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "A human approver's JWT from a trusted issuer for the approver audience "
                "(`approvals.approver_audience`, default `proctor-approvers`); the approval groups come from the "
                "`approvals.approver_groups_claim` claim (default `approval_groups`). Dev: "
                "`proctor token issue --approver alice --group procurement-managers`.",
            },
            "operatorBearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "An operator's JWT: like an approver token (same audience and groups claim), and the "
                "groups must include `control.admin_group` (default `proctor-admins`).",
            },
            "agentBearer": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "The agent's own token (the agent audience), accepted by the status endpoint only.",
            },
        },
        "responses": _RESPONSES,
        "schemas": {
            "Approval": _APPROVAL,
            "ApprovalSummary": _APPROVAL_SUMMARY,
            "ApprovalStatus": _APPROVAL_STATUS,
            "ApprovalList": _APPROVAL_LIST,
            "ApprovalEvent": {
                "type": "object",
                "required": ["event", "approval"],
                "properties": {"event": {"type": "string"}, "approval": _ref("ApprovalSummary")},
            },
            "Vote": _VOTE,
            "HeldRequest": _HELD_REQUEST,
            "Derived": _DERIVED,
            "DecisionRequest": _DECISION_REQUEST,
            "Problem": _PROBLEM,
            "WhoAmI": _WHOAMI,
            "Health": _HEALTH,
            "Ready": {
                "type": "object",
                "required": ["ready", "reasons"],
                "properties": {
                    "ready": {"type": "boolean"},
                    "reasons": {"type": "array", "items": {"type": "string"}, "description": "Empty when ready."},
                },
            },
            "Stats": _STATS,
            "PolicyStatus": _POLICY_STATUS,
            "ReloadStatus": _RELOAD_STATUS,
            "ReloadResult": _RELOAD_RESULT,
            "ShadowStatus": _SHADOW_STATUS,
            **_GOVERNANCE_SCHEMAS,
        },
    },
}


def add_openapi_route(app: web.Application) -> None:
    """Serve OPENAPI at GET /v1/openapi.json."""

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(OPENAPI, headers={"Cache-Control": "no-cache"})

    app.router.add_get("/v1/openapi.json", openapi)
