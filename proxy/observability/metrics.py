"""Prometheus metrics, served at GET /metrics on the control port.

Hot-path cost is a few counter/histogram updates per request; everything that
can be read from existing state (policy reload status, record failures, cache
sizes) is collected at scrape time instead of being updated per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from ..record.model import DecisionRecord

# 50 µs .. 10 s: decisions live in the sub-millisecond range, upstream calls far above.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
NO_ACTION = "none"
# the `enforcement` label: a request in a monitor-mode scope (proxy/policy/monitor.py), or not
MONITOR, ENFORCE = "monitor", "enforce"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "proctor_decisions",
            "Requests decided, by Cedar action, decision and refusal kind (allowed for allowed requests); "
            "enforcement is monitor for a request in a monitor-mode scope (decision and kind are then what it "
            "would have been: it was forwarded unless something monitor mode does not cover refused it), else enforce.",
            ["action", "decision", "kind", "enforcement"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "proctor_stage_duration_seconds",
            "Time spent in each pipeline stage (authenticate, classify, authorize) and in the whole decision.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "proctor_request_duration_seconds",
            "From the start of the decision to the agent's answer (includes the upstream for allowed requests).",
            ["decision", "enforcement"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_responses = Counter(
            "proctor_upstream_responses",
            "Upstream answers to allowed requests by status class (2xx..5xx), or 'error' when none came.",
            ["status_class"],
            registry=r,
        )
        self.shadow_disagreements = Counter(
            "proctor_shadow_disagreements",
            "Requests on which the shadow (candidate) policy set decided differently from the active one.",
            ["action", "active", "shadow"],
            registry=r,
        )
        self.approval_wait = Histogram(
            "proctor_approval_decision_seconds",
            "Time from a hold to its decision (approved, denied or expired).",
            ["outcome"],
            buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600, 24 * 3600),
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "proctor_connections_refused",
            "Connections refused outside a request decision (non-TLS in a tunnel, failed interception, hook errors).",
            ["reason"],
            registry=r,
        )

    def observe_request(self, rec: "DecisionRecord", timings: Mapping[str, float], decision_ms: float | None,
                        total_seconds: float) -> None:
        """One decided request. The labels are the decision record's own fields (action,
        decision, refusal kind, shadow verdict, upstream status), so a dashboard and the
        record never disagree; the timings are the exchange's, unrounded."""
        action = rec.action if rec.action is not None else NO_ACTION
        decision = rec.decision
        enforcement = MONITOR if rec.monitor else ENFORCE
        self.decisions.labels(action, decision, rec.refusal_kind, enforcement).inc()
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        if decision_ms is not None:
            self.stage_seconds.labels("decision").observe(decision_ms / 1000)
        self.request_seconds.labels(decision, enforcement).observe(total_seconds)
        if rec.shadow is not None:
            self.shadow_disagreements.labels(action, decision, rec.shadow["decision"]).inc()
        if rec.refusal is None:
            upstream_status = rec.upstream_status
            if upstream_status is not None:
                self.upstream_responses.labels(f"{upstream_status // 100}xx").inc()
            else:
                self.upstream_responses.labels("error").inc()

    def add_collector(self, collect: Callable[[], list]) -> None:
        """Register scrape-time metrics: `collect()` returns metric families."""

        class _Collector:
            def collect(self):  # noqa: D401 - prometheus_client protocol
                return collect()

        self.registry.register(_Collector())


