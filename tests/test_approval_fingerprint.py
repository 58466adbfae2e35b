"""An approval releases only what was approved (issue #10, item 3).

The approval fingerprint (format v2) binds a held request's method, canonical
target, body AND the values of the security-relevant headers: Content-Type,
Content-Encoding, Transfer-Encoding, Content-Language, the method-override
headers, and every header policies read (`limits.context_headers`). Headers
Proctor strips or replaces (the agent's credentials, a connector's injected
credential) are not bound, so a retry with a refreshed token still matches.
Approvers see the bound headers in the API and in `proctor approvals show` (here)
and in the console detail view (tests/test_console_browser.py).

Unit tests drive the fingerprint and the service on a real SQLite store; the
integration tests drive a real Proctor (hold policies from tests/test_approvals.py)
against the recording upstream: approve a request, retry it with another
Content-Type / charset / encoding / framing / method override / allow-listed
header -> held anew or refused, and the upstream saw nothing of it; the identical
retry is released exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from proxy.approvals.service import (
    SECURITY_HEADERS,
    ApprovalService,
    _preview,
    fingerprint_header_names,
    forwarded_view,
    legacy_request_fingerprint,
    request_fingerprint,
)
from proxy.audit.trail import Redactor
from proxy.config import ApprovalsConfig
from proxy.core.model import AgentIdentity, AgentRequest, Classification
from proxy.store.sqlite import SQLiteStore

# The hold policies, fixtures and helpers of the approval workflow tests (a held
# order: total > 500, tenant != 42, one `managers` approval).
from test_approvals import (  # noqa: F401 - hold_policies and make are fixtures
    MANAGERS,
    agent_client,
    agent_token,
    approver_token,
    events,
    hits,
    hold_policies,
    make,
    marker,
    order,
    order_url,
    show,
    vote,
)

DEFAULT_CONTEXT_HEADERS = ["content-type", "user-agent", "idempotency-key", "x-request-id"]


# ------------------------------------------------------------------------- unit
def request(**kw) -> AgentRequest:
    base = dict(
        method="POST",
        scheme="https",
        host="erp.example",
        port=443,
        path="/tenants/7/orders",
        query="a=1",
        headers={"content-type": "application/json", "authorization": "Bearer agent-token-1"},
        body=b'{"total": 750}',
        client_ip="127.0.0.1",
        mode="forward",
    )
    base.update(kw)
    return AgentRequest(**base)


def with_headers(**changes: str | None) -> AgentRequest:
    headers = {"content-type": "application/json", "authorization": "Bearer agent-token-1"}
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return request(headers=headers)


BOUND = fingerprint_header_names(DEFAULT_CONTEXT_HEADERS + ["x-change-ticket"], credentials=["x-api-key"])


def fp(req: AgentRequest, agent: str = "bot") -> str:
    return request_fingerprint(agent, req, BOUND)


def test_bound_header_set_comes_from_config_and_the_credentials():
    assert set(SECURITY_HEADERS) <= set(BOUND)
    assert {"user-agent", "idempotency-key", "x-request-id", "x-change-ticket"} <= set(BOUND)
    # credentials are bound by what reaches the upstream (forwarded_view); Proxy-Authorization never does
    assert {"authorization", "cookie", "x-api-key"} <= set(BOUND) and "proxy-authorization" not in BOUND
    assert {"forwarded", "x-forwarded-host", "x-original-url", "x-rewrite-url"} <= set(SECURITY_HEADERS)
    assert fingerprint_header_names(["X-Tenant "]) == tuple(
        sorted({*SECURITY_HEADERS, "x-tenant", "authorization", "cookie"}))
    assert list(BOUND) == sorted(BOUND)


@pytest.mark.parametrize(
    "changed",
    [
        {"content_type": "text/plain"},
        {"content_type": "application/json; charset=utf-16"},
        {"content_encoding": "identity"},
        {"transfer_encoding": "chunked"},
        {"content_language": "de"},
        {"x_http_method_override": "DELETE"},
        {"x_http_method": "DELETE"},
        {"x_method_override": "DELETE"},
        {"user_agent": "other-agent/2"},
        {"x_change_ticket": "CHG-2"},
        {"x_original_url": "/admin"},
        {"x_forwarded_host": "other.example"},
        {"forwarded": "host=other.example"},
        {"content_type": None},  # absent differs from present
        {"content_type": ""},  # ... and from empty
    ],
)
def test_a_bound_header_change_changes_the_fingerprint(changed):
    assert fp(with_headers(**changed)) != fp(with_headers())


def test_what_is_not_bound_does_not_change_the_fingerprint():
    # the agent's own token is stripped before forwarding (gateway mode: Authorization),
    # a connector's injected credential replaces X-Api-Key: neither reaches the upstream as sent
    unbound = {"authorization", "x-api-key"}
    base = fp(forwarded_view(with_headers(), unbound))
    assert base.startswith("v3:") and len(base) == 3 + 64
    assert fp(forwarded_view(with_headers(authorization="Bearer refreshed-token"), unbound)) == base
    assert fp(forwarded_view(with_headers(authorization=None, proxy_authorization="Basic Ym90OnRvaw=="), unbound)) == base
    assert fp(forwarded_view(with_headers(x_api_key="agent-supplied", x_attempt="2"), unbound)) == base


def test_credentials_that_reach_the_upstream_as_sent_are_bound():
    """An approval for one account never releases the request with another account's credentials."""
    base = fp(forwarded_view(with_headers(authorization="Bearer acct-A", cookie="session=A"), ()))
    assert fp(forwarded_view(with_headers(authorization="Bearer acct-B", cookie="session=A"), ())) != base
    assert fp(forwarded_view(with_headers(authorization="Bearer acct-A", cookie="session=B"), ())) != base
    assert fp(forwarded_view(with_headers(authorization="Bearer acct-A", cookie="session=A",
                                          proxy_authorization="Basic other"), ())) == base
    # the canonical target: host case and a trailing dot name the same host
    assert fp(request(host="ERP.Example.", headers=with_headers().headers)) == fp(with_headers())


