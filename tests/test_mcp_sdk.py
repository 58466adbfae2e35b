"""The official MCP Python SDK through Proctor, with the example MCP connector.

A real `proctor run` with examples/mcp/helpdesk-mcp.yaml (its host swapped for the
test server's) and examples/mcp/helpdesk-mcp.cedar beside the bundled schema, in
front of the example FastMCP server (examples/mcp/server.py, the SDK's own
Streamable HTTP server, recording what reaches it: tests/support/mcp_upstream.py),
over http:// and https://. The agent is the SDK's client (`streamable_http_client` +
`ClientSession`, tests/support/mcp_client.py) run as its own process, configured by
the environment docs/agents.md gives and nothing else.

Every message the client sends is governed and recorded: initialize, the
notifications, tools/list, each tools/call, resources and prompts discovery, ping,
the GET of the endpoint (the server's event stream) and the DELETE that ends the
session. Denied tools come back as JSON-RPC errors carrying the policy and the
decision id, and never reach the server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from conftest import ROOT, SUPPORT, free_port, port_open, start_proctor, wait_for
from test_client_matrix import agent_env

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "mcp"
AGENT = "helpdesk-bot"

# (test only) agents in quiet-agents may not send the roots notification
QUIET_POLICY = """@id("test-quiet-agents-send-no-roots-notifications")
forbid (
  principal in AgentGroup::"quiet-agents",
  action == Action::"mcp.session.notify",
  resource
)
when { context.rpc.method == "notifications/roots/list_changed" };

// (test only) agents in mute-agents may not answer the server's requests (elicitation...)
@id("test-mute-agents-answer-nothing")
forbid (
  principal in AgentGroup::"mute-agents",
  action == Action::"mcp.session.respond",
  resource
);

