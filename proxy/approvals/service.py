"""The approval workflow: hold, wait, vote, decide, expire, escalate, forward once.

State lives in the store (so a restart or another replica sees it); this
module only adds what cannot be stored: the events that wake requests held
open on this process. Every state change is written to the decision record
with the approval id (`type: "approval"` lines) and sent to the notifier.

States: pending -> approved | denied | expired; approved -> forwarded (the
single request that reached the upstream) or expired (never used in time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import secrets
import time
import weakref
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Iterable

from ..config import ApprovalsConfig
from ..connectors.credentials import AGENT_CREDENTIAL_HEADERS
from ..core.body import BodyRejected, read_body
from ..core.overrides import OVERRIDE_HEADERS, ROUTING_HEADERS
from ..core.model import AgentIdentity, AgentRequest, Classification
from ..logredact import url_with_query_names
from ..record.model import ApprovalEvent, Record
from ..store import Approval, Store, StoreError, Vote

log = logging.getLogger("proctor.approvals")

CAS_ATTEMPTS = 8
MAX_REASON_CHARS = 2000
# Request headers never shown to approvers (credentials; the agent's are stripped anyway).
SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key", "x-auth-token"}
)


@dataclass(eq=False)
class _Waiter:
    event: asyncio.Event
    alive: Callable[[], bool] | None


class ApprovalError(Exception):
    """A vote that cannot be accepted; `status` is the HTTP status for the control API."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Approver:
    """A verified human approver."""

    id: str
    groups: frozenset[str]
    issuer: str = ""


# Fingerprints carry their format: "v3:<sha256 hex>". Approvals stored before v2 have
# a bare hex digest (method, URL and body only); see ApprovalService.matches. (v2 did
# not bind credentials that reach the upstream as sent, nor the routing headers: a v2
# approval is never released, the agent is held anew.)
FINGERPRINT_VERSION = "v3"
# Headers that change what the upstream does with the same method, URL and bytes:
# how it reads the body (media type and charset, coding, framing, language), which
# method it really runs (the override headers many web frameworks honour), or which
# host, path or client it is for (forwarding and rewrite headers).
SECURITY_HEADERS: tuple[str, ...] = (
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "content-language",
    *OVERRIDE_HEADERS,
    *ROUTING_HEADERS,
)


def fingerprint_header_names(context_headers: Iterable[str] = (), credentials: Iterable[str] = ()) -> tuple[str, ...]:
    """The headers an approval is bound to: SECURITY_HEADERS, every header policies read
    (`limits.context_headers`) and the credential headers (Authorization, Cookie, the
    connectors' credential headers). The fingerprint is taken over the request as it
    will reach the upstream (`forwarded_view`): a credential Proctor strips or replaces
    is absent there (so a retry with a refreshed agent token matches), and one that
    goes through as sent is bound (so an approval never releases it with another account)."""
    names = {h.strip().lower() for h in (*SECURITY_HEADERS, *context_headers, *credentials) if h.strip()}
    names |= set(AGENT_CREDENTIAL_HEADERS)
    names.discard("proxy-authorization")  # always removed before forwarding
    return tuple(sorted(names))


def forwarded_view(req: AgentRequest, unbound: Iterable[str]) -> AgentRequest:
    """`req` without the headers Proctor removes or replaces before forwarding it."""
    drop = {h.lower() for h in unbound} | {"proxy-authorization"}
    if not any(h in req.headers for h in drop):
        return req
    return dataclasses.replace(req, headers={k: v for k, v in req.headers.items() if k not in drop})


def request_fingerprint(agent_id: str, req: AgentRequest, header_names: Iterable[str] = SECURITY_HEADERS) -> str:
    """What makes a retry "the same request" (format v2): agent, method, canonical
    target (scheme, host, port, path, query), the values of `header_names` (an absent
    header differs from an empty one) and the body. The names themselves are hashed
    too, so changing the bound set (config) never matches an approval made under another."""
    names = sorted({h.lower() for h in header_names})
    head = json.dumps(
        {
            "agent": agent_id,
            "method": req.method,
            "target": [req.scheme.lower(), req.host.lower().rstrip("."), int(req.port), req.path, req.query],
            "headers": [[name, req.headers.get(name)] for name in names],
        },
        ensure_ascii=True,
        separators=(",", ":"),
        sort_keys=True,
    ).encode("ascii")
    h = hashlib.sha256()
    h.update(len(head).to_bytes(8, "big"))  # length-prefixed: the body cannot pose as part of the head
    h.update(head)
    h.update(req.body)
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


