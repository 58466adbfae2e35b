"""Monitor mode: policies decide, nothing is enforced, everything is recorded (docs/governance.md).

In a monitored scope (every request, a connector's, an agent's or an agent group's) the Cedar
decision is computed as always, and so is what it would have become: a plain deny (403),
an approval hold, a claim conflict or a workflow-order conflict (409). Instead of answering
it, the `MonitorGate` keeps it on the exchange (`Exchange.monitored`) and lets the request
go on: it is forwarded, and its decision record, audit event, metrics and trace say what
the answer would have been (docs/decision-record.md, "Monitor mode").

The gate sits right after authorization and settles the policy deny before any stage that
acts on one: no approval is created, looked up, notified or spent for a would-be hold, no
claim conflict or refused workflow step is recorded, and a write through another agent's
claim does not take that claim. What the settling stages would have answered is asked of
them without side effects (their `would_settle`), in the order the chain runs them.

Only Cedar's verdicts are monitored. Everything that refuses before or beside Cedar is
enforced in monitor mode too (and the record still says `monitor: true` for a request in
scope): authentication, the kill switch, malformed or ambiguous requests, egress default
deny, rate limits and budgets (they have their own `shadow: true`), duplicate work,
policy evaluation errors and every fail-closed 503. The reasons are in docs/governance.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.chain import Stage
from ..core.exchange import HOLD_KIND, Exchange
from ..core.model import AgentIdentity, Refusal

log = logging.getLogger("proctor.monitor")

NAME = "monitor"  # the stage's name (its timing key)
HEADER = "Proctor-Monitor"  # on a monitored request's answer: what it would have been
POLICY_KIND = "policy"  # the kind of the authorize stage's pending deny: the only refusal monitored

# What a settling stage would answer the pending deny with (no side effect), else None.
Verdict = Callable[[Exchange], Refusal | None]
GroupsOf = Callable[[AgentIdentity], list[str]]


class MonitorConfigError(ValueError):
    """A monitor scope that names what does not exist (an unknown connector)."""


@dataclass(frozen=True, slots=True)
class MonitorScope:
    """Which requests are monitored: all of them (`everything`), or those of the named
    connectors, agents (by id) and agent groups (as Cedar sees them)."""

    everything: bool = False
    connectors: frozenset[str] = frozenset()
    agents: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, cfg: Any) -> MonitorScope:
        """From the config's `monitor:` section (proxy/config.py MonitorConfig)."""
        return cls(bool(cfg.global_), frozenset(cfg.connectors), frozenset(cfg.agents), frozenset(cfg.groups))

    @property
    def enabled(self) -> bool:
        return self.everything or bool(self.connectors or self.agents or self.groups)

    def covers(self, connector: str | None, identity: AgentIdentity | None, groups_of: GroupsOf | None) -> bool:
        if self.everything:
            return True
        if connector is not None and connector in self.connectors:
            return True
        if identity is None:
            return False
        if identity.agent_id in self.agents:
            return True
        if self.groups and groups_of is not None:
            return any(g in self.groups for g in groups_of(identity))
        return False

    def check_connectors(self, known: Iterable[str]) -> None:
        """Every connector named must be loaded: a typo would leave its connector enforced
        while the operator believes it monitored (or the reverse, once someone adds it)."""
        names = set(known)
        unknown = sorted(self.connectors - names)
        if unknown:
            raise MonitorConfigError(
                f"monitor.connectors names {', '.join(repr(n) for n in unknown)}, which no connector manifest "
                f"declares (known: {', '.join(sorted(names)) or 'none'})")

    def describe(self) -> dict[str, Any]:
        """For /healthz: what is monitored (`enabled` false: everything is enforced)."""
        return {"enabled": self.enabled, "global": self.everything, "connectors": sorted(self.connectors),
                "agents": sorted(self.agents), "groups": sorted(self.groups)}

    def summary(self) -> str:
        if self.everything:
            return "EVERY request (monitor.global)"
        parts = []
        for what, names in (("connectors", self.connectors), ("agents", self.agents), ("agent groups", self.groups)):
            if names:
                parts.append(f"{what} {', '.join(sorted(names))}")
        return "; ".join(parts)

    def banner(self) -> str:
        """The startup warning: what is not enforced."""
        return (
            f"MONITOR MODE: policies are NOT ENFORCED for {self.summary()}. Cedar denies and approval holds "
            "there are recorded and audited as what they would have been (monitor: true, monitored: {...}) and the "
            "request is FORWARDED with the connector's credential. Authentication, the kill switch, malformed "
            "requests, egress default-deny, rate limits, budgets and duplicates are still enforced. "
            "Remove the monitor section to enforce (docs/governance.md, \"Monitor mode\")."
        )


def would_be_status(refusal: Refusal) -> int | None:
    """The status the agent would have got: None for a sync hold (it would have waited for a person)."""
    if refusal.kind == HOLD_KIND and refusal.extra.get("approval_mode") == "sync":
        return None
    return refusal.status


def would_be_decision(refusal: Refusal) -> str:
    return "hold" if refusal.kind == HOLD_KIND else "deny"


class MonitorGate(Stage):
    """Right after authorization, settling its pending deny: in a monitored scope, the deny (or
    what the settling stages would make of it) is kept as `Exchange.monitored` and the request
    goes on. On the way back it marks every exchange in scope (`Exchange.monitor`), refused
    ones included, so each record of the scope carries the flag."""

    name = NAME
    settles_pending = True

    def __init__(self, scope: MonitorScope, groups_of: GroupsOf | None = None,
                 verdicts: Sequence[Verdict] = ()) -> None:
        self.scope = scope
        self.groups_of = groups_of
        self.verdicts = tuple(verdicts)  # the settling stages' would_settle, in chain order

    def _covers(self, ex: Exchange) -> bool:
        cls = ex.classification
        return self.scope.covers(cls.connector if cls is not None else None, ex.identity, self.groups_of)

    def on_request(self, ex: Exchange) -> None:
        pending = ex.pending_refusal
        if pending is None or pending.kind != POLICY_KIND or not self._covers(ex):
            return
        would = pending
        for verdict in self.verdicts:
            settled = verdict(ex)
            if settled is not None:
                would = settled
                break
        ex.monitor = True
        ex.monitored = would
        ex.reasons = list(would.reasons)
        decision = would_be_decision(would)
        ex.policy_decision = decision
        status = would_be_status(would)
        ex.plan.response_headers[HEADER] = f"{decision}; kind={would.kind}" + (
            f"; status={status}" if status is not None else "")
        ex.settle_pending(None)  # not enforced: the request goes on

    def on_response(self, ex: Exchange) -> None:
        if not ex.monitor and self.scope.enabled:
            ex.monitor = self._covers(ex)
