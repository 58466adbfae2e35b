"""The authorization stage: Cedar decides (and the shadow set is compared).

An evaluation error refuses at once (fail closed). A plain deny is left as the
exchange's *pending* refusal: the approval stage right after may turn a deny that
only `@approval` policies caused into a hold; otherwise the chain answers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import IdentityConfig, RequestLimits
from ..core.chain import Stage
from ..core.context import principal_entity, request_context, resource_entity
from ..core.exchange import Exchange
from ..core.model import Refusal
from .engine import PolicyBundle, PolicyStore
from .shadow import ShadowPolicies

EVALUATION = "authorize"  # stage_data key of the PolicyEvaluation
# stage_data key: context entries a stage before authorization computed (e.g. context.claim,
# proxy/coordination/claims.py), merged into the Cedar context.
CONTEXT_EXTRA = "context"


@dataclass(slots=True)
class PolicyEvaluation:
    """What Cedar was asked and said, for the stages that ask again (approval release)."""

    bundle: PolicyBundle
    principal: dict[str, Any]
    resource: dict[str, Any]
    context: dict[str, Any]
    allowed: bool
    reasons: list[str]


class Authorize(Stage):
    name = "authorize"

    def __init__(self, policies: PolicyStore, shadow: ShadowPolicies | None, identity: IdentityConfig,
                 limits: RequestLimits) -> None:
        self.policies = policies
        self.shadow = shadow
        self.identity = identity
        self.limits = limits

    def on_request(self, ex: Exchange) -> None:
        req, cls, identity = ex.request, ex.classification, ex.identity
        assert req is not None and cls is not None and identity is not None
        bundle = self.policies.bundle
        ex.policy_revision = bundle.revision
        principal = principal_entity(identity, self.identity.principal)
        resource = resource_entity(cls)
        payload = ex.payload.describe() if ex.payload is not None else None
        limits = self.limits
        context = request_context(req, cls, ex.body, limits.context_headers, now=ex.timestamp, payload=payload,
                                  inexact=limits.inexact_numbers)
        extra = ex.stage_data.get(CONTEXT_EXTRA)
        if extra:
            context.update(extra)
        ex.policy_inputs = (principal, resource, context)
        result = self.policies.authorize(principal, cls.action, resource, context, [principal, resource], bundle=bundle)
        if self.shadow is not None:
            shadow = self.shadow.compare(result, principal, cls.action, resource, context)
            if shadow is not None:
                ex.shadow = shadow.as_dict()
        ex.reasons = result.reasons
        ex.policy_decision = "allow" if result.allowed and not result.errors else "deny"
        if result.errors:
            ex.errors = list(result.errors)
            ex.refuse(Refusal(
                403,
                "Denied: policy evaluation error",
                "a policy could not be evaluated for this request, so it is denied (fail closed): "
                + "; ".join(result.errors),
                reasons=sorted(set(result.error_policies)) or result.reasons,
                kind="policy-error",
            ))
            return
        ex.stage_data[EVALUATION] = PolicyEvaluation(bundle, principal, resource, context, result.allowed, result.reasons)
        if not result.allowed:
            detail = (f"forbidden by policy {', '.join(result.reasons)}" if result.reasons
                      else "no policy permits this request (default deny)")
            ex.pending_refusal = Refusal(
                403,
                "Denied by policy",
                f"{identity.agent_id} may not {cls.action} on {cls.resource_uid}: {detail}",
                reasons=result.reasons,
                kind="policy",
            )