def test_method_target_body_agent_and_bound_set_change_the_fingerprint():
    base = fp(with_headers())
    for other in (
        request(method="PUT"),
        request(scheme="http"),
        request(host="erp2.example"),
        request(port=8443),
        request(path="/tenants/8/orders"),
        request(query="a=2"),
        request(body=b'{"total": 751}'),
    ):
        assert fp(other) != base
    assert fp(with_headers(), agent="other-bot") != base
    # the same request under another bound set (a config change) never matches
    assert request_fingerprint("bot", with_headers(), BOUND + ("x-new",)) != base
    # the body cannot pose as part of the head (length-prefixed)
    a = request(query="", body=b"x")
    b = request(query="", body=b"")
    assert fp(a) != fp(b)


def test_preview_shows_bound_headers_redacted_and_never_credentials():
    redact = Redactor(keys=["x-change-ticket"], patterns=[r"\b\d{16}\b"])
    req = with_headers(
        x_api_key="agent-key",
        user_agent="bot/1 card 4111111111111111",
        x_change_ticket="CHG-1",
        proxy_authorization="Bearer tok",
    )
    pv = _preview(req, 1000, frozenset({"x-api-key"}), redact, BOUND)
    bound = pv["bound_headers"]
    # every bound header, except credentials that do not go through (cookie is absent here)
    assert list(bound) == sorted(set(BOUND) - {"cookie"})
    assert bound["authorization"] == "[redacted]"  # sent as is in this request: bound, never shown
    assert bound["content-type"] == "application/json"
    assert bound["user-agent"] == "bot/1 card [redacted]"  # a configured pattern (card numbers)
    assert bound["x-change-ticket"] == "[redacted]"  # a configured sensitive key
    assert bound["content-encoding"] is None and bound["x-http-method-override"] is None  # must stay absent
    assert bound["x-api-key"] == "[redacted]"  # bound, never shown
    assert "proxy-authorization" not in bound
    assert pv["headers"]["proxy-authorization"] == "[redacted]" and pv["headers"]["x-api-key"] == "[redacted]"
    assert "agent-key" not in json.dumps(pv) and "4111111111111111" not in json.dumps(pv)
    assert pv["fingerprint_version"] == "v3"


