"""Human approvals end to end: real Proctor processes, a real recording upstream.

A request denied only by `forbid` policies annotated `@approval("group")` is
held; approvers vote on the control API; once approved the request (or the
agent's retry) reaches the upstream exactly once.

The hold policies live in this file (HOLD_CEDAR) and are written next to a copy
of tests/data/policies, with `type Approval` and `approval?: Approval` added to
the copied schema's OrderContext (the hand-written OrderContext wins over the
generated one, so it must declare `context.approval` itself):

- total > 500 on any tenant but 42: one approval by `managers`;
- total > 500 on tenant 42: two approvals by `managers` (@quorum("2")).

(tests/data/policies/orders.cedar forbids totals over 1000 outright, so the
held orders here stay between 500 and 1000.)

Every request carries a unique marker in its body, so "reached the upstream
exactly once" is counted on the shared, session-wide upstream log.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import DATA, Proctor, start_proctor, wait_for

pytestmark = pytest.mark.integration

MANAGERS = "managers"
AGENT = "order-bot"

HOLD_CEDAR = """
@id("big-orders-need-a-manager")
@approval("managers")
forbid (principal, action == Action::"test.order.create", resource)
when
{
  context has fields &&
  context.fields has total &&
  context.fields.total.greaterThan(decimal("500.0")) &&
  context.params.tenant != 42
}
unless { context has approval && context.approval.groups.contains("managers") };

@id("tenant-42-needs-two-managers")
@approval("managers")
@quorum("2")
forbid (principal, action == Action::"test.order.create", resource)
when
{
  context has fields &&
  context.fields has total &&
  context.fields.total.greaterThan(decimal("500.0")) &&
  context.params.tenant == 42
}
unless { context has approval && context.approval.groups.contains("managers") };
"""

APPROVAL_TYPE = (
    "type Approval = { id: String, approver: String, approvers: Set<String>, groups: Set<String>, "
    "time: datetime, note: String };\n"
)


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def hold_policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hold-policies") / "policies"
    shutil.copytree(DATA / "policies", d)
    schema = (d / "schema.cedarschema").read_text()
    assert "params: { tenant: Long }," in schema and "type Approval" not in schema
    schema = schema.replace("type OrderBody", APPROVAL_TYPE + "type OrderBody", 1)
    schema = schema.replace("params: { tenant: Long },", "params: { tenant: Long },\n  approval?: Approval,", 1)
    (d / "schema.cedarschema").write_text(schema)
    (d / "hold.cedar").write_text(HOLD_CEDAR)
    return d


@pytest.fixture
def make(tmp_path, idp, pki, upstream, upstream_tls, hold_policies):
    """Start a Proctor with the hold policies and the given `approvals` settings."""
    started: list[Proctor] = []

    def start(approvals: dict | None = None, **overrides) -> Proctor:
        ov = {"approvals": {"sync_wait_seconds": 10, "expire_after_seconds": 30, **(approvals or {})}, **overrides}
        p = start_proctor(tmp_path / f"p{len(started)}", idp, pki, upstream, upstream_tls, ov, policies_src=hold_policies)
        started.append(p)
        return p

    start.started = started  # relaunch() adds the processes it starts, so they are stopped too
    yield start
    for p in started:
        p.stop()


# ------------------------------------------------------------------------- helpers
def agent_token(idp, agent: str = AGENT) -> str:
    return idp.token(agent, groups=["writers"], ttl=600)


def approver_token(idp, who: str, *groups: str) -> str:
    """An approver token from the test IdP: the approver audience and the approval_groups claim."""
    return idp.token(who, aud="proctor-approvers", approval_groups=list(groups), ttl=600)


def cli_approver_token(p: Proctor, who: str, *groups: str) -> str:
    """An approver token from `proctor token issue --approver` (the dev issuer)."""
    cmd = [sys.executable, "-m", "proxy.cli", "token", "issue", "-c", str(p.config_path), "--approver", who]
    for g in groups:
        cmd += ["--group", g]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def marker() -> str:
    return "m-" + uuid.uuid4().hex


def order(mark: str, total: float = 750) -> dict:
    return {"order": {"total": total, "items": [{"sku": "A-1"}], "marker": mark}}


def order_url(upstream, tenant: int = 7) -> str:
    return f"http://127.0.0.1:{upstream.port}/tenants/{tenant}/orders"


def agent_client(p: Proctor, token: str, agent: str = AGENT, timeout: float = 30) -> httpx.Client:
    return httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=timeout)


def hits(upstream, mark: str) -> list[dict]:
    return [e for e in upstream.received() if mark in e["body"]]


def vote(p: Proctor, approval_id: str, token: str, decision: str = "approve", reason: str = "ok, within budget") -> httpx.Response:
    return httpx.post(
        f"{p.control_url}/v1/approvals/{approval_id}/{decision}",
        json={"reason": reason},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def show(p: Proctor, approval_id: str, token: str) -> dict:
    r = httpx.get(f"{p.control_url}/v1/approvals/{approval_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def pending_ids(p: Proctor, token: str, agent: str = AGENT) -> list[str]:
    r = httpx.get(
        f"{p.control_url}/v1/approvals",
        params={"state": "pending", "agent": agent, "limit": 1000},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return [a["id"] for a in r.json()["approvals"]]


def wait_pending(p: Proctor, token: str, n: int = 1, agent: str = AGENT, exclude: set[str] = frozenset()) -> list[str]:
    """Ids of the first n pending approvals of `agent` (not in `exclude`) once they exist."""
    found: list[str] = []

    def ready() -> bool:
        found[:] = [i for i in pending_ids(p, token, agent) if i not in exclude]
        return len(found) >= n

    wait_for(ready, timeout=15, interval=0.05, what=f"{n} pending approval(s)")
    return found


def events(p: Proctor, approval_id: str) -> list[str]:
    return [r["event"] for r in p.decisions() if r.get("type") == "approval" and r["approval_id"] == approval_id]


def request_records(p: Proctor, approval_id: str) -> list[dict]:
    """The requests' own decision records that name this approval (not the approval events)."""
    return [r for r in p.decisions() if r.get("type") != "approval" and r.get("approval_id") == approval_id]


