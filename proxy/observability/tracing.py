"""OpenTelemetry tracing: a server span per agent request, child spans per stage, W3C propagation.

Off by default. It is configured only by the standard environment variables:
`OTEL_TRACES_EXPORTER` (`otlp` or `console`; unset or `none` = off),
`OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`
(`http/protobuf` default, or `grpc`), `OTEL_SERVICE_NAME`, `OTEL_BSP_*`.

The agent's `traceparent`/`baggage` are honoured (Proctor's server span becomes
a child of the agent's span) and a fresh `traceparent` for Proctor's upstream
span is sent upstream, so the agent's trace and the upstream's join. Spans carry
no headers, query strings, bodies or tokens.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..core.exchange import HOLD_KIND

log = logging.getLogger("proctor.tracing")

_PROPAGATED = ("traceparent", "tracestate", "baggage")


class RequestTrace:
    """The server span of one request and the agent's context it continues (baggage included)."""

    __slots__ = ("span", "parent")

    def __init__(self, span: Any, parent: Any) -> None:
        self.span = span
        self.parent = parent


class Tracing:
    """A no-op unless OTEL_TRACES_EXPORTER names an exporter."""

    def __init__(self) -> None:
        self.enabled = False
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        if exporter_name in ("", "none"):
            return
        from opentelemetry import trace
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "proctor")})
        self.provider = TracerProvider(resource=resource)
        for name in exporter_name.split(","):
            name = name.strip()
            if name == "console":
                exporter: Any = ConsoleSpanExporter()
            elif name == "otlp":
                protocol = os.environ.get(
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
                )
                if protocol == "grpc":
                    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
                else:
                    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
                exporter = OTLPSpanExporter()
            else:
                log.error("unknown OTEL_TRACES_EXPORTER %r; tracing stays off", name)
                return
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("proctor")
        self.propagator = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
        self._trace = trace
        self.enabled = True
        log.info("OpenTelemetry tracing on (exporter: %s)", exporter_name)

    # -- spans for one request -----------------------------------------------------
    def start_request(self, headers: dict[str, str], method: str, host: str, port: int, path: str, start_ns: int) -> Any:
        """The server span for an agent request, continuing the agent's trace if it sent one."""
        if not self.enabled:
            return None
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract({k: v for k, v in headers.items() if k in _PROPAGATED})
        return RequestTrace(self.tracer.start_span(
            f"{method} {host}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes={
                "http.request.method": method,
                "server.address": host,
                "server.port": port,
                "url.path": path,
            },
        ), parent)

    def decided(self, trace: RequestTrace | None, outcome: Any, stage_spans: bool = True) -> None:
        """Decision attributes on the server span, plus child spans for the pipeline stages."""
        if trace is None:
            return
        span = trace.span
        cls = outcome.classification
        refusal = outcome.refusal
        reasons = refusal.reasons if refusal is not None else outcome.reasons
        attrs: dict[str, Any] = {
            "proctor.decision": outcome.decision.value,
            "proctor.decision_id": outcome.decision_id,
            "proctor.policy_ids": list(reasons),
        }
        if outcome.identity is not None:
            attrs["gen_ai.agent.id"] = outcome.identity.agent_id
            attrs["enduser.id"] = outcome.identity.agent_id
        if cls is not None and cls.action:
            attrs.update({"proctor.action": cls.action, "proctor.resource": cls.resource_uid, "proctor.connector": cls.connector})
            if cls.rpc and "tool" in cls.rpc:
                attrs["gen_ai.tool.name"] = cls.rpc["tool"]
        if refusal is not None:
            attrs["proctor.refusal.kind"] = refusal.kind
        if getattr(outcome, "monitor", False):  # monitor mode: what it would have been (proxy/policy/monitor.py)
            attrs["proctor.monitor"] = True
            would = outcome.monitored
            if would is not None:
                attrs["proctor.monitor.decision"] = "hold" if would.kind == HOLD_KIND else "deny"
                attrs["proctor.monitor.kind"] = would.kind
        span.set_attributes(attrs)
        if stage_spans:
            ctx = self._trace.set_span_in_context(span, trace.parent)
            start = span.start_time
            cursor = start
            for stage in ("authenticate", "classify", "authorize"):
                seconds = outcome.timings.get(stage)
                if seconds is None:
                    continue
                child = self.tracer.start_span(f"proctor.{stage}", context=ctx, start_time=cursor)
                cursor += int(seconds * 1e9)
                child.end(end_time=cursor)

    def start_upstream(self, trace: RequestTrace | None, method: str, url_host: str) -> tuple[Any, dict[str, str]]:
        """The client span for the upstream call, and the headers that propagate it upstream
        (traceparent of this span, and the agent's baggage)."""
        if trace is None:
            return None, {}
        from opentelemetry.trace import SpanKind

        ctx = self._trace.set_span_in_context(trace.span, trace.parent)
        span = self.tracer.start_span(f"{method} {url_host}", context=ctx, kind=SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=self._trace.set_span_in_context(span, trace.parent))
        return span, carrier

    def finish(self, trace: RequestTrace | None, upstream_span: Any, status: int | None, error: str | None = None) -> None:
        from opentelemetry.trace import Status, StatusCode

        end = time.time_ns()
        server_span = trace.span if trace is not None else None
        if upstream_span is not None:
            if status is not None:
                upstream_span.set_attribute("http.response.status_code", status)
            if error:
                upstream_span.set_status(Status(StatusCode.ERROR, error[:200]))
            upstream_span.end(end_time=end)
        if server_span is not None:
            if status is not None:
                server_span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    server_span.set_status(Status(StatusCode.ERROR))
            server_span.end(end_time=end)

    def shutdown(self) -> None:
        if self.enabled:
            self.provider.shutdown()  # flushes pending spans
