"""Claims (leases) on resources: the records and the one rule both backends apply.

A claim is held by one agent on one resource (connector + resource uid) until
`expires_at`. `exclusive` claims exclude every other agent; `shared` claims
coexist with other shared claims but not with an exclusive one. Expired rows
are free: they are ignored when deciding and deleted by the next change.

Both backends run `decide` inside one transaction that first locks the
resource's fence row (SQLite: BEGIN IMMEDIATE; PostgreSQL: an upsert on the
fence row, which row-locks it), so the read-decide-write is atomic across
processes and replicas without any per-process lock. The fence counter is
bumped whenever the set of holders gains an agent (a new holder), so an
upstream or an operator can tell one tenure from the next.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CLAIM_MODES = ("exclusive", "shared")
CLAIM_COLUMNS = "id, connector, resource, holder, holder_groups, mode, since, expires_at, fence"


@dataclass
class Claim:
    id: str  # "clm_" + random; new for every tenure (a renewal keeps it)
    connector: str
    resource: str  # the Cedar resource uid, e.g. Incident::"INC001"
    holder: str  # agent id
    holder_groups: list[str]
    mode: str  # exclusive | shared
    since: float  # epoch seconds: when this tenure began
    expires_at: float
    fence: int  # the resource's fence value when this tenure began

    def live(self, now: float) -> bool:
        return self.expires_at > now


@dataclass
class ClaimOutcome:
    """What an acquire attempt did: `acquired` (new tenure or renewal) with `claim` the
    caller's own, or refused with `claim` the conflicting holder's."""

    acquired: bool
    claim: Claim
    renewed: bool = False  # acquired by a holder that already held it


def new_claim_id() -> str:
    return "clm_" + secrets.token_urlsafe(15)


def check_mode(mode: str) -> None:
    if mode not in CLAIM_MODES:
        raise ValueError(f"claim mode must be one of {', '.join(CLAIM_MODES)}, not {mode!r}")


def conflicting(claims: list[Claim], agent: str, mode: str, now: float) -> Claim | None:
    """The live claim of another agent that stops `agent` from holding in `mode`, if any
    (an exclusive one first: it is the one the agent has to wait for)."""
    others = [c for c in claims if c.live(now) and c.holder != agent]
    if not others:
        return None
    exclusive = [c for c in others if c.mode == "exclusive"]
    if exclusive:
        return min(exclusive, key=lambda c: c.since)
    if mode == "exclusive":
        return min(others, key=lambda c: c.since)
    return None


def decide(claims: list[Claim], fence: int, *, connector: str, resource: str, agent: str, groups: list[str],
           mode: str, ttl: float, now: float) -> tuple[ClaimOutcome, int]:
    """The outcome of `agent` acquiring (or renewing) in `mode` given the rows on the resource,
    and the fence value to store. Pure: the backends persist what it returns."""
    check_mode(mode)
    blocker = conflicting(claims, agent, mode, now)
    if blocker is not None:
        return ClaimOutcome(False, blocker), fence
    mine = next((c for c in claims if c.holder == agent and c.live(now)), None)
    if mine is not None:
        mine.expires_at = max(mine.expires_at, now + ttl)
        mine.mode = mode
        mine.holder_groups = list(groups)
        return ClaimOutcome(True, mine, renewed=True), fence
    fence += 1  # a new holder: a new tenure
    claim = Claim(new_claim_id(), connector, resource, agent, list(groups), mode, now, now + ttl, fence)
    return ClaimOutcome(True, claim), fence


def hand_over(claim: Claim, fence: int, *, to: str, groups: list[str], now: float,
              ttl: float | None) -> tuple[Claim, int]:
    """The claim `to` holds after `claim` is transferred to it (a handoff or an operator's
    transfer), and the fence value to store. A transfer is a new tenure: new id, the fence
    bumped, `since` now; it keeps the mode and, without `ttl`, the old expiry (a transfer
    neither extends nor shortens the lease unless asked). Transferring to the holder
    itself changes nothing. Pure: the backends persist what it returns."""
    if to == claim.holder:
        return claim, fence
    fence += 1
    expires = claim.expires_at if ttl is None else now + ttl
    return Claim(new_claim_id(), claim.connector, claim.resource, to, list(groups), claim.mode, now,
                 expires, fence), fence


def claim_from_row(row: Sequence[Any]) -> Claim:
    r = list(row)
    groups = r[4]
    return Claim(
        id=str(r[0]), connector=str(r[1]), resource=str(r[2]), holder=str(r[3]),
        holder_groups=list(json.loads(groups) if isinstance(groups, str) else groups or []),
        mode=str(r[5]), since=float(r[6]), expires_at=float(r[7]), fence=int(r[8]),
    )
