"""Human approval stages.

`HoldForApproval` runs right after authorization and may settle its pending deny:
a deny that only `@approval` policies caused becomes a hold (202 in async mode;
in sync mode the request waits for the decision), and an approved request is
decided again with the approval in context. `SpendApproval` runs last, after
the credential and the audit gate: only a request that will really be forwarded
claims (spends) its approval, so a refusal on the way keeps it usable for a retry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import ApprovalsConfig
from ..core.chain import Stage
from ..core.exchange import HOLD_KIND, Exchange
from ..core.model import Classification, Refusal
from ..policy.engine import PolicyStore
from ..policy.stage import EVALUATION, PolicyEvaluation
from ..record.decisions import iso
from .policy import hold_groups
from .service import ApprovalService

RELEASED = "approval"  # stage_data key: the approved Approval waiting to be spent

# (agent id, connector, action) -> a refusal if the agent or its target was suspended meanwhile
SuspendedCheck = Callable[[str, str, str], Refusal | None]


def _held(approvals: ApprovalService, config: ApprovalsConfig, approval: Any, status: int, title: str,
          transparent: bool = False) -> Refusal:
    """`transparent`: the request came through the transparent listener; its status URL is the
    status address in the agent's pod (it has no token for the control API)."""
    retry = str(config.retry_after_seconds)
    url = approvals.status_url(approval.id, transparent)
    groups = ", ".join(f"{g} ({n})" if n > 1 else g for g, n in approval.groups.items())
    if status == 202:
        detail = (
            f"this request needs approval by {groups}; retry the same request (or poll the status URL) "
            f"after {retry} s: once approved, the retry goes through"
        )
    else:
        detail = (
            f"this request is waiting for approval by {groups} and was not forwarded; retry the same "
            f"request later: once approved, the retry goes through"
        )
    return Refusal(
        status,
        title,
        detail,
        reasons=list(approval.derived.get("policies", [])),
        headers={"Retry-After": retry, "Location": url},
        kind=HOLD_KIND,
        extra={
            "approval_id": approval.id,
            "approval_state": approval.state,
            "status_url": url,
            "approval_groups": approval.groups,
            "expires_at": iso(approval.expires_at),
        },
    )


def _handed_over(approvals: ApprovalService, config: ApprovalsConfig, approval: Any,
                 transparent: bool = False) -> Refusal:
    """A request held open when this process began shutting down: answered now (503, the
    status URL in Location), not forwarded; its approval stays pending in the store, and
    once approved the agent's retry is released by it on any replica."""
    refusal = _held(approvals, config, approval, 503, "Proctor is shutting down", transparent)
    groups = ", ".join(f"{g} ({n})" if n > 1 else g for g, n in approval.groups.items())
    refusal.detail = (
        f"this request is waiting for approval by {groups} and was not forwarded; this Proctor process is "
        f"shutting down, so it answers now. The approval stays pending: retry the same request after "
        f"{config.retry_after_seconds} s (any replica takes it), or poll the status URL; once approved, "
        "the retry goes through"
    )
    return refusal


def _used_detail(approval: Any, config: ApprovalsConfig | None) -> str:
    """What a retry of an already forwarded request is told: what happened and what would work."""
    detail = "this approved request was already forwarded once"
    if approval.forwarded_at is not None:
        detail += f" (at {iso(approval.forwarded_at)})"
    detail += "; an approval releases one request, so it is not forwarded again"
    window = config.forwarded_retry_seconds if config is not None else 0
    if approval.forwarded_at is not None and window > 0:
        detail += (
            f". To send it again as a new request, send it with a new Idempotency-Key: it is then held for "
            f"approval anew (until {iso(approval.forwarded_at + window)} this same request gets this answer)"
        )
    return detail


def _settled_refusal(approval: Any, config: ApprovalsConfig | None = None) -> Refusal | None:
    """The answer for an approval that is no longer pending and cannot release this request
    (denied, expired, already used, cancelled as a duplicate); None when it is approved."""
    policies = list(approval.derived.get("policies", []))
    if approval.state == "denied":
        return Refusal(
            403, "Approval denied",
            f"{approval.decided_by} denied this request: {approval.reason}",
            reasons=policies, kind="approval-denied",
            extra={"approval_id": approval.id, "approval_state": "denied"},
        )
    if approval.state == "approved":
        return None
    if approval.state == "expired":
        return Refusal(
            403, "Approval expired", "nobody approved this request in time; send it again to ask anew",
            reasons=policies, kind="approval-expired",
            extra={"approval_id": approval.id, "approval_state": approval.state},
        )
    if approval.state == "cancelled":  # a duplicate made before the store enforced one per request
        return Refusal(
            409, "Approval cancelled",
            "this approval was cancelled as a duplicate of a newer approval of the same request; "
            "send the request again: it is answered by that one",
            reasons=policies, kind="approval-used",
            extra={"approval_id": approval.id, "approval_state": approval.state},
        )
    return Refusal(
        409, "Already forwarded", _used_detail(approval, config),
        reasons=policies, kind="approval-used",
        extra={"approval_id": approval.id, "approval_state": approval.state},
    )


