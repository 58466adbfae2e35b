"""Claims (leases) on resources, as three stages on the request path (docs/coordination.md).

A route that declares `claim:` in its connector manifest makes every write
(non-safe method) on it claim the request's resource, keyed by connector and
Cedar resource uid. The decision is split so that policy sees the claim and
the store stays the only arbiter:

1. `ClaimCheck` (before authorization) reads the live claims on the resource
   and puts `context.claim` into the Cedar context (always, on claim-bearing
   routes): held, holder, holder_groups, mine, mode, since, expires_at, write,
   conflict. Nothing is written: a request that policy denies never claims.
2. `ClaimConflict` (right after authorization, settling its pending deny): a
   deny decided only by `@claim("conflict")` policies (the bundled
   `claim-held-by-another-agent`) is answered 409 with the holder, since,
   until and `Retry-After`, instead of a plain 403.
3. `ClaimAcquire` (after approval and credential injection, right before the
   audit gate): the atomic acquire-or-renew-or-report in the store. Two agents
   that both passed the check race here; the store lets exactly one hold, the
   other gets the same 409. A write that policy allowed *through* another
   agent's claim (a supervisor rule) is forwarded without taking the claim.

A store that cannot be reached raises StoreError, which the chain answers 503
(fail closed) on claim-bearing routes only: other routes never touch it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..connectors.manifest import ClaimSpec
from ..core.chain import Stage
from ..core.exchange import Exchange
from ..core.model import AgentIdentity, Refusal
from ..policy.stage import CONTEXT_EXTRA, EVALUATION, PolicyEvaluation
from ..record.model import ClaimEvent
from ..store.claims import Claim, ClaimOutcome, conflicting

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
CLAIM_KIND = "claim-conflict"  # Refusal.kind of a 409 for a claim held by another agent
CLAIM_ANNOTATION = "claim"  # @claim("conflict") marks the policies that turn a deny into a 409
STATE = "claims"  # stage_data key of the ClaimState
TAKEN = "claim-acquire"  # stage_data key: the claim this request newly took (released if it is not forwarded)

# Holders that are people, not agents (proxy/coordination/handoff.py): a claim handed to a
# human group's inbox is held by "group:<name>", one a person took by "human:<id>". An agent
# whose id starts so could pass for them, so its writes on claim-bearing routes are refused.
HUMAN_QUEUE = "group:"
HUMAN_HOLDER = "human:"
RESERVED_HOLDERS = (HUMAN_QUEUE, HUMAN_HOLDER)

GroupsOf = Callable[[AgentIdentity], list[str]]
RecordEvent = Callable[[ClaimEvent], None]  # DecisionRecorder.write: decisions.jsonl and the OCSF trail


def _no_record(_event: ClaimEvent) -> None:
    return None


def conflict_event(claim: Claim, agent: str, decision_id: str, now: float) -> ClaimEvent:
    """A write refused (409) by another agent's claim: `holder` kept it, `by` was refused."""
    return ClaimEvent.of("conflict", claim, now, by=agent, fence=claim.fence, decision_id=decision_id)


class ClaimObserver:
    """What the claim stages report (metrics); the default reports nothing."""

    def conflict(self, connector: str) -> None:
        return None

    def acquired(self, connector: str, renewed: bool) -> None:
        return None


@dataclass(slots=True)
class ClaimState:
    """What ClaimCheck found, for the stages after authorization."""

    spec: ClaimSpec
    connector: str
    resource: str
    write: bool
    groups: list[str]
    blocker: Claim | None  # another agent's live claim this write conflicts with
    mine: Claim | None = None  # this agent's live claim on the resource, when it holds one


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def claim_context(claims: list[Claim], agent: str, spec: ClaimSpec, write: bool,
                  blocker: Claim | None) -> dict[str, Any]:
    """context.claim: the claim that matters to this agent (the conflicting one, else its
    own, else the oldest), with defaults when nobody holds the resource."""
    mine = next((c for c in claims if c.holder == agent), None)
    shown = blocker or mine or (claims[0] if claims else None)
    return {
        "held": bool(claims),
        "holder": shown.holder if shown else "",
        "holder_groups": list(shown.holder_groups) if shown else [],
        "mine": mine is not None,
        "mode": shown.mode if shown else spec.mode,
        "since": int(shown.since) if shown else 0,
        "expires_at": math.ceil(shown.expires_at) if shown else 0,
        "write": write,
        "conflict": blocker is not None,
    }


