"""Webhook notifications for human approvals, off the request path.

`Notifier.notify()` is synchronous and never blocks or raises: it snapshots the
approval into a small payload and puts one item per matching hook on that hook's
bounded queue (a full queue drops the item and counts it). Worker tasks deliver
the items with aiohttp, retrying 429/5xx/network errors with exponential backoff
and full jitter. Every hook has its own queue and workers, so a slow or dead
webhook never delays another one.

Payloads carry only a summary of the held request (method and URL): its headers
and body may hold credentials or personal data and are never sent.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..logredact import redact

if TYPE_CHECKING:
    from ..store.models import Approval

log = logging.getLogger("proctor.approvals.notify")

# "handoff": a claim handed to another agent or a human group's inbox (proxy/coordination/handoff.py);
# "workflow-*": workflow exceptions (proxy/workflows/exceptions.py): an inbox item for people (a step that
# failed, gave up, or an instance that stalled), a step moved to another agent, a person's decision
WORKFLOW_EVENTS = ("workflow-escalated", "workflow-rerouted", "workflow-decided")
# "budget.*": a budget window at its soft threshold, or exhausted (proxy/limits/budget_report.py)
BUDGET_EVENTS = ("budget.soft_threshold", "budget.exhausted")
EVENTS = ("requested", "voted", "escalated", "approved", "denied", "expired", "forwarded", "handoff", *WORKFLOW_EVENTS,
          *BUDGET_EVENTS)
USER_AGENT = "Proctor-Notifier/1"
_DROP_LOG_INTERVAL = 60.0
_MAX_VALUE = 300  # longest value (agent, action, resource...) shown in a Slack message


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    format: Literal["generic", "slack"] = "generic"
    events: list[str] = Field(default_factory=lambda: ["requested", "escalated"], min_length=1)
    groups: list[str] | None = None
    secret_env: str | None = None
    timeout_seconds: float = Field(default=5, gt=0, le=300)
    max_attempts: int = Field(default=6, ge=1, le=50)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        v = v.strip()
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            raise ValueError(f"invalid webhook URL: {e}") from None
        if parts.scheme not in ("http", "https"):
            raise ValueError("webhook URL must use http or https")
        if not parts.hostname:
            raise ValueError("webhook URL must name a host")
        if any(c.isspace() for c in v):
            raise ValueError("webhook URL must not contain whitespace")
        return v

    @field_validator("events")
    @classmethod
    def _check_events(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e not in EVENTS]
        if unknown:
            raise ValueError(f"unknown approval event(s) {unknown}; allowed: {', '.join(EVENTS)}")
        return list(dict.fromkeys(v))

    @field_validator("secret_env")
    @classmethod
    def _check_secret_env(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("secret_env must name an environment variable")
        return v


def _label(url: str) -> str:
    """scheme://host[:port] of a hook: safe to log (Slack webhook paths are secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _now_iso() -> str:
    return _iso(time.time())  # type: ignore[return-value]


def _safe_url(url: Any) -> str:
    """The held request's URL without userinfo, with JWTs redacted."""
    if not isinstance(url, str):
        return ""
    try:
        parts = urlsplit(url)
        if "@" in parts.netloc:
            url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    except ValueError:
        return ""
    return redact(url)


def _resource(a: Approval) -> str:
    return f"{a.resource_type}::{json.dumps(a.resource_id, ensure_ascii=False)}"


def _console_link(console_url: str | None, approval_id: str) -> str | None:
    if not console_url:
        return None
    return f"{console_url.rstrip('/')}/approvals/{quote(approval_id, safe='')}"


def generic_payload(event: str, a: Approval, console_url: str | None, extra: dict | None = None) -> dict:
    """The generic JSON body, without `sent_at` (stamped per attempt)."""
    request = a.request if isinstance(a.request, dict) else {}
    body: dict[str, Any] = {
        "type": f"proctor.approval.{event}",
        "approval": {
            "id": a.id,
            "state": a.state,
            "agent_id": a.agent_id,
            "action": a.action,
            "resource": _resource(a),
            "connector": a.connector,
            "groups": dict(a.groups or {}),
            "created_at": _iso(a.created_at),
            "expires_at": _iso(a.expires_at),
            "decided_by": a.decided_by,
            "reason": a.reason,
            "decision_id": a.decision_id,
            # Only method and URL: headers and body may carry secrets.
            "request": {"method": str(request.get("method") or ""), "url": _safe_url(request.get("url"))},
        },
        "console_url": _console_link(console_url, a.id),
    }
    if extra:
        body["extra"] = dict(extra)
    return body