def legacy_request_fingerprint(agent_id: str, req: AgentRequest) -> str:
    """The format-1 fingerprint (before v2): agent, method, target URL and body, no headers.
    Only used to find approvals stored before the upgrade."""
    h = hashlib.sha256()
    for part in (agent_id, req.method, req.scheme, req.host, str(req.port), req.path, req.query):
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    h.update(req.body)
    return h.hexdigest()


def new_approval_id() -> str:
    return "apr_" + secrets.token_urlsafe(15)


def _displayable(value: Any) -> Any:
    """A parsed body with exact Decimal numbers as JSON-serialisable values (a number
    a float cannot show exactly stays a string, so approvers see what was sent)."""
    if isinstance(value, Decimal):
        if value == value.to_integral_value() and abs(value) < 2**63:
            return int(value)
        f = float(value)
        return f if Decimal(repr(f)) == value else str(value)
    if isinstance(value, dict):
        return {k: _displayable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_displayable(v) for v in value]
    return value


def _preview(
    req: AgentRequest,
    limit: int,
    extra_secret_headers: frozenset[str],
    redact: Any = None,
    bound_headers: Iterable[str] = (),
    forwarded: AgentRequest | None = None,
) -> dict[str, Any]:
    """The held request as an approver sees it: no credentials, header values and the
    body redacted like the record (audit.redact), the body pretty-printed and bounded,
    and the headers the approval is bound to, as they reach the upstream (`forwarded`;
    None: must be absent). A credential is listed (redacted) only when it goes through."""

    def shown(name: str, value: str | None) -> str | None:
        if value is None:
            return None
        return "[redacted]" if name in SECRET_HEADERS or name in extra_secret_headers else value

    # other header values and query values are never shown or stored (docs/security.md#no-secret-in-free-text)
    visible = {*bound_headers, "host", "content-length"}
    headers = {k: shown(k, v) if k in visible else "[redacted]" for k, v in req.headers.items()}
    fwd = forwarded if forwarded is not None else req
    secret = SECRET_HEADERS | extra_secret_headers
    bound = {
        name: shown(name, fwd.headers.get(name))
        for name in sorted(bound_headers)
        if name not in secret or name in fwd.headers
    }
    if redact is not None:
        headers, bound = redact(headers), redact(bound)
    body_text: str | None = None
    truncated = False
    if req.body:
        raw = req.body
        try:
            # the body as policy read it (core/body.py): JSON in its charset, form and
            # multipart fields as a document, so redaction by key applies to all three
            read = read_body(raw, req.headers.get("content-type"))
            if read.doc is None:
                raise ValueError("not a document")
            doc = _displayable(read.doc)
            if redact is not None:  # audit.redact keys and patterns (passwords, card numbers) stay out of the store
                doc = redact(doc)
            text = json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=False)
            if read.format != "json":
                text = f"({read.format} fields)\n{text}"
        except (BodyRejected, ValueError, UnicodeDecodeError):
            text = raw.decode("utf-8", "replace")
            if redact is not None:
                text = redact(text)
        if len(text) > limit:
            text, truncated = text[:limit], True
        body_text = text
    return {
        "method": req.method,
        "url": url_with_query_names(req.url),
        "headers": headers,
        # A retry is released only with exactly these values (None: the header must be absent).
        "bound_headers": bound,
        "fingerprint_version": FINGERPRINT_VERSION,
        "body": body_text,
        "body_bytes": len(req.body),
        "body_truncated": truncated,
    }


