"""Build the Cedar principal, resource and context for one request.

Cedar's JSON value format has no floats and no null: integers outside the i64
range, floats that are not exact decimals with at most four places, and nulls
are converted as documented in docs/policies.md (decimal extension where exact,
otherwise omitted), never guessed.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from ..config import PrincipalMapping
from .body import BodyRejected, read_body
from .model import AgentIdentity, AgentRequest, Classification

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
_OMIT = object()


DECIMAL_LIMIT = Decimal("922337203685477.5807")  # Cedar decimal: i64 with 4 fractional digits
_FOUR_PLACES = Decimal("0.0001")


class InexactNumber(BodyRejected):
    """A body number Cedar cannot hold exactly (refused: a policy must never see a rounded value)."""


def _decimal_text(value: Decimal) -> str | None:
    """Cedar decimal literal for `value`, or None when it is not exactly representable."""
    if not value.is_finite() or abs(value) > DECIMAL_LIMIT:
        return None
    if value != value.quantize(_FOUR_PLACES):
        return None
    text = format(value.quantize(_FOUR_PLACES).normalize(), "f")
    return text if "." in text else text + ".0"


def to_cedar(value: Any, depth: int = 0, max_depth: int = 32, inexact: str = "omit", where: str = "$") -> Any:
    """A JSON value as a Cedar JSON value (records, sets, Long, String, Bool, decimal).

    A number Cedar cannot represent exactly (an integer outside i64, more than 4
    decimal places, out of the decimal range) is, by `inexact`: "refuse" (request
    bodies by default): InexactNumber; "text": its exact decimal text as a String
    (any numeric test of it is a type error, which Proctor denies; equality with
    a number stays false, which is true); "omit" (claims, static attributes): left out.
    """
    exact = inexact != "omit"
    if depth > max_depth:
        raise BodyRejected(f"JSON nested deeper than {max_depth} levels")
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, int):
        if I64_MIN <= value <= I64_MAX:
            return value
        if inexact == "text":
            return str(value)
        if exact:
            raise InexactNumber(f"the number at {where} is outside the range policies can compare exactly "
                                "(64-bit integer); send it as a string")
        return _OMIT
    if isinstance(value, Decimal):
        text = _decimal_text(value)
        if text is not None:
            return {"__extn": {"fn": "decimal", "arg": text}}
        if inexact == "text":
            return str(value)
        if exact:
            raise InexactNumber(f"the number at {where} cannot be represented exactly for policy evaluation "
                                f"(at most 4 decimal places, magnitude up to {DECIMAL_LIMIT}); send it as a string")
        return _OMIT
    if isinstance(value, float):
        text = f"{value:.4f}".rstrip("0")
        if text.endswith("."):
            text += "0"
        if abs(value) < 9e14 and float(text) == value:
            return {"__extn": {"fn": "decimal", "arg": text}}
        return _OMIT
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "__extn" or k == "__entity":  # never let a body smuggle an escape
                continue
            cv = to_cedar(v, depth + 1, max_depth, inexact, f"{where}.{k}" if exact else where)
            if cv is not _OMIT:
                out[str(k)] = cv
        return out
    if isinstance(value, list):
        items = [to_cedar(v, depth + 1, max_depth, inexact, f"{where}[{i}]" if exact else where)
                 for i, v in enumerate(value)]
        return [v for v in items if v is not _OMIT]
    return _OMIT


def parse_json_body(req: AgentRequest, max_depth: int) -> Any:
    """context.body for `req` when its body is read as JSON, else None (see core/body.py)."""
    read = read_body(req.body, req.headers.get("content-type"))
    return body_to_cedar(read.doc, max_depth) if read.format == "json" else None


def body_to_cedar(doc: Any, max_depth: int, inexact: str = "refuse") -> Any:
    """A parsed body document as Cedar JSON (context.body)."""
    if doc is None:
        return None
    converted = to_cedar(doc, 0, max_depth, inexact)
    return None if converted is _OMIT else converted


def principal_entity(identity: AgentIdentity, mapping: PrincipalMapping) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for attr, claim in mapping.attributes.items():
        if claim in identity.claims:
            try:
                v = to_cedar(identity.claims[claim])
            except BodyRejected:  # absurdly nested claim: leave the attribute out
                continue
            if v is not _OMIT:
                attrs[attr] = v
    parents = []
    if mapping.groups_claim:
        groups = identity.claims.get(mapping.groups_claim)
        if isinstance(groups, str):
            groups = [groups]
        if isinstance(groups, list):
            parents = [{"type": mapping.group_entity_type, "id": g} for g in groups if isinstance(g, str) and g]
    return {"uid": {"type": "Agent", "id": identity.agent_id}, "attrs": attrs, "parents": parents}


def _resource_value(value: Any) -> Any:
    """A resource attribute as Cedar JSON. Typed values (connectors/values.py) are
    Cedar JSON already (decimals as extension values, which to_cedar would strip as
    a smuggling attempt); static manifest attributes are plain JSON."""
    if isinstance(value, dict) and len(value) == 1 and "__extn" in value:
        return value
    if isinstance(value, list):
        items = [_resource_value(v) for v in value]
        return [v for v in items if v is not _OMIT]
    return to_cedar(value)


def resource_entity(cls: Classification) -> dict[str, Any]:
    attrs = {k: v for k, v in ((k, _resource_value(v)) for k, v in cls.resource_attrs.items()) if v is not _OMIT}
    for name, (etype, eid) in cls.resource_refs.items():  # after to_cedar, which drops __entity
        attrs[name] = {"__entity": {"type": etype, "id": eid}}
    return {"uid": {"type": cls.resource_type, "id": cls.resource_id}, "attrs": attrs, "parents": []}


def request_context(
    req: AgentRequest,
    cls: Classification,
    body: Any,
    header_allowlist: list[str],
    now: float | None = None,
    payload: dict[str, Any] | None = None,
    inexact: str = "refuse",
) -> dict[str, Any]:
    now = time.time() if now is None else now
    dt = datetime.fromtimestamp(now, tz=timezone.utc)
    ctx: dict[str, Any] = {
        "method": req.method,
        "path": req.path,
        "query": req.query,
        "host": req.host,
        "port": req.port,
        "headers": {h: req.headers[h] for h in header_allowlist if h in req.headers},
        "connector": cls.connector,
        "risk": cls.risk,
        "time": {
            "now": {"__extn": {"fn": "datetime", "arg": dt.strftime("%Y-%m-%dT%H:%M:%SZ")}},
            "epoch": int(now),
            "hour": dt.hour,
            "weekday": dt.isoweekday(),
        },
        "source_ip": {"__extn": {"fn": "ip", "arg": req.client_ip}},
        "mode": req.mode,
    }
    if body is not None:
        ctx["body"] = body
    if payload is not None:  # how the body was read: format (json/form/multipart/opaque/none), size, media type
        ctx["payload"] = payload
    # Typed values the connector route declares (manifest: params, query, body).
    if cls.params:
        ctx["params"] = cls.params
    if cls.query_params:
        ctx["query_params"] = cls.query_params
    if cls.fields:
        ctx["fields"] = cls.fields
    if cls.rpc is not None:  # JSON-RPC endpoints: the call, and (MCP tools/call) its arguments
        ctx["rpc"] = cls.rpc
        if cls.arguments is not None:  # part of the body: numbers as exact as context.body's
            converted = to_cedar(cls.arguments, inexact=inexact)
            if converted is not _OMIT:
                ctx["arguments"] = converted
    return ctx