def mrkdwn_escape(value: Any) -> str:
    """Escape Slack's control characters (&, <, >) in untrusted text."""
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _code(value: Any) -> str:
    """An untrusted value inside a mrkdwn code span (no backticks can close it early)."""
    text = str(value)
    if len(text) > _MAX_VALUE:
        text = text[: _MAX_VALUE - 1] + "…"
    return "`" + mrkdwn_escape(text.replace("`", "'")) + "`"


def _headline(event: str, a: Approval, extra: dict | None) -> tuple[str, str]:
    """(mrkdwn title, plain-text title) for an event."""
    by = a.decided_by or (extra or {}).get("by")
    if event == "requested":
        return "*Approval needed*", "Approval needed"
    if event == "escalated":
        return "*Approval escalated* (still pending)", "Approval escalated (still pending)"
    if event == "approved":
        return (f"*Approved* by {_code(by)}", f"Approved by {by}") if by else ("*Approved*", "Approved")
    if event == "denied":
        return (f"*Denied* by {_code(by)}", f"Denied by {by}") if by else ("*Denied*", "Denied")
    if event == "expired":
        return "*Approval expired* (no decision in time)", "Approval expired"
    if event == "forwarded":
        return "*Approved request forwarded*", "Approved request forwarded"
    return f"*Approval {mrkdwn_escape(event)}*", f"Approval {event}"


def slack_payload(event: str, a: Approval, console_url: str | None, extra: dict | None = None) -> dict:
    """A Slack incoming-webhook message (Block Kit, with a plain `text` fallback)."""
    title, plain_title = _headline(event, a, extra)
    resource = _resource(a)
    summary = f"{title} — {_code(a.agent_id)} wants {_code(a.action)} on {_code(resource)}"
    fallback = mrkdwn_escape(f"{plain_title}: {a.agent_id} wants {a.action} on {resource}")[:3000]
    groups = ", ".join(f"{mrkdwn_escape(g)} ({int(n)})" for g, n in (a.groups or {}).items()) or "—"
    fields = [{"type": "mrkdwn", "text": f"*Groups*\n{groups}"[:2000]}]
    if event in ("requested", "escalated"):
        exp = int(a.expires_at)
        fields.append({"type": "mrkdwn", "text": f"*Expires*\n<!date^{exp}^{{date_short_pretty}} {{time}}|{_iso(a.expires_at)}>"})
    else:
        fields.append({"type": "mrkdwn", "text": f"*State*\n{mrkdwn_escape(a.state)}"})
    if a.reason and event in ("approved", "denied"):
        fields.append({"type": "mrkdwn", "text": f"*Reason*\n{mrkdwn_escape(a.reason)[:1900]}"})
    blocks: list[dict] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": summary[:3000]}, "fields": fields},
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": f"Approval {_code(a.id)} · connector {_code(a.connector)}"[:3000]}],
        },
    ]
    link = _console_link(console_url, a.id)
    if link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Review in console" if event in ("requested", "escalated") else "Open in console"},
                        "url": link[:3000],
                        "action_id": "proctor_open_approval",
                    }
                ],
            }
        )
    return {"text": fallback, "blocks": blocks}


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - time.time()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), cap)


@dataclass(slots=True)
class _Item:
    delivery_id: str
    event: str
    approval_id: str  # (a handoff: the claim id)
    payload: dict
    family: str = "approval"  # X-Proctor-Event: proctor.<family>.<event>


@dataclass
class _Hook:
    config: WebhookConfig
    label: str
    queue: asyncio.Queue
    groups: frozenset[str] | None
    workers: list[asyncio.Task] = field(default_factory=list)


