"""What budgets show operators (proxy/limits/budget_report.py, docs/limits.md "Budget metrics
and events"): the `BudgetObserver` calls of the budget stages as

- Prometheus series on a real registry, read back from the exposition text (declared budgets
  at 0 from the start; counts; the booked cost; the gauges of the key nearest its limit,
  one series per budget, never a key's value; a window that ended reads fresh);
- `budget` event lines through a real DecisionRecorder into decisions.jsonl, and their OCSF
  events through a real audit trail into audit.jsonl (valid OCSF 1.3.0, `proctor.budget.*`,
  service `proctor.limits`, correlated with the call; read back by the activity view);
- webhooks: which hooks get `budget.soft_threshold` / `budget.exhausted` (events and groups),
  generic and Slack payloads, and a delivery to a real loopback webhook server.

And a real proxy: a rate-limit throttle's OCSF event can be told apart from a policy deny.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import httpx
import jsonschema
import pytest
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from conftest import wait_for
from proxy.approvals.notify import Notifier, WebhookConfig
from proxy.audit.activity import summarize
from proxy.audit.chain import Chain
from proxy.audit.ocsf import OCSF_VERSION, read_event, to_ocsf
from proxy.audit.trail import AuditTrail, FileSink, Redactor
from proxy.limits.budget_events import CHECK_OUTCOMES, SETTLE_RESULTS, BudgetEvent
from proxy.limits.budget_report import BudgetReport
from proxy.record.decisions import DecisionRecorder
from proxy.record.model import BudgetEventRecord, parse_line
from test_notify import HookServer, fast, until

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
MONTH_END = 1_769_904_000.0  # 2026-02-01T00:00:00Z


@dataclass(frozen=True)
class Declared:
    name: str
    limit: Decimal
    currency: str


class Clock:
    def __init__(self, now: float = T0 + 3600) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def series(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of the exposition text, by `name{labels sorted}`."""
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = ",".join(sorted(m.group(2).split(","))) if m.group(2) else ""
            out[f"{m.group(1)}{{{labels}}}"] = float(m.group(3))
    return out


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    got = series(registry)
    assert f"{name}{{{want}}}" in got, f"{name}{{{want}}} not exported"
    return got[f"{name}{{{want}}}"]


