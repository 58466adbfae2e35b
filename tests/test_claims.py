"""Claims on resources end to end: real Proctor processes, a real recording upstream.

The `claimsvc` connector (below) declares `claim:` on its write routes; the policy
set is tests/data/policies plus CLAIMS_CEDAR, which permits everything on
claimsvc and carries the bundled conflict rule (policies/coordination.cedar)
narrowed so `supervisors` may write through another agent's claim.

Every test uses its own ticket ids, so the module-wide proxy and upstream serve all.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import DATA, GATEWAY_ENGINES, ROOT, Proctor, _start_upstream, start_proctor, wait_for

pytestmark = pytest.mark.integration

PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")
ADMINS = "proctor-admins"
SHORT_TTL = 3

CLAIMS_CEDAR = """
@id("claimsvc-anyone")
permit (principal, action in [Action::"claimsvc.ticket.read", Action::"claimsvc.ticket.update",
                              Action::"claimsvc.short.update", Action::"claimsvc.job.update"], resource);

@id("claim-held-by-another-agent")
@claim("conflict")
forbid (principal, action, resource)
when { context has claim && context.claim.conflict }
unless { principal in AgentGroup::"supervisors" };

// context.claim is visible to ordinary policies: nobody writes "frozen" tickets someone holds
@id("no-writes-through-claims-on-frozen")
forbid (principal, action == Action::"claimsvc.ticket.update", resource)
when { context.claim.held && !context.claim.mine && context.params.id like "FROZEN-*" };
"""


def claim_connector(port: int) -> dict:
    return {
        "name": "claimsvc",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [
            {"method": "GET", "path": "/tickets/{id}", "action": "claimsvc.ticket.read",
             "resource": {"type": "Ticket", "id": "{id}"}, "claim": {"mode": "exclusive", "ttl_seconds": 300}},
            {"method": "PATCH", "path": "/tickets/{id}", "action": "claimsvc.ticket.update",
             "resource": {"type": "Ticket", "id": "{id}"}, "claim": {"mode": "exclusive", "ttl_seconds": 300}},
            {"method": "PATCH", "path": "/short/{id}", "action": "claimsvc.short.update",
             "resource": {"type": "ShortTicket", "id": "{id}"},
             "claim": {"mode": "exclusive", "ttl_seconds": SHORT_TTL}},
            # claims taken only through the API (a dispatcher assigns jobs); writes only check
            {"method": "PATCH", "path": "/jobs/{id}", "action": "claimsvc.job.update",
             "resource": {"type": "Job", "id": "{id}"},
             "claim": {"mode": "exclusive", "ttl_seconds": 120, "acquire": "api"}},
        ],
    }


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    up = _start_upstream(tmp_path_factory.mktemp("claims-up"), None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


@pytest.fixture(scope="module")
def claim_policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("claims-policies") / "policies"
    shutil.copytree(DATA / "policies", d)
    (d / "claims.cedar").write_text(CLAIMS_CEDAR)
    return d


def start(base: Path, idp, pki, upstream, upstream_tls, svc, policies: Path, overrides: dict | None = None,
          env: dict | None = None, engine: str = "mitmproxy") -> Proctor:
    # gateway mode too: /claims/... on the gateway listener reaches the claimsvc upstream
    gateway = {"engine": engine, "routes": [{"prefix": "/claims", "upstream": f"http://127.0.0.1:{svc.port}"}]}
    return start_proctor(base, idp, pki, upstream, upstream_tls, {"gateway": gateway, **(overrides or {})},
                         policies_src=policies, extra_connectors=[claim_connector(svc.port)], env=env)


@pytest.fixture(scope="module")
def cp(tmp_path_factory, idp, pki, upstream, upstream_tls, svc, claim_policies) -> Proctor:
    p = start(tmp_path_factory.mktemp("claims-proctor"), idp, pki, upstream, upstream_tls, svc, claim_policies)
    yield p
    p.stop()


@pytest.fixture(scope="module", params=GATEWAY_ENGINES)
def gw(request, tmp_path_factory, idp, pki, upstream, upstream_tls, svc, claim_policies) -> Proctor:
    """The module's proxy (mitmproxy gateway engine), or one on the aiohttp gateway engine."""
    if request.param == "mitmproxy":
        yield request.getfixturevalue("cp")
        return
    p = start(tmp_path_factory.mktemp("claims-aiohttp"), idp, pki, upstream, upstream_tls, svc, claim_policies,
              engine=request.param)
    yield p
    p.stop()