def conflict_refusal(claim: Claim, now: float, reasons: list[str], raced: bool = False) -> Refusal:
    """409 naming the holder, since and until, with Retry-After (seconds until expiry)."""
    retry = max(1, math.ceil(claim.expires_at - now))
    how = ("another agent claimed it a moment before this request (it lost the race)" if raced
           else f"claimed ({claim.mode}) by agent {claim.holder!r}")
    return Refusal(
        409,
        "Conflict: the resource is claimed by another agent",
        f"{claim.resource} is {how} since {_iso(claim.since)} until {_iso(claim.expires_at)}; "
        f"writes by other agents are refused until the claim expires or is released. Retry after "
        f"{retry} seconds, work on another record, or ask an operator to release claim {claim.id}.",
        reasons=reasons,
        headers={"Retry-After": str(retry)},
        kind=CLAIM_KIND,
        extra={"claim": {
            "id": claim.id,
            "connector": claim.connector,
            "resource": claim.resource,
            "holder": claim.holder,
            "mode": claim.mode,
            "since": _iso(claim.since),
            "until": _iso(claim.expires_at),
            "retry_after": retry,
        }},
    )


class ClaimCheck(Stage):
    """Before authorization: read the claim state into `context.claim` (no write)."""

    name = "claims"

    def __init__(self, store: Any, groups_of: GroupsOf, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.groups_of = groups_of
        self.clock = clock

    async def on_request(self, ex: Exchange) -> None:
        cls, req, identity = ex.classification, ex.request, ex.identity
        spec = getattr(cls.spec, "claim", None) if cls is not None else None
        if spec is None or cls is None or req is None or identity is None:
            return
        agent = identity.agent_id
        write = req.method not in SAFE_METHODS
        if write and agent.startswith(RESERVED_HOLDERS):
            ex.refuse(Refusal(403, "Agent id reserved", f"agent ids starting {' or '.join(RESERVED_HOLDERS)} name "
                              "people holding claims; this agent cannot write on claim-bearing routes",
                              reasons=[], kind="claim-reserved-holder"))
            return
        now = self.clock()
        resource = cls.resource_uid
        claims = await self.store.claims_on(cls.connector, resource, now)
        blocker = conflicting(claims, agent, spec.mode, now) if write else None
        extra = ex.stage_data.setdefault(CONTEXT_EXTRA, {})
        extra["claim"] = claim_context(claims, agent, spec, write, blocker)
        mine = next((c for c in claims if c.holder == agent), None) if write else None
        ex.stage_data[STATE] = ClaimState(spec, cls.connector, resource, write, self.groups_of(identity), blocker,
                                          mine)


class ClaimConflict(Stage):
    """Right after authorization: a deny decided only by @claim("conflict") policies is a 409."""

    name = "claim-conflict"
    settles_pending = True

    def __init__(self, observer: ClaimObserver | None = None, clock: Callable[[], float] = time.time,
                 record: RecordEvent = _no_record) -> None:
        self.observer = observer or ClaimObserver()
        self.clock = clock
        self.record = record

    def _blocker(self, ex: Exchange) -> Claim | None:
        """The claim that makes the pending deny a 409 (a deny decided only by @claim("conflict")
        policies on a write another agent's claim blocks), else None."""
        state: ClaimState | None = ex.stage_data.get(STATE)
        pending = ex.pending_refusal
        if state is None or state.blocker is None or pending is None or not pending.reasons:
            return None
        evaluation: PolicyEvaluation | None = ex.stage_data.get(EVALUATION)
        if evaluation is None:
            return None
        policies = evaluation.bundle.policies
        if all(pid in policies and policies[pid].annotations.get(CLAIM_ANNOTATION) == "conflict"
               for pid in pending.reasons):
            return state.blocker
        return None

    def would_settle(self, ex: Exchange) -> Refusal | None:
        """The 409 this stage would answer, with no side effect (monitor mode: proxy/policy/monitor.py)."""
        blocker = self._blocker(ex)
        if blocker is None or ex.pending_refusal is None:
            return None
        return conflict_refusal(blocker, self.clock(), list(ex.pending_refusal.reasons))

    def on_request(self, ex: Exchange) -> None:
        blocker = self._blocker(ex)
        if blocker is None:
            return
        state: ClaimState = ex.stage_data[STATE]
        pending = ex.pending_refusal
        assert pending is not None
        self.observer.conflict(state.connector)
        now = self.clock()
        if ex.identity is not None:
            self.record(conflict_event(blocker, ex.identity.agent_id, ex.decision_id, now))
        ex.settle_pending(conflict_refusal(blocker, now, list(pending.reasons)))


class ClaimAcquire(Stage):
    """After every other decision, before the audit gate: acquire or renew atomically; the
    store is the arbiter between agents that passed the check together."""

    name = "claim-acquire"

    def __init__(self, store: Any, observer: ClaimObserver | None = None,
                 clock: Callable[[], float] = time.time, record: RecordEvent = _no_record) -> None:
        self.store = store
        self.observer = observer or ClaimObserver()
        self.clock = clock
        self.record = record

    async def on_request(self, ex: Exchange) -> None:
        state: ClaimState | None = ex.stage_data.get(STATE)
        if state is None or not state.write or state.spec.acquire != "implicit":
            return
        if state.blocker is not None:
            return  # policy allowed this write through another agent's claim: it stays theirs
        assert ex.identity is not None
        now = self.clock()
        agent, ttl = ex.identity.agent_id, float(state.spec.ttl_seconds)
        outcome: ClaimOutcome | None = None
        if state.mine is not None:
            # the holder's renewal (most writes on a claimed record): one statement, no fence lock
            renewed = await self.store.renew_claim(state.mine.id, agent=agent, groups=state.groups,
                                                   mode=state.spec.mode, ttl=ttl, now=now)
            if renewed is not None:
                outcome = ClaimOutcome(True, renewed, renewed=True)
        if outcome is None:
            outcome = await self.store.acquire_claim(
                connector=state.connector, resource=state.resource, agent=agent, groups=state.groups,
                mode=state.spec.mode, ttl=ttl, now=now,
            )
        if not outcome.acquired:
            self.observer.conflict(state.connector)
            self.record(conflict_event(outcome.claim, ex.identity.agent_id, ex.decision_id, now))
            ex.refuse(conflict_refusal(outcome.claim, now, [], raced=True))
            return
        self.observer.acquired(state.connector, outcome.renewed)
        c = outcome.claim
        if not outcome.renewed:
            ex.stage_data[TAKEN] = c
            # (a new tenure only: renewals are every write of the holder, and add nothing)
            self.record(ClaimEvent.of("acquired", c, now, fence=c.fence, decision_id=ex.decision_id))
        ex.plan.response_headers["Proctor-Claim"] = (
            f"{c.id}; mode={c.mode}; fence={c.fence}; expires={_iso(c.expires_at)}"
        )

    def on_response(self, ex: Exchange) -> Awaitable[None] | None:
        # A stage after this one (the audit gate, say) refused: the write was never forwarded,
        # so a claim it newly took is given back. (A renewal is left as it is: the holder
        # holds it anyway.) A forwarded write keeps its claim, whatever the upstream answered.
        # (a plain method: only that case has anything to await)
        taken: Claim | None = ex.stage_data.pop(TAKEN, None)
        if taken is not None and ex.refusal is not None:
            return self._release(taken.id)
        return None

    async def _release(self, claim_id: str) -> None:
        await self.store.release_claim(claim_id)

