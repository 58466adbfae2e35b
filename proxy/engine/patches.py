"""Patches to the embedded mitmproxy engine (installed once by `proctor run`).

Each closes a gap between what mitmproxy 11 does and what a fail-closed gateway
must do; each is covered by an integration test:

- error pages are problem+json with the decision id instead of mitmproxy's HTML
  (tests/test_egress.py, tests/test_tls_refusal.py);
- request heads are bounded before authentication (431), where mitmproxy buffers
  without limit (tests/test_request_target.py::test_header_flood_is_cut_off_early);
- HTTP/1 chunked trailers are a protocol error instead of a crash of the
  connection handler (tests/test_request_target.py::test_chunked_trailers_*);
- no work before authentication: a request body is not read (and no
  `100 Continue` sent) until the `requestheaders` hook has authenticated the
  sender; a refusal there is answered at once; bodies are bounded per request and
  in total while they are received (tests/test_preauth.py);
- timeouts mitmproxy 11 lacks: connecting to an upstream, an upstream that stops
  sending (504 with the decision id) and an idle client; mitmproxy's own idle
  watchdog ignores being disarmed mid-sleep, which would close a connection held
  for approval (tests/test_timeouts.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import weakref
from dataclasses import dataclass
from http import HTTPStatus

from mitmproxy import http
from mitmproxy.connection import Client, ConnectionState, Server
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, tunnel
from mitmproxy.proxy import server as mitm_server
from mitmproxy.proxy.layers.http import DropStream, HttpStream, SendHttp, _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import (
    RequestData,
    RequestEndOfMessage,
    ResponseData,
    ResponseEndOfMessage,
    ResponseHeaders,
    ResponseProtocolError,
)
from mitmproxy.proxy.layers.http._hooks import HttpRequestHeadersHook
from mitmproxy.utils import human

from ..core.problem import DECISION_HEADER
from .bodylimits import BodyGuard
from ..logredact import redact

log = logging.getLogger("proctor.engine")


# The decision behind an upstream failure, handed from our `error` hook to the
# engine's error-response builder. mitmproxy runs a hook and the layer events
# that follow it in one task, so a context variable carries it safely.
# (decision id, action, resource, headers the decision adds to every answer: rate-limit fields)
UPSTREAM_FAILURE: contextvars.ContextVar[
    tuple[str, str | None, str | None, dict[str, str]] | None] = contextvars.ContextVar(
    "proctor_upstream_failure", default=None
)


def is_timeout(message: str) -> bool:
    m = message.lower()
    return "timed out" in m or "timeout" in m


def problem_error_response(status_code: int, message: str = "") -> bytes:
    """Replacement for mitmproxy's HTML error page: problem+json with the decision id."""
    failure = UPSTREAM_FAILURE.get()
    if failure is not None and status_code == 502 and is_timeout(message):
        status_code = 504
    titles = {
        502: "Upstream unavailable",
        504: "Upstream timed out",
        400: "Bad request",
        413: "Message too large",
        431: "Request header fields too large",
    }
    decision_id, action, resource, extra = failure if failure is not None else (None, None, None, {})
    body = {
        "type": "https://proctor.dev/problems/"
        + ("upstream" if status_code in (502, 504) else "request" if status_code == 413 else "protocol"),
        "title": titles.get(status_code, "Proxy error"),
        "status": status_code,
        "detail": redact(message).replace("mitmproxy's ", "the engine's "),  # it may quote the raw request
        "decision_id": decision_id,
        "action": action,
        "resource": resource,
        "reasons": [],
    }
    headers = {"Content-Type": "application/problem+json", "Connection": "close", "Cache-Control": "no-store"}
    if decision_id:
        headers[DECISION_HEADER] = decision_id
    for name, value in extra.items():
        headers.setdefault(name, value)
    resp = http.Response.make(status_code, json.dumps(body, separators=(",", ":")).encode(), headers)
    if not resp.reason:
        resp.reason = HTTPStatus(status_code).phrase
    return http1.assemble_response(resp)


