"""`proctor policy suggest` over real traffic.

A real proxy with a permissive policy set (the test policies plus `permit(principal,
action, resource)`: the forbids still refuse) records requests of several agents and
groups; `proctor policy suggest` then runs as a subprocess on its config. The
suggestion must validate with `proctor policy validate`, carry unique @ids, bound the
values to what was seen, honour the filters, and `proctor policy replay` over the same
traffic (the policy set's forbids plus the suggestion) must change nothing. A second
proxy then enforces the suggestion: what was seen still goes through, an action never
seen, a larger amount and another group are refused. Monitor mode: traffic no permit
covered, forwarded and recorded as would-be denials, is learned from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cedarpy
import pytest
import requests

from conftest import DATA, Proctor, start_proctor

pytestmark = pytest.mark.integration

ORDER_TOTALS = (12.5, 300.0, 950.25, 40.0)
PRIORITIES = (2, 3, 2)


def proctor_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def suggest(p: Proctor, *args: str) -> subprocess.CompletedProcess[str]:
    return proctor_cli("policy", "suggest", "-c", str(p.config_path), *args, cwd=p.dir)


def policies_of(text: str) -> dict[str, dict[str, Any]]:
    doc = json.loads(cedarpy.policies_to_json_str(text))
    return {pol["annotations"]["id"]: pol for pol in doc["staticPolicies"].values()}


def policy_text(text: str, pid: str) -> str:
    start = text.index(f'@id("{pid}")')
    return text[start:text.index(";\n", start) + 1]


def forbids_only(policy_dir: Path) -> str:
    """The forbid policies of a directory (annotations kept), as Cedar text."""
    forbids: dict[str, Any] = {}
    for f in sorted(policy_dir.glob("*.cedar")):
        doc = json.loads(cedarpy.policies_to_json_str(f.read_text()))
        for pol in doc["staticPolicies"].values():
            if pol["effect"] == "forbid":
                forbids[pol["annotations"]["id"]] = pol
    return cedarpy.policies_from_json_str(json.dumps({"staticPolicies": forbids, "templates": {}, "templateLinks": []}))


def candidate_dir(base: Path, p: Proctor, suggestion: str) -> Path:
    """The policy set the suggestion is meant to become: the forbids plus the suggested permits."""
    d = base / "candidate"
    d.mkdir()
    shutil.copy(p.policies_dir / "schema.cedarschema", d)
    (d / "forbids.cedar").write_text(forbids_only(p.policies_dir))
    (d / "suggested.cedar").write_text(suggestion)
    return d


class Agents:
    def __init__(self, p: Proctor, idp: Any, upstream: Any) -> None:
        self.p, self.base = p, f"http://127.0.0.1:{upstream.port}"
        self.tokens = {
            "writer-bot": idp.token("writer-bot", groups=["writers"]),
            "writer-2": idp.token("writer-2", groups=["writers"]),
            "reader-bot": idp.token("reader-bot", groups=["readers"]),
            "loner": idp.token("loner"),
            "newbie": idp.token("newbie", groups=["newcomers"]),
        }

    def proxies(self, agent: str) -> dict[str, str]:
        return {"http": self.p.proxy_url_with(agent, self.tokens[agent])}

    def order(self, agent: str, total: float, tenant: int = 7) -> int:
        return requests.post(f"{self.base}/tenants/{tenant}/orders?dry_run=false",
                             json={"order": {"total": total, "items": [{"sku": "A"}]}},
                             proxies=self.proxies(agent), timeout=10).status_code

    def read(self, agent: str, item: str) -> int:
        return requests.get(f"{self.base}/items/{item}", proxies=self.proxies(agent), timeout=10).status_code

    def delete(self, agent: str, item: str) -> int:
        return requests.delete(f"{self.base}/items/{item}", proxies=self.proxies(agent), timeout=10).status_code

    def secret(self, agent: str) -> int:
        return requests.get(f"{self.base}/secret/1", proxies=self.proxies(agent), timeout=10).status_code

    def rpc(self, agent: str, body: dict[str, Any]) -> int:
        """The HTTP status; a JSON-RPC error answer (how a refusal comes back on an MCP route) as 403."""
        r = requests.post(f"{self.base}/mcp", json=body, proxies=self.proxies(agent), timeout=10)
        if r.status_code == 200 and "error" in r.json():
            assert r.json()["error"]["data"]["decision_id"]
            return 403
        return r.status_code

    def ticket(self, agent: str, priority: int) -> int:
        return self.rpc(agent, {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                "params": {"name": "create_ticket", "arguments": {"priority": priority}}})

    def tools(self, agent: str) -> int:
        return self.rpc(agent, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, idp, pki, upstream, upstream_tls):
    """A permissive proxy and the traffic it recorded."""
    base = tmp_path_factory.mktemp("suggest")
    src = base / "src"
    shutil.copytree(DATA / "policies", src)
    (src / "permissive.cedar").write_text('@id("allow-everything")\npermit (principal, action, resource);\n')
    p = start_proctor(base / "permissive", idp, pki, upstream, upstream_tls, policies_src=src)
    a = Agents(p, idp, upstream)
    try:
        assert [a.order("writer-bot", t) for t in ORDER_TOTALS] == [200] * 4
        assert a.order("writer-2", 100.0) == 200
        assert a.order("writer-bot", 5000.0) == 403  # refused by orders-over-1000-forbidden: never learned
        assert [a.read("writer-2", str(i)) for i in range(3)] == [200] * 3
        assert [a.read("reader-bot", str(i)) for i in range(4)] == [200] * 4
        assert [a.ticket("writer-bot", pr) for pr in PRIORITIES] == [200] * 3
        assert a.ticket("writer-bot", 1) == 403  # mcp-no-p1-from-agents
        assert a.tools("loner") == 200
        assert a.delete("writer-bot", "9") == 403  # no-item-deletes
        yield p, a, base
    finally:
        p.stop()


@pytest.fixture(scope="module")
def suggestion(recorded) -> str:
    p, _, _ = recorded
    r = suggest(p)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_suggestion_validates_with_unique_ids(recorded, suggestion, tmp_path) -> None:
    p, _, _ = recorded
    policies = policies_of(suggestion)
    assert set(policies) == {
        "suggested-writers-test.order.create",
        "suggested-writers-test.item.read",
        "suggested-readers-test.item.read",
        "suggested-writers-test.mcp.create_ticket",
        "suggested-agent:loner-test.mcp.list",
    }
    assert all(pol["effect"] == "permit" for pol in policies.values())
    assert suggestion.count("@id(") == len(policies)  # unique: none shadowed
    d = tmp_path / "only-suggested"
    d.mkdir()
    shutil.copy(p.policies_dir / "schema.cedarschema", d)
    (d / "suggested.cedar").write_text(suggestion)
    r = proctor_cli("policy", "validate", "-c", str(p.config_path), "--dir", str(d))
    assert r.returncode == 0, r.stderr  # schema-valid and canonically formatted
    assert r.stdout.startswith(f"ok: {len(policies)} policies")
    # the header says what applies on top, and every permit what it covers
    assert "forbid policies and approval holds (@approval)" in suggestion
    assert "monitor -> suggest -> review -> shadow -> enforce" in suggestion
    block = suggestion[:suggestion.index('@id("suggested-writers-test.order.create")')]
    assert "// 5 requests, " in block and "// group writers: agents writer-2, writer-bot" in block
    assert "// verdicts: allow 5" in block


def test_bounds_are_the_values_seen(suggestion) -> None:
    order = policy_text(suggestion, "suggested-writers-test.order.create")
    assert 'context.fields.total.lessThanOrEqual(decimal("950.25"))' in order  # the largest allowed, not 5000
    assert 'context.fields.total.greaterThanOrEqual(decimal("0.0"))' in order
    assert "context.query_params.dry_run == false" in order
    assert "tenant" not in order  # a path parameter: an identifier, never bounded
    assert "resource.total" not in order  # a copy of the body's total: bounded in the context already
    ticket = policy_text(suggestion, "suggested-writers-test.mcp.create_ticket")
    assert "context.fields.priority <= 3" in ticket and "context.fields.priority >= 0" in ticket
    assert "resource is McpTool" in ticket
    read = policy_text(suggestion, "suggested-readers-test.item.read")
    assert "kind" not in read and "when" not in read  # a static attribute of the route: nothing to bound
    assert '"0"' not in suggestion and '"3"' not in suggestion  # resource ids are never listed


def test_replaying_the_suggestion_changes_nothing(recorded, suggestion, tmp_path) -> None:
    p, _, _ = recorded
    d = candidate_dir(tmp_path, p, suggestion)
    r = proctor_cli("policy", "replay", "-c", str(p.config_path), "--candidate", str(d), "--json", "--fail-on-change")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    recorded_with_inputs = [x for x in p.decisions() if "type" not in x and x.get("cedar")]
    assert report["replayed"] == len(recorded_with_inputs) == 19
    assert report["changed"] == 0 and report["unchanged"] == 19
    # and suggest's own proof says the same
    r = suggest(p, "--check", "--json")
    assert r.returncode == 0, r.stderr
    proof = json.loads(r.stdout)["proof"]
    assert proof["ok"] and proof["unchanged"]
    assert proof["learned"] == proof["covered"] == 16 and proof["others_unchanged"] == 3
    assert "16 of 16 learned requests allowed by the suggested permits alone" in r.stderr


def test_filters(recorded) -> None:
    p, _, _ = recorded
    r = suggest(p, "--agent", "reader-bot", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [x["id"] for x in doc["policies"]] == ["suggested-readers-test.item.read"]
    assert doc["policies"][0]["agents"] == ["reader-bot"] and doc["policies"][0]["requests"] == 4
    assert doc["filtered_out"] == 15
    r = suggest(p, "--connector", "testsvc", "--since", "1h")
    assert r.returncode == 0 and len(policies_of(r.stdout)) == 5
    for args in (["--connector", "nope"], ["--since", "2999-01-01T00:00:00Z"]):
        r = suggest(p, *args)
        assert r.returncode == 2 and "nothing to learn from" in r.stderr and r.stdout == ""
    r = suggest(p, "--group-by", "agent", "--no-bounds", "--min-count", "2")
    assert r.returncode == 0, r.stderr
    got = policies_of(r.stdout)
    assert set(got) == {"suggested-agent:writer-bot-test.order.create", "suggested-agent:writer-2-test.item.read",
                        "suggested-agent:reader-bot-test.item.read", "suggested-agent:writer-bot-test.mcp.create_ticket"}
    assert "when" not in r.stdout and "Left out (seen fewer than 2 times)" in r.stdout


def test_a_proxy_enforcing_the_suggestion(recorded, suggestion, tmp_path, idp, pki, upstream, upstream_tls) -> None:
    p, _, _ = recorded
    out = tmp_path / "suggested.cedar"
    r = suggest(p, "-o", str(out))
    assert r.returncode == 0 and r.stdout == "" and out.read_text() == suggestion
    src = candidate_dir(tmp_path, p, out.read_text())
    enforced = start_proctor(tmp_path / "enforcing", idp, pki, upstream, upstream_tls, policies_src=src)
    try:
        a = Agents(enforced, idp, upstream)
        # everything seen goes through
        assert [a.order("writer-bot", t) for t in ORDER_TOTALS] == [200] * 4
        assert a.order("writer-2", 950.25) == 200  # the group's permit
        assert a.read("writer-2", "77") == 200 and a.read("reader-bot", "78") == 200  # any item: no ids learned
        assert a.ticket("writer-bot", 3) == 200 and a.tools("loner") == 200
        # nothing else does
        assert a.order("writer-bot", 950.26) == 403  # above the largest seen
        assert a.order("reader-bot", 10.0) == 403  # a group never seen doing it
        assert a.secret("writer-bot") == 403  # an action never seen
        assert a.ticket("writer-bot", 4) == 403 and a.tools("writer-bot") == 403
        assert a.delete("writer-bot", "1") == 403  # the forbid is still there
        denied = [d for d in enforced.decisions() if d.get("action") == "test.secret.read"]
        assert denied and denied[-1]["decision"] == "deny" and denied[-1]["reasons"] == []  # default deny
    finally:
        enforced.stop()


def test_monitor_mode_traffic_is_learned(tmp_path, idp, pki, upstream, upstream_tls) -> None:
    from proxy.config import ProctorConfig

    if "monitor" not in ProctorConfig.model_fields:
        pytest.skip("monitor mode (issue 16 item 5) is not in this tree")
    p = start_proctor(tmp_path / "monitored", idp, pki, upstream, upstream_tls, {"monitor": {"global": True}})
    try:
        a = Agents(p, idp, upstream)
        # newcomers have no permit to create orders: monitored, forwarded, recorded as would-be denials
        assert [a.order("newbie", t) for t in (10.0, 20.0)] == [200, 200]
        assert a.delete("newbie", "1") == 200  # a would-be deny by a forbid
        recs = [d for d in p.decisions() if d.get("agent") == "newbie"]
        assert [d["decision"] for d in recs] == ["deny"] * 3 and all(d["monitor"] for d in recs)
        r = suggest(p, "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        by_id = {x["id"]: x for x in doc["policies"]}
        assert set(by_id) == {"suggested-newcomers-test.order.create", "suggested-newcomers-test.item.delete"}
        assert by_id["suggested-newcomers-test.order.create"]["verdicts"] == {"monitored:deny": 2}
        text = doc["cedar"]
        assert 'context.fields.total.lessThanOrEqual(decimal("20.0"))' in text
        assert "monitored requests refused by forbid policies, which still apply: no-item-deletes (1)" in text
        # the orders were denied by default (no permit): the permit that would allow them is flagged
        # for review, never silently suggested; the delete stays denied by its forbid (not flagged)
        assert by_id["suggested-newcomers-test.order.create"]["review"] is True
        assert by_id["suggested-newcomers-test.order.create"]["monitored_denied_without_permit"] == 2
        assert by_id["suggested-newcomers-test.item.delete"]["review"] is False
        assert "REVIEW: 2 of these requests were DENIED by the active policies" in text
        assert "REVIEW suggested-newcomers-test.order.create: allows 2 monitored request(s)" in r.stderr
        proof = doc["proof"]
        assert proof["ok"] and proof["covered"] == 3
        # enforced with the suggestion: the orders go through, the delete stays denied by its forbid
        assert proof["monitored_outcome"] == {"allow": 2, "deny": 1}
    finally:
        p.stop()