def budget_event(kind: str = "exhausted", outcome: str = "exhausted", **kw) -> BudgetEvent:
    base = dict(
        kind=kind, budget="po-spend-monthly", key={"group": "finance", "field:cost_center": "sha256:0a1b2c3d4e5f"},
        window_id="2026-01", window_start=T0, window_end=MONTH_END, limit=Decimal("50000.00"),
        spent=Decimal("48250.50"), reserved=Decimal("1200"), currency="EUR",
        threshold=Decimal("0.8") if kind == "soft_threshold" else None, agent="procurement-bot",
        decision_id="01JG0000DECISION", action="erp.purchase_order.create", connector="erp", outcome=outcome,
    )
    base.update(kw)
    return BudgetEvent(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- Prometheus
def test_declared_budgets_are_exported_at_zero_from_the_start() -> None:
    r = CollectorRegistry()
    BudgetReport(r, [Declared("po-spend-monthly", Decimal("50000"), "EUR"), "llm-daily"])
    for name in ("po-spend-monthly", "llm-daily"):
        for outcome in CHECK_OUTCOMES:
            assert sample(r, "proctor_budget_checks_total", budget=name, outcome=outcome) == 0
        for result in SETTLE_RESULTS:
            assert sample(r, "proctor_budget_settled_total", budget=name, result=result) == 0
        for kind in ("soft_threshold", "exhausted"):
            assert sample(r, "proctor_budget_events_total", budget=name, kind=kind) == 0
        assert sample(r, "proctor_budget_spent", budget=name) == 0
        assert sample(r, "proctor_budget_reserved", budget=name) == 0
        assert sample(r, "proctor_budget_remaining_ratio", budget=name) == 1  # nothing known to be used
        assert sample(r, "proctor_budget_window_end_seconds", budget=name) == 0
    # the limit and the cost's currency are known for a declared object, not for a bare name
    assert sample(r, "proctor_budget_limit", budget="po-spend-monthly") == 50000
    assert sample(r, "proctor_budget_limit", budget="llm-daily") == 0
    assert sample(r, "proctor_budget_cost_total", budget="po-spend-monthly", currency="EUR") == 0
    assert not any(k.startswith("proctor_budget_cost_total") and "llm-daily" in k for k in series(r))


def test_checks_settlements_and_the_booked_cost_are_counted() -> None:
    r = CollectorRegistry()
    rep = BudgetReport(r, ["llm-daily"])
    for outcome in ("reserved", "reserved", "exhausted", "shadow_exhausted", "unavailable"):
        rep.checked("llm-daily", outcome)
    rep.settled("llm-daily", "settled", Decimal("0.000125"), "USD")
    rep.settled("llm-daily", "settled", Decimal("1.5"), "USD")
    rep.settled("llm-daily", "late", Decimal("0.25"), "USD")
    rep.settled("llm-daily", "released", Decimal("2"), "USD")  # released: nothing is booked, whatever the amount
    rep.settled("llm-daily", "settled", Decimal("0"), "USD")
    assert sample(r, "proctor_budget_checks_total", budget="llm-daily", outcome="reserved") == 2
    assert sample(r, "proctor_budget_checks_total", budget="llm-daily", outcome="exhausted") == 1
    assert sample(r, "proctor_budget_checks_total", budget="llm-daily", outcome="held") == 0
    assert sample(r, "proctor_budget_settled_total", budget="llm-daily", result="settled") == 3
    assert sample(r, "proctor_budget_settled_total", budget="llm-daily", result="late") == 1
    assert sample(r, "proctor_budget_settled_total", budget="llm-daily", result="released") == 1
    assert sample(r, "proctor_budget_cost_total", budget="llm-daily", currency="USD") == pytest.approx(1.750125)


def test_gauges_show_the_key_nearest_its_limit_with_one_series_per_budget() -> None:
    r, clock = CollectorRegistry(), Clock()
    rep = BudgetReport(r, [Declared("per-agent", Decimal("100"), "EUR")], clock=clock)
    secret_keys = ("agent=alice-bot", "agent=bob-bot", "agent=carol-bot")

    def gauges() -> tuple[float, float, float, float, float]:
        return tuple(sample(r, f"proctor_budget_{n}", budget="per-agent")  # type: ignore[return-value]
                     for n in ("limit", "spent", "reserved", "remaining_ratio", "window_end_seconds"))

    rep.window("per-agent", secret_keys[0], Decimal("100"), Decimal("20"), Decimal("5"), MONTH_END)
    assert gauges() == (100, 20, 5, 0.75, MONTH_END)
    rep.window("per-agent", secret_keys[1], Decimal("100"), Decimal("10"), Decimal("0"), MONTH_END)  # less used
    assert gauges() == (100, 20, 5, 0.75, MONTH_END)
    rep.window("per-agent", secret_keys[1], Decimal("100"), Decimal("60"), Decimal("30"), MONTH_END)  # passes it
    assert gauges() == (100, 60, 30, pytest.approx(0.1), MONTH_END)
    rep.window("per-agent", secret_keys[1], Decimal("100"), Decimal("70"), Decimal("0"), MONTH_END)  # released: the
    assert gauges() == (100, 70, 0, pytest.approx(0.3), MONTH_END)  # shown key is updated, down as well
    rep.window("per-agent", secret_keys[2], Decimal("100"), Decimal("104"), Decimal("0"), MONTH_END)  # over (late)
    assert gauges() == (100, 104, 0, 0, MONTH_END)  # the ratio stays within 0..1
    # a settle of last month's reservation (an earlier window) is old news
    rep.window("per-agent", secret_keys[0], Decimal("100"), Decimal("1"), Decimal("0"), T0)
    assert gauges() == (100, 104, 0, 0, MONTH_END)
    # one series per budget: never a label per key, never a key's value
    text = generate_latest(r).decode()
    assert all(k.split("=")[1] not in text for k in secret_keys)
    assert len([k for k in series(r) if k.startswith("proctor_budget_spent{")]) == 1

    # the window ends and nobody called since: a fresh window, not last month's alarm
    clock.now = MONTH_END + 5
    assert gauges() == (100, 0, 0, 1, MONTH_END)
    # the first call of the new window reports it
    rep.window("per-agent", secret_keys[0], Decimal("100"), Decimal("3"), Decimal("2"), MONTH_END + 28 * 86400)
    assert gauges() == (100, 3, 2, 0.95, MONTH_END + 28 * 86400)


def test_a_budget_first_seen_in_a_report_gets_its_gauges() -> None:
    r = CollectorRegistry()
    rep = BudgetReport(r, [], clock=Clock())
    rep.window("undeclared", "k", Decimal("10"), Decimal("2.5"), Decimal("0"), MONTH_END)
    rep.window("undeclared", "k", Decimal("10"), Decimal("5"), Decimal("0"), MONTH_END)
    assert sample(r, "proctor_budget_remaining_ratio", budget="undeclared") == 0.5
    assert sample(r, "proctor_budget_spent", budget="undeclared") == 5


# ------------------------------------------------------------- event lines and OCSF
@pytest.fixture(scope="module")
def ocsf_validator():
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION)).get_class_schema("api_activity")
    return jsonschema.Draft202012Validator(schema)


