"""Human approvals through the gateway listener, on both gateway engines.

A held gateway request waits in the engine's handler while approvers vote; once
approved it reaches the upstream exactly once, without the agent's token. An
agent that hangs up while held is noticed (the engine's `client_alive`
callback) and its approval applies to its retry instead. The hold policies and
helpers are tests/test_approvals.py's.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from test_approvals import (  # noqa: F401 (hold_policies and make are fixtures)
    MANAGERS,
    agent_token,
    approver_token,
    events,
    hits,
    hold_policies,
    in_thread,
    make,
    marker,
    order,
    request_records,
    show,
    vote,
    wait_pending,
)

pytestmark = pytest.mark.integration


def gateway_order(p, token: str, mark: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{p.gateway_url}/svc/tenants/7/orders", json=order(mark),
                      headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


def test_gateway_hold_then_approved_forwards_exactly_once(make, gateway_engine, idp, upstream):  # noqa: F811
    p = make(gateway={"engine": gateway_engine})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    got = in_thread(gateway_order, p, tok, mark)
    (aid,) = wait_pending(p, alice)
    assert hits(upstream, mark) == []  # held: nothing forwarded yet
    assert vote(p, aid, alice, "approve", "budget ok").status_code == 200
    resp = got()
    assert resp.status_code == 200, resp.text
    (hit,) = hits(upstream, mark)
    assert json.loads(hit["body"]) == order(mark)
    assert "authorization" not in upstream.headers_of(hit) and tok not in json.dumps(hit)
    (rec,) = request_records(p, aid)
    assert rec["mode"] == "reverse" and rec["decision"] == "allow" and rec["status"] == 200
    assert rec["decision_id"] == resp.headers["x-proctor-decision-id"]


def test_gateway_agent_that_hangs_up_while_held_is_not_forwarded(make, gateway_engine, idp, upstream):  # noqa: F811
    p = make({"sync_wait_seconds": 10}, gateway={"engine": gateway_engine})
    tok = agent_token(idp)
    alice = approver_token(idp, "alice", MANAGERS)
    mark = marker()
    with pytest.raises(httpx.ReadTimeout):
        gateway_order(p, tok, mark, timeout=1)
    (aid,) = wait_pending(p, alice)
    assert vote(p, aid, alice).status_code == 200  # right after the agent hung up
    time.sleep(2.5)  # the held request notices the hang-up within a second
    assert hits(upstream, mark) == []  # nothing until the agent asks again
    assert show(p, aid, alice)["state"] == "approved"
    assert gateway_order(p, tok, mark).status_code == 200
    assert len(hits(upstream, mark)) == 1
    assert events(p, aid) == ["requested", "approved", "forwarded"]