# Request heads (request line + headers) larger than this are refused with 431
# before they are buffered any further: mitmproxy itself has no such bound, so a
# client could otherwise grow the proxy's memory without ever authenticating.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
_original_read_headers = _http1.Http1Server.read_headers


def _bounded_read_headers(self, event):
    if isinstance(event, events.DataReceived) and len(self.buf) > MAX_REQUEST_HEAD_BYTES:
        head_end = bytes(self.buf)[: MAX_REQUEST_HEAD_BYTES + 4].find(b"\r\n\r\n")
        if head_end < 0:
            log.warning(
                "refusing a request head over %d bytes from %s", MAX_REQUEST_HEAD_BYTES, self.conn.peername
            )
            yield commands.SendData(
                self.conn,
                problem_error_response(431, f"the request line and headers exceed {MAX_REQUEST_HEAD_BYTES} bytes"),
            )
            yield commands.CloseConnection(self.conn)
            self.state = self.done
            return
    yield from _original_read_headers(self, event)


# -- timeouts ---------------------------------------------------------------------
@dataclass(frozen=True)
class EngineTimeouts:
    upstream_connect: float = 10.0  # TCP connect (and DNS) to an upstream
    upstream_read: float = 60.0  # an upstream connection that sends nothing for this long is closed (504)
    client_idle: float = 60.0  # a client connection with nothing to do for this long is closed


TIMEOUTS = EngineTimeouts()

# Upstream connections closed by the read timeout: the layers then report a
# timeout (504) instead of "server closed connection" (502).
_UPSTREAM_TIMED_OUT: "weakref.WeakSet[Server]" = weakref.WeakSet()


def _upstream_silence_message() -> str:
    return (
        f"the upstream sent nothing for {TIMEOUTS.upstream_read:g} s (upstream.read_timeout_seconds); "
        "timed out waiting for its response"
    )


class _UpstreamReader:
    """An upstream socket reader that gives up after `timeout` seconds without data.

    One timer per connection instead of one per read (reads are hot): each read only
    moves the deadline; the timer, when it fires early, re-arms itself for the rest."""

    __slots__ = ("_inner", "_server", "_timeout", "_deadline", "_reading", "_timer", "_loop")

    def __init__(self, inner, server: Server, timeout: float) -> None:
        self._inner, self._server, self._timeout = inner, server, timeout
        self._deadline = 0.0
        self._reading: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def _check(self) -> None:
        self._timer = None
        task = self._reading
        if task is None or task.done():
            return
        remaining = self._deadline - self._loop.time()
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check)
            return
        _UPSTREAM_TIMED_OUT.add(self._server)
        task.cancel("upstream read timeout")

    async def read(self, n: int) -> bytes:
        self._deadline = self._loop.time() + self._timeout
        self._reading = asyncio.current_task()
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check)
        try:
            return await self._inner.read(n)
        except asyncio.CancelledError:
            if self._server in _UPSTREAM_TIMED_OUT:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # our own cancellation, turned into the error below
                # an OSError: the engine treats the connection as closed (and reports the timeout)
                raise TimeoutError("upstream read timed out") from None
            raise
        finally:
            self._reading = None


class _ClientTurn:
    """Per client connection: may its bytes be read yet, and is it waiting for Proctor?

    Reading pauses between a request head that announces a body and the end of
    the `requestheaders` hook (authentication): the body stays in the client's
    socket, not in Proctor's memory. While the client waits for Proctor (its
    request is complete, the answer is not), the idle watchdog is disarmed, so a
    slow upstream ends in the upstream read timeout's 504, not in a silent close.
    """

    __slots__ = ("readable", "_watchdog", "_disarmed", "__weakref__")

    def __init__(self, watchdog) -> None:
        self.readable = asyncio.Event()
        self.readable.set()
        self._watchdog = watchdog
        self._disarmed = False

    def waiting_for_us(self, waiting: bool) -> None:
        # What TimeoutWatchdog.disarm() does on enter and exit (its blocker count
        # nests with the engine's own disarms), without a context manager per request.
        wd = self._watchdog
        if waiting and not self._disarmed:
            self._disarmed = True
            wd.can_timeout.clear()
            wd.blocker += 1
        elif not waiting and self._disarmed:
            self._disarmed = False
            wd.blocker -= 1
            if wd.blocker == 0:
                wd.register_activity()
                wd.can_timeout.set()


