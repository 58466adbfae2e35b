"""The `concurrency:` declaration of a connector route (docs/coordination.md,
"Optimistic concurrency (If-Match)").

    - method: PATCH
      path: /api/now/table/incident/{sys_id}
      action: ticketing.incident.update
      resource: {type: Incident, id: "{sys_id}"}
      concurrency: {if_match: true}

A write on such a route is forwarded with `If-Match: <the ETag this agent last
saw for the record>` (unless the agent sent a precondition of its own), so an
upstream that supports conditional requests refuses a write based on a stale
read (412), which Proctor answers as a 409 saying the record changed underneath.
The ETags come from the upstream's answers on every route of the connector with
the same path (the GET of the record, and the writes themselves).

Kept apart from the manifest module (like dedupe and handoff) so the stage and
the manifest share one definition without importing each other.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_PLACEHOLDER = re.compile(r"\{(?:[A-Za-z_][A-Za-z0-9_]*|\*)\}")


class ConcurrencySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Send If-Match with the agent's last-seen ETag on this route's writes.
    if_match: StrictBool


def concurrency_error(data: Any) -> Any:
    """A route's `concurrency` validated up front, so a bad value names the route (method and path)."""
    if isinstance(data, dict) and data.get("concurrency") is not None:
        try:
            ConcurrencySpec.model_validate(data["concurrency"])
        except Exception as e:  # pydantic ValidationError: keep its text, add where
            raise ValueError(f"route {data.get('method', '?')} {data.get('path', '?')}: "
                             f"invalid concurrency: {e}") from None
    return data


def check_route_concurrency(spec: ConcurrencySpec, method: str, path: str, resource_id: str | None,
                            jsonrpc: bool) -> None:
    """Raise ValueError naming the route when its concurrency declaration cannot work."""
    if not spec.if_match:
        return
    where = f"concurrency on {method} {path}"
    if jsonrpc:
        raise ValueError(f"{where}: not supported on jsonrpc routes (a JSON-RPC call names no record by its URL)")
    if method in SAFE_METHODS:
        raise ValueError(f"{where}: if_match applies to writes, not {method}; the ETag is taken from the "
                         "answers of every route with the same path (declare if_match on the write route)")
    if resource_id is not None and not _PLACEHOLDER.search(resource_id):
        raise ValueError(
            f"{where}: if_match needs a route whose resource is the record its path names (a resource id such "
            f"as \"{{id}}\", or no id: the path itself), not the literal id {resource_id!r}: "
            "a create or a collection has no ETag to match"
        )


def template_key(path: str) -> str:
    """A route path with its placeholders' names erased: /tickets/{id} and /tickets/{sys_id}
    address the same records."""
    return _PLACEHOLDER.sub("{}", path.rstrip("/") or "/")
