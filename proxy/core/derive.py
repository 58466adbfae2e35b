"""What a request means, before any policy: classification, body, typed values.

Shared by the proxy's pipeline and `proctor policy explain`, so an explanation
always derives exactly what the proxy would. Every way a request can be refused
here (ambiguous path, unclassified egress, oversized or malformed body, a value
of the wrong type, an unmapped JSON-RPC call) comes back as a `Refusal`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import RequestLimits
from ..connectors.classifier import Classifier, PathRejected
from ..connectors.values import ValueRejected, with_body_fields
from .context import BodyRejected, body_to_cedar, parse_json_document
from .model import AgentRequest, Classification, Refusal


@dataclass
class Derivation:
    classification: Classification | None = None  # set as soon as a route matched
    body: Any = None  # the body as Cedar JSON (context.body)
    jsonrpc_id: Any = None
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
    if len(req.body) > limits.max_body_bytes:
        d.refusal = Refusal(
            413,
            "Request body too large",
            f"the body is {len(req.body)} bytes; at most {limits.max_body_bytes} bytes are inspected and forwarded",
            kind="request",
        )
        return d
    try:
        doc = parse_json_document(req, limits.max_json_depth)
        if d.is_jsonrpc and isinstance(doc, dict):
            d.jsonrpc_id = doc.get("id")
        d.body = body_to_cedar(doc, limits.max_json_depth)
        d.classification = cls = with_body_fields(cls, doc)
    except BodyRejected as e:
        d.refusal = Refusal(400, "Request body refused", str(e), kind="request")
        return d
    except ValueRejected as e:
        d.refusal = _value_refusal(e)
        return d
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