_CLIENT_TURNS: "weakref.WeakKeyDictionary[Client, _ClientTurn]" = weakref.WeakKeyDictionary()


class _GatedReader:
    """A client socket reader that waits while reading is paused."""

    __slots__ = ("_inner", "_readable")

    def __init__(self, inner, readable: asyncio.Event) -> None:
        self._inner, self._readable = inner, readable

    async def read(self, n: int) -> bytes:
        if not self._readable.is_set():
            await self._readable.wait()
        return await self._inner.read(n)


_original_handle_connection = mitm_server.ConnectionHandler.handle_connection


async def _handle_connection_with_limits(self, connection) -> None:
    io = self.transports[connection]
    if connection is self.client:
        turn = _ClientTurn(self.timeout_watchdog)
        _CLIENT_TURNS[connection] = turn
        io.reader = _GatedReader(io.reader, turn.readable)
    elif isinstance(connection, Server) and TIMEOUTS.upstream_read:
        io.reader = _UpstreamReader(io.reader, connection, TIMEOUTS.upstream_read)
    try:
        await _original_handle_connection(self, connection)
    finally:
        # The turn holds the watchdog, whose callback holds the handler, which holds the
        # client: the weak key would never die on its own (every connection kept forever).
        if connection is self.client:
            _CLIENT_TURNS.pop(connection, None)


_original_open_connection = mitm_server.ConnectionHandler.open_connection


async def _open_connection_with_timeout(self, command) -> None:
    """mitmproxy 11 waits for a TCP connect as long as the OS does (minutes). Give up
    after `upstream_connect` seconds: the task is cancelled with a message the engine
    turns into the connection error, so the agent gets a 504 naming the timeout."""
    conn = command.connection
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    limit = TIMEOUTS.upstream_connect
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal timer
        if task is None or task.done() or conn.timestamp_tcp_setup is not None:
            return
        if conn.timestamp_start is None:  # still queued behind the engine's per-address limit
            timer = loop.call_later(limit, check)
            return
        waited = time.time() - conn.timestamp_start
        if waited >= limit:
            where = human.format_address(conn.address) if conn.address else "?"
            task.cancel(f"connecting to the upstream {where} timed out after {limit:g} s "
                        "(upstream.connect_timeout_seconds)")
        else:
            timer = loop.call_later(limit - waited, check)

    timer = loop.call_later(limit, check)
    try:
        await _original_open_connection(self, command)
    finally:
        timer.cancel()


async def _watch_respecting_disarm(self) -> None:
    """mitmproxy's idle watchdog, except that a connection disarmed while the watchdog
    sleeps (a hook running, e.g. a request held for approval) is not closed when the
    sleep ends: it is re-armed, with fresh time, when the hook is done."""
    try:
        while True:
            await self.can_timeout.wait()
            await asyncio.sleep(self.timeout - (time.time() - self.last_activity))
            if self.can_timeout.is_set() and self.last_activity + self.timeout < time.time():
                await self.callback()
                return
    except asyncio.CancelledError:
        return


_original_server_mark_done = _http1.Http1Server.mark_done


def _server_mark_done(self, *, request: bool = False, response: bool = False):
    yield from _original_server_mark_done(self, request=request, response=response)
    turn = _CLIENT_TURNS.get(self.conn)
    if turn is not None:
        # the request is in, its answer is not: the client waits for us, it is not idle
        turn.waiting_for_us(self.request_done and not self.response_done)


def _report_upstream_timeout(self):
    if self.conn.state & ConnectionState.CAN_WRITE:
        yield commands.CloseConnection(self.conn)
    self.state = self.done
    yield ReceiveHttp(ResponseProtocolError(self.stream_id, _upstream_silence_message(), 504))


_original_client_read_headers = _http1.Http1Client.read_headers


