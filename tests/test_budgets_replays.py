"""An idempotent retry of a call that filled a budget is answered from its replay, on both
gateway engines (docs/limits.md, "Reserve, settle, release"; docs/coordination.md,
"Idempotency-Key"): never held for a person (`on_exceed: hold`), never refused 429
(`on_exceed: refuse`), never charged again, never forwarded, also after the budget was
lowered or raised. What a retry must still meet: the same key with another body is 422,
a suspended agent is refused, and a policy that now forbids the call denies it."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from conftest import GATEWAY_ENGINES, Proctor, wait_for
from test_budgets import _port, billing, buyer, monthly  # noqa: F401
from test_budgets_attacks import operator_token, spent_and_reserved
from test_store import PG_DSN, PG_SKIP, _pg_admin

pytestmark = pytest.mark.integration

ASYNC_APPROVALS = {"mode": "async", "expire_after_seconds": 60}


def gw(p: Proctor, token: str, amount: int | str, key: str, marker: str) -> httpx.Response:
    """A charge through the gateway listener (the engine under test), with an Idempotency-Key."""
    body = json.dumps({"amount": amount, "marker": marker}).encode()
    return httpx.post(f"{p.gateway_url}/svc/charges/acme", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {token}", "content-type": "application/json",
                               "Idempotency-Key": key})


def forwarded(upstream, marker: str) -> int:
    """How many requests carrying `marker` reached the upstream."""
    return len([e for e in upstream.received() if marker in e.get("body", "")])


def pending(p: Proctor, idp) -> list[dict]:
    r = httpx.get(f"{p.control_url}/v1/approvals", params={"state": "pending", "limit": 1000},
                  headers={"Authorization": f"Bearer {operator_token(idp)}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["approvals"]


def replayed(r: httpx.Response, first: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    assert r.headers.get("Idempotent-Replayed") == "true", dict(r.headers)
    assert r.headers.get("X-Proctor-Original-Decision-Id") == first.headers["X-Proctor-Decision-Id"]
    assert r.json() == first.json()


@pytest.mark.parametrize("engine", GATEWAY_ENGINES)
@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_the_retry_of_the_call_that_filled_a_budget_is_replayed_once_paid(billing, idp, upstream, engine,
                                                                            on_exceed) -> None:
    p = billing(monthly(limit="50", on_exceed=on_exceed), approvals=ASYNC_APPROVALS, gateway={"engine": engine})
    token = buyer(idp)
    key, marker = "fill-" + uuid.uuid4().hex, uuid.uuid4().hex
    first = gw(p, token, 50, key, marker)
    assert first.status_code == 200, first.text
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")

    for _ in range(2):  # (and again: each retry is a replay)
        replayed(gw(p, token, 50, key, marker), first)
    assert forwarded(upstream, marker) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")  # not charged again, nothing left reserved
    assert pending(p, idp) == []  # no person was asked

    # the same key with another body is not that call: 422, not forwarded, not held
    other_marker = uuid.uuid4().hex
    mismatch = gw(p, token, 50, key, other_marker)
    assert mismatch.status_code == 422, mismatch.text
    assert mismatch.json()["title"] == "Idempotency-Key reused"
    assert forwarded(upstream, other_marker) == 0 and pending(p, idp) == []

    # a new call (a new key) is over the budget as before: held for a person, or refused
    new = gw(p, token, 50, "new-" + uuid.uuid4().hex, other_marker)
    if on_exceed == "hold":
        assert new.status_code == 202, new.text
        assert [a["id"] for a in pending(p, idp)] == [new.json()["approval_id"]]
    else:
        assert new.status_code == 429 and new.json()["reasons"] == ["budget:po-monthly"], new.text
    assert forwarded(upstream, other_marker) == 0
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")

    # the replay is recorded as an allow that was not forwarded, with no reservation of its own
    r = gw(p, token, 50, key, marker)
    replayed(r, first)
    decision = r.headers["X-Proctor-Decision-Id"]
    wait_for(lambda: any(d.get("decision_id") == decision and "type" not in d for d in p.decisions()),
             timeout=10, what="the replay's decision record")
    rec = p.decision(decision)
    assert rec["decision"] == "allow" and rec["upstream_status"] is None, rec
    assert rec["budget"]["name"] == "po-monthly" and "result" not in rec["budget"], rec["budget"]


@pytest.mark.parametrize("engine", GATEWAY_ENGINES)
def test_a_retry_is_still_refused_for_a_suspended_agent_and_by_a_policy_that_now_forbids_it(
        billing, idp, upstream, engine) -> None:
    p = billing(monthly(limit="50", on_exceed="hold"), approvals=ASYNC_APPROVALS, gateway={"engine": engine})
    token, op = buyer(idp), operator_token(idp)
    key, marker = "sus-" + uuid.uuid4().hex, uuid.uuid4().hex
    first = gw(p, token, 50, key, marker)
    assert first.status_code == 200, first.text

    auth = {"Authorization": f"Bearer {op}"}
    s = httpx.post(f"{p.control_url}/v1/suspensions", headers=auth, timeout=10,
                   json={"kind": "agent", "target": "buy-bot", "reason": "incident 7"})
    assert s.status_code == 201, s.text
    refused = gw(p, token, 50, key, marker)
    assert refused.status_code == 403 and refused.headers.get("Idempotent-Replayed") is None, refused.text
    assert "incident 7" in refused.text
    assert httpx.delete(f"{p.control_url}/v1/suspensions/agent/buy-bot", headers=auth,
                        timeout=10).status_code == 200
    replayed(gw(p, token, 50, key, marker), first)

    # a policy that forbids the call now: the retry is denied, not replayed (a replay needs the policy too)
    (p.policies_dir / "late.cedar").write_text(
        '@id("no-more-charges")\nforbid (principal, action == Action::"test.charge.create", resource);\n')
    try:
        def denied() -> bool:
            r = gw(p, token, 50, key, marker)
            return r.status_code == 403 and r.headers.get("Idempotent-Replayed") is None

        wait_for(denied, timeout=10, what="the new policy to deny the retry")
        r = gw(p, token, 50, key, marker)
        assert r.status_code == 403 and "no-more-charges" in r.text, r.text
    finally:
        (p.policies_dir / "late.cedar").unlink()
    wait_for(lambda: gw(p, token, 50, key, marker).status_code == 200, timeout=10, what="the policy removed")
    assert forwarded(upstream, marker) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")
    assert pending(p, idp) == []


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_a_retry_is_replayed_after_the_budget_was_lowered_or_raised(billing, idp, upstream, on_exceed) -> None:
    """Replicas sharing one PostgreSQL store (ledger and idempotency keys), as during a rolling
    config change: the call filled the budget on the old config; its retry on a replica whose
    limit was lowered below the spend, or raised above it, is the same replay."""
    schema = "proctor_rp_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    env = {"PROCTOR_TEST_BG_STORE": f"{PG_DSN}{sep}schema={schema}"}
    try:
        common = {"env": env, "store": {"url_env": "PROCTOR_TEST_BG_STORE"}, "approvals": ASYNC_APPROVALS}
        old = billing(monthly(limit="50", on_exceed=on_exceed), name="old", **common)
        lowered = billing(monthly(limit="20", on_exceed=on_exceed), name="low", gateway={"engine": "aiohttp"},
                          **common)
        raised = billing(monthly(limit="500", on_exceed=on_exceed), name="high", **common)
        token = buyer(idp)
        key, marker = "cfg-" + uuid.uuid4().hex, uuid.uuid4().hex
        first = gw(old, token, 50, key, marker)
        assert first.status_code == 200, first.text
        for p in (lowered, raised, old):
            replayed(gw(p, token, 50, key, marker), first)
        assert forwarded(upstream, marker) == 1
        assert spent_and_reserved(old, idp, "po-monthly") == ("50", "0")
        assert pending(old, idp) == []
        # the budgets themselves still apply: a new call over the lowered one is held or refused,
        # under the raised one it fits
        fresh = uuid.uuid4().hex
        over = gw(lowered, token, 1, "low-" + uuid.uuid4().hex, fresh)
        assert over.status_code == (202 if on_exceed == "hold" else 429), over.text
        assert gw(raised, token, 1, "high-" + uuid.uuid4().hex, fresh).status_code == 200
        assert forwarded(upstream, fresh) == 1
        wait_for(lambda: spent_and_reserved(old, idp, "po-monthly") == ("51", "0"), timeout=10, what="51 spent")
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.mark.parametrize("engine", GATEWAY_ENGINES)
def test_in_monitor_mode_the_retry_is_a_plain_replay_not_a_would_be_hold(billing, idp, upstream, engine) -> None:
    """Monitor mode records what Cedar's deny would have become; a retry the store answers is
    not over the budget, so Cedar allows it: its record says no would-be hold."""
    p = billing(monthly(limit="50", on_exceed="hold"), approvals=ASYNC_APPROVALS, monitor={"global": True},
                gateway={"engine": engine})
    token = buyer(idp)
    key, marker = "mon-" + uuid.uuid4().hex, uuid.uuid4().hex
    first = gw(p, token, 50, key, marker)
    assert first.status_code == 200, first.text
    r = gw(p, token, 50, key, marker)
    replayed(r, first)
    assert "proctor-monitor" not in r.headers, dict(r.headers)
    decision = r.headers["X-Proctor-Decision-Id"]
    wait_for(lambda: any(d.get("decision_id") == decision and "type" not in d for d in p.decisions()),
             timeout=10, what="the replay's decision record")
    rec = p.decision(decision)
    assert rec["decision"] == "allow" and rec["policy_decision"] == "allow" and not rec.get("monitored"), rec
    assert forwarded(upstream, marker) == 1 and pending(p, idp) == []
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")
    # a new call over the budget: Cedar's hold is only recorded, the budget itself is enforced (429)
    other = uuid.uuid4().hex
    new = gw(p, token, 50, "new-" + uuid.uuid4().hex, other)
    assert new.status_code == 429 and new.headers.get("proctor-monitor", "").startswith("hold"), \
        (new.status_code, dict(new.headers), new.text)
    assert forwarded(upstream, other) == 0 and pending(p, idp) == []