class Notifier:
    """Sends approval events to webhooks; `notify()` is safe on the request path."""

    def __init__(
        self,
        hooks: list[WebhookConfig],
        console_url: str | None,
        queue_size: int = 10000,
        metrics_hook: Callable[[str], None] | None = None,
        *,
        workers: int = 4,
        backoff_base: float = 0.5,
        backoff_factor: float = 2.0,
        backoff_cap: float = 30.0,
    ) -> None:
        self.console_url = console_url.rstrip("/") if console_url else None
        self.metrics_hook = metrics_hook
        self.workers = max(1, int(workers))
        self.backoff_base = backoff_base
        self.backoff_factor = backoff_factor
        self.backoff_cap = backoff_cap
        self.stats: dict[str, int] = {"sent": 0, "failed": 0, "retried": 0, "dropped": 0}
        self._hooks = [
            _Hook(
                config=h,
                label=_label(h.url),
                queue=asyncio.Queue(maxsize=max(1, int(queue_size))),
                groups=frozenset(h.groups) if h.groups is not None else None,
            )
            for h in hooks
        ]
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._last_drop_log = float("-inf")
        for h in self._hooks:
            env = h.config.secret_env
            if env and not os.environ.get(env):
                log.warning("webhook %s: signing secret variable %s is not set; deliveries will fail until it is", h.label, env)

    @property
    def dropped(self) -> int:
        return self.stats["dropped"]

    def queued(self) -> int:
        """Items waiting in the queues (not counting deliveries in progress)."""
        return sum(h.queue.qsize() for h in self._hooks)

    # -- request path -----------------------------------------------------

    def notify(self, event: str, approval: Approval, extra: dict | None = None) -> None:
        """Queue `event` for every hook that wants it. Never blocks, never raises."""
        try:
            if event not in EVENTS:
                log.warning("ignoring unknown approval event %r", event)
                return
            hooks = self._matching(event, approval, (extra or {}).get("to"))
            if not hooks:
                return
            items = self._items(event, approval, extra, hooks)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    running = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is not loop:  # another thread: hand over to the notifier's loop
                    loop.call_soon_threadsafe(self._enqueue, items)
                    return
            self._enqueue(items)
        except Exception:  # noqa: BLE001 - notifications must never break a request
            log.exception("approval notification for %r failed", event)

    def notify_handoff(self, claim: dict[str, Any]) -> None:
        """Queue a handoff (a `claim` event line as a dict, proxy/record/model.py ClaimEvent)
        for every hook subscribed to `handoff` whose groups (if any) include the human group
        it went to. Never blocks, never raises."""
        try:
            group = claim.get("to_queue")
            hooks = [h for h in self._hooks if "handoff" in h.config.events
                     and (h.groups is None or (group is not None and group in h.groups))]
            if not hooks:
                return
            who = claim.get("to") or f"the inbox of {group}"
            text = (f"Proctor: {claim.get('resource')} ({claim.get('connector')}) handed off by "
                    f"{claim.get('by')} from {claim.get('holder')} to {who}")
            generic = {"type": "proctor.claim.handoff", "claim": dict(claim), "console_url": self.console_url}
            slack = {"text": mrkdwn_escape(text)[:2000]}
            items = [(h, _Item(uuid.uuid4().hex, "handoff", str(claim.get("claim_id", "")),
                               slack if h.config.format == "slack" else generic, family="claim"))
                     for h in hooks]
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    running = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is not loop:  # another thread: hand over to the notifier's loop
                    loop.call_soon_threadsafe(self._enqueue, items)
                    return
            self._enqueue(items)
        except Exception:  # noqa: BLE001 - notifications must never break a request
            log.exception("handoff notification failed")

    def notify_workflow(self, event: dict[str, Any]) -> None:
        """Queue a workflow exception (a `workflow` event line as a dict, proxy/record/model.py
        WorkflowEvent) for every hook subscribed to `workflow-<event>` whose groups (if any)
        include the item's people group. Never blocks, never raises."""
        try:
            name = f"workflow-{event.get('event')}"
            if name not in WORKFLOW_EVENTS:
                return
            group = event.get("group")
            hooks = [h for h in self._hooks if name in h.config.events
                     and (h.groups is None or (group is not None and group in h.groups))]
            if not hooks:
                return
            where = f"workflow {event.get('workflow')} instance {event.get('instance')}" + (
                f" step {event.get('step')}" if event.get("step") else "")
            if event.get("event") == "escalated":
                what = f"needs a person ({event.get('reason')}): in the inbox of {group or 'the operators'}"
            elif event.get("event") == "rerouted":
                what = f"moved from {event.get('agent')} to {event.get('to')} after {event.get('failures')} failures"
            else:
                what = f"{event.get('resolution')} decided by {event.get('by')}"
            generic = {"type": f"proctor.{name.replace('-', '.', 1)}", "workflow": dict(event),
                       "console_url": self.console_url}
            slack = {"text": mrkdwn_escape(f"Proctor: {where} {what}")[:2000]}
            items = [(h, _Item(uuid.uuid4().hex, name.split("-", 1)[1], str(event.get("escalation_id")
                                                                              or event.get("instance") or ""),
                               slack if h.config.format == "slack" else generic, family="workflow"))
                     for h in hooks]
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    running = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is not loop:  # another thread: hand over to the notifier's loop
                    loop.call_soon_threadsafe(self._enqueue, items)
                    return
            self._enqueue(items)
        except Exception:  # noqa: BLE001 - notifications must never break a request
            log.exception("workflow notification failed")

    def notify_budget(self, event: dict[str, Any]) -> None:
        """Queue a budget event (a `budget` event line as a dict, proxy/record/model.py
        BudgetEventRecord) for every hook subscribed to `budget.<event>` whose groups (if any)
        include the group the budget's key names (a budget keyed by group). Never blocks,
        never raises."""
        try:
            name = f"budget.{event.get('event')}"
            if name not in BUDGET_EVENTS:
                return
            raw = event.get("key")
            key: dict[str, Any] = raw if isinstance(raw, dict) else {}
            group = key.get("group")
            hooks = [h for h in self._hooks if name in h.config.events
                     and (h.groups is None or (group is not None and group in h.groups))]
            if not hooks:
                return
            shown = ", ".join(f"{d} {'(none)' if v is None else v}" for d, v in key.items()) or "shared"
            currency = f" {event.get('currency')}" if event.get("currency") else ""
            amounts = f"spent {event.get('spent')} + reserved {event.get('reserved')} of {event.get('limit')}{currency}"
            if event.get("event") == "exhausted":
                outcome = str(event.get("outcome"))
                what = {"exhausted": "refused", "held": "held for a budget extension",
                        "shadow_exhausted": "let through (shadow budget)",
                        "extended": "let through (budget extension)"}.get(outcome, outcome)
                text = (f"Proctor: budget {event.get('budget')} ({shown}) is exhausted ({amounts}): "
                        f"{event.get('agent')} {event.get('action')} {what}")
            else:
                text = (f"Proctor: budget {event.get('budget')} ({shown}) reached its soft threshold "
                        f"({amounts}) with {event.get('agent')} {event.get('action')}")
            generic = {"type": f"proctor.{name}", "budget": dict(event), "console_url": self.console_url}
            slack = {"text": mrkdwn_escape(text)[:2000]}
            items = [(h, _Item(uuid.uuid4().hex, str(event.get("event")), str(event.get("decision_id") or ""),
                               slack if h.config.format == "slack" else generic, family="budget"))
                     for h in hooks]
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    running = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is not loop:  # another thread: hand over to the notifier's loop
                    loop.call_soon_threadsafe(self._enqueue, items)
                    return
            self._enqueue(items)
        except Exception:  # noqa: BLE001 - notifications must never break a request
            log.exception("budget notification failed")

    def _matching(self, event: str, approval: Approval, extra_group: str | None = None) -> list[_Hook]:
        out = []
        for h in self._hooks:
            if event not in h.config.events:
                continue
            groups = set(approval.groups or {})
            if event == "escalated" and extra_group is not None:
                groups.add(extra_group)  # a hook for the escalation group hears about escalations
            if h.groups is not None and not h.groups.intersection(groups):
                continue
            out.append(h)
        return out

    def _items(self, event: str, a: Approval, extra: dict | None, hooks: list[_Hook]) -> list[tuple[_Hook, _Item]]:
        payloads: dict[str, dict] = {}
        out = []
        for h in hooks:
            fmt = h.config.format
            if fmt not in payloads:
                build = slack_payload if fmt == "slack" else generic_payload
                payloads[fmt] = build(event, a, self.console_url, extra)
            out.append((h, _Item(uuid.uuid4().hex, event, a.id, payloads[fmt])))
        return out

    def _enqueue(self, items: list[tuple[_Hook, _Item]]) -> None:
        for h, item in items:
            if self._closed:
                self._drop(h, item, "notifier closed")
                continue
            try:
                h.queue.put_nowait(item)
            except asyncio.QueueFull:
                self._drop(h, item, "queue full")

    def _drop(self, h: _Hook, item: _Item, why: str) -> None:
        self._count("dropped")
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.warning(
                "dropping approval notifications (%s): webhook %s, event %s, approval %s; %d dropped so far",
                why, h.label, item.event, item.approval_id, self.stats["dropped"],
            )

    def _count(self, kind: str) -> None:
        self.stats[kind] += 1
        if self.metrics_hook is not None:
            try:
                self.metrics_hook(kind)
            except Exception:  # noqa: BLE001
                log.debug("notification metrics hook failed", exc_info=True)

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(
            trust_env=False,
            headers={"User-Agent": USER_AGENT},
            connector=aiohttp.TCPConnector(limit=max(10, self.workers * len(self._hooks))),
        )
        for i, h in enumerate(self._hooks):
            h.workers = [
                asyncio.create_task(self._worker(h), name=f"proctor-notify-{i}-{n}") for n in range(self.workers)
            ]

    async def close(self, drain_seconds: float = 2.0) -> None:
        """Deliver what is queued within `drain_seconds`, then stop the workers."""
        if self._closed:
            return
        self._closed = True
        started = self._session is not None
        if started and drain_seconds > 0:
            joins = [asyncio.ensure_future(h.queue.join()) for h in self._hooks]
            if joins:
                _done, pending = await asyncio.wait(joins, timeout=drain_seconds)
                for t in pending:
                    t.cancel()
        tasks = [t for h in self._hooks for t in h.workers]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        left = 0
        for h in self._hooks:
            h.workers = []
            while not h.queue.empty():
                h.queue.get_nowait()
                h.queue.task_done()
                left += 1
        if left:
            log.warning("approval notifier closed with %d undelivered notification(s)", left)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- delivery ---------------------------------------------------------

    async def _worker(self, h: _Hook) -> None:
        while True:
            item = await h.queue.get()
            try:
                await self._deliver(h, item)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("webhook %s: delivering %s for approval %s failed", h.label, item.event, item.approval_id)
                self._count("failed")
            finally:
                h.queue.task_done()

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_cap, self.backoff_base * self.backoff_factor ** (attempt - 1))
        return random.uniform(0, ceiling)

    def _body(self, h: _Hook, item: _Item) -> bytes:
        payload = item.payload
        if h.config.format == "generic":
            payload = {**payload, "sent_at": _now_iso()}
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()

    async def _deliver(self, h: _Hook, item: _Item) -> None:
        cfg = h.config
        assert self._session is not None
        secret: bytes | None = None
        if cfg.secret_env:
            value = os.environ.get(cfg.secret_env)
            if not value:
                log.error(
                    "webhook %s: signing secret variable %s is not set; not sending %s for approval %s",
                    h.label, cfg.secret_env, item.event, item.approval_id,
                )
                self._count("failed")
                return
            secret = value.encode()
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_seconds)
        why = ""
        for attempt in range(1, cfg.max_attempts + 1):
            body = self._body(h, item)
            headers = {
                "Content-Type": "application/json",
                "X-Proctor-Event": f"proctor.{item.family}.{item.event}",
                "X-Proctor-Delivery": item.delivery_id,
            }
            if secret is not None:
                headers["X-Proctor-Signature"] = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            wait: float | None = None
            try:
                async with self._session.post(
                    cfg.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
                ) as resp:
                    status = resp.status
                    if 200 <= status < 300:
                        self._count("sent")
                        return
                    why = f"HTTP {status}"
                    if status != 429 and status < 500:
                        log.warning(
                            "webhook %s refused %s for approval %s (%s); not retrying",
                            h.label, item.event, item.approval_id, why,
                        )
                        self._count("failed")
                        return
                    if status in (429, 503):
                        wait = _retry_after(resp.headers.get("Retry-After"), self.backoff_cap)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                text = str(e).replace(cfg.url, h.label)  # Slack webhook paths are secrets
                why = f"{type(e).__name__}: {text}" if text else type(e).__name__
            if attempt >= cfg.max_attempts:
                break
            self._count("retried")
            delay = wait if wait is not None else self._backoff(attempt)
            log.debug("webhook %s: %s, retry %d in %.2fs", h.label, why, attempt, delay)
            await asyncio.sleep(delay)
        log.warning(
            "webhook %s: giving up on %s for approval %s after %d attempt(s) (%s)",
            h.label, item.event, item.approval_id, cfg.max_attempts, redact(why),
        )
        self._count("failed")
