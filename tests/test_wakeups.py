"""Cross-replica wake-ups (proxy/store/events.py, proxy/wakeups.py): PostgreSQL LISTEN/NOTIFY
between real proxies on one schema. A policy push on one replica is followed by another whose
own poll is 30 s away; an approval decided on one replica releases a request held on the other
within a fraction of the once-a-second poll; a suspension made on one replica refuses on the
other at once; the listener reports what it heard; a replica whose listener cannot connect
still converges by polling."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest

from conftest import wait_for
from test_approvals import hold_policies  # noqa: F401  (the fixture)
from test_fleet_policies import FORBID_READS, operator, read, status, variant, fleet  # noqa: F401
from test_store import PG_DSN, PG_SKIP

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)]



def test_a_push_reaches_a_replica_whose_poll_is_far_away(fleet, idp, tmp_path) -> None:  # noqa: F811
    a = fleet("replica-a", poll=30)
    b = fleet("replica-b", poll=30)
    token = idp.token("wake-reader")
    assert read(a, token) == 200 and read(b, token) == 200
    pushed = variant(tmp_path, "pushed", FORBID_READS)
    r = httpx.post(f"{a.control_url}/v1/policies/push",
                   json={"files": {p.name: p.read_text() for p in pushed.iterdir()}, "reason": "freeze"},
                   headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=30)
    assert r.status_code == 200, r.text
    started = time.monotonic()
    wait_for(lambda: read(b, token) == 403, timeout=5, what="replica-b follows the push (its poll is 30 s away)")
    assert time.monotonic() - started < 5
    events = b.health()["components"]["store"]["events"]
    assert events["shared"] is True and events["listening"] is True and events["received"] >= 1


def test_suspension_and_approval_cross_replicas_at_once(fleet, idp) -> None:  # noqa: F811
    a, b = fleet("replica-a"), fleet("replica-b")
    op = operator(idp)
    agent = "wake-bot-" + uuid.uuid4().hex[:6]
    token = idp.token(agent)
    assert read(a, token) == 200
    r = httpx.post(f"{b.control_url}/v1/agents/{agent}/suspend", json={"reason": "runaway"},
                   headers={"Authorization": f"Bearer {op}"}, timeout=10)
    assert r.status_code == 201, r.text
    started = time.monotonic()
    wait_for(lambda: read(a, token) == 503 or read(a, token) == 403, timeout=3, what="replica-a refuses")
    assert time.monotonic() - started < 1.0


def test_an_approval_on_one_replica_releases_a_request_held_on_another_at_once(fleet, idp, upstream,  # noqa: F811
                                                                              hold_policies) -> None:
    approvals = {"approvals": {"mode": "sync", "sync_wait_seconds": 20, "expire_after_seconds": 60}}
    a = fleet("replica-a", hold_policies, **approvals)
    b = fleet("replica-b", hold_policies, **approvals)
    manager = idp.token("mia", aud="proctor-approvers", approval_groups=["managers"], ttl=600)
    waits = []
    for i in range(3):
        token = idp.token(f"wake-buyer-{i}", groups=["writers"], ttl=600)
        answer: dict = {}

        def send(token: str = token, answer: dict = answer, i: int = i) -> None:
            with httpx.Client(proxy=a.proxy_url_with(f"wake-buyer-{i}", token), timeout=30) as c:
                answer["r"] = c.post(f"http://127.0.0.1:{upstream.port}/tenants/7/orders",
                                     json={"order": {"total": 750, "items": [{"sku": "A-1"}], "marker": f"w{i}"}})
                answer["t"] = time.monotonic()

        t = threading.Thread(target=send)
        t.start()

        def pending(i: int = i) -> list:
            r = httpx.get(f"{b.control_url}/v1/approvals", params={"state": "pending", "agent": f"wake-buyer-{i}"},
                          headers={"Authorization": f"Bearer {manager}"}, timeout=10)
            return r.json().get("approvals", []) if r.status_code == 200 else []

        wait_for(lambda: pending(), timeout=10, what="the hold")
        time.sleep(0.3)  # (the request is waiting on replica a now)
        aid = pending()[0]["id"]
        decided = time.monotonic()
        r = httpx.post(f"{b.control_url}/v1/approvals/{aid}/approve", json={"reason": "ok"},
                       headers={"Authorization": f"Bearer {manager}"}, timeout=10)
        assert r.status_code == 200, r.text
        t.join(30)
        assert answer["r"].status_code == 200, answer["r"].text
        waits.append(answer["t"] - decided)
    # the once-a-second shared-store poll would take 0.5 s on average; the event takes milliseconds
    assert sorted(waits)[1] < 0.3, waits
    assert a.health()["components"]["store"]["events"]["received"] >= 3
