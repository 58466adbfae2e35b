"""Who acts on which cross-replica event (proxy/store/events.py), for one running proxy.

- `policy` (the fleet's active revision changed): a store-mode replica follows it now;
- `suspensions` (the kill switch changed): the suspension set is re-read now, and held
  requests re-check it;
- `approvals` (an approval was decided; its id): the requests held for it on this replica
  wake and read it.

Publishing: approval decisions (the approvals service's listeners), kill-switch changes
(`announce_suspensions`, called by the control API), and policy activations (FleetPolicy).
Each consumer keeps its poll as the fallback; an event only brings the next look forward.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .store.events import StoreEvents

if TYPE_CHECKING:
    from .server import ProctorRuntime

log = logging.getLogger("proctor")

DECIDED = ("approved", "denied", "expired")


class _Coalesced:
    """Run `work` now, or once more right after the run in progress (never two at once)."""

    def __init__(self, name: str, work: Callable[[], Awaitable[Any]]) -> None:
        self.name = name
        self.work = work
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def trigger(self) -> None:
        if self._task is not None:
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self.work()
                except Exception as e:  # noqa: BLE001 - the poll catches up
                    log.warning("%s after a store event failed: %s", self.name, e)
                if not self._again:
                    return
        finally:
            self._task = None


def install(runtime: "ProctorRuntime") -> StoreEvents:
    """Create the runtime's event bus, subscribe the consumers, hook the publishers; start listening."""
    events = StoreEvents(runtime.store)
    fleet = runtime.fleet
    follow = _Coalesced("following the fleet's policy", fleet.tick) if fleet is not None else None
    refresh = _Coalesced("re-reading the kill switch", runtime.governance.refresh) \
        if runtime.governance is not None else None
    approvals = runtime.approvals

    def on_event(topic: str, payload: str) -> None:
        if topic == "policy" and follow is not None and fleet is not None and fleet.mode == "store":
            follow.trigger()
        elif topic == "suspensions" and refresh is not None:
            refresh.trigger()
        elif topic == "approvals" and approvals is not None and payload:
            approvals.wake(payload)

    events.subscribe(on_event)
    if approvals is not None:
        def decided(event: str, approval: Any) -> None:
            if event in DECIDED:
                asyncio.get_running_loop().create_task(events.publish("approvals", approval.id))

        approvals.listeners.append(decided)
    if fleet is not None:
        fleet.events = events
    events.start()
    return events
