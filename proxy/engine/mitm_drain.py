"""Draining the mitmproxy engine at shutdown (proxy/shutdown.py says what draining means).

- stop accepting: every listening socket of the engine is closed (new TCP connections
  are refused), and the addon answers new requests on open connections 503 with
  `Connection: close` (proxy/engine/mitm.py);
- open requests: the flows the addon saw whose answer has not been handed to the
  agent yet (`flow.live`), on a connection that can still take it; a WebSocket after
  its upgrade is a stream, not a request, and is not waited for;
- cut: the client connection handlers are cancelled, as mitmproxy does on an idle
  timeout: buffered answers are flushed by the transport, upstream connections closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from mitmproxy import connection, http

from .mitm import CUT, EXCHANGE, ProctorAddon

log = logging.getLogger("proctor.engine")

CUT_WAIT_SECONDS = 1.0  # for the cancelled connection handlers to finish closing


def describe_flow(flow: http.HTTPFlow, now: float | None = None) -> str:
    """One line for the log: decision id, method and target (no query string: it may carry secrets)."""
    ex = flow.metadata.get(EXCHANGE)
    req = flow.request
    age = (now or time.time()) - req.timestamp_start
    decision = ex.decision_id if ex is not None else "undecided"
    return f"{decision} {req.method} {req.pretty_host}:{req.port}{req.path.partition('?')[0]} (open {age:.1f} s)"


def is_open(flow: http.HTTPFlow) -> bool:
    """Still owes the agent an answer it can receive."""
    return (
        flow.live
        and flow.websocket is None
        and bool(flow.client_conn.state & connection.ConnectionState.CAN_WRITE)
    )


class MitmDrain:
    """The mitmproxy engine as a proxy.shutdown.Drainable."""

    name = "mitmproxy"

    def __init__(self, master: Any, addon: ProctorAddon) -> None:
        self.master = master
        self.addon = addon

    def _proxyserver(self) -> Any:
        return self.master.addons.get("proxyserver")

    async def stop_accepting(self) -> None:
        self.addon.draining = True
        # A signal during startup: let the engine bring its listeners up first, so that
        # stopping them (and the engine) is not undone by its start.
        while not self.addon.running_event_seen:
            await asyncio.sleep(0.05)
        ps = self._proxyserver()
        if ps is None:
            return
        for server in list(ps.servers):
            if server.is_running:
                await server.stop()

    def open_requests(self) -> list[str]:
        now = time.time()
        return [describe_flow(f, now) for f in self.addon.live_flows() if is_open(f)]

    async def cut(self) -> None:
        for flow in self.addon.live_flows():
            if is_open(flow):
                flow.metadata[CUT] = True  # (recorded as cut, not as an upstream failure)
        ps = self._proxyserver()
        if ps is None:
            return
        for handler in list(ps.connections.values()):
            io = handler.transports.get(handler.client)
            if io is not None and io.handler is not None and not io.handler.done():
                io.handler.cancel("Proctor is shutting down")
        deadline = time.monotonic() + CUT_WAIT_SECONDS
        while ps.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if ps.connections:
            log.warning("%d client connection(s) still closing at shutdown", len(ps.connections))