def test_preview_shows_form_multipart_and_utf16_bodies_as_read_and_redacts_their_keys():
    redact = Redactor(keys=["password"], patterns=[r"\b\d{16}\b"])
    form = request(headers={"content-type": "application/x-www-form-urlencoded"},
                   body=b"user=ann&password=hunter2&card=4111111111111111&order[total]=12.50")
    pv = _preview(form, 1000, frozenset(), redact, BOUND)
    assert pv["body"].startswith("(form fields)")
    assert "hunter2" not in pv["body"] and "4111111111111111" not in pv["body"]
    assert '"total": "12.50"' in pv["body"]  # form values are strings, shown as sent
    utf16 = request(headers={"content-type": "application/json; charset=utf-16le"},
                    body='{"amount": 10000.000000000000000001, "password": "x"}'.encode("utf-16-le"))
    pv = _preview(utf16, 1000, frozenset(), redact, BOUND)
    assert '"amount": "10000.000000000000000001"' in pv["body"]  # exact, never rounded for the approver
    assert '"password": "[redacted]"' in pv["body"]


def _service(tmp_path: Path) -> tuple[ApprovalService, SQLiteStore]:
    store = SQLiteStore(str(tmp_path / "state.db"))
    svc = ApprovalService(store, ApprovalsConfig(), record=lambda rec: None)
    svc.bind_headers(DEFAULT_CONTEXT_HEADERS + ["x-change-ticket"], replaced={"erp": ["x-api-key"]})
    return svc, store


CLS = Classification(
    connector="erp", action="test.order.create", resource_type="Order", resource_id="new",
)


def test_service_matches_only_the_approved_request(tmp_path):
    async def run() -> None:
        svc, store = _service(tmp_path)
        await store.open()
        try:
            ident = AgentIdentity(agent_id="bot", issuer="i", claims={}, expires_at=None)
            # as the pipeline does: the agent's token in Authorization is stripped (gateway mode)
            fwd = lambda r: svc.forwarded_view(r, "erp", ("authorization",))  # noqa: E731
            approved = with_headers()
            a = await svc.hold(decision_id="d1", identity=ident, req=approved, cls=CLS, groups={MANAGERS: 1},
                               policy_ids=["p"], mode="async", derived={}, forwarded=fwd(approved))
            assert a.fingerprint == request_fingerprint("bot", fwd(approved), svc.fingerprint_headers)
            assert a.request["bound_headers"]["content-type"] == "application/json"
            assert "authorization" not in a.request["bound_headers"]  # stripped: not bound, not listed
            # a refreshed agent token is the same request
            retry = fwd(with_headers(authorization="Bearer refreshed"))
            assert (await svc.find_for_retry(ident, retry)).id == a.id and svc.matches(a, "bot", retry)
            for changed in ({"content_type": "text/plain"}, {"x_http_method_override": "DELETE"},
                            {"x_change_ticket": "CHG-9"}):
                other = fwd(with_headers(**changed))
                assert await svc.find_for_retry(ident, other) is None
                assert not svc.matches(a, "bot", other)
            assert not svc.matches(a, "other-bot", fwd(approved))
            # a credential the agent sends for the upstream itself is bound: another account is not released
            own = svc.forwarded_view(with_headers(authorization="Basic YWNjdC1BOng="), "other", ())
            b = await svc.hold(decision_id="d2", identity=ident, req=own, cls=CLS, groups={MANAGERS: 1},
                               policy_ids=["p"], mode="async", derived={}, forwarded=own)
            assert b.request["bound_headers"]["authorization"] == "[redacted]"
            assert svc.matches(b, "bot", own)
            assert not svc.matches(b, "bot", with_headers(authorization="Basic YWNjdC1COng="))
        finally:
            await store.close()

    asyncio.run(run())


