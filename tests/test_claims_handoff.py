"""Handoffs and transfers of claims end to end: real Proctor processes, a real recording
upstream (docs/coordination.md, "Handoffs").

The `handsvc` connector declares a handoff on its incident reassignment route: the body's
`assigned_to` names the agent that takes over, else `assignment_group` names a group
(`service-desk` is people: its inbox). Webhooks go to the same recording upstream (/hooks).
"""

from __future__ import annotations

import json
import os
import uuid

import httpx
import pytest

from conftest import DATA, Proctor, _start_upstream, start_proctor, wait_for

pytestmark = pytest.mark.integration

ADMINS = "proctor-admins"
DESK = "service-desk"

CEDAR = """
@id("handsvc-anyone")
permit (principal, action in [Action::"handsvc.incident.update", Action::"handsvc.incident.fail"], resource);

@id("claim-held-by-another-agent")
@claim("conflict")
forbid (principal, action, resource)
when { context has claim && context.claim.conflict };
"""


def connector(port: int) -> dict:
    body = {"assigned_to": {"path": "assigned_to"}, "assignment_group": {"path": "assignment_group"}}
    handoff = {"to": {"agent": "assigned_to", "group": "assignment_group"}, "human_groups": [DESK]}
    return {
        "name": "handsvc",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [
            {"method": "PATCH", "path": "/incidents/{id}", "action": "handsvc.incident.update",
             "resource": {"type": "Incident", "id": "{id}"}, "claim": {"mode": "exclusive", "ttl_seconds": 300},
             "body": body, "handoff": handoff},
            # the echo upstream answers 500 on paths ending /__status/500: a failed reassignment
            {"method": "PATCH", "path": "/fail/{id}/__status/500", "action": "handsvc.incident.fail",
             "resource": {"type": "Incident", "id": "{id}"}, "claim": {"mode": "exclusive", "ttl_seconds": 300},
             "body": body, "handoff": handoff},
        ],
    }


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    up = _start_upstream(tmp_path_factory.mktemp("handoff-up"), None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


@pytest.fixture(scope="module")
def hp(tmp_path_factory, idp, pki, upstream, upstream_tls, svc) -> Proctor:
    policies = tmp_path_factory.mktemp("handoff-policies") / "policies"
    import shutil

    shutil.copytree(DATA / "policies", policies)
    (policies / "handoff.cedar").write_text(CEDAR)
    hooks = [{"url": f"http://127.0.0.1:{svc.port}/hooks", "events": ["handoff"], "max_attempts": 1}]
    p = start_proctor(tmp_path_factory.mktemp("handoff-proctor"), idp, pki, upstream, upstream_tls,
                      {"approvals": {"webhooks": hooks}}, policies_src=policies,
                      extra_connectors=[connector(svc.port)])
    yield p
    p.stop()


def tid() -> str:
    return f"INC-{uuid.uuid4().hex[:10]}"


def write(p: Proctor, svc, idp, agent: str, path: str, body: dict | None = None) -> httpx.Response:
    token = idp.token(agent, groups=["writers"], ttl=600)
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=20) as c:
        return c.request("PATCH", f"http://127.0.0.1:{svc.port}{path}", json=body or {"note": "x"})


def operator(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=[ADMINS], ttl=600)


def person(idp, who: str, *groups: str) -> str:
    return idp.token(who, aud="proctor-approvers", approval_groups=list(groups), ttl=600)


def control(p: Proctor, method: str, path: str, token: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{p.control_url}{path}", headers={"Authorization": f"Bearer {token}"},
                         json=body, timeout=10)


def holders(p: Proctor, idp, t: str) -> list[dict]:
    claims = control(p, "GET", "/v1/claims?connector=handsvc", operator(idp)).json()["claims"]
    return [c for c in claims if c["resource"] == f'Incident::"{t}"']


def claim_events(p: Proctor, t: str) -> list[dict]:
    return [r for r in p.decisions() if r.get("type") == "claim" and r["resource"] == f'Incident::"{t}"']


