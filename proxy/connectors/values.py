"""Typed values from path parameters, the query string and JSON bodies, as Cedar JSON.

A connector route declares what it expects (`params`, `query`, `body` in the
manifest); a value that does not convert exactly to its declared type is a
refusal (400) that names the value, never a guess and never a fall-through to
another route.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from dataclasses import replace

from ..core.model import Classification
from .manifest import BodyFieldSpec, ValueSpec

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
DECIMAL_LIMIT = Decimal("922337203685477.5807")  # Cedar decimal: i64 with 4 fractional digits
_INT_RE = re.compile(r"[+-]?[0-9]+")  # ASCII digits only, used with fullmatch
_DECIMAL_RE = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")
_MISSING = object()


class ValueRejected(Exception):
    """A declared value is missing or does not have its declared type; the message says which."""


def typed(spec: ValueSpec, raw: Any, what: str) -> Any:
    """`raw` converted to `spec.type` as a Cedar JSON value, or ValueRejected."""
    t = spec.type
    if t == "string":
        if not isinstance(raw, str):
            raise ValueRejected(f"{what} must be a string")
        if spec.pattern is not None and not re.fullmatch(spec.pattern, raw):
            raise ValueRejected(f"{what} does not match the pattern {spec.pattern!r}")
        return raw
    if t == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ValueRejected(f"{what} must be true or false")
    if t == "long":
        if isinstance(raw, bool):
            raise ValueRejected(f"{what} must be an integer")
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, str) and _INT_RE.fullmatch(raw):
            value = int(raw)
        else:
            raise ValueRejected(f"{what} must be an integer")
        if not I64_MIN <= value <= I64_MAX:
            raise ValueRejected(f"{what} is out of range for a Cedar Long")
        if spec.min is not None and value < spec.min:
            raise ValueRejected(f"{what} must be at least {spec.min}")
        if spec.max is not None and value > spec.max:
            raise ValueRejected(f"{what} must be at most {spec.max}")
        return value
    # decimal
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str, Decimal)):
        raise ValueRejected(f"{what} must be a decimal number")
    if isinstance(raw, float):  # never rounded through a float: bodies parse numbers as Decimal
        raw = repr(raw)
    elif isinstance(raw, str) and not _DECIMAL_RE.fullmatch(raw):
        # Decimal() also takes "1_000", "1e3", "NaN": an upstream may read those differently
        raise ValueRejected(f"{what} must be a decimal number (digits with an optional '.' part)")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ValueRejected(f"{what} must be a decimal number") from None
    if not value.is_finite() or abs(value) > DECIMAL_LIMIT:
        raise ValueRejected(f"{what} is out of range for a Cedar decimal")
    if value != value.quantize(Decimal("0.0001")):
        raise ValueRejected(f"{what} has more than 4 decimal places")
    if spec.min is not None and value < spec.min:
        raise ValueRejected(f"{what} must be at least {spec.min}")
    if spec.max is not None and value > spec.max:
        raise ValueRejected(f"{what} must be at most {spec.max}")
    text = format(value.quantize(Decimal("0.0001")).normalize(), "f")
    if "." not in text:
        text += ".0"
    return {"__extn": {"fn": "decimal", "arg": text}}


def path_values(specs: dict[str, ValueSpec], raw: dict[str, str]) -> dict[str, Any]:
    """Path parameters: declared ones typed, the others as strings."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "*":
            continue
        spec = specs.get(name)
        out[name] = typed(spec, value, f"path parameter {name!r}") if spec else value
    return out


def query_values(specs: dict[str, ValueSpec], query: str) -> dict[str, Any]:
    """Declared query parameters, typed. Undeclared ones are left to `context.query`."""
    if not specs:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise ValueRejected("the query string is not valid UTF-8") from None
    seen: dict[str, str] = {}
    for name, value in pairs:
        if name in specs:
            if name in seen:
                raise ValueRejected(f"query parameter {name!r} appears more than once")
            seen[name] = value
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if name in seen:
            out[name] = typed(spec, seen[name], f"query parameter {name!r}")
        elif spec.required:
            raise ValueRejected(f"query parameter {name!r} is required")
    return out


