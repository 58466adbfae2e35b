"""Duplicate-work suppression: Idempotency-Key on writes and route dedupe windows.

Two stages, both thin over the store (docs/coordination.md, "Duplicate work"):

- `IdempotencyCheck` runs after authorization and the approval hold. (The budget check,
  before authorization, asks it first whether the store holds the key (`answers`): such a
  retry costs nothing, so a budget its first call filled neither refuses nor holds it.) It answers a
  retry from what the store already knows: the stored response replayed (a
  local reply marked `Idempotent-Replayed: true`), 409 while the first request
  is still in progress, 422 when the key was used for another request, 400 for
  a malformed key. A request the approval stage handled is left alone: an
  approval releases exactly one request and has its own Idempotency-Key rules.
- `IdempotencyReserve` runs as late as possible before forwarding (after the
  audit gate): it inserts the "in progress" entry, and the store's
  insert-if-absent decides between concurrent requests on every replica. On the
  way back it stores a 2xx response (bounded) or releases the key.

A route's dedupe window works the same way with another scope: any agent's
equivalent write (same declared values) inside the window is the "same" request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..config import IdempotencyConfig
from ..core.chain import Stage
from ..core.exchange import Exchange, LocalReply
from ..core.model import Refusal
from ..record.model import DuplicateEvent, iso
from ..store.idempotency import COMPLETED, IN_PROGRESS, IdempotencyEntry
from .dedupe import SAFE_METHODS, DedupeSpec, dedupe_key, dedupe_scope

log = logging.getLogger("proctor.coordination")

KEY_HEADER = "idempotency-key"
REPLAYED_HEADER = "Idempotent-Replayed"
ORIGINAL_DECISION_HEADER = "X-Proctor-Original-Decision-Id"
CHECKED = "idempotency"  # stage_data: the subjects the check found free (to reserve)
RESERVED = "idempotency-reserve"  # stage_data: the subjects this request holds
# Response headers kept for a replay: what says what happened and where. Never cookies
# or credentials (a dedupe replay goes to another agent).
KEPT_HEADERS = ("content-type", "content-language", "location", "content-location", "etag", "last-modified")

# Draft-ietf-httpapi-idempotency-key-header: the value is a Structured Field string
# ("..."); many clients send it bare. Either way: a bounded run of visible ASCII that
# cannot smuggle list separators or quotes.
_KEY_CHARS = re.compile(r"[A-Za-z0-9\-_.:~+/=@!#$%&*^|]+")

Fingerprint = Callable[[Exchange], str]
RecordEvent = Callable[[DuplicateEvent], None]  # DecisionRecorder.write: decisions.jsonl and the OCSF trail


@dataclass(frozen=True)
class Subject:
    """One thing a write may duplicate: the agent's Idempotency-Key, or a route's dedupe key."""

    scope: str
    key: str
    fingerprint: str
    dedupe: DedupeSpec | None = None  # None: an Idempotency-Key

    @property
    def label(self) -> str:
        return "dedupe" if self.dedupe is not None else "idempotency"


def parse_key(raw: str, max_length: int) -> str | None:
    """The key of an Idempotency-Key header value, or None when it is malformed."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not 1 <= len(value) <= max_length or not _KEY_CHARS.fullmatch(value):
        return None
    return value


def _bad_key(detail: str) -> Refusal:
    return Refusal(400, "Invalid Idempotency-Key", detail, kind="idempotency-key-invalid")


def _replay(entry: IdempotencyEntry, subject: Subject) -> LocalReply:
    headers = dict(entry.headers)
    headers[REPLAYED_HEADER] = "true"
    headers[ORIGINAL_DECISION_HEADER] = entry.owner
    assert entry.status is not None
    return LocalReply(entry.status, headers, entry.body or b"",
                      reason="dedupe-replay" if subject.dedupe is not None else "idempotent-replay")


def _first(entry: IdempotencyEntry) -> dict[str, Any]:
    extra: dict[str, Any] = {"first_decision_id": entry.owner, "first_seen_at": entry.created_at}
    location = entry.headers.get("location")
    if location:
        extra["first_result"] = location
    if entry.status is not None:
        extra["first_status"] = entry.status
    return extra