def audit_events(p: Proctor, t: str) -> list[dict]:
    path = p.dir / "state" / "audit.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [e for e in lines if e.get("unmapped", {}).get("proctor", {}).get("record") == "claim"
            and e["unmapped"]["proctor"].get("resource") == f'Incident::"{t}"']


def hooks(svc, t: str) -> list[dict]:
    return [json.loads(e["body"]) for e in svc.received() if e["path"] == "/hooks" and t in e["body"]]


# --------------------------------------------------------------------------- tests
def test_handoff_route_moves_the_claim_to_the_named_agent(hp, svc, idp) -> None:
    t = tid()
    path = f"/incidents/{t}"
    first = write(hp, svc, idp, "agent-a", path)
    assert first.status_code == 200, first.text
    assert [c["holder"] for c in holders(hp, idp, t)] == ["agent-a"]
    # a's reassignment names b: forwarded, and the claim is b's (a new tenure, fence bumped)
    handed = write(hp, svc, idp, "agent-a", path, {"assigned_to": "agent-b"})
    assert handed.status_code == 200, handed.text
    held = holders(hp, idp, t)
    assert [(c["holder"], c["fence"]) for c in held] == [("agent-b", 2)], held
    # now b writes, a is refused with 409 naming b
    assert write(hp, svc, idp, "agent-b", path).status_code == 200
    refused = write(hp, svc, idp, "agent-a", path)
    assert refused.status_code == 409 and refused.json()["claim"]["holder"] == "agent-b", refused.text
    # recorded with both parties, in decisions.jsonl and the OCSF audit trail
    events = [(e["event"], e["holder"], e.get("to"), e.get("by"), e.get("fence")) for e in claim_events(hp, t)]
    assert events == [("acquired", "agent-a", None, None, 1), ("handoff", "agent-a", "agent-b", "agent-a", 2),
                      ("conflict", "agent-b", None, "agent-a", 2)], events
    conflict = claim_events(hp, t)[-1]
    assert conflict["decision_id"] == refused.headers["x-proctor-decision-id"]
    ev = [e for e in claim_events(hp, t) if e["event"] == "handoff"]
    assert len(ev) == 1 and (ev[0]["holder"], ev[0]["to"], ev[0]["by"], ev[0]["fence"]) == (
        "agent-a", "agent-b", "agent-a", 2)
    assert ev[0]["decision_id"] == handed.headers["x-proctor-decision-id"]
    wait_for(lambda: any(e["api"]["operation"] == "proctor.claim.handoff" for e in audit_events(hp, t)),
             timeout=10, what="the handoff's OCSF event")
    ocsf = next(e for e in audit_events(hp, t) if e["api"]["operation"] == "proctor.claim.handoff")
    assert "agent-a -> agent-b" in ocsf["message"] and ocsf["metadata"]["correlation_uid"] == ev[0]["decision_id"]
    # the webhook hears about it, with its own event name
    wait_for(lambda: hooks(svc, t), timeout=10, what="the handoff webhook")
    hook = hooks(svc, t)[0]
    assert hook["type"] == "proctor.claim.handoff" and hook["claim"]["to"] == "agent-b"
    hdrs = dict(next(e for e in svc.received() if e["path"] == "/hooks" and t in e["body"])["headers"])
    assert hdrs.get("X-Proctor-Event") == "proctor.claim.handoff"
    metrics = httpx.get(f"{hp.control_url}/metrics", timeout=5).text
    assert 'proctor_claim_handoffs_total{connector="handsvc",to="agent"}' in metrics


def test_failed_reassignment_moves_nothing(hp, svc, idp) -> None:
    t = tid()
    path = f"/fail/{t}/__status/500"
    r = write(hp, svc, idp, "agent-c", path, {"assigned_to": "agent-d"})
    assert r.status_code == 500
    assert [c["holder"] for c in holders(hp, idp, t)] == ["agent-c"]
    assert [e["event"] for e in claim_events(hp, t)] == ["acquired"]