// (test only) a progress notification from held-agents waits for a helpdesk lead
@id("test-held-agents-progress-needs-a-lead")
@approval("helpdesk-leads")
forbid (
  principal in AgentGroup::"held-agents",
  action == Action::"mcp.session.notify",
  resource
)
when { context.rpc.method == "notifications/progress" }
unless { context has approval && context.approval.groups.contains("helpdesk-leads") };
"""


class McpServer:
    def __init__(self, base: Path, pki=None) -> None:
        self.port = free_port()
        self.log = base / f"mcp-seen-{self.port}.jsonl"
        self.log.write_text("")
        cmd = [sys.executable, str(SUPPORT / "mcp_upstream.py"), "--port", str(self.port), "--log", str(self.log)]
        if pki is not None:
            cmd += ["--cert", str(pki.cert_pem), "--key", str(pki.key_pem)]
        self.tls = pki is not None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(base / f"mcp-{self.port}.err", "w"))
        wait_for(lambda: port_open(self.port), what=f"MCP server on {self.port}")

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/mcp" if self.tls else f"http://127.0.0.1:{self.port}/mcp"

    def seen(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, pki):
    base = tmp_path_factory.mktemp("mcp-servers")
    started = {"http": McpServer(base), "https": McpServer(base, pki)}
    yield started
    for s in started.values():
        s.stop()


def example_connector(servers: dict[str, McpServer]) -> dict:
    manifest = yaml.safe_load((EXAMPLE / "helpdesk-mcp.yaml").read_text())
    assert "127.0.0.1:9110" in manifest["hosts"]
    manifest["hosts"] = [f"127.0.0.1:{servers['http'].port}", f"localhost:{servers['https'].port}"]
    return manifest


@pytest.fixture(scope="module")
def mcp_proctor(tmp_path_factory, idp, pki, upstream, upstream_tls, servers):
    base = tmp_path_factory.mktemp("mcp-proctor")
    policies = base / "policies-src"
    policies.mkdir()
    shutil.copy(ROOT / "policies" / "schema.cedarschema", policies / "schema.cedarschema")
    shutil.copy(EXAMPLE / "helpdesk-mcp.cedar", policies / "helpdesk-mcp.cedar")
    (policies / "quiet.cedar").write_text(QUIET_POLICY)
    p = start_proctor(base / "p", idp, pki, upstream, upstream_tls, policies_src=policies,
                      extra_connectors=[example_connector(servers)],
                      overrides={"approvals": {"mode": "async"}})  # a hold answers at once
    yield p
    p.stop()


def run_agent(proctor, idp, url: str, agent: str = AGENT, groups: tuple[str, ...] = ("helpdesk-agents",)):
    env = agent_env(proctor.proxy_url_with(agent, idp.token(agent, groups=list(groups))), proctor.ca_pem)
    return subprocess.run([sys.executable, str(SUPPORT / "mcp_client.py"), url], env=env,
                          capture_output=True, text=True, timeout=120)


def records_for(proctor, agent: str, since: int) -> list[dict]:
    return [r for r in proctor.decisions()[since:] if r.get("agent") == agent and "type" not in r]


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_the_official_client_through_the_example_connector(scheme, servers, mcp_proctor, idp):
    server = servers[scheme]
    server.log.write_text("")
    before = len(mcp_proctor.decisions())
    out = run_agent(mcp_proctor, idp, server.url)
    assert out.returncode == 0, out.stderr[-4000:]
    t = json.loads(out.stdout.strip().splitlines()[-1])

    # initialize and discovery
    assert t["server"] == "helpdesk" and t["session_id"]
    assert t["tools"] == ["close_ticket", "create_ticket", "delete_ticket", "search_tickets"]
    assert t["resources"] == ["helpdesk://queues"]
    assert t["resource_templates"] == ["helpdesk://tickets/{ticket_id}"]
    assert t["queues"] == ["hardware, network, access"]
    assert t["prompts"] == ["triage"] and "Triage ticket T-2" in t["prompt"][0]
    assert t["pinged"] and t["closed"]

    # allowed tools: the server's real answers
    search = t["search"]["result"]
    assert not search["is_error"] and "Printer on floor 3 is jammed" in search["text"][0]
    create = t["create"]["result"]
    assert not create["is_error"] and create["structured"]["title"] == "Monitor flickers"
    # a tool that asks the user first: the server's elicitation reached the client, and the
    # client's answer (a JSON-RPC response, `rpc.response` in the connector) reached the server
    assert t["asked"] == ["Close ticket T-2?"]
    assert t["close"]["result"]["text"] == ["closed T-2"]

    # denied tools: JSON-RPC errors with Proctor's reason and decision id
    for key, reason in (("delete", "mcp-helpdesk-no-deletes"), ("create_p1", "mcp-helpdesk-no-p1-from-agents")):
        err = t[key]["error"]
        assert err["code"] == -32001, err
        assert reason in err["message"]
        data = err["data"]
        assert data["reasons"] == [reason] and data["status"] == 403 and data["agent"] == AGENT
        tool = "delete_ticket" if key == "delete" else "create_ticket"
        assert data["resource"] == f'McpTool::"{tool}"'
        rec = mcp_proctor.decision(data["decision_id"])
        assert rec["decision"] == "deny" and rec["rpc"] == {"method": "tools/call", "tool": tool}

    # what reached the server: everything allowed, nothing denied, no agent credential
    wait_for(lambda: any(e["method"] == "DELETE" for e in server.seen()), timeout=10, what="the session's DELETE")
    seen = server.seen()
    calls = [e["tool"] for e in seen if e.get("rpc") == "tools/call"]
    assert calls == ["search_tickets", "create_ticket", "close_ticket"]
    assert any(e["method"] == "POST" and e.get("rpc") is None and e.get("id") is not None for e in seen)  # the answer
    assert {e.get("rpc") for e in seen if e["method"] == "POST"} >= {
        "initialize", "notifications/initialized", "tools/list", "tools/call", "resources/list",
        "resources/templates/list", "resources/read", "prompts/list", "prompts/get", "ping",
        "notifications/roots/list_changed"}
    stream = [e for e in seen if e["method"] == "GET"]
    assert stream and stream[0]["session"] == t["session_id"] and "text/event-stream" in stream[0]["accept"]
    [end] = [e for e in seen if e["method"] == "DELETE"]
    assert end["session"] == t["session_id"]
    assert all(e["authorization"] is None and e["proxy_authorization"] is None for e in seen)

    # and every one of them was decided and recorded for the agent
    wait_for(lambda: any(r["action"] == "mcp.session.end" for r in records_for(mcp_proctor, AGENT, before)),
             timeout=10, what="the DELETE in the record")
    recs = records_for(mcp_proctor, AGENT, before)
    allowed = {r["action"] for r in recs if r["decision"] == "allow"}
    assert allowed == {
        "mcp.session.initialize", "mcp.session.notify", "mcp.session.stream", "mcp.session.ping", "mcp.session.end",
        "mcp.session.respond", "mcp.tools.list", "mcp.resources.list", "mcp.resources.read", "mcp.prompts.list",
        "mcp.prompts.get", "helpdesk.tickets.search", "helpdesk.tickets.create", "helpdesk.tickets.close"}
    assert sorted(r["action"] for r in recs if r["decision"] == "deny") == ["helpdesk.tickets.create",
                                                                           "helpdesk.tickets.delete"]
    notified = sorted(r["rpc"]["method"] for r in recs if r["action"] == "mcp.session.notify")
    assert notified == ["notifications/initialized", "notifications/roots/list_changed"]


def test_an_agent_outside_the_group_cannot_even_initialize(servers, mcp_proctor, idp):
    server = servers["https"]
    server.log.write_text("")
    out = run_agent(mcp_proctor, idp, server.url, agent="stranger-bot", groups=("sales",))
    assert out.returncode != 0
    # the SDK raises McpError with Proctor's refusal as the message
    assert ("McpError: Denied by policy: stranger-bot may not mcp.session.initialize on McpServer::\"helpdesk\""
            in out.stderr), out.stderr[-3000:]
    assert server.seen() == []


def run_refused(proctor, idp, url: str, scenario: str, agent: str, groups: tuple[str, ...]) -> dict:
    env = agent_env(proctor.proxy_url_with(agent, idp.token(agent, groups=list(groups))), proctor.ca_pem)
    out = subprocess.run([sys.executable, str(SUPPORT / "mcp_refused_client.py"), url, scenario], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def post_raw(proctor, idp, server: McpServer, doc: dict, agent: str, groups: tuple[str, ...]):
    """One JSON-RPC message POSTed through Proctor as any HTTP client would (no MCP session:
    Proctor decides before the server is asked)."""
    return requests.post(server.url, json=doc, timeout=15,
                         headers={"Accept": "application/json, text/event-stream"},
                         proxies={"http": proctor.proxy_url_with(agent, idp.token(agent, groups=list(groups)))})


def assert_refused_without_id(proctor, r, status: int, code: int, reason: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"jsonrpc", "id", "error"} and body["jsonrpc"] == "2.0" and body["id"] is None
    err = body["error"]
    assert err["code"] == code and (reason in err["message"] or code == -32002)  # a hold names its approvers
    assert err["data"]["reasons"] == [reason] and err["data"]["decision_id"] == r.headers["x-proctor-decision-id"]
    return err


def test_a_refused_notification_or_answer_is_an_http_error_with_a_jsonrpc_error_without_id(servers, mcp_proctor, idp):
    """MCP Streamable HTTP: a POSTed notification or response the server accepts is answered
    202 with no body; one it cannot accept, an HTTP error status whose body may be a JSON-RPC
    error with no id. Proctor's refusal is that: 403, the reason and the decision id."""
    server = servers["http"]
    server.log.write_text("")
    quiet = ("quiet-bot", ("helpdesk-agents", "quiet-agents"))
    r = post_raw(mcp_proctor, idp, server, {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}, *quiet)
    err = assert_refused_without_id(mcp_proctor, r, 403, -32001, "test-quiet-agents-send-no-roots-notifications")
    assert mcp_proctor.decision(err["data"]["decision_id"])["rpc"] == {"method": "notifications/roots/list_changed"}

    mute = ("mute-bot", ("helpdesk-agents", "mute-agents"))
    answer = {"jsonrpc": "2.0", "id": 0, "result": {"action": "accept", "content": {"confirm": True}}}
    r = post_raw(mcp_proctor, idp, server, answer, *mute)
    err = assert_refused_without_id(mcp_proctor, r, 403, -32001, "test-mute-agents-answer-nothing")
    rec = mcp_proctor.decision(err["data"]["decision_id"])
    assert rec["action"] == "mcp.session.respond" and rec["rpc"] == {"method": "rpc.response"}
    assert server.seen() == []

    # allowed, they reach the server (which answers them itself: no session here, so 400)
    r = post_raw(mcp_proctor, idp, server, {"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}, *mute)
    assert r.status_code == 400 and "x-proctor-decision-id" in r.headers
    assert [e["rpc"] for e in server.seen()] == ["notifications/roots/list_changed"]


def test_a_held_notification_is_not_answered_202(servers, mcp_proctor, idp):
    """A hold is no acceptance (202 would tell the client the server took it): 429 with
    Retry-After and the approval, the JSON-RPC error without id."""
    server = servers["http"]
    server.log.write_text("")
    held = ("held-bot", ("helpdesk-agents", "held-agents"))
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 1}}
    r = post_raw(mcp_proctor, idp, server, progress, *held)
    err = assert_refused_without_id(mcp_proctor, r, 429, -32002, "test-held-agents-progress-needs-a-lead")
    assert int(r.headers["retry-after"]) > 0
    assert err["data"]["approval_id"] and err["data"]["approval_groups"] == {"helpdesk-leads": 1}
    assert mcp_proctor.decision(err["data"]["decision_id"])["decision"] == "hold"
    assert server.seen() == []


