"""The agent-facing listeners: are they up, and stop if one cannot bind.

mitmproxy's proxyserver logs a listener that fails to bind (port taken, no
permission) and runs on without it, which would leave Proctor "running" with
no agent port and nobody noticing. `ListenerWatch` is an addon that, once the
engine reports `running` (all listeners attempted), stops the engine if any
listener is down and remembers why, so `proctor run` can exit non-zero naming
the address. It also answers `/healthz` and `/readyz` with each listener's
live state.

A listener served by another engine (the aiohttp gateway) is bound before
mitmproxy starts and reported here too, so every listener fails the start and
shows up in readiness the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mitmproxy.proxy import mode_specs

log = logging.getLogger("proctor")


@dataclass(frozen=True)
class ListenerState:
    name: str  # "agents" (forward proxy) | "gateway" (reverse) | "transparent" (docs/transparent.md)
    address: str  # host:port as configured
    up: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "up": self.up, "error": self.error}


class OtherListener(Protocol):
    """A listener another engine serves (proxy/engine/aiohttp_gateway.py)."""

    name: str
    address: str
    error: str | None

    @property
    def up(self) -> bool: ...


class ListenerWatch:
    """mitmproxy addon; add it after the engine's own addons."""

    def __init__(self, master: Any, listeners: dict[str, tuple[str, str]],
                 others: Sequence[OtherListener] = ()) -> None:
        """`listeners`: mitmproxy mode spec -> (name, "host:port"); `others`: listeners
        served by another engine, bound before mitmproxy runs."""
        self.master = master
        # keyed like the engine's servers: the spec as mitmproxy spells it back
        self.listeners = {mode_specs.ProxyMode.parse(spec).full_spec: v for spec, v in listeners.items()}
        self.others = tuple(others)
        self.started = False  # the engine has tried to bind every listener
        self.failures: list[ListenerState] = []

    def _servers(self) -> dict[str, Any]:
        ps = self.master.addons.get("proxyserver")
        return {} if ps is None else {s.mode.full_spec: s for s in ps.servers}

    def states(self) -> list[ListenerState]:
        servers = self._servers()
        out = []
        for spec, (name, address) in self.listeners.items():
            server = servers.get(spec)
            if server is None or not self.started:
                out.append(ListenerState(name, address, False, "not started yet"))
                continue
            error = server.last_exception
            up = bool(server.is_running)
            out.append(ListenerState(name, address, up, None if up else str(error or "not listening")))
        for other in self.others:
            if not self.started:
                out.append(ListenerState(other.name, other.address, False, "not started yet"))
                continue
            up = other.up
            out.append(ListenerState(other.name, other.address, up, None if up else other.error or "not listening"))
        return out

    # -- mitmproxy hooks ------------------------------------------------------------
    def running(self) -> None:
        self.started = True
        self.failures = [s for s in self.states() if not s.up]
        for s in self.failures:
            log.error("cannot listen on %s (%s listener): %s", s.address, s.name, s.error)
        if self.failures:
            self.master.shutdown()  # `proctor run` then exits non-zero (see server.serve)
        else:
            log.info("listening: %s", ", ".join(f"{s.name} on {s.address}" for s in self.states()))

    def done(self) -> None:
        self.started = False  # shut down: nothing listens any more

    def failure_message(self) -> str:
        return "; ".join(f"cannot listen on {s.address} ({s.name} listener): {s.error}" for s in self.failures)
