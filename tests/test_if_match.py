"""Optimistic concurrency (If-Match) end to end: real Proctor processes, a real upstream
that implements ETags and conditional writes (tests/support/etag_upstream.py), agents
using ordinary HTTP clients through the forward proxy and the gateway (both engines).

The `etagsvc` connector declares `concurrency: {if_match: true}` on its record and
weak-ETag writes; `/plain/...` has no option. Every test uses its own record ids, so
the module-wide proxies and upstream serve all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import DATA, GATEWAY_ENGINES, SUPPORT, Proctor, free_port, port_open, start_proctor, wait_for

pytestmark = pytest.mark.integration

CEDAR = """
@id("etagsvc-anyone")
permit (principal, action in [Action::"etagsvc.record.read", Action::"etagsvc.record.update",
                              Action::"etagsvc.record.replace", Action::"etagsvc.record.delete",
                              Action::"etagsvc.weak.read", Action::"etagsvc.weak.update",
                              Action::"etagsvc.plain.read", Action::"etagsvc.plain.update"], resource);
"""


def connector(port: int) -> dict:
    def route(method: str, kind: str, action: str, rtype: str, **extra: object) -> dict:
        return {"method": method, "path": f"/{kind}/{{id}}", "action": action,
                "resource": {"type": rtype, "id": "{id}"}, **extra}

    if_match = {"concurrency": {"if_match": True}}
    return {
        "name": "etagsvc",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [
            route("GET", "records", "etagsvc.record.read", "Record"),
            route("PATCH", "records", "etagsvc.record.update", "Record", **if_match),
            route("PUT", "records", "etagsvc.record.replace", "Record", **if_match),
            route("DELETE", "records", "etagsvc.record.delete", "Record"),
            route("GET", "weak", "etagsvc.weak.read", "WeakRecord"),
            route("PATCH", "weak", "etagsvc.weak.update", "WeakRecord", **if_match),
            route("GET", "plain", "etagsvc.plain.read", "PlainRecord"),
            route("PATCH", "plain", "etagsvc.plain.update", "PlainRecord"),
        ],
    }


@dataclass
class EtagUpstream:
    port: int
    log: Path
    proc: subprocess.Popen

    def received(self, method: str | None = None, path: str | None = None) -> list[dict]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in rows if (method is None or r["method"] == method) and (path is None or r["path"] == path)]

    def direct(self, method: str, path: str, **kw: object) -> httpx.Response:
        """Another system changing the record behind Proctor's back."""
        return httpx.request(method, f"http://127.0.0.1:{self.port}{path}", timeout=10, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    d = tmp_path_factory.mktemp("etag-up")
    port = free_port()
    log = d / "received.jsonl"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "etag_upstream.py"), "--port", str(port), "--log", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), what=f"etag upstream on {port}")
    yield EtagUpstream(port, log, proc)
    proc.terminate()
    proc.wait(5)


@pytest.fixture(scope="module")
def policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("etag-policies") / "policies"
    shutil.copytree(DATA / "policies", d)
    (d / "etagsvc.cedar").write_text(CEDAR)
    return d


def start(base: Path, idp, pki, upstream, upstream_tls, svc: EtagUpstream, policies: Path,
          engine: str = "mitmproxy") -> Proctor:
    gateway = {"engine": engine, "routes": [{"prefix": "/etag", "upstream": f"http://127.0.0.1:{svc.port}"}]}
    return start_proctor(base, idp, pki, upstream, upstream_tls, {"gateway": gateway}, policies_src=policies,
                         extra_connectors=[connector(svc.port)])


@pytest.fixture(scope="module")
def ep(tmp_path_factory, idp, pki, upstream, upstream_tls, svc, policies) -> Proctor:
    p = start(tmp_path_factory.mktemp("etag-proctor"), idp, pki, upstream, upstream_tls, svc, policies)
    yield p
    p.stop()


