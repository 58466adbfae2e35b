"""What a request means, before any policy: classification, body, typed values.

Shared by the proxy's pipeline and `proctor policy explain`, so an explanation
always derives exactly what the proxy would. Every way a request can be refused
here (ambiguous path, unclassified egress, oversized or malformed body, a value
of the wrong type, an unmapped JSON-RPC call) comes back as a `Refusal`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ..config import RequestLimits
from .classifier import Classifier, PathRejected
from .manifest import ApprovalWait
from .values import ValueRejected, jsonrpc_request_id, with_body_fields
from ..core.body import BodyRejected, ReadBody, read_body
from ..core.context import body_to_cedar
from ..core.hosts import HostRejected
from ..core.model import AgentRequest, Classification, Refusal
from ..core.overrides import override_in, query_names, server_name

_STEP_HEAD = re.compile(r"[.\[]")  # where a body path's first name ends


@dataclass
class Derivation:
    classification: Classification | None = None  # set as soon as a route matched
    body: Any = None  # the body as Cedar JSON (context.body)
    payload: ReadBody | None = None  # how the body was read (context.payload)
    jsonrpc_id: Any = None  # a call's id (None: no caller awaits an answer; values.jsonrpc_request_id)
    refusal: Refusal | None = None

    @property
    def is_jsonrpc(self) -> bool:
        return self.classification is not None and bool(self.classification.rpc_ops)


def _value_refusal(e: Exception) -> Refusal:
    return Refusal(400, "Request value refused", f"{e}; the request was not forwarded", kind="request")


def derive_request(classifier: Classifier, limits: RequestLimits, req: AgentRequest) -> Derivation:
    d = Derivation()
    try:
        cls = classifier.classify(req.method, req.host, req.port, req.path, req.query)
    except PathRejected as e:
        d.refusal = Refusal(400, "Request path refused", f"{e}; the request was not forwarded", kind="request")
        return d
    except HostRejected as e:
        d.refusal = Refusal(400, "Invalid host", f"{e}; the request was not forwarded", kind="request")
        return d
    except ValueRejected as e:
        d.refusal = _value_refusal(e)
        return d
    if cls is None:
        d.refusal = Refusal(
            403,
            "Egress not permitted",
            f"no connector classifies {req.method} {req.host}:{req.port}{req.path}; "
            "unclassified egress is denied by default",
            reasons=["egress-default-deny"],
            kind="egress",
        )
        return d
    d.classification = cls
    refusal = _body_field_in_query(cls, req.query) or _body_on_jsonrpc_path(cls, req)
    if refusal is not None:
        d.refusal = refusal
        return d
    if len(req.body) > limits.max_body_bytes:
        d.refusal = Refusal(
            413,
            "Request body too large",
            f"the body is {len(req.body)} bytes; at most {limits.max_body_bytes} bytes are inspected and forwarded",
            kind="request",
        )
        return d
    try:
        read = read_body(req.body, req.headers.get("content-type"))
    except BodyRejected as e:
        d.refusal = _body_refusal(e)
        return d
    d.payload = read
    refusal = _unreadable(read, cls, d.is_jsonrpc)
    if refusal is not None:
        d.refusal = refusal
        return d
    doc = read.doc
    try:
        if d.is_jsonrpc:
            d.jsonrpc_id = jsonrpc_request_id(doc)
        d.body = body_to_cedar(doc, limits.max_json_depth, limits.inexact_numbers)
        d.classification = cls = with_body_fields(cls, doc)
    except BodyRejected as e:
        d.refusal = _body_refusal(e)
        return d
    except ValueRejected as e:
        d.refusal = _value_refusal(e)
        return d
    if d.is_jsonrpc and cls.action and d.jsonrpc_id is None:
        # A notification or an answer the agent sends back awaits no answer: held, it is
        # answered at once (429 + Retry-After, core/problem.py) even in sync mode, rather than
        # keeping the POST open and the client's later messages behind it.
        wait = cls.approval_mode
        d.classification = cls = replace(cls, approval_mode=ApprovalWait(
            mode="async", wait_seconds=wait.wait_seconds if wait is not None else None))
    if d.is_jsonrpc and not cls.action:
        rpc = cls.rpc or {}
        what = rpc.get("method", "?") + (f" (tool {rpc['tool']})" if "tool" in rpc else "")
        d.refusal = Refusal(
            403,
            "JSON-RPC operation not permitted",
            f"no connector operation maps the JSON-RPC call {what}; unmapped operations are denied by default",
            reasons=["egress-default-deny"],
            kind="egress",
        )
    return d


def _body_refusal(e: BodyRejected) -> Refusal:
    if e.status == 415:
        return Refusal(415, "Unsupported request body", f"{e}; the request was not forwarded", kind="request")
    return Refusal(400, "Request body refused", f"{e}; the request was not forwarded", kind="request")


_READABLE = "JSON (application/json, UTF-8), a form (application/x-www-form-urlencoded) or multipart/form-data"


def _unreadable(read: ReadBody, cls: Classification, is_jsonrpc: bool) -> Refusal | None:
    """Refuse a body the policy could not read (unless the route accepts opaque bodies)
    and method overrides hidden in its top-level fields."""
    what = cls.action or cls.route or cls.connector
    if is_jsonrpc and read.format not in ("json", "none"):
        return Refusal(415, "Unsupported request body",
                       f"this endpoint takes JSON-RPC 2.0 as application/json; a {read.media_type or 'untyped'} "
                       "body was not forwarded", kind="request")
    if read.format == "opaque" and not cls.opaque_body:
        return Refusal(
            415,
            "Unsupported request body",
            f"Proctor cannot read a {read.media_type or 'body without Content-Type'} body, so no policy could "
            f"judge this {what} request and it was not forwarded; send {_READABLE}"
            + (" (this route reads body fields)" if cls.body_specs else ""),
            kind="request",
        )
    if read.format in ("json", "form", "multipart") and isinstance(read.doc, dict):
        override = override_in(list(read.doc))
        if override is not None:
            return Refusal(400, "Method override refused",
                           f"the body field {override[:40]!r} asks the server to use another HTTP method than "
                           "the one policy judged; send the request with its real method", kind="request")
    return None


def _body_on_jsonrpc_path(cls: Classification, req: AgentRequest) -> Refusal | None:
    """A body sent with another method than the JSON-RPC one to a JSON-RPC endpoint's path (an MCP
    GET stream or DELETE with a body): it was classified by the plain route, so no policy judged the
    call it may hold, and a server that runs any body it gets as JSON-RPC would run it."""
    if not cls.jsonrpc_endpoint or not req.body:
        return None
    method = req.method.upper()
    return Refusal(
        400, "Request body not allowed",
        f"{method} {req.path} is the path of the JSON-RPC endpoint {cls.jsonrpc_endpoint}, whose messages are "
        f"judged from their body; this {method} is {cls.action}, which takes no body: send JSON-RPC messages "
        f"as {cls.jsonrpc_endpoint}, and this request without a body (it was not forwarded)",
        reasons=["body-not-allowed"], kind="request",
    )


def _body_field_in_query(cls: Classification, query: str) -> Refusal | None:
    """A declared body field also sent as a query parameter: servers that merge the two
    (Flask request.values, Rails params, PHP $_REQUEST, Spring binding) could act on
    the query's value, which policy did not read as the field."""
    if not query or not cls.body_specs:
        return None
    heads = {server_name(_STEP_HEAD.split(spec.path, 1)[0]) for spec in cls.body_specs.values()}
    clash = next((n for n in query_names(query) if server_name(n) in heads), None)
    if clash is None:
        return None
    return Refusal(400, "Body field in the query string",
                   f"the query parameter {clash[:60]!r} names a body field of this route; servers that merge "
                   "query and body parameters could act on it unseen: send it in the body only", kind="request")