def test_a_denied_notification_from_the_official_client(servers, mcp_proctor, idp):
    """What the SDK (1.x) does with the 403: its transport cannot hand the error of a
    notification to a caller, logs it (the 403) and ends, so the session's next call fails at
    once (ClosedResourceError) instead of waiting; the server never saw the notification and
    the refusal is in the record with its policy."""
    server = servers["http"]
    server.log.write_text("")
    before = len(mcp_proctor.decisions())
    t = run_refused(mcp_proctor, idp, server.url, "notification", "quiet-bot", ("helpdesk-agents", "quiet-agents"))
    assert t["initialize"]["ok"] and t["notify"]["ok"]  # send_notification returns once queued
    after = t["after"]
    assert not after["ok"] and not after.get("timeout") and after["seconds"] < 5, after
    assert any("ClosedResourceError" in e for e in after["errors"]), after
    logged = [rec for rec in t["log"] if rec["exception"] and "403 Forbidden" in rec["exception"]]
    assert logged and logged[0]["logger"] == "mcp.client.streamable_http", t["log"]
    assert t["exited"]["ok"], t["exited"]

    seen = {e.get("rpc") for e in server.seen()}
    assert "notifications/initialized" in seen and "notifications/roots/list_changed" not in seen
    assert "tools/call" not in seen
    [denied] = [r for r in records_for(mcp_proctor, "quiet-bot", before) if r["decision"] == "deny"]
    assert denied["action"] == "mcp.session.notify" and denied["rpc"] == {"method": "notifications/roots/list_changed"}
    assert denied["reasons"] == ["test-quiet-agents-send-no-roots-notifications"] and denied["status"] == 403


