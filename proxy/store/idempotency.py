"""Stored idempotency keys and dedupe windows (issue 12, docs/coordination.md).

One table serves both: a row is one (scope, key) -> the first request that used
it and, once it completed, the response to replay. `scope` says whose key it is
("idem:<agent id>" for an agent's Idempotency-Key, "dedupe:<connector>:<route>"
for a route's dedupe window). Inserting a row only when none is live is the
arbiter between concurrent requests, replicas included: no per-process locks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

IN_PROGRESS = "in-progress"
COMPLETED = "completed"

# (column, kind) in table order
IDEMPOTENCY_COLUMNS: tuple[str, ...] = (
    "scope", "key", "fingerprint", "state", "owner", "agent_id", "created_at", "expires_at",
    "status", "headers", "body", "body_stored",
)
IDEMPOTENCY_SELECT = ", ".join(IDEMPOTENCY_COLUMNS)
# The same columns without the stored body (NULL in its place): listings never read bodies.
IDEMPOTENCY_LIST_SELECT = ", ".join("NULL" if c == "body" else c for c in IDEMPOTENCY_COLUMNS)
SCOPE_PREFIXES = {"idempotency": "idem:", "dedupe": "dedupe:"}  # list_idempotency(kind=...)


@dataclass
class IdempotencyEntry:
    scope: str
    key: str
    fingerprint: str  # what the key is bound to (a key reused for another request is refused)
    owner: str  # decision id of the request that holds the key
    agent_id: str
    created_at: float
    expires_at: float  # in progress: when a crashed holder's reservation lapses; completed: replay bound
    state: str = IN_PROGRESS
    status: int | None = None  # the upstream's status, once completed
    headers: dict[str, str] = field(default_factory=dict)  # the selected response headers kept for replay
    body: bytes | None = None
    body_stored: bool = False  # False: the body was too large (or streamed) to keep


def check_entry(e: IdempotencyEntry) -> None:
    for name in ("created_at", "expires_at"):
        if not math.isfinite(float(getattr(e, name))):
            raise ValueError(f"idempotency {name} must be finite")
    if e.state not in (IN_PROGRESS, COMPLETED):
        raise ValueError(f"idempotency state must be {IN_PROGRESS} or {COMPLETED}, not {e.state!r}")


def entry_params(e: IdempotencyEntry) -> list[Any]:
    """Values in IDEMPOTENCY_COLUMNS order."""
    check_entry(e)
    return [
        e.scope, e.key, e.fingerprint, e.state, e.owner, e.agent_id, float(e.created_at), float(e.expires_at),
        e.status, json.dumps(e.headers, ensure_ascii=True, separators=(",", ":")), e.body, bool(e.body_stored),
    ]


def entry_from_row(row: Sequence[Any]) -> IdempotencyEntry:
    scope, key, fp, state, owner, agent_id, created_at, expires_at, status, headers, body, stored = tuple(row)
    return IdempotencyEntry(
        scope=scope, key=key, fingerprint=fp, state=state, owner=owner, agent_id=agent_id,
        created_at=float(created_at), expires_at=float(expires_at),
        status=None if status is None else int(status), headers=json.loads(headers),
        body=None if body is None else bytes(body), body_stored=bool(stored),
    )