class HoldForApproval(Stage):
    name = "approval"
    settles_pending = True

    def __init__(self, approvals: ApprovalService, policies: PolicyStore, config: ApprovalsConfig,
                 suspended: SuspendedCheck | None = None) -> None:
        self.approvals = approvals
        self.policies = policies
        self.config = config
        self.suspended = suspended

    def _wait_settings(self, cls: Classification) -> tuple[str, float]:
        wait = cls.approval_mode
        mode = (wait.mode if wait is not None and wait.mode else None) or self.config.mode
        seconds = (wait.wait_seconds if wait is not None and wait.wait_seconds else None) or self.config.sync_wait_seconds
        return mode, seconds

    def _approvable(self, evaluation: PolicyEvaluation, cls: Classification, groups: dict[str, int]) -> bool:
        """Hold only what an approval could actually let through: would a stand-in approval by
        every named group make Cedar allow it?"""
        principal, resource = evaluation.principal, evaluation.resource
        prospective = dict(evaluation.context, approval=self.approvals.prospective_context(groups))
        check = self.policies.authorize(principal, cls.action, resource, prospective, [principal, resource],
                                        bundle=evaluation.bundle)
        return check.allowed and not check.errors

    def would_settle(self, ex: Exchange) -> Refusal | None:
        """Monitor mode (proxy/policy/monitor.py): the hold this pending deny would become for a
        new request, with no side effect: no approval is created, looked up, notified or waited
        for. The status is 202 in async mode; a sync hold has none of its own (extra approval_mode)."""
        evaluation: PolicyEvaluation | None = ex.stage_data.get(EVALUATION)
        if ex.pending_refusal is None or evaluation is None or evaluation.allowed:
            return None
        groups = hold_groups(evaluation.reasons, evaluation.bundle.approvals)
        cls = ex.classification
        if not groups or cls is None or not self._approvable(evaluation, cls, groups):
            return None
        mode, _ = self._wait_settings(cls)
        names = ", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items())
        return Refusal(
            202, "Held for approval", f"this request needs approval by {names}",
            reasons=list(evaluation.reasons), kind=HOLD_KIND,
            extra={"approval_groups": dict(groups), "approval_mode": mode},
        )

    async def on_request(self, ex: Exchange) -> None:
        evaluation: PolicyEvaluation | None = ex.stage_data.get(EVALUATION)
        if ex.pending_refusal is None or evaluation is None or evaluation.allowed:
            return  # nothing to hold: an allowed request, or a refusal that is not a policy deny
        groups = hold_groups(evaluation.reasons, evaluation.bundle.approvals)
        if not groups:
            return  # an ordinary deny: the chain answers it
        req, cls, identity = ex.request, ex.classification, ex.identity
        assert req is not None and cls is not None and identity is not None
        approvals = self.approvals
        mode, wait_seconds = self._wait_settings(cls)
        # The approval is bound to the request as it will reach the upstream: the agent's
        # own credentials (stripped) and the connector's injected one are not part of it,
        # an upstream credential the agent sends itself is.
        forwarded = approvals.forwarded_view(req, cls.connector, ex.plan.remove_headers)
        lock_key = req.headers.get("idempotency-key") or approvals.fingerprint(identity.agent_id, forwarded)
        principal, resource, context = evaluation.principal, evaluation.resource, evaluation.context
        # (the lock only spares this process's duplicates a race in the store: the store's
        # hold is what attaches identical requests on every replica to one approval)
        async with approvals.hold_lock(identity.agent_id, lock_key):
            approval = await approvals.find_for_retry(identity, forwarded)
            if approval is None:
                if not self._approvable(evaluation, cls, groups):
                    return  # the plain deny stands
                derived = {
                    "action": cls.action,
                    "resource": cls.resource_uid,
                    "resource_attributes": resource.get("attrs", {}),
                    "connector": cls.connector,
                    "risk": cls.risk,
                    "route": cls.route,
                    "context": {k: context[k] for k in ("params", "query_params", "fields", "rpc") if k in context},
                }
                # (another replica's approval of this same request, if it was first)
                approval = await approvals.hold(
                    decision_id=ex.decision_id, identity=identity, req=req, cls=cls, groups=groups,
                    policy_ids=list(evaluation.reasons), mode=mode, derived=derived, forwarded=forwarded,
                )
        if not approvals.matches(approval, identity.agent_id, forwarded):
            # matched by Idempotency-Key, but not the request that was approved: never release it
            ex.settle_pending(Refusal(
                422, "Idempotency-Key reused",
                f"the Idempotency-Key of this request belongs to another request held for approval ({approval.id}: "
                f"{approval.request.get('method')} {str(approval.request.get('url') or '').partition('?')[0]}) "
                "with a different method, URL or "
                "body; an approval releases only the request that was approved. Use a new key for a new request.",
                reasons=list(evaluation.reasons), kind="request", extra={"approval_id": approval.id},
            ))
            return
        ex.approval_id = approval.id
        ex.policy_decision = "hold"
        transparent = req.mode == "transparent"
        if approval.state == "pending":
            if mode == "async":
                ex.settle_pending(_held(approvals, self.config, approval, 202, "Held for approval", transparent))
                return
            approval = await approvals.wait(approval, wait_seconds, req.client_alive)
            if self.suspended is not None:  # suspended while it waited: refuse at once
                refusal = self.suspended(identity.agent_id, cls.connector, cls.action)
                if refusal is not None:
                    ex.settle_pending(refusal)
                    return
        if approval.state == "pending":
            if approvals.draining:  # shutting down: answered now, the approval stays pending
                ex.settle_pending(_handed_over(approvals, self.config, approval, transparent))
                return
            ex.settle_pending(_held(approvals, self.config, approval, 403, "Approval pending", transparent))
            return
        refusal = _settled_refusal(approval, self.config)
        if refusal is not None:
            ex.settle_pending(refusal)
            return
        # Approved: decide again, with the approval in context (policies may constrain who approved).
        # (the record keeps the request's own inputs and "hold": replay asks whether the
        # request itself would need approval under other policies)
        approved_ctx = dict(context, approval=approvals.cedar_context(approval))
        result = self.policies.authorize(principal, cls.action, resource, approved_ctx, [principal, resource],
                                         bundle=evaluation.bundle)
        ex.reasons = result.reasons
        if result.errors or not result.allowed:
            # e.g. a policy that constrains who may approve what: the approval stays unused
            why = "; ".join(result.errors) if result.errors else (
                f"forbidden by policy {', '.join(result.reasons)}" if result.reasons else "no policy permits it"
            )
            ex.settle_pending(Refusal(
                403, "Denied by policy after approval",
                f"{identity.agent_id} may not {cls.action} on {cls.resource_uid} even with approval {approval.id} "
                f"by {approval.decided_by}: {why}",
                reasons=result.reasons, kind="policy",
                extra={"approval_id": approval.id, "approval_state": approval.state},
            ))
            return
        ex.stage_data[RELEASED] = approval
        ex.settle_pending(None)  # released: the request goes on (and spends the approval last)


