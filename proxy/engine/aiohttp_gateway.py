"""The aiohttp gateway engine: gateway (reverse) mode served by aiohttp directly.

A second engine adapter on the same stage chain as the mitmproxy one
(proxy/engine/mitm.py), for the gateway listener only (`gateway.engine:
aiohttp`); mitmproxy stays the forward / CONNECT engine. Like the mitmproxy
adapter it holds no policy, audit, credential or approval logic: it turns an
HTTP request into an `Exchange`, runs the chain, and either answers the
refusal or forwards the request with the forward plan applied, then reports
the response (or the upstream error) to the chain.

A connection whose first byte opens a TLS handshake is served over TLS with a
certificate from Proctor's CA (proxy/engine/gateway_tls.py), like the mitmproxy
listener; anything else is plain HTTP/1.1 (HTTP/1.0 accepted, nothing newer).

The request path of one request, in order:

1. the request head is parsed by aiohttp's HTTP/1 parser (llhttp, strict for
   requests: CL+TE, duplicate Content-Length, obs-fold, bare CR, NUL are 400);
   the whole head is bounded by `limits.max_request_head_bytes` (431);
2. a request announcing a body runs the chain's head phase first (authentication)
   and only then is `100 Continue` sent and the body read: a refused client
   never gets `100 Continue` and its body is never buffered;
3. the body is read bounded by `limits.max_body_bytes` and the process-wide
   body budget (413 / 503, shared with the mitmproxy engine);
4. routing (GatewayRouter), then the request phase of the chain;
5. the refusal, or the request forwarded upstream by one pooled
   `aiohttp.ClientSession` exactly as decided (target, header edits, Host),
   hop-by-hop headers removed both ways, nothing added by the client library;
6. the response phase of the chain (record, metrics, ...), before a buffered
   answer is sent, after a streamed one.

Fail closed: an exception anywhere in the adapter before the request was sent
upstream is a 503 problem+json, recorded, and the request is never forwarded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
import certifi
from aiohttp import hdrs, web, web_protocol, web_server
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from multidict import CIMultiDict
from yarl import URL

from ..config import RequestLimits, UpstreamConfig
from ..core.chain import Chain, internal_error_refusal
from ..core.exchange import Exchange, ResponseSummary, refused_exchange
from ..core.model import AgentRequest
from ..core.headers import PROCTOR_RESPONSE_HEADERS, flatten_headers
from ..core.net import normalise_ip
from ..core.problem import DECISION_HEADER, PROBLEM_CONTENT_TYPE, refusal_answer
from ..logredact import redact
from ..shutdown import CUT_AT_SHUTDOWN, shutting_down_refusal
from .bodylimits import BodyBudget, BodyGuard, body_refusal
from .gateway import GatewayRouter
from .gateway_tls import ListenerCertificates

log = logging.getLogger("proctor.engine.aiohttp")

# Like the mitmproxy engine: responses up to this size (with a Content-Length) are
# buffered, so an upstream that fails mid-body still gets the agent a 502/504;
# larger or unsized ones are streamed.
STREAM_RESPONSES_OVER = 256 * 1024
# Upstream response heads: far larger than any sane server sends (aiohttp's default
# of 8 KiB per line refuses big Set-Cookie or CSP headers mitmproxy relays).
MAX_RESPONSE_FIELD_BYTES = 64 * 1024
# RFC 9110 §7.6.1, plus Proxy-Connection (a de-facto hop-by-hop header).
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
# The client library adds none of these by itself: the upstream gets what was decided.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
SHUTDOWN_GRACE_SECONDS = 5.0
# After a drain (proxy/shutdown.py) every connection is closed already: handlers still
# running (cut at the end of the grace period) get this long before they are cancelled.
AFTER_DRAIN_SECONDS = 1.0


# --------------------------------------------------------------------- helpers
def _headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], str | None, frozenset[str]]:
    return flatten_headers(raw)  # the same head the mitmproxy adapter builds


def _addressed(host_header: str | None, default_port: int) -> tuple[str, int]:
    """Host and port the agent addressed (Host header), the port defaulting to the listener's.
    Spelled like the mitmproxy adapter's (mitmproxy's parse_authority without checks)."""
    value = host_header or ""
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and port.isascii() and host and (not host.startswith("[") or host.endswith("]")):
        if ":" not in host or host.startswith("["):
            return host.strip("[]") if host.startswith("[") else host, int(port)
    if value.startswith("[") and value.endswith("]"):
        return value[1:-1], default_port
    return value, default_port


def _connection_tokens(value: str | None) -> set[str]:
    """Header names a Connection header lists (they are hop-by-hop for this message)."""
    if not value:
        return set()
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def _hop_by_hop(raw: Iterable[tuple[bytes, bytes]]) -> frozenset[str]:
    listed: set[str] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            listed |= _connection_tokens(value.decode("latin-1"))
    return HOP_BY_HOP | listed


def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address `host` resolves to."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    made: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            made.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address {address!r}: "
                                       f"{(e.strerror or str(e)).lower()}") from None
            sock.listen(1024)
            sock.setblocking(False)
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


async def _peek(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bytes:
    """The first byte the client sent, left in the socket for whoever reads next."""
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return conn.recv(1, socket.MSG_PEEK)


def _decoded(body: bytes, encoding: str | None) -> bytes | None:
    """The body a stage reads: decoded from its Content-Encoding like the mitmproxy engine
    does (its decoder, so both engines hand stages the same bytes); None if undecodable."""
    if not encoding or encoding.strip().lower() in ("", "identity"):
        return body
    from mitmproxy.net import encoding as mitm_encoding  # a pure codec table; no flow types

    try:
        out = mitm_encoding.decode(body, encoding.strip().lower())
    except (ValueError, LookupError):
        return None
    return out if isinstance(out, bytes) else None


def _problem(status: int, title: str, detail: str, decision_id: str | None = None,
             action: str | None = None, resource: str | None = None, kind: str = "protocol") -> bytes:
    """An engine-level problem+json body (the shape patches.problem_error_response gives)."""
    body = {
        "type": f"https://proctor.dev/problems/{kind}",
        "title": title,
        "status": status,
        "detail": redact(detail),
        "decision_id": decision_id,
        "action": action,
        "resource": resource,
        "reasons": [],
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _problem_headers(decision_id: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": PROBLEM_CONTENT_TYPE, "Cache-Control": "no-store"}
    if decision_id:
        headers[DECISION_HEADER] = decision_id
    return headers


def _raw_problem_response(status: int, title: str, detail: str) -> bytes:
    """A complete HTTP/1.1 answer, for refusals written before aiohttp built a request."""
    body = _problem(status, title, detail)
    head = "".join(f"{k}: {v}\r\n" for k, v in _problem_headers().items())
    return (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{head}Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class _Quiet:
    """Headers aiohttp would add on its own are left out: `Server: Python/x aiohttp/y`
    (no version disclosure) and a guessed `Content-Type: application/octet-stream`
    (the agent gets the upstream's headers as they were). An upstream's own are kept."""

    async def _prepare_headers(self) -> None:
        headers = self.headers  # type: ignore[attr-defined]
        absent = [h for h in (hdrs.SERVER, hdrs.CONTENT_TYPE) if h not in headers]
        await super()._prepare_headers()  # type: ignore[misc]
        for name in absent:
            headers.popall(name, None)


class _Response(_Quiet, web.Response):
    pass


class _StreamResponse(_Quiet, web.StreamResponse):
    pass


# ------------------------------------------------------------ the HTTP protocol
class _GatewayProtocol(web_protocol.RequestHandler):
    """aiohttp's HTTP/1 connection handler with the gateway's hardening:

    - the whole request head is bounded (aiohttp bounds each line, not their sum):
      bytes that arrive while no body is open count towards the head until its
      blank line; past `max_request_head_bytes` the client gets 431 and is closed;
    - parser errors are answered as problem+json (431 for an overlong line or field,
      400 otherwise), not aiohttp's text/plain page that may quote the request.
    """

    __slots__ = ("_head_limit", "_head_bytes", "_head_tail", "_open_body")

    def __init__(self, manager: web_server.Server, *, head_limit: int, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_limit = head_limit
        self._head_bytes = 0
        self._head_tail = b""  # the last bytes of a head so far (a blank line may straddle reads)
        self._open_body: Any = None  # the payload of the last request parsed (None: none yet)

    def data_received(self, data: bytes) -> None:
        if self._payload_parser is not None or self._upgraded or self._force_close or self._close:
            super().data_received(data)
            return
        body = self._open_body
        in_head = body is None or body.is_eof()
        counted = 0
        if in_head:
            seen = self._head_tail + data
            end = seen.find(b"\r\n\r\n")
            counted = len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
            self._head_bytes += counted
            if self._head_bytes > self._head_limit:
                self._refuse_head()
                return
            self._head_tail = seen[-3:] if end < 0 else b""
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._open_body = self._messages[-1][1] if self._messages else None
            self._head_bytes = 0
            self._head_tail = b""
        elif in_head and counted < len(data):
            # a blank line that ended no head (leading empty lines): the rest counts too
            self._head_bytes += len(data) - counted
            if self._head_bytes > self._head_limit:
                self._refuse_head()

    def _refuse_head(self) -> None:
        log.warning("refusing a request head over %d bytes from %s", self._head_limit, self.peername)
        transport = self.transport
        if transport is not None and not self._request_in_progress:
            transport.write(_raw_problem_response(
                431, "Request header fields too large",
                f"the request line and headers exceed {self._head_limit} bytes (limits.max_request_head_bytes)"))
        self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started; closing the connection")
        if isinstance(exc, LineTooLong):
            status, title = 431, "Request header fields too large"
            detail = f"the request line or a header exceeds {self._head_limit} bytes (limits.max_request_head_bytes)"
        elif isinstance(exc, HttpProcessingError):
            status, title = 400, "Bad request"
            detail = f"the request is not valid HTTP/1.1: {exc.message}"[:300]
        else:  # the handler never raises (it fails closed itself); belt and braces
            log.error("the gateway handler failed", exc_info=exc)
            status, title = 503, "Proctor could not decide"
            detail = "an internal error occurred; the request was not forwarded (fail closed)"
        log.debug("refusing a malformed request from %s: %s", self.peername, exc)
        resp = _Response(status=status, body=_problem(status, title, detail), headers=_problem_headers())
        resp.force_close()
        return resp


class _Server(web_server.Server):
    def __init__(self, handler: Any, *, head_limit: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._head_limit = head_limit

    def __call__(self) -> _GatewayProtocol:
        return _GatewayProtocol(self, loop=self._loop, head_limit=self._head_limit, **self._kwargs)


# ------------------------------------------------------------------ the engine
@dataclass
class _Progress:
    """How far one request got: decides what a failure may still do."""

    exchange: Exchange | None = None
    forwarded: bool = False  # the request was handed to the upstream client
    recorded: bool = False  # the response phase ran
    response: web.StreamResponse | None = None  # a streamed answer already started


class UpstreamError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AiohttpGateway:
    """The gateway listener, served by aiohttp, deciding with the request chain."""

    name = "gateway"

    def __init__(
        self,
        chain: Chain,
        router: GatewayRouter | None,
        limits: RequestLimits,
        upstream: UpstreamConfig,
        host: str,
        port: int,
        body_budget: BodyBudget | None = None,
        tls: ListenerCertificates | None = None,
    ) -> None:
        self.chain = chain
        self.router = router
        self.limits = limits
        self.upstream = upstream
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        # Shared with the mitmproxy engine when both run (one process-wide bound).
        self.body_budget = body_budget or BodyBudget(limits.max_inflight_body_bytes)
        self.error: str | None = None
        # TLS for clients that open with a handshake (None: plain HTTP only)
        self.tls = tls
        self._server: _Server | None = None
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._adopting: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        # Shutting down (proxy/shutdown.py): new requests are answered 503, answers close their connection.
        self.draining = False
        self._drained = False  # the drain closed every client connection
        self._progress: dict[int, _Progress] = {}  # id(request) -> how far it got (for the drain's log)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=upstream.connect_timeout_seconds, sock_read=upstream.read_timeout_seconds
        )
        self._ssl: ssl.SSLContext | bool
        if upstream.insecure_skip_verify:
            self._ssl = False
        else:
            self._ssl = ssl.create_default_context(cafile=str(upstream.ca_file) if upstream.ca_file else certifi.where())

    # -- lifecycle -------------------------------------------------------------------
    @property
    def up(self) -> bool:
        return bool(self._accepting) and not any(t.done() for t in self._accepting)

    async def start(self) -> None:
        """Bind the listener (OSError when it cannot) and open the upstream client."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        head = limits.max_request_head_bytes
        self._server = _Server(
            self._handle,
            head_limit=head,
            loop=loop,
            # each line and field is bounded by the head bound too (the sum is bounded by the protocol)
            max_line_size=head,
            max_field_size=head,
            max_headers=head // 4,  # the head bound is the real limit ("a:\r\n" is 4 bytes)
            keepalive_timeout=limits.client_idle_timeout_seconds,
            # an unread body is drained by the handler itself, bounded (never by aiohttp's lingering read)
            lingering_time=0,
            auto_decompress=False,  # policy sees (and refuses) an encoded body as it is
            access_log=None,
            handler_cancellation=False,  # an agent hanging up does not cancel a decision half-way
        )
        try:
            self._sockets = _listening_sockets(self.host, self.port)
        except OSError as e:
            self.error = str(e)
            raise
        self._accepting = [loop.create_task(self._accept(sock)) for sock in self._sockets]
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl, limit=0, limit_per_host=0),
            cookie_jar=aiohttp.DummyCookieJar(),  # upstream cookies belong to the agent, never to the pool
            trust_env=False,  # never through HTTP(S)_PROXY: straight to the upstream decided for
            auto_decompress=False,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            max_line_size=MAX_RESPONSE_FIELD_BYTES,
            max_field_size=MAX_RESPONSE_FIELD_BYTES,
            timeout=self._timeout,
        )
        log.debug("aiohttp gateway listening on %s", self.address)

    async def _stop_listening(self) -> None:
        for task in [*self._accepting, *self._adopting]:
            task.cancel()
        await asyncio.gather(*self._accepting, *self._adopting, return_exceptions=True)
        self._accepting = []
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    async def close(self) -> None:
        """Stop listening, let requests in flight finish (bounded), close the upstream pool."""
        await self._stop_listening()
        if self._server is not None:
            try:
                await self._server.shutdown(AFTER_DRAIN_SECONDS if self._drained else SHUTDOWN_GRACE_SECONDS)
            except Exception:
                log.exception("closing the gateway's client connections failed")
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- draining (proxy/shutdown.Drainable) --------------------------------------------
    async def stop_accepting(self) -> None:
        """New connections are refused (the listening sockets are closed, connections not yet
        speaking HTTP dropped); a request on a connection still open is answered 503."""
        self.draining = True
        await self._stop_listening()

    def open_requests(self) -> list[str]:
        server = self._server
        if server is None:
            return []
        out = []
        for proto in server.connections:
            # (_request_in_progress: the handler runs or its answer is being written)
            if isinstance(proto, _GatewayProtocol) and (proto._request_in_progress or proto._messages):
                out.append(self._describe_open(proto))
        return out

    def _describe_open(self, proto: _GatewayProtocol) -> str:
        request = proto._current_request
        if request is None:
            return "an answer being written"
        progress = self._progress.get(id(request))
        ex = progress.exchange if progress is not None else None
        decision = ex.decision_id if ex is not None else "undecided"
        return f"{decision} {request.method} {request.path} (gateway)"

    async def cut(self) -> None:
        """Close every client connection (idle keep-alive ones, and what the grace period cut)."""
        self._drained = True
        server = self._server
        if server is None:
            return
        for proto in list(server.connections):
            proto.force_close()

    async def _refuse_draining(self, request: web.BaseRequest, progress: _Progress) -> web.StreamResponse:
        """A request on an open connection while shutting down: 503, recorded, never forwarded."""
        ex = progress.exchange = refused_exchange(
            shutting_down_refusal(), self._unrouted(request, self._agent_request(request, b"")))
        declared: int | None = 0
        if request._message.chunked:
            declared = None
        elif (cl := request.headers.get(hdrs.CONTENT_LENGTH)) is not None:
            declared = int(cl)  # the parser accepted it: digits only, one value
        fits = declared is None or declared <= self.limits.max_body_bytes
        return await self._refuse_early(request, ex, progress, self.limits.max_body_bytes if declared != 0 and fits else 0)

    # -- connections -----------------------------------------------------------------
    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listening)
            except asyncio.CancelledError:
                raise
            except OSError as e:  # e.g. out of file descriptors: keep serving the others
                log.warning("the gateway could not accept a connection: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._adopt(conn))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)

    async def _adopt(self, conn: socket.socket) -> None:
        """Hand an accepted connection to the HTTP protocol, through TLS when the client's
        first byte opens a TLS handshake (the same port serves both, as with mitmproxy)."""
        loop = asyncio.get_running_loop()
        idle = self.limits.client_idle_timeout_seconds
        try:
            conn.setblocking(False)
            context = None
            if self.tls is not None:
                async with asyncio.timeout(idle):  # a client that sends nothing is closed
                    first = await _peek(loop, conn)
                if not first:
                    conn.close()
                    return
                if first[0] == 0x16:  # a TLS handshake record
                    context = self.tls.for_address(conn.getsockname()[0])
            assert self._server is not None
            await loop.connect_accepted_socket(self._server, conn, ssl=context,
                                               ssl_handshake_timeout=idle if context else None)
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, TimeoutError, ssl.SSLError) as e:
            log.debug("gateway connection dropped before HTTP: %s", e)
            conn.close()
        except Exception:
            log.exception("the gateway could not take a connection")
            conn.close()

    # -- building the request --------------------------------------------------------
    def _agent_request(self, request: web.BaseRequest, body: bytes) -> AgentRequest:
        path, _, query = request.raw_path.partition("?")
        headers, header_problem, repeated = _headers(request.raw_headers)
        proto = request.protocol
        peer = proto.peername
        return AgentRequest(
            method=request.method.upper(),
            scheme="http",
            host="",
            port=0,
            path=path,
            query=query,
            headers=headers,
            body=body,
            client_ip=normalise_ip(peer[0]) if isinstance(peer, tuple) else "0.0.0.0",
            mode="reverse",
            host_header=None,
            request_authority="",
            http_version=f"HTTP/{request.version.major}.{request.version.minor}",
            header_problem=header_problem,
            repeated_headers=repeated,
            client_alive=lambda p=proto: (t := p.transport) is not None and not t.is_closing(),
        )

    def _unrouted(self, request: web.BaseRequest, req: AgentRequest) -> AgentRequest:
        sock = request.protocol.sockname
        default_port = sock[1] if isinstance(sock, tuple) else self.port
        req.host, req.port = _addressed(request.headers.get(hdrs.HOST), default_port)
        req.unrouted = True
        return req

    def _routed(self, request: web.BaseRequest, body: bytes) -> AgentRequest:
        req = self._agent_request(request, body)
        target = self.router.route(request.headers.get(hdrs.HOST), req.path) if self.router else None
        if target is None:
            return self._unrouted(request, req)
        req.scheme, req.host, req.port, req.path = target.scheme, target.host, target.port, target.path
        return req

    # -- the handler -----------------------------------------------------------------
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        progress = self._progress[id(request)] = _Progress()
        try:
            if self.draining:
                return await self._refuse_draining(request, progress)
            resp = await self._serve(request, progress)
        except asyncio.CancelledError:
            raise
        except Exception:
            return await self._fail_closed(request, progress)
        finally:
            self._progress.pop(id(request), None)
        if self.draining:  # began while this request was open: its answer closes the connection
            if resp.prepared:
                request.protocol.close()  # (a streamed answer: its head is out; close once it is done)
            else:
                resp.force_close()
        return resp

    async def _serve(self, request: web.BaseRequest, progress: _Progress) -> web.StreamResponse:
        if request.version not in (HttpVersion11, HttpVersion10):
            # answered raw: aiohttp would echo the request's version in the status line
            if request.version.major < 1:  # HTTP/0.9 (or a request line without a version)
                raw = _raw_problem_response(400, "Bad request", "the request line has no HTTP/1.x version")
            else:
                raw = _raw_problem_response(505, "HTTP version not supported",
                                            "the gateway speaks HTTP/1.1 (and HTTP/1.0) only")
            transport = request.transport
            if transport is not None:
                transport.write(raw)
            return self._close_connection(request)
        if not request.raw_path.startswith("/"):
            # absolute-form (or asterisk-form) to a gateway: routing is by Host and path only
            return self._protocol_refusal(
                400, "Bad request",
                "the gateway takes origin-form request targets (/path?query) only; send the path, not a URL")
        message = request._message
        declared: int | None = 0
        if message.chunked:
            declared = None
        elif (cl := request.headers.get(hdrs.CONTENT_LENGTH)) is not None:
            declared = int(cl)  # the parser accepted it: digits only, one value
        body = b""
        if declared != 0:
            # No work before authentication: the head phase decides before the body is read.
            ex = progress.exchange = Exchange(self._unrouted(request, self._agent_request(request, b"")))
            await self.chain.head(ex)
            limits = self.limits
            fits = declared is None or declared <= limits.max_body_bytes
            if ex.refusal is not None:
                return await self._refuse_early(request, ex, progress, limits.max_body_bytes if fits else 0)
            guard = BodyGuard(self.body_budget, limits.max_body_bytes, declared)
            if guard.verdict is not None:
                ex.refuse(body_refusal(guard.verdict, limits))
                return await self._refuse_early(request, ex, progress, limits.max_body_bytes if fits else 0)
            read = await self._read_body(request, ex, guard, progress)
            if isinstance(read, web.StreamResponse):
                return read
            body = read
        req = self._routed(request, body)
        if progress.exchange is None:
            ex = progress.exchange = Exchange(req)
        else:
            ex = progress.exchange
            ex.request = req  # the head phase's exchange, now with the body and the route
        await self.chain.request(ex)
        if ex.refusal is not None:
            return await self._refuse(ex, progress)
        if ex.local_reply is not None:  # a stage answered it (a replayed stored response)
            reply = ex.local_reply
            headers = dict(reply.headers)
            headers.update(ex.plan.response_headers)
            headers[DECISION_HEADER] = ex.decision_id
            resp = _Response(status=reply.status, body=reply.body, headers=headers)
            ex.response = ResponseSummary(reply.status)
            await self._record(ex, progress)
            return resp
        return await self._forward(request, ex, progress)

    # -- the body --------------------------------------------------------------------
    async def _read_body(self, request: web.BaseRequest, ex: Exchange, guard: BodyGuard,
                         progress: _Progress) -> bytes | web.StreamResponse:
        """The body, bounded while it arrives; or the answer that ended it."""
        if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue" and request.version == HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # authenticated and admitted
        content = request.content
        parts: list[bytes] = []
        idle = self.limits.client_idle_timeout_seconds
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        data = await content.readany()
                except TimeoutError:
                    # a client that stops in the middle of its body is closed (nothing decided, nothing recorded)
                    log.debug("closing a client idle for %g s in the middle of its body", idle)
                    return self._close_connection(request)
                if not data:
                    break
                verdict = guard.on_data(len(data))
                if verdict is not None:
                    ex.refuse(body_refusal(verdict, self.limits))
                    return await self._refuse_early(request, ex, progress, 0)
                parts.append(data)
        except (web_protocol.RequestPayloadError, aiohttp.ClientPayloadError, HttpProcessingError) as e:
            guard.release()
            return self._protocol_refusal(400, "Bad request", f"the request body is malformed: {e}")
        except (ConnectionError, web_protocol.PayloadAccessError):
            guard.release()  # the client went away mid-body: nothing was decided or forwarded
            return self._close_connection(request)
        finally:
            if guard.verdict is None:
                guard.release()  # complete (or abandoned): the body now belongs to the decision
        return b"".join(parts)

    # -- answers -----------------------------------------------------------------------
    @staticmethod
    def _close_connection(request: web.BaseRequest) -> web.StreamResponse:
        request.protocol.force_close()
        resp = _Response(status=400)
        resp.force_close()
        return resp

    @staticmethod
    def _protocol_refusal(status: int, title: str, detail: str) -> web.StreamResponse:
        """An engine-level refusal before any decision (not recorded, like the mitmproxy engine's
        protocol errors)."""
        resp = _Response(status=status, body=_problem(status, title, detail), headers=_problem_headers())
        resp.force_close()
        return resp

    @staticmethod
    def _refusal_response(ex: Exchange) -> _Response:
        status, headers, body = refusal_answer(ex)
        return _Response(status=status, body=body, headers=headers)

    async def _record(self, ex: Exchange, progress: _Progress) -> None:
        progress.recorded = True
        await self.chain.response(ex)

    async def _refuse(self, ex: Exchange, progress: _Progress) -> web.StreamResponse:
        resp = self._refusal_response(ex)
        ex.response = ResponseSummary(resp.status)
        await self._record(ex, progress)
        return resp

    async def _refuse_early(self, request: web.BaseRequest, ex: Exchange, progress: _Progress,
                            drain: int) -> web.StreamResponse:
        """Refused before the body was read: answer at once and close; a small body still on
        its way is read and discarded (never buffered) first, so the client reads the answer
        instead of a reset connection."""
        resp = self._refusal_response(ex)
        resp.force_close()
        ex.response = ResponseSummary(resp.status)
        await self._record(ex, progress)
        await resp.prepare(request)
        await resp.write_eof()
        if drain > 0:
            await self._discard(request, drain)
        request.protocol.force_close()
        return resp

    async def _discard(self, request: web.BaseRequest, limit: int) -> None:
        content = request.content
        idle = self.limits.client_idle_timeout_seconds
        left = limit
        try:
            while left > 0 and not content.at_eof():
                async with asyncio.timeout(idle):
                    data = await content.readany()
                if not data:
                    return
                left -= len(data)
        except (TimeoutError, ConnectionError, web_protocol.RequestPayloadError, web_protocol.PayloadAccessError):
            return

    async def _fail_closed(self, request: web.BaseRequest, progress: _Progress) -> web.StreamResponse:
        """An adapter error: refuse (503, recorded) unless the upstream already has the request."""
        ex = progress.exchange
        log.exception("the aiohttp gateway failed on a request (decision %s)", ex.decision_id if ex else None)
        if progress.response is not None:  # an answer is already on its way: cut it
            request.protocol.force_close()
            if ex is not None and not progress.recorded:
                ex.errors.append("internal error in the gateway engine while streaming the response")
                await self._record_quietly(ex, progress)
            return progress.response
        if ex is None:
            ex = Exchange(None)
        if progress.forwarded:
            # the upstream has acted on it: report, do not pretend it was refused
            ex.errors.append("internal error in the gateway engine after forwarding")
            status = 502
            body = _problem(502, "Upstream unavailable", "the answer could not be relayed", ex.decision_id)
            resp = _Response(status=status, body=body, headers=_problem_headers(ex.decision_id))
            if not progress.recorded:
                ex.response = ResponseSummary(status, error="internal error in the gateway engine")
                await self._record_quietly(ex, progress)
        else:
            ex.refuse(internal_error_refusal())
            ex.errors.append("internal error in the gateway engine")
            try:
                resp = self._refusal_response(ex)
            except Exception:
                log.exception("could not even build the refusal; closing the connection")
                return self._close_connection(request)
            if not progress.recorded:
                ex.response = ResponseSummary(resp.status, error="internal error in the gateway engine")
                await self._record_quietly(ex, progress)
        resp.force_close()
        return resp

    async def _record_quietly(self, ex: Exchange, progress: _Progress) -> None:
        try:
            await self._record(ex, progress)
        except Exception:
            log.exception("could not record decision %s", ex.decision_id)

    # -- forwarding ----------------------------------------------------------------------
    def _upstream_headers(self, request: web.BaseRequest, ex: Exchange, has_body: bool, length: int) -> CIMultiDict[str]:
        """The agent's headers as decided: hop-by-hop and framing headers dropped (the client
        library frames the buffered body itself), the plan's removals and settings applied
        in place, Host naming the canonical target the decision was made for."""
        raw = request.raw_headers
        drop = _hop_by_hop(raw) | {"host", "content-length", "expect"} | set(ex.plan.remove_headers)
        setting = ex.plan.set_headers
        out: CIMultiDict[str] = CIMultiDict()
        done: set[str] = set()
        for raw_name, raw_value in raw:
            name = raw_name.decode("latin-1")
            lowered = name.lower()
            if lowered in setting:
                if lowered not in done:
                    out.add(name, setting[lowered])
                    done.add(lowered)
                continue
            if lowered in drop:
                if lowered == "expect" and raw_value.lower() != b"100-continue":
                    out.add(name, raw_value.decode("latin-1"))  # only the expectation Proctor met is dropped
                continue
            out.add(name, raw_value.decode("latin-1"))
        for lowered, value in setting.items():
            if lowered not in done:
                out.add(lowered, value)
        out[hdrs.HOST] = ex.host_header()
        if has_body:
            out[hdrs.CONTENT_LENGTH] = str(length)
        return out

    def _upstream_url(self, req: AgentRequest) -> URL:
        host = f"[{req.host}]" if ":" in req.host else req.host
        return URL.build(scheme=req.scheme, host=host, port=req.port, path=req.path or "/",
                         query_string=req.query, encoded=True)

    async def _forward(self, request: web.BaseRequest, ex: Exchange, progress: _Progress) -> web.StreamResponse:
        req = ex.request
        assert req is not None and self._session is not None
        message = request._message
        has_body = bool(req.body) or message.chunked or request.headers.get(hdrs.CONTENT_LENGTH) is not None
        headers = self._upstream_headers(request, ex, has_body, len(req.body))
        url = self._upstream_url(req)
        progress.forwarded = True
        try:
            async with self._session.request(
                req.method, url, headers=headers, data=req.body if req.body else None,
                allow_redirects=False, skip_auto_headers=SKIP_AUTO_HEADERS, timeout=self._timeout,
            ) as up:
                return await self._relay(request, ex, up, progress)
        except UpstreamError as e:
            return await self._upstream_failed(ex, progress, e.status, e.message)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            if self._drained:  # still open when the shutdown grace period ended (its upstream client is closed)
                return await self._cut_at_shutdown(request, ex, progress)
            if progress.response is not None:
                agent_gone = (t := request.transport) is None or t.is_closing()
                msg = "the agent closed the connection during the answer" if agent_gone else self._describe(e, req)[1]
                return await self._cut(request, ex, progress, msg)
            status, msg = self._describe(e, req)
            return await self._upstream_failed(ex, progress, status, msg)

    def _describe(self, e: BaseException, req: AgentRequest) -> tuple[int, str]:
        where = f"{req.host}:{req.port}"
        up = self.upstream
        if isinstance(e, aiohttp.ConnectionTimeoutError):
            return 504, (f"connecting to the upstream {where} timed out after {up.connect_timeout_seconds:g} s "
                         "(upstream.connect_timeout_seconds)")
        if isinstance(e, (aiohttp.SocketTimeoutError, asyncio.TimeoutError)):
            return 504, (f"the upstream sent nothing for {up.read_timeout_seconds:g} s "
                         "(upstream.read_timeout_seconds); timed out waiting for its response")
        if isinstance(e, aiohttp.ClientConnectorCertificateError):
            return 502, f"the upstream {where} presented a certificate that does not verify: {e.certificate_error}"
        if isinstance(e, aiohttp.ClientConnectorError):
            return 502, f"cannot connect to the upstream {where}: {e.os_error}"
        if isinstance(e, aiohttp.ServerDisconnectedError):
            return 502, f"the upstream {where} closed the connection without a complete answer"
        return 502, f"the upstream {where} failed: {type(e).__name__}: {e}"

    def _answer_headers(self, up: aiohttp.ClientResponse, ex: Exchange) -> CIMultiDict[str]:
        raw = up.raw_headers
        drop = _hop_by_hop(raw)
        chunked = any(n.lower() == b"transfer-encoding" for n, _ in raw)
        out: CIMultiDict[str] = CIMultiDict()
        for raw_name, raw_value in raw:
            lowered = raw_name.lower().decode("latin-1")
            if lowered in drop or (chunked and lowered == "content-length") or lowered in PROCTOR_RESPONSE_HEADERS:
                continue  # (Proctor-* response headers: only Proctor speaks these, core/headers.py)
            out.add(raw_name.decode("latin-1"), raw_value.decode("latin-1"))
        out[DECISION_HEADER] = ex.decision_id
        for name, value in ex.plan.response_headers.items():
            out[name] = value
        return out

    async def _relay(self, request: web.BaseRequest, ex: Exchange, up: aiohttp.ClientResponse,
                     progress: _Progress) -> web.StreamResponse:
        status = up.status
        headers = self._answer_headers(up, ex)
        summary_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in up.raw_headers}
        cl_text = up.headers.get(hdrs.CONTENT_LENGTH)
        length = int(cl_text) if cl_text is not None and cl_text.isascii() and cl_text.isdigit() else None
        if length is not None and length > self.limits.engine_max_message_bytes:
            raise UpstreamError(502, f"the upstream's response ({length} bytes) is larger than the engine's "
                                     f"limit of {self.limits.engine_max_message_bytes} bytes "
                                     "(limits.engine_max_message_bytes)")
        wanted = ex.plan.read_response_body if 200 <= status < 300 else 0
        no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        buffered: bytes | None = None
        if no_body:
            buffered = b""
        elif wanted and (length is None or length <= wanted):
            # a stage reads this body: buffer it (bounded; past the bound it is streamed)
            buffered = await self._read_upto(up, wanted)
        elif ex.allowed and status in ex.plan.replaceable_statuses:
            # a stage may answer instead of it: buffered whole, nothing sent before the response phase
            limit = self.limits.engine_max_message_bytes
            buffered = await self._read_upto(up, limit + 1)
            if len(buffered) > limit:
                raise UpstreamError(502, f"the upstream's response is larger than the engine's limit of {limit} "
                                         "bytes (limits.engine_max_message_bytes)")
        elif length is not None and length <= STREAM_RESPONSES_OVER:
            buffered = await self._read_upto(up, length)
        if buffered is not None and up.content.at_eof():
            body = _decoded(buffered, up.headers.get(hdrs.CONTENT_ENCODING)) if wanted else None
            ex.response = ResponseSummary(status, upstream_status=status, headers=summary_headers, body=body)
            await self._record(ex, progress)
            if ex.replaced:  # a response stage answers instead of the upstream (an upstream 412 -> 409)
                return self._refusal_response(ex)
            for name, value in ex.plan.response_headers.items():  # (added in the response phase too)
                headers[name] = value
            return _Response(status=status, reason=up.reason, headers=headers, body=buffered)
        # streamed (large, unsized, or over what a stage wanted)
        resp = _StreamResponse(status=status, reason=up.reason, headers=headers)
        progress.response = resp
        await resp.prepare(request)
        if buffered:
            await resp.write(buffered)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        ex.response = ResponseSummary(status, upstream_status=status, headers=summary_headers, body=None)
        await self._record(ex, progress)
        return resp

    @staticmethod
    async def _read_upto(up: aiohttp.ClientResponse, limit: int) -> bytes:
        """At most `limit` bytes of the body (all of it when it is no longer)."""
        parts: list[bytes] = []
        got = 0
        while got < limit:
            data = await up.content.read(limit - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    async def _cut(self, request: web.BaseRequest, ex: Exchange, progress: _Progress, msg: str) -> web.StreamResponse:
        """The upstream failed in the middle of a streamed answer: the agent's connection is
        closed (its answer is visibly incomplete), the failure recorded."""
        request.protocol.force_close()
        resp = progress.response
        assert resp is not None
        if not progress.recorded:
            status = resp.status
            ex.response = ResponseSummary(status, upstream_status=status, error=msg)
            await self._record(ex, progress)
        return resp

    async def _cut_at_shutdown(self, request: web.BaseRequest, ex: Exchange,
                               progress: _Progress) -> web.StreamResponse:
        """Recorded as cut (the agent's connection is closed, it gets no answer)."""
        request.protocol.force_close()
        if not progress.recorded:
            ex.response = ResponseSummary(None, error=CUT_AT_SHUTDOWN)
            await self._record(ex, progress)
        resp = progress.response or _Response(status=503)
        resp.force_close()
        return resp

    async def _upstream_failed(self, ex: Exchange, progress: _Progress, status: int, msg: str) -> web.StreamResponse:
        """502/504 problem+json carrying the decision id (recorded first)."""
        cls = ex.classification
        title = "Upstream timed out" if status == 504 else "Upstream unavailable"
        body = _problem(status, title, msg, ex.decision_id, cls.action if cls else None,
                        cls.resource_uid if cls else None, kind="upstream")
        headers = _problem_headers(ex.decision_id)
        for name, value in ex.plan.response_headers.items():
            headers.setdefault(name, value)
        ex.response = ResponseSummary(status, error=msg)
        await self._record(ex, progress)
        resp = _Response(status=status, body=body, headers=headers)
        resp.force_close()
        return resp