def test_approvals_stored_before_v2_match_on_the_headers_the_approver_saw(tmp_path):
    """An approval stored by the previous version (bare hex fingerprint, all non-secret
    headers in its preview) is still found by its retry, but only if the bound headers
    are the ones the approver was shown; an unknown format never matches."""

    async def run() -> None:
        svc, store = _service(tmp_path)
        await store.open()
        try:
            ident = AgentIdentity(agent_id="bot", issuer="i", claims={}, expires_at=None)
            approved = with_headers(user_agent="bot/1")
            a = await svc.hold(decision_id="d1", identity=ident, req=approved, cls=CLS, groups={MANAGERS: 1},
                               policy_ids=["p"], mode="async", derived={})
            # what the previous version stored
            version = a.version
            a.fingerprint = legacy_request_fingerprint("bot", approved)
            a.request = {"method": "POST", "url": approved.url, "body": None, "body_bytes": 14, "body_truncated": False,
                         "headers": {"content-type": "application/json", "user-agent": "bot/1",
                                     "authorization": "[redacted]"}}
            assert await store.update_approval(a, expect_version=version)
            assert (await svc.find_for_retry(ident, with_headers(user_agent="bot/1", authorization="Bearer new"))).id == a.id
            assert await svc.find_for_retry(ident, with_headers(user_agent="bot/1", content_type="text/plain")) is None
            assert await svc.find_for_retry(ident, with_headers(user_agent="bot/1", content_encoding="identity")) is None
            assert await svc.find_for_retry(ident, with_headers(user_agent="bot/2")) is None
            a.fingerprint = "v9:" + legacy_request_fingerprint("bot", approved)
            assert not svc.matches(a, "bot", approved)
        finally:
            await store.close()

    asyncio.run(run())


# ---------------------------------------------------------------- through a real proxy
# The variants of an approved request an agent might try to get released instead:
# the same method, URL and bytes, read differently by the upstream.
VARIANTS = [
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/json; charset=utf-16"},
    {"Content-Encoding": "identity"},
    {"Content-Language": "de"},
    {"X-HTTP-Method-Override": "DELETE"},
    {"X-HTTP-Method": "DELETE"},
    {"X-Method-Override": "DELETE"},
    {"X-Change-Ticket": "CHG-2"},  # allow-listed in limits.context_headers below
    {"User-Agent": "sneaky/1"},  # allow-listed by default
    {"Authorization": "Basic YWNjdC1COng="},  # an upstream credential of another account, sent as is
    {"Cookie": "session=other-account"},
    {"X-Original-URL": "/admin/delete-all"},  # path rewrite headers some frameworks honour
    {"X-Forwarded-Host": "other.example"},
]
TICKETS = {"limits": {"context_headers": DEFAULT_CONTEXT_HEADERS + ["x-change-ticket"]}}


def not_released(resp: httpx.Response, approval_id: str) -> None:
    """Held anew (under another approval) or refused: never the approved request's release."""
    assert resp.status_code in (202, 400, 403, 415, 422), (resp.status_code, resp.text)
    doc = resp.json()
    assert "echo" not in doc and "decision_id" in doc, resp.text  # Proctor answered, not the upstream
    if resp.status_code != 422:  # 422: the Idempotency-Key names the approval it may not use
        assert doc.get("approval_id") != approval_id, resp.text


def test_async_an_approval_releases_only_the_approved_headers(make, idp, upstream):
    p = make({"mode": "async"}, **TICKETS)
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    url = order_url(upstream)
    body = json.dumps(order(mark)).encode()
    sent = {"Content-Type": "application/json", "X-Change-Ticket": "CHG-1", "User-Agent": "order-bot/1"}
    with agent_client(p, tok) as c:
        held = c.post(url, content=body, headers=sent)
        assert held.status_code == 202, held.text
        aid = held.json()["approval_id"]

        # the approver sees what the approval is bound to
        bound = show(p, aid, alice)["request"]["bound_headers"]
        assert bound["content-type"] == "application/json" and bound["x-change-ticket"] == "CHG-1"
        assert bound["user-agent"] == "order-bot/1"
        assert bound["x-http-method-override"] is None and bound["content-encoding"] is None
        assert "proxy-authorization" not in bound and "authorization" not in bound
        assert vote(p, aid, alice).status_code == 200

        for change in VARIANTS:
            not_released(c.post(url, content=body, headers={**sent, **change}), aid)
        # the same bytes, chunked instead of Content-Length
        not_released(c.post(url, content=iter([body]), headers=sent), aid)
        assert hits(upstream, mark) == []  # none of them reached the upstream
        assert show(p, aid, alice)["state"] == "approved"  # and the approval is not spent

    # the identical request, with another token of the same agent, is released exactly once
    tok2 = idp.token("order-bot", groups=["writers"], ttl=900)
    assert tok2 != tok
    with agent_client(p, tok2) as c:
        done = c.post(url, content=body, headers=sent)
        assert done.status_code == 200 and done.json()["echo"] is True, done.text
        again = c.post(url, content=body, headers=sent)  # a late retry: told, not held anew
        assert again.status_code == 409 and again.json()["title"] == "Already forwarded", again.text
        assert again.json()["approval_id"] == aid
    (hit,) = hits(upstream, mark)
    got = upstream.headers_of(hit)
    assert got["content-type"] == "application/json" and got["x-change-ticket"] == "CHG-1"
    assert not {"x-http-method-override", "x-http-method", "x-method-override", "content-encoding"} & set(got)
    assert events(p, aid) == ["requested", "approved", "forwarded"]


