"""Workflow outcome KPIs (proxy/workflows/kpis.py) on a scripted timeline with an injected clock:
every number of the document computed by hand (docs/workflows.md, "Outcomes (KPIs)").

The timeline (seconds after T0; window [T0, T0 + 4 h), 1 h buckets, now = T0 + 4 h):

    G  -30000 .. -25000   completed before the window: counts nowhere
    F  -20000             stuck: running, never moved in the window (at risk, overdue)
    C  -7200 .. +600      started before, completed in the window (7800 s: SLA missed); a
                          1000 s approval on its quote (before the window) is its human wait
    A  0 .. +1500         600 s approval on the order (human); 1500 s (met)
    B  +3600 .. +6000     quote failed, then completed twice (rework); the order was escalated
                          to a person (attrs); receipt failed once; 2400 s (met)
    D  +7200              running; an order refused (out of order); at risk, overdue
    E  +11400             running, 3000 s old at the end: at risk (>= 80% of 3600), not overdue;
                          a quote completed exactly at `until`: outside the window
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from proxy.store.workflows import COMPLETED, RUNNING, Instance, StepEvent, StepTally
from proxy.workflows.kpis import (
    CYCLE_BOUNDS,
    MAX_AGENTS_SHOWN,
    WindowError,
    compute_kpis,
    escalated_steps,
    make_window,
    parse_time,
    percentile,
)
from proxy.workflows.spec import WorkflowSpec

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z, on the hour
HOUR = 3600

ORDERS = WorkflowSpec.model_validate({
    "name": "orders", "sla_seconds": 3600, "cost": {"currency": "EUR"},
    "steps": [
        {"name": "request", "actions": ["t.request"]},
        {"name": "quote", "actions": ["t.quote"], "requires": ["request"], "sla_seconds": 600,
         "objects": [{"type": "R", "from": "param", "name": "r"}]},
        {"name": "order", "actions": ["t.order"], "requires": ["quote"], "sla_seconds": 1200,
         "objects": [{"type": "Q", "from": "param", "name": "q"}]},
        {"name": "receipt", "actions": ["t.receipt"], "requires": ["order"],
         "objects": [{"type": "O", "from": "param", "name": "o"}]},
    ],
})
QUIET = WorkflowSpec.model_validate({
    "name": "quiet", "steps": [{"name": "only", "actions": ["t.only"], "sla_seconds": 60}]})


def ev(inst: str, at: float, step: str, outcome: str = "completed", agent: str = "bot-a", ms: float = 100.0,
       wait_s: float | None = None, human: bool = False, cost: str = "0", workflow: str = "orders") -> StepEvent:
    return StepEvent(instance_id=inst, workflow=workflow, step=step, action=f"t.{step}", agent=agent,
                     decision_id=f"d-{inst}-{at}", outcome=outcome, status=201 if outcome == "completed" else 500,
                     time=T0 + at, duration_ms=ms, approval_wait_ms=None if wait_s is None else wait_s * 1000,
                     human=human, cost=Decimal(cost))


def inst(iid: str, started: float, updated: float, completed: float | None = None,
         attrs: dict[str, Any] | None = None) -> Instance:
    return Instance(id=iid, workflow="orders", state=COMPLETED if completed is not None else RUNNING,
                    started_at=T0 + started, updated_at=T0 + updated,
                    completed_at=None if completed is None else T0 + completed, attrs=attrs or {})


EVENTS = [
    ev("G", -30000, "request", cost="0.10"), ev("G", -29000, "quote"), ev("G", -28000, "order"),
    ev("G", -25000, "receipt"),
    ev("F", -20000, "request"), ev("F", -19000, "quote", "failed", agent="bot-b"),
    ev("C", -7200, "request", ms=100, cost="0.10"),
    ev("C", -7000, "quote", ms=200, wait_s=1000, human=True, cost="0.20"),
    ev("C", -6000, "order", agent="bot-b", ms=300, cost="2.50"),
    ev("C", 600, "receipt", agent="bot-b", ms=400),
    ev("A", 0, "request", ms=100, cost="0.10"),
    ev("A", 300, "quote", ms=200, cost="0.20"),
    ev("A", 900, "order", agent="bot-b", ms=500, wait_s=600, human=True, cost="2.50"),
    ev("A", 1500, "receipt", agent="bot-b", ms=400),
    ev("B", 3600, "request", ms=120, cost="0.10"),
    ev("B", 3700, "quote", "failed", agent="bot-b", ms=50, cost="0.20"),
    ev("B", 4300, "quote", agent="bot-b", ms=250, cost="0.20"),
    ev("B", 4400, "quote", agent="bot-a", ms=260, cost="0.20"),
    ev("B", 4500, "order", agent="bot-b", ms=600, cost="2.50"),
    ev("B", 5000, "receipt", "failed", agent="bot-c", ms=1000),
    ev("B", 6000, "receipt", agent="bot-c", ms=300),
    ev("D", 7200, "request", ms=110, cost="0.10"),
    ev("D", 7300, "order", "refused", agent="bot-b", ms=1),
    ev("E", 11400, "request", ms=130, cost="0.10"),
    ev("E", 14400, "quote", ms=999, cost="9.99"),  # at `until`: outside
]
INSTANCES = [
    inst("G", -30000, -25000, -25000), inst("F", -20000, -19000), inst("C", -7200, 600, 600),
    inst("A", 0, 1500, 1500), inst("B", 3600, 6000, 6000, attrs={"items": [{"id": "wfe_1", "step": "order", "group": "ops", "state": "resolved"}]}),
    inst("D", 7200, 7300), inst("E", 11400, 14400),
]
NOW = T0 + 4 * HOUR


def kpis(events=EVENTS, instances=INSTANCES, since=T0, until=T0 + 4 * HOUR, now=NOW, specs=(ORDERS,)) -> dict:
    return compute_kpis(list(specs), instances, events, make_window(now, since, until, HOUR), now)


def test_the_whole_workflow_by_hand() -> None:
    doc = kpis()
    assert (doc["since"], doc["until"], doc["bucket_seconds"]) == (
        "2027-01-15T08:00:00.000Z", "2027-01-15T12:00:00.000Z", 3600)
    assert doc["generated_at"] == "2027-01-15T12:00:00.000Z" and doc["truncated"] is False
    [w] = doc["workflows"]
    assert (w["name"], w["currency"], w["sla_seconds"]) == ("orders", "EUR", 3600)
    # started A, B, D, E; completed C, A, B; running at the end F, D, E
    assert w["instances"] == {"started": 4, "completed": 3, "running": 3, "closed": 0}
    # cycles A 1500, B 2400, C 7800; waits A 600, B 0, C 1000; agent time A 900, B 2400, C 6800
    assert w["cycle_time_seconds"] == {
        "count": 3, "p50": 2400.0, "p90": 6720.0, "mean": 3900.0,   # p90: 2400 + 0.8 * (7800 - 2400)
        "human_wait_p50": 600.0, "human_wait_p90": 920.0,           # 600 + 0.8 * (1000 - 600)
        "agent_time_p50": 2400.0, "agent_time_p90": 5920.0,         # 2400 + 0.8 * (6800 - 2400)
        "human_wait_share": 0.1368,                                 # 1600 / 11700
    }
    counts = [b["count"] for b in w["cycle_time_histogram"]]
    assert [b["le"] for b in w["cycle_time_histogram"]] == [*CYCLE_BOUNDS, None]
    assert counts == [0, 0, 0, 2, 1, 0, 0, 0, 0, 0]  # 1500, 2400 <= 3600; 7800 <= 14400
    assert w["throughput"] == {"completed": 3, "per_day": 18.0, "series": [
        {"start": "2027-01-15T08:00:00.000Z", "started": 1, "completed": 2},
        {"start": "2027-01-15T09:00:00.000Z", "started": 1, "completed": 1},
        {"start": "2027-01-15T10:00:00.000Z", "started": 1, "completed": 0},
        {"start": "2027-01-15T11:00:00.000Z", "started": 1, "completed": 0}]}
    # calls in the window: 12 completed, 2 failed (and one refusal, not a call)
    assert w["error_rate"] == 0.1429
    # pairs completed in the window: C receipt, A x4, B x4, D request, E request = 11; B quote twice
    assert w["rework_rate"] == 0.0909
    assert w["sla"] == {"target_seconds": 3600, "met": 2, "missed": 1, "adherence": 0.6667, "at_risk": 3,
                        "overdue": 2, "burn": [
                            {"start": "2027-01-15T08:00:00.000Z", "met": 1, "missed": 1},
                            {"start": "2027-01-15T09:00:00.000Z", "met": 1, "missed": 0},
                            {"start": "2027-01-15T10:00:00.000Z", "met": 0, "missed": 0},
                            {"start": "2027-01-15T11:00:00.000Z", "met": 0, "missed": 0}]}
    # in the window: A 2.80 + B 3.20 + D 0.10 + E 0.10; per completed instance (C 2.80, A 2.80, B 3.20) / 3
    assert w["cost"] == {"total": "6.20", "per_instance": "2.93"}
    # 12 completions; A's order was approved, B's order escalated: 10 without a person
    assert w["autonomy_rate"] == 0.8333


def test_per_step() -> None:
    steps = {s["name"]: s for s in kpis()["workflows"][0]["steps"]}
    assert list(steps) == ["request", "quote", "order", "receipt"]
    assert steps["request"] == {
        "name": "request", "attempts": 4, "completions": 4, "failures": 0, "refusals": 0, "error_rate": 0.0,
        "rework_rate": 0.0, "duration_ms": {"p50": 115.0, "p90": 127.0},  # 100 110 120 130
        "step_time_seconds": {"count": 4, "p50": 0.0, "p90": 0.0},  # the starting step: at the start
        "sla_seconds": None, "sla_met": 0, "sla_missed": 0, "sla_adherence": None, "autonomy_rate": 1.0}
    # A: 300 s after its request (met), B: 700 s (missed); C's quote was before the window
    assert steps["quote"] == {
        "name": "quote", "attempts": 4, "completions": 3, "failures": 1, "refusals": 0, "error_rate": 0.25,
        "rework_rate": 0.5, "duration_ms": {"p50": 250.0, "p90": 258.0},
        "step_time_seconds": {"count": 2, "p50": 500.0, "p90": 660.0},
        "sla_seconds": 600, "sla_met": 1, "sla_missed": 1, "sla_adherence": 0.5, "autonomy_rate": 1.0}
    # A 600 s (after the quote, the approval included), B 200 s (from its first quote completion)
    assert steps["order"] == {
        "name": "order", "attempts": 2, "completions": 2, "failures": 0, "refusals": 1, "error_rate": 0.0,
        "rework_rate": 0.0, "duration_ms": {"p50": 550.0, "p90": 590.0},
        "step_time_seconds": {"count": 2, "p50": 400.0, "p90": 560.0},
        "sla_seconds": 1200, "sla_met": 2, "sla_missed": 0, "sla_adherence": 1.0, "autonomy_rate": 0.0}
    # C 6600 s (its order was at -6000), A 600, B 1500
    assert steps["receipt"] == {
        "name": "receipt", "attempts": 4, "completions": 3, "failures": 1, "refusals": 0, "error_rate": 0.25,
        "rework_rate": 0.0, "duration_ms": {"p50": 400.0, "p90": 400.0},
        "step_time_seconds": {"count": 3, "p50": 1500.0, "p90": 5580.0},
        "sla_seconds": None, "sla_met": 0, "sla_missed": 0, "sla_adherence": None, "autonomy_rate": 1.0}


def test_per_agent_most_calls_first() -> None:
    assert kpis()["workflows"][0]["agents"] == [
        {"agent": "bot-b", "completions": 5, "failures": 1, "refusals": 1, "error_rate": 0.1667},
        {"agent": "bot-a", "completions": 6, "failures": 0, "refusals": 0, "error_rate": 0.0},
        {"agent": "bot-c", "completions": 1, "failures": 1, "refusals": 0, "error_rate": 0.5},
    ]


def test_events_in_any_order_give_the_same_document() -> None:
    assert kpis(events=list(reversed(EVENTS)), instances=list(reversed(INSTANCES))) == kpis()


def test_rates_are_null_without_a_denominator() -> None:
    doc = kpis(specs=(ORDERS, QUIET))
    quiet = doc["workflows"][1]
    assert quiet["instances"] == {"started": 0, "completed": 0, "running": 0, "closed": 0}
    assert quiet["cycle_time_seconds"] == {"count": 0, "p50": None, "p90": None, "mean": None,
                                           "human_wait_p50": None, "human_wait_p90": None, "agent_time_p50": None,
                                           "agent_time_p90": None, "human_wait_share": None}
    assert quiet["error_rate"] is None and quiet["rework_rate"] is None and quiet["autonomy_rate"] is None
    assert quiet["sla"]["target_seconds"] is None and quiet["sla"]["adherence"] is None
    assert quiet["cost"] == {"total": "0.00", "per_instance": None}
    assert quiet["throughput"]["per_day"] == 0.0 and quiet["agents"] == []
    [only] = quiet["steps"]
    assert only["sla_seconds"] == 60 and only["sla_adherence"] is None and only["error_rate"] is None
    assert only["duration_ms"] == {"p50": None, "p90": None}
    # a workflow with a target but nothing completed: adherence null, not 0 or 1
    empty = kpis(events=[], instances=[])["workflows"][0]
    assert empty["sla"]["met"] == empty["sla"]["missed"] == 0 and empty["sla"]["adherence"] is None


def test_a_past_window_measures_work_in_progress_at_its_end() -> None:
    # [T0, T0 + 1000): C completes (600) inside; A completes at 1500, after: running at the end, with F
    w = kpis(until=T0 + 1000)["workflows"][0]
    assert w["instances"] == {"started": 1, "completed": 1, "running": 2, "closed": 0}
    assert w["cycle_time_seconds"]["p50"] == 7800.0 and w["sla"]["missed"] == 1
    # F is overdue; A (1000 s old) is not yet at 80% of 3600
    assert (w["sla"]["at_risk"], w["sla"]["overdue"]) == (1, 1)
    # spent in the window: A's calls up to +900 (0.10 + 0.20 + 2.50) and C's receipt (0); per completed
    # instance: C alone (2.80, its calls before the window included)
    assert w["cost"] == {"total": "2.80", "per_instance": "2.80"}
    assert [p["start"] for p in w["throughput"]["series"]] == ["2027-01-15T08:00:00.000Z"]


def test_until_in_the_future_measures_now() -> None:
    # the window runs to tomorrow: work in progress is as of now
    w = kpis(until=T0 + 24 * HOUR)["workflows"][0]
    assert w["instances"]["running"] == 3 and (w["sla"]["at_risk"], w["sla"]["overdue"]) == (3, 2)
    assert len(w["throughput"]["series"]) == 24
    # E's quote at T0 + 4 h is inside this window now
    assert {s["name"]: s["completions"] for s in w["steps"]}["quote"] == 4


def test_human_wait_is_capped_at_the_cycle_time() -> None:
    # an approval longer than the instance's own cycle (an async hold on the starting call)
    events = [ev("Z", 0, "request", wait_s=5000, human=True), ev("Z", 100, "quote"), ev("Z", 200, "order"),
              ev("Z", 300, "receipt")]
    w = kpis(events=events, instances=[inst("Z", 0, 300, 300)])["workflows"][0]
    c = w["cycle_time_seconds"]
    assert (c["p50"], c["human_wait_p50"], c["agent_time_p50"], c["human_wait_share"]) == (300.0, 300.0, 0.0, 1.0)


def test_step_time_without_a_recorded_prerequisite_counts_from_the_start() -> None:
    # a policy let the order skip the quote: the order is timed from the instance's start
    events = [ev("S", 0, "request"), ev("S", 1300, "order")]
    w = kpis(events=events, instances=[inst("S", 0, 1300)])["workflows"][0]
    order = {s["name"]: s for s in w["steps"]}["order"]
    assert order["step_time_seconds"] == {"count": 1, "p50": 1300.0, "p90": 1300.0}
    assert (order["sla_met"], order["sla_missed"]) == (0, 1)


def test_rework_across_the_window_start() -> None:
    # quote completed before the window and again inside: the repeat is rework in this window;
    # a pair completed twice before the window is not counted at all
    events = [ev("R", -500, "request"), ev("R", -400, "quote"), ev("R", -300, "quote"), ev("R", 100, "quote"),
              ev("Q", -500, "request"), ev("Q", -400, "quote"), ev("Q", -300, "quote"), ev("Q", 200, "order")]
    w = kpis(events=events, instances=[inst("R", -500, 100), inst("Q", -500, 200)])["workflows"][0]
    steps = {s["name"]: s for s in w["steps"]}
    assert steps["quote"]["rework_rate"] == 1.0 and steps["order"]["rework_rate"] == 0.0
    assert w["rework_rate"] == 0.5  # (R, quote) of (R, quote), (Q, order)


def test_unknown_steps_and_other_workflows() -> None:
    # events of a step no longer defined keep their numbers; other workflows' events are ignored
    events = [ev("A", 0, "request"), ev("A", 10, "legacy"), ev("X", 20, "request", workflow="other")]
    w = kpis(events=events, instances=[inst("A", 0, 10)])["workflows"][0]
    assert [s["name"] for s in w["steps"]] == ["request", "quote", "order", "receipt", "legacy"]
    legacy = w["steps"][-1]
    assert legacy["completions"] == 1 and legacy["sla_seconds"] is None
    assert sum(s["completions"] for s in w["steps"]) == 2


def test_agents_listed_are_bounded() -> None:
    events = [ev("A", i, "request", agent=f"a{i:04d}") for i in range(MAX_AGENTS_SHOWN + 20)]
    agents = kpis(events=events, instances=[])["workflows"][0]["agents"]
    assert len(agents) == MAX_AGENTS_SHOWN and agents[0]["agent"] == "a0000"


def test_escalated_steps_from_the_exception_record() -> None:
    i = inst("A", 0, 0)
    assert escalated_steps(i) == frozenset()
    # (the record proxy/workflows/exceptions.py keeps: items, and per-step state)
    i.attrs = {"items": [{"id": "wfe_1", "step": "order", "state": "open"}, {"id": "wfe_2", "step": None},
                         {"id": "wfe_3", "step": "quote", "state": "resolved"}, "junk"],
               "steps": {"receipt": {"human": True}, "request": {"taken_by": "ann"}, "x": {"base": 2}, "y": 1}}
    assert escalated_steps(i) == {"order", "quote", "receipt", "request"}
    i.attrs = {"items": "nonsense", "steps": []}
    assert escalated_steps(i) == frozenset()


def test_an_instance_a_person_closed_is_no_longer_work_in_progress() -> None:
    # H started at +1000 and was closed as failed at +2000; K was closed after the window
    events = [ev("H", 1000, "request"), ev("K", 1100, "request")]
    h = inst("H", 1000, 1000, attrs={"closed": {"by": "ann", "at": T0 + 2000, "note": "duplicate order"}})
    k = inst("K", 1100, 1100, attrs={"closed": {"by": "ann", "at": T0 + 5 * HOUR}})
    w = kpis(events=events, instances=[h, k])["workflows"][0]
    assert w["instances"] == {"started": 2, "completed": 0, "running": 1, "closed": 1}
    assert w["sla"]["at_risk"] == 1  # K only (3.7 h old at the end)
    # closed before the end of a window: at its end H was still running
    w = kpis(events=events, instances=[h, k], until=T0 + 1500)["workflows"][0]
    assert w["instances"] == {"started": 2, "completed": 0, "running": 2, "closed": 0}
    bad = inst("Z", 0, 0, attrs={"closed": {"at": "yesterday"}})
    assert kpis(events=[], instances=[bad])["workflows"][0]["instances"]["running"] == 1


# ------------------------------------------------------------------------- the pieces
def test_percentile_linear_between_closest_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.9) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.7)
    assert percentile([10.0, 20.0], 0.0) == 10.0 and percentile([10.0, 20.0], 1.0) == 20.0


def test_parse_time() -> None:
    assert parse_time("1800000000") == T0
    assert parse_time("1800000000.5") == T0 + 0.5
    assert parse_time("2027-01-15T08:00:00Z") == T0
    assert parse_time("2027-01-15T09:00:00+01:00") == T0
    assert parse_time("2027-01-15T08:00:00") == T0  # no offset: UTC
    assert parse_time("2027-01-15") == T0 - 8 * HOUR
    for bad in ("", "yesterday", "-5", "1e9", "nan", "inf", "2027-13-01", "99999999999999", "1" * 13,
                "2027-01-15T08:00:00Z" + "0" * 40):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_window_defaults_clamps_and_limits() -> None:
    now = T0 + 1234.5
    w = make_window(now)
    # 7 days before now, aligned down to the hour; until is now
    assert (w.until, w.bucket_seconds) == (now, 3600)
    assert w.since == T0 - 7 * 86400 and w.buckets == 7 * 24 + 1
    assert make_window(now, T0, T0 + 3600, 1).bucket_seconds == 60
    assert make_window(now, bucket_seconds=1).bucket_seconds == 1210  # 7 days in 500 buckets (ceil)
    assert make_window(now, T0, T0 + 86400 * 30, 10**9).bucket_seconds == 7 * 86400
    # more than 500 buckets: widened
    wide = make_window(now, T0, T0 + 86400 * 30, 60)
    assert wide.bucket_seconds == 5184 and wide.buckets == 500
    assert make_window(now, T0, T0 + 90).buckets == 1  # a window shorter than a bucket: one, cut short
    with pytest.raises(WindowError) as e:
        make_window(now, T0, T0)
    assert e.value.field == "since"
    with pytest.raises(WindowError):
        make_window(now, T0 + 10, T0)
    with pytest.raises(WindowError):
        make_window(now, T0 - 367 * 86400, T0)
    # a default start near the epoch stays at 0
    assert make_window(3600.0).since == 0.0


def test_instance_tally_is_not_needed() -> None:
    # the KPIs come from the events; an instance's tally (whatever it says) changes nothing
    instances = [Instance(**{**i.__dict__, "tally": {"quote": StepTally(99, 99, 99, 99)}}) for i in INSTANCES]
    assert kpis(instances=instances) == kpis()


# ------------------------------------------------------------------------- the metrics
def test_metrics_observe_each_completion_once_and_the_gauge_forgets_nothing() -> None:
    from proxy.observability.metrics import Metrics
    from proxy.store.workflows import apply_event
    from proxy.workflows.metrics import WorkflowMetrics, completed_by

    m = Metrics()
    wm = WorkflowMetrics(m)
    i = Instance(id="A", workflow="orders", state=RUNNING, started_at=T0, updated_at=T0)
    for e in [ev("A", 0, "request", cost="0.10"), ev("A", 300, "quote", "failed", ms=2500, cost="0.20"),
              ev("A", 400, "quote"), ev("A", 900, "order", cost="2.50"), ev("A", 1500, "receipt"),
              ev("A", 1600, "quote")]:  # a quote again, after the instance completed
        apply_event(i, e, ORDERS.required_steps)
        assert completed_by(e, i) == (e.step == "receipt")
        wm.recorded(e, i)
    assert completed_by(ev("A", 0, "request"), None) is False

    def sample(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert sample("proctor_workflow_cycle_seconds_count", workflow="orders") == 1.0
    assert sample("proctor_workflow_cycle_seconds_sum", workflow="orders") == 1500.0
    assert sample("proctor_workflow_cycle_seconds_bucket", workflow="orders", le="3600.0") == 1.0
    assert sample("proctor_workflow_cycle_seconds_bucket", workflow="orders", le="900.0") == 0.0
    assert sample("proctor_workflow_cost_total", workflow="orders") == pytest.approx(2.80)
    assert sample("proctor_workflow_step_seconds_count", workflow="orders", step="quote", outcome="completed") == 2.0
    assert sample("proctor_workflow_step_seconds_sum", workflow="orders", step="quote", outcome="failed") == 2.5
    wm.set_instances({("orders", "running"): 3, ("orders", "completed"): 4})
    wm.set_instances({("orders", "completed"): 5})
    assert sample("proctor_workflow_instances", workflow="orders", state="running") == 0.0
    assert sample("proctor_workflow_instances", workflow="orders", state="completed") == 5.0


# ------------------------------------------------------------------------- the CLI's rendering
def test_cli_renders_the_document(capsys) -> None:
    from proxy.workflows.cli import render_workflow, seconds, time_arg

    assert [seconds(x) for x in (None, 0.288, 42, 600, 725, 3600, 5400, 86400, 2 * 86400 + 4 * 3600)] == [
        "-", "0.288s", "42s", "10m", "12m 5s", "1h", "1h 30m", "1d", "2d 4h"]
    assert time_arg("7d", 1_000_000.0, "--since") == str(1_000_000 - 7 * 86400)
    assert time_arg("30m", 1_000_000.0, "--since") == str(1_000_000 - 1800)
    assert time_arg("2027-01-15T08:00:00Z", 0.0, "--since") == "2027-01-15T08:00:00Z"  # the API checks it
    assert time_arg(None, 0.0, "--since") is None
    w = kpis()["workflows"][0]
    w["instances"]["closed"] = 2
    render_workflow(w)
    out = capsys.readouterr().out
    for line in ("  instances   started 4, completed 3, running 3, closed by a person 2",
                 "  cycle time  p50 40m, p90 1h 52m, mean 1h 5m (3 completed)",
                 "              human wait p50 10m, agent time p50 40m; waiting for people 13.7% of it",
                 "  throughput  3 completed, 18 per day",
                 "  errors      14.3% of step calls failed; rework 9.1%",
                 "  SLA 1h      met 2, missed 1 (66.7%); running at risk 3, overdue 2",
                 "  cost        6.20 EUR in the window; 2.93 EUR per completed instance",
                 "  autonomy    83.3% of step completions without a person"):
        assert line in out.splitlines(), out
    quote = next(x.split() for x in out.splitlines() if x.strip().startswith("quote "))
    assert quote == ["quote", "4", "3", "1", "0", "25.0%", "50.0%", "250", "258", "8m", "20s", "50.0%", "100.0%"]
    assert any(x.split() == ["bot-b", "5", "1", "1", "16.7%"] for x in out.splitlines()), out


def test_cli_never_lets_an_agent_id_drive_the_terminal(capsys) -> None:
    from proxy.workflows.cli import render_workflow

    evil = "bot\x1b]0;pwned\x07\x1b[2J\u202e"
    events = [ev("A", 0, "request", agent=evil)]
    render_workflow(kpis(events=events, instances=[inst("A", 0, 0)])["workflows"][0])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "bot\\x1b]0;pwned\\x07\\x1b[2J\\u202e" in out
