"""The sink interface every audit destination implements.

The audit writer hands each sink the event's serialised line (bytes, newline
terminated, already redacted and chained) from the event loop. A sink must
never block the loop in `submit`; network sinks queue the line (bounded) and
deliver it from their own tasks, retrying with backoff.

Overflow policy (per sink, `overflow:`):
- `block`: the request path waits (`await sink.wait_for_capacity()`) until the
  queue has room before an allowed request is forwarded; refusals are never delayed.
- `drop`: a line that does not fit is dropped and counted (`stats["dropped"]`,
  metric proctor_audit_lost_events_total).
- `fail_closed`: while the sink is unhealthy (queue full, or delivery failing),
  allowed requests are refused with 503 instead of being forwarded unaudited
  (by default only write actions: `fail_closed_methods`).
"""

from __future__ import annotations

import abc
from typing import Any, Literal

Overflow = Literal["block", "drop", "fail_closed"]


class Sink(abc.ABC):
    name: str = "sink"
    overflow: Overflow = "drop"

    def __init__(self) -> None:
        self.stats: dict[str, int] = {"submitted": 0, "sent": 0, "dropped": 0, "failed": 0, "retried": 0}

    @abc.abstractmethod
    def submit(self, line: bytes, event: dict[str, Any]) -> bool:
        """Queue (or write) one event; never blocks. False when it was dropped."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background delivery (called once the event loop runs)."""

    async def close(self, drain_seconds: float = 5.0) -> None:  # noqa: B027 - optional hook
        """Deliver what is queued within the deadline, then stop (SIGTERM path)."""

    @property
    def healthy(self) -> bool:
        """False while events cannot be delivered (queue full, or the destination failing)."""
        return True

    @property
    def queue_depth(self) -> int:
        return 0

    async def wait_for_capacity(self, timeout: float) -> bool:
        """For overflow `block`: wait until a line would fit; False on timeout."""
        return True