def test_a_denied_answer_to_an_elicitation_fails_the_tool_call_instead_of_hanging(servers, mcp_proctor, idp):
    """The server asks the user (elicitation) inside close_ticket; the client's answer is denied.
    Answered HTTP 200 the SDK took it as delivered and the tool call waited for the server, which
    waited for the answer. Answered 403, the SDK's transport ends and the waiting call fails at
    once with McpError "Connection closed"; the answer never reached the server."""
    server = servers["http"]
    server.log.write_text("")
    before = len(mcp_proctor.decisions())
    t = run_refused(mcp_proctor, idp, server.url, "answer", "mute-bot", ("helpdesk-agents", "mute-agents"))
    assert t["asked"] == ["Close ticket T-2?"]
    close = t["close"]
    assert not close["ok"] and not close.get("timeout") and close["seconds"] < 5, close
    assert close["mcp_error"]["message"] == "Connection closed", close
    assert not t["after"]["ok"] and not t["after"].get("timeout")
    assert any(rec["exception"] and "403 Forbidden" in rec["exception"] for rec in t["log"]), t["log"]

    seen = server.seen()
    assert [e["tool"] for e in seen if e.get("rpc") == "tools/call"] == ["close_ticket"]
    assert not [e for e in seen if e["method"] == "POST" and e.get("rpc") is None]  # no answer got through
    [denied] = [r for r in records_for(mcp_proctor, "mute-bot", before) if r["decision"] == "deny"]
    assert denied["action"] == "mcp.session.respond" and denied["rpc"] == {"method": "rpc.response"}
    assert denied["reasons"] == ["test-mute-agents-answer-nothing"]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_body_on_the_stream_or_the_end_never_reaches_the_server(servers, mcp_proctor, idp, method):
    """GET and DELETE of the endpoint are plain routes (mcp.session.stream / .end): a JSON-RPC
    body on them is no call any operation judged, so it is refused (400 body-not-allowed) and
    the server never sees it; without a body they pass (the session test above)."""
    server = servers["http"]
    server.log.write_text("")
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "delete_ticket", "arguments": {"ticket_id": "T-1"}}}
    r = requests.request(method, server.url, json=call, timeout=15,
                         headers={"Accept": "application/json, text/event-stream"},
                         proxies={"http": mcp_proctor.proxy_url_with(AGENT, idp.token(AGENT, groups=["helpdesk-agents"]))})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["reasons"] == ["body-not-allowed"]
    assert mcp_proctor.decision(r.headers["x-proctor-decision-id"])["action"] == (
        "mcp.session.stream" if method == "GET" else "mcp.session.end")
    assert server.seen() == []


