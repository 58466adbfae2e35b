"""Cross-replica wake-ups (docs/deployment.md, "Replicas"): PostgreSQL LISTEN/NOTIFY, with
polling as the fallback that stays in place.

A replica that changes shared state publishes an event (`publish(topic, payload)`); every
replica on the same store (itself included) gets it within milliseconds and acts at once
instead of at its next poll:

- `policy`: the fleet's active policy revision changed (push, rollback, a writer's reload):
  followers load it (proxy/policy/fleet.py);
- `suspensions`: the kill switch changed: the suspension set is re-read;
- `approvals`: an approval was decided (payload: its id): requests held for it wake.

Topics are PostgreSQL channels named after the store's schema (two deployments sharing one
database never hear each other). Payloads are short identifiers, never request data.

Delivery is best effort by design: NOTIFY is not queued for a listener that is
reconnecting, so every consumer keeps its poll (suspension version, approval sweep, policy
watcher); an event only makes the next poll happen now. The listener reconnects with
backoff when its connection drops. On SQLite (one process, or processes sharing one file)
events are delivered in-process only; the other processes poll as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger("proctor.store")

TOPICS = ("policy", "suspensions", "approvals")
_PAYLOAD = re.compile(r"^[A-Za-z0-9_.:-]{0,200}$")
Handler = Callable[[str, str], None]  # (topic, payload)


def channel_name(schema: str, topic: str) -> str:
    """A PostgreSQL channel (an identifier, at most 63 bytes) for a topic of one schema."""
    digest = hashlib.sha256(schema.encode()).hexdigest()[:16]
    return f"proctor_{digest}_{topic}"


class StoreEvents:
    """Publish and receive cross-replica events for one store (see the module docstring)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.handlers: list[Handler] = []
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self.connected = False
        self.received = 0
        self.published = 0

    @property
    def shared(self) -> bool:
        """Events reach other replicas (PostgreSQL); False: in-process only."""
        return getattr(self.store, "kind", "") == "postgresql"

    def subscribe(self, handler: Handler) -> None:
        self.handlers.append(handler)

    def _dispatch(self, topic: str, payload: str) -> None:
        self.received += 1
        for h in list(self.handlers):
            try:
                h(topic, payload)
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the others
                log.exception("store event handler failed (%s)", topic)

    async def publish(self, topic: str, payload: str = "") -> None:
        """Tell every replica (best effort: a failure is logged, the consumers' polls cover it)."""
        if topic not in TOPICS or not _PAYLOAD.match(payload):
            raise ValueError(f"bad store event {topic!r} {payload!r}")
        self.published += 1
        if not self.shared:
            self._dispatch(topic, payload)
            return
        try:
            await self.store.notify(channel_name(self.store.schema, topic), payload)
        except Exception as e:  # noqa: BLE001 - best effort by design
            log.warning("could not publish store event %s: %s (other replicas notice at their next poll)", topic, e)
            self._dispatch(topic, payload)  # (this replica at least)

    # -- the listener (PostgreSQL) ------------------------------------------------------
    def start(self) -> None:
        if self.shared and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
                pass
            self._task = None
        await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None:
            # (terminate, not close: a close waits for the server, which may be the thing that is gone)
            conn.terminate()

    async def _listen(self) -> None:
        channels = {channel_name(self.store.schema, t): t for t in TOPICS}
        delay = 0.5
        while True:
            try:
                conn = await self.store.listener_connection()
                self._conn = conn
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())

                def on_notify(_conn: Any, _pid: int, channel: str, payload: str) -> None:
                    topic = channels.get(channel)
                    if topic is not None:
                        self._dispatch(topic, payload)

                for ch in channels:
                    await conn.add_listener(ch, on_notify)
                self.connected = True
                delay = 0.5
                log.info("listening for store events (%s)", ", ".join(TOPICS))
                # (a replica that missed events while reconnecting catches up at its polls)
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 15)
                    except asyncio.TimeoutError:
                        # a cheap liveness check: a half-open connection would wait forever
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
                raise ConnectionError("the listener connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - reconnect with backoff
                if self.connected:
                    log.warning("store event listener lost (%s); reconnecting, polling meanwhile", e)
                await self._drop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