def answer(ex: Exchange, subject: Subject, entry: IdempotencyEntry, config: IdempotencyConfig) -> None:
    """Settle a request whose key (or dedupe key) is already held by `entry`."""
    retry = str(config.retry_after_seconds)
    if subject.dedupe is None and entry.fingerprint != subject.fingerprint:
        ex.refuse(Refusal(
            422, "Idempotency-Key reused",
            "this Idempotency-Key was already used for a different request (method, URL, body or bound "
            f"headers differ; first decision {entry.owner}); use a new key for a new request",
            kind="idempotency-mismatch", extra={"first_decision_id": entry.owner},
        ))
        return
    if subject.dedupe is not None:
        if entry.state == COMPLETED and subject.dedupe.answer == "replay" and entry.body_stored:
            ex.reply_locally(_replay(entry, subject))
            return
        extra = _first(entry)
        headers = {"Location": extra["first_result"]} if "first_result" in extra else {}
        if entry.state == IN_PROGRESS:
            headers["Retry-After"] = retry
        until = entry.created_at + subject.dedupe.window_seconds
        ex.refuse(Refusal(
            409, "Duplicate request",
            f"an equivalent request ({'still in progress' if entry.state == IN_PROGRESS else 'completed'}, "
            f"decision {entry.owner}) was sent within the last {subject.dedupe.window_seconds:g} s; it was not "
            f"forwarded again (the window ends {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))})",
            headers=headers, kind="duplicate", extra={**extra, "window_ends_at": until},
        ))
        return
    if entry.state == IN_PROGRESS:
        ex.refuse(Refusal(
            409, "Request in progress",
            f"a request with this Idempotency-Key (decision {entry.owner}) is still being processed; "
            f"retry after {retry} s to get its response",
            headers={"Retry-After": retry}, kind="idempotency-in-progress",
            extra={"first_decision_id": entry.owner},
        ))
        return
    if not entry.body_stored:
        ex.refuse(Refusal(
            409, "Request already completed",
            f"a request with this Idempotency-Key completed (decision {entry.owner}, status {entry.status}); "
            "its response was too large to keep, so it cannot be replayed",
            headers={"Location": entry.headers["location"]} if entry.headers.get("location") else {},
            kind="idempotency-not-replayable", extra=_first(entry),
        ))
        return
    ex.reply_locally(_replay(entry, subject))


class DuplicateObserver:
    """What is reported when a write is not forwarded because it repeated earlier work:
    counted by connector (metrics) and recorded as a `duplicate` event (decisions.jsonl and
    the OCSF trail) next to the request's own decision record."""

    def __init__(self, record: RecordEvent | None = None,
                 count: Callable[[str, str, str], None] | None = None) -> None:
        self.record = record
        self.count = count

    def seen(self, ex: Exchange, subject: Subject, entry: IdempotencyEntry) -> None:
        refusal = ex.refusal
        if ex.local_reply is not None:
            event, kind = "replayed", None
        elif refusal is not None:
            kind = refusal.kind
            event = "mismatch" if kind == "idempotency-mismatch" else "refused"
        else:
            return
        cls = ex.classification
        connector = cls.connector if cls is not None else ""
        if self.count is not None:
            self.count(connector or "-", subject.label, event)
        if self.record is None:
            return
        agent = ex.identity.agent_id if ex.identity is not None else ""
        self.record(DuplicateEvent(
            event=event, time=iso(time.time()), mechanism=subject.label, decision_id=ex.decision_id,
            agent=agent, connector=connector, action=cls.action if cls is not None else "",
            resource=cls.resource_uid if cls is not None else "", first_decision_id=entry.owner,
            first_agent=entry.agent_id if subject.dedupe is not None and entry.agent_id else None,
            first_status=entry.status, first_result=entry.headers.get("location") or None, kind=kind,
        ))


class IdempotencyCheck(Stage):
    """After authorize and the approval hold: answer a retry from what the store knows."""

    name = "idempotency"

    def __init__(self, store: Any, config: IdempotencyConfig, fingerprint: Fingerprint,
                 observer: DuplicateObserver | None = None) -> None:
        self.store = store
        self.config = config
        self.fingerprint = fingerprint
        self.observer = observer or DuplicateObserver()

    def _subjects(self, ex: Exchange) -> list[Subject] | Refusal:
        req, identity, cls = ex.request, ex.identity, ex.classification
        assert req is not None
        subjects: list[Subject] = []
        raw = req.headers.get(KEY_HEADER)
        if raw is not None and req.method.upper() not in SAFE_METHODS:
            if KEY_HEADER in req.repeated_headers:
                return _bad_key("send one Idempotency-Key header, not several")
            key = parse_key(raw, self.config.max_key_length)
            if key is None:
                return _bad_key(
                    f"an Idempotency-Key is 1 to {self.config.max_key_length} characters of letters, digits "
                    "and - _ . : ~ + / = @ ! # $ % & * ^ | (optionally in double quotes), e.g. a UUID"
                )
            agent = identity.agent_id if identity is not None else ""
            subjects.append(Subject(f"idem:{agent}", key, self.fingerprint(ex)))
        spec = getattr(cls.spec, "dedupe", None) if cls is not None else None
        if cls is not None and isinstance(spec, DedupeSpec) and req.method.upper() not in SAFE_METHODS:
            digest = dedupe_key(cls, spec)
            subjects.append(Subject(dedupe_scope(cls), digest, digest, dedupe=spec))
        return subjects

    async def answers(self, ex: Exchange) -> bool:
        """Does the store already hold this write's key or dedupe key, so that this check will answer
        it (replay, 409, 422) without forwarding it? Asked early by the budget check (a retry costs
        nothing: it is not refused or held for the spend of its first call); read-only."""
        if ex.approval_id is not None or ex.request is None:
            return False
        found = self._subjects(ex)
        if isinstance(found, Refusal):
            return False
        now = time.time()
        for subject in found:
            if await self.store.get_idempotency(subject.scope, subject.key, now) is not None:
                return True
        return False

    async def on_request(self, ex: Exchange) -> None:
        if ex.approval_id is not None or ex.request is None:
            return  # the approval stage handled it: an approval releases one request on its own terms
        found = self._subjects(ex)
        if isinstance(found, Refusal):
            ex.refuse(found)
            return
        if not found:
            return
        now = time.time()
        for subject in found:
            entry = await self.store.get_idempotency(subject.scope, subject.key, now)
            if entry is not None:
                answer(ex, subject, entry, self.config)
                self.observer.seen(ex, subject, entry)
                return
        ex.stage_data[CHECKED] = found


