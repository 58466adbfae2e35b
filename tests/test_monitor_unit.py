"""Monitor mode, unit level (proxy/policy/monitor.py): the gate in a real chain of fake stages,
the scope, the config section, the record line, the OCSF event, the metrics and the audit
reserve. No processes: tests/test_monitor.py runs real proxies.

The gate is generic: it knows nothing of claims, workflows or approvals, only the settling
stages' `would_settle` callables. So a fake authorize stage leaves a pending deny, fake
settling stages stand in for the real ones (and fail the test if they act on a monitored
request), and a fake enforced stage after them (an audit gate, a budget) may refuse for real.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema
from prometheus_client import generate_latest

from proxy.audit.activity import summarize
from proxy.audit.filesink import must_land
from proxy.audit.ocsf import OCSF_VERSION, read_event, to_ocsf
from proxy.config import ConfigError, MonitorConfig, load_config
from proxy.core.chain import Chain, Stage
from proxy.core.exchange import HOLD_KIND, Exchange, ResponseSummary
from proxy.core.model import AgentIdentity, AgentRequest, Classification, Refusal
from proxy.observability.metrics import Metrics
from proxy.observability.stages import CountMetrics
from proxy.policy.monitor import HEADER, MonitorConfigError, MonitorGate, MonitorScope
from proxy.record.decisions import DecisionRecorder
from proxy.record.model import DecisionRecord, parse_line, record_of
from proxy.record.stage import RecordDecision

DENY = Refusal(403, "Denied by policy", "support-bot may not test.item.delete on Item::\"1\": forbidden by policy "
               "no-item-deletes", reasons=["no-item-deletes"], kind="policy")


def _exchange(agent: str = "support-bot", connector: str = "testsvc", method: str = "DELETE") -> Exchange:
    req = AgentRequest(method, "http", "127.0.0.1", 9101, "/items/1", "", {}, b"", "127.0.0.1", "forward")
    ex = Exchange(req)
    ex.identity = AgentIdentity(agent, "idp", {"sub": agent, "groups": ["readers"]}, None)
    ex.classification = Classification(connector, "test.item.delete", "Item", "1")
    return ex


class Authorize(Stage):
    """Leaves Cedar's deny pending, as proxy/policy/stage.py does (or refuses at once)."""

    name = "authorize"

    def __init__(self, pending: Refusal | None = DENY, refuse: Refusal | None = None) -> None:
        self.pending, self.refusal = pending, refuse

    def on_request(self, ex: Exchange) -> None:
        ex.policy_decision, ex.policy_revision = "deny", "5b0ae0fa0cb4a2a5"
        if self.refusal is not None:
            ex.refuse(self.refusal)
        elif self.pending is not None:
            ex.reasons = list(self.pending.reasons)
            ex.pending_refusal = self.pending


class Settler(Stage):
    """A settling stage (claim conflict, workflow order, hold): `would` is what it would answer.
    Acting on the pending refusal (creating an approval, recording a conflict) is noted."""

    settles_pending = True

    def __init__(self, name: str, would: Refusal | None, acted: list[str]) -> None:
        self.name = name  # type: ignore[misc]
        self.would, self.acted = would, acted

    def would_settle(self, ex: Exchange) -> Refusal | None:
        return self.would if ex.pending_refusal is not None else None

    def on_request(self, ex: Exchange) -> None:
        if ex.pending_refusal is not None and self.would is not None:
            self.acted.append(self.name)
            ex.settle_pending(self.would)


class Enforced(Stage):
    """A stage monitor mode does not cover (the audit gate, a budget reserve): may refuse."""

    name = "enforced"

    def __init__(self, refuse: Refusal | None = None) -> None:
        self.refusal = refuse
        self.ran = 0

    def on_request(self, ex: Exchange) -> None:
        self.ran += 1
        if self.refusal is not None:
            ex.refuse(self.refusal)


def _run(chain: Chain, ex: Exchange, upstream_status: int = 200) -> Exchange:
    async def go() -> None:
        await chain.head(ex)
        if ex.refusal is None:
            await chain.request(ex)
        if ex.forwardable:
            ex.response = ResponseSummary(upstream_status, upstream_status)
        await chain.response(ex)
    asyncio.run(go())
    return ex


def _chain(scope: MonitorScope, *settlers: Settler, authorize: Authorize | None = None,
           after: Stage | None = None, recorder: DecisionRecorder | None = None, groups=None) -> Chain:
    gate = MonitorGate(scope, groups, [s.would_settle for s in settlers])
    stages: list[Stage] = []
    if recorder is not None:
        stages.append(RecordDecision(recorder))
    stages += [authorize or Authorize(), gate, *settlers]
    if after is not None:
        stages.append(after)
    return Chain(stages)


