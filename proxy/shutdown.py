"""Graceful shutdown: the first SIGTERM (or SIGINT) drains, a second one exits at once.

Draining is bounded by `shutdown.grace_seconds`, counted from the first signal:

1. `/readyz` answers 503 ("shutting down") at once, so load balancers stop sending
   (control/health.py reads `Shutdown.draining`);
2. every agent-facing listener stops accepting: new TCP connections are refused; a
   request arriving on a keep-alive connection that is already open is answered 503
   with `Retry-After` and `Connection: close` (recorded, never forwarded);
3. requests held open for a sync approval are answered at once: 503 with
   `Retry-After` and the approval's status URL in `Location` (approvals/stage.py).
   The approval stays pending in the store: once approved, the agent's retry (on any
   replica sharing the store) is released by it;
4. requests already being decided or forwarded finish; their answers say
   `Connection: close`.

Once nothing is open, or the grace period is over (what is still open is then cut and
logged), every client connection is closed and the engine stops; `serve()` then closes
the audit sinks (they deliver what they still hold, bounded) and the store, and
`proctor run` exits 0. The control API answers until then (decisions on approvals
keep working during the drain).

A second signal during the drain exits at once (status 128 + the signal number): what
is open is cut, the audit sinks are not waited for (a file sink recovers at the next
start as after a crash).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .core.model import Refusal

log = logging.getLogger("proctor.shutdown")

# How often the drain looks at what is still open (it only runs while shutting down).
POLL_SECONDS = 0.05
# Advertised to agents refused while draining: come back at once, through another replica.
RETRY_AFTER_SECONDS = 1
SHUTTING_DOWN = "shutting-down"  # the reason named in refusals and readiness
# The record's error for a request still open when the grace period ended.
CUT_AT_SHUTDOWN = ("cut at shutdown: no answer before the grace period ended (shutdown.grace_seconds); "
                   "the agent's connection was closed")


def shutting_down_refusal() -> Refusal:
    """The answer to a request that arrives while this process drains (never forwarded)."""
    return Refusal(
        503,
        "Proctor is shutting down",
        "this Proctor process is shutting down and takes no new requests; nothing was forwarded. "
        f"Send the request again after {RETRY_AFTER_SECONDS} s on a new connection: a load balancer "
        "sends it to another replica",
        reasons=[SHUTTING_DOWN],
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        kind="fail-closed",
    )


class Drainable(Protocol):
    """An engine serving agent listeners (proxy/engine/mitm_drain.py, aiohttp_gateway.py)."""

    name: str

    async def stop_accepting(self) -> None:
        """Refuse new connections, and answer new requests on open ones 503 (Connection: close)."""

    def open_requests(self) -> list[str]:
        """One line per request still open (being decided, held or forwarded), for the log."""

    async def cut(self) -> None:
        """Close every client connection, idle or not (the end of the drain)."""


@dataclass
class Shutdown:
    """This process's shutdown state: set once by the first signal."""

    grace_seconds: float
    started_at: float | None = None  # time.monotonic() of the first signal
    signals: int = 0
    begun: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def draining(self) -> bool:
        return self.started_at is not None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()
            self.begun.set()

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def remaining(self) -> float:
        """Seconds left of the grace period (the whole period before the first signal)."""
        return max(0.0, self.grace_seconds - self.elapsed())

    def on_signal(self, signum: int) -> None:
        """The signal handler: drain on the first signal, exit at once on the second."""
        self.signals += 1
        name = signal.Signals(signum).name
        if self.signals == 1:
            log.warning("%s received: shutting down; open requests have %g s to finish "
                        "(shutdown.grace_seconds); a second signal exits at once", name, self.grace_seconds)
            self.begin()
            return
        log.error("%s received again after %.1f s: exiting now; whatever is still open is cut, "
                  "the audit sinks are not waited for", name, self.elapsed())
        logging.shutdown()  # flush the log handlers: os._exit skips every cleanup
        os._exit(128 + signum)


def install_signal_handlers(loop: asyncio.AbstractEventLoop, shutdown: Shutdown) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, shutdown.on_signal, int(sig))
        except (NotImplementedError, RuntimeError):  # no signals here (e.g. not the main thread)
            pass


async def drain(shutdown: Shutdown, engines: Sequence[Drainable], release_held: Callable[[], int] | None,
                stop: Callable[[], None], poll: float = POLL_SECONDS) -> None:
    """Wait for the first signal, drain `engines` within the grace period, then `stop()`
    (the engine's master). Runs for the life of the proxy (cancelled if it stops otherwise)."""
    await shutdown.begun.wait()
    for engine in engines:
        try:
            await engine.stop_accepting()
        except Exception:
            log.exception("%s: could not stop accepting connections", engine.name)
    held = 0
    if release_held is not None:
        try:
            held = release_held()
        except Exception:
            log.exception("could not answer the requests held for approval")
    if held:
        log.info("answered %d request(s) held for approval with 503 and their status URL "
                 "(their approvals stay pending)", held)
    announced = False
    while True:
        still = [line for engine in engines for line in _open_requests(engine)]
        if not still:
            break
        if shutdown.remaining() <= 0:
            log.warning("the grace period of %g s is over: cutting %d open request(s): %s",
                        shutdown.grace_seconds, len(still), "; ".join(still))
            break
        if not announced:
            log.info("waiting for %d open request(s) to finish (at most %.1f s more)", len(still), shutdown.remaining())
            announced = True
        await asyncio.sleep(poll)
    for engine in engines:
        try:
            await engine.cut()
        except Exception:
            log.exception("%s: could not close its client connections", engine.name)
    log.info("drained in %.2f s; closing the audit sinks and the store", shutdown.elapsed())
    stop()


def _open_requests(engine: Drainable) -> list[str]:
    try:
        return engine.open_requests()
    except Exception:  # a broken count must not hold the process until the grace period ends
        log.exception("%s: could not list its open requests", engine.name)
        return []
