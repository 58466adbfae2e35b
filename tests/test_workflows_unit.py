"""Workflow definitions, correlation and the stages' decisions, without processes (docs/workflows.md)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest

from proxy.connectors.manifest import ConnectorManifest
from proxy.core.chain import Chain
from proxy.core.exchange import Exchange
from proxy.core.model import AgentIdentity, AgentRequest, Classification
from proxy.policy.stage import CONTEXT_EXTRA
from proxy.store import StoreError
from proxy.store.refusal import store_unavailable
from proxy.workflows.correlate import as_id, baggage_value, json_value, request_objects, response_objects, trace_id
from proxy.workflows.spec import WorkflowSpec, Workflows, check_workflows
from proxy.workflows.stage import STATE, WorkflowCheck, next_steps, order_refusal, workflow_context

MANIFEST = ConnectorManifest.model_validate({
    "name": "svc", "hosts": ["svc.example.com"],
    "routes": [
        {"method": "POST", "path": "/a", "action": "svc.a", "resource": {"type": "A", "id": "new"},
         "body": {"ref": {"path": "ref", "type": "string"}}},
        {"method": "POST", "path": "/b/{id}", "action": "svc.b", "resource": {"type": "B", "id": "{id}"},
         "params": {"id": {"type": "string"}}},
        {"method": "POST", "path": "/c", "action": "svc.c", "resource": {"type": "C", "id": "new"}},
    ],
})


def spec(steps: list[dict], **kw: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate({"name": "w", "steps": steps, **kw})


GOOD = [
    {"name": "a", "actions": ["svc.a"], "objects": [{"type": "A", "from": "response", "path": "d.id"}]},
    {"name": "b", "actions": ["svc.b"], "requires": ["a"], "objects": [{"type": "A", "from": "param", "name": "id"}]},
]


# ------------------------------------------------------------------ definitions
def test_a_valid_definition() -> None:
    w = spec(GOOD, sla_seconds=60, cost={"currency": "EUR"})
    assert check_workflows([w], [MANIFEST]) == []
    index = Workflows((w,))
    governed = index.for_action("svc.b")
    assert governed is not None and governed.step.name == "b" and index.actions == {"svc.a", "svc.b"}
    assert index.for_action("svc.c") is None and w.currency == "EUR" and w.required_steps == ["a", "b"]


@pytest.mark.parametrize("steps, problem", [
    ([{"name": "a", "actions": []}], "step a: no actions"),
    ([{"name": "a", "actions": ["svc.nope"]}], "unknown action svc.nope"),
    ([{"name": "a", "actions": ["svc.a"]}, {"name": "b", "actions": ["svc.a"]}], "action svc.a is already step w/a"),
    ([{"name": "a", "actions": ["svc.a"], "requires": ["zz"]}], "requires unknown step 'zz'"),
    ([{"name": "a", "actions": ["svc.a"], "requires": ["a"],
       "objects": [{"type": "A", "from": "field", "name": "ref"}]}], "requires itself"),
    ([{"name": "a", "actions": ["svc.a"]}, {"name": "a", "actions": ["svc.c"]}], "step 'a' is defined more than once"),
    ([{"name": "a", "actions": ["svc.a"]}, {"name": "b", "actions": ["svc.c"], "requires": ["a"]}],
     "step b: requires earlier steps but names no object from the request"),
    ([{"name": "a", "actions": ["svc.a"]}, {"name": "b", "actions": ["svc.c"], "requires": ["a"],
                                            "objects": [{"type": "A", "from": "field", "name": "ref"}]}],
     "object A from field 'ref': no such declared field on the routes of svc.c"),
    ([{"name": "a", "actions": ["svc.a"], "requires": ["b"], "objects": [{"type": "A", "from": "field", "name": "ref"}]},
      {"name": "b", "actions": ["svc.b"], "requires": ["a"], "objects": [{"type": "A", "from": "param", "name": "id"}]}],
     "requires form a cycle: a -> b -> a"),
])
def test_definition_problems_are_named(steps: list[dict], problem: str) -> None:
    problems = check_workflows([spec(steps)], [MANIFEST])
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("bad, message", [
    ({"type": "A", "from": "response"}, "needs `path`"),
    ({"type": "A", "from": "param"}, "needs `name`"),
    ({"type": "A", "from": "header", "name": "Location", "pattern": "no-group"}, "needs a group"),
    ({"type": "A", "from": "header", "name": "Location", "pattern": "("}, "not a valid regex"),
    ({"type": "A", "from": "param", "name": "x", "pattern": "(x)"}, "applies to objects from a header only"),
    ({"type": "1A", "from": "param", "name": "x"}, "object type '1A'"),
    ({"type": "_baggage", "from": "param", "name": "x"}, "object type '_baggage'"),
    ({"type": "Agent", "from": "param", "name": "x"}, "is reserved"),
    ({"type": "WorkflowInstance", "from": "param", "name": "x"}, "is reserved"),
    ({"type": "A", "from": "cookie", "name": "x"}, "Input should be"),
])
def test_object_declarations_are_validated(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec([{"name": "a", "actions": ["svc.a"], "objects": [bad]}])


def test_unknown_keys_and_names_are_refused() -> None:
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        spec([{"name": "a", "actions": ["svc.a"], "typo": 1}])
    with pytest.raises(ValueError, match="step name 'Bad Name'"):
        spec([{"name": "Bad Name", "actions": ["svc.a"]}])
    with pytest.raises(ValueError, match="cost.per_call\n  Extra inputs are not permitted"):
        spec(GOOD, cost={"currency": "EUR", "per_call": 1})
    with pytest.raises(ValueError, match="not HTTP statuses"):
        spec([{"name": "a", "actions": ["svc.a"], "complete_when": {"status": [999]}}])


def test_completion_checks() -> None:
    w = spec([{"name": "a", "actions": ["svc.a"], "complete_when": {"status": [201], "json": {"d.Status": "posted"}}},
              {"name": "b", "actions": ["svc.c"]}])
    a, b = w.step("a"), w.step("b")
    assert a.completes(201, {"d": {"Status": "posted"}})
    assert not a.completes(200, {"d": {"Status": "posted"}}) and not a.completes(201, {"d": {"Status": "draft"}})
    assert not a.completes(201, None)
    assert b.completes(204, None) and not b.completes(302, None) and not b.completes(500, {})


# ------------------------------------------------------------------ correlation
def test_ids_are_plain_printable_bounded_values() -> None:
    assert as_id(" PO-1 ") == "PO-1" and as_id(4500000001) == "4500000001" and as_id(Decimal("12")) == "12"
    for bad in (None, True, 1.5, Decimal("1.5"), "", "  ", "a\nb", "x" * 513, ["a"], {"a": 1}):
        assert as_id(bad) is None, bad


def test_values_from_requests_and_answers() -> None:
    w = spec([{"name": "a", "actions": ["svc.a"], "objects": [
        {"type": "Ref", "from": "field", "name": "refs"}, {"type": "B", "from": "param", "name": "id"},
        {"type": "New", "from": "response", "path": "d.items[1].id"},
        {"type": "Loc", "from": "header", "name": "Location", "pattern": r"\('(\d+)'\)$"}]}])
    step = w.step("a")
    assert request_objects(step, {"id": "7"}, {"refs": ["r1", "r2", "r1", True]}, {}) == [
        ("Ref", "r1"), ("Ref", "r2"), ("B", "7")]
    body = {"d": {"items": [{"id": 1}, {"id": 42}]}}
    assert response_objects(step, body, {"location": "/A_PurchaseOrder('4500000001')"}) == [
        ("New", "42"), ("Loc", "4500000001")]
    assert response_objects(step, {"d": {}}, {"location": "/elsewhere"}) == []
    assert json_value({"a": [1, {"b": 2}]}, "a[1].b") == 2 and json_value({"a": 1}, "a.b") is None


def test_fallbacks() -> None:
    assert baggage_value("k1=v1, proctor.workflow=PO%2042;prop=1", "proctor.workflow") == "PO 42"
    assert baggage_value("other=1", "proctor.workflow") is None and baggage_value(None, "k") is None
    assert trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    assert trace_id("garbage") is None


# ------------------------------------------------------------------ the stages
def _exchange(action: str, params: dict | None = None) -> Exchange:
    req = AgentRequest(method="POST", scheme="http", host="svc.example.com", port=80, path="/b/1", query="",
                       headers={}, body=b"", client_ip="127.0.0.1", mode="forward")
    ex = Exchange(req)
    ex.identity = AgentIdentity("me", "https://idp", {}, None)
    ex.classification = Classification("svc", action, "B", "1", params=params or {})
    return ex


class DownStore:
    def __init__(self) -> None:
        self.calls = 0

    async def workflow_instance_for(self, *a: Any) -> Any:
        self.calls += 1
        raise StoreError("state store: workflow_instance_for failed: connection refused")


def test_store_down_fails_closed_on_workflow_routes_only() -> None:
    store = DownStore()
    chain = Chain([WorkflowCheck(store, Workflows((spec(GOOD),)))], error_refusals=[store_unavailable])
    ex = _exchange("svc.b", {"id": "1"})
    asyncio.run(chain.request(ex))
    assert ex.refusal is not None and ex.refusal.status == 503 and not ex.allowed
    plain = _exchange("svc.c")
    asyncio.run(chain.request(plain))
    assert plain.allowed and store.calls == 1 and STATE not in plain.stage_data


def test_context_and_refusal_for_a_step_with_no_instance() -> None:
    class Empty:
        async def workflow_instance_for(self, *a: Any) -> Any:
            return None

    w = spec(GOOD)
    ex = _exchange("svc.b", {"id": "404"})
    asyncio.run(Chain([WorkflowCheck(Empty(), Workflows((w,)))]).request(ex))
    ctx = ex.stage_data[CONTEXT_EXTRA]["workflow"]
    expected = {"name": "w", "instance": "", "step": "b", "known": False, "completed": [], "ready": False,
                "missing": ["a"], "next": ["a"], "started_at": 0, "attempts": 0, "failures": 0}
    assert {k: ctx[k] for k in expected} == expected
    assert "Proctor-Workflow" not in ex.plan.response_headers  # (no instance to name)
    refusal = order_refusal(ex.stage_data[STATE], "svc.b", ["workflow-step-out-of-order"])
    assert refusal.status == 409 and refusal.kind == "step-precondition"
    assert "requires a first" in refusal.detail and "a (svc.a)" in refusal.detail and "no instance yet" in refusal.detail
    # a starting step is ready and names the instance it will create
    start = _exchange("svc.a")
    asyncio.run(Chain([WorkflowCheck(Empty(), Workflows((w,)))]).request(start))
    sctx = start.stage_data[CONTEXT_EXTRA]["workflow"]
    assert sctx["ready"] and sctx["instance"].startswith("wfi_")
    assert start.plan.response_headers["Proctor-Workflow"] == f"w; instance={sctx['instance']}; step=a"
    assert start.plan.read_response_body > 0  # (the new object comes from the answer)


def test_next_steps_and_context_shape() -> None:
    w = spec([{"name": "a", "actions": ["svc.a"]},
              {"name": "b", "actions": ["svc.b"], "requires": ["a"], "objects": [{"type": "A", "from": "param", "name": "id"}]},
              {"name": "c", "actions": ["svc.c"], "requires": ["a"], "optional": True,
               "objects": [{"type": "A", "from": "param", "name": "id"}]}])
    assert next_steps(w, []) == ["a"] and next_steps(w, ["a"]) == ["b", "c"] and next_steps(w, ["a", "b", "c"]) == []
    assert w.required_steps == ["a", "b"]
    assert callable(workflow_context)
