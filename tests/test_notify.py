"""Approval webhook notifications against a real loopback aiohttp webhook server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from collections import defaultdict
from dataclasses import dataclass

import pytest
from aiohttp import web
from pydantic import ValidationError

from proxy.approvals.notify import Notifier, WebhookConfig, _retry_after
from proxy.store.models import Approval

SECRETS = ("SECRET-TOKEN-123", "SECRET-BODY-456", "SECRET-DERIVED-789", "SECRET-USERINFO")


def make_approval(**kw) -> Approval:
    now = 1_700_000_000.0
    base = dict(
        id="apr_abcdefghijklmnopqrst",
        state="pending",
        created_at=now,
        expires_at=now + 900,
        agent_id="billing-bot",
        action="crm.contact.delete",
        resource_type="Contact",
        resource_id="003XYZ",
        connector="crm",
        groups={"finance": 1},
        fingerprint="ab" * 16,
        idempotency_key=None,
        mode="sync",
        decision_id="dec_123",
        request={
            "method": "DELETE",
            "url": "https://user:SECRET-USERINFO@crm.example.com/contacts/003XYZ?force=1",
            "headers": {"Authorization": "Bearer SECRET-TOKEN-123", "Cookie": "s=SECRET-TOKEN-123"},
            "body": '{"password": "SECRET-BODY-456"}',
        },
        derived={"policy_ids": ["p1"], "attributes": {"ssn": "SECRET-DERIVED-789"}},
    )
    base.update(kw)
    return Approval(**base)


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


class HookServer:
    """Records every POST; per path, a plan of responses: status ints, "hang" or "slow"."""

    def __init__(self) -> None:
        self.received: dict[str, list[Received]] = defaultdict(list)
        self.plan: dict[str, list] = defaultdict(list)
        self.default: dict[str, object] = {}
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def all(self) -> list[Received]:
        return [r for rs in self.received.values() for r in rs]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received[request.path].append(Received(request.path, dict(request.headers), body))
        plan = self.plan[request.path]
        step = plan.pop(0) if plan else self.default.get(request.path, 200)
        if step == "hang":
            await self.release.wait()
            return web.Response(status=200)
        if step == "slow":
            await asyncio.sleep(0.05)
            return web.Response(status=200)
        if step == 429:
            return web.Response(status=429, headers={"Retry-After": "0"})
        if step == 503:
            return web.Response(status=503, headers={"Retry-After": "0"})
        if step == 302:
            raise web.HTTPFound("/redirected")
        return web.Response(status=int(step))

    async def __aenter__(self) -> "HookServer":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self.runner, sock).start()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release.set()
        assert self.runner is not None
        await self.runner.cleanup()


def run(coro, timeout: float = 8.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(pred, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for condition")
        await asyncio.sleep(0.005)


def fast(hooks, console_url="https://proctor.example.com/", **kw) -> Notifier:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_cap", 0.05)
    return Notifier(hooks, console_url, **kw)


def assert_no_secrets(raw: bytes) -> None:
    text = raw.decode()
    for s in SECRETS:
        assert s not in text
    assert "Authorization" not in text and "Cookie" not in text and "password" not in text


# -- configuration -------------------------------------------------------------


def test_config_validation():
    WebhookConfig(url="https://hooks.slack.com/services/T/B/X", format="slack", events=["requested", "denied"])
    for bad in ("ftp://example.com/x", "http:///nohost", "example.com/hook", "https://exa mple.com/"):
        with pytest.raises(ValidationError):
            WebhookConfig(url=bad)
    with pytest.raises(ValidationError):
        WebhookConfig(url="https://example.com/", events=["requested", "nope"])
    with pytest.raises(ValidationError):
        WebhookConfig(url="https://example.com/", format="teams")
    with pytest.raises(ValidationError):
        WebhookConfig(url="https://example.com/", unknown=1)
    with pytest.raises(ValidationError):
        WebhookConfig(url="https://example.com/", max_attempts=0)
    assert WebhookConfig(url="https://example.com/").events == ["requested", "escalated"]


def test_retry_after_parsing():
    assert _retry_after("0", 30) == 0
    assert _retry_after("12", 30) == 12
    assert _retry_after("3600", 30) == 30
    assert _retry_after("-5", 30) == 0
    assert _retry_after("garbage", 30) is None
    assert _retry_after(None, 30) is None


# -- payloads --------------------------------------------------------------------


def test_generic_payload_shape_and_no_request_secrets():
    async def main():
        async with HookServer() as srv:
            n = fast([WebhookConfig(url=srv.url("/g"), events=["requested", "approved"])])
            await n.start()
            n.notify("requested", make_approval())
            n.notify("approved", make_approval(state="approved", decided_by="alice", reason="ok & fine", decided_at=1_700_000_100.0))
            await until(lambda: len(srv.received["/g"]) == 2)
            await n.close()
            return srv.received["/g"], n.stats

    received, stats = run(main())
    assert stats == {"sent": 2, "failed": 0, "retried": 0, "dropped": 0}
    by_type = {r.json()["type"]: r for r in received}
    assert set(by_type) == {"proctor.approval.requested", "proctor.approval.approved"}
    r = by_type["proctor.approval.requested"]
    body = r.json()
    assert set(body) == {"type", "approval", "console_url", "sent_at"}
    assert body["console_url"] == "https://proctor.example.com/approvals/apr_abcdefghijklmnopqrst"
    assert body["sent_at"].endswith("Z")
    a = body["approval"]
    assert a == {
        "id": "apr_abcdefghijklmnopqrst",
        "state": "pending",
        "agent_id": "billing-bot",
        "action": "crm.contact.delete",
        "resource": 'Contact::"003XYZ"',
        "connector": "crm",
        "groups": {"finance": 1},
        "created_at": "2023-11-14T22:13:20.000Z",
        "expires_at": "2023-11-14T22:28:20.000Z",
        "decided_by": None,
        "reason": None,
        "decision_id": "dec_123",
        # no userinfo, no query values (docs/security.md#no-secret-in-free-text)
        "request": {"method": "DELETE", "url": "https://crm.example.com/contacts/003XYZ?[REDACTED]"},
    }
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["X-Proctor-Event"] == "proctor.approval.requested"
    assert r.headers["X-Proctor-Delivery"]
    assert "X-Proctor-Signature" not in r.headers
    approved = by_type["proctor.approval.approved"].json()["approval"]
    assert approved["decided_by"] == "alice" and approved["reason"] == "ok & fine"
    for rec in received:
        assert_no_secrets(rec.body)
        for k, v in rec.headers.items():
            assert all(s not in v for s in SECRETS), k


def test_slack_payload_shape_and_escaping():
    async def main():
        async with HookServer() as srv:
            hooks = [
                WebhookConfig(url=srv.url("/s"), format="slack", events=list(("requested", "approved", "denied", "expired"))),
                WebhookConfig(url=srv.url("/s-noconsole"), format="slack"),
            ]
            n = fast(hooks[:1])
            n2 = fast(hooks[1:], console_url=None)
            await n.start()
            await n2.start()
            evil = make_approval(agent_id="bot<@U123>&co", resource_id='x"<!channel>')
            n.notify("requested", evil)
            n.notify("approved", make_approval(state="approved", decided_by="alice"))
            n.notify("denied", make_approval(state="denied", decided_by="bob", reason="no <way>"))
            n.notify("expired", make_approval(state="expired"))
            n2.notify("requested", make_approval())
            await until(lambda: len(srv.received["/s"]) == 4 and len(srv.received["/s-noconsole"]) == 1)
            await n.close()
            await n2.close()
            return srv.received

    received = run(main())
    msgs = [r.json() for r in received["/s"]]
    for m, raw in zip(msgs, received["/s"]):
        assert set(m) == {"text", "blocks"} and m["text"]
        assert_no_secrets(raw.body)
    texts = {m["blocks"][0]["text"]["text"].split(" — ")[0]: m for m in msgs}
    assert set(texts) == {"*Approval needed*", "*Approved* by `alice`", "*Denied* by `bob`", "*Approval expired* (no decision in time)"}

    req = texts["*Approval needed*"]
    section, context, actions = req["blocks"]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    text = section["text"]["text"]
    assert text == '*Approval needed* — `bot&lt;@U123&gt;&amp;co` wants `crm.contact.delete` on `Contact::"x\\"&lt;!channel&gt;"`'
    assert "<!channel>" not in json.dumps(req) and "<@U123>" not in json.dumps(req)
    assert "&lt;@U123&gt;" in req["text"]
    field_text = [f["text"] for f in section["fields"]]
    assert field_text[0] == "*Groups*\nfinance (1)"
    assert field_text[1].startswith("*Expires*\n<!date^1700000900^")
    assert context["type"] == "context" and "apr_abcdefghijklmnopqrst" in context["elements"][0]["text"]
    assert actions["type"] == "actions"
    button = actions["elements"][0]
    assert button["type"] == "button"
    assert button["url"] == "https://proctor.example.com/approvals/apr_abcdefghijklmnopqrst"

    denied = texts["*Denied* by `bob`"]
    assert any(f["text"] == "*Reason*\nno &lt;way&gt;" for f in denied["blocks"][0]["fields"])

    no_console = received["/s-noconsole"][0].json()
    assert [b["type"] for b in no_console["blocks"]] == ["section", "context"]


def test_hmac_signature(monkeypatch):
    monkeypatch.setenv("PROCTOR_TEST_HOOK_SECRET", "s3cr3t")
    monkeypatch.delenv("PROCTOR_TEST_MISSING_SECRET", raising=False)

    async def main():
        async with HookServer() as srv:
            n = fast(
                [
                    WebhookConfig(url=srv.url("/signed"), secret_env="PROCTOR_TEST_HOOK_SECRET"),
                    WebhookConfig(url=srv.url("/unsignable"), secret_env="PROCTOR_TEST_MISSING_SECRET"),
                ]
            )
            await n.start()
            n.notify("requested", make_approval())
            await until(lambda: n.stats["sent"] + n.stats["failed"] == 2)
            await n.close()
            return srv.received, n.stats

    received, stats = run(main())
    assert stats["sent"] == 1 and stats["failed"] == 1
    assert received["/unsignable"] == []  # never sent unsigned
    (r,) = received["/signed"]
    expected = "sha256=" + hmac.new(b"s3cr3t", r.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(r.headers["X-Proctor-Signature"], expected)
    wrong = "sha256=" + hmac.new(b"other", r.body, hashlib.sha256).hexdigest()
    assert r.headers["X-Proctor-Signature"] != wrong


# -- delivery --------------------------------------------------------------------


def test_retry_then_success_and_retry_after_honoured():
    kinds: list[str] = []

    async def main():
        async with HookServer() as srv:
            srv.plan["/flaky"] = [500, 502, 200]
            # Backoff of 10 s: only Retry-After: 0 lets these finish inside the test.
            srv.plan["/limited"] = [429, 503, 200]
            n = fast([WebhookConfig(url=srv.url("/flaky"))], metrics_hook=kinds.append)
            slow_backoff = Notifier(
                [WebhookConfig(url=srv.url("/limited"))], None, backoff_base=10, backoff_cap=10
            )
            await n.start()
            await slow_backoff.start()
            n.notify("requested", make_approval())
            slow_backoff.notify("requested", make_approval())
            await until(lambda: n.stats["sent"] == 1 and slow_backoff.stats["sent"] == 1, timeout=3)
            await n.close()
            await slow_backoff.close()
            return srv.received, n.stats, slow_backoff.stats

    received, stats, stats2 = run(main())
    assert len(received["/flaky"]) == 3 and len(received["/limited"]) == 3
    # Every attempt carries the same delivery id.
    assert len({r.headers["X-Proctor-Delivery"] for r in received["/flaky"]}) == 1
    assert stats == {"sent": 1, "failed": 0, "retried": 2, "dropped": 0}
    assert stats2 == {"sent": 1, "failed": 0, "retried": 2, "dropped": 0}
    assert kinds == ["retried", "retried", "sent"]


def test_client_error_gives_up_immediately_and_redirect_not_followed():
    async def main():
        async with HookServer() as srv:
            srv.plan["/bad"] = [400]
            srv.plan["/moved"] = [302]
            n = fast([WebhookConfig(url=srv.url("/bad")), WebhookConfig(url=srv.url("/moved"))])
            await n.start()
            n.notify("requested", make_approval())
            await until(lambda: n.stats["failed"] == 2)
            await asyncio.sleep(0.1)  # any (wrong) retry would show up now
            await n.close()
            return srv.received, n.stats

    received, stats = run(main())
    assert len(received["/bad"]) == 1 and len(received["/moved"]) == 1
    assert received["/redirected"] == []
    assert stats == {"sent": 0, "failed": 2, "retried": 0, "dropped": 0}


def test_max_attempts_then_failed():
    async def main():
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()  # nothing listens there: connection refused
        async with HookServer() as srv:
            srv.default["/down"] = 500
            n = fast(
                [
                    WebhookConfig(url=srv.url("/down"), max_attempts=3),
                    WebhookConfig(url=f"http://127.0.0.1:{dead_port}/x", max_attempts=2),
                ]
            )
            await n.start()
            n.notify("requested", make_approval())
            await until(lambda: n.stats["failed"] == 2)
            await asyncio.sleep(0.1)
            await n.close()
            return srv.received, n.stats

    received, stats = run(main())
    assert len(received["/down"]) == 3
    assert stats == {"sent": 0, "failed": 2, "retried": 3, "dropped": 0}


def test_overflow_drops_without_blocking_and_slow_hook_does_not_delay_others():
    async def main():
        async with HookServer() as srv:
            srv.default["/hang"] = "hang"
            n = fast(
                [
                    WebhookConfig(url=srv.url("/hang"), timeout_seconds=30),
                    WebhookConfig(url=srv.url("/ok")),
                ],
                queue_size=5,
                workers=2,
            )
            await n.start()
            # Occupy both workers of the hanging hook; the other hook still delivers.
            n.notify("requested", make_approval(id="apr_first"))
            n.notify("requested", make_approval(id="apr_second"))
            await until(lambda: len(srv.received["/hang"]) == 2 and len(srv.received["/ok"]) == 2, timeout=2)
            assert n.stats["sent"] == 2

            durations = []
            approval = make_approval()
            for _ in range(1000):
                t0 = time.perf_counter()
                n.notify("requested", approval)  # must never raise
                durations.append(time.perf_counter() - t0)
            stats_after_burst = dict(n.stats)

            t0 = time.monotonic()
            await n.close(drain_seconds=0.3)
            close_took = time.monotonic() - t0
            n.notify("requested", approval)  # after close: dropped, no error
            return durations, stats_after_burst, close_took, n.stats, len(srv.received["/ok"])

    durations, burst, close_took, final, ok_count = run(main())
    # Each hook's queue holds 5; the rest of the 1000 per hook are dropped.
    assert burst["dropped"] == 2 * (1000 - 5)
    assert sum(durations) < 0.5, sum(durations)
    assert sorted(durations)[len(durations) // 2] < 0.0005  # median well under a millisecond
    assert close_took < 2.0
    assert ok_count == 2 + 5  # the queued items of the healthy hook drained on close
    assert final["dropped"] == burst["dropped"] + 2


def test_events_and_groups_filters():
    async def main():
        async with HookServer() as srv:
            n = fast(
                [
                    WebhookConfig(url=srv.url("/decisions"), events=["approved", "denied"]),
                    WebhookConfig(url=srv.url("/finance"), groups=["finance", "treasury"]),
                    WebhookConfig(url=srv.url("/all")),
                ]
            )
            await n.start()
            n.notify("requested", make_approval(id="apr_fin", groups={"finance": 2}))
            n.notify("requested", make_approval(id="apr_sec", groups={"security": 1}))
            n.notify("escalated", make_approval(id="apr_sec2", groups={"security": 1, "treasury": 1}))
            n.notify("approved", make_approval(id="apr_ok", state="approved", groups={"security": 1}))
            n.notify("forwarded", make_approval(id="apr_fwd"))  # nobody subscribed
            n.notify("bogus", make_approval(id="apr_bogus"))  # unknown event: ignored
            await until(lambda: n.stats["sent"] == 6)
            await asyncio.sleep(0.05)
            await n.close()
            return {p: sorted((r.json()["type"], r.json()["approval"]["id"]) for r in rs) for p, rs in srv.received.items()}, n.stats

    got, stats = run(main())
    assert got["/decisions"] == [("proctor.approval.approved", "apr_ok")]
    assert got["/finance"] == [("proctor.approval.escalated", "apr_sec2"), ("proctor.approval.requested", "apr_fin")]
    assert got["/all"] == [
        ("proctor.approval.escalated", "apr_sec2"),
        ("proctor.approval.requested", "apr_fin"),
        ("proctor.approval.requested", "apr_sec"),
    ]
    assert stats == {"sent": 6, "failed": 0, "retried": 0, "dropped": 0}


def test_close_drains_queue_and_notify_from_other_thread():
    async def main():
        async with HookServer() as srv:
            srv.default["/slow"] = "slow"  # 50 ms per delivery, one worker: 10 items take ~0.5 s
            n = fast([WebhookConfig(url=srv.url("/slow"))], workers=1)
            await n.start()
            for i in range(8):
                n.notify("requested", make_approval(id=f"apr_{i}"))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, n.notify, "requested", make_approval(id="apr_thread1"))
            await loop.run_in_executor(None, n.notify, "requested", make_approval(id="apr_thread2"))
            assert len(srv.received["/slow"]) < 10
            await n.close(drain_seconds=3)
            return srv.received["/slow"], n.stats

    received, stats = run(main())
    ids = sorted(r.json()["approval"]["id"] for r in received)
    assert ids == sorted([f"apr_{i}" for i in range(8)] + ["apr_thread1", "apr_thread2"])
    assert stats == {"sent": 10, "failed": 0, "retried": 0, "dropped": 0}


def test_notify_never_raises_on_bad_input():
    n = Notifier([WebhookConfig(url="http://127.0.0.1:9/")], None)
    n.notify("requested", None)  # type: ignore[arg-type]
    n.notify("requested", make_approval(groups=None, request=None))  # type: ignore[arg-type]
    assert n.stats["dropped"] == 0