def recorder_with_trail(tmp_path: Path) -> tuple[DecisionRecorder, AuditTrail]:
    """The decision recorder with the audit trail listening, as server.py wires them."""
    recorder = DecisionRecorder(tmp_path / "decisions.jsonl")
    trail = AuditTrail([FileSink(tmp_path / "audit.jsonl", 0, 0, 0, False, "fail_closed")], Redactor([], []),
                       Chain(), frozenset({"POST"}), 1.0)
    recorder.listeners.append(trail.emit)
    return recorder, trail


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def test_events_are_event_lines_and_ocsf_events_correlated_with_the_call(tmp_path, ocsf_validator) -> None:
    recorder, _trail = recorder_with_trail(tmp_path)
    r = CollectorRegistry()
    rep = BudgetReport(r, ["po-spend-monthly"], record=recorder.write, clock=Clock(T0 + 7200))
    rep.event(budget_event("soft_threshold", "reserved", spent=Decimal("40000"), reserved=Decimal("125.5")))
    rep.event(budget_event())  # a refused call
    rep.event(budget_event(outcome="held", decision_id="01JG0000HELD"))
    recorder.close()
    assert sample(r, "proctor_budget_events_total", budget="po-spend-monthly", kind="soft_threshold") == 1
    assert sample(r, "proctor_budget_events_total", budget="po-spend-monthly", kind="exhausted") == 2

    # decisions.jsonl: one `budget` line per event, amounts as exact text, the key as the event showed it
    raw = (tmp_path / "decisions.jsonl").read_text().splitlines()
    soft, refused, held = (json.loads(x) for x in raw)
    assert list(soft) == ["type", "event", "time", "budget", "key", "window_id", "window_start", "window_end", "limit",
                          "spent", "reserved", "currency", "threshold", "outcome", "agent", "decision_id", "action",
                          "connector"]
    assert soft == {
        "type": "budget", "event": "soft_threshold", "time": "2026-01-01T02:00:00.000Z", "budget": "po-spend-monthly",
        "key": {"group": "finance", "field:cost_center": "sha256:0a1b2c3d4e5f"}, "window_id": "2026-01",
        "window_start": "2026-01-01T00:00:00.000Z", "window_end": "2026-02-01T00:00:00.000Z", "limit": "50000.00",
        "spent": "40000", "reserved": "125.5", "currency": "EUR", "threshold": "0.8", "outcome": "reserved",
        "agent": "procurement-bot", "decision_id": "01JG0000DECISION", "action": "erp.purchase_order.create",
        "connector": "erp"}
    assert "threshold" not in refused and refused["event"] == "exhausted" and refused["spent"] == "48250.50"
    for line in raw:  # read back: the same line, byte for byte
        back = parse_line(line)
        assert isinstance(back, BudgetEventRecord) and back.line().decode().rstrip("\n") == line

    # audit.jsonl: valid OCSF API Activity events, named, correlated, the agent as actor
    events = lines(tmp_path / "audit.jsonl")
    assert [e["api"]["operation"] for e in events] == ["proctor.budget.soft_threshold", "proctor.budget.exhausted",
                                                       "proctor.budget.exhausted"]
    for ev in events:
        errors = list(ocsf_validator.iter_errors(ev))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
        assert ev["api"]["service"]["name"] == "proctor.limits" and ev["class_uid"] == 6003
        assert ev["actor"]["user"] == {"uid": "procurement-bot", "name": "procurement-bot", "type_id": 99,
                                       "type": "AI agent"}
        assert ev["resources"] == [{"uid": "po-spend-monthly/2026-01", "name": "po-spend-monthly", "type": "Budget"}]
        assert ev["metadata"]["correlation_uid"] == ev["api"]["request"]["uid"] == ev["unmapped"]["proctor"][
            "decision_id"]
        assert ev["unmapped"]["proctor"]["record"] == "budget"
    ev_soft, ev_refused, ev_held = events
    assert ev_soft["metadata"]["correlation_uid"] == "01JG0000DECISION"
    assert (ev_soft["severity"], ev_soft["status"]) == ("Low", "Success")
    assert ev_soft["message"] == ("budget po-spend-monthly (group finance, field:cost_center sha256:0a1b2c3d4e5f), "
                                  "window 2026-01: soft threshold 80 % reached (spent 40000 + reserved 125.5 of "
                                  "50000.00 EUR) by procurement-bot erp.purchase_order.create")
    assert (ev_refused["severity"], ev_refused["status"]) == ("Medium", "Failure")
    assert ev_refused["message"].endswith("exhausted (spent 48250.50 + reserved 1200 of 50000.00 EUR): "
                                          "procurement-bot erp.purchase_order.create refused (429)")
    assert (ev_held["status"], ev_held["metadata"]["correlation_uid"]) == ("Success", "01JG0000HELD")
    assert "held for a budget extension" in ev_held["message"]

    # the activity view reads the event back into its record
    env, rec = read_event(events[1])
    assert isinstance(rec, BudgetEventRecord) and rec == parse_line(raw[1])
    row = summarize(events[1])
    assert (row["record"], row["operation"], row["agent"], row["resource"], row["decision_id"], row["kind"]) == \
        ("budget", "proctor.budget.exhausted", "procurement-bot", "po-spend-monthly", "01JG0000DECISION", "exhausted")
    # the same event from the line-shaped dict as from the record
    a, b = to_ocsf(json.loads(raw[0])), to_ocsf(parse_line(raw[0]))
    a["metadata"].pop("uid"), b["metadata"].pop("uid")
    assert a == b


