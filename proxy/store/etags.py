"""The ETags agents last saw, for optimistic concurrency (proxy/coordination/concurrency.py;
docs/coordination.md, "Optimistic concurrency (If-Match)").

One row per (connector, resource uid, agent): the last strong ETag the upstream
gave this agent for that record, when, and on which decision. A write on an
`if_match` route is forwarded with `If-Match: <etag>`. Rows live
`concurrency.etag_ttl_seconds` after they were last written; readers ignore
older ones and every replica sweeps them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ETAG_COLUMNS: tuple[str, ...] = ("connector", "resource", "agent_id", "etag", "seen_at", "expires_at", "decision_id")
ETAG_SELECT = ", ".join(ETAG_COLUMNS)
MAX_ETAG_LENGTH = 1024  # longer validators are not remembered (an upstream's, never an agent's)


@dataclass(frozen=True)
class SeenETag:
    connector: str
    resource: str  # the Cedar resource uid, e.g. Incident::"INC0012"
    agent_id: str
    etag: str  # a strong entity-tag as the upstream sent it, quotes included: "abc"
    seen_at: float  # epoch seconds: when the answer that carried it came back
    expires_at: float  # forgotten (ignored, then swept) from then on
    decision_id: str  # the request whose answer carried it


def etag_params(e: SeenETag) -> list[Any]:
    """Values in ETAG_COLUMNS order (ValueError for values no store should hold)."""
    for name in ("seen_at", "expires_at"):
        if not math.isfinite(float(getattr(e, name))):
            raise ValueError(f"etag {name} must be finite")
    if not e.etag or len(e.etag) > MAX_ETAG_LENGTH:
        raise ValueError(f"an etag is 1 to {MAX_ETAG_LENGTH} characters")
    return [e.connector, e.resource, e.agent_id, e.etag, float(e.seen_at), float(e.expires_at), e.decision_id]


def etag_from_row(row: Sequence[Any]) -> SeenETag:
    connector, resource, agent_id, etag, seen_at, expires_at, decision_id = tuple(row)
    return SeenETag(connector=connector, resource=resource, agent_id=agent_id, etag=etag,
                    seen_at=float(seen_at), expires_at=float(expires_at), decision_id=decision_id)
