"""Approval changes made on other replicas, for this replica's event streams
(`GET /v1/approvals/events`, the console's live updates).

A replica's approval service announces the changes it makes itself. With a store shared by
replicas, an approval can be requested, voted, decided or forwarded on another one: while
at least one stream is open, this replica reads the open and the newest approvals from the
store every `interval` seconds and announces what changed since the last read (a version it
has not seen), named as the change it is (`requested`, `voted`, `escalated`, `approved`,
`denied`, `expired`, `forwarded`, `cancelled`; `updated` for anything else). Changes made
here are seen through the service's listeners and not announced twice (at least once: a
change read from the store just before the service announces it can appear twice; the
console only refreshes on it). Nothing is read while no stream is open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..store import Approval, Store, StoreError

log = logging.getLogger("proctor.control")

OPEN_LIMIT = 500  # pending and approved approvals read per round (the open ones)
NEWEST_LIMIT = 100  # the newest approvals in any state (decided, expired, forwarded lately)


@dataclass(frozen=True, slots=True)
class _Seen:
    version: int
    state: str
    votes: int
    escalated: bool


def _seen(a: Approval) -> _Seen:
    return _Seen(a.version, a.state, len(a.votes), a.escalated)


def change_of(before: _Seen | None, a: Approval) -> str:
    """The event a store change is: what differs between the last version seen and `a`."""
    if before is None:
        return "requested" if a.state == "pending" else a.state
    if a.state != before.state:
        return a.state  # approved, denied, expired, forwarded, cancelled
    if a.escalated and not before.escalated:
        return "escalated"
    if len(a.votes) > before.votes:
        return "voted"
    return "updated"


Listener = Callable[[str, Approval], None]


class ApprovalWatch:
    def __init__(self, store: Store, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.subscribers: list[Listener] = []
        self._seen: dict[str, _Seen] = {}
        self._primed = False
        self._task: asyncio.Task[None] | None = None

    def local(self, event: str, a: Approval) -> None:
        """The approval service's listener: a change made here (announced by the service itself)."""
        known = self._seen.get(a.id)
        if known is None or a.version >= known.version:
            self._seen[a.id] = _seen(a)

    def subscribe(self, listener: Listener) -> None:
        self.subscribers.append(listener)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="proctor-approval-watch")

    def unsubscribe(self, listener: Listener) -> None:
        if listener in self.subscribers:
            self.subscribers.remove(listener)
        if not self.subscribers:
            self.stop()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._primed = False  # (the next stream starts from what the store holds then)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except StoreError as e:
                log.debug("approval watch: the store did not answer: %s", e)
            except Exception:  # noqa: BLE001 - the watch must keep running for the open streams
                log.exception("approval watch failed")
            await asyncio.sleep(self.interval)

    async def poll(self) -> list[tuple[str, Approval]]:
        """One round: the changes since the last one (announced to the subscribers)."""
        found: dict[str, Approval] = {}
        for batch in (await self.store.list_approvals(states=["pending"], limit=OPEN_LIMIT),
                      await self.store.list_approvals(states=["approved"], limit=OPEN_LIMIT),
                      await self.store.list_approvals(limit=NEWEST_LIMIT)):
            for a in batch:
                found[a.id] = a
        changes: list[tuple[str, Approval]] = []
        for a in found.values():
            before = self._seen.get(a.id)
            if before is not None and a.version <= before.version:
                continue
            if self._primed:
                changes.append((change_of(before, a), a))
            self._seen[a.id] = _seen(a)
        # an approval no longer read is closed and old: it will not change again
        for gone in [i for i in self._seen if i not in found]:
            del self._seen[gone]
        self._primed = True
        changes.sort(key=lambda c: c[1].created_at)
        for event, a in changes:
            for listener in list(self.subscribers):
                listener(event, a)
        return changes