@pytest.fixture(scope="module", params=GATEWAY_ENGINES)
def gw(request, tmp_path_factory, idp, pki, upstream, upstream_tls, svc, policies) -> Proctor:
    """The module's proxy (mitmproxy gateway engine), or one on the aiohttp gateway engine."""
    if request.param == "mitmproxy":
        yield request.getfixturevalue("ep")
        return
    p = start(tmp_path_factory.mktemp("etag-aiohttp"), idp, pki, upstream, upstream_tls, svc, policies,
              engine=request.param)
    yield p
    p.stop()


def rid(prefix: str = "R") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Agent:
    """An agent using plain httpx through the forward proxy (or the gateway)."""

    def __init__(self, p: Proctor, svc: EtagUpstream, idp, name: str, gateway: bool = False) -> None:
        self.p, self.svc, self.name, self.gateway = p, svc, name, gateway
        self.token = idp.token(name, groups=["writers"], ttl=600)

    def __call__(self, method: str, path: str, body: dict | None = None, **headers: str) -> httpx.Response:
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        if self.gateway:
            hdrs["Authorization"] = f"Bearer {self.token}"
            return httpx.request(method, f"{self.p.gateway_url}/etag{path}", json=body, headers=hdrs, timeout=20)
        with httpx.Client(proxy=self.p.proxy_url_with(self.name, self.token), timeout=20) as c:
            return c.request(method, f"http://127.0.0.1:{self.svc.port}{path}", json=body, headers=hdrs)


def assert_resource_changed(resp: httpx.Response, p: Proctor, path: str, etag: str, read: httpx.Response) -> dict:
    assert resp.status_code == 409, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    problem = resp.json()
    for key in ("title", "detail", "decision_id", "action", "resource", "reasons"):
        assert key in problem, key
    record_id = path.rsplit("/", 1)[1]
    assert problem["type"] == "https://proctor.dev/problems/resource-changed"
    assert problem["resource"] == f'Record::"{record_id}"' and problem["action"].startswith("etagsvc.record.")
    assert problem["reasons"] == ["upstream-precondition-failed"]
    assert problem["decision_id"] == resp.headers["x-proctor-decision-id"]
    assert "changed by someone else" in problem["detail"] and "GET it" in problem["detail"]
    read_id = read.headers["x-proctor-decision-id"]
    assert problem["changed"]["if_match"] == etag and problem["changed"]["read_decision_id"] == read_id
    assert problem["changed"]["upstream_status"] == 412
    assert "precondition failed" not in resp.text  # the upstream's own 412 body is not relayed
    rec = p.decision(problem["decision_id"])
    assert (rec["decision"], rec["status"], rec["upstream_status"]) == ("deny", 409, 412)
    assert rec["refusal"]["kind"] == "resource-changed" and rec["policy_decision"] == "allow"
    return problem


# --------------------------------------------------------------------------- tests
def test_stale_write_is_refused_409_and_goes_through_after_a_reread(ep, svc, idp) -> None:
    path = f"/records/{rid()}"
    alice, bob = Agent(ep, svc, idp, "alice"), Agent(ep, svc, idp, "bob")
    read = alice("GET", path)
    assert read.status_code == 200 and read.headers["etag"].endswith('-v1"')
    v1 = read.headers["etag"]

    # bob never read the record: his write goes as he sent it
    changed = bob("PATCH", path, {"owner": "bob"})
    assert changed.status_code == 200, changed.text
    assert svc.received("PATCH", path)[-1]["if_match"] is None

    # alice writes from her stale read: Proctor sends her ETag, the upstream refuses, she gets 409
    stale = alice("PATCH", path, {"owner": "alice"})
    assert_resource_changed(stale, ep, path, v1, read)
    sent = svc.received("PATCH", path)[-1]
    assert (sent["if_match"], sent["status"]) == (v1, 412)

    # a blind retry is refused the same way (the stale ETag stays until she reads again)
    assert alice("PATCH", path, {"owner": "alice"}).status_code == 409
    assert svc.received("PATCH", path)[-1]["if_match"] == v1

    # she reads again and reapplies her change: it goes through with the current ETag
    reread = alice("GET", path)
    assert reread.json()["data"] == {"owner": "bob"}
    ok = alice("PATCH", path, {"owner": "alice"})
    assert ok.status_code == 200, ok.text
    assert svc.received("PATCH", path)[-1]["if_match"] == reread.headers["etag"]
    assert ep.decision(ok.headers["x-proctor-decision-id"])["decision"] == "allow"
    # and her own answer's ETag is what she saw last: the next write carries it
    assert alice("PUT", path, {"owner": "alice", "done": True}).status_code == 200
    assert svc.received("PUT", path)[-1]["if_match"] == ok.headers["etag"]
    assert svc.direct("GET", path).json()["data"] == {"owner": "alice", "done": True}


