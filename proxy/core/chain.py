"""The stage chain: the request path as an ordered list of small, typed stages.

Every stage sees the `Exchange` three times at most:

- `on_head(ex)`   the request head only, before its body is read (authentication,
                  so no work is done for an unauthenticated client);
- `on_request(ex)` in order; a stage ends the request phase by refusing or
                  holding (`ex.refuse(...)`): later stages' `on_request` are skipped;
- `on_response(ex)` in reverse order, for forwarded and refused requests alike
                  (record, metrics and traces must see every refusal).

Think of an Envoy HTTP filter or a mitmproxy addon: one concern per stage,
testable alone with a hand-made exchange. The list of stages is built in one
place (proxy/stages.py); this module knows no feature.

Fail closed: an exception in any `on_head` / `on_request` refuses the request
(503, recorded) and is never forwarded. An exception in `on_response` is logged
and counted, and the remaining stages still run: the answer is not replaced,
because the upstream has already acted on a forwarded request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

from .exchange import Exchange
from .model import Refusal

log = logging.getLogger("proctor.chain")


class Stage:
    """One concern on the request path. Override what the stage needs; the defaults do nothing.

    A hook may be a plain method or a coroutine function (the chain awaits what it returns).
    """

    name: ClassVar[str] = "stage"
    # May this stage see (and settle) a pending refusal left by the stage before it?
    # (the approval hold after authorization). Other stages never run while one is pending.
    settles_pending: ClassVar[bool] = False

    def on_head(self, ex: Exchange) -> Awaitable[None] | None:
        return None

    def on_request(self, ex: Exchange) -> Awaitable[None] | None:
        return None

    def on_response(self, ex: Exchange) -> Awaitable[None] | None:
        return None


def internal_error_refusal() -> Refusal:
    return Refusal(
        503,
        "Proctor could not decide",
        "an internal error occurred while deciding this request; it was not forwarded "
        "(fail closed). Quote the decision_id to your Proctor operator.",
        reasons=[],
        kind="fail-closed",
    )


ErrorRefusal = Callable[[BaseException, Exchange], Refusal | None]


def _overrides(stage: Stage, hook: str) -> bool:
    return getattr(type(stage), hook) is not getattr(Stage, hook)


class Chain:
    """Runs stages in order. `error_refusals` map an exception to a specific refusal
    (the state store being down is a 503 that says so); anything else is the generic
    fail-closed 503."""

    def __init__(self, stages: Sequence[Stage], error_refusals: Sequence[ErrorRefusal] = ()) -> None:
        names = [s.name for s in stages]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"stage names must be unique (they key timings and stage data): {sorted(duplicates)}")
        self.stages = tuple(stages)
        self.error_refusals = tuple(error_refusals)
        # Only the hooks a stage overrides are called (the request path is hot).
        self._head = tuple(s for s in self.stages if _overrides(s, "on_head"))
        self._request = tuple(s for s in self.stages if _overrides(s, "on_request"))
        self._response = tuple(s for s in reversed(self.stages) if _overrides(s, "on_response"))
        self.response_failures = 0

    def __iter__(self) -> Any:
        return iter(self.stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    async def head(self, ex: Exchange) -> None:
        """The head phase: may refuse before the body is read."""
        for stage in self._head:
            try:
                result = stage.on_head(ex)
                if result is not None:
                    await result
            except Exception as e:
                self._fail_closed(ex, stage, e)
                return
            if ex.refusal is not None:
                return

    async def request(self, ex: Exchange) -> None:
        """The request phase. Afterwards either `ex.refusal` is set (answer it), or
        `ex.decided` is true: forward per `ex.plan`, unless a stage answered the request
        itself (`ex.local_reply`: send it)."""
        clock = time.perf_counter
        phase_started = clock()  # (not ex.started: a body's upload time is not decision time)
        if ex.refusal is None:
            for stage in self._request:
                if ex.pending_refusal is not None and not stage.settles_pending:
                    break
                started = clock()
                try:
                    result = stage.on_request(ex)
                    if result is not None:
                        await result
                except Exception as e:
                    self._fail_closed(ex, stage, e)
                    break
                finally:
                    ex.timings[stage.name] = clock() - started
                if ex.refusal is not None or ex.local_reply is not None:
                    break
            if ex.pending_refusal is not None and ex.refusal is None:
                ex.refuse(ex.pending_refusal)  # nobody settled it: it is the answer
            ex.pending_refusal = None
            ex.decided = ex.refusal is None
        ex.decision_ms = (clock() - phase_started) * 1000

    async def response(self, ex: Exchange) -> None:
        """The response phase, in reverse order: after the upstream answered, after an
        upstream error, or after a refusal was answered."""
        rest = self.response_now(ex)
        if rest is not None:
            await rest

    def response_now(self, ex: Exchange) -> Awaitable[None] | None:
        """Run the response phase synchronously as far as the stages allow (for engine hooks
        that cannot await: a refusal is then recorded before the agent sees it). Returns an
        awaitable for the rest when a stage's hook had to await, else None."""
        stages = self._response
        for i, stage in enumerate(stages):
            try:
                result = stage.on_response(ex)
            except Exception as e:
                self._response_failed(ex, stage, e)
                continue
            if result is not None:
                return self._response_rest(ex, stage, result, stages[i + 1:])
        return None

    async def _response_rest(self, ex: Exchange, stage: Stage, pending: Awaitable[None],
                             rest: Sequence[Stage]) -> None:
        try:
            await pending
        except Exception as e:
            self._response_failed(ex, stage, e)
        for stage in rest:
            try:
                result = stage.on_response(ex)
                if result is not None:
                    await result
            except Exception as e:
                self._response_failed(ex, stage, e)

    def _response_failed(self, ex: Exchange, stage: Stage, e: BaseException) -> None:
        self.response_failures += 1
        ex.errors.append(f"{stage.name}: {type(e).__name__}: {e}")
        log.exception("stage %s failed after the request was answered (decision %s)", stage.name, ex.decision_id)

    def _fail_closed(self, ex: Exchange, stage: Stage, e: BaseException) -> None:
        for mapping in self.error_refusals:
            try:
                refusal = mapping(e, ex)
            except Exception:
                log.exception("error mapping failed (decision %s)", ex.decision_id)
                refusal = None
            if refusal is not None:
                ex.refuse(refusal)
                return
        log.exception("stage %s failed (decision %s); refusing (fail closed)", stage.name, ex.decision_id)
        ex.errors.append(f"{type(e).__name__}: {e}")
        ex.refuse(internal_error_refusal())