class IdempotencyReserve(Stage):
    """Just before forwarding: take the keys (the store arbitrates); store or release on the way back."""

    name = "idempotency-reserve"

    def __init__(self, store: Any, config: IdempotencyConfig, observer: DuplicateObserver | None = None) -> None:
        self.store = store
        self.config = config
        self.observer = observer or DuplicateObserver()
        self._last_sweep = 0.0
        self._sweeping: asyncio.Task[None] | None = None
        self.failures = 0

    async def on_request(self, ex: Exchange) -> None:
        subjects: list[Subject] | None = ex.stage_data.pop(CHECKED, None)
        if not subjects:
            return
        now = time.time()
        agent = ex.identity.agent_id if ex.identity is not None else ""
        taken: list[Subject] = []
        for subject in subjects:
            entry = IdempotencyEntry(
                scope=subject.scope, key=subject.key, fingerprint=subject.fingerprint, owner=ex.decision_id,
                agent_id=agent, created_at=now, expires_at=now + self.config.in_progress_seconds,
            )
            held = await self.store.reserve_idempotency(entry, now)
            if held is not None:
                # lost the race (another replica or request got there first): give back what we took
                for mine in taken:
                    await self.store.release_idempotency(mine.scope, mine.key, ex.decision_id)
                answer(ex, subject, held, self.config)
                self.observer.seen(ex, subject, held)
                return
            taken.append(subject)
        ex.stage_data[RESERVED] = taken
        # (+1: a body of exactly the bound is kept; the engine streams anything larger)
        ex.plan.read_response_body = max(ex.plan.read_response_body, self.config.max_body_bytes + 1)

    def on_response(self, ex: Exchange) -> Awaitable[None] | None:
        # (a plain method: most exchanges have nothing to await here, and a refusal answered
        # from a synchronous engine hook is then recorded before it is answered)
        taken: list[Subject] | None = ex.stage_data.pop(RESERVED, None)
        now = time.time()
        if now - self._last_sweep >= self.config.sweep_interval_seconds and self._sweeping is None:
            # housekeeping in its own task: no request waits for it
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a synchronous caller): sweep next time
                loop = None
            if loop is not None:
                self._last_sweep = now
                self._sweeping = loop.create_task(self._sweep(now))
                self._sweeping.add_done_callback(self._swept)
        if not taken:
            return None
        return self._settle(ex, taken)

    def _swept(self, _task: "asyncio.Task[None]") -> None:
        self._sweeping = None

    async def _settle(self, ex: Exchange, taken: list[Subject]) -> None:
        if taken:
            resp = ex.response
            status = resp.upstream_status if resp is not None else None
            if ex.forwardable and resp is not None and status is not None and 200 <= status < 300:
                await self._complete(ex, taken, time.time())
            else:
                # Not done (refused after the reservation, upstream error, or a non-2xx answer):
                # release the key so the agent's retry is forwarded.
                for subject in taken:
                    await self.store.release_idempotency(subject.scope, subject.key, ex.decision_id)

    async def _sweep(self, now: float) -> None:
        try:
            swept = await self.store.sweep_idempotency(now)
        except Exception as e:  # noqa: BLE001 - housekeeping: expired rows are ignored by every read anyway
            log.warning("could not sweep expired idempotency keys: %s", e)
        else:
            if swept:
                log.debug("swept %d expired idempotency keys", swept)

    async def _complete(self, ex: Exchange, taken: list[Subject], now: float) -> None:
        resp = ex.response
        assert resp is not None and resp.upstream_status is not None
        body = resp.body
        stored = body is not None and len(body) <= self.config.max_body_bytes
        headers = {k: v for k, v in resp.headers.items() if k in KEPT_HEADERS}
        for subject in taken:
            window = subject.dedupe.window_seconds if subject.dedupe is not None else None
            done = IdempotencyEntry(
                scope=subject.scope, key=subject.key, fingerprint=subject.fingerprint, owner=ex.decision_id,
                agent_id=ex.identity.agent_id if ex.identity is not None else "", created_at=now,
                # a dedupe window counts from the first request; a replay is kept replay_seconds
                expires_at=(ex.timestamp + window) if window is not None else now + self.config.replay_seconds,
                state=COMPLETED, status=resp.upstream_status, headers=headers,
                body=body if stored else None, body_stored=stored,
            )
            if not await self.store.complete_idempotency(done):
                self.failures += 1
                log.warning("decision %s: the %s key was no longer held when its response came back "
                            "(in progress longer than idempotency.in_progress_seconds?)", ex.decision_id, subject.label)