_STEP_RE = re.compile(r"([^.\[\]]+)|\[(\*|[0-9]+)\]")


def _walk(doc: Any, steps: list[str], what: str = "a body value", exact_case: bool = False) -> tuple[Any, bool]:
    """Follow `steps` into `doc`; returns (value or list of values, is_set).

    An array step (`[*]`, `[N]`) that meets something other than an array (or null)
    is refused: many servers iterate an object where an array belongs (PHP, Rack and
    qs build one from `items[a][sku]`), so "no elements" would be a guess. With
    `exact_case` (what an agent sent), a missing name whose key exists in another
    case is refused too: servers that match names case-insensitively would read it.
    """
    current: list[Any] = [doc]
    is_set = False
    for step in steps:
        if step == "*":
            is_set = True  # even when nothing reaches this step: an absent array is an empty set
        nxt: list[Any] = []
        for node in current:
            if step == "*" or step.isdigit():
                if node is None:
                    continue
                if not isinstance(node, list):
                    found = "an object" if isinstance(node, dict) else f"a {type(node).__name__} value"
                    raise ValueRejected(f"{what}: expected an array where the body has {found}")
                if step == "*":
                    nxt.extend(node)
                elif int(step) < len(node):
                    nxt.append(node[int(step)])
            elif isinstance(node, dict):
                if step in node:
                    nxt.append(node[step])
                elif exact_case and any(k.casefold() == step.casefold() for k in node):
                    raise ValueRejected(f"{what}: the body spells {step!r} in another case; use the exact name")
        current = nxt
    if is_set:
        return current, True
    return (current[0] if current else _MISSING), False


def _steps(path: str) -> list[str]:
    return [m.group(1) or m.group(2) for m in _STEP_RE.finditer(path)]


def _as_number(spec: ValueSpec, raw: Any, what: str) -> Decimal:
    """One element of an aggregate, checked against the declared type, as an exact Decimal."""
    cedar = typed(spec, raw, what)
    if isinstance(cedar, dict):  # decimal extension value
        return Decimal(cedar["__extn"]["arg"])
    return Decimal(cedar)


def _cedar_number(spec: BodyFieldSpec, value: Decimal, what: str) -> Any:
    """An aggregate's result in the declared type; decimals are rounded half-up to
    Cedar's 4 places (a product of two 4-place numbers can have 8)."""
    if spec.type == "long":
        if value != value.to_integral_value():
            raise ValueRejected(f"{what}: the {spec.aggregate} is not an integer")
        result = int(value)
        if not I64_MIN <= result <= I64_MAX:
            raise ValueRejected(f"{what}: the {spec.aggregate} is out of range for a Cedar Long")
        return result
    value = value.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)
    if abs(value) > DECIMAL_LIMIT:
        raise ValueRejected(f"{what}: the {spec.aggregate} is out of range for a Cedar decimal")
    text = format(value.normalize(), "f")
    return {"__extn": {"fn": "decimal", "arg": text if "." in text else text + ".0"}}