def in_thread(fn, *args, **kw):
    """Run fn in a thread; returns a getter for its result (re-raising its exception)."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def result(timeout: float = 30):
        t.join(timeout)
        assert not t.is_alive(), "the agent's request did not finish"
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


def relaunch(p: Proctor, started: list[Proctor], approvals: dict | None = None) -> Proctor:
    """Stop `p` (SIGTERM) and start a new process on the same config and state dir
    (same ports), optionally changing the `approvals` section first; the new one
    joins `started` (stopped at teardown)."""
    p.stop()
    cfg = yaml.safe_load(p.config_path.read_text())
    if approvals:
        cfg["approvals"] = {**cfg.get("approvals", {}), **approvals}
        p.config_path.write_text(yaml.safe_dump(cfg))
    log_path = p.dir / f"proctor-{int(time.time() * 1000)}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path), "--log-level", "info"],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        cwd=str(p.dir),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    new = Proctor(p.dir, p.config_path, p.port, p.control_port, p.gateway_port, proc, log_path, p.ca_pem, p.policies_dir)
    started.append(new)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"proctor exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            return httpx.get(f"{new.control_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, what="restarted proctor readiness")
    return new


# --------------------------------------------------------------------------- tests
def test_sync_hold_then_approved_forwards_exactly_once(make, idp, upstream):
    p = make()
    tok = agent_token(idp)
    mark = marker()
    with agent_client(p, tok) as c:
        got = in_thread(c.post, order_url(upstream), json=order(mark))
        alice = cli_approver_token(p, "alice", MANAGERS)  # `proctor token issue --approver`
        (aid,) = wait_pending(p, alice)
        assert hits(upstream, mark) == []  # held: nothing forwarded yet
        detail = show(p, aid, alice)
        assert detail["you_may_decide"] is True and detail["groups"] == {MANAGERS: 1}
        assert mark in detail["request"]["body"]  # the approver sees what will be sent
        assert "[redacted]" == detail["request"]["headers"]["proxy-authorization"]
        r = vote(p, aid, alice, "approve", "budget ok")
        assert r.status_code == 200 and r.json()["state"] == "approved", r.text
        resp = got()
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"echo": True, "method": "POST", "path": "/tenants/7/orders"}
    (hit,) = hits(upstream, mark)
    assert json.loads(hit["body"]) == order(mark)
    assert show(p, aid, alice)["state"] == "forwarded"
    wait_for(lambda: "forwarded" in events(p, aid), what="forwarded event")
    assert events(p, aid) == ["requested", "approved", "forwarded"]
    (rec,) = request_records(p, aid)
    assert rec["decision"] == "allow" and rec["status"] == 200 and rec["upstream_status"] == 200
    approved = next(r for r in p.decisions() if r.get("approval_id") == aid and r.get("event") == "approved")
    assert approved["by"] == "alice" and approved["reason"] == "budget ok"
    assert approved["decision_id"] == rec["decision_id"]


def test_sync_hold_then_denied(make, idp, upstream):
    p = make()
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    with agent_client(p, tok) as c:
        got = in_thread(c.post, order_url(upstream), json=order(mark))
        (aid,) = wait_pending(p, alice)
        r = vote(p, aid, alice, "deny", "not this quarter")
        assert r.status_code == 200 and r.json()["state"] == "denied", r.text
        resp = got()
        assert resp.status_code == 403
        body = resp.json()
        assert body["title"] == "Approval denied" and body["type"].endswith("/approval-denied")
        assert body["approval_id"] == aid and "not this quarter" in body["detail"] and "alice" in body["detail"]
        # the same request again: still denied, at once
        again = c.post(order_url(upstream), json=order(mark))
        assert again.status_code == 403 and again.json()["approval_id"] == aid
    assert hits(upstream, mark) == []
    assert events(p, aid) == ["requested", "denied"]
    recs = request_records(p, aid)
    assert [r["decision"] for r in recs] == ["deny", "deny"]
    assert all(r["refusal"]["kind"] == "approval-denied" for r in recs)
    # a decided approval takes no more votes
    assert vote(p, aid, approver_token(idp, "bob", MANAGERS)).status_code == 409


def test_sync_hold_times_out_then_expires(make, idp, upstream):
    p = make({"sync_wait_seconds": 2, "expire_after_seconds": 3})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    t0 = time.monotonic()
    with agent_client(p, tok) as c:
        resp = c.post(order_url(upstream), json=order(mark))
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 6, waited
    assert resp.status_code == 403, resp.text
    body = resp.json()
    assert body["title"] == "Approval pending" and body["approval_state"] == "pending"
    aid = body["approval_id"]
    assert resp.headers["Retry-After"] == "5"
    assert body["status_url"].endswith(f"/v1/approvals/{aid}/status") and resp.headers["Location"] == body["status_url"]
    wait_for(lambda: show(p, aid, alice)["state"] == "expired", timeout=8, interval=0.2, what="expiry")
    assert "expired" in events(p, aid)
    r = vote(p, aid, alice)
    assert r.status_code == 409 and "expired" in r.json()["detail"]
    assert hits(upstream, mark) == []
    (rec,) = request_records(p, aid)
    assert rec["decision"] == "hold" and rec["status"] == 403


def test_no_self_approval_and_group_checked(make, idp, upstream):
    p = make({"mode": "async"})
    tok = agent_token(idp)
    with agent_client(p, tok) as c:
        resp = c.post(order_url(upstream), json=order(marker()))
    assert resp.status_code == 202, resp.text
    aid = resp.json()["approval_id"]
    # an approver whose subject is the agent itself
    r = vote(p, aid, approver_token(idp, AGENT, MANAGERS))
    assert r.status_code == 403 and "own request" in r.json()["detail"]
    # the same through the dev issuer (`proctor token issue --approver`)
    assert vote(p, aid, cli_approver_token(p, AGENT, MANAGERS)).status_code == 403
    # an approver outside the group
    r = vote(p, aid, approver_token(idp, "bob", "finance"))
    assert r.status_code == 403 and "managers" in r.json()["detail"]
    # an agent token (wrong audience) is no approver token
    assert vote(p, aid, tok).status_code == 401
    # a mandatory reason
    assert vote(p, aid, approver_token(idp, "alice", MANAGERS), reason="  ").status_code == 400
    assert show(p, aid, approver_token(idp, "alice", MANAGERS))["state"] == "pending"
    assert events(p, aid) == ["requested"]


def test_async_hold_retry_and_idempotency_key(make, idp, upstream):
    p = make({"mode": "async", "retry_after_seconds": 3})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    with agent_client(p, tok) as c:
        resp = c.post(order_url(upstream), json=order(mark))
        assert resp.status_code == 202, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        body = resp.json()
        aid = body["approval_id"]
        assert body["approval_state"] == "pending" and body["title"] == "Held for approval"
        assert resp.headers["Retry-After"] == "3"
        assert resp.headers["Location"] == body["status_url"] == f"{p.control_url}/v1/approvals/{aid}/status"

        # the agent polls its status URL with its own token
        st = httpx.get(body["status_url"], headers={"Authorization": f"Bearer {tok}"}, timeout=5)
        assert st.status_code == 200 and st.json()["state"] == "pending" and st.headers["Retry-After"] == "3"
        other = httpx.get(body["status_url"], headers={"Authorization": f"Bearer {agent_token(idp, 'other-bot')}"}, timeout=5)
        assert other.status_code == 404  # another agent cannot see it
        assert httpx.get(body["status_url"], timeout=5).status_code == 401

        # a retry while pending: the same approval, still 202
        again = c.post(order_url(upstream), json=order(mark))
        assert again.status_code == 202 and again.json()["approval_id"] == aid
        assert hits(upstream, mark) == []

        assert vote(p, aid, alice).status_code == 200
        st = httpx.get(body["status_url"], headers={"Authorization": f"Bearer {tok}"}, timeout=5)
        assert st.json()["state"] == "approved" and "Retry-After" not in st.headers

        done = c.post(order_url(upstream), json=order(mark))
        assert done.status_code == 200 and done.json()["echo"] is True
        assert len(hits(upstream, mark)) == 1

        # An approval releases ONE request. Once it was forwarded, the same request again
        # is a late retry: 409 Already forwarded (approvals.forwarded_retry_seconds), not a new hold.
        late = c.post(order_url(upstream), json=order(mark))
        assert late.status_code == 409, late.text
        assert late.json()["title"] == "Already forwarded" and late.json()["approval_id"] == aid
        assert "new Idempotency-Key" in late.json()["detail"]
        assert len(hits(upstream, mark)) == 1

        # Idempotency-Key: a retry with the key attaches to the held request (even if
        # a header differs), but the key never carries an approval over to another
        # request: the same key with another body is refused (422), before and after approval.
        key = uuid.uuid4().hex
        first, second = marker(), marker()
        r1 = c.post(order_url(upstream), json=order(first), headers={"Idempotency-Key": key})
        assert r1.status_code == 202
        kid = r1.json()["approval_id"]
        r2 = c.post(order_url(upstream), json=order(first), headers={"Idempotency-Key": key, "X-Attempt": "2"})
        assert r2.status_code == 202 and r2.json()["approval_id"] == kid
        swapped = c.post(order_url(upstream), json=order(second, total=999), headers={"Idempotency-Key": key})
        assert swapped.status_code == 422, swapped.text
        assert swapped.json()["title"] == "Idempotency-Key reused" and swapped.json()["approval_id"] == kid
        assert vote(p, kid, alice).status_code == 200
        swapped = c.post(order_url(upstream), json=order(second, total=999), headers={"Idempotency-Key": key})
        assert swapped.status_code == 422, swapped.text  # approval or not
        r3 = c.post(order_url(upstream), json=order(first), headers={"Idempotency-Key": key})
        assert r3.status_code == 200, r3.text
    assert len(hits(upstream, first)) == 1 and hits(upstream, second) == []
    assert events(p, kid) == ["requested", "approved", "forwarded"]

    assert events(p, aid) == ["requested", "approved", "forwarded"]
    recs = request_records(p, aid)
    assert [(r["decision"], r["status"]) for r in recs] == [("hold", 202), ("hold", 202), ("allow", 200), ("deny", 409)]


def test_restart_with_pending_approvals(make, idp, upstream):
    p = make({"mode": "async", "expire_after_seconds": 120})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    marks = [marker() for _ in range(3)]
    with agent_client(p, tok) as c:
        ids = []
        for m in marks:
            r = c.post(order_url(upstream), json=order(m))
            assert r.status_code == 202
            ids.append(r.json()["approval_id"])

    # restart; the new process waits synchronously (a pending retry is held open)
    p = relaunch(p, make.started, {"mode": "sync", "sync_wait_seconds": 15})
    assert sorted(pending_ids(p, alice)) == sorted(ids)
    for aid in ids:
        assert vote(p, aid, alice).status_code == 200
    with agent_client(p, tok) as c:
        for m, aid in zip(marks, ids):
            r = c.post(order_url(upstream), json=order(m))
            assert r.status_code == 200, r.text
            assert len(hits(upstream, m)) == 1
            assert show(p, aid, alice)["state"] == "forwarded"

    # a sync-held request is answered when the proxy shuts down (503, its status URL:
    # tests/test_graceful_shutdown.py); the approval survives the restart
    mark = marker()
    c = agent_client(p, tok)
    got = in_thread(c.post, order_url(upstream), json=order(mark))
    (aid,) = wait_pending(p, alice)
    t0 = time.monotonic()
    p = relaunch(p, make.started)
    assert time.monotonic() - t0 < 20
    handed_over = got()
    assert handed_over.status_code == 503 and handed_over.json()["approval_id"] == aid
    c.close()
    assert hits(upstream, mark) == []
    assert pending_ids(p, alice) == [aid]
    assert vote(p, aid, alice).status_code == 200
    time.sleep(0.5)
    assert hits(upstream, mark) == []  # nothing is sent on an approval alone
    with agent_client(p, tok) as c:
        r = c.post(order_url(upstream), json=order(mark))
    assert r.status_code == 200, r.text
    assert len(hits(upstream, mark)) == 1
    assert events(p, aid) == ["requested", "approved", "forwarded"]


def test_500_concurrent_holds_decided_in_random_order(make, idp, upstream):
    n = 500
    p = make({"mode": "async", "expire_after_seconds": 300})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    marks = [marker() for _ in range(n)]
    bodies = {m: order(m, total=501 + i % 400) for i, m in enumerate(marks)}
    # even ones carry an Idempotency-Key, odd ones are matched by fingerprint
    keys = {m: (f"key-{m}" if i % 2 == 0 else None) for i, m in enumerate(marks)}
    local = threading.local()
    clients: list[httpx.Client] = []

    def client() -> httpx.Client:
        if not hasattr(local, "c"):
            local.c = agent_client(p, tok)
            clients.append(local.c)
        return local.c

    def send(m: str) -> httpx.Response:
        headers = {"Idempotency-Key": keys[m]} if keys[m] else {}
        return client().post(order_url(upstream), content=json.dumps(bodies[m]), headers={**headers, "Content-Type": "application/json"})

    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        held = list(pool.map(send, marks))
        assert [r.status_code for r in held] == [202] * n, {r.status_code for r in held}
        aid = {m: r.json()["approval_id"] for m, r in zip(marks, held)}
        assert len(set(aid.values())) == n

        order_ = list(marks)
        random.Random(7).shuffle(order_)
        approve = set(order_[: n // 2])

        def decide(m: str) -> int:
            return vote(p, aid[m], alice, "approve" if m in approve else "deny", f"decided {m}").status_code

        assert set(pool.map(decide, order_)) == {200}
        retries = list(pool.map(send, marks))
    elapsed = time.monotonic() - t0
    for c in clients:
        c.close()

    received: dict[str, list[dict]] = {}
    for e in upstream.received():
        try:
            doc = json.loads(e["body"])
        except ValueError:
            continue
        m = doc.get("order", {}).get("marker") if isinstance(doc, dict) and isinstance(doc.get("order"), dict) else None
        if m in bodies:
            received.setdefault(m, []).append(doc)
    for m, r in zip(marks, retries):
        if m in approve:
            assert r.status_code == 200, (m, r.text)
            assert received.get(m) == [bodies[m]], m  # its own body, exactly once
        else:
            assert r.status_code == 403 and r.json()["approval_id"] == aid[m], (m, r.text)
            assert r.json()["type"].endswith("/approval-denied")
            assert m not in received
    assert set(received) == approve
    assert elapsed < 60, elapsed


def test_quorum_two_of_managers(make, idp, upstream):
    p = make({"mode": "async"})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    bob = approver_token(idp, "bob", MANAGERS)
    mark = marker()
    with agent_client(p, tok) as c:
        r = c.post(order_url(upstream, tenant=42), json=order(mark))
        assert r.status_code == 202, r.text
        aid = r.json()["approval_id"]
        assert r.json()["approval_groups"] == {MANAGERS: 2}
        v1 = vote(p, aid, alice)
        assert v1.status_code == 200 and v1.json()["state"] == "pending"
        assert events(p, aid) == ["requested", "voted"]
        assert vote(p, aid, alice).status_code == 409  # one vote per approver
        again = c.post(order_url(upstream, tenant=42), json=order(mark))
        assert again.status_code == 202 and again.json()["approval_id"] == aid
        assert hits(upstream, mark) == []
        v2 = vote(p, aid, bob)
        assert v2.status_code == 200 and v2.json()["state"] == "approved"
        assert [v["approver"] for v in v2.json()["votes"]] == ["alice", "bob"]
        done = c.post(order_url(upstream, tenant=42), json=order(mark))
        assert done.status_code == 200, done.text
    assert len(hits(upstream, mark)) == 1
    assert events(p, aid) == ["requested", "voted", "approved", "forwarded"]
    voted = next(r for r in p.decisions() if r.get("approval_id") == aid and r.get("event") == "voted")
    assert voted["by"] == "alice"


def test_disconnected_sync_agent_then_approved(make, idp, upstream):
    p = make({"sync_wait_seconds": 10})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    with agent_client(p, tok, timeout=1) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(order_url(upstream), json=order(mark))
    (aid,) = wait_pending(p, alice)
    assert vote(p, aid, alice).status_code == 200  # right after the agent hung up
    time.sleep(2.5)  # the held flow notices the hang-up within a second
    assert hits(upstream, mark) == []  # nothing until the agent asks again
    assert show(p, aid, alice)["state"] == "approved"
    with agent_client(p, tok) as c:
        r = c.post(order_url(upstream), json=order(mark))
        assert r.status_code == 200, r.text
    assert len(hits(upstream, mark)) == 1
    assert events(p, aid) == ["requested", "approved", "forwarded"]


def test_concurrent_retries_of_an_approved_request_forward_once(make, idp, upstream):
    """20 retries of one approved request at once: the CAS lets exactly one through."""
    p = make({"mode": "async"})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    with agent_client(p, tok) as c:
        aid = c.post(order_url(upstream), json=order(mark)).json()["approval_id"]
    assert vote(p, aid, alice).status_code == 200

    def retry(_):
        with agent_client(p, tok) as c:
            r = c.post(order_url(upstream), json=order(mark))
            return r.status_code, r.json().get("approval_id")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(retry, range(20)))
    assert sorted(s for s, _ in results).count(200) == 1, results
    # the others lost the race for this approval or came after it was used: 409 either way
    assert all(s == 409 and a == aid for s, a in results if s != 200), results
    assert len(hits(upstream, mark)) == 1
    assert events(p, aid).count("forwarded") == 1


def test_escalation_and_approved_but_unused_expiry(make, idp, upstream):
    p = make({"mode": "async", "expire_after_seconds": 4, "escalate_after_seconds": 1, "escalate_to": "directors"})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    carol = approver_token(idp, "carol", "directors")
    esc, late = marker(), marker()
    with agent_client(p, tok) as c:
        aid = c.post(order_url(upstream), json=order(esc)).json()["approval_id"]
        lid = c.post(order_url(upstream), json=order(late)).json()["approval_id"]
        assert vote(p, aid, carol).status_code == 403  # not (yet) an approving group
        wait_for(lambda: "escalated" in events(p, aid), timeout=5, interval=0.1, what="escalation")
        assert show(p, aid, carol)["escalated"] is True
        r = vote(p, aid, carol, reason="director override")
        assert r.status_code == 200 and r.json()["state"] == "approved"  # the escalation group decides alone
        assert c.post(order_url(upstream), json=order(esc)).status_code == 200
        assert len(hits(upstream, esc)) == 1
        assert events(p, aid) == ["requested", "escalated", "approved", "forwarded"]

        # approved, but not used before it expires: the retry is refused, nothing forwarded
        assert vote(p, lid, alice).status_code == 200
        expires = show(p, lid, alice)["expires_at"]
        wait_for(lambda: time.time() > _epoch(expires) + 0.2, timeout=6, interval=0.1, what="expiry time")
        r = c.post(order_url(upstream), json=order(late))
        assert r.status_code == 403 and r.json()["title"] == "Approval expired", r.text
        assert show(p, lid, alice)["state"] == "expired"
        # and the same request again asks anew
        again = c.post(order_url(upstream), json=order(late))
        assert again.status_code == 202 and again.json()["approval_id"] != lid
    assert hits(upstream, late) == []


def _epoch(iso_time: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).timestamp()


def test_idempotency_key_does_not_carry_an_approval_to_another_request(make, idp, upstream):
    """The same key on another URL (which needs a 2-of-2 quorum) does not ride on a 1-of-1 approval."""
    p = make({"mode": "async"})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    key = uuid.uuid4().hex
    small, big = marker(), marker()
    with agent_client(p, tok) as c:
        aid = c.post(order_url(upstream, 7), json=order(small), headers={"Idempotency-Key": key}).json()["approval_id"]
        assert vote(p, aid, alice).status_code == 200
        r = c.post(order_url(upstream, 42), json=order(big), headers={"Idempotency-Key": key})
    # (this was a quorum bypass: a 1-of-1 approval for tenant 7 released a 2-of-2 tenant-42 order)
    assert hits(upstream, big) == []
    assert r.status_code == 422 and r.json()["approval_id"] == aid, r.text
    assert show(p, aid, alice)["state"] == "approved"  # still there for the request it approved


def test_approvers_see_the_body_with_sensitive_values_redacted(make, idp, upstream):
    """The held request shown to approvers (and kept in the store) goes through the
    same redaction as the record and the audit trail."""
    p = make({"mode": "async"})
    body = order(marker())
    body["payment"] = {"password": "hunter2-secret", "note": "card 4111 1111 1111 1111 on file"}
    with agent_client(p, agent_token(idp)) as c:
        resp = c.post(order_url(upstream), json=body)
    assert resp.status_code == 202, resp.text
    shown = show(p, resp.json()["approval_id"], approver_token(idp, "alice", MANAGERS))
    text = json.dumps(shown)
    assert "hunter2-secret" not in text and "4111 1111 1111 1111" not in text
    assert '"password": "[redacted]"' in shown["request"]["body"] and "card [redacted] on file" in shown["request"]["body"]
    assert '"total": 750' in shown["request"]["body"]  # the rest is shown as sent
    for f in (p.dir / "state").glob("proctor.db*"):  # the database and its WAL
        assert b"hunter2-secret" not in f.read_bytes(), f
