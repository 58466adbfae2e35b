"""The request pipeline: authenticate -> classify -> build context -> authorize.

Engine-agnostic: an `AgentRequest` in, an `Outcome` out. Every stage either
passes the request on or produces a `Refusal`; any unexpected exception is a
503 refusal (fail closed), never a forwarded request.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import ipaddress
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import ProctorConfig
from ..connectors.aliases import AliasUnresolvable, ConnectorAliases
from ..connectors.classifier import GENERIC_CONNECTOR, Classifier
from ..identity.credentials import AUTHORIZATION, PROXY_AUTHORIZATION, extract_credential
from ..identity.errors import AuthError, IdentityUnavailable
from ..identity.verifier import TokenVerifier
from ..policy.engine import PolicyStore
from ..policy.shadow import ShadowPolicies

if TYPE_CHECKING:
    from ..approvals.service import ApprovalService
    from ..governance.registry import Governance
from .context import principal_entity, request_context, resource_entity
from .derive import derive_request
from .enrich import Enricher
from ..approvals.policy import hold_groups
from ..record.decisions import iso
from ..store.base import StoreError
from .model import AgentIdentity, AgentRequest, Decision, Outcome, Refusal
from ..governance.registry import suspension_refusal
from .target import canonicalise_target, check_target

log = logging.getLogger("proctor.pipeline")


@dataclass(frozen=True, slots=True)
class Authentication:
    identity: AgentIdentity | None
    refusal: Refusal | None
    strip_headers: tuple[str, ...] = (PROXY_AUTHORIZATION,)
    token_digest: bytes | None = None  # SHA-256 of the agent's token (to bind and strip it)


def _credential(header_value: str) -> str | None:
    """The credential in one Authorization value: a Bearer token or a Basic password."""
    scheme, _, param = header_value.strip().partition(" ")
    param = param.strip()
    if not param:
        return None
    if scheme.lower() == "basic":
        try:
            param = base64.b64decode(param, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
    return param


def new_decision_id() -> str:
    # time-ordered prefix (ms) + randomness: sortable in logs, unguessable
    return f"{int(time.time() * 1000):012x}-{uuid.uuid4().hex[:20]}"


def new_outcome(refusal: Refusal | None = None, identity: AgentIdentity | None = None) -> Outcome:
    return Outcome(
        decision_id=new_decision_id(),
        decision=Decision.DENY,
        started=time.perf_counter(),
        timestamp=time.time(),
        identity=identity,
        refusal=refusal,
        strip_headers=(PROXY_AUTHORIZATION,),
    )


@functools.lru_cache(maxsize=4096)
def normalise_ip(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return "0.0.0.0"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return str(addr)


class Pipeline:
    def __init__(
        self,
        config: ProctorConfig,
        verifier: TokenVerifier,
        classifier: Classifier,
        policies: PolicyStore,
        shadow: ShadowPolicies | None = None,
        enricher: Enricher | None = None,
        approvals: "ApprovalService | None" = None,
        governance: "Governance | None" = None,
        aliases: ConnectorAliases | None = None,
    ) -> None:
        self.config = config
        # Generic egress to another name of a connector's upstream is refused (connectors/aliases.py).
        self.aliases = aliases
        self.enricher = enricher
        self.approvals = approvals
        self.governance = governance
        # Last gate before an approval is spent (set to the audit trail's `admit`).
        self.pre_forward = None
        self.verifier = verifier
        self.classifier = classifier
        self.policies = policies
        self.shadow = shadow
        self.identity_settings = config.identity_settings()
        self._policy_headers = frozenset(config.limits.context_headers)

    # -- authentication ---------------------------------------------------------
    def _auth_refusal(self, req: AgentRequest, detail: str) -> Refusal:
        if req.mode == "reverse":
            return Refusal(
                401,
                "Agent authentication required",
                detail,
                headers={"WWW-Authenticate": 'Bearer realm="proctor"'},
                kind="authentication",
            )
        return Refusal(
            407,
            "Proxy authentication required",
            detail,
            headers={"Proxy-Authenticate": 'Basic realm="proctor", Bearer realm="proctor"'},
            kind="authentication",
        )

    async def authenticate(self, req: AgentRequest) -> Authentication:
        """The verified identity (or a refusal) and the headers that carried the agent's credential."""
        if req.connection_identity is not None:
            ident = req.connection_identity
            strip = [PROXY_AUTHORIZATION]
            # The tunnel's token must not reach the upstream even if the agent also
            # sends it as Authorization inside the tunnel.
            if self._carries_agent_token(req.headers.get(AUTHORIZATION, ""), req.connection_token_digest):
                strip.append(AUTHORIZATION)
            leeway = self.identity_settings.leeway_seconds
            if ident.expires_at is not None and time.time() > ident.expires_at + leeway:
                return Authentication(
                    None,
                    self._auth_refusal(
                        req, "the token this connection was authenticated with has expired; reconnect with a fresh token"
                    ),
                    tuple(strip),
                )
            return Authentication(ident, None, tuple(strip), req.connection_token_digest)
        try:
            cred = extract_credential(req.headers, reverse_mode=req.mode == "reverse")
            identity = await self.verifier.verify(cred.token)
        except AuthError as e:
            return Authentication(None, self._auth_refusal(req, str(e)))
        except IdentityUnavailable as e:
            return Authentication(None, Refusal(503, "Identity provider unavailable", str(e), kind="fail-closed"))
        if (
            cred.username is not None
            and self.identity_settings.proxy_username == "must_match"
            and cred.username != identity.agent_id
        ):
            return Authentication(
                None, self._auth_refusal(req, "the proxy username must equal the agent id in the token (subject)")
            )
        digest = hashlib.sha256(cred.token.encode()).digest()
        strip = [PROXY_AUTHORIZATION]
        if cred.header.lower() == AUTHORIZATION or self._carries_agent_token(req.headers.get(AUTHORIZATION, ""), digest):
            strip.append(AUTHORIZATION)
        return Authentication(identity, None, tuple(strip), digest)

    def _carries_agent_token(self, authorization: str, digest: bytes | None) -> bool:
        """Does any credential in an Authorization value (repeated fields are joined with ", ")
        equal the authenticating token, or look like a token from an issuer Proctor trusts?

        Such a value is an agent credential, never an upstream one: it is removed
        (with every Authorization field) before forwarding.
        """
        if not authorization:
            return False
        for piece in authorization.split(","):
            token = _credential(piece)
            if token is None:
                continue
            if digest is not None and hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest() == digest:
                return True
            if self.verifier.looks_like_agent_token(token):
                return True
        return False

    # -- CONNECT: admit a tunnel ------------------------------------------------
    async def admit_tunnel(self, req: AgentRequest) -> Outcome:
        """Authenticate a CONNECT and refuse tunnels to hosts nothing could classify.

        An admitted tunnel carries no decision of its own: every request inside it
        is decided separately, with the identity proven here.
        """
        outcome = new_outcome()
        try:
            auth = await self.authenticate(req)
            identity, refusal = auth.identity, auth.refusal
            outcome.credential_digest = auth.token_digest
        except Exception as e:
            log.exception("CONNECT authentication error (decision %s); refusing", outcome.decision_id)
            outcome.errors.append(f"{type(e).__name__}: {e}")
            identity, refusal = None, Refusal(503, "Proctor could not decide", "internal error; tunnel refused (fail closed)", kind="fail-closed")
        outcome.identity = identity
        if refusal is None and identity is not None and self.governance is not None:
            try:
                suspended = self.governance.agent_suspension(identity.agent_id)
            except StoreError as e:
                suspended, refusal = None, self._store_refusal(outcome, e)
            if suspended is not None:
                refusal = suspension_refusal(suspended)
        if refusal is None:
            refusal = canonicalise_target(req)
        if refusal is None and not self.classifier.knows_host(req.host, req.port):
            refusal = Refusal(
                403,
                "Egress not permitted",
                f"no connector covers {req.host}:{req.port}; tunnels to unclassified hosts are refused",
                reasons=["egress-default-deny"],
                kind="egress",
            )
        outcome.refusal = refusal
        if refusal is None:
            outcome.decision = Decision.ALLOW
        return outcome

    # -- the whole decision -----------------------------------------------------
    async def decide(self, req: AgentRequest) -> Outcome:
        outcome = new_outcome()
        try:
            await self._decide(req, outcome)
            outcome.timings["decision"] = time.perf_counter() - outcome.started
            if self.governance is not None and outcome.identity is not None:
                self.governance.seen(outcome.identity.agent_id, outcome.decision == Decision.ALLOW)
        except StoreError as e:  # the state store is lost or down: fail closed, say so
            outcome.decision = Decision.DENY
            outcome.refusal = self._store_refusal(outcome, e)
        except Exception as e:  # fail closed on anything unexpected
            log.exception("pipeline error (decision %s); refusing", outcome.decision_id)
            outcome.decision = Decision.DENY
            outcome.errors.append(f"{type(e).__name__}: {e}")
            outcome.refusal = Refusal(
                503,
                "Proctor could not decide",
                "an internal error occurred while deciding this request; it was not forwarded "
                "(fail closed). Quote the decision_id to your Proctor operator.",
                reasons=[],
                kind="fail-closed",
            )
        return outcome

    async def _decide(self, req: AgentRequest, outcome: Outcome) -> None:
        clock = time.perf_counter
        t0 = clock()
        auth = await self.authenticate(req)
        outcome.timings["authenticate"] = clock() - t0
        identity, refusal = auth.identity, auth.refusal
        outcome.strip_headers = auth.strip_headers
        outcome.identity = identity
        if refusal is not None:
            outcome.refusal = refusal
            return
        assert identity is not None
        gov = self.governance
        if gov is not None:
            suspended = gov.agent_suspension(identity.agent_id)
            if suspended is not None:
                outcome.refusal = suspension_refusal(suspended)
                return

        target_refusal = canonicalise_target(req) or check_target(req, self._policy_headers)
        if target_refusal is not None:
            outcome.refusal = target_refusal
            return

        t0 = clock()
        derived = derive_request(self.classifier, self.config.limits, req)
        outcome.timings["classify"] = clock() - t0
        outcome.classification = derived.classification
        outcome.is_jsonrpc = derived.is_jsonrpc
        outcome.jsonrpc_id = derived.jsonrpc_id
        if derived.refusal is not None:
            outcome.refusal = derived.refusal
            return
        cls = derived.classification
        assert cls is not None
        if self.aliases is not None and cls.connector == GENERIC_CONNECTOR:
            alias_refusal = await self._connector_alias(req)
            if alias_refusal is not None:
                outcome.refusal = alias_refusal
                return
        if gov is not None:
            suspended = gov.target_suspension(cls)
            if suspended is not None:
                outcome.refusal = suspension_refusal(suspended)
                return
        if self.enricher is not None and self.enricher.needed(cls):
            t0 = clock()
            cls, refusal = await self.enricher.enrich(req, cls)
            outcome.timings["enrich"] = clock() - t0
            outcome.classification = cls
            if refusal is not None:
                outcome.refusal = refusal
                return
        body = derived.body
        limits = self.config.limits

        bundle = self.policies.bundle
        outcome.policy_revision = bundle.revision
        principal = principal_entity(identity, self.identity_settings.principal)
        resource = resource_entity(cls)
        payload = derived.payload.describe() if derived.payload is not None else None
        context = request_context(req, cls, body, limits.context_headers, now=outcome.timestamp, payload=payload,
                                  inexact=limits.inexact_numbers)
        t0 = clock()
        outcome.policy_inputs = (principal, resource, context)
        result = self.policies.authorize(
            principal, cls.action, resource, context, [principal, resource], bundle=bundle
        )
        outcome.timings["authorize"] = clock() - t0
        if self.shadow is not None:
            shadow = self.shadow.compare(result, principal, cls.action, resource, context)
            if shadow is not None:
                outcome.shadow = shadow.as_dict()
        outcome.reasons = result.reasons
        outcome.policy_decision = "allow" if result.allowed and not result.errors else "deny"
        if result.errors:
            outcome.errors = result.errors
            outcome.refusal = Refusal(
                403,
                "Denied: policy evaluation error",
                "a policy could not be evaluated for this request, so it is denied (fail closed): "
                + "; ".join(result.errors),
                reasons=sorted(set(result.error_policies)) or result.reasons,
                kind="policy-error",
            )
            return
        if not result.allowed and self.approvals is not None:
            groups = hold_groups(result.reasons, bundle.approvals)
            if groups:
                t0 = clock()
                handled = await self._approval_flow(
                    req, outcome, identity, cls, principal, resource, context, bundle, groups, result.reasons
                )
                outcome.timings["approval"] = clock() - t0
                if handled:
                    return
        if not result.allowed:
            if result.reasons:
                detail = f"forbidden by policy {', '.join(result.reasons)}"
            else:
                detail = "no policy permits this request (default deny)"
            outcome.refusal = Refusal(
                403,
                "Denied by policy",
                f"{identity.agent_id} may not {cls.action} on {cls.resource_uid}: {detail}",
                reasons=result.reasons,
                kind="policy",
            )
            return
        outcome.decision = Decision.ALLOW

    _store_logged_at = 0.0

    def _store_refusal(self, outcome: Outcome, e: StoreError) -> Refusal:
        """503 while the state store cannot be trusted (lost, down, suspensions not re-read).
        Logged once a minute, not once per request: /readyz and /healthz say why."""
        outcome.errors.append(f"{type(e).__name__}: {e}")
        now = time.monotonic()
        if now - self._store_logged_at >= 60:
            self._store_logged_at = now
            log.error("refusing requests while the state store is unavailable (decision %s): %s", outcome.decision_id, e)
        return Refusal(
            503,
            "State store unavailable",
            "Proctor cannot check its state (suspensions, approvals) right now, so this request was not forwarded "
            "(fail closed); retry later",
            reasons=["store-unavailable"],
            headers={"Retry-After": "5"},
            kind="fail-closed",
        )

    async def _connector_alias(self, req: AgentRequest) -> Refusal | None:
        """Generic egress must not reach a connector's upstream under another name."""
        assert self.aliases is not None
        try:
            alias = await self.aliases.alias_of(req.host, req.port)
        except AliasUnresolvable as e:
            return Refusal(502, "Upstream host unresolvable",
                           f"{e}; its addresses could not be checked, so the request was not forwarded",
                           reasons=["egress-unresolvable"], kind="egress")
        if alias is None:
            return None
        where = f"{alias.host}:{alias.port}" if alias.port is not None else alias.host
        return Refusal(
            403,
            "Egress not permitted",
            f"{req.host}:{req.port} reaches the upstream of connector {alias.connector!r}, whose requests are "
            f"decided by that connector's policies; address it as {where} instead",
            reasons=["connector-alias"],
            kind="egress",
        )

    # -- human approval ---------------------------------------------------------------
    def _wait_settings(self, cls) -> tuple[str, float]:
        cfg = self.config.approvals
        wait = cls.approval_mode
        mode = (wait.mode if wait is not None and wait.mode else None) or cfg.mode
        seconds = (wait.wait_seconds if wait is not None and wait.wait_seconds else None) or cfg.sync_wait_seconds
        return mode, seconds

    async def _approval_flow(self, req, outcome, identity, cls, principal, resource, context, bundle, groups, reasons) -> bool:
        """A deny that only @approval policies caused. True: the outcome is settled here
        (held, released after approval, or refused because of the approval); False:
        treat it as the ordinary deny it is."""
        approvals = self.approvals
        assert approvals is not None
        mode, wait_seconds = self._wait_settings(cls)
        # The approval is bound to the request as it will reach the upstream: the agent's
        # own credentials (stripped) and the connector's injected one are not part of it,
        # an upstream credential the agent sends itself is.
        forwarded = approvals.forwarded_view(req, cls.connector, outcome.strip_headers)
        lock_key = req.headers.get("idempotency-key") or approvals.fingerprint(identity.agent_id, forwarded)
        async with approvals.hold_lock(identity.agent_id, lock_key):
            approval = await approvals.find_for_retry(identity, forwarded)
            if approval is not None and not approvals.matches(approval, identity.agent_id, forwarded):
                # matched by Idempotency-Key, but not the request that was approved: never release it
                outcome.refusal = Refusal(
                    422, "Idempotency-Key reused",
                    f"the Idempotency-Key of this request belongs to another held request ({approval.id}: "
                    f"{approval.request.get('method')} {str(approval.request.get('url') or '').partition('?')[0]}) "  # no query
                    "with a different method, URL or "
                    "body; an approval releases only the request that was approved. Use a new key for a new request.",
                    reasons=list(reasons), kind="request", extra={"approval_id": approval.id},
                )
                return True
            if approval is None:
                # Hold only what an approval could actually let through.
                prospective = dict(context, approval=approvals.prospective_context(groups))
                check = self.policies.authorize(principal, cls.action, resource, prospective, [principal, resource], bundle=bundle)
                if not check.allowed or check.errors:
                    return False
                derived = {
                    "action": cls.action,
                    "resource": cls.resource_uid,
                    "resource_attributes": resource.get("attrs", {}),
                    "connector": cls.connector,
                    "risk": cls.risk,
                    "route": cls.route,
                    "context": {k: context[k] for k in ("params", "query_params", "fields", "rpc") if k in context},
                }
                approval = await approvals.hold(
                    decision_id=outcome.decision_id, identity=identity, req=req, cls=cls, groups=groups,
                    policy_ids=list(reasons), mode=mode, derived=derived, forwarded=forwarded,
                )
        outcome.approval_id = approval.id
        outcome.policy_decision = "hold"
        if approval.state == "pending":
            if mode == "async":
                self._held_answer(outcome, approval, 202, "Held for approval")
                return True
            approval = await approvals.wait(approval, wait_seconds, req.client_alive)
            if self.governance is not None:  # suspended while it waited: refuse at once
                suspended = self.governance.suspension_for(identity.agent_id, cls.connector, cls.action)
                if suspended is not None:
                    outcome.refusal = suspension_refusal(suspended)
                    return True
        return await self._after_approval(req, outcome, identity, cls, principal, resource, context, bundle, approval)

    def _held_answer(self, outcome, approval, status: int, title: str) -> None:
        approvals = self.approvals
        retry = str(self.config.approvals.retry_after_seconds)
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
        outcome.decision = Decision.HOLD
        outcome.refusal = Refusal(
            status,
            title,
            detail,
            reasons=list(approval.derived.get("policies", [])),
            headers={"Retry-After": retry, "Location": approvals.status_url(approval.id)},
            kind="approval-pending",
            extra={
                "approval_id": approval.id,
                "approval_state": approval.state,
                "status_url": approvals.status_url(approval.id),
                "approval_groups": approval.groups,
                "expires_at": iso(approval.expires_at),
            },
        )

    async def _after_approval(self, req, outcome, identity, cls, principal, resource, context, bundle, approval) -> bool:
        approvals = self.approvals
        policies = list(approval.derived.get("policies", []))
        if approval.state == "pending":
            self._held_answer(outcome, approval, 403, "Approval pending")
            return True
        if approval.state == "denied":
            outcome.refusal = Refusal(
                403, "Approval denied",
                f"{approval.decided_by} denied this request: {approval.reason}",
                reasons=policies, kind="approval-denied",
                extra={"approval_id": approval.id, "approval_state": "denied"},
            )
            return True
        if approval.state != "approved":  # expired (or forwarded by a concurrent retry)
            title = "Approval expired" if approval.state == "expired" else "Already forwarded"
            detail = (
                "nobody approved this request in time; send it again to ask anew"
                if approval.state == "expired"
                else "this approved request was already forwarded once; an approval releases one request"
            )
            outcome.refusal = Refusal(409 if approval.state == "forwarded" else 403, title, detail, reasons=policies,
                                      kind="approval-expired" if approval.state == "expired" else "approval-used",
                                      extra={"approval_id": approval.id, "approval_state": approval.state})
            return True
        # Approved: decide again, with the approval in context (policies may constrain who approved).
        # (the record keeps the request's own inputs and "hold": replay asks whether the
        # request itself would need approval under other policies)
        approved_ctx = dict(context, approval=approvals.cedar_context(approval))
        result = self.policies.authorize(principal, cls.action, resource, approved_ctx, [principal, resource], bundle=bundle)
        outcome.reasons = result.reasons
        if result.errors or not result.allowed:
            # e.g. a policy that constrains who may approve what: the approval stays unused
            why = "; ".join(result.errors) if result.errors else (
                f"forbidden by policy {', '.join(result.reasons)}" if result.reasons else "no policy permits it"
            )
            outcome.refusal = Refusal(
                403, "Denied by policy after approval",
                f"{identity.agent_id} may not {cls.action} on {cls.resource_uid} even with approval {approval.id} "
                f"by {approval.decided_by}: {why}",
                reasons=result.reasons, kind="policy",
                extra={"approval_id": approval.id, "approval_state": approval.state},
            )
            return True
        if req.client_alive is not None and not req.client_alive():
            # The agent hung up while waiting: keep the approval for its retry.
            self._held_answer(outcome, approval, 403, "Approval pending")
            return True
        if self.pre_forward is not None:
            # e.g. the audit trail cannot record it: refuse before claiming, so the
            # approval stays usable for a retry instead of being spent on nothing
            blocked = await self.pre_forward(req.method)
            if blocked is not None:
                outcome.refusal = blocked
                return True
        claimed, approval = await approvals.claim_for_forwarding(approval)
        if not claimed:
            return await self._after_approval(req, outcome, identity, cls, principal, resource, context, bundle, approval)
        outcome.decision = Decision.ALLOW
        outcome.refusal = None
        return True
