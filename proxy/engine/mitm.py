"""The mitmproxy engine adapter: flows in, the stage chain decides, the adapter applies.

mitmproxy is embedded as a library (a `Master` with only the addons a proxy
needs). This module is the only place that imports mitmproxy types, and it holds
no policy, audit, credential or approval logic: it translates a flow into an
`Exchange`, runs the chain (proxy/request_path.py), and then either answers the
refusal or forwards the request with the forward plan applied, and finally
reports the response (or the error) back to the chain.

Fail-closed rules enforced here rather than in a stage, because they are about
the engine's plumbing:
- the upstream connection is opened lazily, i.e. only after a request on it was
  allowed (`connection_strategy=lazy`);
- inside a CONNECT tunnel only TLS and plain HTTP/1 are accepted (HTTP is decided
  per request like forward-proxied HTTP, see tunnel_http.py); anything else is
  refused and recorded, never tunnelled uninspected; raw TCP relaying is disabled
  outright, and no connection ever gets a layer but TLS and HTTP (mitmproxy's DNS
  layer, chosen by the port alone for 53 and 5353, would relay DNS undecided);
- a client that rejects our certificate is recorded and disconnected;
- transparent mode (a connection redirected by the network, docs/transparent.md):
  the request goes where it names (core/target.py), never to the address the
  connection was redirected from; a connection addressed to Proctor itself, plain
  bytes from a TLS port and anything but HTTP/1 (plain or in TLS) are refused and
  recorded (engine/transparent.py); at the status address (the control port in the
  pod, redirected by netsetup) only `GET /v1/approvals/{id}/status` is answered, for
  the workload identity (approvals/agent_status.py), every other request refused 508;
- request bodies are always buffered so the decision happens before a single
  byte reaches the upstream (streaming is only enabled for responses);
- an exception in a hook refuses the flow (mitmproxy would otherwise carry on
  and forward an undecided request).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable
from http import HTTPStatus

from mitmproxy import connection, http, tls
from mitmproxy.net.http import url as mitm_url
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.proxy import commands, layer, layers, mode_specs
from mitmproxy.proxy.layers.http import HTTPMode, HttpStream
from mitmproxy.proxy.layers.modes import TransparentProxy
from mitmproxy.tcp import TCPFlow
from mitmproxy.udp import UDPFlow

from ..config import RequestLimits
from ..core.chain import Chain, internal_error_refusal
from ..core.exchange import Connection, Exchange, Kind, ResponseSummary, refused_exchange
from ..core.model import AgentIdentity, AgentRequest, Refusal
from ..core.headers import PROCTOR_RESPONSE_HEADERS, flatten_headers
from ..core.net import normalise_ip
from ..core.problem import DECISION_HEADER, problem_response, refusal_answer
from ..core.target import transparent_target
from ..shutdown import CUT_AT_SHUTDOWN, shutting_down_refusal
from .bodylimits import BodyBudget, BodyGuard, Verdict, body_refusal
from .gateway import GatewayRouter
from .patches import BODY_GUARD, EARLY_ANSWER, UPSTREAM_FAILURE, is_timeout
from .transparent import TransparentGuard, status_request
from .tunnel_http import Payload, admit_plain_http, classify

log = logging.getLogger("proctor.engine")

EXCHANGE = "proctor"  # flow.metadata key of the flow's Exchange
CUT = "proctor_cut"  # flow.metadata key: still open when the shutdown grace period ended (mitm_drain.py)
STREAM_RESPONSES_OVER = 256 * 1024


class _RefuseConnection(layer.Layer):
    """A layer that answers (if the client spoke HTTP) and closes: used for non-TLS bytes in a tunnel."""

    def __init__(self, context, reply: bytes) -> None:
        super().__init__(context)
        self.reply = reply

    def _handle_event(self, event):
        # once: later events (the bytes replayed by NextLayer, the close) must not send it again
        reply, self.reply = self.reply, b""
        if reply:
            yield commands.SendData(self.context.client, reply)
        yield commands.CloseConnection(self.context.client)


# The only layers a connection may get: TLS (intercepted) and HTTP (decided per request). Any
# other choice of mitmproxy's (DNS, raw TCP/UDP, QUIC) would relay bytes no stage decided.
_RELAYED_LAYERS = (layers.HttpLayer, layers.ServerTLSLayer, layers.ClientTLSLayer)


def _http_instead_of_dns(nextlayer: layer.NextLayer, chosen: layer.Layer) -> layer.Layer | None:
    """mitmproxy chose its DNS layer for a connection to port 53 or 5353 (by the port alone).
    Bytes that are (or could still become) an HTTP/1 request line get the HTTP layer mitmproxy
    gives any other port (None: wait for more bytes); anything else keeps the DNS layer, which
    the caller refuses."""
    verdict = classify(nextlayer.data_client())
    if verdict is Payload.OTHER:
        return chosen
    ctx = nextlayer.context
    if chosen in ctx.layers:  # (a layer appends itself to the stack when it is made)
        ctx.layers.remove(chosen)
    if verdict is Payload.MORE:
        nextlayer.layer = None
        return None
    nextlayer.layer = layers.HttpLayer(ctx, HTTPMode.transparent)
    return nextlayer.layer


def _headers(req: http.Request) -> tuple[dict[str, str], str | None, frozenset[str]]:
    return flatten_headers(req.headers.fields)


async def _awaited(aw: Awaitable[None]) -> None:
    await aw


class ProctorAddon:
    def __init__(
        self,
        requests: Chain,
        tunnels: Chain,
        router: GatewayRouter | None,
        limits: RequestLimits,
        body_budget: BodyBudget | None = None,
        transparent: TransparentGuard | None = None,
    ) -> None:
        self.requests = requests
        # Transparent mode's connection rules (None: no transparent listener; any redirected
        # connection is then refused).
        self.transparent = transparent
        self.tunnels = tunnels
        self.router = router
        self.limits = limits
        # Request body bytes being received, process-wide (limits.max_inflight_body_bytes).
        self.body_budget = body_budget or BodyBudget(limits.max_inflight_body_bytes)
        # Identity proven on CONNECT, bound to that client connection.
        self.tunnel_identity: weakref.WeakKeyDictionary[connection.Client, tuple[AgentIdentity, bytes | None]] = (
            weakref.WeakKeyDictionary()
        )
        self.running_event_seen = False
        # response phases started from synchronous hooks (kept referenced until done)
        self._background: set[asyncio.Task[None]] = set()
        # Shutting down (proxy/shutdown.py, set by engine/mitm_drain.py): new requests are
        # answered 503, every answer closes its connection.
        self.draining = False
        # The HTTP flows seen (weakly: a finished flow drops out), so a drain knows what is open.
        self._flows: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    # -- lifecycle -----------------------------------------------------------------
    def running(self) -> None:
        self.running_event_seen = True

    async def drain(self) -> None:
        """Wait for response phases started from synchronous hooks (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def live_flows(self) -> list[http.HTTPFlow]:
        """The HTTP flows whose answer has not been handed to the agent yet."""
        return [f for f in list(self._flows) if f.live]

    def _refuse_draining(self, flow: http.HTTPFlow) -> None:
        """A request that arrived while shutting down: 503 (Retry-After), Connection: close,
        recorded, never forwarded. Answered from the head: a small body still on its way is
        read and discarded first, so the agent reads the answer instead of a reset."""
        reverse = self._is_reverse(flow)
        req = self._unrouted_request(flow) if reverse else self._agent_request(flow, reverse)
        req.unrouted = False
        ex = refused_exchange(shutting_down_refusal(), req)
        flow.metadata[EXCHANGE] = ex
        self._answer(flow, ex)
        assert flow.response is not None
        flow.response.headers["Connection"] = "close"
        try:
            declared = expected_http_body_size(flow.request)
        except ValueError:
            declared = 0
        fits = declared is None or declared <= self.limits.max_body_bytes
        flow.metadata[EARLY_ANSWER] = self.limits.max_body_bytes if fits else 0
        self._finish_later(self.requests, ex)

    def _close_after(self, flow: http.HTTPFlow) -> None:
        """While shutting down, every answer closes its connection (the agent reconnects elsewhere)."""
        if self.draining and flow.response is not None:
            flow.response.headers["Connection"] = "close"

    # -- helpers -------------------------------------------------------------------
    def _bound_identity(self, client: connection.Client) -> AgentIdentity | None:
        bound = self.tunnel_identity.get(client)
        if bound is None and self.transparent is not None and isinstance(client.proxy_mode,
                                                                         mode_specs.TransparentMode):
            return self.transparent.workload_identity()  # a redirected connection is the workload's
        return bound[0] if bound else None

    @staticmethod
    def _is_reverse(flow: http.HTTPFlow) -> bool:
        return isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode)

    @staticmethod
    def _original_destination(client: connection.Client) -> tuple[str, int] | None:
        """Transparent mode: where the connection was going before the redirect (mitmproxy
        recovers it with SO_ORIGINAL_DST and keeps it as the client's sockname)."""
        addr = client.sockname
        return (normalise_ip(addr[0]), addr[1]) if addr else None

    def _finish_later(self, chain: Chain, ex: Exchange) -> None:
        """Run the response phase from a synchronous hook: now (so a refusal is recorded
        before it is answered), and in a task for whatever a stage has to await."""
        rest = chain.response_now(ex)
        if rest is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (unit tests calling a hook directly)
            asyncio.run(_awaited(rest))
            return
        task = loop.create_task(_awaited(rest))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    def _answer(flow: http.HTTPFlow, ex: Exchange, error: str | None = None) -> None:
        """Answer the agent with the exchange's refusal."""
        status, headers, body = refusal_answer(ex)
        flow.response = http.Response.make(status, body, headers)
        if not flow.response.reason:  # mitmproxy's table lacks e.g. 421
            flow.response.reason = HTTPStatus(status).phrase
        ex.response = ResponseSummary(status, error=error)

    def _agent_request(self, flow: http.HTTPFlow, reverse: bool,
                       head: tuple[dict[str, str], str | None, frozenset[str]] | None = None,
                       authority: str | None = None) -> AgentRequest:
        """`head`/`authority`: the headers and request-line authority as the agent sent them,
        when the flow was re-targeted since (gateway routing rewrites the Host field)."""
        r = flow.request
        bound = self.tunnel_identity.get(flow.client_conn)
        path, _, query = r.path.partition("?")
        headers, header_problem, repeated = head if head is not None else _headers(r)
        host, port, original = r.host, r.port, None
        transparent = not reverse and isinstance(flow.client_conn.proxy_mode, mode_specs.TransparentMode)
        if transparent:  # the target is what the request names, never where the connection went
            original = self._original_destination(flow.client_conn) or (r.host, r.port)
            host, port = transparent_target(headers.get("host"), r.authority if authority is None else authority,
                                            flow.client_conn.sni if flow.client_conn.tls else None, r.scheme, original)
        return AgentRequest(
            method=r.data.method.decode("latin-1"),  # as sent (mitmproxy's .method upper-cases it): the target check refuses anything but the upper-case token policy judges
            scheme=r.scheme,
            host=host,
            port=port,
            path=path,
            query=query,
            headers=headers,
            body=r.raw_content or b"",
            client_ip=normalise_ip(flow.client_conn.peername[0]) if flow.client_conn.peername else "0.0.0.0",
            mode="reverse" if reverse else "transparent" if transparent else "forward",
            original_destination=original,
            connection_identity=bound[0] if bound else None,
            connection_token_digest=bound[1] if bound else None,
            host_header=None if reverse else headers.get("host"),
            request_authority=r.authority if authority is None else authority,
            http_version=r.http_version,
            tls_sni=flow.client_conn.sni if (flow.client_conn.tls and not reverse) else None,
            header_problem=header_problem,
            repeated_headers=repeated,
            client_alive=lambda conn=flow.client_conn: bool(conn.state & connection.ConnectionState.CAN_READ),
        )

    def _unrouted_request(self, flow: http.HTTPFlow) -> AgentRequest:
        """A gateway request before routing: name what the agent addressed, not the placeholder target."""
        req = self._agent_request(flow, reverse=True)
        req.host, req.port = self._addressed(flow)
        req.unrouted = True
        return req

    # -- fail-closed hook entry points ----------------------------------------------
    def _fail_closed(self, flow: http.HTTPFlow, where: str, kind: Kind = Kind.REQUEST) -> Exchange | None:
        """Refuse the flow after an adapter error; the caller runs the response phase (records it)."""
        ex = refused_exchange(internal_error_refusal(), kind=kind)
        log.exception("%s hook failed (decision %s); refusing", where, ex.decision_id)
        ex.errors.append(f"internal error in {where}")
        flow.metadata[EXCHANGE] = ex
        try:
            self._answer(flow, ex, error=f"internal error in {where}")
        except Exception:  # last resort: no answer at all rather than an undecided one
            log.exception("could not even build the refusal; killing the flow")
            flow.kill()
            return None
        return ex

    async def _finish_failed(self, chain: Chain, ex: Exchange | None) -> None:
        if ex is None:
            return
        try:
            await chain.response(ex)
        except Exception:
            log.exception("could not record the refusal of decision %s", ex.decision_id)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            await self._http_connect(flow)
        except Exception:
            self.tunnel_identity.pop(flow.client_conn, None)
            await self._finish_failed(self.tunnels, self._fail_closed(flow, "CONNECT", Kind.TUNNEL))

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except Exception:
            await self._finish_failed(self.requests, self._fail_closed(flow, "request"))

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        try:
            self._next_layer(nextlayer)
        except Exception:
            ex = refused_exchange(
                Refusal(503, "Proctor could not decide", "internal error; connection closed (fail closed)", kind="fail-closed"),
                kind=Kind.CONNECTION,
            )
            ex.connection = Connection(None, None, None, "internal-error")
            ex.response = ResponseSummary(None, error="internal error in next_layer")
            log.exception("next_layer hook failed (decision %s); closing the connection", ex.decision_id)
            nextlayer.layer = _RefuseConnection(nextlayer.context, b"")
            try:
                self._finish_later(self.tunnels, ex)
            except Exception:
                log.exception("could not record the refusal")

    # -- CONNECT: authenticate once, bind to the connection ------------------------
    async def _http_connect(self, flow: http.HTTPFlow) -> None:
        req = AgentRequest(
            method="CONNECT",
            scheme="https",
            host=flow.request.host,
            port=flow.request.port,
            path="",
            query="",
            headers=_headers(flow.request)[0],
            body=b"",
            client_ip=normalise_ip(flow.client_conn.peername[0]) if flow.client_conn.peername else "0.0.0.0",
            mode="forward",
        )
        ex = Exchange(req, kind=Kind.TUNNEL)
        flow.metadata[EXCHANGE] = ex
        if self.draining:  # a CONNECT on a connection still open while shutting down: no new tunnel
            ex.refuse(shutting_down_refusal())
            self._answer(flow, ex)
            self._close_after(flow)
            await self.tunnels.response(ex)
            return
        await self.tunnels.request(ex)
        flow.request.headers.pop("proxy-authorization", None)
        flow.request.host = req.host  # the tunnel dials the canonical host (core/hosts.py)
        if ex.refusal is not None:
            self._answer(flow, ex)
        else:
            assert ex.identity is not None
            self.tunnel_identity[flow.client_conn] = (ex.identity, ex.credential_digest)
        await self.tunnels.response(ex)

    # -- non-TLS inside a tunnel, raw TCP/UDP: refuse -----------------------------
    def _connection_refusal(self, client: connection.Client, refusal: Refusal, host: str | None, port: int | None,
                            reason: str, status: int | None, error: str) -> Exchange:
        ex = refused_exchange(refusal, identity=self._bound_identity(client), kind=Kind.CONNECTION)
        ex.connection = Connection(normalise_ip(client.peername[0]) if client.peername else None, host, port, reason)
        ex.response = ResponseSummary(status, error=error)
        return ex

    def _next_layer(self, nextlayer: layer.NextLayer) -> None:
        ctx = nextlayer.context
        chosen = nextlayer.layer
        if chosen is None:
            return  # NextLayer is still waiting for more bytes
        # The chosen layer (stack) has already appended itself to ctx.layers:
        # the layer it sits on is the one just before it.
        idx = next((i for i, lyr in enumerate(ctx.layers) if lyr is chosen), len(ctx.layers))
        parent = ctx.layers[idx - 1] if idx > 0 else None
        # A CONNECT tunnel's payload sits on the HttpStream that handled the CONNECT.
        in_tunnel = isinstance(parent, HttpStream) and parent.mode == HTTPMode.regular
        if isinstance(chosen, layers.DNSLayer):
            # mitmproxy picks DNS by the destination port alone (53, 5353) and would relay DNS
            # messages to whatever host that is, undecided: HTTP bytes there are HTTP, the rest
            # is refused below like any other protocol.
            chosen = _http_instead_of_dns(nextlayer, chosen)
            if chosen is None:
                return  # could still become an HTTP request line: wait for more bytes
        if isinstance(ctx.client.proxy_mode, mode_specs.TransparentMode) and self._redirected_layer(
                nextlayer, chosen, isinstance(parent, TransparentProxy)):
            return  # transparent mode: allowed as chosen, waiting for more bytes, or refused
        if in_tunnel and admit_plain_http(nextlayer, chosen, ctx.client in self.tunnel_identity):
            return  # plain HTTP/1 in the tunnel: decided per request with the tunnel's identity
        if not isinstance(chosen, _RELAYED_LAYERS) or (in_tunnel and not isinstance(chosen, layers.ServerTLSLayer)):
            data = nextlayer.data_client()
            looks_http = data[:16].split(b" ")[0].isalpha() and b" " in data[:16]
            target = ctx.server.address
            ex = self._connection_refusal(
                ctx.client,
                Refusal(
                    403,
                    "Uninspectable traffic refused",
                    f"only TLS or HTTP/1 is accepted inside a CONNECT tunnel to {target[0]}:{target[1]}"
                    if target and in_tunnel
                    else f"only TLS or HTTP/1 is accepted (to {target[0]}:{target[1]}); DNS and raw TCP/UDP are "
                    "never relayed" if target
                    else "raw TCP/UDP relaying is disabled",
                    reasons=["tls-interception-required"],
                    kind="tls",
                ),
                target[0] if target else None, target[1] if target else None,
                "non-tls-in-tunnel", 403, "non-TLS traffic in tunnel",
            )
            reply = b""
            if looks_http:
                status, headers, body = problem_response(ex)
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                reply = (
                    f"HTTP/1.1 {status} Forbidden\r\n{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode() + body
            nextlayer.layer = _RefuseConnection(ctx, reply)
            self._finish_later(self.tunnels, ex)

    def _redirected_layer(self, nextlayer: layer.NextLayer, chosen: layer.Layer, first: bool) -> bool:
        """A layer on a connection redirected by the network (transparent mode). True when
        decided here (HTTP/1 admitted, more bytes awaited, or the connection refused)."""
        ctx = nextlayer.context
        dst = ctx.server.address  # the original destination
        guard = self.transparent
        where = f"{dst[0]}:{dst[1]}" if dst else "?"
        refusal: tuple[int, str, str, str, list[str]] | None = None
        # the status address takes plain HTTP/1 (its requests are answered or refused one by one)
        status_address = guard is not None and guard.is_status_address(dst)
        loop = (508, "Loop refused",
                f"this connection was addressed to Proctor itself ({where}); it was closed, not looped: "
                "address the service you want to reach", "loop", ["transparent-loop"])
        if first and status_address and isinstance(chosen, layers.HttpLayer):
            if admit_plain_http(nextlayer, chosen, True):
                return True  # an HTTP/1 request line (or its beginning): its requests are decided one by one
            refusal = loop  # anything else there (an HTTP/2 preface...) is Proctor's own port too
        elif first and (guard is None or guard.loops(dst) or status_address):
            refusal = loop
        elif first and guard is not None and guard.needs_tls(dst) and not isinstance(chosen, layers.ServerTLSLayer):
            refusal = (403, "Uninspectable traffic refused",
                       f"port {dst[1] if dst else '?'} carries TLS only (transparent.tls_ports): the connection to "
                       f"{where} sent something else; nothing was forwarded", "non-tls-on-tls-port",
                       ["tls-interception-required"])
        elif isinstance(chosen, layers.HttpLayer):
            if admit_plain_http(nextlayer, chosen, True):
                return True  # an HTTP/1 request line (or its beginning: wait for the rest)
            refusal = (403, "Uninspectable traffic refused",
                       f"only HTTP/1 (plain or in TLS) is accepted on a redirected connection (to {where}); raw TCP "
                       "relaying is disabled, nothing was forwarded", "non-http", ["tls-interception-required"])
        elif not isinstance(chosen, (layers.ServerTLSLayer, layers.ClientTLSLayer)):
            # DNS (mitmproxy's choice for ports 53 and 5353), raw TCP/UDP, QUIC: never relayed
            refusal = (403, "Uninspectable traffic refused",
                       f"only HTTP/1 (plain or in TLS) is accepted on a redirected connection (to {where}); DNS, "
                       "raw TCP/UDP and other protocols are never relayed, nothing was forwarded", "non-http",
                       ["tls-interception-required"])
        if refusal is None:
            return False  # TLS: intercepted (a TCP/UDP layer is refused by the caller)
        status, title, detail, reason, reasons = refusal
        data = nextlayer.data_client()
        spoke_http = data[:16].split(b" ")[0].isalpha() and b" " in data[:16]  # then it gets an answer
        ex = self._connection_refusal(ctx.client, Refusal(status, title, detail, reasons=reasons,
                                                          kind="loop" if reason == "loop" else "tls"),
                                      dst[0] if dst else None, dst[1] if dst else None, reason,
                                      status if spoke_http else None, title)
        reply = b""
        if spoke_http:
            st, headers, body = problem_response(ex)
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            reply = (f"HTTP/1.1 {st} {HTTPStatus(st).phrase}\r\n{head}Content-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n").encode() + body
        nextlayer.layer = _RefuseConnection(ctx, reply)
        self._finish_later(self.tunnels, ex)
        return True

    def tcp_start(self, flow: TCPFlow) -> None:  # belt and braces: never relay raw TCP
        flow.kill()

    def udp_start(self, flow: UDPFlow) -> None:
        flow.kill()

    def tls_failed_client(self, data: tls.TlsData) -> None:
        client = data.context.client
        err = getattr(client, "error", None) or "TLS handshake with the agent failed"
        target = data.context.server.address  # the CONNECT target, when there was one
        ex = self._connection_refusal(
            client,
            Refusal(
                0,
                "TLS interception failed",
                f"the agent did not accept Proctor's certificate for {client.sni or '?'} ({err}); "
                "the connection was closed, nothing was forwarded. Install the CA from `proctor ca export`.",
                reasons=["tls-interception-required"],
                kind="tls",
            ),
            client.sni or (target[0] if target else None), target[1] if target else None,
            "interception-rejected", None, "client rejected interception certificate",
        )
        self._finish_later(self.tunnels, ex)

    # -- requests ------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow):
        """No work before authentication: a request announcing a body is authenticated
        here, from its head (the chain's head phase), before the body is read or
        `100 Continue` is sent; a refusal is answered at once (patches.py sends it and
        stops reading). A request without a body is authenticated by the request phase."""
        # Decisions need the whole body: never let a request stream past us.
        flow.request.stream = False
        self._flows.add(flow)
        if flow.response is not None or flow.error is not None:
            return None  # the engine refused it already (e.g. over its size ceiling)
        if self.draining:
            try:
                self._refuse_draining(flow)
            except Exception:
                ex = self._fail_closed(flow, "requestheaders")
                flow.metadata[EARLY_ANSWER] = 0
                if ex is not None:
                    self._finish_later(self.requests, ex)
            return None
        try:
            declared = expected_http_body_size(flow.request)  # 0: none, None: chunked
            if declared == 0:
                return None  # (at the status address too: answered by the request phase)
            if self._at_status_address(flow):
                # a status request has no body: refused from the head, the body never read
                fits = declared is None or declared <= self.limits.max_body_bytes
                ex = self._status_address_refusal(flow)
                flow.metadata[EARLY_ANSWER] = self.limits.max_body_bytes if fits else 0
                self._finish_later(self.tunnels, ex)
                return None
        except Exception:
            ex = self._fail_closed(flow, "requestheaders")
            flow.metadata[EARLY_ANSWER] = 0
            if ex is not None:
                self._finish_later(self.requests, ex)
            return None
        return self._admit_body(flow, declared)

    async def _admit_body(self, flow: http.HTTPFlow, declared: int | None) -> None:
        try:
            await self._head_phase(flow, declared)
        except Exception:
            ex = self._fail_closed(flow, "requestheaders")
            flow.metadata[EARLY_ANSWER] = 0
            await self._finish_failed(self.requests, ex)

    async def _head_phase(self, flow: http.HTTPFlow, declared: int | None) -> None:
        reverse = self._is_reverse(flow)
        # the head only (body b""); a gateway request is not routed yet
        req = self._unrouted_request(flow) if reverse else self._agent_request(flow, reverse)
        ex = Exchange(req)
        flow.metadata[EXCHANGE] = ex
        limits = self.limits
        fits = declared is None or declared <= limits.max_body_bytes
        await self.requests.head(ex)
        if ex.refusal is not None:
            # a small body still on its way is read and discarded, so the client sees the 401/407
            await self._refuse_early(flow, ex, limits.max_body_bytes if fits else 0)
            return
        guard = BodyGuard(self.body_budget, limits.max_body_bytes, declared)
        if guard.verdict is not None:
            ex.refuse(body_refusal(guard.verdict, limits))
            await self._refuse_early(flow, ex, limits.max_body_bytes if fits else 0)
            return
        guard.refuse = lambda verdict: self._refuse_body(flow, ex, verdict)
        flow.metadata[BODY_GUARD] = guard

    async def _refuse_early(self, flow: http.HTTPFlow, ex: Exchange, drain: int) -> None:
        """Refused from the head alone: the engine answers before reading the body."""
        self._answer(flow, ex)
        flow.metadata[EARLY_ANSWER] = drain
        await self.requests.response(ex)

    def _refuse_body(self, flow: http.HTTPFlow, ex: Exchange, verdict: Verdict) -> None:
        """A body broke its bound while arriving (called by the engine, patches.py)."""
        ex.refuse(body_refusal(verdict, self.limits))
        self._answer(flow, ex)
        self._finish_later(self.requests, ex)

    # -- the status address (transparent mode) -------------------------------------
    def _at_status_address(self, flow: http.HTTPFlow) -> bool:
        """A redirected request whose connection was addressed to the status address."""
        return (self.transparent is not None and isinstance(flow.client_conn.proxy_mode, mode_specs.TransparentMode)
                and self.transparent.is_status_address(self._original_destination(flow.client_conn)))

    def _status_address_refusal(self, flow: http.HTTPFlow) -> Exchange:
        """Anything but a status request at the status address: 508 (it is Proctor's own control
        port), answered and recorded like a loop, never passed to the control API."""
        dst = self._original_destination(flow.client_conn)
        where = f"{dst[0]}:{dst[1]}" if dst else "?"
        refusal = Refusal(
            508, "Loop refused",
            f"this request was addressed to Proctor's control API ({where}); from the agent only "
            "GET /v1/approvals/{id}/status (the status URL of a held request, no body) is answered there, "
            "nothing else: it was refused, not passed on. Address the service you want to reach",
            reasons=["transparent-loop"], kind="loop")
        ex = self._connection_refusal(flow.client_conn, refusal, dst[0] if dst else None, dst[1] if dst else None,
                                      "loop", 508, "Loop refused")
        flow.metadata[EXCHANGE] = ex
        self._answer(flow, ex)
        return ex

    async def _status_request(self, flow: http.HTTPFlow) -> None:
        guard = self.transparent
        assert guard is not None
        approval_id = status_request(flow.request.data.method.decode("latin-1"), flow.request.path)
        if approval_id is None or guard.approval_status is None:
            ex = self._status_address_refusal(flow)
            await self.tunnels.response(ex)
            return
        status, headers, body = await guard.approval_status(approval_id)
        flow.response = http.Response.make(status, body, headers)
        if not flow.response.reason:
            flow.response.reason = HTTPStatus(status).phrase
        self._close_after(flow)

    async def _request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        if self._at_status_address(flow):
            await self._status_request(flow)  # Proctor's own answer: nothing is decided or forwarded
            return
        reverse = self._is_reverse(flow)
        if reverse:
            target = self.router.route(flow.request.host_header, flow.request.path.partition("?")[0]) if self.router else None
            if target is None:
                req = self._unrouted_request(flow)
            else:
                # the head as the agent sent it: re-targeting rewrites (and merges) the Host field
                head, authority = _headers(flow.request), flow.request.authority
                query = flow.request.path.partition("?")[2]
                flow.request.scheme = target.scheme
                flow.request.host = target.host
                flow.request.port = target.port
                flow.request.path = target.path + (f"?{query}" if query else "")
                req = self._agent_request(flow, reverse, head, authority)
        else:
            req = self._agent_request(flow, reverse)
        ex = flow.metadata.get(EXCHANGE)
        if ex is None:
            ex = flow.metadata[EXCHANGE] = Exchange(req)
        else:
            ex.request = req  # the head phase's exchange, now with the body (and the route)
        await self.requests.request(ex)
        if ex.refusal is not None:
            self._answer(flow, ex)
            await self.requests.response(ex)
            return
        if ex.local_reply is not None:  # a stage answered it (a replayed stored response)
            reply = ex.local_reply
            headers = dict(reply.headers)
            headers.update(ex.plan.response_headers)
            headers[DECISION_HEADER] = ex.decision_id
            flow.response = http.Response.make(reply.status, reply.body, headers)
            if not flow.response.reason:
                flow.response.reason = HTTPStatus(reply.status).phrase
            ex.response = ResponseSummary(reply.status)
            await self.requests.response(ex)
            return
        # Forward exactly what was decided: the plan's header edits, origin-form request
        # line, and Host naming the canonical target the decision was made for.
        headers = flow.request.headers
        for name in ex.plan.remove_headers:
            headers.pop(name, None)
        for name, value in ex.plan.set_headers.items():
            headers[name] = value
        flow.request.authority = ""
        flow.request.host = req.host
        if req.mode == "transparent":
            flow.request.port = req.port  # the name's port: never the redirected-from address
        flow.request.host_header = ex.host_header()

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None:
            return
        self._close_after(flow)
        ex: Exchange | None = flow.metadata.get(EXCHANGE)
        if ex is None or ex.local_reply is None:  # (an upstream's answer, not Proctor's own reply)
            for name in [n for n in resp.headers if n.lower() in PROCTOR_RESPONSE_HEADERS]:
                del resp.headers[name]  # (only Proctor speaks these: core/headers.py)
        if ex is not None:
            resp.headers[DECISION_HEADER] = ex.decision_id
            for name, value in ex.plan.response_headers.items():
                resp.headers[name] = value
        if ex is not None and ex.allowed and resp.status_code in ex.plan.replaceable_statuses:
            return  # a stage may answer instead of it: buffered, nothing sent before the response phase
        cl = resp.headers.get("content-length")
        wanted = ex.plan.read_response_body if ex is not None and ex.allowed else 0
        if wanted and 200 <= resp.status_code < 300:
            # a stage reads this body (bounded): buffer it
            if cl is None or (cl.isdigit() and int(cl) <= wanted):
                return
        if cl is None or (cl.isdigit() and int(cl) > STREAM_RESPONSES_OVER):
            resp.stream = True

    async def response(self, flow: http.HTTPFlow) -> None:
        ex: Exchange | None = flow.metadata.get(EXCHANGE)
        if ex is None or ex.refusal is not None or ex.local_reply is not None:
            return  # refusals and local replies ran their response phase when they were answered
        resp = flow.response
        assert resp is not None
        body = None
        if ex.plan.read_response_body and not resp.stream:
            try:
                body = resp.content  # decoded (Content-Encoding)
            except ValueError:
                body = None
        ex.response = ResponseSummary(
            resp.status_code,
            upstream_status=resp.status_code,
            headers={k.lower(): v for k, v in resp.headers.items()},
            body=body,
        )
        await self.requests.response(ex)
        if ex.replaced:  # a response stage answers instead of the upstream (an upstream 412 -> 409)
            if resp.stream:  # (cannot happen: responseheaders buffers every replaceable status)
                log.error("decision %s: cannot replace a streamed answer; closing the connection", ex.decision_id)
                flow.kill()
                return
            status, headers, content = refusal_answer(ex)
            flow.response = http.Response.make(status, content, headers)
            if not flow.response.reason:
                flow.response.reason = HTTPStatus(status).phrase
            self._close_after(flow)
        elif not resp.stream:
            # held back until now: headers the response phase added (a failed workflow step's
            # Retry-After) reach the agent too
            for name, value in ex.plan.response_headers.items():
                resp.headers[name] = value

    async def error(self, flow: http.HTTPFlow) -> None:
        ex: Exchange | None = flow.metadata.get(EXCHANGE)
        if ex is None or (ex.refusal is None and not ex.decided):
            await self._engine_refusal(flow, ex)  # failed before any decision
            return
        if ex.refusal is not None or ex.response is not None:
            return  # answered (and recorded) already
        if flow.metadata.get(CUT):  # the agent gets no answer: its connection is closed
            ex.response = ResponseSummary(None, error=CUT_AT_SHUTDOWN)
            await self.requests.response(ex)
            return
        msg = flow.error.msg if flow.error else "upstream error"
        status = 504 if is_timeout(msg) else 502
        cls = ex.classification
        ex.response = ResponseSummary(status, error=msg)
        await self.requests.response(ex)
        # (after the response phase: the headers it added reach the 502/504 too)
        UPSTREAM_FAILURE.set((ex.decision_id, cls.action if cls else None, cls.resource_uid if cls else None,
                              dict(ex.plan.response_headers)))

    async def _engine_refusal(self, flow: http.HTTPFlow, ex: Exchange | None) -> None:
        """The engine refused before any decision (message over the engine's size ceiling): record it."""
        msg = flow.error.msg if flow.error else ""
        if "body_size_limit" not in msg:
            return  # e.g. the client went away mid-request: nothing was decided or forwarded
        refusal = Refusal(413, "Message too large", msg.replace("mitmproxy's ", "the engine's "), kind="request")
        if ex is None:
            reverse = self._is_reverse(flow)
            req = self._unrouted_request(flow) if reverse else self._agent_request(flow, reverse)
            req.unrouted = False
            ex = refused_exchange(refusal, req)
        else:
            ex.refuse(refusal)
        UPSTREAM_FAILURE.set((ex.decision_id, None, None, {}))
        ex.response = ResponseSummary(413, error=msg)
        await self.requests.response(ex)

    @staticmethod
    def _addressed(flow: http.HTTPFlow) -> tuple[str, int]:
        """Host and port from the Host header (gateway mode), defaulting to the listening port."""
        host, port = flow.request.host_header or "", None
        try:
            host, port = mitm_url.parse_authority(host, check=False)
        except ValueError:
            pass
        return host or "", port or (flow.client_conn.sockname[1] if flow.client_conn.sockname else 0)