# --------------------------------------------------------------------------- webhooks
def queued(n: Notifier) -> list[list]:
    return [[h.queue.get_nowait() for _ in range(h.queue.qsize())] for h in n._hooks]


def test_budget_event_names_are_webhook_events() -> None:
    hook = WebhookConfig(url="http://h/a", events=["budget.soft_threshold", "budget.exhausted", "requested"])
    assert hook.events == ["budget.soft_threshold", "budget.exhausted", "requested"]
    with pytest.raises(ValidationError, match="unknown approval event"):
        WebhookConfig(url="http://h/a", events=["budget-exhausted"])


def test_budget_webhooks_go_to_subscribed_hooks_of_the_keys_group() -> None:
    async def body() -> None:
        n = Notifier([
            WebhookConfig(url="http://h/a", events=["budget.exhausted", "budget.soft_threshold"]),
            WebhookConfig(url="http://h/b", events=["requested", "workflow-escalated"]),  # not subscribed
            WebhookConfig(url="http://h/c", events=["budget.exhausted"], groups=["finance"]),  # finance's budgets
            WebhookConfig(url="http://h/d", events=["budget.exhausted"], groups=["marketing"]),
            WebhookConfig(url="http://h/e", events=["budget.soft_threshold"], format="slack"),
        ], "http://console")
        rep = BudgetReport(CollectorRegistry(), [], notifier=n, clock=Clock())
        rep.event(budget_event())
        rep.event(budget_event("soft_threshold", "reserved"))
        a, b, c, d, e = queued(n)
        assert [i.event for i in a] == ["exhausted", "soft_threshold"] and b == [] and d == []
        assert [i.event for i in c] == ["exhausted"] and [i.event for i in e] == ["soft_threshold"]
        item = a[0]
        assert (item.family, item.approval_id) == ("budget", "01JG0000DECISION")  # X-Proctor-Event: proctor.budget.*
        assert item.payload["type"] == "proctor.budget.exhausted" and item.payload["console_url"] == "http://console"
        assert item.payload["budget"]["spent"] == "48250.50" and item.payload["budget"]["key"]["group"] == "finance"
        assert item.payload["budget"]["decision_id"] == "01JG0000DECISION"
        assert a[1].payload["budget"]["threshold"] == "0.8"
        assert e[0].payload == {"text": (
            "Proctor: budget po-spend-monthly (group finance, field:cost_center sha256:0a1b2c3d4e5f) reached its "
            "soft threshold (spent 48250.50 + reserved 1200 of 50000.00 EUR) with procurement-bot "
            "erp.purchase_order.create")}
        # a budget not keyed by group: only the hooks without groups
        rep.event(budget_event(key={"agent": "procurement-bot"}, agent="<!channel>"))
        a, b, c, d, e = queued(n)
        assert len(a) == 1 and c == [] and d == []
        # Slack control characters in values are escaped
        rep.event(budget_event("soft_threshold", "reserved", agent="<!channel>"))
        *_, e = queued(n)
        assert "<!channel>" not in e[0].payload["text"] and "&lt;!channel&gt;" in e[0].payload["text"]
        n.notify_budget({"event": "unknown"})  # not a budget event: nothing
        assert all(h.queue.qsize() == 0 for h in n._hooks)

    asyncio.run(body())


