"""Bounds on request bodies while they are being received.

A request body is read only after its sender authenticated (see `ProctorAddon.requestheaders`),
and then against two bounds:

- per request (and so per connection: HTTP/1.1 carries one request at a time),
  `limits.max_body_bytes`: a declared `Content-Length` over it is refused before a
  byte of the body is read, a chunked body as soon as it grows past it;
- per process, `limits.max_inflight_body_bytes`: the sum of all bodies still being
  received. A declared length is reserved up front (so a request that cannot fit is
  refused before its body is read), a chunked body reserves as it arrives.

A reservation is returned when its body is complete (it then belongs to the
decision) or the request ends early; if neither happened (a bug, a torn-down
connection), a finalizer returns it when the request is garbage collected, so
the budget can never leak away.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Literal

from ..config import RequestLimits
from ..core.model import Refusal

Verdict = Literal["too-large", "busy"]


@dataclass
class BodyBudget:
    """The process-wide budget for request body bytes still being received."""

    limit: int
    in_use: int = 0

    def take(self, n: int) -> bool:
        if self.in_use + n > self.limit:
            return False
        self.in_use += n
        return True

    def give_back(self, n: int) -> None:
        self.in_use = max(0, self.in_use - n)


def _give_back(budget: BodyBudget, held: list[int]) -> None:
    if held[0]:
        budget.give_back(held[0])
        held[0] = 0


class BodyGuard:
    """One request body's share of the budget, checked on every chunk that arrives."""

    def __init__(self, budget: BodyBudget, max_bytes: int, declared: int | None) -> None:
        self.budget = budget
        self.max_bytes = max_bytes
        self.received = 0
        # The engine calls this with the verdict when a chunk breaks a bound; it
        # builds, records and sets the refusal. Set by whoever admitted the body.
        self.refuse: Callable[[Verdict], None] | None = None
        self._held = [0]  # a cell the finalizer can see without keeping the guard alive
        self.verdict: Verdict | None = None
        if declared is not None and declared > max_bytes:
            self.verdict = "too-large"
        elif declared and not budget.take(declared):
            self.verdict = "busy"
        else:
            self._held[0] = declared or 0
        weakref.finalize(self, _give_back, budget, self._held)

    @property
    def admitted(self) -> bool:
        return self.verdict is None

    @property
    def held(self) -> int:
        return self._held[0]

    def on_data(self, n: int) -> Verdict | None:
        """Account `n` more received bytes; a verdict means refuse (and release)."""
        if self.verdict is not None:
            return self.verdict
        self.received += n
        verdict: Verdict | None = None
        if self.received > self.max_bytes:
            verdict = "too-large"
        elif self.received > self._held[0]:
            more = self.received - self._held[0]
            if self.budget.take(more):
                self._held[0] += more
            else:
                verdict = "busy"
        if verdict is not None:
            self.verdict = verdict
            self.release()
        return verdict

    def release(self) -> None:
        """The body is complete (or the request is over): return its reservation."""
        _give_back(self.budget, self._held)


def body_refusal(verdict: Verdict, limits: RequestLimits) -> Refusal:
    """The answer for a body refused while (or before) it arrives."""
    if verdict == "too-large":
        return Refusal(
            413,
            "Request body too large",
            f"the body is larger than {limits.max_body_bytes} bytes (limits.max_body_bytes); it was refused "
            "before being read in full and nothing was forwarded. Send a smaller body.",
            kind="request",
        )
    return Refusal(
        503,
        "Proctor is busy",
        "too many request bodies are being received at once (limits.max_inflight_body_bytes); nothing was "
        "forwarded. Retry shortly.",
        headers={"Retry-After": "1"},
        kind="fail-closed",
    )