HOLD_SYNC = Refusal(202, "Held for approval", "this request needs approval by managers", reasons=["big"],
                    kind=HOLD_KIND, extra={"approval_groups": {"managers": 1}, "approval_mode": "sync"})
CONFLICT = Refusal(409, "Conflict: the resource is claimed by another agent", "claimed by 'other-bot'",
                   reasons=["claim-held-by-another-agent"], kind="claim-conflict")


# --------------------------------------------------------------------------- the gate
def test_out_of_scope_the_deny_is_enforced_and_the_settlers_act():
    acted: list[str] = []
    hold = Settler("approval", None, acted)
    ex = _run(_chain(MonitorScope(connectors=frozenset({"crm"})), hold), _exchange())
    assert ex.refusal is DENY and not ex.forwardable and ex.monitored is None and not ex.monitor
    assert HEADER not in ex.plan.response_headers


def test_a_monitored_deny_is_kept_and_the_request_goes_on():
    acted: list[str] = []
    after = Enforced()
    ex = _run(_chain(MonitorScope(everything=True), Settler("claim-conflict", None, acted), after=after), _exchange())
    assert ex.refusal is None and ex.forwardable and after.ran == 1 and not acted
    assert ex.monitor and ex.monitored is DENY and ex.reasons == ["no-item-deletes"]
    assert ex.policy_decision == "deny" and ex.plan.response_headers[HEADER] == "deny; kind=policy; status=403"
    rec = DecisionRecord.from_exchange(ex)
    assert (rec.decision, rec.monitor, rec.status, rec.upstream_status, rec.refusal) == ("deny", True, 200, 200, None)
    assert rec.monitored == {"decision": "deny", "status": 403, "kind": "policy", "title": "Denied by policy",
                             "detail": DENY.detail, "reasons": ["no-item-deletes"], "forwarded": True}
    assert rec.reasons == ["no-item-deletes"] and rec.forwarded_monitored and rec.refusal_kind == "policy"


def test_the_first_settler_that_would_answer_decides_and_none_of_them_acts():
    acted: list[str] = []
    settlers = (Settler("claim-conflict", None, acted), Settler("workflow-order", CONFLICT, acted),
                Settler("approval", HOLD_SYNC, acted))
    ex = _run(_chain(MonitorScope(everything=True), *settlers), _exchange())
    assert ex.forwardable and not acted and ex.monitored is CONFLICT
    assert ex.plan.response_headers[HEADER] == "deny; kind=claim-conflict; status=409"
    assert DecisionRecord.from_exchange(ex).monitored["status"] == 409  # type: ignore[index]


def test_a_would_be_hold_creates_nothing_and_a_sync_hold_has_no_status():
    acted: list[str] = []
    ex = _run(_chain(MonitorScope(everything=True), Settler("approval", HOLD_SYNC, acted)), _exchange())
    assert ex.forwardable and not acted and ex.approval_id is None and ex.policy_decision == "hold"
    rec = DecisionRecord.from_exchange(ex)
    assert rec.decision == "hold" and rec.approval_id is None
    assert rec.monitored is not None and rec.monitored["status"] is None
    assert (rec.monitored["approval_groups"], rec.monitored["approval_mode"]) == ({"managers": 1}, "sync")
    assert ex.plan.response_headers[HEADER] == "hold; kind=approval-pending"
    async_hold = Refusal(202, HOLD_SYNC.title, HOLD_SYNC.detail, reasons=["big"], kind=HOLD_KIND,
                         extra={"approval_groups": {"managers": 1}, "approval_mode": "async"})
    ex = _run(_chain(MonitorScope(everything=True), Settler("approval", async_hold, acted)), _exchange())
    assert DecisionRecord.from_exchange(ex).monitored["status"] == 202 and not acted  # type: ignore[index]