class ApprovalService:
    def __init__(
        self,
        store: Store,
        config: ApprovalsConfig,
        record: Callable[[Record], None],  # the decision recorder's write (type: approval lines)
        notifier: Any = None,
        status_base_url: str = "",
        shared_store: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config = config
        self.record = record
        self.notifier = notifier
        self.status_base_url = status_base_url.rstrip("/")
        # Where a transparent agent reads its status (the status address in its pod, engine/transparent.py;
        # control.public_url may be a place it cannot reach). None: no transparent listener.
        self.transparent_status_base_url: str | None = None
        # With a store shared by replicas, a decision may be taken elsewhere: poll.
        self.poll_seconds = 2.0 if shared_store else None
        self.clock = clock
        self._waiters: dict[str, set[_Waiter]] = {}
        self._hold_locks: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.listeners: list[Callable[[str, Approval], None]] = []  # console live updates
        self.event_counts: dict[str, int] = {}
        self.pending_count = 0  # refreshed by the timer (for metrics)
        self.on_settled: Callable[[str, float], None] | None = None  # (state, seconds since requested)
        # Stop waiting early for a held request this returns True for (kill switch).
        self.interrupt: Callable[[Approval], bool] | None = None
        # Shutting down (proxy/shutdown.py): held requests stop waiting and are answered 503
        # with their status URL; their approvals stay pending for the agent's retry.
        self.draining = False
        self.extra_secret_headers: frozenset[str] = frozenset()
        self.replaced_by_connector: dict[str, frozenset[str]] = {}
        self.redact: Any = None  # the audit Redactor: applied to the headers and JSON body shown to approvers
        # The headers a held request's approval is bound to (see bind_headers).
        self.fingerprint_headers: tuple[str, ...] = fingerprint_header_names()

    # -- helpers ---------------------------------------------------------------------
    def bind_headers(self, context_headers: Iterable[str], replaced: dict[str, Iterable[str]] | None = None) -> None:
        """Bind approvals to the security headers, every header policies read
        (`limits.context_headers`) and the credentials that reach the upstream as sent.
        `replaced`: connector -> the headers its injected credential replaces."""
        self.replaced_by_connector = {c: frozenset(h.lower() for h in hs) for c, hs in (replaced or {}).items()}
        self.extra_secret_headers = frozenset(h for hs in self.replaced_by_connector.values() for h in hs)
        self.fingerprint_headers = fingerprint_header_names(context_headers, self.extra_secret_headers)

    def forwarded_view(self, req: AgentRequest, connector: str, stripped: Iterable[str]) -> AgentRequest:
        """The request as it will reach `connector`'s upstream: without the agent's
        credentials Proctor strips (`stripped`) and the headers the connector's
        injected credential replaces. Approvals are fingerprinted over this view."""
        return forwarded_view(req, {*stripped, *self.replaced_by_connector.get(connector, ())})

    def fingerprint(self, agent_id: str, req: AgentRequest) -> str:
        return request_fingerprint(agent_id, req, self.fingerprint_headers)

    def matches(self, approval: Approval, agent_id: str, req: AgentRequest) -> bool:
        """Would releasing `approval` for `req` forward exactly the request that was approved?"""
        if approval.agent_id != agent_id:
            return False
        stored = approval.fingerprint
        if stored.startswith(FINGERPRINT_VERSION + ":"):
            return hmac.compare_digest(stored, self.fingerprint(agent_id, req))
        if ":" in stored:
            return False  # a format this version does not know: never release on a guess
        # Format 1 (stored before v2): method, URL and body, checked by the old digest;
        # the bound headers are checked against the ones the approver was shown.
        if not hmac.compare_digest(stored, legacy_request_fingerprint(agent_id, req)):
            return False
        shown = approval.request.get("headers") if isinstance(approval.request, dict) else None
        if not isinstance(shown, dict):
            return False
        # (credential values were never stored in format 1: those are compared as before, not at all)
        secret = SECRET_HEADERS | self.extra_secret_headers
        return all(shown.get(name) == req.headers.get(name) for name in self.fingerprint_headers if name not in secret)

    def status_url(self, approval_id: str, transparent: bool = False) -> str:
        """The URL the held agent reads the approval's state at: the control API (with its own
        token), or for a transparent agent (`transparent`) the status address in its pod."""
        base = self.transparent_status_base_url if transparent and self.transparent_status_base_url \
            else self.status_base_url
        return f"{base}/v1/approvals/{approval_id}/status"

    def _event(self, approval: Approval, event: str, **extra: Any) -> None:
        """Record, notify and publish one state change."""
        rec = ApprovalEvent.of(approval, event, self.clock(), **extra)
        self.event_counts[event] = self.event_counts.get(event, 0) + 1
        if event in ("approved", "denied", "expired") and self.on_settled is not None:
            try:
                self.on_settled(event, max(0.0, self.clock() - approval.created_at))
            except Exception:
                log.exception("approval metrics hook failed")
        try:
            self.record(rec)
        except Exception:
            log.exception("could not record approval event %s for %s", event, approval.id)
        if self.notifier is not None:
            try:
                self.notifier.notify(event, approval, extra or None)
            except Exception:
                log.exception("could not queue the %s notification for %s", event, approval.id)
        for listener in list(self.listeners):
            try:
                listener(event, approval)
            except Exception:
                log.exception("approval listener failed")

    def _wake(self, approval_id: str) -> None:
        for w in list(self._waiters.get(approval_id, ())):
            w.event.set()

    def wake(self, approval_id: str) -> None:
        """Requests held here for this approval read it now (it was decided on another replica)."""
        self._wake(approval_id)

    def wake_all(self) -> None:
        """Wake every held request on this process (they re-check suspensions)."""
        self.sweep(poll_store=True)

    def release_held(self) -> int:
        """Shutdown: every request held open on this process stops waiting now (and any
        held later does not wait); how many were waiting."""
        self.draining = True
        waiting = self.waiting
        self.sweep(poll_store=True)
        return waiting

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    # -- holding ---------------------------------------------------------------------
    def forwarded_since(self) -> float | None:
        """Approvals forwarded at or after this still answer a retry of their request (409
        Already forwarded); None: forwarded ones never do (approvals.forwarded_retry_seconds 0)."""
        window = self.config.forwarded_retry_seconds
        return self.clock() - window if window > 0 else None

    async def find_for_retry(self, identity: AgentIdentity, req: AgentRequest) -> Approval | None:
        """The approval this request is a retry of: the newest one with its Idempotency-Key
        (the caller must still check `matches`: a key never carries an approval over to
        another request), else the newest one with its fingerprint; open (pending, approved,
        denied) or forwarded within approvals.forwarded_retry_seconds."""
        agent_id = identity.agent_id
        key = req.headers.get("idempotency-key") or None
        found = await self.store.find_open_approval(
            agent_id=agent_id, fingerprint=self.fingerprint(agent_id, req), idempotency_key=key,
            forwarded_since=self.forwarded_since(),
        )
        if found is None and key is None:
            # an approval stored before fingerprint v2 (an upgrade while it was open)
            legacy = await self.store.find_open_approval(
                agent_id=agent_id, fingerprint=legacy_request_fingerprint(agent_id, req), idempotency_key=None
            )
            if legacy is not None and self.matches(legacy, agent_id, req):
                found = legacy
        return found

    async def hold(
        self,
        *,
        decision_id: str,
        identity: AgentIdentity,
        req: AgentRequest,
        cls: Classification,
        groups: dict[str, int],
        policy_ids: list[str],
        mode: str,
        derived: dict[str, Any],
        forwarded: AgentRequest | None = None,
    ) -> Approval:
        """Hold `req`; its approval is bound to `forwarded` (the request as it will reach
        the upstream, see forwarded_view; default: `req` itself). The store makes this
        insert-or-return-existing: when an approval already answers the request (another
        replica held it a moment ago, or it was forwarded within forwarded_retry_seconds),
        that one is returned, in whatever state it is, and nothing is created or announced."""
        now = self.clock()
        escalate_at = now + self.config.escalate_after_seconds if self.config.escalate_after_seconds else None
        approval = Approval(
            id=new_approval_id(),
            state="pending",
            created_at=now,
            expires_at=now + self.config.expire_after_seconds,
            agent_id=identity.agent_id,
            action=cls.action,
            resource_type=cls.resource_type,
            resource_id=cls.resource_id,
            connector=cls.connector,
            groups=dict(groups),
            fingerprint=self.fingerprint(identity.agent_id, forwarded if forwarded is not None else req),
            idempotency_key=req.headers.get("idempotency-key") or None,
            mode=mode,
            decision_id=decision_id,
            request=_preview(
                req, self.config.preview_body_bytes, self.extra_secret_headers, self.redact, self.fingerprint_headers,
                forwarded,
            ),
            derived={**derived, "policies": list(policy_ids)},
            escalate_at=escalate_at,
        )
        stored, created = await self.store.hold_approval(approval, forwarded_since=self.forwarded_since())
        if created:
            self._event(approval, "requested", policies=list(policy_ids), mode=mode)
        return stored

    async def wait(self, approval: Approval, timeout: float, alive: Callable[[], bool] | None = None) -> Approval:
        """Wait (at most `timeout`) for a pending approval to be decided; the latest state.

        Returns early, with the approval still pending, if `alive()` turns false
        (the agent hung up: the approval can still be decided and applies to a retry).
        A waiter costs one event and one timer: it reads the store only when woken
        (a decision, the once-a-second sweep finding its agent gone, a suspension, or
        the shared-store poll) or at its deadline, so thousands can wait at once."""
        deadline = time.monotonic() + min(timeout, max(0.0, approval.expires_at - self.clock()) + 0.5)
        waiter = _Waiter(asyncio.Event(), alive)
        waiters = self._waiters.setdefault(approval.id, set())
        waiters.add(waiter)
        try:
            current = approval
            while current.state == "pending" and not self.draining:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(waiter.event.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
                waiter.event.clear()
                if self.interrupt is not None and self.interrupt(current):
                    break
                latest = await self.store.get_approval(approval.id)
                if latest is None:
                    break
                current = latest
                if alive is not None and current.state == "pending" and not alive():
                    break
            return current
        finally:
            waiters.discard(waiter)
            if not waiters:
                self._waiters.pop(approval.id, None)

    def sweep(self, poll_store: bool = False) -> None:
        """Once a second: wake waiters whose agent hung up (and, with a shared store, all
        of them, to notice decisions taken on another replica)."""
        for waiters in list(self._waiters.values()):
            for w in list(waiters):
                if poll_store or (w.alive is not None and not w.alive()):
                    w.event.set()

    def hold_lock(self, agent_id: str, key: str) -> asyncio.Lock:
        """Serialises "find an open approval, else create one" for identical requests on this
        process: a fast path only (duplicates wait for the first one's hold instead of racing
        it in the store). Correctness does not depend on it: the store's hold_approval is
        insert-or-return-existing, across replicas too."""
        k = (agent_id, key)
        lock = self._hold_locks.get(k)
        if lock is None:
            lock = self._hold_locks[k] = asyncio.Lock()
        return lock

    async def claim_for_forwarding(self, approval: Approval) -> tuple[bool, Approval]:
        """Atomically turn an approved approval into a forwarded one: True exactly once."""
        current = approval
        for _ in range(CAS_ATTEMPTS):
            if current.state != "approved":
                return False, current
            now = self.clock()
            if now > current.expires_at:
                expired = await self._transition(current, "expired", None, "approved but not used before it expired")
                return False, expired
            version = current.version
            current.state = "forwarded"
            current.forwarded_at = now
            if await self.store.update_approval(current, expect_version=version):
                self._event(current, "forwarded")
                return True, current
            latest = await self.store.get_approval(approval.id)
            if latest is None:
                return False, current
            current = latest
        raise StoreError("approval kept changing while claiming it for forwarding")

    # -- deciding ---------------------------------------------------------------------
    def eligible_groups(self, approval: Approval, approver: Approver) -> set[str]:
        groups = set(approval.groups)
        if approval.escalated and self.config.escalate_to:
            groups.add(self.config.escalate_to)
        return groups & set(approver.groups)

    async def decide(self, approval_id: str, approver: Approver, decision: str, reason: str) -> Approval:
        if decision not in ("approve", "deny"):
            raise ApprovalError(400, "decision must be approve or deny")
        reason = (reason or "").strip()
        if not reason:
            raise ApprovalError(400, "a reason is required to approve or deny")
        if len(reason) > MAX_REASON_CHARS:
            raise ApprovalError(400, f"the reason is longer than {MAX_REASON_CHARS} characters")
        for _ in range(CAS_ATTEMPTS):
            current = await self.store.get_approval(approval_id)
            if current is None:
                raise ApprovalError(404, f"no approval {approval_id}")
            if current.state != "pending":
                raise ApprovalError(409, f"approval {approval_id} is already {current.state}")
            now = self.clock()
            if now >= current.expires_at:
                await self._transition(current, "expired", None, "expired before it was decided")
                raise ApprovalError(409, f"approval {approval_id} has expired")
            if approver.id == current.agent_id:
                raise ApprovalError(403, "nobody approves their own request")
            groups = self.eligible_groups(current, approver)
            if not groups:
                needed = sorted(current.groups) + ([self.config.escalate_to] if current.escalated and self.config.escalate_to else [])
                raise ApprovalError(403, f"{approver.id} is not in an approving group for this request (needs one of {needed})")
            if any(v.approver == approver.id for v in current.votes):
                raise ApprovalError(409, f"{approver.id} has already voted on {approval_id}")
            version = current.version
            current.votes.append(Vote(approver=approver.id, group=",".join(sorted(groups)), decision=decision, reason=reason, at=now))
            new_state = "denied" if decision == "deny" else ("approved" if self._quorum_met(current) else "pending")
            if new_state != "pending":
                current.state = new_state
                current.decided_at = now
                current.decided_by = approver.id
                current.reason = reason
            if await self.store.update_approval(current, expect_version=version):
                if new_state == "pending":
                    self._event(current, "voted", by=approver.id, reason=reason)
                else:
                    self._event(current, new_state, by=approver.id, reason=reason)
                    self._wake(approval_id)
                return current
        raise ApprovalError(409, "the approval changed while voting; try again")

    def _quorum_met(self, approval: Approval) -> bool:
        approvals = [v for v in approval.votes if v.decision == "approve"]
        if self.config.escalate_to and approval.escalated:
            if any(self.config.escalate_to in v.group.split(",") for v in approvals):
                return True  # the escalation group decides alone
        for group, needed in approval.groups.items():
            have = {v.approver for v in approvals if group in v.group.split(",")}
            if len(have) < needed:
                return False
        return True

    async def _transition(self, approval: Approval, state: str, by: str | None, reason: str) -> Approval:
        current = approval
        for _ in range(CAS_ATTEMPTS):
            version = current.version
            prior = current.state
            if prior not in ("pending", "approved"):
                return current
            current.state = state
            current.decided_at = current.decided_at or self.clock()
            current.reason = current.reason or reason
            if await self.store.update_approval(current, expect_version=version):
                self._event(current, state, by=by, reason=reason)
                self._wake(current.id)
                return current
            latest = await self.store.get_approval(approval.id)
            if latest is None:
                return current
            current = latest
        return current

    # -- Cedar ----------------------------------------------------------------------
    def cedar_context(self, approval: Approval) -> dict[str, Any]:
        """`context.approval` for re-evaluating an approved request."""
        approvers = sorted({v.approver for v in approval.votes if v.decision == "approve"})
        satisfied = set()
        for group, needed in approval.groups.items():
            have = {v.approver for v in approval.votes if v.decision == "approve" and group in v.group.split(",")}
            if len(have) >= needed:
                satisfied.add(group)
        if approval.escalated and self.config.escalate_to:
            if any(self.config.escalate_to in v.group.split(",") for v in approval.votes if v.decision == "approve"):
                satisfied |= set(approval.groups) | {self.config.escalate_to}
        at = approval.decided_at or self.clock()
        return {
            "id": approval.id,
            "approver": approval.decided_by or "",
            "approvers": approvers,
            "groups": sorted(satisfied),
            "time": {"__extn": {"fn": "datetime", "arg": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))}},
            "note": approval.reason or "",
        }

    @staticmethod
    def prospective_context(groups: dict[str, int]) -> dict[str, Any]:
        """A stand-in approval by every named group, to ask "would approval let this through?"."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return {
            "id": "prospective",
            "approver": "(any approver)",
            "approvers": ["(any approver)"],
            "groups": sorted(groups),
            "time": {"__extn": {"fn": "datetime", "arg": now}},
            "note": "",
        }

    # -- timers ---------------------------------------------------------------------
    async def run_timers(self, interval: float = 1.0) -> None:
        """Expire and escalate pending approvals, and sweep held connections (for the life of the proxy)."""
        last_poll = 0.0
        failing_since: float | None = None  # a store outage is logged once, then once a minute, not every tick
        last_logged = 0.0
        while True:
            try:
                poll = self.poll_seconds is not None and time.monotonic() - last_poll >= self.poll_seconds
                if poll:
                    last_poll = time.monotonic()
                self.sweep(poll_store=poll)
                await self.tick()
                if failing_since is not None:
                    log.warning("approval timers recovered after %.0f s", time.monotonic() - failing_since)
                    failing_since = None
            except StoreError as e:
                now = time.monotonic()
                if failing_since is None or now - last_logged >= 60:
                    log.error("approval timers cannot reach the store (%s); expiry and escalation wait for it", e)
                    last_logged = now
                failing_since = failing_since or now
            except Exception:
                log.exception("approval timer error")
            await asyncio.sleep(interval)

    async def tick(self) -> None:
        now = self.clock()
        self.pending_count = await self.store.count_approvals(states=["pending"])
        for approval in await self.store.due_approvals(now):
            if approval.state != "pending":
                continue
            if approval.expires_at <= now:
                await self._transition(approval, "expired", None, "nobody decided before it expired")
            elif approval.escalate_at is not None and approval.escalate_at <= now and not approval.escalated:
                version = approval.version
                approval.escalated = True
                if await self.store.update_approval(approval, expect_version=version):
                    self._event(approval, "escalated", to=self.config.escalate_to)
