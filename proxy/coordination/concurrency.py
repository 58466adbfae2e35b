"""Optimistic concurrency: writes on `if_match` routes carry the ETag the agent last saw
(docs/coordination.md, "Optimistic concurrency (If-Match)").

One stage, `IfMatch` ("if-match"), placed after the idempotency check (so it sees
only requests policy allowed and nothing answers locally any more):

- **Remember.** On every route of a connector whose path is an `if_match` route's
  path (the GET of the record, the writes themselves), the strong `ETag` of a
  forwarded request's answer (2xx, or 304 to a GET / HEAD) is stored for
  (connector, resource uid, agent). An answer without a usable one (none, weak
  `W/"..."`, malformed) and a 2xx DELETE, 404 or 410 forget what was stored: the
  agent's view is then unknown. Other answers leave it as it was.
- **Send.** A write on an `if_match` route is forwarded with `If-Match: <etag>` when
  one is stored for this agent and record, unless the agent sent a precondition of
  its own (`If-Match`, `If-None-Match`, `If-Unmodified-Since`): those pass untouched.
  The header is Proctor's, like the injected credential: approval and
  Idempotency-Key fingerprints are taken over the agent's request, without it.
- **Explain.** An upstream 412 to a write Proctor added If-Match to becomes a 409
  `resource-changed` problem saying the record changed since the agent read it, and
  to read it again and reapply the change. The stored ETag stays (it is stale): a
  blind retry gets the same 409, the next read replaces it. A 412 to the agent's
  own precondition passes through unchanged.

A store that cannot be reached on the way in raises StoreError, which the chain
answers 503 (fail closed) on `if_match` writes only; on the way back a failure is
logged and the agent's answer stands.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..config import ConcurrencyConfig
from ..core.chain import Stage
from ..core.exchange import Exchange
from ..core.model import Refusal
from ..store.etags import MAX_ETAG_LENGTH, SeenETag
from .concurrency_spec import SAFE_METHODS, template_key

log = logging.getLogger("proctor.coordination")

NAME = "if-match"  # the stage, and its stage_data key
KIND = "resource-changed"  # Refusal.kind of the 409 that replaces an upstream 412
REASON = "upstream-precondition-failed"
PRECONDITIONS = ("if-match", "if-none-match", "if-unmodified-since")  # the agent's own: left alone
PRECONDITION_FAILED = 412
READS = frozenset({"GET", "HEAD"})
# A strong entity-tag (RFC 9110 §8.8.3): DQUOTE *etagc DQUOTE, visible ASCII but '"'.
# Weak ones (W/"...") cannot be used with If-Match (strong comparison); obs-text is not kept.
_STRONG_ETAG = re.compile(r'"[\x21\x23-\x7e]*"')


def strong_etag(value: str | None) -> str | None:
    """The strong entity-tag an ETag header carries, or None (absent, weak, a list, malformed, too long)."""
    if value is None:
        return None
    v = value.strip(" \t")
    if len(v) > MAX_ETAG_LENGTH or not _STRONG_ETAG.fullmatch(v):
        return None
    return v


def if_match_paths(manifests: Iterable[Any]) -> frozenset[tuple[str, str]]:
    """(connector, path template) of every route declaring `concurrency: {if_match: true}`:
    answers on these paths are remembered, writes on those routes carry If-Match."""
    out: set[tuple[str, str]] = set()
    for m in manifests:
        for route in m.routes:
            spec = route.concurrency
            if spec is not None and spec.if_match:
                out.add((m.name, template_key(route.path)))
    return frozenset(out)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConcurrencyObserver:
    """What the stage reports (metrics); the default reports nothing. `outcome` of a forwarded
    write on an if_match route: matched (If-Match sent, 2xx), changed (412 -> 409), other
    (If-Match sent, any other answer), unknown (no ETag remembered: sent without),
    agent (the agent sent its own precondition)."""

    def write(self, connector: str, outcome: str) -> None:
        return None


@dataclass(slots=True)
class Pending:
    """What on_request found, for on_response."""

    connector: str
    resource: str
    agent: str
    method: str
    if_match: bool  # a write on an if_match route
    own: bool = False  # the agent sent a precondition of its own
    sent: SeenETag | None = None  # the ETag Proctor sent as If-Match


def changed_refusal(p: Pending, seen: SeenETag) -> Refusal:
    """409: the record changed since the agent's read; read it again and reapply the change."""
    return Refusal(
        409,
        "Conflict: the record changed since this agent read it",
        f"{p.resource} was changed by someone else after agent {p.agent!r} last read it (the answer to "
        f"decision {seen.decision_id} at {_iso(seen.seen_at)}): Proctor sent this write with If-Match and the "
        "upstream refused it (412 Precondition Failed), so nothing was changed. Read the record again (GET it), "
        "reapply your change to what it holds now, and send the write again.",
        reasons=[REASON],
        kind=KIND,
        extra={"changed": {
            "connector": p.connector,
            "resource": p.resource,
            "if_match": seen.etag,
            "read_decision_id": seen.decision_id,
            "read_at": _iso(seen.seen_at),
            "upstream_status": PRECONDITION_FAILED,
        }},
    )