def test_sync_a_retry_with_other_headers_after_approval_is_held_anew(make, idp, upstream):
    p = make({"sync_wait_seconds": 1})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    url = order_url(upstream)
    body = json.dumps(order(mark)).encode()
    sent = {"Content-Type": "application/json"}
    with agent_client(p, tok) as c:
        first = c.post(url, content=body, headers=sent)  # nobody decides within the sync wait
        assert first.status_code == 403 and first.json()["title"] == "Approval pending", first.text
        aid = first.json()["approval_id"]
        assert vote(p, aid, alice).status_code == 200
        for change in ({"Content-Language": "de"}, {"User-Agent": "sneaky/1"}):
            r = c.post(url, content=body, headers={**sent, **change})
            not_released(r, aid)
            assert r.status_code == 403 and r.json()["title"] == "Approval pending"  # held anew, waited, still pending
        not_released(c.post(url, content=body, headers={**sent, "X-HTTP-Method-Override": "PUT"}), aid)
        assert hits(upstream, mark) == []
        done = c.post(url, content=body, headers=sent)
        assert done.status_code == 200, done.text
    assert len(hits(upstream, mark)) == 1
    assert events(p, aid) == ["requested", "approved", "forwarded"]


def test_idempotency_key_with_other_headers_is_refused(make, idp, upstream):
    p = make({"mode": "async"})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    url = order_url(upstream)
    body = json.dumps(order(mark)).encode()
    sent = {"Content-Type": "application/json", "Idempotency-Key": "k-" + mark}
    with agent_client(p, tok) as c:
        held = c.post(url, content=body, headers=sent)
        assert held.status_code == 202, held.text
        aid = held.json()["approval_id"]
        assert vote(p, aid, alice).status_code == 200
        swapped = c.post(url, content=body, headers={**sent, "Content-Type": "text/plain"})
        assert swapped.status_code == 422 and swapped.json()["approval_id"] == aid, swapped.text
        assert hits(upstream, mark) == []
        assert c.post(url, content=body, headers=sent).status_code == 200
    assert len(hits(upstream, mark)) == 1


def test_cli_show_prints_the_bound_headers(make, idp, upstream):
    p = make({"mode": "async"}, **TICKETS)
    mark = marker()
    with agent_client(p, agent_token(idp)) as c:
        held = c.post(order_url(upstream), content=json.dumps(order(mark)).encode(),
                      headers={"Content-Type": "application/json", "X-Change-Ticket": "CHG-7"})
    assert held.status_code == 202, held.text
    aid = held.json()["approval_id"]
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and k not in ("PROCTOR_TOKEN", "PROCTOR_CONTROL_URL")}
    r = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "approvals", "show", aid, "-c", str(p.config_path),
         "--as", "alice", "--group", MANAGERS],
        capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    section = out[out.index("bound headers"):out.index("body (")]
    assert "content-type: application/json" in section and "x-change-ticket: CHG-7" in section
    absent = next(line for line in section.splitlines() if line.strip().startswith("absent:"))
    for name in ("content-encoding", "transfer-encoding", "x-http-method-override", "idempotency-key"):
        assert name in absent
    assert "proxy-authorization" not in section and "authorization" not in section
