"""Observability stages: Prometheus metrics and OpenTelemetry traces.

`Trace` opens the server span first (so it covers the whole decision) and closes
it last; `TracePropagation` runs after every request stage passed: it opens the
client span for the upstream call and replaces the trace headers the upstream
gets, so the upstream joins the agent's trace through Proctor. Tracing only
observes: a tracing failure never changes what happens to the request.
"""

from __future__ import annotations

import logging
import time

from ..core.chain import Stage
from ..core.exchange import Exchange, Kind
from ..logredact import redact
from ..record.model import record_of
from .metrics import Metrics
from .tracing import Tracing

log = logging.getLogger("proctor.observability")

_SPANS = "trace"  # stage_data key: [server span, upstream span]
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


class CountMetrics(Stage):
    name = "metrics"

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        # the engine's counters, served by /v1/stats
        self.stats = {"requests": 0, "allowed": 0, "refused": 0, "tunnels_refused": 0}

    def on_response(self, ex: Exchange) -> None:
        if ex.kind is Kind.CONNECTION:
            self.stats["tunnels_refused"] += 1
            if ex.connection is not None:
                self.metrics.connections_refused.labels(ex.connection.reason).inc()
            return
        if ex.kind is Kind.TUNNEL and ex.refusal is None:
            return  # an admitted tunnel: its requests are counted one by one
        # the record the record stage wrote (it runs just before this one on the way back)
        rec = record_of(ex)
        if ex.kind is Kind.TUNNEL:
            self.stats["tunnels_refused"] += 1
        else:
            self.stats["requests"] += 1
            # (what happened: a monitored request that was forwarded counts as allowed here)
            self.stats["allowed" if rec.decision == "allow" or rec.forwarded_monitored else "refused"] += 1
        self.metrics.observe_request(rec, ex.timings, ex.decision_ms, time.perf_counter() - ex.started)


class Trace(Stage):
    name = "trace"

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def on_request(self, ex: Exchange) -> None:
        req = ex.request
        if req is None or ex.kind is not Kind.REQUEST:
            return
        try:
            span = self.tracing.start_request(req.headers, req.method, req.host, req.port, req.path,
                                              int(ex.timestamp * 1e9))
            if span is not None:  # the audit event names the trace it belongs to
                sc = span.span.get_span_context()
                ex.trace_ids = (format(sc.trace_id, "032x"), format(sc.span_id, "016x"))
            ex.stage_data[_SPANS] = [span, None]
        except Exception:
            log.exception("tracing failed for decision %s (the request is unaffected)", ex.decision_id)

    def on_response(self, ex: Exchange) -> None:
        spans = ex.stage_data.pop(_SPANS, None)
        if spans is None:
            return
        resp = ex.response
        status = resp.status if resp is not None else (ex.refusal.status if ex.refusal is not None else None)
        error = resp.error if resp is not None else None
        try:
            self.tracing.decided(spans[0], ex)
            self.tracing.finish(spans[0], spans[1], status, redact(error) if error else None)
        except Exception:  # tracing must never disturb the request path
            log.exception("could not finish the trace spans")


class TracePropagation(Stage):
    name = "trace-propagation"

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def on_request(self, ex: Exchange) -> None:
        spans = ex.stage_data.get(_SPANS)
        if spans is None or spans[0] is None:
            return
        req = ex.request
        assert req is not None
        try:
            upstream_span, carrier = self.tracing.start_upstream(spans[0], req.method, req.host)
        except Exception:
            log.exception("tracing failed for decision %s (the request is unaffected)", ex.decision_id)
            return
        spans[1] = upstream_span
        ex.plan.remove(*TRACE_HEADERS)
        for name, value in carrier.items():
            ex.plan.set(name, value)
