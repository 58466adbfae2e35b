"""Workflow exceptions, the decision logic alone (proxy/workflows/exceptions.py): retry budgets,
giving up, escalation items, reroutes, stalls, people's decisions, the 409s and their
precedence, the retry headers, the webhooks; and the store's filters plus one stall
escalated once when replicas sweep at the same time (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import ValidationError

from proxy.approvals.notify import Notifier, WebhookConfig
from proxy.core.exchange import Exchange
from proxy.core.model import Refusal
from proxy.store import Store
from proxy.store.workflows import Instance, StepEvent, StepTally, new_instance_id
from proxy.workflows import exceptions as x
from proxy.workflows.spec import OnError, WorkflowSpec
from proxy.workflows.stage import STATE, WorkflowState
from test_store import MakeStore, make_store  # noqa: F401 - the fixture is used by name

WF = WorkflowSpec.model_validate({
    "name": "orders", "sla_seconds": 3600, "escalate_group": "ops-people",
    "steps": [
        {"name": "request", "actions": ["a.request"]},
        {"name": "quote", "actions": ["a.quote"], "requires": ["request"],
         "objects": [{"type": "Request", "from": "param", "name": "req"}],
         "on_error": {"reroute": {"to": "bob", "after_failures": 2}, "retry": {"max_attempts": 3}}},
        {"name": "order", "actions": ["a.order"], "requires": ["quote"],
         "objects": [{"type": "Quote", "from": "param", "name": "quote"},
                     {"type": "Order", "from": "response", "path": "n"}],
         "on_error": {"retry": {"max_attempts": 3, "after_seconds": 7}, "escalate": {"group": "buyers",
                                                                                     "after_failures": 2}}},
        {"name": "receipt", "actions": ["a.receipt"], "requires": ["order"], "sla_seconds": 60,
         "objects": [{"type": "Order", "from": "param", "name": "order"}]},
    ],
})
QUOTE, ORDER, RECEIPT = WF.step("quote"), WF.step("order"), WF.step("receipt")


def ids() -> Any:
    n = iter(range(1, 1000))
    return lambda: f"wfe_{next(n)}"


def inst(completed: list[str], failures: dict[str, int] | None = None, attrs: dict | None = None,
         updated_at: float = 1000.0) -> Instance:
    return Instance(id="wfi_1", workflow="orders", state="running", started_at=900.0, updated_at=updated_at,
                    completed=list(completed),
                    tally={k: StepTally(attempts=v, failures=v) for k, v in (failures or {}).items()},
                    attrs=copy.deepcopy(attrs or {}))


def fail(i: Instance, step: str, agent: str = "alice", now: float = 2000.0, new_id: Any = None) -> Instance:
    """`i` after one more failure of `step` and the transitions it causes (as the stage does)."""
    t = i.tally.setdefault(step, StepTally())
    t.attempts += 1
    t.failures += 1
    change = x.after_failure(WF, WF.step(step), i, agent, [], "dec-1", now, new_id or ids())
    if change.attrs is not None:
        i.attrs = change.attrs
    i.extra_events = change.events  # type: ignore[attr-defined]
    return i


# ---------------------------------------------------------------------------- definitions
@pytest.mark.parametrize("raw, message", [
    ({}, "on_error needs at least one of retry, escalate, reroute"),
    ({"retry": {"max_attempts": 2}, "escalate": {"group": "g", "after_failures": 3}},
     "escalate.after_failures (3) is more than retry.max_attempts (2)"),
    ({"retry": {"max_attempts": 2}, "reroute": {"to": "b", "after_failures": 3}},
     "reroute.after_failures (3) is more than retry.max_attempts (2)"),
    ({"reroute": {"to": "human:alice"}}, "ids starting group: or human: name people"),
    ({"reroute": {"to": "group:desk"}}, "ids starting group: or human: name people"),
    ({"escalate": {"group": "no spaces"}}, "String should match pattern"),
    ({"retry": {"max_attempts": 0}}, "greater than or equal to 1"),
])
def test_inconsistent_on_error_is_refused_precisely(raw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OnError.model_validate(raw)


# ---------------------------------------------------------------------------- failures
def test_retry_escalate_then_give_up_once() -> None:
    new_id = ids()
    i = fail(inst(["request", "quote"]), "order", new_id=new_id)
    assert i.extra_events == [] and i.attrs == {}  # type: ignore[attr-defined]
    i = fail(i, "order", new_id=new_id)
    (esc,) = i.extra_events  # type: ignore[attr-defined]
    assert (esc.event, esc.reason, esc.group, esc.failures, esc.escalation_id) == (
        "escalated", "failures", "buyers", 2, "wfe_1")
    assert i.attrs[x.INBOX_FLAG] and x.unresolved(i.attrs, "order")[0]["state"] == "open"
    i = fail(i, "order", new_id=new_id)
    assert [(e.event, e.reason) for e in i.extra_events] == [("gave-up", None), ("escalated", "gave-up")]  # type: ignore[attr-defined]
    items = x.items(i.attrs)
    assert len(items) == 1 and items[0]["id"] == "wfe_1" and items[0]["reason"] == "gave-up"  # upgraded, not a second
    assert x.step_attrs(i, "order")["gave_up"] == 2000.0
    # applied again (another replica, a retried write): nothing more
    assert x.after_failure(WF, ORDER, i, "alice", [], "dec-2", 2001.0, new_id).attrs is None
    # a fourth failure (a policy let it through) gives up no second time
    i = fail(i, "order", new_id=new_id)
    assert i.extra_events == []  # type: ignore[attr-defined]


def test_reroute_moves_the_step_and_resets_the_budget() -> None:
    i = fail(inst(["request"]), "quote")
    assert i.extra_events == []  # type: ignore[attr-defined]
    i = fail(i, "quote")
    (moved,) = i.extra_events  # type: ignore[attr-defined]
    assert (moved.event, moved.agent, moved.to, moved.failures) == ("rerouted", "alice", "bob", 2)
    sx = x.step_attrs(i, "quote")
    assert (sx["rerouted_to"], sx["rerouted_from"], sx["base"]) == ("bob", "alice", 2)
    assert x.counted_failures(i, "quote") == 0
    # bob fails: his own budget, no second reroute; he gives up after 3
    for n in (1, 2):
        i = fail(i, "quote", "bob")
        assert i.extra_events == [] and x.counted_failures(i, "quote") == n  # type: ignore[attr-defined]
    i = fail(i, "quote", "bob")
    assert [e.event for e in i.extra_events][:1] == ["gave-up"]  # type: ignore[attr-defined]
    # the escalation of a step without its own group goes to the workflow's escalate_group
    assert x.unresolved(i.attrs, "quote")[0]["group"] == "ops-people"


def test_the_reroute_target_failing_first_is_not_moved_to_itself() -> None:
    i = fail(fail(inst(["request"]), "quote", "bob"), "quote", "bob")
    assert i.extra_events == [] and "rerouted_to" not in x.step_attrs(i, "quote")  # type: ignore[attr-defined]
    # nor an agent in the group the step moves to
    j = inst(["request"], {"quote": 2})
    assert x.after_failure(WF, QUOTE, j, "carol", ["bob"], "d", 1.0).attrs is None


def test_failures_change_nothing_while_a_person_has_the_step_or_the_instance_is_closed() -> None:
    taken = inst(["request", "quote"], {"order": 5}, {"steps": {"order": {"taken_by": "bea"}}})
    assert x.after_failure(WF, ORDER, taken, "alice", [], "d", 1.0).attrs is None
    shut = inst(["request", "quote"], {"order": 5}, {"closed": {"by": "olga"}})
    assert x.after_failure(WF, ORDER, shut, "alice", [], "d", 1.0).attrs is None


def test_retry_advice_headers() -> None:
    mine = inst(["request", "quote"], {"order": 1})
    advice = x.retry_advice(ORDER, mine, mine, "alice", [])
    assert advice is not None and advice.headers() == {"Proctor-Workflow-Retry": "attempt=1; max=3", "Retry-After": "7"}
    gave = fail(fail(fail(inst(["request", "quote"]), "order"), "order"), "order")
    h = x.retry_advice(ORDER, gave, gave, "alice", []).headers()  # type: ignore[union-attr]
    assert h == {"Proctor-Workflow-Retry": 'attempt=3; max=3; gave-up; escalated="buyers"'}
    # moved away from this agent: who has it, and no Retry-After; names are quoted safely
    moved = inst(["request"], {"quote": 2}, {"steps": {"quote": {"rerouted_to": 'b"o\\b\u00e9', "base": 2}}})
    mine = inst(["request"], {"quote": 2})
    h = x.retry_advice(QUOTE, mine, moved, "alice", []).headers()  # type: ignore[union-attr]
    assert h == {"Proctor-Workflow-Retry": 'attempt=2; max=3; rerouted-to="b\\"o\\\\b?"'}
    # a step without on_error: nothing to say
    assert x.retry_advice(RECEIPT, mine, mine, "alice", []) is None


def test_an_upstream_asking_for_a_longer_wait_is_kept() -> None:
    ours = {"Proctor-Workflow-Retry": "attempt=1; max=3", "Retry-After": "7"}
    assert x.later_retry_after(ours, "120")["Retry-After"] == "120"
    for theirs in (None, "3", "Wed, 21 Oct 2015 07:28:00 GMT", "-5", "9" * 20):
        assert x.later_retry_after(ours, theirs) == ours
    gave_up = {"Proctor-Workflow-Retry": "attempt=3; max=3; gave-up"}
    assert x.later_retry_after(gave_up, "120") == gave_up  # no retry: none added


def test_failure_statuses_are_everything_the_completion_check_refuses() -> None:
    assert x.failure_statuses(ORDER) == set(range(300, 600))
    strict = WorkflowSpec.model_validate({"name": "w", "steps": [{"name": "s", "actions": ["a"],
                                                                  "complete_when": {"status": [201]}}]}).step("s")
    assert 200 in x.failure_statuses(strict) and 201 not in x.failure_statuses(strict)


# ---------------------------------------------------------------------------- completion and context
def test_completion_resolves_the_steps_items_and_a_stall() -> None:
    i = fail(fail(inst(["request", "quote"]), "order"), "order")
    i.attrs["items"].append({"id": "wfe_s", "step": "receipt", "reason": "stalled", "state": "open", "group": "g"})
    change = x.after_completion(WF, ORDER, i, "alice", "dec-9", 3000.0)
    assert change.attrs is not None and x.INBOX_FLAG not in change.attrs
    assert [(e.event, e.escalation_id, e.agent) for e in change.events] == [
        ("resolved", "wfe_1", "alice"), ("resolved", "wfe_s", "alice")]
    assert all(it["state"] == "resolved" for it in change.attrs["items"])
    # nothing open: nothing to write
    assert x.after_completion(WF, RECEIPT, inst(["request"]), "a", "d", 1.0).attrs is None


def test_context_for_the_caller() -> None:
    attrs = {"steps": {"quote": {"rerouted_to": "bob", "gave_up": 5.0}}, "items": [
        {"id": "wfe_1", "step": "quote", "state": "open"}]}
    i = inst(["request"], {"quote": 3}, attrs)
    assert x.exception_context(QUOTE, i, "alice", []) == {
        "escalated": True, "gave_up": True, "rerouted_to": "bob", "rerouted_away": True, "closed": False}
    assert x.exception_context(QUOTE, i, "bob", [])["rerouted_away"] is False
    assert x.exception_context(QUOTE, i, "carol", ["bob"])["rerouted_away"] is False  # a group of agents
    taken = inst(["request"], attrs={"steps": {"quote": {"taken_by": "bea", "rerouted_to": "bob"}}})
    ctx = x.exception_context(QUOTE, taken, "bob", [])
    assert (ctx["rerouted_to"], ctx["rerouted_away"]) == ("human:bea", True)  # a person has it: every agent away
    assert x.exception_context(ORDER, None, "a", [])["closed"] is False
    assert x.exception_context(ORDER, inst([], attrs={"closed": {"by": "o"}}), "a", [])["closed"] is True


# ---------------------------------------------------------------------------- stalls
def test_stall_threshold_and_once_per_idle_spell() -> None:
    waiting_receipt = inst(["request", "quote", "order"], updated_at=1000.0)
    assert x.stall_threshold(WF, waiting_receipt) == (60, RECEIPT)
    assert x.stall_check(WF, waiting_receipt, 1060.0).attrs is None  # not longer than the SLA
    change = x.stall_check(WF, waiting_receipt, 1061.0, ids())
    assert [(e.event, e.step) for e in change.events] == [("stalled", "receipt"), ("escalated", "receipt")]
    assert change.events[0].idle_seconds == 61.0 and change.events[1].group == "ops-people"
    waiting_receipt.attrs = change.attrs  # type: ignore[assignment]
    assert x.stall_check(WF, waiting_receipt, 5000.0).attrs is None  # the same spell: once
    waiting_receipt.updated_at = 2000.0  # it moved (a failure, say), then idles again
    again = x.stall_check(WF, waiting_receipt, 2100.0, ids())
    assert [e.event for e in again.events] == ["stalled"]  # people have an open item already: no second one
    # waiting on steps without SLA: the workflow's
    assert x.stall_threshold(WF, inst(["request"])) == (3600, QUOTE)
    done = inst(["request"])
    done.state = "completed"
    assert x.stall_check(WF, done, 99999.0).attrs is None
    assert x.stall_check(WF, inst(["request"], attrs={"closed": {"by": "o"}}), 99999.0).attrs is None
    assert x.shortest_sla(WF) == 60


# ---------------------------------------------------------------------------- decisions
def given_up() -> Instance:
    return fail(fail(fail(inst(["request", "quote"]), "order"), "order"), "order")


def test_decide_retry_take_over_complete_close() -> None:
    i = given_up()
    retry = x.decide(WF, i, "wfe_1", "retry", "bea", 3000.0, note="fixed", to="carol")
    sx = retry.attrs["steps"]["order"]  # type: ignore[index]
    assert (sx["base"], sx["human"], sx["rerouted_to"], sx["rerouted_from"]) == (3, True, "carol", "human:bea")
    assert "gave_up" not in sx and x.INBOX_FLAG not in retry.attrs  # type: ignore[operator]
    (ev,) = retry.events
    assert (ev.event, ev.by, ev.resolution, ev.note, ev.to, ev.group) == ("decided", "bea", "retry", "fixed", "carol",
                                                                          "buyers")
    taken = x.decide(WF, i, "wfe_1", "take-over", "bea", 3000.0)
    assert taken.attrs["steps"]["order"]["taken_by"] == "bea"  # type: ignore[index]
    assert "gave_up" not in taken.attrs["steps"]["order"]  # type: ignore[index]
    assert x.unresolved(taken.attrs, "order")[0]["state"] == "taken"  # type: ignore[arg-type]
    i.attrs = taken.attrs  # type: ignore[assignment]
    with pytest.raises(x.DecisionRefused, match="bea took escalation wfe_1 over"):
        x.decide(WF, i, "wfe_1", "take-over", "zed", 3001.0)
    done = x.decide(WF, i, "wfe_1", "complete", "bea", 3002.0, objects=[("Order", " 4500 ")])
    assert done.step_event is not None and done.links == [("Order", "4500")]
    se = done.step_event
    assert (se.step, se.agent, se.outcome, se.human, se.decision_id) == ("order", "human:bea", "completed", True, "wfe_1")
    closed = x.decide(WF, given_up(), "wfe_1", "close", "olga", 3003.0, note="dup")
    assert closed.attrs["closed"] == {"by": "olga", "at": 3003.0, "note": "dup"}  # type: ignore[index]
    assert x.unresolved(closed.attrs, any_step=True) == []  # type: ignore[arg-type]


@pytest.mark.parametrize("kw, status, message", [
    ({"resolution": "maybe"}, 400, "resolution must be one of"),
    ({"item": "wfe_404"}, 404, "has no escalation"),
    ({"resolution": "complete", "objects": [("Invoice", "1")]}, 400, "not 'Invoice'"),
    ({"resolution": "complete", "objects": [("Order", "\x00")]}, 400, "printable"),
    ({"resolution": "take-over", "to": "carol"}, 400, "goes with resolution retry"),
    ({"resolution": "retry", "to": "human:x"}, 400, "not starting group: or human:"),
])
def test_bad_decisions_are_refused(kw: dict, status: int, message: str) -> None:
    args = {"item": "wfe_1", "resolution": "retry", **kw}
    with pytest.raises(x.DecisionRefused, match=message) as e:
        x.decide(WF, given_up(), args.pop("item"), args.pop("resolution"), "bea", 1.0, **args)
    assert e.value.status == status


def test_decided_items_and_closed_instances_are_final() -> None:
    i = given_up()
    i.attrs = x.decide(WF, i, "wfe_1", "retry", "bea", 1.0).attrs  # type: ignore[assignment]
    with pytest.raises(x.DecisionRefused, match="was resolved \\(retry\\) by bea") as e:
        x.decide(WF, i, "wfe_1", "close", "olga", 2.0)
    assert e.value.status == 409
    stall = inst(["request"], attrs={"items": [{"id": "wfe_9", "step": None, "state": "open", "reason": "stalled"}]})
    with pytest.raises(x.DecisionRefused, match="about the instance as a whole"):
        x.decide(WF, stall, "wfe_9", "take-over", "bea", 1.0)


def test_who_may_decide() -> None:
    assert x.may_decide({"group": "buyers"}, ["buyers"], "admins")
    assert not x.may_decide({"group": "buyers"}, ["sellers"], "admins")
    assert x.may_decide({"group": "buyers"}, ["admins"], "admins")
    assert not x.may_decide({"group": None}, ["buyers"], "admins") and x.may_decide({"group": None}, ["admins"],
                                                                                     "admins")


# ---------------------------------------------------------------------------- the 409s
@dataclass
class _Policy:
    annotations: dict[str, str]


@dataclass
class _Bundle:
    policies: dict[str, _Policy] = field(default_factory=dict)


@dataclass
class _Evaluation:
    bundle: _Bundle


POLICIES = {"workflow-step-out-of-order": _Policy({"workflow": "precondition"}),
            "workflow-step-gave-up": _Policy({"workflow": "gave-up"}),
            "workflow-step-rerouted": _Policy({"workflow": "rerouted"}),
            "workflow-instance-closed": _Policy({"workflow": "closed"}),
            "other": _Policy({})}


def settle(reasons: list[str], i: Instance) -> Exchange:
    from proxy.core.model import Classification
    from proxy.policy.stage import EVALUATION

    ex = Exchange(None)
    ex.classification = Classification(connector="c", action="a.order", resource_type="Order", resource_id="new")
    ex.stage_data[STATE] = WorkflowState(workflow=WF, step=ORDER, instance=i, instance_id=i.id, objects=[],
                                         missing=[], next_steps=[])
    ex.stage_data[EVALUATION] = _Evaluation(_Bundle(POLICIES))
    ex.pending_refusal = Refusal(403, "Denied by policy", "...", reasons=reasons, kind="policy")
    x.WorkflowExceptionConflict().on_request(ex)
    return ex


def test_the_most_decisive_exception_answers() -> None:
    i = given_up()
    i.attrs["closed"] = {"by": "olga", "at": 5.0}
    ex = settle(["workflow-step-gave-up", "workflow-instance-closed", "workflow-step-out-of-order"], i)
    assert ex.refusal is not None and (ex.refusal.status, ex.refusal.kind) == (409, "instance-closed")
    ex = settle(["workflow-step-rerouted", "workflow-step-gave-up"], given_up())
    assert ex.refusal.kind == "step-gave-up"  # type: ignore[union-attr]
    assert ex.refusal.extra["workflow"]["escalation"]["group"] == "buyers"  # type: ignore[union-attr]
    # another policy taking part: not ours to settle (it stays a 403)
    ex = settle(["workflow-step-gave-up", "other"], given_up())
    assert ex.refusal is None and ex.pending_refusal is not None
    # the order alone is WorkflowOrder's
    ex = settle(["workflow-step-out-of-order"], given_up())
    assert ex.refusal is None and ex.pending_refusal is not None


# ---------------------------------------------------------------------------- webhooks
def test_workflow_webhooks_go_to_subscribed_hooks_of_the_group() -> None:
    async def body() -> None:
        n = Notifier([
            WebhookConfig(url="http://h/a", events=["workflow-escalated", "workflow-rerouted"]),
            WebhookConfig(url="http://h/b", events=["requested", "escalated"]),  # approvals only
            WebhookConfig(url="http://h/c", events=["workflow-escalated"], groups=["buyers"]),
            WebhookConfig(url="http://h/d", events=["workflow-escalated"], format="slack"),
        ], "http://console")
        i = given_up()
        for e in i.extra_events:  # type: ignore[attr-defined]
            n.notify_workflow(e.to_dict())
        a, b, c, d = [[h.queue.get_nowait() for _ in range(h.queue.qsize())] for h in n._hooks]
        assert [it.event for it in a] == ["escalated"] and b == [] and len(c) == 1 and len(d) == 1
        assert (a[0].family, a[0].payload["type"]) == ("workflow", "proctor.workflow.escalated")
        assert a[0].payload["workflow"]["group"] == "buyers" and a[0].payload["workflow"]["reason"] == "gave-up"
        assert "in the inbox of buyers" in d[0].payload["text"]
        # an escalation to another group: not for the buyers' hook
        ev = dict(i.extra_events[-1].to_dict(), group="<!channel>")  # type: ignore[attr-defined]
        n.notify_workflow(ev)
        a, b, c, d = [[h.queue.get_nowait() for _ in range(h.queue.qsize())] for h in n._hooks]
        assert len(a) == 1 and c == [] and "&lt;!channel&gt;" in d[0].payload["text"]
        n.notify_workflow({"event": "stalled"})  # not a webhook event
        assert all(h.queue.qsize() == 0 for h in n._hooks)

    asyncio.run(body())


# ---------------------------------------------------------------------------- the store
def test_store_filters_and_one_escalation_per_stall_across_replicas(make_store: MakeStore) -> None:  # noqa: F811
    async def main() -> None:
        stores: list[Store] = [make_store() for _ in range(4)]
        for s in stores:
            await s.open()
        try:
            a, b = new_instance_id(), new_instance_id()
            for i, t in ((a, 1000.0), (b, 5000.0)):
                for step in ("request", "quote", "order"):
                    await stores[0].record_workflow_event(StepEvent(
                        instance_id=i, workflow="orders", step=step, action=f"a.{step}", agent="bot",
                        decision_id=f"d-{step}", outcome="completed", status=201, time=t, duration_ms=1.0),
                        required=WF.required_steps, links=[], create=True)
            # stalled ones only (last moved before), and those with the inbox flag
            stale = await stores[1].list_workflow_instances(workflow="orders", state="running", before=2000.0)
            assert [i.id for i in stale] == [a]
            assert await stores[1].list_workflow_instances(flagged=x.INBOX_FLAG) == []
            # four replicas sweep at once: one stall event, one item
            found = await stores[0].workflow_instance(a)
            assert found is not None
            results = await asyncio.gather(*(x.apply(s, found, lambda i: x.stall_check(WF, i, 3000.0))
                                             for s in stores))
            events = [e.event for r in results if r is not None for e in r[0].events]
            assert events == ["stalled", "escalated"], events
            flagged = await stores[2].list_workflow_instances(flagged=x.INBOX_FLAG)
            assert [i.id for i in flagged] == [a]
            # a note mentioning "inbox" is no false negative or positive once confirmed by the caller
            assert x.unresolved(flagged[0].attrs, any_step=True)
            with pytest.raises(ValueError):
                await stores[0].list_workflow_instances(flagged="in%box")
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------- the stage alone
def test_the_stage_fills_the_callers_context_and_holds_failed_answers_back() -> None:
    from proxy.core.model import AgentIdentity
    from proxy.policy.stage import CONTEXT_EXTRA
    from proxy.workflows.stage import workflow_context

    i = inst(["request", "quote"], {"order": 1}, {"steps": {"order": {"human": True, "rerouted_to": "bob"}}})
    state = WorkflowState(workflow=WF, step=ORDER, instance=i, instance_id=i.id, objects=[], missing=[],
                          next_steps=["order"])
    ex = Exchange(None)
    ex.identity = AgentIdentity("alice", "https://idp", {}, None)
    ex.stage_data[STATE] = state
    ex.stage_data[CONTEXT_EXTRA] = {"workflow": workflow_context(state)}
    assert ex.stage_data[CONTEXT_EXTRA]["workflow"]["rerouted_away"] is False  # (defaults before the stage)
    x.WorkflowExceptions(store=None, record=lambda e: None, groups_of=lambda _i: ["buyers"]).on_request(ex)
    ctx = ex.stage_data[CONTEXT_EXTRA]["workflow"]
    assert (ctx["rerouted_to"], ctx["rerouted_away"], ctx["gave_up"]) == ("bob", True, False)
    assert state.human is True  # a person took part in this step before: its completion is not autonomous
    assert ex.plan.replaceable_statuses == set(range(300, 600))
    # a refused call (nothing recorded) does nothing on the way back
    assert x.WorkflowExceptions(store=None, record=lambda e: None).on_response(ex) is None
