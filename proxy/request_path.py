"""The request path, top to bottom: the one place the stages are put in order.

`on_request` runs down the list (any stage may refuse or hold, which ends the
phase); `on_response` runs back up it, for forwarded and refused requests alike.
That is why the stages that observe (trace, metrics, record) come first: their
`on_response` runs last, after everything else has had its say.

To add a stage: write one class in its feature's package (see core/chain.py for
the protocol and docs/architecture.md for a recipe) and put it in the list below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .approvals.service import ApprovalService, forwarded_view, request_fingerprint
from .approvals.stage import RELEASED, HoldForApproval, SpendApproval
from .audit.stage import AuditGate
from .audit.trail import AuditTrail
from .config import ProctorConfig
from .connectors.aliases import ConnectorAliases
from .connectors.classifier import Classifier
from .connectors.credentials import CredentialInjector
from .connectors.enrich import Enricher
from .connectors.stages import (Classify, ConnectorAlias, Enrich, ErrorFormat, GatewayTarget, InjectCredential,
                                TrackCreator, TunnelTarget)
from .coordination.claims import ClaimAcquire, ClaimCheck, ClaimConflict, ClaimObserver
from .coordination.concurrency import ConcurrencyMetrics, IfMatch, if_match_paths
from .coordination.handoff import ClaimHandoff, HandoffReporter
from .coordination.idempotency import DuplicateObserver, IdempotencyCheck, IdempotencyReserve
from .coordination.metrics import ClaimMetrics, DuplicateMetrics
from .core.chain import Chain, Stage
from .core.context import principal_entity
from .core.exchange import Exchange
from .core.model import AgentIdentity, AgentRequest, Refusal
from .core.stages import GatewayRoute, TargetCheck
from .engine.gateway import GatewayRouter
from .governance.registry import Governance, suspension_refusal
from .governance.stage import AgentSuspended, TargetSuspended
from .identity.stage import Authenticate, Authenticator
from .limits.budget_setup import Budgets
from .limits.budget_report import BudgetReport
from .limits.budget_stage import BudgetCheck, BudgetReserve
from .limits.metrics import RateLimitMetrics
from .limits.setup import RateLimits
from .limits.stage import RateLimit
from .observability.metrics import Metrics
from .observability.stages import CountMetrics, Trace, TracePropagation
from .observability.tracing import Tracing
from .policy.engine import PolicyStore
from .policy.monitor import MonitorGate, MonitorScope, Verdict
from .policy.shadow import ShadowPolicies
from .policy.stage import Authorize
from .record.decisions import DecisionRecorder
from .record.stage import RecordDecision
from .store.refusal import store_unavailable
from .workflows.exceptions import ExceptionReporter, WorkflowExceptionConflict, WorkflowExceptions
from .workflows.metrics import WorkflowMetrics
from .workflows.spec import Workflows
from .workflows.stage import WorkflowAdvance, WorkflowCheck, WorkflowOrder


@dataclass
class Parts:
    """What the stages are built from (server.py builds these once)."""

    config: ProctorConfig
    authenticator: Authenticator
    classifier: Classifier
    policies: PolicyStore
    recorder: DecisionRecorder
    metrics: Metrics
    store: Any
    shadow: ShadowPolicies | None = None
    enricher: Enricher | None = None
    aliases: ConnectorAliases | None = None
    governance: Governance | None = None
    approvals: ApprovalService | None = None
    injector: CredentialInjector | None = None
    audit: AuditTrail | None = None
    tracing: Tracing | None = None
    claims: ClaimObserver | None = None  # claim metrics (default: ClaimMetrics on `metrics`)
    notifier: Any = None  # approvals.notify.Notifier: webhooks (handoffs too)
    workflows: Workflows | None = None  # workflow definitions (docs/workflows.md)
    rate_limits: RateLimits | None = None  # declared rate limits and their counters (docs/limits.md)
    budgets: Budgets | None = None  # declared budgets and their ledger (docs/limits.md, "Budgets")


@dataclass
class RequestPath:
    """The chains the engines run: one for requests, one for CONNECT tunnels."""

    requests: Chain
    tunnels: Chain

    def stage(self, name: str) -> Stage:
        return next(s for s in self.requests.stages if s.name == name)


def _present(*stages: Stage | None) -> list[Stage]:
    return [s for s in stages if s is not None]


def _fingerprinter(approvals: ApprovalService | None) -> Callable[[Exchange], str]:
    """What binds an Idempotency-Key to one request: the approval fingerprint (method,
    canonical URL, body and the bound headers, over the request as it reaches the upstream)."""

    def fingerprint(ex: Exchange) -> str:
        req, cls, identity = ex.request, ex.classification, ex.identity
        assert req is not None
        agent = identity.agent_id if identity is not None else ""
        # (the key itself is how the request is found, not part of it: "k" and the sf-string "\"k\"" match)
        unbound = [*ex.plan.remove_headers, "idempotency-key"]
        if approvals is not None:
            view = approvals.forwarded_view(req, cls.connector if cls is not None else "", unbound)
            return approvals.fingerprint(agent, view)
        return request_fingerprint(agent, forwarded_view(req, unbound))

    return fingerprint


def _gateway_target(cfg: ProctorConfig) -> GatewayTarget | None:
    """Gateway mode: the upstream a request addressed to Proctor is routed to (for the head
    phase, which runs before the engine routes the request)."""
    if not cfg.gateway.enabled or not cfg.gateway.routes:
        return None
    router = GatewayRouter(cfg.gateway.routes)

    def target(req: AgentRequest) -> tuple[str, int] | None:
        host = f"[{req.host}]" if ":" in req.host else req.host
        routed = router.route(host, req.path)
        return (routed.host, routed.port) if routed is not None else None

    return target


def build_request_path(p: Parts) -> RequestPath:
    cfg = p.config
    gov = p.governance
    tracing = p.tracing if p.tracing is not None and p.tracing.enabled else None

    principal_mapping = cfg.identity_settings().principal
    claim_observer = p.claims if p.claims is not None else ClaimMetrics(p.metrics)
    duplicates = DuplicateObserver(p.recorder.write, DuplicateMetrics(p.metrics).count)
    workflows = p.workflows if p.workflows else None
    workflow_metrics = WorkflowMetrics(p.metrics) if workflows is not None else None
    etag_paths = if_match_paths(p.classifier.connectors)  # routes whose answers' ETags matter

    def groups_of(identity: AgentIdentity) -> list[str]:
        # the agent's groups as Cedar sees them (principal parents): context.claim.holder_groups
        return [p["id"] for p in principal_entity(identity, principal_mapping)["parents"]]

    def suspended_meanwhile(agent: str, connector: str, action: str) -> Refusal | None:
        assert gov is not None
        s = gov.suspension_for(agent, connector, action)
        return suspension_refusal(s) if s is not None else None

    rl = p.rate_limits
    rate_limit = RateLimit(rl.table, rl.counters, groups_of, RateLimitMetrics(p.metrics.registry, [
        lim.name for lim in rl.table.limits]), sweep_interval_seconds=rl.sweep_interval_seconds) if rl else None

    # the duplicate-work check (after the hold) answers a retry from the store; the budget check
    # (before Cedar) asks it first, so a retry of a call that filled a budget is replayed, not
    # held or refused for that call's spend (it stays after authorize: a replay needs the policy too)
    idempotency = IdempotencyCheck(p.store, cfg.idempotency, _fingerprinter(p.approvals),
                                   duplicates) if p.store else None

    bg = p.budgets
    budget_report = BudgetReport(p.metrics.registry, bg.table.budgets, p.recorder.write, p.notifier) if bg else None
    budget_check = BudgetCheck(bg.table, bg.ledger, groups_of, budget_report,
                               answered=idempotency.answers if idempotency else None) if bg else None
    budget_reserve = BudgetReserve(bg.ledger, bg.table.llm_prices, budget_report,
                                   sweep_interval_seconds=cfg.counters.sweep_interval_seconds) if bg else None

    exceptions = WorkflowExceptions(p.store, p.recorder.write, ExceptionReporter(p.metrics, p.notifier),
                                    groups_of) if workflows is not None else None

    # observers first: their on_response runs last
    trace = Trace(tracing) if tracing else None
    count = CountMetrics(p.metrics)
    record = RecordDecision(p.recorder, with_inputs=cfg.record.policy_inputs)
    authenticate = Authenticate(p.authenticator)
    agent_suspended = AgentSuspended(gov) if gov else None

    # the stages that may settle the policy deny, in chain order; monitor mode asks each what it
    # would answer (their would_settle: no side effect) before any of them acts (policy/monitor.py)
    claim_conflict = ClaimConflict(claim_observer, record=p.recorder.write)
    workflow_order = WorkflowOrder(p.store, workflow_metrics) if workflows else None
    exception_conflict = WorkflowExceptionConflict() if workflows else None
    hold = HoldForApproval(p.approvals, p.policies, cfg.approvals,
                           suspended_meanwhile if gov else None) if p.approvals else None
    scope = MonitorScope.from_config(cfg.monitor)
    verdicts: list[Verdict] = [claim_conflict.would_settle]
    verdicts += [workflow_order.would_settle] if workflow_order else []
    verdicts += [exception_conflict.would_settle] if exception_conflict else []
    verdicts += [hold.would_settle] if hold else []
    monitor = MonitorGate(scope, groups_of if scope.groups else None, verdicts) if scope.enabled else None

    requests = Chain(_present(
        trace,                                                     # server span around everything
        count,                                                     # counters and histograms
        record,                                                    # decision record + OCSF audit event
        ErrorFormat(p.classifier, _gateway_target(cfg)),           # refusals in the connector's error shape
        authenticate,                                              # who is calling (agent JWT)
        GatewayRoute(),                                            # gateway mode: 404 when no route matched
        agent_suspended,                                           # kill switch: the agent
        TargetCheck(cfg.limits.context_headers, cfg.transparent.tls_ports),  # one target, canonical host, no smuggling
        Classify(p.classifier, cfg.limits),                        # connector, action, resource, body values
        ConnectorAlias(p.aliases) if p.aliases else None,          # generic egress to a connector's upstream
        TargetSuspended(gov) if gov else None,                     # kill switch: connector and action
        Enrich(p.enricher) if p.enricher else None,                # resource attributes (creator, lookup)
        ClaimCheck(p.store, groups_of),                            # claim-bearing routes: context.claim
        WorkflowCheck(p.store, workflows) if workflows else None,  # workflow steps: context.workflow
        exceptions,                                                # its exception fields; on the way back:
                                                                   # retry, give up, escalate, reroute
        rate_limit,                                                # counted against its rate limits: 429
                                                                   # (denied requests count too); context.usage
        budget_check,                                              # estimated cost vs its budgets: 429 when
                                                                   # over a refusing one; context.budget
        TrackCreator(p.store),                                     # on the way back: who created what
        Authorize(p.policies, p.shadow, cfg.identity_settings(), cfg.limits),  # Cedar (and shadow)
        monitor,                                                   # monitor mode: the deny recorded, not enforced
        claim_conflict,                                            # a deny by @claim policies -> 409
        workflow_order,                                            # @workflow deny -> 409
        exception_conflict,                                        # gave up, rerouted, closed -> 409
        hold,                                                      # deny -> hold
        WorkflowAdvance(p.store, workflow_metrics,                 # a person's part; on the way
                        lambda ex: ex.stage_data.get(RELEASED)) if workflows else None,  # back: the step
        idempotency,                                               # replay/409/422 (the budget check asked first)
        IfMatch(p.store, cfg.concurrency, etag_paths,              # if_match writes: If-Match (last-seen ETag);
                ConcurrencyMetrics(p.metrics.registry)) if p.store and etag_paths else None,  # upstream 412 -> 409
        budget_reserve,                                            # reserve the cost (429 if it no longer fits);
                                                                   # on the way back: settle or release it
        InjectCredential(p.injector) if p.injector else None,      # the connector's credential
        ClaimAcquire(p.store, claim_observer, record=p.recorder.write),                     # atomic acquire/renew: the arbiter
        ClaimHandoff(p.store, p.recorder.write,                    # on the way back: a 2xx handoff
                     HandoffReporter(p.metrics, p.notifier)),      # moves the claim
        AuditGate(p.audit) if p.audit else None,                   # forwarded only if it can be recorded
        IdempotencyReserve(p.store, cfg.idempotency, duplicates) if p.store else None,  # key in progress; response kept
        SpendApproval(p.approvals, cfg.approvals) if p.approvals else None,  # an approval releases one request
        TracePropagation(tracing) if tracing else None,            # the upstream joins the trace
    ), error_refusals=[store_unavailable])

    tunnels = Chain(_present(
        count,
        record,
        monitor,  # (marks the refused CONNECTs of a monitored scope: nothing to settle there)
        authenticate,
        agent_suspended,
        TunnelTarget(p.classifier),
    ), error_refusals=[store_unavailable])
    return RequestPath(requests, tunnels)
