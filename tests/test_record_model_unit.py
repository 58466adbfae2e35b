"""The typed record (proxy/record/model.py): the one model the decision line, the OCSF
event, the activity rows, replay and the metrics are derived from.

Fast unit tests, no processes:

- the line format is exact (field names, key order, absent optional fields left out,
  timings rounded to 3 decimals): golden lines for an allowed request with Cedar
  inputs and a trace, a redacted refusal, a connection-level event, an engine
  fail-closed refusal, and each kind of event line;
- a line read back is validated: every golden line round-trips byte for byte, older
  lines without newer fields are read with the defaults, garbage is a RecordError
  that says what is wrong;
- the OCSF event built from the model is valid OCSF 1.3.0 (as tests/test_audit.py
  checks it) and the same as from the line-shaped dict; reading the event back
  (`read_event`) gives the record's fields the activity view shows;
- the recorder redacts the Cedar inputs before the line and the listeners see them;
  the metrics count with the record's own fields; replay reads only decisions.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema
from prometheus_client import generate_latest

from proxy.audit.activity import summarize
from proxy.audit.chain import Chain
from proxy.audit.ocsf import OCSF_VERSION, read_event, to_ocsf
from proxy.audit.trail import Redactor
from proxy.core.exchange import Connection, Exchange, Kind, ResponseSummary
from proxy.core.model import AgentIdentity, AgentRequest, Classification, Refusal
from proxy.observability.metrics import Metrics
from proxy.observability.stages import CountMetrics
from proxy.policy.replay import Unreadable, find_record, read_records
from proxy.record.decisions import DecisionRecorder
from proxy.record.model import (
    ApprovalEvent,
    DecisionRecord,
    PolicyEvent,
    RecordError,
    SuspensionEvent,
    TrailEvent,
    parse_line,
    parse_record,
    record_of,
)
from proxy.record.stage import RecordDecision
from proxy.store import Approval

ALLOWED = (
    '{"decision_id":"01a1fc9d0ef7-35795daf4d2d492b997b","time":"2026-11-21T07:51:38.847Z","agent":"support-bot",'
    '"issuer":"proctor-dev","action":"ticketing.incident.create","resource":"Incident::\\"new\\"",'
    '"connector":"ticketing","risk":"medium","decision":"allow","monitor":false,"reasons":["support-write-incidents"],'
    '"policy_revision":"5b0ae0fa0cb4a2a5","status":200,"upstream_status":200,"latency_ms":2.482,"decision_ms":0.861,'
    '"method":"POST","host":"127.0.0.1","port":9101,"path":"/api/now/table/incident","mode":"forward",'
    '"client_ip":"127.0.0.1","policy_decision":"allow","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736",'
    '"span_id":"00f067aa0ba902b7","cedar":{"principal":{"uid":{"type":"Agent","id":"support-bot"},'
    '"attrs":{"team":"support"},"parents":[{"type":"AgentGroup","id":"support"}]},'
    '"resource":{"uid":{"type":"Incident","id":"new"},"attrs":{},"parents":[]},'
    '"context":{"method":"POST","query":"","arguments":null,"headers":{"password":"hunter2"}},"unrecorded":["body"]}}'
)
DENIED = (
    '{"decision_id":"d-2","time":"2026-11-21T07:51:38.847Z","agent":"support-bot","issuer":"proctor-dev",'
    '"action":"mcp.tools.call","resource":"Tool::\\"search\\"","connector":"mcp","risk":"low","decision":"deny","monitor":false,'
    '"reasons":["no-search"],"policy_revision":"5b0ae0fa0cb4a2a5","status":403,"upstream_status":null,'
    '"latency_ms":2.482,"decision_ms":null,"method":"POST","host":"mcp.example","port":443,"path":"/mcp",'
    '"mode":"reverse","client_ip":"10.0.0.7","refusal":{"kind":"policy","title":"Denied by policy",'
    '"detail":"bad: GET /x?[REDACTED] HTTP/1.1"},"errors":["at http://h/p?[REDACTED]"],'
    '"shadow":{"decision":"allow","reasons":["cand"],"errors":[],"revision":"c0ffee"},'
    '"rpc":{"method":"tools/call","tool":"search"},"approval_id":"apr_x","policy_decision":"deny"}'
)
CONNECTION = (
    '{"decision_id":"d-3","time":"2026-11-21T07:51:38.847Z","agent":null,"issuer":null,"action":null,'
    '"resource":null,"connector":null,"risk":null,"decision":"deny","monitor":false,"reasons":["tls-interception-required"],'
    '"policy_revision":null,"status":403,"upstream_status":null,"latency_ms":null,"decision_ms":null,'
    '"client_ip":"10.0.0.9","host":"erp.example","port":443,"refusal":{"kind":"tls","title":"Not TLS",'
    '"detail":"plain bytes in a tunnel"},"error":"non-TLS traffic in tunnel"}'
)
FAIL_CLOSED = (
    '{"decision_id":"d-4","time":"2026-11-21T07:51:38.847Z","agent":null,"issuer":null,"action":null,'
    '"resource":null,"connector":null,"risk":null,"decision":"deny","monitor":false,"reasons":[],"policy_revision":null,'
    '"status":503,"upstream_status":null,"latency_ms":null,"decision_ms":null,'
    '"refusal":{"kind":"fail-closed","title":"Proctor could not decide","detail":"internal error"},'
    '"errors":["internal error in request"],"error":"internal error in request"}'
)
APPROVAL_REQUESTED = (
    '{"type":"approval","event":"requested","time":"2026-11-21T07:51:38.847Z","approval_id":"apr_1",'
    '"decision_id":"d-1","agent":"procurement-bot","action":"erp.po.create","resource":"PurchaseOrder::\\"new\\"",'
    '"state":"pending","groups":{"managers":1},"policies":["big-orders"],"mode":"sync"}'
)
APPROVAL_APPROVED = (
    '{"type":"approval","event":"approved","time":"2026-11-21T07:51:38.847Z","approval_id":"apr_1",'
    '"decision_id":"d-1","agent":"procurement-bot","action":"erp.po.create","resource":"PurchaseOrder::\\"new\\"",'
    '"state":"approved","groups":{"managers":1},"by":"maria","reason":"within budget"}'
)
SUSPENDED = ('{"type":"suspension","event":"suspended","time":"2026-11-21T07:51:38.847Z","kind":"agent",'
             '"target":"procurement-bot","by":"olga","reason":"runaway ordering"}')
RESUMED = ('{"type":"suspension","event":"resumed","time":"2026-11-21T07:51:38.847Z","kind":"action",'
           '"target":"erp.po.create","by":"olga","reason":null}')
ROLLBACK = ('{"type":"policy","event":"rollback","time":"2026-11-21T07:51:38.847Z","from_revision":"11cee1a1",'
            '"to_revision":"c0655da3","by":"olga","reason":"restore two-person rule","files_changed":["erp.cedar"]}')
WHEN = 1795247498.8476  # 2026-11-21T07:51:38.847Z


@pytest.fixture
def clock(monkeypatch):
    """Every exchange here started at perf_counter 100.0 and is recorded 2.4816 ms later."""
    monkeypatch.setattr(time, "perf_counter", lambda: 100.0024816)


def _request(method="POST", host="127.0.0.1", port=9101, path="/api/now/table/incident", mode="forward",
             client="127.0.0.1") -> AgentRequest:
    return AgentRequest(method, "http", host, port, path, "sysparm_limit=1", {}, b"", client, mode)  # type: ignore[arg-type]


def _exchange(req: AgentRequest | None, decision_id: str, kind: Kind = Kind.REQUEST) -> Exchange:
    return Exchange(req, kind=kind, decision_id=decision_id, started=100.0, timestamp=WHEN)


def allowed_exchange() -> Exchange:
    ex = _exchange(_request(), "01a1fc9d0ef7-35795daf4d2d492b997b")
    ex.identity = AgentIdentity("support-bot", "proctor-dev", {"sub": "support-bot"}, None)
    ex.classification = Classification("ticketing", "ticketing.incident.create", "Incident", "new", risk="medium")
    ex.policy_revision, ex.policy_decision, ex.reasons = "5b0ae0fa0cb4a2a5", "allow", ["support-write-incidents"]
    ex.policy_inputs = (
        {"uid": {"type": "Agent", "id": "support-bot"}, "attrs": {"team": "support"},
         "parents": [{"type": "AgentGroup", "id": "support"}]},
        {"uid": {"type": "Incident", "id": "new"}, "attrs": {}, "parents": []},
        # the body is never recorded; an empty query and an absent argument are kept (they carry nothing)
        {"method": "POST", "query": "", "body": {"short_description": "x"}, "arguments": None,
         "headers": {"password": "hunter2"}},
    )
    ex.trace_ids = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7")
    ex.decided, ex.decision_ms = True, 0.86149
    ex.response = ResponseSummary(200, 200)
    return ex


def denied_exchange() -> Exchange:
    ex = _exchange(_request(host="mcp.example", port=443, path="/mcp", mode="reverse", client="10.0.0.7"), "d-2")
    ex.identity = AgentIdentity("support-bot", "proctor-dev", {}, None)
    ex.classification = Classification("mcp", "mcp.tools.call", "Tool", "search",
                                       rpc={"method": "tools/call", "tool": "search"})
    ex.policy_revision, ex.policy_decision = "5b0ae0fa0cb4a2a5", "deny"
    ex.shadow = {"decision": "allow", "reasons": ["cand"], "errors": [], "revision": "c0ffee"}
    ex.approval_id = "apr_x"
    ex.errors = ["at http://h/p?token=SECRET1"]
    ex.refuse(Refusal(403, "Denied by policy", "bad: GET /x?api_key=SECRET2 HTTP/1.1", reasons=["no-search"]))
    return ex


def connection_exchange() -> Exchange:
    ex = _exchange(None, "d-3", Kind.CONNECTION)
    ex.connection = Connection("10.0.0.9", "erp.example", 443, "non-tls-in-tunnel")
    ex.refuse(Refusal(403, "Not TLS", "plain bytes in a tunnel", reasons=["tls-interception-required"], kind="tls"))
    ex.response = ResponseSummary(403, error="non-TLS traffic in tunnel")
    return ex


def fail_closed_exchange() -> Exchange:
    ex = _exchange(None, "d-4")
    ex.errors = ["internal error in request"]
    ex.refuse(Refusal(503, "Proctor could not decide", "internal error", kind="fail-closed"))
    ex.response = ResponseSummary(503, error="internal error in request")
    return ex


def approval(state: str = "pending") -> Approval:
    return Approval(id="apr_1", state=state, created_at=WHEN - 60, expires_at=WHEN + 600, agent_id="procurement-bot",
                    action="erp.po.create", resource_type="PurchaseOrder", resource_id="new", connector="erp",
                    groups={"managers": 1}, fingerprint="v3:x", idempotency_key=None, mode="sync", decision_id="d-1",
                    request={}, derived={})


def line_of(rec) -> str:
    out = rec.line()
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    return out[:-1].decode()


# ------------------------------------------------------------------------ the line format
@pytest.mark.parametrize("build, golden", [
    (allowed_exchange, ALLOWED), (denied_exchange, DENIED), (connection_exchange, CONNECTION),
    (fail_closed_exchange, FAIL_CLOSED),
])
def test_decision_lines_are_exactly_the_documented_format(clock, build, golden):
    assert line_of(DecisionRecord.from_exchange(build())) == golden


def test_without_policy_inputs_the_line_has_no_cedar(clock):
    rec = DecisionRecord.from_exchange(allowed_exchange(), with_inputs=False)
    assert rec.cedar is None and json.loads(line_of(rec)) == {k: v for k, v in json.loads(ALLOWED).items()
                                                              if k != "cedar"}


def test_secrets_in_free_text_never_reach_the_record(clock):
    text = line_of(DecisionRecord.from_exchange(denied_exchange()))
    assert "SECRET1" not in text and "SECRET2" not in text and "[REDACTED]" in text


def test_event_lines_are_exactly_the_documented_format():
    assert line_of(ApprovalEvent.of(approval(), "requested", WHEN, policies=["big-orders"], mode="sync")) \
        == APPROVAL_REQUESTED
    # extras given as None are left out (a reason-less vote has no reason key)
    assert line_of(ApprovalEvent.of(approval("approved"), "approved", WHEN, by="maria", reason="within budget",
                                    to=None)) == APPROVAL_APPROVED
    assert line_of(SuspensionEvent.of("suspended", "agent", "procurement-bot", "olga", "runaway ordering", WHEN)) \
        == SUSPENDED
    assert line_of(SuspensionEvent.of("resumed", "action", "erp.po.create", "olga", None, WHEN)) == RESUMED
    assert line_of(PolicyEvent.rollback("11cee1a1", "c0655da3", "olga", "restore two-person rule", ["erp.cedar"],
                                        WHEN)) == ROLLBACK


# -------------------------------------------------------------------------- reading back
@pytest.mark.parametrize("golden", [ALLOWED, DENIED, CONNECTION, FAIL_CLOSED, APPROVAL_REQUESTED,
                                    APPROVAL_APPROVED, SUSPENDED, RESUMED, ROLLBACK])
def test_every_line_round_trips_byte_for_byte(golden):
    rec = parse_line(golden.encode() + b"\n")
    assert line_of(rec) == golden
    assert parse_record(json.loads(golden)) == rec  # a dict is read the same way


def test_lines_read_back_are_typed():
    rec = parse_line(ALLOWED)
    assert isinstance(rec, DecisionRecord)
    assert rec.request is not None and rec.request.port == 9101 and rec.connection is None
    assert (rec.method, rec.host, rec.port, rec.path, rec.mode) == ("POST", "127.0.0.1", 9101,
                                                                    "/api/now/table/incident", "forward")
    assert rec.cedar is not None and rec.cedar["unrecorded"] == ["body"]
    conn = parse_line(CONNECTION)
    assert isinstance(conn, DecisionRecord) and conn.request is None and conn.connection is not None
    assert (conn.client_ip, conn.host, conn.port, conn.method) == ("10.0.0.9", "erp.example", 443, None)
    assert conn.refusal_kind == "tls" and rec.refusal_kind == "allowed"
    assert isinstance(parse_line(SUSPENDED), SuspensionEvent) and isinstance(parse_line(ROLLBACK), PolicyEvent)
    gap = parse_record({"type": "audit", "event": "gap", "path": "/a.jsonl", "from": 7, "to": 9, "count": 3,
                        "decisions": {"deny": 3}, "reason": "the disk was full"})
    assert isinstance(gap, TrailEvent) and gap.from_ == 7
    assert gap.to_dict() == {"type": "audit", "event": "gap", "path": "/a.jsonl", "from": 7, "to": 9, "count": 3,
                             "decisions": {"deny": 3}, "reason": "the disk was full"}


def test_older_lines_without_newer_fields_are_read_with_defaults():
    # a line as the first versions wrote it: no issuer, policy_revision, decision_ms, mode, cedar
    old = ('{"decision_id":"01a1fc9d0282-aacaa015371d4e18b290","time":"2026-10-01T08:00:00.000Z","agent":"bot",'
           '"action":"erp.po.read","resource":"PurchaseOrder::\\"1\\"","connector":"erp","risk":"low",'
           '"decision":"allow","reasons":["read-all"],"status":200,"upstream_status":200,"latency_ms":1.5,'
           '"method":"GET","host":"erp","port":443,"path":"/po/1","client_ip":"10.0.0.1","a_field_from_later":1}')
    rec = parse_line(old)
    assert isinstance(rec, DecisionRecord)
    assert rec.issuer is None and rec.policy_revision is None and rec.decision_ms is None and rec.cedar is None
    assert rec.request is not None and rec.request.mode is None and rec.request.client_ip == "10.0.0.1"
    # written again, it has today's shape (absent fields as null, unknown ones dropped)
    again = json.loads(line_of(rec))
    assert again["issuer"] is None and again["decision_ms"] is None and again["mode"] is None
    assert "a_field_from_later" not in again and again["reasons"] == ["read-all"]
    # an approval line from before `mode` and `policies` existed
    assert isinstance(parse_line(APPROVAL_REQUESTED.replace(',"policies":["big-orders"],"mode":"sync"', "")),
                      ApprovalEvent)


@pytest.mark.parametrize("line, says", [
    (b'{"decision_id":"d","time":"t","decision":"allow"', "not JSON"),
    (b"[1, 2]", "a JSON object is expected, not list"),
    (b'"decision"', "a JSON object is expected, not str"),
    (b'{"type":"login","event":"x"}', "unknown record type 'login'"),
    (b"{}", "decision_id: Field required"),
    (b'{"decision_id":"d","time":"t","decision":"maybe"}', "decision: Input should be 'allow', 'deny' or 'hold'"),
    (b'{"decision_id":"d","time":"t","decision":"deny","status":"teapot"}', "status: Input should be a valid integer"),
    (b'{"decision_id":"d","time":"t","decision":"deny","reasons":"p1"}', "reasons: Input should be a valid array"),
    (b'{"decision_id":"d","time":"t","decision":"deny","refusal":{"kind":"policy"}}', "refusal.title: Field required"),
    (b'{"decision_id":"d","time":"t","decision":"allow","method":"GET","port":"https"}', "request.port"),
    (b'{"type":"approval","event":"approved","time":"t"}', "approval_id: Field required"),
    (b'{"type":"suspension","event":"paused","time":"t","kind":"agent","target":"a","by":"o","reason":null}',
     "event: Input should be 'suspended' or 'resumed'"),
])
def test_garbage_is_rejected_clearly(line, says):
    with pytest.raises(RecordError) as e:
        parse_line(line)
    assert says in str(e.value), str(e.value)


# -------------------------------------------------------------------------------- OCSF
@pytest.fixture(scope="module")
def ocsf_validator():
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION)).get_class_schema("api_activity")
    return jsonschema.Draft202012Validator(schema)


def _without_uid(ev: dict) -> dict:
    ev = json.loads(json.dumps(ev))
    ev["metadata"].pop("uid")
    return ev


@pytest.mark.parametrize("golden", [ALLOWED, DENIED, CONNECTION, FAIL_CLOSED, APPROVAL_REQUESTED,
                                    APPROVAL_APPROVED, SUSPENDED, RESUMED, ROLLBACK])
def test_ocsf_events_from_the_model_are_valid_ocsf(ocsf_validator, golden):
    rec = parse_line(golden)
    ev = to_ocsf(rec)
    Chain().link(ev)
    errors = list(ocsf_validator.iter_errors(ev))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    # the same event as from the line-shaped dict (validated into the model first)
    assert _without_uid(to_ocsf(rec)) == _without_uid(to_ocsf(json.loads(golden)))


def test_ocsf_decision_event_carries_the_records_fields(clock):
    rec = DecisionRecord.from_exchange(denied_exchange())
    ev = to_ocsf(rec)
    assert ev["metadata"]["correlation_uid"] == "d-2" and ev["api"]["operation"] == "mcp.tools.call"
    assert ev["api"]["response"] == {"code": 403, "error": "policy", "error_message": "Denied by policy"}
    assert ev["actor"]["user"]["uid"] == "support-bot" and ev["severity"] == "Medium"
    assert ev["http_request"] == {"http_method": "POST", "url": {"hostname": "mcp.example", "path": "/mcp", "port": 443}}
    p = ev["unmapped"]["proctor"]
    assert p["decision"] == "deny" and p["shadow"]["decision"] == "allow" and p["rpc"]["tool"] == "search"
    assert p["mode"] == "reverse" and "context" not in p  # refused before policy inputs were recorded
    state = to_ocsf(parse_line(SUSPENDED))
    assert state["unmapped"]["proctor"] == {"record": "suspension", **{k: v for k, v in json.loads(SUSPENDED).items()
                                                                        if k != "time"}}


def test_ocsf_rejects_what_is_not_a_record():
    with pytest.raises(RecordError):
        to_ocsf({"decision": "allow"})  # no decision_id, no time


@pytest.mark.parametrize("golden", [ALLOWED, DENIED, CONNECTION, FAIL_CLOSED, APPROVAL_APPROVED, SUSPENDED, ROLLBACK])
def test_an_event_reads_back_into_its_record(golden):
    rec = parse_line(golden)
    ev = to_ocsf(rec)
    ev["metadata"]["sequence"] = 42
    env, back = read_event(ev)
    assert env.sequence == 42 and env.time == rec.time and env.record == rec.record_type
    assert type(back) is type(rec)
    if isinstance(rec, DecisionRecord):
        assert isinstance(back, DecisionRecord)
        for name in ("decision_id", "agent", "issuer", "action", "resource", "connector", "risk", "decision", "reasons",
                     "policy_revision", "policy_decision", "status", "upstream_status", "latency_ms", "decision_ms",
                     "request", "connection", "refusal", "errors", "shadow", "rpc", "approval_id", "trace_id",
                     "span_id", "error"):
            assert getattr(back, name) == getattr(rec, name), name
        assert back.cedar is None  # the inputs are in the audit event's context only, and not read back
    else:
        assert back == rec


def test_activity_rows_come_from_the_typed_record(clock):
    ev = to_ocsf(DecisionRecord.from_exchange(denied_exchange()))
    ev["metadata"]["sequence"] = 7
    row = summarize(ev)
    assert row == {
        "sequence": 7, "time": "2026-11-21T07:51:38.847Z", "record": "decision", "operation": "mcp.tools.call",
        "severity": "Medium", "message": "support-bot mcp.tools.call Tool::\"search\": deny",
        "agent": "support-bot", "action": "mcp.tools.call", "resource": 'Tool::"search"', "connector": "mcp",
        "decision": "deny", "status": 403, "refusal": "policy",
        "detail": "Denied by policy: bad: GET /x?[REDACTED] HTTP/1.1", "reasons": ["no-search"],
        "policy_decision": "deny", "policy_revision": "5b0ae0fa0cb4a2a5", "approval_id": "apr_x", "decision_id": "d-2",
        "method": "POST", "host": "mcp.example", "path": "/mcp", "mode": "reverse", "risk": "low", "latency_ms": 2.482,
        "shadow": {"decision": "allow", "reasons": ["cand"], "errors": [], "revision": "c0ffee"},
    }
    # an unclassified request shows the OCSF operation as its action
    unclassified = to_ocsf(DecisionRecord.from_exchange(fail_closed_exchange()))
    assert summarize(unclassified)["action"] == "http.request"
    sus = summarize(to_ocsf(parse_line(SUSPENDED)))
    assert (sus["record"], sus["decision"], sus["agent"], sus["resource"], sus["by"]) == \
        ("suspension", "suspended", "procurement-bot", "agent:procurement-bot", "olga")
    apr = summarize(to_ocsf(parse_line(APPROVAL_APPROVED)))
    assert (apr["decision"], apr["approval_id"], apr["decision_id"], apr["by"]) == ("approved", "apr_1", "d-1", "maria")
    pol = summarize(to_ocsf(parse_line(ROLLBACK)))
    assert (pol["resource"], pol["from_revision"], pol["to_revision"]) == ("c0655da3", "11cee1a1", "c0655da3")
    # a damaged or partial event still gives the row it can
    assert summarize({"time": 5, "metadata": {"sequence": 3}, "api": {"request": "x"}}) == {
        "sequence": 3, "time": "1970-01-01T00:00:00.005Z", "record": "decision", "reasons": []}


# ------------------------------------------------------------ recorder, stage, metrics
def test_recorder_redacts_the_inputs_before_the_line_and_the_listeners(tmp_path, clock):
    recorder = DecisionRecorder(tmp_path / "decisions.jsonl")
    recorder.redact = Redactor(["password"], [])
    seen = []
    recorder.listeners.append(seen.append)
    recorder.write(DecisionRecord.from_exchange(allowed_exchange()))
    recorder.write(SuspensionEvent.of("suspended", "agent", "procurement-bot", "olga", "runaway ordering", WHEN))
    recorder.write(json.loads(ROLLBACK))  # a line-shaped dict is validated into its record
    with pytest.raises(RecordError):
        recorder.write({"type": "policy", "event": "rollback"})
    recorder.close()
    lines = (tmp_path / "decisions.jsonl").read_text().splitlines()
    assert lines == [ALLOWED.replace('"hunter2"', '"[redacted]"'), SUSPENDED, ROLLBACK]
    assert [type(r) for r in seen] == [DecisionRecord, SuspensionEvent, PolicyEvent] and recorder.written == 3
    assert seen[0].cedar["context"]["headers"] == {"password": "[redacted]"}
    assert "hunter2" not in json.dumps(to_ocsf(seen[0]))


def test_metrics_label_what_the_record_says(tmp_path, clock):
    recorder = DecisionRecorder(tmp_path / "decisions.jsonl")
    metrics = Metrics()
    record, count = RecordDecision(recorder), CountMetrics(metrics)
    for ex in (allowed_exchange(), denied_exchange(), connection_exchange()):
        record.on_response(ex)
        count.on_response(ex)
        if ex.kind is not Kind.CONNECTION:
            assert record_of(ex) is ex.stage_data["record"]  # the record the line was written from
    recorder.close()
    text = generate_latest(metrics.registry).decode()
    assert ('proctor_decisions_total{action="ticketing.incident.create",decision="allow",enforcement="enforce",'
            'kind="allowed"} 1.0') in text
    assert 'proctor_decisions_total{action="mcp.tools.call",decision="deny",enforcement="enforce",kind="policy"} 1.0' \
        in text
    assert 'proctor_shadow_disagreements_total{action="mcp.tools.call",active="deny",shadow="allow"} 1.0' in text
    assert 'proctor_upstream_responses_total{status_class="2xx"} 1.0' in text
    assert 'proctor_connections_refused_total{reason="non-tls-in-tunnel"} 1.0' in text
    assert count.stats == {"requests": 2, "allowed": 1, "refused": 1, "tunnels_refused": 1}
    # without the record stage in the chain, metrics build the record themselves
    ex = fail_closed_exchange()
    assert "record" not in ex.stage_data and record_of(ex).refusal_kind == "fail-closed"


# --------------------------------------------------------------------------------- replay
def test_replay_reads_decisions_only_and_counts_what_is_not_a_record(tmp_path: Path):
    path = tmp_path / "decisions.jsonl"
    path.write_text("\n".join([ALLOWED, SUSPENDED, DENIED, '{"decision_id":"x","time":"t","decision":"perhaps"}',
                               APPROVAL_APPROVED, CONNECTION]) + '\n{"decision_id":"torn","ti')
    unreadable = Unreadable()
    recs = list(read_records(path, unreadable=unreadable))
    assert [r.decision_id for r in recs] == ["01a1fc9d0ef7-35795daf4d2d492b997b", "d-2", "d-3"]
    assert unreadable.count == 2 and unreadable.first is not None and unreadable.first.startswith("line 4: decision:")
    found = find_record(path, "d-2")
    assert found is not None and found.rpc == {"method": "tools/call", "tool": "search"}
    assert find_record(path, "nope") is None
    since = datetime(2026, 11, 21, 8, tzinfo=timezone.utc).timestamp()
    assert list(read_records(path, since=since)) == []
    assert len(list(read_records(path, until=since))) == 3