def test_a_budget_webhook_is_delivered_to_a_real_server() -> None:
    async def main() -> None:
        async with HookServer() as srv:
            n = fast([WebhookConfig(url=srv.url("/g"), events=["budget.exhausted"]),
                      WebhookConfig(url=srv.url("/s"), events=["budget.exhausted"], format="slack")])
            await n.start()
            try:
                BudgetReport(CollectorRegistry(), [], notifier=n, clock=Clock()).event(budget_event(outcome="held"))
                await until(lambda: len(srv.all()) == 2)
            finally:
                await n.close()
            (g,), (s,) = srv.received["/g"], srv.received["/s"]
            assert g.headers["X-Proctor-Event"] == s.headers["X-Proctor-Event"] == "proctor.budget.exhausted"
            body = g.json()
            assert body["type"] == "proctor.budget.exhausted" and body["budget"]["outcome"] == "held"
            assert body["budget"]["limit"] == "50000.00" and "sent_at" in body
            assert "held for a budget extension" in s.json()["text"]

    asyncio.run(asyncio.wait_for(main(), 10))


# ------------------------------------------------------- a throttle in the OCSF trail
@pytest.mark.integration
def test_a_rate_limit_throttle_is_told_apart_from_a_policy_deny_in_the_ocsf_trail(proctor_factory, idp) -> None:
    """A SIEM tells a 429 throttle from other refusals by `api.response.error` (`rate-limited`),
    `status_code` 429 and `unmapped.proctor.rate_limit` (docs/siem.md)."""
    p = proctor_factory({"rate_limits": [{"name": "item-reads", "limit": 1, "period": "1h",
                                          "match": {"actions": ["test.item.read"]}}]})
    token = idp.token("siem-bot")

    def call(method: str, path: str) -> httpx.Response:
        return httpx.request(method, f"{p.gateway_url}{path}", headers={"Authorization": f"Bearer {token}"},
                             timeout=30)

    assert call("GET", "/svc/items/1").status_code == 200
    throttled = call("GET", "/svc/items/1")
    denied = call("DELETE", "/svc/items/9")  # the bundled test policy forbids deletes: 403
    assert (throttled.status_code, denied.status_code) == (429, 403)
    ids = {throttled.headers["X-Proctor-Decision-Id"]: "throttle", denied.headers["X-Proctor-Decision-Id"]: "deny"}
    audit = p.dir / "state" / "audit.jsonl"

    def found() -> dict[str, dict]:
        return {ids[e["metadata"]["correlation_uid"]]: e for e in lines(audit)
                if e.get("metadata", {}).get("correlation_uid") in ids and e["unmapped"]["proctor"]["record"] == "decision"}

    wait_for(lambda: len(found()) == 2, timeout=10, what="the audit events")
    ev = found()
    t, d = ev["throttle"], ev["deny"]
    assert t["api"]["response"]["error"] == "rate-limited" and t["status_code"] == "429"
    assert t["api"]["response"]["code"] == 429 and t["status"] == "Failure"
    assert t["unmapped"]["proctor"]["rate_limit"]["name"] == "item-reads"
    assert t["unmapped"]["proctor"]["rate_limit"]["outcome"] == "throttled"
    assert t["unmapped"]["proctor"]["reasons"] == ["rate-limit:item-reads"]
    assert d["api"]["response"]["error"] == "policy" and d["status_code"] == "403"
    assert "rate_limit" not in d["unmapped"]["proctor"]  # no limit applies to deletes
