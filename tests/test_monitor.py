"""Monitor mode end to end (docs/governance.md, "Monitor mode"): real `proctor run` processes,
real upstreams, real HTTP clients.

- `glob`: `monitor: {global: true}`, once per gateway engine (mitmproxy, aiohttp), with a
  sync `@approval("managers")` hold for orders over 500 (as tests/test_approvals.py). A
  request the policies deny is forwarded and recorded as a would-be deny (record, OCSF event,
  metrics, answer header); a would-be hold is forwarded at once and no approval exists;
  authentication, the kill switch and egress default-deny are enforced all the same.
- `scoped`: monitor by connector (`crm`, which injects a credential), by agent and by agent
  group: only those are forwarded, everything else is enforced.
- startup: unknown connectors and bad keys are config errors; the banner reaches stderr even
  with `--log-level error`.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import httpx
import jsonschema
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

from conftest import DATA, Proctor, _start_upstream, start_proctor, wait_for

from proxy.audit.ocsf import OCSF_VERSION

pytestmark = pytest.mark.integration

HOLD_CEDAR = """
@id("mon-big-orders-need-a-manager")
@approval("managers")
forbid (principal, action == Action::"test.order.create", resource)
when { context has fields && context.fields has total && context.fields.total.greaterThan(decimal("500.0")) }
unless { context has approval && context.approval.groups.contains("managers") };
"""
APPROVAL_TYPE = (
    "type Approval = { id: String, approver: String, approvers: Set<String>, groups: Set<String>, "
    "time: datetime, note: String };\n"
)
CRM_SECRET = "crm-s3cret-token-for-monitor"


@pytest.fixture(scope="module")
def hold_policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mon-policies") / "policies"
    shutil.copytree(DATA / "policies", d)
    schema = (d / "schema.cedarschema").read_text()
    schema = schema.replace("type OrderBody", APPROVAL_TYPE + "type OrderBody", 1)
    schema = schema.replace("params: { tenant: Long },", "params: { tenant: Long },\n  approval?: Approval,", 1)
    (d / "schema.cedarschema").write_text(schema)
    (d / "hold.cedar").write_text(HOLD_CEDAR)
    return d


@pytest.fixture(scope="module", params=["mitmproxy", "aiohttp"])
def glob(request, tmp_path_factory, idp, pki, upstream, upstream_tls, hold_policies) -> Proctor:
    p = start_proctor(tmp_path_factory.mktemp(f"mon-global-{request.param}"), idp, pki, upstream, upstream_tls,
                      {"monitor": {"global": True}, "gateway": {"engine": request.param},
                       "approvals": {"mode": "sync", "sync_wait_seconds": 30, "expire_after_seconds": 120}},
                      policies_src=hold_policies)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def crm(tmp_path_factory):
    up = _start_upstream(tmp_path_factory.mktemp("mon-crm"), None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


def crm_connector(port: int) -> dict:
    return {
        "name": "crm",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [
            {"method": "GET", "path": "/sobjects/{id}", "action": "test.item.read", "resource": {"type": "Item", "id": "{id}"}},
            {"method": "DELETE", "path": "/sobjects/{id}", "action": "test.item.delete",
             "resource": {"type": "Item", "id": "{id}"}},
        ],
        "auth": {"type": "bearer", "token": {"env": "MON_CRM_TOKEN"}},
    }


@pytest.fixture(scope="module")
def scoped(tmp_path_factory, idp, pki, upstream, upstream_tls, crm) -> Proctor:
    p = start_proctor(tmp_path_factory.mktemp("mon-scoped"), idp, pki, upstream, upstream_tls,
                      {"monitor": {"connectors": ["crm"], "agents": ["trial-bot"], "groups": ["trial"]},
                       "rate_limits": [{"name": "crm-deletes", "limit": 2, "period": "1h",
                                        "match": {"actions": ["test.item.delete"], "connectors": ["crm"]}}]},
                      extra_connectors=[crm_connector(crm.port)], env={"MON_CRM_TOKEN": CRM_SECRET})
    yield p
    p.stop()


@pytest.fixture(scope="module")
def ocsf_validator():
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION)).get_class_schema("api_activity")
    return jsonschema.Draft202012Validator(schema)


# ------------------------------------------------------------------------- helpers
def mark() -> str:
    return "mon-" + uuid.uuid4().hex[:16]


def hits(up, marker: str) -> list[dict]:
    return [e for e in up.received() if marker in e["path"] or marker in e.get("body", "")]


def client(p: Proctor, agent: str, token: str) -> httpx.Client:
    return httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=15)


def record(p: Proctor, r: httpx.Response) -> dict:
    did = r.headers["x-proctor-decision-id"]
    wait_for(lambda: any(d.get("decision_id") == did and "type" not in d for d in p.decisions()), timeout=10,
             what="decision record")
    return p.decision(did)


def audit_event(p: Proctor, decision_id: str) -> dict:
    path = p.dir / "state" / "audit.jsonl"

    def find() -> dict | None:
        if not path.exists():
            return None
        for line in path.read_text().splitlines():
            ev = json.loads(line)
            if ev.get("metadata", {}).get("correlation_uid") == decision_id and \
                    ev.get("unmapped", {}).get("proctor", {}).get("record") == "decision":
                return ev
        return None

    wait_for(lambda: find() is not None, timeout=10, what="audit event")
    ev = find()
    assert ev is not None
    return ev


def metric(p: Proctor, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{p.control_url}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def operator(idp, *groups: str) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=list(groups or ["proctor-admins"]), ttl=600)


# ------------------------------------------------------------------ monitor: global
def test_global_monitor_forwards_a_denied_request_and_records_the_would_be_deny(glob, idp, upstream,
                                                                                 ocsf_validator):
    p, m = glob, mark()
    token = idp.token("reader-bot", groups=["readers"], ttl=600)
    with client(p, "reader-bot", token) as c:
        r = c.delete(f"http://127.0.0.1:{upstream.port}/items/{m}")
    # the policies deny it (no-item-deletes); monitor mode forwards it and says what it would have been
    assert r.status_code == 200 and r.json()["method"] == "DELETE", r.text
    assert r.headers["proctor-monitor"] == "deny; kind=policy; status=403"
    assert [e["method"] for e in hits(upstream, m)] == ["DELETE"]
    rec = record(p, r)
    assert (rec["decision"], rec["monitor"], rec["policy_decision"]) == ("deny", True, "deny")
    assert rec["reasons"] == ["no-item-deletes"] and (rec["status"], rec["upstream_status"]) == (200, 200)
    assert "refusal" not in rec
    mon = rec["monitored"]
    assert {k: mon[k] for k in ("decision", "status", "kind", "title", "reasons", "forwarded")} == {
        "decision": "deny", "status": 403, "kind": "policy", "title": "Denied by policy",
        "reasons": ["no-item-deletes"], "forwarded": True}
    assert "no-item-deletes" in mon["detail"]
    # the audit event: valid OCSF, flagged where a SIEM filters and in Proctor's own fields
    ev = audit_event(p, rec["decision_id"])
    errors = list(ocsf_validator.iter_errors(ev))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert ev["metadata"]["labels"] == ["monitor"] and ev["status"] == "Success"
    assert ev["actor"]["authorizations"][0]["policy"]["uid"] == "no-item-deletes"
    assert ev["unmapped"]["proctor"]["monitor"] is True and ev["unmapped"]["proctor"]["monitored"] == mon
    assert "monitor mode: not enforced, forwarded" in ev["message"]
    # metrics: the would-be decision, labelled monitor
    assert metric(p, "proctor_decisions_total", action="test.item.delete", decision="deny", kind="policy",
                  enforcement="monitor") >= 1
    assert metric(p, "proctor_decisions_total", action="test.item.delete", decision="deny", kind="policy",
                  enforcement="enforce") == 0
    assert metric(p, "proctor_monitor_mode", scope="global", target="") == 1


def test_global_monitor_through_the_gateway_engine(glob, idp, upstream):
    p, m = glob, mark()
    token = idp.token("gw-bot", groups=["readers"], ttl=600)
    r = httpx.delete(f"{p.gateway_url}/svc/items/{m}", headers={"Authorization": f"Bearer {token}"}, timeout=15)
    assert r.status_code == 200, r.text
    assert r.headers["proctor-monitor"] == "deny; kind=policy; status=403"
    assert [e["method"] for e in hits(upstream, m)] == ["DELETE"]
    # the agent's own credential never reaches the upstream, monitored or not
    assert "authorization" not in upstream.headers_of(hits(upstream, m)[0])
    rec = record(p, r)
    assert rec["mode"] == "reverse" and rec["decision"] == "deny" and rec["monitored"]["forwarded"] is True
    # an allowed request in scope: flagged, nothing would have been refused
    ok = httpx.get(f"{p.gateway_url}/svc/items/{m}", headers={"Authorization": f"Bearer {token}"}, timeout=15)
    assert ok.status_code == 200 and "proctor-monitor" not in ok.headers
    rec = record(p, ok)
    assert (rec["decision"], rec["monitor"]) == ("allow", True) and "monitored" not in rec


def test_a_would_be_hold_is_forwarded_at_once_and_creates_no_approval(glob, idp, upstream):
    p, m = glob, mark()
    token = idp.token("order-bot", groups=["writers"], ttl=600)
    with client(p, "order-bot", token) as c:
        r = c.post(f"http://127.0.0.1:{upstream.port}/tenants/7/orders",
                   json={"order": {"total": 750, "items": [{"sku": "A-1"}], "marker": m}})
    assert r.status_code == 200, r.text  # sync mode would have held it open for a manager
    assert r.headers["proctor-monitor"] == "hold; kind=approval-pending"
    assert len(hits(upstream, m)) == 1
    rec = record(p, r)
    assert (rec["decision"], rec["policy_decision"], rec["reasons"]) == ("hold", "hold",
                                                                         ["mon-big-orders-need-a-manager"])
    assert "approval_id" not in rec
    mon = rec["monitored"]
    assert (mon["decision"], mon["status"], mon["kind"], mon["approval_groups"], mon["approval_mode"]) == (
        "hold", None, "approval-pending", {"managers": 1}, "sync")
    # nothing to approve: no approval was created (so no webhook, no console item), none is pending
    listed = httpx.get(f"{p.control_url}/v1/approvals",
                       headers={"Authorization": f"Bearer {operator(idp, 'managers')}"}, timeout=10)
    assert listed.status_code == 200, listed.text
    assert not [a for a in listed.json()["approvals"] if a.get("decision_id") == rec["decision_id"]]
    assert not [d for d in p.decisions() if d.get("type") == "approval"]
    assert metric(p, "proctor_approvals_pending") == 0
    # a would-be plain deny of the same action (over 1000: no approval could lift it) stays a deny
    with client(p, "order-bot", token) as c:
        big = c.post(f"http://127.0.0.1:{upstream.port}/tenants/7/orders",
                     json={"order": {"total": 5000, "items": [{"sku": "A-1"}], "marker": m + "-big"}})
    assert big.status_code == 200 and big.headers["proctor-monitor"] == "deny; kind=policy; status=403"
    assert set(record(p, big)["reasons"]) == {"mon-big-orders-need-a-manager", "orders-over-1000-forbidden"}


@pytest.fixture(scope="module")
def stranger(tmp_path_factory):
    """An upstream no connector describes."""
    up = _start_upstream(tmp_path_factory.mktemp("mon-stranger"), None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


def test_authentication_the_kill_switch_and_egress_deny_are_still_enforced(glob, idp, upstream, stranger):
    p, m = glob, mark()
    # no credentials: 407, recorded in scope, nothing forwarded
    with httpx.Client(proxy=p.proxy_url, timeout=15) as c:
        r = c.delete(f"http://127.0.0.1:{upstream.port}/items/{m}")
    assert r.status_code == 407 and not hits(upstream, m)
    rec = record(p, r)
    assert rec["monitor"] is True and rec["refusal"]["kind"] == "authentication" and "monitored" not in rec
    # a bad token: 407 too
    with httpx.Client(proxy=p.proxy_url_with("reader-bot", "not-a-jwt"), timeout=15) as c:
        assert c.delete(f"http://127.0.0.1:{upstream.port}/items/{m}").status_code == 407
    assert not hits(upstream, m)
    # the kill switch: a suspended agent is refused, even for what policy allows, even monitored
    agent = "ks-" + m
    token = idp.token(agent, groups=["readers"], ttl=600)
    op = operator(idp)
    s = httpx.post(f"{p.control_url}/v1/suspensions", json={"kind": "agent", "target": agent, "reason": "incident"},
                   headers={"Authorization": f"Bearer {op}"}, timeout=10)
    assert s.status_code == 201, s.text
    try:
        with client(p, agent, token) as c:
            wait_for(lambda: c.get(f"http://127.0.0.1:{upstream.port}/items/{m}-probe").status_code == 403,
                     timeout=10, what="suspension in force")
            for r in (c.delete(f"http://127.0.0.1:{upstream.port}/items/{m}"),
                      c.get(f"http://127.0.0.1:{upstream.port}/items/{m}")):
                assert r.status_code == 403 and r.json()["type"].endswith("/suspended"), r.text
                rec = record(p, r)
                assert rec["monitor"] is True and rec["refusal"]["kind"] == "suspended" and "monitored" not in rec
        assert not hits(upstream, m)
    finally:
        httpx.delete(f"{p.control_url}/v1/suspensions/agent/{agent}", headers={"Authorization": f"Bearer {op}"},
                     timeout=10)
    # a host no connector describes: egress default-deny, monitored or not
    with client(p, "reader-bot", idp.token("reader-bot", groups=["readers"], ttl=600)) as c:
        r = c.get(f"http://127.0.0.1:{stranger.port}/anything/{m}")
    assert r.status_code == 403 and r.json()["reasons"] == ["egress-default-deny"], r.text
    assert not hits(stranger, m)
    assert record(p, r)["monitor"] is True


def test_health_and_banner_say_what_is_monitored(glob):
    health = glob.health()
    assert health["monitor"] == {"enabled": True, "global": True, "connectors": [], "agents": [], "groups": []}
    log = glob.log()
    assert "MONITOR MODE: policies are NOT ENFORCED for EVERY request (monitor.global)" in log
    assert "WARNING" in log.split("MONITOR MODE")[0].splitlines()[-1]


# ---------------------------------------------------------- monitor: by connector, agent, group
def test_per_connector_monitor_forwards_only_that_connector_with_its_credential(scoped, idp, upstream, crm):
    p, m = scoped, mark()
    token = idp.token("reader-bot", groups=["readers"], ttl=600)
    with client(p, "reader-bot", token) as c:
        on_crm = c.delete(f"http://127.0.0.1:{crm.port}/sobjects/{m}", headers={"Authorization": "Bearer agent-own"})
        on_svc = c.delete(f"http://127.0.0.1:{upstream.port}/items/{m}")
    assert on_crm.status_code == 200 and on_crm.headers["proctor-monitor"] == "deny; kind=policy; status=403"
    sent = hits(crm, m)
    assert len(sent) == 1
    # what the agent would get once allowed: the connector's credential, never its own
    assert crm.headers_of(sent[0])["authorization"] == f"Bearer {CRM_SECRET}"
    assert "agent-own" not in json.dumps(sent[0])
    rec = record(p, on_crm)
    assert (rec["connector"], rec["decision"], rec["monitor"], rec["monitored"]["forwarded"]) == (
        "crm", "deny", True, True)
    assert CRM_SECRET not in json.dumps(p.decisions()) and CRM_SECRET not in p.log()
    # the other connector is enforced
    assert on_svc.status_code == 403 and "proctor-monitor" not in on_svc.headers and not hits(upstream, m)
    rec = record(p, on_svc)
    assert (rec["connector"], rec["decision"], rec["monitor"], rec["refusal"]["kind"]) == (
        "testsvc", "deny", False, "policy")
    assert "monitored" not in rec


def test_rate_limits_are_enforced_in_a_monitored_scope(scoped, idp, crm):
    p, m = scoped, mark()
    with client(p, "rl-bot", idp.token("rl-bot", groups=["readers"], ttl=600)) as c:
        answers = [c.delete(f"http://127.0.0.1:{crm.port}/sobjects/{m}-{i}") for i in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["type"].endswith("/rate-limited") and "proctor-monitor" not in answers[2].headers
    assert len(hits(crm, m)) == 2
    rec = record(p, answers[2])
    assert rec["monitor"] is True and rec["refusal"]["kind"] == "rate-limited" and "monitored" not in rec
    assert metric(p, "proctor_decisions_total", action="test.item.delete", decision="deny", kind="rate-limited",
                  enforcement="monitor") == 1


def test_per_agent_and_per_group_monitor(scoped, idp, upstream):
    p, m = scoped, mark()
    url = f"http://127.0.0.1:{upstream.port}/items/{m}"
    cases = [("trial-bot", ["readers"], 200), ("group-bot", ["readers", "trial"], 200), ("other-bot", ["readers"], 403)]
    for agent, groups, want in cases:
        with client(p, agent, idp.token(agent, groups=groups, ttl=600)) as c:
            r = c.delete(url + "-" + agent)
        assert r.status_code == want, (agent, r.text)
        rec = record(p, r)
        assert rec["decision"] == "deny" and rec["monitor"] is (want == 200), (agent, rec)
        assert [e["method"] for e in hits(upstream, m + "-" + agent)] == (["DELETE"] if want == 200 else [])
    assert metric(p, "proctor_monitor_mode", scope="agent", target="trial-bot") == 1
    assert metric(p, "proctor_monitor_mode", scope="group", target="trial") == 1
    assert metric(p, "proctor_monitor_mode", scope="connector", target="crm") == 1
    assert metric(p, "proctor_monitor_mode", scope="global", target="") == 0
    assert p.health()["monitor"] == {"enabled": True, "global": False, "connectors": ["crm"], "agents": ["trial-bot"],
                                     "groups": ["trial"]}
    assert "MONITOR MODE: policies are NOT ENFORCED for connectors crm; agents trial-bot; agent groups trial" in p.log()


def test_without_monitor_nothing_says_monitor(proctor, idp, upstream):
    assert proctor.health()["monitor"] == {"enabled": False, "global": False, "connectors": [], "agents": [],
                                           "groups": []}
    assert "MONITOR MODE" not in proctor.log()
    with client(proctor, "reader-bot", idp.token("reader-bot", groups=["readers"], ttl=600)) as c:
        r = c.delete(f"http://127.0.0.1:{upstream.port}/items/{mark()}")
    assert r.status_code == 403 and "proctor-monitor" not in r.headers
    rec = record(proctor, r)
    assert rec["monitor"] is False and "monitored" not in rec


# ---------------------------------------------------------------------------- startup
def test_unknown_connectors_and_bad_keys_refuse_to_start(tmp_path, idp, pki, upstream, upstream_tls):
    with pytest.raises(RuntimeError) as e:
        start_proctor(tmp_path / "a", idp, pki, upstream, upstream_tls, {"monitor": {"connectors": ["testsvc", "crn"]}})
    assert "monitor.connectors names 'crn', which no connector manifest declares (known: generic-http, testsvc)" \
        in str(e.value)
    with pytest.raises(RuntimeError) as e:
        start_proctor(tmp_path / "b", idp, pki, upstream, upstream_tls, {"monitor": {"globl": True}})
    assert "monitor.globl: Extra inputs are not permitted" in str(e.value)


def test_the_banner_reaches_stderr_whatever_the_log_level(tmp_path, idp, pki, upstream, upstream_tls):
    p = start_proctor(tmp_path / "quiet", idp, pki, upstream, upstream_tls, {"monitor": {"agents": ["trial-bot"]}},
                      log_level="error")
    try:
        assert "proctor: WARNING: MONITOR MODE: policies are NOT ENFORCED for agents trial-bot" in p.log()
    finally:
        p.stop()


# -------------------------------------------------------------- monitor: a claim conflict
CLAIMS_CEDAR = """
@id("mon-claimsvc-anyone")
permit (principal, action == Action::"claimsvc.ticket.update", resource);

