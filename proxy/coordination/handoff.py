"""Handoffs: a forwarded write on a `handoff:` route moves the resource's claim to the agent
or human group the request names (docs/coordination.md, "Handoffs"; the declaration is
proxy/coordination/handoff_spec.py).

`ClaimHandoff` acts on the way back, only once the upstream answered 2xx: a reassignment
the upstream refused must not move anything. The move is one store transaction
(`Store.transfer_claim`: the old tenure ends, the new one starts, the fence is bumped),
so no agent on any replica ever sees the resource free in between.

A handoff to people is a claim held by the pseudo-holder `group:<name>` (HUMAN_QUEUE):
agents' writes get 409 naming the group, the group's inbox lists it
(`GET /v1/claims/inbox`), a member takes it (the holder becomes `human:<id>`) or
releases it. Every handoff is recorded (a `claim` event with both parties: decisions.jsonl
and the OCSF audit trail), counted, and announced to the webhook hooks subscribed to
`handoff` (HandoffObserver).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from ..core.chain import Stage
from ..core.exchange import Exchange
from ..record.model import ClaimEvent
from ..store import StoreError
from ..store.claims import Claim
from .claims import HUMAN_HOLDER, HUMAN_QUEUE, RESERVED_HOLDERS, SAFE_METHODS, STATE, ClaimState
from .handoff_spec import HandoffSpec

log = logging.getLogger("proctor.coordination")

# A handoff the store could not take when the 2xx came back (the reassignment already
# happened upstream) is retried off the request path after these delays, then given up
# loudly: the claim stays with its holder until an operator moves it.
RETRY_DELAYS: tuple[float, ...] = (0.5, 2.0, 8.0)

__all__ = ["HUMAN_HOLDER", "HUMAN_QUEUE", "ClaimHandoff", "HandoffObserver", "HandoffReporter"]


def queue_holder(group: str) -> str:
    return HUMAN_QUEUE + group


def is_queue(holder: str) -> bool:
    return holder.startswith(HUMAN_QUEUE)


def handoff_target(spec: HandoffSpec, params: dict[str, Any], fields: dict[str, Any]) -> tuple[str, bool] | None:
    """(holder, to people?) named by the request, or None when it names nobody: the agent
    value first, else the group value (a human group's inbox, or an agent id)."""
    def value(name: str | None) -> str | None:
        if name is None:
            return None
        v = fields.get(name, params.get(name))
        v = v.strip() if isinstance(v, str) else None
        # (a value naming a pseudo-holder would skip the human_groups rule: it names nobody)
        return v if v and not v.startswith(RESERVED_HOLDERS) else None

    agent = value(spec.to.agent)
    if agent is not None:
        return agent, False
    group = value(spec.to.group)
    if group is None:
        return None
    if spec.is_human(group):
        return queue_holder(group), True
    return group, False


class HandoffObserver:
    """What a handoff reports beyond the record (metrics, webhooks); the default nothing."""

    def handoff(self, connector: str, kind: str, event: ClaimEvent) -> None:
        return None


class HandoffReporter(HandoffObserver):
    """Counts handoffs (`proctor_claim_handoffs_total{connector,to}`, to: agent | human) and
    queues the `handoff` webhook (approvals.notify.Notifier; off the request path)."""

    def __init__(self, metrics: Any, notifier: Any = None) -> None:
        self.handoffs = Counter(
            "proctor_claim_handoffs",
            "Claims moved by a handoff route, by connector and target (agent, or human: a group's inbox).",
            ["connector", "to"],
            registry=metrics.registry,
        )
        self.notifier = notifier

    def handoff(self, connector: str, kind: str, event: ClaimEvent) -> None:
        self.handoffs.labels(connector, kind).inc()
        if self.notifier is not None:
            self.notifier.notify_handoff(event.to_dict())


class ClaimHandoff(Stage):
    """On the way back from a 2xx write on a handoff route: move the claim (see module doc)."""

    name = "claim-handoff"

    def __init__(self, store: Any, record: Callable[[ClaimEvent], None],
                 observer: HandoffObserver | None = None, clock: Callable[[], float] = time.time,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS) -> None:
        self.store = store
        self.record = record
        self.observer = observer or HandoffObserver()
        self.clock = clock
        self.retry_delays = retry_delays
        self.failures = 0  # handoffs given up after every retry (the claim stayed where it was)
        self._retries: set[asyncio.Task[None]] = set()

    def on_response(self, ex: Exchange) -> Awaitable[None] | None:
        # (a plain method: only a 2xx write on a handoff route has anything to await)
        cls, req, resp = ex.classification, ex.request, ex.response
        spec: HandoffSpec | None = getattr(cls.spec, "handoff", None) if cls is not None else None
        if spec is None or cls is None or req is None or resp is None or req.method in SAFE_METHODS:
            return None
        status = resp.upstream_status
        if ex.refusal is not None or not ex.forwardable or status is None or not 200 <= status < 300:
            return None
        target = handoff_target(spec, cls.params, cls.fields)
        state: ClaimState | None = ex.stage_data.get(STATE)
        if target is None or state is None or ex.identity is None:
            return None
        return self._hand_off(_Handoff(ex.identity.agent_id, ex.decision_id, spec, state, target[0], target[1]))

    async def _hand_off(self, h: "_Handoff") -> None:
        try:
            await self._move(h)
        except StoreError as e:
            # The upstream already did the reassignment and the agent gets its answer as is;
            # the claim catches up in the background.
            log.warning("decision %s: handoff of %s to %s not recorded yet (state store: %s); retrying",
                        h.decision_id, h.state.resource, h.to, e)
            task = asyncio.get_running_loop().create_task(self._retry(h))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _retry(self, h: "_Handoff") -> None:
        for delay in self.retry_delays:
            await asyncio.sleep(delay)
            try:
                await self._move(h)
                return
            except StoreError as e:
                last = e
        self.failures += 1
        log.error("decision %s: handoff of %s to %s could not be recorded (state store: %s); the claim stays "
                  "with its holder: move it with `proctor claims transfer CLAIM --to %s`",
                  h.decision_id, h.state.resource, h.to, last if self.retry_delays else "no retries", h.to)

    async def _move(self, h: "_Handoff") -> None:
        agent, state, to, human = h.agent, h.state, h.to, h.human
        now = self.clock()
        claims = await self.store.claims_on(state.connector, state.resource, now)
        # the requester's own claim; or, when policy let it write through another agent's
        # claim (a supervisor reassigning), that claim: the reassignment moves the work
        claim: Claim | None = next((c for c in claims if c.holder == agent), None) or state.blocker
        if claim is None or claim.holder == to:
            return
        ttl = float((h.spec.human_ttl_seconds if human else None) or h.spec.ttl_seconds or state.spec.ttl_seconds)
        groups = [to[len(HUMAN_QUEUE):]] if human else []
        # (by claim id: a claim that expired meanwhile, and was taken anew, is not moved)
        moved = await self.store.transfer_claim(claim.id, to=to, groups=groups, now=now, ttl=ttl)
        if moved is None:  # released or expired meanwhile: nothing to hand off
            return
        old, new = moved
        event = ClaimEvent.of(
            "handoff", old, now, to=None if human else new.holder, to_queue=new.holder_groups[0] if human else None,
            by=agent, new_claim_id=new.id, fence=new.fence, decision_id=h.decision_id,
        )
        log.info("claim %s on %s handed off from %s to %s by %s", old.id, old.resource, old.holder, new.holder, agent)
        self.record(event)
        self.observer.handoff(state.connector, "human" if human else "agent", event)


@dataclass(frozen=True, slots=True)
class _Handoff:
    """One handoff to make: what the request named, kept for a retry."""

    agent: str
    decision_id: str
    spec: HandoffSpec
    state: ClaimState
    to: str
    human: bool