def _client_read_headers(self, event):
    if isinstance(event, events.ConnectionClosed) and self.stream_id is not None and self.conn in _UPSTREAM_TIMED_OUT:
        yield from _report_upstream_timeout(self)
        return
    yield from _original_client_read_headers(self, event)


_original_handshake_finished = tunnel.TunnelLayer._handshake_finished


def _handshake_finished(self, err):
    if err == "connection closed" and self.tunnel_connection in _UPSTREAM_TIMED_OUT:
        err = (f"the upstream TLS handshake timed out: nothing received for {TIMEOUTS.upstream_read:g} s "
               "(upstream.read_timeout_seconds)")
    yield from _original_handshake_finished(self, err)


_original_read_body = _http1.Http1Connection.read_body


def _read_body_bounded(self, event):
    """mitmproxy 11 raises NotImplementedError on HTTP/1 chunked trailers, which
    crashes the whole connection handler (logged as a crash, no answer). Treat
    it as the protocol error it is: the message is refused, nothing forwarded.
    An upstream body cut short by the read timeout is a timeout (504), not a
    complete (read-until-close) or broken (502) response."""
    if (
        isinstance(event, events.ConnectionClosed)
        and isinstance(self, _http1.Http1Client)
        and self.conn in _UPSTREAM_TIMED_OUT
    ):
        yield from _report_upstream_timeout(self)
        return
    try:
        yield from _original_read_body(self, event)
    except NotImplementedError as e:
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(self.ReceiveProtocolError(self.stream_id, f"HTTP/1 protocol error: {e}"))


# -- no work before authentication ------------------------------------------------
# flow.metadata keys shared with the addon (proxy/engine/mitm.py):
# the `requestheaders` hook answered (flow.response is the refusal); the value is how
# many body bytes may still be read and discarded before the connection is closed
# (0: close at once), so that a client still sending a small body reads the answer
# instead of a reset connection.
EARLY_ANSWER = "proctor_early_answer"
# the BodyGuard that bounds this request's body while it is received
BODY_GUARD = "proctor_body_guard"


def _send_response(stream: HttpStream):
    resp = stream.flow.response
    content = resp.raw_content or b""
    yield SendHttp(ResponseHeaders(stream.stream_id, resp, not content), stream.context.client)
    if content:
        yield SendHttp(ResponseData(stream.stream_id, content), stream.context.client)
    yield SendHttp(ResponseEndOfMessage(stream.stream_id), stream.context.client)


def _answer_early(stream: HttpStream, end_stream: bool):
    """The addon refused in `requestheaders`: answer now, before the body is read (no 100 Continue)."""
    flow = stream.flow
    drain = flow.metadata.get(EARLY_ANSWER) or 0
    if not end_stream:
        flow.response.headers["Connection"] = "close"
    yield from _send_response(stream)
    flow.live = False
    stream.server_state = stream.state_errored
    if end_stream:
        stream.client_state = stream.state_errored
        yield DropStream(stream.stream_id)
    elif drain > 0:
        stream._proctor_drain_left = drain
        stream.client_state = stream.state_proctor_drain_request_body
    else:
        stream.client_state = stream.state_errored
        yield commands.CloseConnection(stream.context.client)
        yield DropStream(stream.stream_id)


def _drain_refused_body(self, event):
    """Read and discard (never buffer) the body of a request answered early, up to a bound.
    The answer says `Connection: close`, so the engine closes once the body is in."""
    if isinstance(event, RequestData):
        self._proctor_drain_left -= len(event.data)
        if self._proctor_drain_left < 0:
            self.client_state = self.state_errored
            yield commands.CloseConnection(self.context.client)
            yield DropStream(self.stream_id)
    elif isinstance(event, RequestEndOfMessage):
        self.client_state = self.state_errored
        yield DropStream(self.stream_id)


_original_wait_for_request_headers = HttpStream.state_wait_for_request_headers