@id("claim-held-by-another-agent")
@claim("conflict")
forbid (principal, action, resource)
when { context has claim && context.claim.conflict };
"""


@pytest.fixture(scope="module")
def claims(tmp_path_factory, idp, pki, upstream, upstream_tls, crm):
    d = tmp_path_factory.mktemp("mon-claim-policies") / "policies"
    shutil.copytree(DATA / "policies", d)
    (d / "claims.cedar").write_text(CLAIMS_CEDAR)
    connector = {"name": "claimsvc", "hosts": [f"127.0.0.1:{crm.port}"], "routes": [
        {"method": "PATCH", "path": "/tickets/{id}", "action": "claimsvc.ticket.update",
         "resource": {"type": "Ticket", "id": "{id}"}, "claim": {"mode": "exclusive", "ttl_seconds": 300}}]}
    p = start_proctor(tmp_path_factory.mktemp("mon-claims"), idp, pki, upstream, upstream_tls,
                      {"monitor": {"agents": ["mon-writer"]}}, policies_src=d, extra_connectors=[connector])
    yield p
    p.stop()


def test_a_would_be_claim_conflict_is_forwarded_without_taking_the_claim(claims, idp, crm):
    p, t = claims, "T-" + uuid.uuid4().hex[:10]
    url = f"http://127.0.0.1:{crm.port}/tickets/{t}"

    def patch(agent: str) -> httpx.Response:
        with client(p, agent, idp.token(agent, groups=["writers"], ttl=600)) as c:
            return c.patch(url, json={"note": agent})

    first = patch("holder-bot")
    assert first.status_code == 200 and "proctor-claim" in first.headers, first.text
    monitored = patch("mon-writer")  # another agent's claim: a 409 it would have been, forwarded
    assert monitored.status_code == 200, monitored.text
    assert monitored.headers["proctor-monitor"] == "deny; kind=claim-conflict; status=409"
    assert "proctor-claim" not in monitored.headers  # the write took no claim
    rec = record(p, monitored)
    assert (rec["decision"], rec["monitored"]["kind"], rec["monitored"]["status"]) == ("deny", "claim-conflict", 409)
    assert rec["reasons"] == ["claim-held-by-another-agent"] and "holder-bot" in rec["monitored"]["detail"]
    # the claim stays the holder's; no conflict event was recorded for the monitored write
    op = operator(idp)
    listed = [c for c in httpx.get(f"{p.control_url}/v1/claims", headers={"Authorization": f"Bearer {op}"},
                                   timeout=10).json()["claims"] if c["resource"] == f'Ticket::"{t}"']
    assert [c["holder"] for c in listed] == ["holder-bot"]
    assert not [d for d in p.decisions() if d.get("type") == "claim" and d.get("decision_id") == rec["decision_id"]]
    # an agent outside the scope gets the 409, recorded as a conflict
    enforced = patch("other-bot")
    assert enforced.status_code == 409 and "proctor-monitor" not in enforced.headers
    assert [json.loads(e["body"])["note"] for e in crm.received() if e["path"] == f"/tickets/{t}"] == [
        "holder-bot", "mon-writer"]