class SpendApproval(Stage):
    """The last request stage: claim the approval for exactly one forwarded request."""

    name = "spend-approval"

    def __init__(self, approvals: ApprovalService, config: ApprovalsConfig) -> None:
        self.approvals = approvals
        self.config = config

    async def on_request(self, ex: Exchange) -> None:
        approval = ex.stage_data.pop(RELEASED, None)
        if approval is None:
            return
        req = ex.request
        assert req is not None
        for _ in range(8):  # a concurrent retry may race us for it; the store decides who wins
            if req.client_alive is not None and not req.client_alive():
                # The agent hung up while waiting: keep the approval for its retry.
                ex.refuse(_held(self.approvals, self.config, approval, 403, "Approval pending",
                                req.mode == "transparent"))
                return
            claimed, approval = await self.approvals.claim_for_forwarding(approval)
            if claimed:
                return
            refusal = _settled_refusal(approval, self.config)
            if refusal is not None:
                ex.refuse(refusal)
                return
        ex.refuse(_settled_refusal(approval, self.config) or Refusal(
            409, "Approval contended", "other requests kept claiming this approval; retry the request",
            reasons=list(approval.derived.get("policies", [])), kind="approval-used",
            extra={"approval_id": approval.id, "approval_state": approval.state},
        ))