def test_a_change_behind_proctors_back_is_caught(ep, svc, idp) -> None:
    path = f"/records/{rid()}"
    alice = Agent(ep, svc, idp, "alice")
    read = alice("GET", path)
    assert svc.direct("PATCH", path, json={"by": "someone"}).status_code == 200
    assert_resource_changed(alice("PATCH", path, {"by": "alice"}), ep, path, read.headers["etag"], read)
    assert svc.direct("GET", path).json()["data"] == {"by": "someone"}  # nothing overwritten


def test_the_agents_own_precondition_is_untouched_and_its_412_passes_through(ep, svc, idp) -> None:
    path = f"/records/{rid()}"
    alice, bob = Agent(ep, svc, idp, "alice"), Agent(ep, svc, idp, "bob")
    v1 = alice("GET", path).headers["etag"]
    bob("PATCH", path, {"x": 1})

    own = alice("PATCH", path, {"x": 2}, If_Match=v1)
    assert own.status_code == 412 and own.json() == {"error": "precondition failed", "current": 2}
    assert svc.received("PATCH", path)[-1]["if_match"] == v1
    rec = ep.decision(own.headers["x-proctor-decision-id"])
    assert (rec["decision"], rec["status"], rec["upstream_status"]) == ("allow", 412, 412) and "refusal" not in rec

    weird = alice("PATCH", path, {"x": 3}, If_Match='"something-else"')
    assert weird.status_code == 412 and svc.received("PATCH", path)[-1]["if_match"] == '"something-else"'

    for name, value in (("If_None_Match", "*"), ("If_Unmodified_Since", "Sat, 01 Jan 2000 00:00:00 GMT")):
        r = alice("PATCH", path, {"x": 4}, **{name: value})
        assert r.status_code == 412 and r.json()["error"] == "precondition failed"
        got = svc.received("PATCH", path)[-1]
        assert got["if_match"] is None and (got["if_none_match"] == value or got["if_unmodified_since"] == value)

    star = alice("PATCH", path, {"x": 5}, If_Match="*")  # "any version": the agent's choice
    assert star.status_code == 200 and svc.received("PATCH", path)[-1]["if_match"] == "*"


def test_weak_etags_are_not_used(ep, svc, idp) -> None:
    path = f"/weak/{rid('W')}"
    alice = Agent(ep, svc, idp, "alice")
    read = alice("GET", path)
    assert read.headers["etag"].startswith('W/"')
    svc.direct("PATCH", path, json={"by": "someone"})
    r = alice("PATCH", path, {"by": "alice"})
    assert r.status_code == 200, r.text  # no strong ETag to match: forwarded as sent
    assert svc.received("PATCH", path)[-1]["if_match"] is None


def test_a_route_without_the_option_is_unaffected(ep, svc, idp) -> None:
    path = f"/plain/{rid('P')}"
    alice = Agent(ep, svc, idp, "alice")
    assert alice("GET", path).headers["etag"].startswith('"')
    svc.direct("PATCH", path, json={"by": "someone"})
    r = alice("PATCH", path, {"by": "alice"})
    assert r.status_code == 200 and svc.received("PATCH", path)[-1]["if_match"] is None


