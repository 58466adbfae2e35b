"""The mitmproxy engine adapter: translate flows to `AgentRequest`, apply the `Outcome`.

mitmproxy is embedded as a library (a `Master` with only the addons a proxy
needs). This module is the only place that imports mitmproxy types.

Fail-closed rules enforced here rather than in the pipeline, because they are
about the engine's plumbing:
- the upstream connection is opened lazily, i.e. only after a request on it was
  allowed (`connection_strategy=lazy`);
- inside a CONNECT tunnel only TLS is accepted; anything else (plaintext HTTP,
  unknown bytes) is refused and recorded, never tunnelled uninspected; raw TCP
  relaying is disabled outright;
- a client that rejects our certificate is recorded and disconnected;
- request bodies are always buffered so the decision happens before a single
  byte reaches the upstream (streaming is only enabled for responses).
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from typing import Any
from http import HTTPStatus

from mitmproxy import connection, http, tls
from mitmproxy.net.http import url as mitm_url
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.proxy import commands, layer, layers, mode_specs
from mitmproxy.proxy.layers.http import HTTPMode, HttpStream
from mitmproxy.tcp import TCPFlow
from mitmproxy.udp import UDPFlow

from ..connectors.credentials import CredentialInjector, CredentialUnavailable
from ..core.enrich import created_id
from ..core.hosts import authority
from ..logredact import redact
from ..core.model import AgentIdentity, AgentRequest, Decision, Outcome, Refusal
from ..core.pipeline import Pipeline, new_outcome, normalise_ip
from ..core.problem import DECISION_HEADER, jsonrpc_error_response, problem_response
from ..record.decisions import DecisionRecorder, decision_record
from ..observability.metrics import Metrics
from ..observability.tracing import Tracing
from .gateway import GatewayRouter
from .bodylimits import BodyBudget, BodyGuard, Verdict
from .patches import BODY_GUARD, EARLY_ANSWER, UPSTREAM_FAILURE, is_timeout

log = logging.getLogger("proctor.engine")

META = "proctor"
TRACE = "proctor_trace"
# The Authentication proven in `requestheaders` (before the body was read), reused
# by the decision so a token is verified once per request.
PROVEN = "proctor_proven"
STREAM_RESPONSES_OVER = 256 * 1024
TRACK_CREATOR_MAX_BODY = 1024 * 1024


class _RefuseConnection(layer.Layer):
    """A layer that answers (if the client spoke HTTP) and closes: used for non-TLS bytes in a tunnel."""

    def __init__(self, context, reply: bytes) -> None:
        super().__init__(context)
        self.reply = reply

    def _handle_event(self, event):
        if self.reply:
            yield commands.SendData(self.context.client, self.reply)
        yield commands.CloseConnection(self.context.client)


_BAD_HEADER_BYTES = (b"\r", b"\n", b"\x00")


def _headers(req: http.Request) -> tuple[dict[str, str], str | None, frozenset[str]]:
    """Lower-cased header names with repeated headers joined by ", " (one pass over the raw
    fields), a problem description if any value carries CR, LF or NUL (obs-fold, bare CR),
    and the names that were repeated."""
    out: dict[str, str] = {}
    repeated: set[str] = set()
    problem = None
    for raw_name, raw_value in req.headers.fields:
        name = raw_name.decode("latin-1").lower()
        if problem is None and any(b in raw_value for b in _BAD_HEADER_BYTES):
            problem = f"the {name} header value contains CR, LF or NUL (folded or smuggled header lines are refused)"
        value = raw_value.decode("latin-1")
        if name in out:
            repeated.add(name)
            out[name] = f"{out[name]}, {value}"
        else:
            out[name] = value
    return out, problem, frozenset(repeated)


class ProctorAddon:
    def __init__(
        self,
        pipeline: Pipeline,
        recorder: DecisionRecorder,
        router: GatewayRouter | None,
        metrics: Metrics | None = None,
        injector: CredentialInjector | None = None,
        tracing: Tracing | None = None,
        store: Any = None,
        record_inputs: bool = True,
        body_budget: BodyBudget | None = None,
    ) -> None:
        # Request body bytes being received, process-wide (limits.max_inflight_body_bytes);
        # built from the pipeline's config on first use when not given.
        self.body_budget = body_budget
        self.store = store  # records resource creators (manifest track_creator)
        self.record_inputs = record_inputs  # keep the sanitised Cedar inputs in the record (replay)
        self.audit: Any = None  # AuditTrail: may refuse forwarding while it cannot record (fail closed)
        self.metrics = metrics
        self.injector = injector
        self.tracing = tracing if tracing is not None and tracing.enabled else None
        self.pipeline = pipeline
        self.recorder = recorder
        self.router = router
        # Identity proven on CONNECT, bound to that client connection.
        self.tunnel_identity: weakref.WeakKeyDictionary[connection.Client, tuple[AgentIdentity, bytes | None]] = (
            weakref.WeakKeyDictionary()
        )
        self.running_event_seen = False
        self.stats = {"requests": 0, "allowed": 0, "refused": 0, "tunnels_refused": 0, "creator_record_failures": 0}

    # -- lifecycle -----------------------------------------------------------------
    def running(self) -> None:
        self.running_event_seen = True

    # -- helpers -------------------------------------------------------------------
    def _bound_identity(self, client: connection.Client) -> AgentIdentity | None:
        bound = self.tunnel_identity.get(client)
        return bound[0] if bound else None

    @staticmethod
    def _is_reverse(flow: http.HTTPFlow) -> bool:
        return isinstance(flow.client_conn.proxy_mode, mode_specs.ReverseMode)

    def _record(
        self,
        outcome: Outcome,
        req: AgentRequest | None,
        status: int | None,
        upstream_status: int | None = None,
        error: str | None = None,
        decision_ms: float | None = None,
    ) -> None:
        elapsed = time.perf_counter() - outcome.started
        self.recorder.write(
            decision_record(outcome, req, status, upstream_status, elapsed * 1000, decision_ms, error,
                            with_inputs=self.record_inputs)
        )
        if self.metrics is not None:
            self.metrics.observe_request(outcome, status, upstream_status, elapsed)

    def _refuse(self, flow: http.HTTPFlow, outcome: Outcome) -> None:
        # JSON-RPC endpoints get JSON-RPC errors (authentication stays HTTP: 401/407).
        if outcome.is_jsonrpc and outcome.refusal is not None and outcome.refusal.kind != "authentication":
            status, headers, body = jsonrpc_error_response(outcome)
        else:
            status, headers, body = problem_response(outcome)
        flow.response = http.Response.make(status, body, headers)
        if not flow.response.reason:  # mitmproxy's table lacks e.g. 421
            flow.response.reason = HTTPStatus(status).phrase

    def _finish_trace(self, flow: http.HTTPFlow, status: int | None, error: str | None = None) -> None:
        spans = flow.metadata.pop(TRACE, None)
        if spans is not None and self.tracing is not None:
            try:
                self.tracing.finish(spans[0], spans[1], status, error)
            except Exception:  # tracing must never disturb the request path
                log.exception("could not finish the trace spans")

    def _count_connection_refusal(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connections_refused.labels(reason).inc()

    @staticmethod
    def _standalone_refusal(refusal: Refusal, identity: AgentIdentity | None = None) -> Outcome:
        return new_outcome(refusal, identity)

    def _agent_request(self, flow: http.HTTPFlow, reverse: bool) -> AgentRequest:
        r = flow.request
        bound = self.tunnel_identity.get(flow.client_conn)
        raw = r.path
        path, _, query = raw.partition("?")
        headers, header_problem, repeated = _headers(r)
        return AgentRequest(
            method=r.method.upper(),
            scheme=r.scheme,
            host=r.host,
            port=r.port,
            path=path,
            query=query,
            headers=headers,
            body=r.raw_content or b"",
            client_ip=normalise_ip(flow.client_conn.peername[0]) if flow.client_conn.peername else "0.0.0.0",
            mode="reverse" if reverse else "forward",
            connection_identity=bound[0] if bound else None,
            connection_token_digest=bound[1] if bound else None,
            host_header=None if reverse else r.headers.get("host"),
            request_authority="" if reverse else r.authority,
            tls_sni=flow.client_conn.sni if (flow.client_conn.tls and not reverse) else None,
            header_problem=header_problem,
            repeated_headers=repeated,
            client_alive=lambda conn=flow.client_conn: bool(conn.state & connection.ConnectionState.CAN_READ),
        )

    # -- fail-closed hook entry points ----------------------------------------------
    # mitmproxy logs an exception raised by an addon hook and then carries on with
    # the flow, which would forward an undecided request. Every hook that gates
    # traffic therefore turns any exception into a refusal.
    def _fail_closed(self, flow: http.HTTPFlow, where: str) -> None:
        outcome = self._standalone_refusal(
            Refusal(
                503,
                "Proctor could not decide",
                "an internal error occurred while deciding this request; it was not forwarded "
                "(fail closed). Quote the decision_id to your Proctor operator.",
                kind="fail-closed",
            )
        )
        log.exception("%s hook failed (decision %s); refusing", where, outcome.decision_id)
        outcome.errors.append(f"internal error in {where}")
        flow.metadata[META] = (outcome, None, None)
        self.stats["refused"] += 1
        try:
            self._refuse(flow, outcome)
            self.recorder.write(decision_record(outcome, None, 503, None, None, None, error=f"internal error in {where}"))
        except Exception:  # last resort: no answer at all rather than an undecided one
            log.exception("could not even build the refusal; killing the flow")
            flow.kill()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            await self._http_connect(flow)
        except Exception:
            self.tunnel_identity.pop(flow.client_conn, None)
            self._fail_closed(flow, "CONNECT")

    async def request(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except Exception:
            self._fail_closed(flow, "request")

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        try:
            self._next_layer(nextlayer)
        except Exception:
            outcome = self._standalone_refusal(
                Refusal(503, "Proctor could not decide", "internal error; connection closed (fail closed)", kind="fail-closed")
            )
            log.exception("next_layer hook failed (decision %s); closing the connection", outcome.decision_id)
            nextlayer.layer = _RefuseConnection(nextlayer.context, b"")
            self._count_connection_refusal("internal-error")
            try:
                self.recorder.write(
                    decision_record(outcome, None, None, None, None, None, error="internal error in next_layer")
                )
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
        outcome = await self.pipeline.admit_tunnel(req)
        flow.request.headers.pop("proxy-authorization", None)
        flow.request.host = req.host  # the tunnel dials the canonical host (core/hosts.py)
        if outcome.refusal is not None:
            self.stats["tunnels_refused"] += 1
            self._refuse(flow, outcome)
            self._record(outcome, req, outcome.refusal.status)
            return
        identity = outcome.identity
        assert identity is not None
        self.tunnel_identity[flow.client_conn] = (identity, outcome.credential_digest)

    # -- non-TLS inside a tunnel, raw TCP/UDP: refuse -----------------------------
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
        if isinstance(chosen, (layers.TCPLayer, layers.UDPLayer)) or (
            in_tunnel and not isinstance(chosen, layers.ServerTLSLayer)
        ):
            data = nextlayer.data_client()
            looks_http = data[:16].split(b" ")[0].isalpha() and b" " in data[:16]
            target = ctx.server.address
            outcome = self._standalone_refusal(
                Refusal(
                    403,
                    "Uninspectable traffic refused",
                    f"only TLS is accepted inside a CONNECT tunnel to {target[0]}:{target[1]}"
                    if target
                    else "raw TCP/UDP relaying is disabled",
                    reasons=["tls-interception-required"],
                    kind="tls",
                ),
                identity=self._bound_identity(ctx.client),
            )
            reply = b""
            if looks_http:
                status, headers, body = problem_response(outcome)
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                reply = (
                    f"HTTP/1.1 {status} Forbidden\r\n{head}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode() + body
            self.stats["tunnels_refused"] += 1
            self._count_connection_refusal("non-tls-in-tunnel")
            self.recorder.write(
                decision_record(outcome, None, 403, None, None, None, error="non-TLS traffic in tunnel")
                | {"client_ip": normalise_ip(ctx.client.peername[0]) if ctx.client.peername else None,
                   "host": target[0] if target else None, "port": target[1] if target else None}
            )
            nextlayer.layer = _RefuseConnection(ctx, reply)

    def tcp_start(self, flow: TCPFlow) -> None:  # belt and braces: never relay raw TCP
        flow.kill()

    def udp_start(self, flow: UDPFlow) -> None:
        flow.kill()

    def tls_failed_client(self, data: tls.TlsData) -> None:
        client = data.context.client
        err = getattr(client, "error", None) or "TLS handshake with the agent failed"
        outcome = self._standalone_refusal(
            Refusal(
                0,
                "TLS interception failed",
                f"the agent did not accept Proctor's certificate for {client.sni or '?'} ({err}); "
                "the connection was closed, nothing was forwarded. Install the CA from `proctor ca export`.",
                reasons=["tls-interception-required"],
                kind="tls",
            ),
            identity=self._bound_identity(client),
        )
        rec = decision_record(outcome, None, None, None, None, None, error="client rejected interception certificate")
        target = data.context.server.address  # the CONNECT target, when there was one
        rec.update(
            {
                "client_ip": normalise_ip(client.peername[0]) if client.peername else None,
                "host": client.sni or (target[0] if target else None),
                "port": target[1] if target else None,
            }
        )
        self.stats["tunnels_refused"] += 1
        self._count_connection_refusal("interception-rejected")
        self.recorder.write(rec)

    # -- requests ------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow):
        """No work before authentication: a request announcing a body is authenticated
        here, from its head, before the body is read or `100 Continue` is sent; a
        refusal is answered at once (patches.py sends it and stops reading). A request
        without a body has nothing to read and is authenticated by the decision."""
        # Decisions need the whole body: never let a request stream past us.
        flow.request.stream = False
        if flow.response is not None or flow.error is not None:
            return None  # the engine refused it already (e.g. over its size ceiling)
        try:
            declared = expected_http_body_size(flow.request)  # 0: none, None: chunked
            if declared == 0:
                return None
        except Exception:
            self._fail_closed(flow, "requestheaders")
            flow.metadata[EARLY_ANSWER] = 0
            return None
        return self._admit_body(flow, declared)

    async def _admit_body(self, flow: http.HTTPFlow, declared: int | None) -> None:
        try:
            await self._authenticate_before_body(flow, declared)
        except Exception:
            self._fail_closed(flow, "requestheaders")
            flow.metadata[EARLY_ANSWER] = 0

    async def _authenticate_before_body(self, flow: http.HTTPFlow, declared: int | None) -> None:
        reverse = self._is_reverse(flow)
        req = self._agent_request(flow, reverse)  # the head only: body b""
        if reverse:  # not routed yet: name what the agent addressed, not the placeholder target
            req.host, req.port = self._addressed(flow)
        limits = self.pipeline.config.limits
        fits = declared is None or declared <= limits.max_body_bytes
        auth = await self.pipeline.authenticate(req)
        if auth.refusal is not None:
            # a small body still on its way is read and discarded, so the client sees the 401/407
            self._refuse_early(flow, new_outcome(auth.refusal), req, limits.max_body_bytes if fits else 0)
            return
        if self.body_budget is None:
            self.body_budget = BodyBudget(limits.max_inflight_body_bytes)
        guard = BodyGuard(self.body_budget, limits.max_body_bytes, declared)
        if guard.verdict is not None:
            outcome = new_outcome(self._body_refusal(guard.verdict), auth.identity)
            self._refuse_early(flow, outcome, req, limits.max_body_bytes if fits else 0)
            return
        identity = auth.identity
        guard.refuse = lambda verdict: self._refuse_body(flow, req, identity, verdict)
        flow.metadata[BODY_GUARD] = guard
        flow.metadata[PROVEN] = auth

    def _body_refusal(self, verdict: Verdict) -> Refusal:
        limits = self.pipeline.config.limits
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

    def _refuse_early(self, flow: http.HTTPFlow, outcome: Outcome, req: AgentRequest, drain: int) -> None:
        """Refused from the head alone: the engine answers before reading the body."""
        self.stats["requests"] += 1
        self.stats["refused"] += 1
        flow.metadata[META] = (outcome, req, None)
        self._refuse(flow, outcome)
        flow.metadata[EARLY_ANSWER] = drain
        assert outcome.refusal is not None
        self._record(outcome, req, outcome.refusal.status)

    def _refuse_body(self, flow: http.HTTPFlow, req: AgentRequest, identity: AgentIdentity | None, verdict: Verdict) -> None:
        """A body broke its bound while arriving (called by the engine, patches.py)."""
        outcome = new_outcome(self._body_refusal(verdict), identity)
        self.stats["requests"] += 1
        self.stats["refused"] += 1
        flow.metadata[META] = (outcome, req, None)
        self._refuse(flow, outcome)
        assert outcome.refusal is not None
        self._record(outcome, req, outcome.refusal.status)

    def _use_proven_identity(self, flow: http.HTTPFlow, req: AgentRequest) -> None:
        """The identity `requestheaders` proved for this request, so the decision does not verify
        the token again. It enters the pipeline like a tunnel's identity: expiry is re-checked, and
        an Authorization header carrying the same token is still stripped (by its digest)."""
        auth = flow.metadata.pop(PROVEN, None)
        if auth is not None and auth.identity is not None and req.connection_identity is None:
            req.connection_identity = auth.identity
            req.connection_token_digest = auth.token_digest

    async def _request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.error is not None:
            return
        start_ns = time.time_ns()
        self.stats["requests"] += 1
        reverse = self._is_reverse(flow)
        target = None
        if reverse:
            target = self.router.route(flow.request.host_header, flow.request.path.partition("?")[0]) if self.router else None
            if target is None:
                await self._refuse_unrouted(flow)
                return
            query = flow.request.path.partition("?")[2]
            flow.request.scheme = target.scheme
            flow.request.host = target.host
            flow.request.port = target.port
            flow.request.path = target.path + (f"?{query}" if query else "")
        req = self._agent_request(flow, reverse)
        self._use_proven_identity(flow, req)
        outcome = await self.pipeline.decide(req)
        decision_ms = (time.perf_counter() - outcome.started) * 1000
        flow.metadata[META] = (outcome, req, decision_ms)
        if self.tracing is not None:
            try:  # tracing observes; it must never change what happens to the request
                span = self.tracing.start_request(req.headers, req.method, req.host, req.port, req.path, start_ns)
                self.tracing.decided(span, outcome)
                if span is not None:  # the audit event names the trace it belongs to
                    sc = span.span.get_span_context()
                    outcome.trace_ids = (format(sc.trace_id, "032x"), format(sc.span_id, "016x"))
                flow.metadata[TRACE] = [span, None]
            except Exception:
                log.exception("tracing failed for decision %s (the request is unaffected)", outcome.decision_id)
        for h in outcome.strip_headers:
            flow.request.headers.pop(h, None)
        if outcome.refusal is not None:
            self.stats["refused"] += 1
            self._refuse(flow, outcome)
            self._record(outcome, req, outcome.refusal.status, decision_ms=decision_ms)
            self._finish_trace(flow, outcome.refusal.status)
            return
        if self.audit is not None:
            audit_refusal = await self.audit.admit(req.method)
            if audit_refusal is not None:
                outcome.decision = Decision.DENY
                outcome.refusal = audit_refusal
                self.stats["refused"] += 1
                self._refuse(flow, outcome)
                self._record(outcome, req, audit_refusal.status, decision_ms=decision_ms)
                self._finish_trace(flow, audit_refusal.status)
                return
        if not await self._inject_credential(flow, outcome, req, decision_ms):
            self._finish_trace(flow, 503)
            return
        self.stats["allowed"] += 1
        if TRACE in flow.metadata:
            # the upstream joins the agent's trace through Proctor's client span
            try:
                upstream_span, carrier = self.tracing.start_upstream(flow.metadata[TRACE][0], req.method, req.host)
            except Exception:
                log.exception("tracing failed for decision %s (the request is unaffected)", outcome.decision_id)
            else:
                flow.metadata[TRACE][1] = upstream_span
                for name in ("traceparent", "tracestate", "baggage"):
                    flow.request.headers.pop(name, None)
                for name, value in carrier.items():
                    flow.request.headers[name] = value
        # Forward exactly what was decided: origin-form request line, Host naming the target.
        # The dial target and Host are the canonical host the decision was made for
        # (core/hosts.py), never an alias spelling such as 127.1 or EXAMPLE.com.
        flow.request.authority = ""
        flow.request.host = req.host
        if reverse and target is not None:
            flow.request.host_header = authority(req.host, target.port, target.scheme)
        else:
            flow.request.host_header = authority(req.host, flow.request.port, flow.request.scheme)

    async def _inject_credential(self, flow: http.HTTPFlow, outcome: Outcome, req: AgentRequest, decision_ms: float) -> bool:
        """Swap whatever credential the agent sent for the connector's own. False: refused."""
        cls = outcome.classification
        auth = self.injector.configured(cls.connector) if (self.injector and cls) else None
        if auth is None:
            return True
        try:
            headers = await self.injector.headers_for(cls.connector)
        except CredentialUnavailable as e:
            outcome.decision = Decision.DENY
            outcome.refusal = Refusal(
                503,
                "Upstream credential unavailable",
                f"{e}; the request was allowed by policy but not forwarded without its credential (fail closed)",
                reasons=["upstream-credential-unavailable"],
                kind="fail-closed",
            )
            self.stats["refused"] += 1
            self._refuse(flow, outcome)
            self._record(outcome, req, 503, decision_ms=decision_ms)
            return False
        for name in auth.headers_to_remove():
            flow.request.headers.pop(name, None)
        for name, value in headers.items():
            flow.request.headers[name] = value
        return True

    async def _refuse_unrouted(self, flow: http.HTTPFlow) -> None:
        """No gateway route: authenticate first (so routes cannot be probed anonymously), then 404."""
        req = self._agent_request(flow, reverse=True)
        req.host, req.port = self._addressed(flow)
        auth = await self.pipeline.authenticate(req)
        identity, refusal = auth.identity, auth.refusal
        if refusal is None:
            refusal = Refusal(
                404,
                "No gateway route",
                f"no gateway route matches {req.host}{req.path}",
                reasons=["no-route"],
                kind="route",
            )
        outcome = self._standalone_refusal(refusal, identity)
        self.stats["refused"] += 1
        self._refuse(flow, outcome)
        self._record(outcome, req, refusal.status)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        resp = flow.response
        if resp is None:
            return
        meta = flow.metadata.get(META)
        if meta is not None:
            resp.headers[DECISION_HEADER] = meta[0].decision_id
        cl = resp.headers.get("content-length")
        if meta is not None and self._tracks_creator(meta[0]) and 200 <= resp.status_code < 300:
            # the new resource's id is in this body: buffer it (bounded) to read the id
            if cl is None or (cl.isdigit() and int(cl) <= TRACK_CREATOR_MAX_BODY):
                return
        if cl is None or (cl.isdigit() and int(cl) > STREAM_RESPONSES_OVER):
            resp.stream = True

    @staticmethod
    def _tracks_creator(outcome: Outcome) -> bool:
        cls = outcome.classification
        return outcome.refusal is None and cls is not None and cls.spec is not None and cls.spec.track_creator is not None

    async def _record_creator(self, flow: http.HTTPFlow, outcome: Outcome) -> None:
        """After an allowed create answered 2xx: remember which agent created what."""
        cls = outcome.classification
        resp = flow.response
        if resp is None or not 200 <= resp.status_code < 300 or outcome.identity is None:
            return
        try:
            content = resp.content
            if content is None or len(content) > TRACK_CREATOR_MAX_BODY:
                raise ValueError("the response body was streamed or too large to read the new id from")
            new_id = created_id(json.loads(content), cls.spec.track_creator.id_from)
            if new_id is None:
                raise ValueError(f"no id at {cls.spec.track_creator.id_from} in the response")
            if self.store is None:
                raise ValueError("no store is configured")
            await self.store.record_creator(cls.resource_type, new_id, outcome.identity.agent_id, outcome.decision_id, time.time())
        except Exception as e:
            # The upstream already created the resource: the answer still goes back to
            # the agent, but without a creator record "no self-approval" cannot apply
            # to it. Say so loudly and count it.
            self.stats["creator_record_failures"] += 1
            log.error(
                "decision %s: could not record the creator of a new %s (%s); policies on created_by "
                "will not see it", outcome.decision_id, cls.resource_type, e,
            )

    async def response(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if meta is None:
            return
        outcome, req, decision_ms = meta
        if outcome.refusal is not None:
            return  # recorded when refused
        assert flow.response is not None
        if self._tracks_creator(outcome):
            await self._record_creator(flow, outcome)
        self._record(outcome, req, flow.response.status_code, flow.response.status_code, decision_ms=decision_ms)
        self._finish_trace(flow, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(META)
        if meta is None:
            self._engine_refusal(flow)
            return
        outcome, req, decision_ms = meta
        if outcome.refusal is not None:
            return
        msg = flow.error.msg if flow.error else "upstream error"
        status = 504 if is_timeout(msg) else 502
        cls = outcome.classification
        UPSTREAM_FAILURE.set((outcome.decision_id, cls.action if cls else None, cls.resource_uid if cls else None))
        self._record(outcome, req, status, None, error=msg, decision_ms=decision_ms)
        self._finish_trace(flow, status, redact(msg))  # engine errors can quote raw upstream bytes


    def _engine_refusal(self, flow: http.HTTPFlow) -> None:
        """The engine refused before any decision (message over the engine's size ceiling): record it."""
        msg = flow.error.msg if flow.error else ""
        if "body_size_limit" not in msg:
            return  # e.g. the client went away mid-request: nothing was decided or forwarded
        outcome = self._standalone_refusal(
            Refusal(413, "Message too large", msg.replace("mitmproxy's ", "the engine's "), kind="request")
        )
        UPSTREAM_FAILURE.set((outcome.decision_id, None, None))
        reverse = self._is_reverse(flow)
        req = self._agent_request(flow, reverse)
        if reverse:  # refused before routing: name what the agent addressed, not the placeholder target
            req.host, req.port = self._addressed(flow)
        self.recorder.write(decision_record(outcome, req, 413, None, None, None, error=msg))

    @staticmethod
    def _addressed(flow: http.HTTPFlow) -> tuple[str, int]:
        """Host and port from the Host header (gateway mode), defaulting to the listening port."""
        host, port = flow.request.host_header or "", None
        try:
            host, port = mitm_url.parse_authority(host, check=False)
        except ValueError:
            pass
        return host or "", port or (flow.client_conn.sockname[1] if flow.client_conn.sockname else 0)