def _aggregate(spec: BodyFieldSpec, doc: Any, what: str, agent_supplied: bool = True) -> Any:
    steps = _steps(spec.path)
    last_star = len(steps) - 1 - steps[::-1].index("*")
    elements, _ = _walk(doc, steps[: last_star + 1], what, agent_supplied) if doc is not None else ([], True)
    elements = [e for e in elements if e is not None]
    if spec.required and not elements:
        raise ValueRejected(f"{what} is required")
    if spec.aggregate == "count":
        return len(elements)
    if not elements:
        return _MISSING  # no sum/min/max of nothing: the value is absent
    tail = steps[last_star + 1 :]
    weight_steps = _steps(spec.weight) if spec.weight else None
    # In what an agent sends, elements (and weights) are bounded below by 0 unless the
    # manifest says otherwise: a negative line would offset the total below a threshold
    # a policy checks. (A lookup reads the upstream's own data, credit lines included.)
    floor = Decimal(0) if agent_supplied else None
    element_spec = spec if spec.min is not None else spec.model_copy(update={"min": floor})
    weight_spec = ValueSpec(type="decimal", min=spec.weight_min if spec.weight_min is not None else floor)
    numbers: list[Decimal] = []
    for i, element in enumerate(elements):
        raw, _ = _walk(element, tail, f"{what} element {i}", agent_supplied)
        if raw is _MISSING or raw is None:
            raise ValueRejected(f"{what}: element {i} has no value")
        number = _as_number(element_spec, raw, f"{what} element {i}")
        if weight_steps is not None:
            w, _ = _walk(element, weight_steps, f"{what} element {i}", agent_supplied)
            if w is _MISSING or w is None:
                raise ValueRejected(f"{what}: element {i} has no {spec.weight}")
            number *= _as_number(weight_spec, w, f"{what} element {i} {spec.weight}")
        numbers.append(number)
    if spec.aggregate == "sum":
        result = sum(numbers, Decimal(0))
    elif spec.aggregate == "min":
        result = min(numbers)
    else:
        result = max(numbers)
    return _cedar_number(spec, result, what)


def body_values(specs: dict[str, BodyFieldSpec], doc: Any, agent_supplied: bool = True) -> dict[str, Any]:
    """Declared body fields, typed; `[*]` paths become sets (or one number, aggregated).
    `agent_supplied=False` for documents the upstream itself returned (lookups)."""
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        if spec.aggregate is not None:
            value = _aggregate(spec, doc, f"body field {name!r} ({spec.aggregate} of {spec.path})", agent_supplied)
            if value is not _MISSING:
                out[name] = value
            continue
        steps = _steps(spec.path)
        what = f"body field {name!r} ({spec.path})"
        value, is_set = _walk(doc, steps, what, agent_supplied) if doc is not None else (_MISSING, False)
        if is_set:
            items = [v for v in value if v is not None]
            if not items and spec.required:
                raise ValueRejected(f"{what} is required")
            out[name] = [typed(spec, v, what) for v in items]
        elif value is _MISSING or value is None:
            if spec.required:
                raise ValueRejected(f"{what} is required")
        else:
            out[name] = typed(spec, value, what)
    return out


def with_body_fields(cls: Classification, doc: Any) -> Classification:
    """The classification completed from `doc` (the parsed JSON body): a JSON-RPC route's
    operation, or the route's declared body fields."""
    if cls.rpc_ops:
        return resolve_jsonrpc(cls, doc)
    if not cls.body_specs:
        return cls
    fields = body_values(cls.body_specs, doc)
    attrs = dict(cls.resource_attrs)
    for name in cls.resource_attribute_names:
        if name in fields:
            attrs[name] = fields[name]
    return replace(cls, fields=fields, resource_attrs=attrs)


# A JSON-RPC response the agent sends back (an MCP client answering a server's request:
# sampling, elicitation, roots/list, ping) has no method; operations name it by this one.
# JSON-RPC reserves method names starting with "rpc." (JSON-RPC 2.0 section 4), so no call
# can be mistaken for it.
RESPONSE_METHOD = "rpc.response"


def is_jsonrpc_response(doc: Any) -> bool:
    """A JSON-RPC 2.0 response object: an id and exactly one of result and error, no method."""
    return (isinstance(doc, dict) and doc.get("jsonrpc") == "2.0" and "method" not in doc and "id" in doc
            and ("result" in doc) != ("error" in doc) and set(doc) <= {"jsonrpc", "id", "result", "error"})


# An id written as a number with a fraction or an exponent is parsed as a Decimal (exact
# numbers, core/body.py); one with more digits than this is no id anyone correlates on, and
# turning `1e999999999` into an int would take the process's memory.
_MAX_ID_DIGITS = 64