class IfMatch(Stage):
    """Remember the ETags agents see; send If-Match on if_match writes; explain a 412."""

    name = NAME

    def __init__(self, store: Any, config: ConcurrencyConfig, paths: frozenset[tuple[str, str]],
                 observer: ConcurrencyObserver | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.config = config
        self.paths = paths
        self.observer = observer or ConcurrencyObserver()
        self.clock = clock
        self._last_sweep = 0.0
        self._sweeping: asyncio.Task[None] | None = None

    # -- on the way in --------------------------------------------------------------
    def on_request(self, ex: Exchange) -> Awaitable[None] | None:
        cls, req, identity = ex.classification, ex.request, ex.identity
        if cls is None or req is None or identity is None or cls.spec is None:
            return None
        path = getattr(cls.spec, "path", None)
        if not isinstance(path, str) or (cls.connector, template_key(path)) not in self.paths:
            return None
        method = req.method.upper()
        spec = getattr(cls.spec, "concurrency", None)
        write = method not in SAFE_METHODS
        if not write and method not in READS:
            return None  # OPTIONS, TRACE: nothing to remember
        p = Pending(cls.connector, cls.resource_uid, identity.agent_id, method,
                    if_match=write and spec is not None and bool(spec.if_match))
        ex.stage_data[NAME] = p
        if not p.if_match:
            return None
        if any(h in req.headers for h in PRECONDITIONS):
            p.own = True  # the agent asked for its own condition: its request goes as sent
            return None
        return self._send(ex, p)

    async def _send(self, ex: Exchange, p: Pending) -> None:
        seen = await self.store.etag_seen(p.connector, p.resource, p.agent, self.clock())
        if seen is None:
            return  # never read (or long ago): forwarded as sent, like without Proctor
        ex.plan.set("if-match", seen.etag)
        ex.plan.replaceable_statuses.add(PRECONDITION_FAILED)
        p.sent = seen

    # -- on the way back ------------------------------------------------------------
    def on_response(self, ex: Exchange) -> Awaitable[None] | None:
        # (a plain method: only store work is awaited, and a refusal answered from a
        # synchronous engine hook is then recorded before it is answered)
        self._maybe_sweep()
        p: Pending | None = ex.stage_data.pop(NAME, None)
        resp = ex.response
        if p is None or not ex.forwardable or resp is None or resp.upstream_status is None or resp.error is not None:
            return None  # not forwarded, or no complete answer: nothing learnt
        status = resp.upstream_status
        if p.if_match:
            self.observer.write(p.connector, self._outcome(p, status))
        if p.sent is not None and status == PRECONDITION_FAILED:
            # the record changed since the agent's read: say so (the stale ETag stays, so a
            # blind retry is refused the same way; the next read replaces it)
            ex.replace_response(changed_refusal(p, p.sent))
            return None
        ok = 200 <= status < 300
        if p.method in READS:
            if ok or status == 304:
                return self._learn(ex, p, resp.headers.get("etag"))
            if status in (404, 410):
                return self._forget(p)
            return None
        if ok:
            return self._forget(p) if p.method == "DELETE" else self._learn(ex, p, resp.headers.get("etag"))
        return None

    @staticmethod
    def _outcome(p: Pending, status: int) -> str:
        if p.own:
            return "agent"
        if p.sent is None:
            return "unknown"
        if status == PRECONDITION_FAILED:
            return "changed"
        return "matched" if 200 <= status < 300 else "other"

    def _learn(self, ex: Exchange, p: Pending, header: str | None) -> Awaitable[None]:
        etag = strong_etag(header)
        if etag is None:
            return self._forget(p)  # the agent saw a state Proctor has no validator for
        now = self.clock()
        return self._remember(SeenETag(connector=p.connector, resource=p.resource, agent_id=p.agent, etag=etag,
                                       seen_at=now, expires_at=now + self.config.etag_ttl_seconds,
                                       decision_id=ex.decision_id))

    async def _remember(self, seen: SeenETag) -> None:
        await self.store.remember_etag(seen)

    async def _forget(self, p: Pending) -> None:
        await self.store.forget_etag(p.connector, p.resource, p.agent)

    # -- housekeeping -----------------------------------------------------------------
    def _maybe_sweep(self) -> None:
        now = self.clock()
        if now - self._last_sweep < self.config.sweep_interval_seconds or self._sweeping is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): sweep next time
            return
        self._last_sweep = now
        self._sweeping = loop.create_task(self._sweep(now))
        self._sweeping.add_done_callback(self._swept)

    def _swept(self, _task: "asyncio.Task[None]") -> None:
        self._sweeping = None

    async def _sweep(self, now: float) -> None:
        try:
            swept = await self.store.sweep_etags(now)
        except Exception as e:  # noqa: BLE001 - housekeeping: expired rows are ignored by every read anyway
            log.warning("could not sweep expired ETags: %s", e)
        else:
            if swept:
                log.debug("swept %d expired ETags", swept)


class ConcurrencyMetrics(ConcurrencyObserver):
    """proctor_if_match_writes_total{connector,outcome}."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.writes = Counter(
            "proctor_if_match_writes",
            "Forwarded writes on if_match routes, by connector and outcome: matched (If-Match sent, upstream "
            "2xx), changed (upstream 412 answered 409 resource-changed), other (If-Match sent, any other answer), "
            "unknown (no ETag remembered for the agent: sent without), agent (the agent's own precondition).",
            ["connector", "outcome"],
            registry=registry,
        )

    def write(self, connector: str, outcome: str) -> None:
        self.writes.labels(connector, outcome).inc()
