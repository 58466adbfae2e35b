"""Route-declared dedupe windows: an equivalent write by any agent is not forwarded twice.

A connector route declares which of its typed values make two writes "the same
work" (say supplier and items of a purchase order) and for how long:

    dedupe: {key: [supplier, items], window_seconds: 600, answer: conflict}

The key names are values the route already reads strictly: path parameters
declared under `params`, body values declared under `body`. Their typed values
(what policies see) are hashed with the connector and route, so formatting
differences in the raw body do not make two equal orders look different.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..core.model import Classification

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
MAX_WINDOW_SECONDS = 7 * 24 * 3600


class DedupeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Names of the route's declared path parameters (`params`) and body values (`body`).
    key: list[str] = Field(min_length=1, max_length=16)
    window_seconds: float = Field(gt=0, le=MAX_WINDOW_SECONDS)
    # conflict: 409 naming the first request's decision id (and its Location);
    # replay: the first request's stored response, marked as a replay.
    answer: Literal["conflict", "replay"] = "conflict"


def check_route_dedupe(spec: DedupeSpec, method: str, path: str, params: set[str], body: set[str],
                       jsonrpc: bool) -> None:
    """Raise ValueError naming the route when its dedupe declaration cannot work."""
    where = f"dedupe on {method} {path}"
    if jsonrpc:
        raise ValueError(f"{where}: not supported on jsonrpc routes")
    if method in SAFE_METHODS:
        raise ValueError(f"{where}: only writes are deduplicated, not {method}")
    if len(set(spec.key)) != len(spec.key):
        raise ValueError(f"{where}: key names a value twice")
    for name in spec.key:
        if name not in params and name not in body:
            raise ValueError(
                f"{where}: key names {name!r}, which is neither a declared path parameter (params) "
                "nor a declared body value (body)"
            )


def dedupe_scope(cls: Classification) -> str:
    spec = cls.spec
    return f"dedupe:{cls.connector}:{getattr(spec, 'method', '')} {getattr(spec, 'path', cls.route)}"


def dedupe_key(cls: Classification, spec: DedupeSpec) -> str:
    """The digest of the key values (an absent optional value counts as null)."""
    values: list[Any] = []
    for name in spec.key:
        if name in cls.params:
            values.append(["param", name, cls.params[name]])
        else:
            values.append(["body", name, cls.fields.get(name)])
    text = json.dumps([cls.connector, cls.action, values], ensure_ascii=True, separators=(",", ":"),
                      sort_keys=True, default=str)
    return "v1:" + hashlib.sha256(text.encode("ascii")).hexdigest()