def test_handoff_to_a_human_group_goes_to_its_inbox(hp, svc, idp) -> None:
    t = tid()
    path = f"/incidents/{t}"
    assert write(hp, svc, idp, "agent-e", path).status_code == 200
    handed = write(hp, svc, idp, "agent-e", path, {"assignment_group": DESK})
    assert handed.status_code == 200, handed.text
    # agents (the old holder too) are refused: people have it now
    refused = write(hp, svc, idp, "agent-e", path)
    assert refused.status_code == 409 and refused.json()["claim"]["holder"] == f"group:{DESK}"
    # the desk's inbox lists it; other people's does not
    desk = person(idp, "dana", DESK)
    items = [i for i in control(hp, "GET", "/v1/claims/inbox", desk).json()["items"]
             if i["claim"]["resource"] == f'Incident::"{t}"']
    assert len(items) == 1 and items[0]["group"] == DESK and items[0]["taken_by"] is None
    stranger = person(idp, "sam", "finance")
    assert not [i for i in control(hp, "GET", "/v1/claims/inbox", stranger).json()["items"]
                if i["claim"]["resource"] == f'Incident::"{t}"']
    cid = items[0]["claim"]["id"]
    assert control(hp, "POST", f"/v1/claims/{cid}/take", stranger).status_code == 404
    # dana takes it, then gives it back: the resource is free for agents again
    took = control(hp, "POST", f"/v1/claims/{cid}/take", desk)
    assert took.status_code == 200 and took.json()["claim"]["holder"] == "human:dana", took.text
    assert control(hp, "POST", f"/v1/claims/{cid}/take", desk).status_code == 404  # that id ended
    new_id = took.json()["claim"]["id"]
    assert [i["taken_by"] for i in control(hp, "GET", "/v1/claims/inbox", desk).json()["items"]
            if i["claim"]["id"] == new_id] == ["dana"]
    assert control(hp, "POST", f"/v1/claims/{new_id}/give-back", desk).status_code == 200
    assert write(hp, svc, idp, "agent-f", path).status_code == 200
    events = [(e["event"], e.get("to"), e.get("to_queue"), e.get("by")) for e in claim_events(hp, t)]
    assert events == [("acquired", None, None, None), ("handoff", None, DESK, "agent-e"),
                      ("conflict", None, None, "agent-e"), ("taken", "human:dana", None, "dana"),
                      ("released", None, None, "dana"), ("acquired", None, None, None)], events
    wait_for(lambda: any(h["claim"].get("to_queue") == DESK for h in hooks(svc, t)), timeout=10,
             what="the human handoff webhook")
    metrics = httpx.get(f"{hp.control_url}/metrics", timeout=5).text
    assert 'proctor_claim_handoffs_total{connector="handsvc",to="human"}' in metrics