def runtime_families(runtime) -> list:
    """Scrape-time metrics read from the running proxy's state."""
    status = runtime.policies.status
    bundle = runtime.policies.bundle
    out = []
    g = GaugeMetricFamily("proctor_policy_reload_ok", "1 when the last policy load or reload succeeded, 0 when it was rejected.")
    g.add_metric([], 1 if status.ok else 0)
    out.append(g)
    info = GaugeMetricFamily("proctor_policy_info", "The policy set being enforced (always 1).", labels=["revision"])
    info.add_metric([bundle.revision], 1)
    out.append(info)
    n = GaugeMetricFamily("proctor_policies", "Policies in the enforced set.")
    n.add_metric([], bundle.policy_count)
    out.append(n)
    reloads = CounterMetricFamily("proctor_policy_reloads", "Policy reloads by result.", labels=["result"])
    reloads.add_metric(["ok"], status.reloads)
    reloads.add_metric(["rejected"], status.failed_reloads)
    out.append(reloads)
    scope = getattr(runtime, "monitor", None)
    if scope is not None and scope.enabled:
        mon = GaugeMetricFamily("proctor_monitor_mode", "1 per monitor-mode scope: policies are not enforced there "
                                "(scope global, connector, agent or group; docs/governance.md).", labels=["scope", "target"])
        if scope.everything:
            mon.add_metric(["global", ""], 1)
        for kind, names in (("connector", scope.connectors), ("agent", scope.agents), ("group", scope.groups)):
            for name in sorted(names):
                mon.add_metric([kind, name], 1)
        out.append(mon)
    rec = CounterMetricFamily("proctor_decision_records", "Decision-record lines by result.", labels=["result"])
    rec.add_metric(["written"], runtime.recorder.written)
    rec.add_metric(["failed"], runtime.recorder.failures)
    out.append(rec)
    shadow = getattr(runtime, "shadow", None)
    if shadow is not None:
        ev = CounterMetricFamily("proctor_shadow_evaluations", "Requests also evaluated against the shadow policy set.")
        ev.add_metric([], shadow.evaluations)
        out.append(ev)
        loaded = GaugeMetricFamily("proctor_shadow_loaded", "1 when the shadow policy set is loaded and being evaluated.")
        loaded.add_metric([], 1 if shadow.store is not None else 0)
        out.append(loaded)
    approvals = getattr(runtime, "approvals", None)
    if approvals is not None:
        pending = GaugeMetricFamily("proctor_approvals_pending", "Approvals waiting for a decision (all replicas; refreshed every second).")
        pending.add_metric([], approvals.pending_count)
        out.append(pending)
        waiting = GaugeMetricFamily("proctor_approvals_held_connections", "Agent connections held open on this process waiting for an approval.")
        waiting.add_metric([], approvals.waiting)
        out.append(waiting)
        events = CounterMetricFamily("proctor_approval_events", "Approval state changes on this process.", labels=["event"])
        for event, n in sorted(approvals.event_counts.items()):
            events.add_metric([event], n)
        out.append(events)
    notifier = getattr(runtime, "notifier", None)
    if notifier is not None:
        notes = CounterMetricFamily("proctor_approval_notifications", "Webhook notifications by result.", labels=["result"])
        for result in ("sent", "failed", "retried", "dropped"):
            notes.add_metric([result], notifier.stats.get(result, 0))
        out.append(notes)
    enricher = getattr(runtime, "enricher", None)
    if enricher is not None:
        lk = CounterMetricFamily("proctor_resource_lookups", "Resource attribute lookups on the upstream by result.", labels=["result"])
        lk.add_metric(["fetched"], enricher.lookups)
        lk.add_metric(["failed"], enricher.lookup_failures)
        out.append(lk)
    creators = CounterMetricFamily("proctor_creator_record_failures", "Allowed creates whose creator could not be recorded.")
    creators.add_metric([], runtime.stats().get("creator_record_failures", 0))
    out.append(creators)
    audit = getattr(runtime, "audit", None)
    if audit is not None:
        depth = GaugeMetricFamily("proctor_audit_queue_depth", "Audit events queued per sink.", labels=["sink"])
        lost = CounterMetricFamily("proctor_audit_lost_events", "Audit events a sink dropped or could not deliver.", labels=["sink", "reason"])
        sent = CounterMetricFamily("proctor_audit_events_delivered", "Audit events delivered per sink.", labels=["sink"])
        healthy = GaugeMetricFamily("proctor_audit_sink_healthy", "1 while the sink can take events, 0 while it is failing or full.", labels=["sink"])
        dead = CounterMetricFamily("proctor_audit_dead_letter_events", "Audit events a destination refused for good, kept in the sink's dead-letter file.", labels=["sink"])
        truncated = CounterMetricFamily("proctor_audit_truncated_events", "Audit events reduced to fit a sink's size limit (syslog max_message_bytes).", labels=["sink"])
        for i, sink in enumerate(audit.sinks):
            name = sink.name if i == 0 else f"{sink.name}#{i}"
            depth.add_metric([name], sink.queue_depth)
            lost.add_metric([name, "dropped"], sink.stats.get("dropped", 0))
            lost.add_metric([name, "failed"], sink.stats.get("failed", 0))
            if "skipped" in sink.stats:  # file: not written while the disk was full (declared in a gap marker)
                lost.add_metric([name, "not_written"], sink.stats["skipped"])
            if "dead_lettered" in sink.stats:
                dead.add_metric([name], sink.stats["dead_lettered"])
            if "truncated" in sink.stats:
                truncated.add_metric([name], sink.stats["truncated"])
            sent.add_metric([name], sink.stats.get("sent", 0))
            healthy.add_metric([name], 1 if sink.healthy else 0)
        out += [depth, lost, sent, healthy, dead, truncated]
        gaps = CounterMetricFamily("proctor_audit_gap_markers", "Gap markers written: events the audit file could not take, accounted for in the chain.")
        gaps.add_metric([], getattr(audit, "gaps", 0))
        out.append(gaps)
        refused = CounterMetricFamily("proctor_audit_refusals", "Requests refused because the audit trail could not record them.")
        refused.add_metric([], audit.refused)
        out.append(refused)
        build = CounterMetricFamily("proctor_audit_build_errors", "Records that could not be turned into an audit event (lost).")
        build.add_metric([], audit.errors)
        out.append(build)
    tunnels = GaugeMetricFamily("proctor_tunnels_open", "CONNECT tunnels with a bound agent identity.")
    tunnels.add_metric([], len(runtime.addon.tunnel_identity))
    out.append(tunnels)
    return out
