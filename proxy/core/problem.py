"""RFC 9457 problem+json bodies for refusals (the format ARCHITECTURE.md fixes)."""

from __future__ import annotations

import json
from typing import Any

from ..logredact import redact
from .exchange import HOLD_KIND, Exchange

PROBLEM_CONTENT_TYPE = "application/problem+json"
DECISION_HEADER = "X-Proctor-Decision-Id"


def problem_body(outcome: Exchange) -> dict[str, Any]:
    """The refusal as a problem+json object: title, detail, decision_id, action, resource, reasons."""
    refusal = outcome.refusal
    assert refusal is not None
    cls = outcome.classification
    body = {
        "type": f"https://proctor.dev/problems/{refusal.kind}",
        "title": refusal.title,
        "status": refusal.status,
        # a detail never quotes a query string, userinfo or header value (docs/security.md)
        "detail": redact(refusal.detail),
        "decision_id": outcome.decision_id,
        "action": cls.action if cls else None,
        "resource": cls.resource_uid if cls else None,
        "reasons": list(refusal.reasons),
    }
    if outcome.identity is not None:
        body["agent"] = outcome.identity.agent_id
    body.update(refusal.extra)
    return body


def problem_response(outcome: Exchange) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body bytes for a refused outcome."""
    refusal = outcome.refusal
    assert refusal is not None
    headers = {
        # a 202 "held for approval" answer is not a problem: plain JSON, same fields
        "Content-Type": PROBLEM_CONTENT_TYPE if refusal.status >= 400 else "application/json",
        "Cache-Control": "no-store",
        DECISION_HEADER: outcome.decision_id,
    }
    headers.update(refusal.headers)
    body = json.dumps(problem_body(outcome), separators=(",", ":")).encode()
    return refusal.status, headers, body


# JSON-RPC error codes for refusals (the -32000..-32099 range is for servers).
JSONRPC_CODES = {
    "policy": -32001,
    "policy-error": -32001,
    "egress": -32601,  # no operation maps the call: "method not found"
    "request": -32602,  # invalid params / values
    "fail-closed": -32603,
    "approval-pending": -32002,
    "approval-denied": -32001,
    "approval-expired": -32001,
    "approval-used": -32001,
}


# A held message no caller awaits an answer to: not 202 (MCP: "accepted"), it was not forwarded.
JSONRPC_HOLD_STATUS = 429


def jsonrpc_error_response(outcome: Exchange) -> tuple[int, dict[str, str], bytes]:
    """A refusal on a JSON-RPC endpoint, as the JSON-RPC error object agent loops understand:
    `{"jsonrpc": "2.0", "id": <the call's id>, "error": {...}}`, the problem fields
    (decision_id, action, resource, reasons, and the HTTP status the refusal stands for)
    in `error.data`.

    A call (a request with an id) is answered HTTP 200, the error its caller waits on. A
    message no caller awaits an answer to (a notification, a response the agent sends back,
    anything that is no single call) has `"id": null` and the refusal's HTTP status (a hold:
    429 with Retry-After), as MCP Streamable HTTP has a server that cannot accept one answer.
    """
    refusal = outcome.refusal
    assert refusal is not None
    problem = problem_body(outcome)
    if outcome.jsonrpc_id is None:
        status = refusal.status if refusal.status >= 400 else JSONRPC_HOLD_STATUS
    else:
        status = 200
    body = {
        "jsonrpc": "2.0",
        "id": outcome.jsonrpc_id,
        "error": {
            "code": JSONRPC_CODES.get(refusal.kind, -32000),
            "message": f"{refusal.title}: {problem['detail']}",
            "data": problem,
        },
    }
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", DECISION_HEADER: outcome.decision_id}
    headers.update(refusal.headers)
    return status, headers, json.dumps(body, separators=(",", ":")).encode()


# OpenAI's error object (`error_format: openai`): the `type` by the status answered. The SDKs
# pick their exception class by status (PermissionDeniedError, RateLimitError, ...) and expose
# `type`, `code` and `param` from the object; other members (Proctor's) are left alone.
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    407: "authentication_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
# A hold is no result: answered 2xx, an SDK would read the refusal as a completion. It is a
# 429 with Retry-After, which the SDKs retry by themselves (the approved retry goes through).
OPENAI_HOLD_STATUS = 429


def openai_error_response(outcome: Exchange) -> tuple[int, dict[str, str], bytes]:
    """A refusal in OpenAI's error shape, so OpenAI SDKs and compatible clients show the reason:

    `{"error": {"message": "<title>: <detail> (decision_id <id>)", "type", "param": null,
    "code": <refusal kind>, "proctor": {<the problem object>}}}` with the refusal's status and
    headers (a hold, 202 elsewhere, is a 429); the problem fields (decision_id, action,
    resource, reasons, ...) are in `error.proctor`.
    """
    refusal = outcome.refusal
    assert refusal is not None
    problem = problem_body(outcome)
    status = refusal.status if refusal.status >= 400 else OPENAI_HOLD_STATUS
    if refusal.kind == HOLD_KIND:
        kind = "approval_required"
    else:
        kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {
        "error": {
            "message": f"{refusal.title}: {problem['detail']} (decision_id {outcome.decision_id})",
            "type": kind,
            "param": None,
            "code": refusal.kind,
            "proctor": problem,
        },
    }
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store", DECISION_HEADER: outcome.decision_id}
    headers.update(refusal.headers)
    return status, headers, json.dumps(body, separators=(",", ":")).encode()


def refusal_answer(ex: Exchange) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body for a refused exchange, whichever engine answers it:
    problem+json; a JSON-RPC error on JSON-RPC endpoints (authentication stays HTTP:
    401/407); or the API's own error shape its connector declares (`ex.error_format`).
    The plan's response headers are added."""
    assert ex.refusal is not None
    if ex.is_jsonrpc and ex.refusal.kind != "authentication":
        status, headers, body = jsonrpc_error_response(ex)
    elif ex.error_format == "openai":
        status, headers, body = openai_error_response(ex)
    else:
        status, headers, body = problem_response(ex)
    for name, value in ex.plan.response_headers.items():
        headers.setdefault(name, value)
    return status, headers, body