def test_what_monitor_mode_does_not_cover_still_refuses():
    # a refusal after the gate (audit gate, budget reserve): the real answer; the would-be stays recorded
    budget = Refusal(429, "Budget exhausted", "no", reasons=["budget:b"], kind="budget-exhausted")
    ex = _run(_chain(MonitorScope(everything=True), after=Enforced(budget)), _exchange())
    assert ex.refusal is budget and not ex.forwardable
    rec = DecisionRecord.from_exchange(ex)
    assert rec.decision == "deny" and rec.status == 429 and rec.refusal is not None
    assert rec.refusal["kind"] == "budget-exhausted" and rec.monitored is not None
    assert rec.monitored["forwarded"] is False and not rec.forwarded_monitored
    # an evaluation error is refused at once (not pending): never monitored
    err = Refusal(403, "Denied: policy evaluation error", "x", reasons=["boom"], kind="policy-error")
    ex = _run(_chain(MonitorScope(everything=True), authorize=Authorize(refuse=err)), _exchange())
    assert ex.refusal is err and ex.monitored is None and ex.monitor  # in scope, flagged, enforced
    # a pending refusal of another kind is not the gate's to settle
    other = Refusal(403, "x", "y", kind="something-else")
    ex = _run(_chain(MonitorScope(everything=True), authorize=Authorize(pending=other)), _exchange())
    assert ex.refusal is other and ex.monitored is None


def test_every_exchange_in_scope_is_flagged_on_the_way_back(tmp_path):
    recorder = DecisionRecorder(tmp_path / "d.jsonl")
    scope = MonitorScope(agents=frozenset({"trial-bot"}))
    # allowed (no pending deny) and in scope: flagged, nothing monitored
    ex = _run(_chain(scope, authorize=Authorize(pending=None), recorder=recorder), _exchange("trial-bot"))
    assert ex.forwardable and ex.monitor and ex.monitored is None
    # out of scope: not flagged
    ex = _run(_chain(scope, authorize=Authorize(pending=None), recorder=recorder), _exchange("other-bot"))
    assert not ex.monitor
    recorder.close()
    lines = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [(x["decision"], x["monitor"]) for x in lines] == [("allow", True), ("allow", False)]
    assert all("monitored" not in x for x in lines)


def test_scope_by_connector_agent_and_group():
    bot = AgentIdentity("a1", "idp", {}, None)
    groups = {"a1": ["trial", "readers"], "a2": ["readers"]}

    def groups_of(identity: AgentIdentity) -> list[str]:
        return groups[identity.agent_id]

    s = MonitorScope(connectors=frozenset({"crm"}))
    assert s.covers("crm", bot, groups_of) and not s.covers("erp", bot, groups_of) and not s.covers(None, None, None)
    s = MonitorScope(agents=frozenset({"a1"}))
    assert s.covers("erp", bot, None) and not s.covers("erp", AgentIdentity("a2", "idp", {}, None), None)
    assert not s.covers("erp", None, None)  # unauthenticated: no agent to match
    s = MonitorScope(groups=frozenset({"trial"}))
    assert s.covers("erp", bot, groups_of) and not s.covers("erp", AgentIdentity("a2", "idp", {}, None), groups_of)
    assert MonitorScope(everything=True).covers(None, None, None)
    assert not MonitorScope().enabled and MonitorScope(groups=frozenset({"g"})).enabled
    # a group-scoped gate asks for the agent's groups
    gate_groups = _run(_chain(MonitorScope(groups=frozenset({"readers"})), groups=lambda i: i.claims["groups"]),
                       _exchange())
    assert gate_groups.forwardable and gate_groups.monitored is DENY


def test_unknown_connectors_are_a_config_error_naming_the_known_ones():
    MonitorScope(connectors=frozenset({"crm"})).check_connectors(["crm", "erp"])
    with pytest.raises(MonitorConfigError) as e:
        MonitorScope(connectors=frozenset({"crn", "erp"})).check_connectors(["crm", "erp"])
    assert str(e.value) == "monitor.connectors names 'crn', which no connector manifest declares (known: crm, erp)"
    assert isinstance(e.value, ValueError)  # `proctor run` says "cannot start: ..."


def test_the_config_section(tmp_path):
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text("monitor:\n  global: true\n  connectors: [crm]\n  agents: [a1]\n  groups: [trial]\n")
    scope = MonitorScope.from_config(load_config(cfg).monitor)
    assert scope == MonitorScope(True, frozenset({"crm"}), frozenset({"a1"}), frozenset({"trial"}))
    assert scope.describe() == {"enabled": True, "global": True, "connectors": ["crm"], "agents": ["a1"],
                                "groups": ["trial"]}
    assert not MonitorScope.from_config(MonitorConfig()).enabled
    for bad, says in (("monitor:\n  globl: true\n", "monitor.globl: Extra inputs are not permitted"),
                      ("monitor:\n  global: maybe\n", "monitor.global"),
                      ("monitor:\n  agents: ['']\n", "monitor.agents.0"),
                      ("monitor:\n  connectors: crm\n", "monitor.connectors")):
        cfg.write_text(bad)
        with pytest.raises(ConfigError) as e:
            load_config(cfg)
        assert says in str(e.value), str(e.value)