def _wait_for_request_headers(self, event):
    """mitmproxy's request-head handling, with reading paused until the `requestheaders`
    hook is done, and the hook's early answer sent instead of reading the body."""
    if event.end_stream:
        # no body: nothing to hold back, and the addon answers such requests in `request`
        return (yield from _original_wait_for_request_headers(self, event))
    turn = _CLIENT_TURNS.get(self.context.client)
    if turn is not None:
        turn.readable.clear()
    try:
        steps = _original_wait_for_request_headers(self, event)
        reply = None
        while True:
            try:
                command = steps.send(reply)
            except StopIteration:
                return
            reply = yield command
            if isinstance(command, HttpRequestHeadersHook):
                if turn is not None:
                    turn.readable.set()
                    turn = None
                flow = self.flow
                if EARLY_ANSWER in flow.metadata and flow.response is not None and flow.error is None:
                    steps.close()
                    yield from _answer_early(self, event.end_stream)
                    return
    finally:
        if turn is not None:
            turn.readable.set()


_original_consume_request_body = HttpStream.state_consume_request_body


def _consume_request_body(self, event):
    """mitmproxy's body buffering, bounded per request and in total by the flow's BodyGuard."""
    guard: BodyGuard | None = self.flow.metadata.get(BODY_GUARD)
    if guard is not None:
        if isinstance(event, RequestData):
            verdict = guard.on_data(len(event.data))
            if verdict is not None:
                yield from _refuse_mid_body(self, guard, verdict)
                return
        elif isinstance(event, RequestEndOfMessage):
            guard.release()  # complete: the body now belongs to the decision
    yield from _original_consume_request_body(self, event)


def _refuse_mid_body(stream: HttpStream, guard: BodyGuard, verdict):
    """A body broke its bound while arriving: answer (413/503), stop reading, close."""
    flow = stream.flow
    stream.request_body_buf.clear()
    try:
        if guard.refuse is None:
            raise RuntimeError("no refusal handler for this body")
        guard.refuse(verdict)  # builds, records and sets flow.response
    except Exception:
        log.exception("could not build the refusal for an oversized body; closing the connection")
        flow.response = None
    flow.live = False
    stream.client_state = stream.server_state = stream.state_errored
    if flow.response is not None:
        flow.response.headers["Connection"] = "close"
        yield from _send_response(stream)
    yield commands.CloseConnection(stream.context.client)
    yield DropStream(stream.stream_id)


_original_handle_protocol_error = HttpStream.handle_protocol_error


def _handle_protocol_error(self, event):
    flow = getattr(self, "flow", None)
    guard = flow.metadata.get(BODY_GUARD) if flow is not None else None
    if guard is not None:
        guard.release()  # e.g. the client went away mid-body
    yield from _original_handle_protocol_error(self, event)


def install_engine_patches(
    max_request_head_bytes: int = MAX_REQUEST_HEAD_BYTES, timeouts: EngineTimeouts | None = None
) -> None:
    """Engine patches: problem+json error pages, bounded request heads and bodies,
    authentication before the body, and timeouts."""
    global MAX_REQUEST_HEAD_BYTES, TIMEOUTS
    MAX_REQUEST_HEAD_BYTES = max_request_head_bytes
    TIMEOUTS = timeouts or EngineTimeouts()
    _http1.make_error_response = problem_error_response
    _http1.Http1Server.read_headers = _bounded_read_headers
    _http1.Http1Connection.read_body = _read_body_bounded
    # timeouts
    mitm_server.TCP_TIMEOUT = TIMEOUTS.client_idle  # read by each connection handler's watchdog
    mitm_server.TimeoutWatchdog.watch = _watch_respecting_disarm
    mitm_server.ConnectionHandler.handle_connection = _handle_connection_with_limits
    mitm_server.ConnectionHandler.open_connection = _open_connection_with_timeout
    _http1.Http1Server.mark_done = _server_mark_done
    _http1.Http1Client.read_headers = _client_read_headers
    tunnel.TunnelLayer._handshake_finished = _handshake_finished
    # no work before authentication, bounded bodies
    HttpStream.state_wait_for_request_headers = _wait_for_request_headers
    HttpStream.state_consume_request_body = _consume_request_body
    HttpStream.state_proctor_drain_request_body = _drain_refused_body
    HttpStream.handle_protocol_error = _handle_protocol_error
