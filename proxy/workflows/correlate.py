"""Which business objects a call names (docs/workflows.md, "Correlation").

Request-side objects (path parameters, declared body values, query parameters)
are known when the call is decided and find its instance; response-side objects
(JSON fields of the answer, a header) are known when it comes back and link new
objects (the order number the ERP assigned) to the instance.

An object is (type, id); the fallbacks are objects too, of the reserved types
`_baggage` (a W3C baggage member's value) and `_trace` (the W3C trace id), so one
lookup serves every way of finding an instance. Precedence: business objects
first (in the step's declaration order), then the baggage member, then the trace id.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from .spec import ObjectRef, StepSpec, WorkflowSpec

BAGGAGE_TYPE = "_baggage"
TRACE_TYPE = "_trace"
MAX_ID_LENGTH = 512
_PATH_RE = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
_TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")

ObjectKey = tuple[str, str]  # (type, id)


def json_value(doc: Any, path: str) -> Any:
    """The value at a dotted JSON path (`d.PurchaseOrder`, `items[0].id`), or None."""
    node = doc
    for name, index in _PATH_RE.findall(path):
        if name:
            if not isinstance(node, dict) or name not in node:
                return None
            node = node[name]
        else:
            if not isinstance(node, list) or int(index) >= len(node):
                return None
            node = node[int(index)]
    return node


def as_id(value: Any) -> str | None:
    """An object id from a value: a non-empty string or an integer (never a bool, float or
    container), at most MAX_ID_LENGTH characters."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, Decimal) and value == value.to_integral_value():
        text = str(int(value))
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    return text if text and len(text) <= MAX_ID_LENGTH and text.isprintable() else None


def request_objects(step: StepSpec, params: Mapping[str, Any], fields: Mapping[str, Any],
                    query: Mapping[str, Any]) -> list[ObjectKey]:
    """The objects a request names, in declaration order (a set-valued field names each)."""
    out: list[ObjectKey] = []
    sources = {"param": params, "field": fields, "query": query}
    for ref in step.request_objects:
        assert ref.name is not None
        value = sources[ref.from_].get(ref.name)
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        for v in values:
            oid = as_id(v)
            if oid is not None and (ref.type, oid) not in out:
                out.append((ref.type, oid))
    return out


def _header_id(ref: ObjectRef, headers: Mapping[str, str]) -> str | None:
    assert ref.name is not None
    raw = headers.get(ref.name.lower())
    if raw is None:
        return None
    if ref.pattern is not None:
        m = re.search(ref.pattern, raw)
        return as_id(m.group(1)) if m else None
    return as_id(raw)


def response_objects(step: StepSpec, body: Any, headers: Mapping[str, str]) -> list[ObjectKey]:
    """The objects an answer names (JSON fields of its body, headers)."""
    out: list[ObjectKey] = []
    for ref in step.response_objects:
        if ref.from_ == "response":
            assert ref.path is not None
            oid = as_id(json_value(body, ref.path))
        else:
            oid = _header_id(ref, headers)
        if oid is not None and (ref.type, oid) not in out:
            out.append((ref.type, oid))
    return out


def baggage_value(header: str | None, key: str) -> str | None:
    """A W3C baggage member's value (percent-decoded), or None."""
    if not header:
        return None
    for member in header.split(","):
        name, sep, rest = member.partition("=")
        if not sep or name.strip() != key:
            continue
        value = rest.split(";", 1)[0].strip()
        return as_id(urllib.parse.unquote(value))
    return None


def trace_id(traceparent: str | None) -> str | None:
    m = _TRACEPARENT_RE.match((traceparent or "").strip().lower())
    return m.group(1) if m and m.group(1) != "0" * 32 else None


def fallback_objects(workflow: WorkflowSpec, headers: Mapping[str, str]) -> list[ObjectKey]:
    """The configured fallback's object, when the request carries one."""
    c = workflow.correlation
    if c.fallback == "baggage":
        v = baggage_value(headers.get("baggage"), c.baggage_key)
        return [(BAGGAGE_TYPE, v)] if v is not None else []
    if c.fallback == "trace":
        t = trace_id(headers.get("traceparent"))
        return [(TRACE_TYPE, t)] if t is not None else []
    return []