def test_the_banner_names_what_is_not_enforced():
    text = MonitorScope(connectors=frozenset({"crm", "erp"}), groups=frozenset({"trial"})).banner()
    assert "MONITOR MODE" in text and "NOT ENFORCED" in text and "connectors crm, erp; agent groups trial" in text
    assert "kill switch" in text and "FORWARDED" in text
    assert "EVERY request" in MonitorScope(everything=True).banner()


# ------------------------------------------------------- the line, the event, the metrics
def _monitored_record() -> DecisionRecord:
    ex = _run(_chain(MonitorScope(everything=True)), _exchange())
    ex.policy_inputs = ({"uid": {"type": "Agent", "id": "support-bot"}, "attrs": {}, "parents": []},
                        {"uid": {"type": "Item", "id": "1"}, "attrs": {}, "parents": []}, {"method": "DELETE"})
    return DecisionRecord.from_exchange(ex)


def test_the_line_round_trips_and_older_lines_read_as_enforced():
    rec = _monitored_record()
    line = rec.line()
    back = parse_line(line)
    assert isinstance(back, DecisionRecord) and back == rec and back.line() == line
    d = json.loads(line)
    keys = list(d)
    assert keys[keys.index("decision") + 1] == "monitor" and keys[keys.index("decision_ms") + 7:][:1] == ["monitored"]
    old = parse_line(b'{"decision_id":"d","time":"2026-01-01T00:00:00.000Z","decision":"allow"}')
    assert isinstance(old, DecisionRecord) and old.monitor is False and old.monitored is None


def test_the_ocsf_event_is_valid_and_flagged():
    validator = jsonschema.Draft202012Validator(
        OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION)).get_class_schema("api_activity"))
    rec = _monitored_record()
    ev = to_ocsf(rec)
    errors = list(validator.iter_errors(ev))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert ev["metadata"]["labels"] == ["monitor"] and ev["status"] == "Success" and "error" not in ev["api"]["response"]
    assert ev["actor"]["authorizations"][0]["decision"] == "deny"
    assert ev["actor"]["authorizations"][0]["policy"]["uid"] == "no-item-deletes"
    assert ev["message"].endswith(": deny (monitor mode: not enforced, forwarded)")
    p = ev["unmapped"]["proctor"]
    assert p["monitor"] is True and p["decision"] == "deny" and p["monitored"] == rec.monitored
    assert must_land(ev)  # it reached the upstream: the disk reserve is for it
    ev["metadata"]["sequence"] = 1
    _, back = read_event(ev)
    assert isinstance(back, DecisionRecord) and back.monitor is True and back.monitored == rec.monitored
    row = summarize(ev)
    assert row["monitor"] is True and row["monitored"]["forwarded"] is True and row["decision"] == "deny"
    # an enforced deny: no label, monitor false, not a reserve event; its row has no monitor key
    enforced = _run(_chain(MonitorScope(agents=frozenset({"x"}))), _exchange())
    ev = to_ocsf(DecisionRecord.from_exchange(enforced))
    assert "labels" not in ev["metadata"] and ev["unmapped"]["proctor"]["monitor"] is False and not must_land(ev)
    assert ev["status"] == "Failure" and "monitor" not in summarize(ev)


def test_metrics_carry_the_enforcement_label(tmp_path):
    metrics = Metrics()
    count = CountMetrics(metrics)
    recorder = DecisionRecorder(tmp_path / "d.jsonl")
    for scope in (MonitorScope(everything=True), MonitorScope()):
        chain = Chain([count, RecordDecision(recorder), Authorize(), MonitorGate(scope)])
        ex = _run(chain, _exchange())
        assert record_of(ex).monitor is scope.enabled
    recorder.close()
    text = generate_latest(metrics.registry).decode()
    assert ('proctor_decisions_total{action="test.item.delete",decision="deny",enforcement="monitor",kind="policy"} 1.0'
            in text)
    assert ('proctor_decisions_total{action="test.item.delete",decision="deny",enforcement="enforce",kind="policy"} 1.0'
            in text)
    assert 'proctor_upstream_responses_total{status_class="2xx"} 1.0' in text  # only the monitored one went up
    assert count.stats == {"requests": 2, "allowed": 1, "refused": 1, "tunnels_refused": 0}
