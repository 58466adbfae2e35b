"""Agent registry and kill switch.

- **Registry**: every agent seen (first/last seen, request counts) or
  pre-registered (owner, team, description). Activity is counted in memory and
  flushed to the store once a second in one batch, so the request path never
  waits on the store for bookkeeping.
- **Suspensions**: an agent, a connector or a single action can be suspended.
  The check is an in-memory lookup on every request; a suspension made on this
  process applies to the very next request (and wakes requests held for
  approval), one made on another replica within `refresh_seconds` (the store's
  suspension version is polled). Suspensions live in the store, so they survive
  a restart; if the store cannot be read at startup the proxy does not start.
  A suspension is acknowledged only once the store has committed it durably.
- **A store in trouble refuses.** While the store is lost (its file deleted or
  replaced) or down (its last check failed), the in-memory set cannot be
  trusted to match what operators decided (another replica may have suspended
  someone; a fresh file would have no suspensions at all), so every check
  raises StoreError and the request is refused as fail-closed (503). After the
  store recovers, requests stay refused until the set has been re-read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from ..core.model import Classification, Refusal
from ..record.decisions import iso
from ..store import AgentRecord, Store, StoreError, Suspension

log = logging.getLogger("proctor.governance")

KINDS = ("agent", "connector", "action")


@dataclass(frozen=True)
class Registration:
    id: str
    owner: str = ""
    team: str = ""
    description: str = ""


def suspension_refusal(s: Suspension) -> Refusal:
    what = {"agent": "agent", "connector": "connector", "action": "action"}[s.kind]
    return Refusal(
        403,
        f"Suspended {what}",
        f"the {what} {s.target!r} is suspended since {iso(s.since)} by {s.by}: {s.reason}",
        reasons=[f"suspended:{s.kind}:{s.target}"],
        kind="suspended",
        extra={"suspended": {"kind": s.kind, "target": s.target, "since": iso(s.since), "by": s.by, "reason": s.reason}},
    )


class Governance:
    def __init__(self, store: Store, refresh_seconds: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._suspended: dict[tuple[str, str], Suspension] = {}
        self._version = -1
        self._activity: dict[str, list] = {}  # agent -> [first, last, requests, allowed, denied]
        self.on_change: list[Callable[[], None]] = []  # e.g. wake requests held for approval
        self.flush_failures = 0
        # Bumped by every local suspend/resume: a refresh whose store read started
        # before one of them must not apply its (stale) list.
        self._local_changes = 0
        # Set while the store had a problem: cleared only by a full re-read of the suspensions.
        self._stale = False
        self._refresh_error: str | None = None  # why the last background refresh failed

    # -- startup ----------------------------------------------------------------------
    async def load(self, registrations: list[Registration] = ()) -> None:
        for r in registrations:
            await self.store.upsert_agent(AgentRecord(id=r.id, owner=r.owner, team=r.team, description=r.description))
        await self.refresh(force=True)

    @property
    def stale(self) -> bool:
        """True while the suspension set waits to be re-read after a store problem (requests refused)."""
        return self._stale

    @property
    def stale_reason(self) -> str | None:
        if not self._stale:
            return None
        if self._refresh_error is not None:
            return f"suspensions cannot be read from the state store: {self._refresh_error}"
        return "the state store recovered and the suspensions are being re-read"

    # -- the request path -----------------------------------------------------------------
    def _require_trusted(self) -> None:
        """Fail closed while the suspension set may not match the store (see module doc)."""
        problem = getattr(self.store, "problem", None)
        if problem is not None:
            self._stale = True
            raise StoreError(f"suspensions cannot be checked: {problem}")
        if self._stale:
            raise StoreError(f"suspensions cannot be checked: {self.stale_reason}")

    def agent_suspension(self, agent_id: str) -> Suspension | None:
        self._require_trusted()
        if not self._suspended:
            return None
        return self._suspended.get(("agent", agent_id))

    def target_suspension(self, cls: Classification) -> Suspension | None:
        self._require_trusted()
        if not self._suspended:
            return None
        return self._suspended.get(("connector", cls.connector)) or self._suspended.get(("action", cls.action))

    def suspension_for(self, agent_id: str, connector: str, action: str) -> Suspension | None:
        self._require_trusted()
        if not self._suspended:
            return None
        return (
            self._suspended.get(("agent", agent_id))
            or self._suspended.get(("connector", connector))
            or self._suspended.get(("action", action))
        )

    def seen(self, agent_id: str, allowed: bool) -> None:
        now = self.clock()
        a = self._activity.get(agent_id)
        if a is None:
            self._activity[agent_id] = [now, now, 1, 1 if allowed else 0, 0 if allowed else 1]
        else:
            a[1] = now
            a[2] += 1
            if allowed:
                a[3] += 1
            else:
                a[4] += 1

    # -- operators ---------------------------------------------------------------------
    async def suspend(self, kind: str, target: str, by: str, reason: str) -> Suspension:
        """Returns once the suspension is durably committed (StoreError otherwise: not suspended)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        s = Suspension(kind=kind, target=target, since=self.clock(), by=by, reason=reason)
        await self.store.suspend(s)
        self._local_changes += 1
        self._suspended[(kind, target)] = s  # effective here at once, before any refresh
        log.warning("suspended %s %r by %s: %s", kind, target, by, reason)
        self._changed()
        return s

    async def resume(self, kind: str, target: str, by: str) -> bool:
        removed = await self.store.resume(kind, target)
        self._local_changes += 1
        self._suspended.pop((kind, target), None)
        if removed:
            log.warning("resumed %s %r by %s", kind, target, by)
        self._changed()
        return removed

    def suspensions(self) -> list[Suspension]:
        return sorted(self._suspended.values(), key=lambda s: (s.kind, s.target))

    def _changed(self) -> None:
        for hook in list(self.on_change):
            try:
                hook()
            except Exception:
                log.exception("suspension hook failed")

    # -- background ----------------------------------------------------------------------
    async def refresh(self, force: bool = False) -> None:
        if getattr(self.store, "problem", None) is not None:
            self._stale = True  # whatever is read now may not be what operators decided
        force = force or self._stale
        started_with = self._local_changes
        version = await self.store.suspensions_version()
        if not force and version == self._version:
            return
        current = {(s.kind, s.target): s for s in await self.store.list_suspensions()}
        if self._local_changes != started_with:
            return  # a local change landed meanwhile: this list may predate it; the next refresh re-reads
        added = current.keys() - self._suspended.keys()
        self._suspended = current
        self._version = version
        if getattr(self.store, "problem", None) is None:
            self._stale = False
        if added:
            self._changed()

    async def flush(self) -> None:
        if not self._activity:
            return
        batch, self._activity = self._activity, {}
        try:
            await self.store.record_agent_activity({k: tuple(v) for k, v in batch.items()})
        except Exception:
            self.flush_failures += 1
            # keep the counts for the next attempt rather than lose them
            for k, v in batch.items():
                a = self._activity.get(k)
                if a is None:
                    self._activity[k] = v
                else:
                    a[0] = min(a[0], v[0])
                    a[1] = max(a[1], v[1])
                    a[2] += v[2]
                    a[3] += v[3]
                    a[4] += v[4]
            raise

    async def run(self) -> None:
        """Poll suspensions (other replicas) and flush activity, for the life of the proxy."""
        last_flush = 0.0
        refresh_failing = False
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
                refresh_failing = False
                self._refresh_error = None
            except Exception as e:
                self._stale = True  # the set may be missing changes made meanwhile
                self._refresh_error = str(e)
                if not refresh_failing:  # once per outage, not twice a second
                    log.error("could not refresh suspensions from the store (requests are refused until it "
                              "answers again): %s", e)
                refresh_failing = True
            # (while the store is in trouble the counts wait in memory: no error every second)
            if time.monotonic() - last_flush >= 1.0 and getattr(self.store, "problem", None) is None:
                last_flush = time.monotonic()
                try:
                    await self.flush()
                except Exception:
                    log.exception("could not record agent activity (will retry)")