def tid(prefix: str = "T") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def call(p: Proctor, svc, idp, agent: str, method: str, path: str, *groups: str) -> httpx.Response:
    token = idp.token(agent, groups=list(groups or ["writers"]), ttl=600)
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=20) as c:
        return c.request(method, f"http://127.0.0.1:{svc.port}{path}", json={"note": "x"} if method != "GET" else None)


def forwarded(svc, method: str, path: str) -> int:
    return sum(1 for e in svc.received() if e["method"] == method and e["path"] == path)


def operator(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=[ADMINS], ttl=600)


def control(p: Proctor, method: str, path: str, token: str) -> httpx.Response:
    return httpx.request(method, f"{p.control_url}{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10)


# --------------------------------------------------------------------------- tests
def test_first_write_claims_other_agents_get_409_reads_pass(cp, svc, idp) -> None:
    t = tid()
    path = f"/tickets/{t}"
    first = call(cp, svc, idp, "alice", "PATCH", path)
    assert first.status_code == 200, first.text
    assert first.headers["proctor-claim"].startswith("clm_") and "fence=1" in first.headers["proctor-claim"]

    refused = call(cp, svc, idp, "bob", "PATCH", path)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    body = refused.json()
    assert body["reasons"] == ["claim-held-by-another-agent"]
    claim = body["claim"]
    assert claim["holder"] == "alice" and claim["mode"] == "exclusive"
    assert claim["resource"] == f'Ticket::"{t}"' and claim["connector"] == "claimsvc"
    assert claim["since"].endswith("Z") and claim["until"].endswith("Z") and claim["since"] < claim["until"]
    retry = int(refused.headers["retry-after"])
    assert 290 <= retry <= 300 and claim["retry_after"] == retry
    assert "alice" in body["detail"] and body["decision_id"] == refused.headers["x-proctor-decision-id"]
    assert forwarded(svc, "PATCH", path) == 1

    # the refusal is recorded like any refusal, with the claim in it
    rec = cp.decision(body["decision_id"])
    assert rec["decision"] == "deny" and rec["status"] == 409 and rec["reasons"] == ["claim-held-by-another-agent"]
    assert rec["refusal"]["kind"] == "claim-conflict" and "'alice'" in rec["refusal"]["detail"], rec

    # reads are never blocked; the holder's writes go on (and renew)
    assert call(cp, svc, idp, "bob", "GET", path).status_code == 200
    again = call(cp, svc, idp, "alice", "PATCH", path)
    assert again.status_code == 200 and again.headers["proctor-claim"].split(";")[0] == \
        first.headers["proctor-claim"].split(";")[0]
    assert forwarded(svc, "PATCH", path) == 2


def test_gateway_mode_same_claims_both_engines(gw, svc, idp) -> None:
    t = tid("GW")
    path = f"/tickets/{t}"

    def gateway(agent: str, method: str) -> httpx.Response:
        token = idp.token(agent, groups=["writers"], ttl=600)
        return httpx.request(method, f"{gw.gateway_url}/claims{path}", headers={"Authorization": f"Bearer {token}"},
                             json={"note": "x"} if method != "GET" else None, timeout=20)

    first = gateway("alice", "PATCH")
    assert first.status_code == 200, first.text
    assert "fence=1" in first.headers["proctor-claim"]
    refused = gateway("bob", "PATCH")
    assert refused.status_code == 409 and refused.json()["claim"]["holder"] == "alice", refused.text
    assert int(refused.headers["retry-after"]) > 0
    assert gateway("bob", "GET").status_code == 200
    # the same resource through forward mode: one claim, whichever way the agents come in
    assert call(gw, svc, idp, "carol", "PATCH", path).json()["claim"]["holder"] == "alice"
    assert gateway("alice", "PATCH").status_code == 200
    assert forwarded(svc, "PATCH", path) == 2


def test_n_agents_racing_exactly_one_holder_and_one_forwarded_write(cp, svc, idp) -> None:
    t = tid("RACE")
    path = f"/tickets/{t}"
    agents = [f"racer-{i}" for i in range(10)]
    with ThreadPoolExecutor(len(agents)) as pool:
        results = list(pool.map(lambda a: call(cp, svc, idp, a, "PATCH", path), agents))
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [409] * (len(agents) - 1), [(r.status_code, r.text[:200]) for r in results]
    winner = agents[[r.status_code for r in results].index(200)]
    assert all(r.json()["claim"]["holder"] == winner for r in results if r.status_code == 409)
    assert forwarded(svc, "PATCH", path) == 1
    listed = control(cp, "GET", "/v1/claims?connector=claimsvc", operator(idp)).json()["claims"]
    assert [c["holder"] for c in listed if c["resource"] == f'Ticket::"{t}"'] == [winner]


def test_ttl_expiry_and_renewal(cp, svc, idp) -> None:
    t = tid("S")
    path = f"/short/{t}"
    assert call(cp, svc, idp, "alice", "PATCH", path).status_code == 200
    t0 = time.monotonic()  # after the answer: the first claim expires by t0 + SHORT_TTL
    time.sleep(SHORT_TTL * 0.6)
    assert call(cp, svc, idp, "alice", "PATCH", path).status_code == 200  # renews: expiry moves on
    while time.monotonic() - t0 < SHORT_TTL + 0.3:  # past the first expiry: still held thanks to the renewal
        time.sleep(0.1)
    held = call(cp, svc, idp, "bob", "PATCH", path)
    assert held.status_code == 409, held.text
    assert 1 <= int(held.headers["retry-after"]) <= SHORT_TTL
    time.sleep(int(held.headers["retry-after"]) + 0.3)  # expired: free for anyone
    took = call(cp, svc, idp, "bob", "PATCH", path)
    assert took.status_code == 200, took.text
    assert "fence=2" in took.headers["proctor-claim"]
    assert call(cp, svc, idp, "alice", "PATCH", path).json()["claim"]["holder"] == "bob"


def test_policy_override_and_context_claim(cp, svc, idp) -> None:
    t = tid()
    path = f"/tickets/{t}"
    assert call(cp, svc, idp, "alice", "PATCH", path).status_code == 200
    # a supervisor writes through alice's claim; the claim stays alice's
    sup = call(cp, svc, idp, "sam", "PATCH", path, "supervisors")
    assert sup.status_code == 200, sup.text
    assert "proctor-claim" not in sup.headers
    other = call(cp, svc, idp, "carol", "PATCH", path)
    assert other.status_code == 409 and other.json()["claim"]["holder"] == "alice"
    assert forwarded(svc, "PATCH", path) == 2

    # a deny by another policy on context.claim stays a 403 (not every deny near a claim is a conflict)
    frozen = f"/tickets/{tid('FROZEN')}"
    assert call(cp, svc, idp, "alice", "PATCH", frozen).status_code == 200
    r = call(cp, svc, idp, "sam", "PATCH", frozen, "supervisors")
    assert r.status_code == 403 and r.json()["reasons"] == ["no-writes-through-claims-on-frozen"], r.text


def test_operator_lists_and_releases_a_claim(cp, svc, idp) -> None:
    t = tid()
    path = f"/tickets/{t}"
    assert call(cp, svc, idp, "alice", "PATCH", path).status_code == 200
    op = operator(idp)
    listed = [c for c in control(cp, "GET", "/v1/claims", op).json()["claims"] if c["resource"] == f'Ticket::"{t}"']
    assert len(listed) == 1 and listed[0]["holder"] == "alice" and listed[0]["holder_groups"] == ["writers"]
    # agents are not operators
    assert control(cp, "GET", "/v1/claims", idp.token("alice", groups=["writers"])).status_code == 401
    released = control(cp, "POST", f"/v1/claims/{listed[0]['id']}/release", op)
    assert released.status_code == 200 and released.json()["released"]["holder"] == "alice"
    assert control(cp, "POST", f"/v1/claims/{listed[0]['id']}/release", op).status_code == 404
    took = call(cp, svc, idp, "bob", "PATCH", path)
    assert took.status_code == 200 and "fence=2" in took.headers["proctor-claim"]
    metrics = httpx.get(f"{cp.control_url}/metrics", timeout=5).text
    assert 'proctor_claim_conflicts_total{connector="claimsvc"}' in metrics
    assert 'proctor_claim_acquisitions_total{connector="claimsvc",kind="new"}' in metrics
    wait_for(lambda: 'proctor_claims_held{connector="claimsvc"}' in
             httpx.get(f"{cp.control_url}/metrics", timeout=5).text, timeout=12, what="claims gauge")


def post(p: Proctor, path: str, token: str, body: dict | None = None, **headers: str) -> httpx.Response:
    return httpx.post(f"{p.control_url}{path}", json=body, timeout=10,
                      headers={"Authorization": f"Bearer {token}", **headers})


def test_acquire_api_route_claims_come_from_the_api(cp, svc, idp) -> None:
    """`acquire: api`: writes never take the claim; an agent takes it for itself through
    POST /v1/claims (or an operator for any agent); others' writes then get 409."""
    j = tid("J")
    path = f"/jobs/{j}"
    job = {"type": "Job", "id": j}
    # a write on an unclaimed acquire:api route passes but takes nothing
    first = call(cp, svc, idp, "alice", "PATCH", path)
    assert first.status_code == 200 and "proctor-claim" not in first.headers
    assert call(cp, svc, idp, "bob", "PATCH", path).status_code == 200
    # the agent claims it with its own token (groups from the token), 201 then a renewal 200
    alice = idp.token("alice", groups=["writers"], ttl=600)
    took = post(cp, "/v1/claims", alice, {"connector": "claimsvc", "resource": job})
    assert took.status_code == 201, took.text
    claim = took.json()["claim"]
    assert claim["holder"] == "alice" and claim["holder_groups"] == ["writers"] and claim["mode"] == "exclusive"
    assert claim["resource"] == f'Job::"{j}"' and took.json()["acquired_by"] == "alice"
    again = post(cp, "/v1/claims", alice, {"connector": "claimsvc", "resource": job})
    assert again.status_code == 200 and again.json()["renewed"] and again.json()["claim"]["id"] == claim["id"]
    # now bob's write is refused, alice's passes (and does not need to renew through the route)
    refused = call(cp, svc, idp, "bob", "PATCH", path)
    assert refused.status_code == 409 and refused.json()["claim"]["holder"] == "alice"
    assert call(cp, svc, idp, "alice", "PATCH", path).status_code == 200
    # bob cannot take it through the API either: 409 naming the holder, with Retry-After
    bob = idp.token("bob", groups=["writers"], ttl=600)
    lost = post(cp, "/v1/claims", bob, {"connector": "claimsvc", "resource": job})
    assert lost.status_code == 409 and lost.json()["claim"]["holder"] == "alice" and int(lost.headers["Retry-After"]) > 0
    # ...nor release it (another agent's claim looks absent), but alice can
    assert post(cp, f"/v1/claims/{claim['id']}/release", bob).status_code == 404
    let_go = post(cp, f"/v1/claims/{claim['id']}/release", alice)
    assert let_go.status_code == 200 and let_go.json()["released_by"] == "alice"
    assert call(cp, svc, idp, "bob", "PATCH", path).status_code == 200
    # an operator assigns it to bob; alice is then refused
    op = operator(idp)
    assigned = post(cp, "/v1/claims", op, {"connector": "claimsvc", "resource": job, "holder": "bob",
                                           "groups": ["writers"], "reason": "dispatcher"})
    assert assigned.status_code == 201 and assigned.json()["claim"]["holder"] == "bob"
    assert assigned.json()["acquired_by"] == "olga"
    assert call(cp, svc, idp, "alice", "PATCH", path).status_code == 409
    events = [r for r in cp.decisions() if r.get("type") == "claim" and r["resource"] == f'Job::"{j}"']
    assert [e["event"] for e in events if e["event"] in ("acquired", "released")][:3] == \
        ["acquired", "released", "acquired"]


def test_acquire_api_refuses_bad_input_and_overreach(cp, idp) -> None:
    alice = idp.token("alice", groups=["writers"], ttl=600)
    op = operator(idp)
    job = {"type": "Job", "id": tid("J")}
    # an agent claims for itself only, and not for longer than the route allows
    assert post(cp, "/v1/claims", alice, {"connector": "claimsvc", "resource": job, "holder": "bob"}).status_code == 403
    assert post(cp, "/v1/claims", alice, {"connector": "claimsvc", "resource": job,
                                          "ttl_seconds": 121}).status_code == 400
    # nothing claimable there: unknown connector, or a resource type no route claims
    for body in ({"connector": "nope", "resource": job},
                 {"connector": "claimsvc", "resource": {"type": "Order", "id": "x"}}):
        r = post(cp, "/v1/claims", op, {**body, "holder": "bob"})
        assert r.status_code == 422 and "declares no claim-bearing route" in r.json()["detail"]
    # operators name a holder, never a person's pseudo-holder
    assert post(cp, "/v1/claims", op, {"connector": "claimsvc", "resource": job}).status_code == 400
    for holder in ("group:service-desk", "human:olga"):
        assert post(cp, "/v1/claims", op, {"connector": "claimsvc", "resource": job,
                                           "holder": holder}).status_code == 400
    # malformed input, control characters, a foreign Origin, no token, a bad token
    assert post(cp, "/v1/claims", op, {"connector": "claimsvc", "resource": {"type": "1x", "id": "a"},
                                       "holder": "bob"}).status_code == 400
    assert post(cp, "/v1/claims", op, {"connector": "claimsvc", "resource": {"type": "Job", "id": "a\nb"},
                                       "holder": "bob"}).status_code == 400
    assert post(cp, "/v1/claims", op, {"connector": "claimsvc", "resource": job, "holder": "bob"},
                Origin="http://evil.example").status_code == 403
    assert httpx.post(f"{cp.control_url}/v1/claims", json={}, timeout=10).status_code == 401
    assert post(cp, "/v1/claims", "not-a-token", {"connector": "claimsvc", "resource": job}).status_code == 401
    # approvers who are not operators cannot assign claims
    approver = idp.token("pat", aud="proctor-approvers", approval_groups=["finance"], ttl=600)
    assert post(cp, "/v1/claims", approver, {"connector": "claimsvc", "resource": job,
                                             "holder": "bob"}).status_code == 403


@pytest.mark.skipif(not PG_DSN, reason="PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)")
def test_two_proxies_on_postgres_race_for_one_claim(tmp_path, idp, pki, upstream, upstream_tls, svc,
                                                   claim_policies) -> None:
    import asyncpg

    schema = "proctor_claims_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    env = {"PROCTOR_TEST_CLAIMS_STORE": f"{PG_DSN}{sep}schema={schema}"}
    overrides = {"store": {"url_env": "PROCTOR_TEST_CLAIMS_STORE"}}
    procs = []
    try:
        for i in range(2):
            procs.append(start(tmp_path / f"p{i}", idp, pki, upstream, upstream_tls, svc, claim_policies,
                               overrides, env))
        t = tid("PG")
        path = f"/tickets/{t}"
        agents = [f"pg-racer-{i}" for i in range(10)]
        with ThreadPoolExecutor(len(agents)) as pool:
            results = list(pool.map(lambda ia: call(procs[ia[0] % 2], svc, idp, ia[1], "PATCH", path),
                                    enumerate(agents)))
        codes = sorted(r.status_code for r in results)
        assert codes == [200] + [409] * (len(agents) - 1), [(r.status_code, r.text[:200]) for r in results]
        assert forwarded(svc, "PATCH", path) == 1
        winner = agents[[r.status_code for r in results].index(200)]
        # both replicas see the one holder
        for p in procs:
            listed = control(p, "GET", "/v1/claims?connector=claimsvc", operator(idp)).json()["claims"]
            assert [c["holder"] for c in listed if c["resource"] == f'Ticket::"{t}"'] == [winner]
    finally:
        for p in procs:
            p.stop()

        async def drop() -> None:
            conn = await asyncpg.connect(PG_DSN, timeout=10)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


def test_bundled_policy_is_the_one_tested_here() -> None:
    """The bundled conflict rule and this file's copy differ only by the supervisor exception."""
    bundled = (ROOT / "policies" / "coordination.cedar").read_text()
    assert '@id("claim-held-by-another-agent")\n@claim("conflict")\nforbid (principal, action, resource)\n' \
           "when { context has claim && context.claim.conflict };" in bundled


def test_cli_lists_and_releases(cp, svc, idp) -> None:
    from click.testing import CliRunner

    from proxy.coordination.cli import claims as claims_cli

    t = tid("CLI")
    assert call(cp, svc, idp, "cli-bot", "PATCH", f"/tickets/{t}").status_code == 200
    runner = CliRunner(env={"PROCTOR_TOKEN": None, "PROCTOR_CONTROL_URL": None, "HTTP_PROXY": None, "http_proxy": None})
    admin = ["--as", "olga", "--group", ADMINS, "-c", str(cp.config_path)]
    r = runner.invoke(claims_cli, ["list", "--connector", "claimsvc", *admin], catch_exceptions=False)
    assert r.exit_code == 0 and "cli-bot" in r.output and t in r.output, r.output
    r = runner.invoke(claims_cli, ["list", "--json", *admin], catch_exceptions=False)
    held = [c for c in json.loads(r.output)["claims"] if c["resource"] == f'Ticket::"{t}"']
    assert len(held) == 1
    r = runner.invoke(claims_cli, ["release", held[0]["id"], "--reason", "agent stuck", *admin],
                      catch_exceptions=False)
    assert r.exit_code == 0 and f"released {held[0]['id']}" in r.output and "cli-bot" in r.output, r.output
    wait_for(lambda: any(e.get("type") == "claim" and e["event"] == "released" and e["claim_id"] == held[0]["id"]
                         for e in cp.decisions()), timeout=5, what="the released event")
    ev = next(e for e in cp.decisions() if e.get("type") == "claim" and e["event"] == "released"
              and e["claim_id"] == held[0]["id"])
    assert ev["reason"] == "agent stuck" and ev["by"] == "olga"
    r = runner.invoke(claims_cli, ["release", held[0]["id"], *admin], catch_exceptions=False)
    assert r.exit_code == 1 and "No such claim" in r.output, r.output


def test_cli_takes_a_claim_for_an_agent(cp, svc, idp) -> None:
    from click.testing import CliRunner

    from proxy.coordination.cli import claims as claims_cli

    j = tid("CLIJ")
    runner = CliRunner(env={"PROCTOR_TOKEN": None, "PROCTOR_CONTROL_URL": None, "HTTP_PROXY": None, "http_proxy": None})
    admin = ["--as", "olga", "--group", ADMINS, "-c", str(cp.config_path)]
    take = ["take", "--connector", "claimsvc", "--type", "Job", "--id", j, "--holder-group", "writers", *admin]
    r = runner.invoke(claims_cli, [*take, "--holder", "carol", "--reason", "assigned"], catch_exceptions=False)
    assert r.exit_code == 0 and 'claimed clm_' in r.output and f'Job::"{j}"' in r.output and "carol" in r.output, r.output
    assert call(cp, svc, idp, "dave", "PATCH", f"/jobs/{j}").status_code == 409
    r = runner.invoke(claims_cli, [*take, "--holder", "dave"], catch_exceptions=False)
    assert r.exit_code == 1 and "carol" in r.output, r.output