def jsonrpc_request_id(doc: Any) -> Any:
    """The id a refusal of this message echoes: a JSON-RPC 2.0 request's (a call with an id
    its caller waits on: a string or an integer), else None (a notification, a response the
    agent sends back, a batch or anything else that is no single call: no caller awaits an
    answer to it, core/problem.py answers its refusal with an HTTP error status).

    An id of no JSON-RPC type (object, array, boolean), a fractional one and an outsized
    number are refused: ValueRejected."""
    if not isinstance(doc, dict) or "id" not in doc:
        return None
    value = doc["id"]
    if isinstance(value, Decimal):
        if not value.is_finite() or value.adjusted() >= _MAX_ID_DIGITS or value != value.to_integral_value():
            raise ValueRejected("a JSON-RPC id is a string, an integer or null; this one is a fraction or an "
                                "outsized number")
        value = int(value)
    elif isinstance(value, bool) or not isinstance(value, (str, int, type(None))):
        raise ValueRejected(f"a JSON-RPC id is a string, an integer or null, not a JSON {_json_type(value)}")
    elif isinstance(value, int) and len(str(abs(value))) > _MAX_ID_DIGITS:
        raise ValueRejected(f"a JSON-RPC id of more than {_MAX_ID_DIGITS} digits is refused")
    if (value is None or doc.get("jsonrpc") != "2.0" or not isinstance(doc.get("method"), str)
            or "result" in doc or "error" in doc):
        return None
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    return "object" if isinstance(value, dict) else "array" if isinstance(value, list) else type(value).__name__


def resolve_jsonrpc(cls: Classification, doc: Any) -> Classification:
    """For a JSON-RPC route: the operation the body calls, with its action, resource and fields.

    The returned classification keeps `action == ""` when no operation matches
    (the caller refuses it, like an unmapped route). Batches are refused: each
    call must be decided on its own.
    """
    if not cls.rpc_ops:
        return cls
    if isinstance(doc, list):
        raise ValueRejected("JSON-RPC batches are not accepted; send one call per request")
    if isinstance(doc, dict) and "method" in doc and ("result" in doc or "error" in doc):
        # servers differ on which it is (the MCP SDK reads a call; a dispatcher testing for `result` first,
        # a response): an answer policy judged as an allowed call, or the reverse
        raise ValueRejected("a JSON-RPC message is a request (method) or a response (result or error), not both")
    if is_jsonrpc_response(doc):
        method, params = RESPONSE_METHOD, None
    elif not isinstance(doc, dict) or doc.get("jsonrpc") != "2.0" or not isinstance(doc.get("method"), str):
        raise ValueRejected("this endpoint takes JSON-RPC 2.0 requests (an object with jsonrpc and method)")
    elif doc["method"] == RESPONSE_METHOD:
        raise ValueRejected(f"{RESPONSE_METHOD} is reserved (JSON-RPC rpc.* names); it is not a method to call")
    else:
        method = doc["method"]
        params = doc.get("params")
    tool = params.get("name") if isinstance(params, dict) and isinstance(params.get("name"), str) else None
    rpc = {"method": method} | ({"tool": tool} if tool is not None else {})
    # operations naming a tool are more specific than the method alone
    ops = sorted(cls.rpc_ops, key=lambda op: op.tool is None)
    op = next((o for o in ops if o.method == method and (o.tool is None or o.tool == tool)), None)
    if op is None:
        return replace(cls, rpc=rpc)
    fields = body_values(op.body, doc)
    attrs = dict(op.attributes)
    for name in op.resource_attributes:
        if name in fields:
            attrs[name] = fields[name]
    rid = op.resource.id or (tool if tool is not None else method)
    rid = rid.replace("{tool}", tool or "").replace("{method}", method)
    arguments = params.get("arguments") if isinstance(params, dict) else None
    return replace(
        cls,
        action=op.action,
        resource_type=op.resource.type,
        resource_id=rid,
        resource_attrs=attrs,
        risk=op.risk or cls.risk,
        fields=fields,
        rpc=rpc,
        arguments=arguments if isinstance(arguments, dict) else None,
    )
