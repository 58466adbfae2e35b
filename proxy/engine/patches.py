"""Patches to the embedded mitmproxy engine (installed once by `proctor run`).

Each closes a gap between what mitmproxy 11 does and what a fail-closed gateway
must do; each is covered by an integration test:

- error pages are problem+json with the decision id instead of mitmproxy's HTML
  (tests/test_egress.py, tests/test_tls_refusal.py);
- request heads are bounded before authentication (431), where mitmproxy buffers
  without limit (tests/test_request_target.py::test_header_flood_is_cut_off_early);
- HTTP/1 chunked trailers are a protocol error instead of a crash of the
  connection handler (tests/test_request_target.py::test_chunked_trailers_*).
"""

from __future__ import annotations

import contextvars
import json
import logging
from http import HTTPStatus

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from ..core.problem import DECISION_HEADER
from ..logredact import redact

log = logging.getLogger("proctor.engine")


# The decision behind an upstream failure, handed from our `error` hook to the
# engine's error-response builder. mitmproxy runs a hook and the layer events
# that follow it in one task, so a context variable carries it safely.
UPSTREAM_FAILURE: contextvars.ContextVar[tuple[str, str | None, str | None] | None] = contextvars.ContextVar(
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
    decision_id, action, resource = failure if failure is not None else (None, None, None)
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


_original_read_body = _http1.Http1Connection.read_body


def _read_body_without_trailer_crash(self, event):
    """mitmproxy 11 raises NotImplementedError on HTTP/1 chunked trailers, which
    crashes the whole connection handler (logged as a crash, no answer). Treat
    it as the protocol error it is: the message is refused, nothing forwarded."""
    try:
        yield from _original_read_body(self, event)
    except NotImplementedError as e:
        yield commands.CloseConnection(self.conn)
        yield ReceiveHttp(self.ReceiveProtocolError(self.stream_id, f"HTTP/1 protocol error: {e}"))


def install_engine_patches(max_request_head_bytes: int = MAX_REQUEST_HEAD_BYTES) -> None:
    """Engine patches: problem+json error pages and a bound on request heads."""
    global MAX_REQUEST_HEAD_BYTES
    MAX_REQUEST_HEAD_BYTES = max_request_head_bytes
    _http1.make_error_response = problem_error_response
    _http1.Http1Server.read_headers = _bounded_read_headers
    _http1.Http1Connection.read_body = _read_body_without_trailer_crash