# (test only) in sync mode: answers from waiting-agents wait for a helpdesk lead
WAIT_POLICY = """@id("test-waiting-agents-answers-need-a-lead")
@approval("helpdesk-leads")
forbid (
  principal in AgentGroup::"waiting-agents",
  action == Action::"mcp.session.respond",
  resource
)
unless { context has approval && context.approval.groups.contains("helpdesk-leads") };
"""


@pytest.fixture(scope="module")
def mcp_sync_proctor(tmp_path_factory, idp, pki, upstream, upstream_tls, servers):
    base = tmp_path_factory.mktemp("mcp-sync-proctor")
    policies = base / "policies-src"
    policies.mkdir()
    shutil.copy(ROOT / "policies" / "schema.cedarschema", policies / "schema.cedarschema")
    shutil.copy(EXAMPLE / "helpdesk-mcp.cedar", policies / "helpdesk-mcp.cedar")
    (policies / "wait.cedar").write_text(WAIT_POLICY)
    p = start_proctor(base / "p", idp, pki, upstream, upstream_tls, policies_src=policies,
                      extra_connectors=[example_connector(servers)],
                      overrides={"approvals": {"mode": "sync", "sync_wait_seconds": 30}})
    yield p
    p.stop()


def test_in_sync_mode_a_held_answer_is_answered_at_once(servers, mcp_sync_proctor, idp):
    """A held call waits on its open POST in sync mode; an answer to the server's elicitation
    awaits no answer itself, and held open it kept the tool call that asked waiting for the
    whole sync wait (30 s here, beyond the client's 20 s step deadline). It is answered 429 at
    once, its approval pending; the SDK's transport ends and the tool call fails fast."""
    server = servers["http"]
    server.log.write_text("")
    before = len(mcp_sync_proctor.decisions())
    t = run_refused(mcp_sync_proctor, idp, server.url, "answer", "waiting-bot", ("helpdesk-agents", "waiting-agents"))
    assert t["asked"] == ["Close ticket T-2?"]
    close = t["close"]
    assert not close["ok"] and not close.get("timeout") and close["seconds"] < 5, close
    assert any(rec["exception"] and "429" in rec["exception"] for rec in t["log"]), t["log"]
    assert not [e for e in server.seen() if e["method"] == "POST" and e.get("rpc") is None]  # the answer: held
    [held] = [r for r in records_for(mcp_sync_proctor, "waiting-bot", before) if r["decision"] == "hold"]
    assert held["action"] == "mcp.session.respond" and held["status"] == 429
    lead = idp.token("lead", aud="proctor-approvers", approval_groups=["helpdesk-leads"], ttl=600)
    r = requests.get(f"{mcp_sync_proctor.control_url}/v1/approvals/{held['approval_id']}",
                     headers={"Authorization": f"Bearer {lead}"}, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "pending" and r.json()["mode"] == "async", r.text