def test_operator_transfers_a_claim_by_api_and_cli(hp, svc, idp) -> None:
    from click.testing import CliRunner

    from proxy.coordination.cli import claims as claims_cli

    t = tid()
    path = f"/incidents/{t}"
    assert write(hp, svc, idp, "agent-g", path).status_code == 200
    cid = holders(hp, idp, t)[0]["id"]
    # agents cannot; a bad body is a 400; an unknown claim a 404
    assert control(hp, "POST", f"/v1/claims/{cid}/transfer", idp.token("agent-g", groups=["writers"]),
                   {"to": "x"}).status_code == 401
    assert control(hp, "POST", f"/v1/claims/{cid}/transfer", operator(idp), {"to": ""}).status_code == 400
    assert control(hp, "POST", "/v1/claims/clm_nope/transfer", operator(idp), {"to": "x"}).status_code == 404
    moved = control(hp, "POST", f"/v1/claims/{cid}/transfer", operator(idp), {"to": "agent-h", "reason": "shift"})
    assert moved.status_code == 200, moved.text
    doc = moved.json()
    assert doc["transferred"]["holder"] == "agent-g" and doc["claim"]["holder"] == "agent-h"
    assert doc["claim"]["fence"] == 2 and doc["transferred_by"] == "olga"
    assert write(hp, svc, idp, "agent-g", path).status_code == 409
    assert write(hp, svc, idp, "agent-h", path).status_code == 200

    runner = CliRunner(env={"PROCTOR_TOKEN": None, "PROCTOR_CONTROL_URL": None, "HTTP_PROXY": None, "http_proxy": None})
    admin = ["--as", "olga", "--group", ADMINS, "-c", str(hp.config_path)]
    new_id = doc["claim"]["id"]
    r = runner.invoke(claims_cli, ["transfer", new_id, "--to", "agent-i", *admin], catch_exceptions=False)
    assert r.exit_code == 0 and "from agent-h to agent-i" in r.output and "fence 3" in r.output, r.output
    r = runner.invoke(claims_cli, ["transfer", new_id, "--to", "agent-j", *admin], catch_exceptions=False)
    assert r.exit_code == 1 and "No such claim" in r.output, r.output
    assert [c["holder"] for c in holders(hp, idp, t)] == ["agent-i"]
    events = [(e["event"], e["holder"], e.get("to"), e.get("by")) for e in claim_events(hp, t)]
    assert events == [("acquired", "agent-g", None, None), ("transferred", "agent-g", "agent-h", "olga"),
                      ("conflict", "agent-h", None, "agent-g"), ("transferred", "agent-h", "agent-i", "olga")]
    assert claim_events(hp, t)[1]["reason"] == "shift"


@pytest.mark.skipif(not os.environ.get("PROCTOR_TEST_POSTGRES_DSN"), reason="PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)")
def test_handoff_and_transfer_across_two_proxies_on_postgres(tmp_path, idp, pki, upstream, upstream_tls, svc) -> None:
    """A handoff through one replica is what the other replica enforces (one store, one fence)."""
    import asyncio
    import shutil

    import asyncpg

    dsn = os.environ["PROCTOR_TEST_POSTGRES_DSN"]
    schema = "proctor_handoff_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in dsn else "?"
    env = {"PROCTOR_TEST_HANDOFF_STORE": f"{dsn}{sep}schema={schema}"}
    policies = tmp_path / "policies"
    shutil.copytree(DATA / "policies", policies)
    (policies / "handoff.cedar").write_text(CEDAR)
    procs: list[Proctor] = []
    try:
        for i in range(2):
            procs.append(start_proctor(tmp_path / f"p{i}", idp, pki, upstream, upstream_tls,
                                       {"store": {"url_env": "PROCTOR_TEST_HANDOFF_STORE"}}, policies_src=policies,
                                       extra_connectors=[connector(svc.port)], env=env))
        one, two = procs
        t = tid()
        path = f"/incidents/{t}"
        assert write(one, svc, idp, "pg-a", path).status_code == 200
        assert write(one, svc, idp, "pg-a", path, {"assigned_to": "pg-b"}).status_code == 200
        assert write(two, svc, idp, "pg-a", path).status_code == 409
        assert write(two, svc, idp, "pg-b", path).status_code == 200
        cid = holders(two, idp, t)[0]["id"]
        moved = control(two, "POST", f"/v1/claims/{cid}/transfer", operator(idp), {"to": "pg-c"})
        assert moved.status_code == 200 and moved.json()["claim"]["fence"] == 3, moved.text
        assert [c["holder"] for c in holders(one, idp, t)] == ["pg-c"]
        assert write(one, svc, idp, "pg-b", path).status_code == 409
        assert [e["event"] for e in claim_events(one, t)] == ["acquired", "handoff", "conflict"]
        assert [e["event"] for e in claim_events(two, t)] == ["conflict", "transferred"]
    finally:
        for p in procs:
            p.stop()

        async def drop() -> None:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())