def test_a_delete_forgets_and_an_agent_that_never_read_writes_as_sent(ep, svc, idp) -> None:
    path = f"/records/{rid()}"
    alice = Agent(ep, svc, idp, "alice")
    alice("GET", path)
    assert alice("DELETE", path).status_code == 204
    r = alice("PUT", path, {"new": True})  # nothing known about the new record: no If-Match
    assert r.status_code == 200 and svc.received("PUT", path)[-1]["if_match"] is None
    assert Agent(ep, svc, idp, "carol")("PATCH", path, {"c": 1}).status_code == 200
    assert svc.received("PATCH", path)[-1]["if_match"] is None


def test_idempotency_key_retries_keep_their_fingerprint(ep, svc, idp) -> None:
    """The If-Match Proctor adds is not part of what an Idempotency-Key is bound to: after a
    409 the key is free, and the same request (same key) after a re-read is forwarded with
    the new ETag, not refused 422 as 'another request'; once it succeeded it is replayed."""
    path = f"/records/{rid()}"
    alice = Agent(ep, svc, idp, "alice")
    read = alice("GET", path)
    svc.direct("PATCH", path, json={"by": "someone"})
    key = str(uuid.uuid4())
    first = alice("PATCH", path, {"by": "alice"}, Idempotency_Key=key)
    assert_resource_changed(first, ep, path, read.headers["etag"], read)
    reread = alice("GET", path)
    second = alice("PATCH", path, {"by": "alice"}, Idempotency_Key=key)
    assert second.status_code == 200, second.text
    assert svc.received("PATCH", path)[-1]["if_match"] == reread.headers["etag"]
    n = len(svc.received("PATCH", path))
    replay = alice("PATCH", path, {"by": "alice"}, Idempotency_Key=key)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert len(svc.received("PATCH", path)) == n  # not forwarded again


def test_metrics_count_the_outcomes(ep, svc, idp) -> None:
    path = f"/records/{rid()}"
    alice = Agent(ep, svc, idp, "alice")
    alice("GET", path)
    svc.direct("PATCH", path, json={"by": "someone"})
    assert alice("PATCH", path, {}).status_code == 409
    alice("GET", path)
    assert alice("PATCH", path, {}).status_code == 200
    metrics = httpx.get(f"{ep.control_url}/metrics", timeout=5).text
    for outcome in ("changed", "matched"):
        assert f'proctor_if_match_writes_total{{connector="etagsvc",outcome="{outcome}"}}' in metrics, outcome
    assert ('proctor_decisions_total{action="etagsvc.record.update",decision="deny",enforcement="enforce",'
            'kind="resource-changed"}') in metrics


def test_gateway_mode_both_engines(gw, svc, idp) -> None:
    path = f"/records/{rid('GW')}"
    alice = Agent(gw, svc, idp, "alice", gateway=True)
    bob = Agent(gw, svc, idp, "bob", gateway=True)
    read = alice("GET", path)
    assert read.status_code == 200, read.text
    assert bob("PATCH", path, {"by": "bob"}).status_code == 200
    stale = alice("PATCH", path, {"by": "alice"})
    assert_resource_changed(stale, gw, path, read.headers["etag"], read)
    assert svc.received("PATCH", path)[-1] == {"method": "PATCH", "path": path, "if_match": read.headers["etag"],
                                               "if_none_match": None, "if_unmodified_since": None, "status": 412}
    # the agent's own If-Match: the upstream's 412 reaches it as the upstream sent it
    own = alice("PATCH", path, {"by": "alice"}, If_Match=read.headers["etag"])
    assert own.status_code == 412 and own.json()["error"] == "precondition failed"
    assert alice("GET", path).status_code == 200
    assert alice("PATCH", path, {"by": "alice"}).status_code == 200
    assert svc.received("PATCH", path)[-1]["if_match"] == '"' + path.rsplit("/", 1)[1] + '-v2"'
    assert svc.direct("GET", path).json()["data"] == {"by": "alice"}
