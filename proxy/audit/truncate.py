"""Fitting an event into a size limit (syslog `max_message_bytes`) by a fixed rule.

A receiver that gets a message larger than it accepts either cuts it (the JSON
no longer parses) or, worse, splits it into several messages of garbage. So an
oversized event is never sent as is: it is replaced by a smaller, *valid* JSON
object built from it by this rule:

1. the skeleton that identifies the event and lets it be found in the audit
   file: the OCSF class/type/severity/status attributes and `time`,
   `metadata` (uid, sequence, correlation_uid, version, product, log_name),
   `actor.user`, `api.operation`/`request`/`response`, and the whole
   `unmapped.chain` (same `sequence` and `hash` as the line in the file);
   strings in the skeleton are cut to 128 characters;
2. then whole top-level members of the original, in this order, each only if
   the result still fits: `message`, `status_code`, `status_detail`, `actor`,
   `api`, `http_request`, `src_endpoint`, `dst_endpoint`, `duration`,
   `start_time`, `end_time`, `resources`, `unmapped.proctor` (or, if it does
   not fit, its members without nested objects), `metadata`;
3. the marker `unmapped.truncated = {"original_bytes": N, "omitted": [...],
   "note": ...}` lists what was left out.

The chain hash covers the original event, not the reduced one: verify the
trail from the file; the reduced event carries what is needed to find it there.
"""

from __future__ import annotations

import json
from typing import Any

_CAP = 128
_BASE_KEYS = ("class_uid", "class_name", "category_uid", "category_name", "activity_id", "activity_name",
              "type_uid", "type_name", "time", "severity_id", "severity", "status_id", "status")
_META_KEYS = ("version", "product", "uid", "log_name", "correlation_uid", "sequence")
_OPTIONAL = ("message", "status_code", "status_detail", "actor", "api", "http_request", "src_endpoint",
             "dst_endpoint", "duration", "start_time", "end_time", "resources")
NOTE = "event larger than the sink's limit; the full event is in the audit file (same metadata.sequence and chain hash)"


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _cap(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _CAP:
        return value[:_CAP] + "…"
    if isinstance(value, dict):
        return {k: _cap(v) for k, v in value.items() if not isinstance(v, (dict, list)) or k == "product"}
    return value


def _skeleton(event: dict[str, Any], original: int) -> dict[str, Any]:
    out: dict[str, Any] = {k: _cap(event[k]) for k in _BASE_KEYS if k in event}
    meta = event.get("metadata") or {}
    out["metadata"] = {k: _cap(meta[k]) for k in _META_KEYS if k in meta}
    user = (event.get("actor") or {}).get("user")
    if isinstance(user, dict):
        out["actor"] = {"user": _cap(user)}
    api = event.get("api")
    if isinstance(api, dict):
        out["api"] = {k: _cap(api[k]) for k in ("operation", "request", "response") if k in api}
    unmapped = event.get("unmapped") or {}
    out["unmapped"] = {"truncated": {"original_bytes": original, "omitted": [], "note": NOTE}}
    if "chain" in unmapped:
        out["unmapped"]["chain"] = unmapped["chain"]
    return out


def fit_event(line: bytes, event: dict[str, Any], budget: int) -> tuple[bytes, bool]:
    """(`line` if it fits in `budget` bytes, else the reduced event; whether it was reduced)."""
    body = line.rstrip(b"\r\n")
    if len(body) <= budget:
        return body, False
    out = _skeleton(event, len(body))
    omitted: list[str] = out["unmapped"]["truncated"]["omitted"]

    def fits() -> bool:
        return len(_dump(out)) <= budget

    def try_put(container: dict[str, Any], key: str, value: Any, label: str) -> None:
        previous = container.get(key, _MISSING)
        container[key] = value
        if not fits():
            if previous is _MISSING:
                del container[key]
            else:
                container[key] = previous
            omitted.append(label)

    for key in _OPTIONAL:
        if key in event:
            try_put(out, key, event[key], key)
    proctor = (event.get("unmapped") or {}).get("proctor")
    if isinstance(proctor, dict):
        out["unmapped"]["proctor"] = proctor
        if not fits():
            flat = {k: v for k, v in proctor.items() if not isinstance(v, (dict, list)) or k == "reasons"}
            out["unmapped"]["proctor"] = flat
            dropped = [f"unmapped.proctor.{k}" for k in proctor if k not in flat]
            if not fits():
                del out["unmapped"]["proctor"]
                dropped = ["unmapped.proctor"]
            omitted.extend(dropped)
    if "metadata" in event:
        try_put(out, "metadata", event["metadata"], "metadata")
    data = _dump(out)
    if len(data) > budget:  # only with an absurdly small budget: never exceed it, even so
        data = data[:budget].decode("utf-8", "ignore").encode()
    return data, True


_MISSING = object()
