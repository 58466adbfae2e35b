"""The process-mining export, pure and from the store (proxy/workflows/export.py; docs/workflows.md,
"Process-mining export").

- hand-built instances, events and objects give exactly the OCEL 2.0 log and the CSV log
  described in the docs;
- every log is valid against the OCEL 2.0 JSON schema shipped in tests/data/ocel2/ and passes
  `ocel_problems`, the rules the specification states in prose (unique ids, relationships to
  objects of the log, declared types and attributes, times with a zone);
- text from outside (agent ids, object ids) survives JSON and CSV quoting exactly, and never
  reaches a spreadsheet as a formula;
- read from a real store (SQLite, and PostgreSQL when PROCTOR_TEST_POSTGRES_DSN is set) page by
  page, the log equals the one built from lists, and the window is [since, until).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from proxy.store import Store
from proxy.store.workflows import Instance, StepEvent, WorkflowObject, new_instance_id
from proxy.workflows import export as ex
from proxy.workflows.export import (
    CSV_COLUMNS,
    EVENT_ATTRIBUTES,
    OcelBuilder,
    csv_chunks,
    csv_row,
    csv_text,
    ocel_chunks,
    ocel_document,
    parse_when,
)
from proxy.workflows.spec import WorkflowSpec
from test_store import MakeStore, make_store, run  # noqa: F401 - the fixture is used by name

SCHEMA = json.loads((Path(__file__).parent / "data" / "ocel2" / "ocel20-schema-json.json").read_text())
OCEL_TYPES = {"string", "time", "integer", "float", "boolean"}

SPEC = WorkflowSpec.model_validate({
    "name": "orders", "cost": {"currency": "EUR"},
    "steps": [
        {"name": "request", "actions": ["flow.request.create"],
         "objects": [{"type": "Request", "from": "response", "path": "n"}]},
        {"name": "quote", "actions": ["flow.quote.create"], "requires": ["request"],
         "objects": [{"type": "Request", "from": "param", "name": "req"},
                     {"type": "Quote", "from": "header", "name": "Location", "pattern": "^/q/(\\d+)$"}]},
        {"name": "order", "actions": ["flow.order.create"], "requires": ["quote"],
         "objects": [{"type": "Quote", "from": "param", "name": "quote"},
                     {"type": "Order", "from": "response", "path": "n"}]},
    ],
})
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def ev(seq: int, step: str, outcome: str = "completed", t: float = 0.0, instance: str = "wfi_A", agent: str = "alice",
       objects: tuple[tuple[str, str], ...] = (), **kw: Any) -> StepEvent:
    status = {"completed": 201, "failed": 500, "refused": None}[outcome]
    return StepEvent(seq=seq, instance_id=instance, workflow="orders", step=step, action=f"flow.{step}.create",
                     agent=agent, decision_id=f"dec-{seq}", outcome=outcome, status=kw.pop("status", status),
                     time=T0 + t, duration_ms=kw.pop("duration_ms", 12.5), objects=objects, **kw)


def attrs(pairs: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in pairs.items()]


def ev_attrs(step: str, outcome: str, seq: int, agent: str = "alice", status: str | None = "201",
             cost: str = "0", **more: str) -> list[dict[str, str]]:
    values = {"workflow": "orders", "step": step, "action": f"flow.{step}.create", "outcome": outcome,
              "agent": agent, "decision_id": f"dec-{seq}", "status": status, "duration_ms": "12.5",
              "approval_wait_ms": more.pop("approval_wait_ms", None), "human": more.pop("human", "false"),
              "cost": cost, "currency": "EUR"}
    return attrs({n: values[n] for n, _ in EVENT_ATTRIBUTES if values[n] is not None})


def rel(object_id: str, qualifier: str) -> dict[str, str]:
    return {"objectId": object_id, "qualifier": qualifier}


def ocel_problems(doc: dict[str, Any]) -> list[str]:
    """What the OCEL 2.0 specification requires beyond the JSON schema's structure."""
    problems: list[str] = []
    declared: dict[str, dict[str, dict[str, str]]] = {}
    for section in ("objectTypes", "eventTypes"):
        names = [t["name"] for t in doc[section]]
        if len(names) != len(set(names)):
            problems.append(f"{section}: a type declared twice")
        for t in doc[section]:
            types = {a["name"]: a["type"] for a in t["attributes"]}
            if len(types) != len(t["attributes"]):
                problems.append(f"{t['name']}: an attribute declared twice")
            problems += [f"{t['name']}.{n}: type {v!r}" for n, v in types.items() if v not in OCEL_TYPES]
            declared[section + ":" + t["name"]] = {"attrs": types}  # type: ignore[dict-item]

    def when(text: str, where: str) -> None:
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", text):
            problems.append(f"{where}: time {text!r} is not RFC 3339 with a zone")
        else:
            datetime.fromisoformat(text)

    def value(v: str, kind: str, where: str) -> None:
        try:
            {"integer": int, "float": float, "time": datetime.fromisoformat, "string": str,
             "boolean": lambda x: {"true": 1, "false": 0}[x]}[kind](v)
        except (ValueError, KeyError):
            problems.append(f"{where}: {v!r} is not a {kind}")

    ids = [o["id"] for o in doc["objects"]]
    if len(ids) != len(set(ids)):
        problems.append("objects: an id used twice")
    known = set(ids)
    for o in doc["objects"]:
        d = declared.get("objectTypes:" + o["type"])
        if d is None:
            problems.append(f"object {o['id']}: type {o['type']!r} not declared")
            continue
        for a in o["attributes"]:
            when(a["time"], f"object {o['id']}")
            if a["name"] not in d["attrs"]:
                problems.append(f"object {o['id']}: attribute {a['name']!r} not declared")
            else:
                value(a["value"], d["attrs"][a["name"]], f"object {o['id']}.{a['name']}")  # type: ignore[index]
        problems += [f"object {o['id']}: relationship to unknown {r['objectId']!r}"
                     for r in o["relationships"] if r["objectId"] not in known]
    event_ids = [e["id"] for e in doc["events"]]
    if len(event_ids) != len(set(event_ids)):
        problems.append("events: an id used twice")
    for e in doc["events"]:
        when(e["time"], f"event {e['id']}")
        d = declared.get("eventTypes:" + e["type"])
        if d is None:
            problems.append(f"event {e['id']}: type {e['type']!r} not declared")
            continue
        for a in e["attributes"]:
            if a["name"] not in d["attrs"]:
                problems.append(f"event {e['id']}: attribute {a['name']!r} not declared")
            else:
                value(a["value"], d["attrs"][a["name"]], f"event {e['id']}.{a['name']}")  # type: ignore[index]
        problems += [f"event {e['id']}: relationship to unknown {r['objectId']!r}"
                     for r in e["relationships"] if r["objectId"] not in known]
    return problems


def assert_valid(doc: dict[str, Any]) -> None:
    checker = jsonschema.FormatChecker()
    assert not checker.conforms("2026-01-01T00:00:00", "date-time"), "date-time is not checked (rfc3339-validator)"
    jsonschema.Draft7Validator(SCHEMA, format_checker=checker).validate(doc)
    assert ocel_problems(doc) == []


# --------------------------------------------------------------------------- the OCEL 2.0 log, exactly
def story() -> tuple[list[StepEvent], list[Instance], list[WorkflowObject]]:
    """Instance A: request (creates R1), quote fails once then completes (creates Q7), order refused before
    the quote (a known instance); instance B: a request by bob, running."""
    events = [
        ev(1, "request", t=0, objects=(("Request", "R1"),)),
        ev(2, "quote", "failed", t=10, objects=(("Request", "R1"),)),
        ev(3, "order", "refused", t=15, objects=(("Quote", "Q0"),)),
        ev(4, "quote", t=20, agent="bob", objects=(("Request", "R1"), ("Quote", "Q7")), cost=Decimal("0.50"),
           approval_wait_ms=1500.0, human=True),
        ev(5, "request", t=30, instance="wfi_B", agent="bob", objects=(("Request", "R2"),)),
    ]
    instances = [
        Instance(id="wfi_A", workflow="orders", state="completed", started_at=T0, updated_at=T0 + 20,
                 completed_at=T0 + 20, cost=Decimal("0.50")),
        Instance(id="wfi_B", workflow="orders", state="running", started_at=T0 + 30, updated_at=T0 + 30),
    ]
    objects = [
        WorkflowObject("orders", "Request", "R1", "wfi_A", "request", T0),
        WorkflowObject("orders", "Quote", "Q7", "wfi_A", "quote", T0 + 20),
        WorkflowObject("orders", "Request", "R2", "wfi_B", "request", T0 + 30),
    ]
    return events, instances, objects


def test_ocel_log_exactly() -> None:
    events, instances, objects = story()
    doc = ocel_document(events, instances, objects, [SPEC])
    assert_valid(doc)
    key = [{"name": "key", "type": "string"}]
    assert doc["objectTypes"] == [
        {"name": "WorkflowInstance", "attributes": [{"name": "workflow", "type": "string"},
                                                    {"name": "state", "type": "string"},
                                                    {"name": "cost", "type": "float"},
                                                    {"name": "currency", "type": "string"}]},
        {"name": "Quote", "attributes": key}, {"name": "Request", "attributes": key}, {"name": "Agent", "attributes": key},
    ]
    declared = [{"name": n, "type": t} for n, t in EVENT_ATTRIBUTES]
    assert doc["eventTypes"] == [{"name": n, "attributes": declared}
                                 for n in ("order refused", "quote", "quote failed", "request")]
    static = "1970-01-01T00:00:00Z"

    def obj(oid: str, otype: str, key: str, *rels: dict[str, str]) -> dict[str, Any]:
        return {"id": oid, "type": otype, "attributes": [{"name": "key", "value": key, "time": static}],
                "relationships": list(rels)}

    assert doc["objects"] == [
        {"id": "wfi_A", "type": "WorkflowInstance", "relationships": [], "attributes": [
            {"name": "workflow", "value": "orders", "time": static},
            {"name": "currency", "value": "EUR", "time": static},
            {"name": "state", "value": "running", "time": "2026-01-01T00:00:00.000Z"},
            {"name": "state", "value": "completed", "time": "2026-01-01T00:00:20.000Z"},
            {"name": "cost", "value": "0.50", "time": "2026-01-01T00:00:20.000Z"}]},
        {"id": "wfi_B", "type": "WorkflowInstance", "relationships": [], "attributes": [
            {"name": "workflow", "value": "orders", "time": static},
            {"name": "currency", "value": "EUR", "time": static},
            {"name": "state", "value": "running", "time": "2026-01-01T00:00:30.000Z"},
            {"name": "cost", "value": "0", "time": "2026-01-01T00:00:30.000Z"}]},
        obj("Agent:alice", "Agent", "alice"),
        obj("Agent:bob", "Agent", "bob"),
        obj("Quote:Q0", "Quote", "Q0"),  # named by the refused call only: in no instance
        obj("Quote:Q7", "Quote", "Q7", rel("wfi_A", "part-of")),
        obj("Request:R1", "Request", "R1", rel("wfi_A", "part-of")),
        obj("Request:R2", "Request", "R2", rel("wfi_B", "part-of")),
    ]
    assert doc["events"] == [
        {"id": "ev-1", "type": "request", "time": "2026-01-01T00:00:00.000Z",
         "attributes": ev_attrs("request", "completed", 1),
         "relationships": [rel("wfi_A", "instance"), rel("Request:R1", "creates"), rel("Agent:alice", "performed-by")]},
        {"id": "ev-2", "type": "quote failed", "time": "2026-01-01T00:00:10.000Z",
         "attributes": ev_attrs("quote", "failed", 2, status="500"),
         "relationships": [rel("wfi_A", "instance"), rel("Request:R1", "names"), rel("Agent:alice", "performed-by")]},
        {"id": "ev-3", "type": "order refused", "time": "2026-01-01T00:00:15.000Z",
         "attributes": ev_attrs("order", "refused", 3, status=None),
         "relationships": [rel("wfi_A", "instance"), rel("Quote:Q0", "names"), rel("Agent:alice", "performed-by")]},
        {"id": "ev-4", "type": "quote", "time": "2026-01-01T00:00:20.000Z",
         "attributes": ev_attrs("quote", "completed", 4, agent="bob", cost="0.50", approval_wait_ms="1500.0",
                                human="true"),
         "relationships": [rel("wfi_A", "instance"), rel("Request:R1", "names"), rel("Quote:Q7", "creates"),
                           rel("Agent:bob", "performed-by")]},
        {"id": "ev-5", "type": "request", "time": "2026-01-01T00:00:30.000Z",
         "attributes": ev_attrs("request", "completed", 5, agent="bob"),
         "relationships": [rel("wfi_B", "instance"), rel("Request:R2", "creates"), rel("Agent:bob", "performed-by")]},
    ]


def test_creates_only_for_the_answer_objects_the_call_linked() -> None:
    start = WorkflowSpec.model_validate({
        "name": "orders", "steps": [
            # a start step naming an existing customer (request side) and creating a case (answer)
            {"name": "request", "actions": ["flow.request.create"],
             "objects": [{"type": "Customer", "from": "param", "name": "c"}, {"type": "Case", "from": "response",
                                                                               "path": "n"}]},
            {"name": "quote", "actions": ["flow.quote.create"], "requires": ["request"],
             "objects": [{"type": "Case", "from": "param", "name": "case"},
                         {"type": "Case", "from": "response", "path": "copy"}]}]})
    events = [ev(1, "request", objects=(("Customer", "C1"), ("Case", "K1"))),
              # a second request call returning a case another instance already has: it names it
              ev(2, "request", t=5, instance="wfi_B", objects=(("Customer", "C1"), ("Case", "K1"))),
              # a type on both sides of the step: only named
              ev(3, "quote", t=9, objects=(("Case", "K1"), ("Case", "K2")))]
    objects = [WorkflowObject("orders", "Customer", "C1", "wfi_A", "request", T0),
               WorkflowObject("orders", "Case", "K1", "wfi_A", "request", T0),
               WorkflowObject("orders", "Case", "K2", "wfi_A", "quote", T0 + 9)]
    doc = ocel_document(events, [], objects, [start])
    assert_valid(doc)
    quals = {e["id"]: [(r["objectId"], r["qualifier"]) for r in e["relationships"][1:-1]] for e in doc["events"]}
    assert quals == {"ev-1": [("Customer:C1", "names"), ("Case:K1", "creates")],
                     "ev-2": [("Customer:C1", "names"), ("Case:K1", "names")],
                     "ev-3": [("Case:K1", "names"), ("Case:K2", "names")]}
    # without the definition (a workflow no longer loaded) nothing is said to be created
    plain = ocel_document(events, [], objects, [])
    assert {r["qualifier"] for e in plain["events"] for r in e["relationships"][1:-1]} == {"names"}
    # an instance the store no longer has is still an object (its workflow only)
    assert [o for o in plain["objects"] if o["type"] == "WorkflowInstance"][1] == {
        "id": "wfi_B", "type": "WorkflowInstance", "relationships": [],
        "attributes": [{"name": "workflow", "value": "orders", "time": "1970-01-01T00:00:00Z"}]}


def test_text_from_outside_survives_json_exactly() -> None:
    nasty = 'r"o\\b,\n</script>\u2028é🙂=1+1'
    events = [ev(1, "request", agent=nasty, objects=(("Request", nasty),)),
              ev(2, "quote", t=1, agent="", objects=(("Request", nasty), ("Quote", "a:b")))]
    doc = ocel_document(events, [], [WorkflowObject("orders", "Request", nasty, "wfi_A", "request", T0)], [SPEC])
    assert_valid(doc)
    ids = {o["id"] for o in doc["objects"]}
    assert {f"Agent:{nasty}", f"Request:{nasty}", "Quote:a:b"} <= ids
    assert [r["objectId"] for r in doc["events"][0]["relationships"]] == ["wfi_A", f"Request:{nasty}", f"Agent:{nasty}"]
    # no agent (an empty id): no performed-by link, no Agent object for it
    assert [r["qualifier"] for r in doc["events"][1]["relationships"]] == ["instance", "names", "names"]
    assert "Agent:" not in ids


def test_empty_log_is_valid() -> None:
    doc = ocel_document([], [], [], [SPEC])
    assert_valid(doc)
    assert doc == {"objectTypes": [doc["objectTypes"][0], {"name": "Agent", "attributes": [{"name": "key",
                                                                                            "type": "string"}]}],
                   "eventTypes": [], "objects": [], "events": []}


def test_builder_writes_in_pieces_and_leaves_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ex, "CHUNK_CHARS", 200)
    events, instances, objects = story()
    b = OcelBuilder([SPEC])
    path = Path(b._path)
    for e in events:
        b.add_event(e)
    for iid in b.pending_instances():
        b.add_instance(iid, next(i for i in instances if i.id == iid), [o for o in objects if o.instance_id == iid])
    assert b.pending_instances() == []
    pieces = list(b.chunks())
    b.close()
    assert len(pieces) > 5 and not path.exists()
    assert json.loads("".join(pieces)) == ocel_document(events, instances, objects, [SPEC])
    with pytest.raises(ValueError, match="sequence"):
        with OcelBuilder() as b2:
            b2.add_event(StepEvent("wfi_A", "orders", "request", "a", "x", "d", "completed", 201, T0, 1.0))
    assert not Path(b2._path).exists()


# --------------------------------------------------------------------------- the CSV log
def test_csv_log_exactly() -> None:
    events, _, _ = story()
    text = csv_text(events, [SPEC])
    assert text.splitlines()[0] == ",".join(CSV_COLUMNS)
    assert text.split("\r\n")[1:] == [
        'wfi_A,request,2026-01-01T00:00:00.000Z,alice,orders,request,flow.request.create,completed,201,12.5,,false,0,'
        'EUR,dec-1,"[""Request:R1""]",ev-1',
        'wfi_A,quote failed,2026-01-01T00:00:10.000Z,alice,orders,quote,flow.quote.create,failed,500,12.5,,false,0,'
        'EUR,dec-2,"[""Request:R1""]",ev-2',
        'wfi_A,order refused,2026-01-01T00:00:15.000Z,alice,orders,order,flow.order.create,refused,,12.5,,false,0,'
        'EUR,dec-3,"[""Quote:Q0""]",ev-3',
        'wfi_A,quote,2026-01-01T00:00:20.000Z,bob,orders,quote,flow.quote.create,completed,201,12.5,1500.0,true,0.50,'
        'EUR,dec-4,"[""Request:R1"", ""Quote:Q7""]",ev-4',
        'wfi_B,request,2026-01-01T00:00:30.000Z,bob,orders,request,flow.request.create,completed,201,12.5,,false,0,'
        'EUR,dec-5,"[""Request:R2""]",ev-5',
        "",
    ]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [(r["case_id"], r["activity"], r["resource"]) for r in rows] == [
        ("wfi_A", "request", "alice"), ("wfi_A", "quote failed", "alice"), ("wfi_A", "order refused", "alice"),
        ("wfi_A", "quote", "bob"), ("wfi_B", "request", "bob")]
    assert json.loads(rows[3]["objects"]) == ["Request:R1", "Quote:Q7"]


@pytest.mark.parametrize("agent", ["=HYPERLINK(\"http://evil\",\"x\")", "+1", "-2+3", "@SUM(A1)", "\tcmd", "\rcmd"])
def test_csv_cells_never_start_a_formula(agent: str) -> None:
    """CSV injection: an agent id (from a token) that a spreadsheet would run is shown as text."""
    rows = list(csv.reader(io.StringIO(csv_text([ev(1, "request", agent=agent)]), newline=""), strict=True))
    row = rows[1]
    assert row[3] == "'" + agent
    assert all(not cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row)


def test_csv_quotes_commas_newlines_and_unicode() -> None:
    nasty = 'a,b "c"\nd\r\né🙂'
    text = csv_text([ev(1, "request", agent=nasty, objects=(("Request", nasty),))])
    rows = list(csv.reader(io.StringIO(text, newline=""), strict=True))
    assert len(rows) == 2 and len(rows[1]) == len(CSV_COLUMNS)
    assert rows[1][3] == nasty and json.loads(rows[1][15]) == [f"Request:{nasty}"]
    assert csv_row(ev(1, "request", agent=nasty))[3] == nasty


# --------------------------------------------------------------------------- times
def test_parse_when() -> None:
    assert parse_when("2026-01-01T00:00:00Z") == T0 == parse_when("2026-01-01T01:00:00+01:00")
    assert parse_when("2026-01-01T00:00:00") == T0  # no offset: UTC
    assert parse_when(str(int(T0))) == T0 and parse_when("1767225600.5") == T0 + 0.5
    assert parse_when("7d", now=T0) == T0 - 7 * 86400 and parse_when("30m", now=T0) == T0 - 1800
    for bad in ("", "yesterday", "1e9", "-5", "2026-13-01T00:00:00Z", "99999-01-01T00:00:00Z", "9" * 13,
                "999999999d", "2026-01-01T00:00:00Zjunk"):
        with pytest.raises(ValueError):
            parse_when(bad, now=T0)


# --------------------------------------------------------------------------- from the store
def test_from_the_store_page_by_page_equals_the_lists(make_store: MakeStore) -> None:  # noqa: F811
    """The store-level read on both backends: events in pages of 2, the window [since, until)."""

    async def body(s: Store) -> None:
        a, b = new_instance_id(), new_instance_id()
        calls = [  # (instance, create, event, links)
            (a, True, ev(0, "request", t=0, instance=a, objects=(("Request", "R1"),)), [("Request", "R1")]),
            (a, False, ev(0, "quote", "failed", t=10, instance=a, objects=(("Request", "R1"),)), []),
            (a, False, ev(0, "quote", t=20, instance=a, agent="bob", cost=Decimal("0.5"),
                          objects=(("Request", "R1"), ("Quote", "Q7"))), [("Request", "R1"), ("Quote", "Q7")]),
            (b, True, ev(0, "request", t=30, instance=b, agent="carol", objects=(("Request", "R2"),)),
             [("Request", "R2")]),
            (a, False, ev(0, "order", t=40, instance=a, objects=(("Quote", "Q7"), ("Order", "O9"))),
             [("Quote", "Q7"), ("Order", "O9")]),
        ]
        for _, create, e, links in calls:
            unseq = StepEvent(**{**e.__dict__, "seq": None})
            await s.record_workflow_event(unseq, required=["request", "quote", "order"], links=links, create=create)
        events = await s.workflow_events()
        instances = [i for i in (await s.workflow_instance(a), await s.workflow_instance(b)) if i is not None]
        objects = await s.workflow_objects()

        async def collect(chunks: Any) -> str:
            return "".join([c async for c in chunks])

        full = json.loads(await collect(ocel_chunks(s, [SPEC], page=2)))
        assert full == ocel_document(events, instances, objects, [SPEC])
        assert_valid(full)
        assert [e["type"] for e in full["events"]] == ["request", "quote failed", "quote", "request", "order"]
        order = full["events"][-1]
        assert order["relationships"] == [rel(a, "instance"), rel("Quote:Q7", "names"), rel("Order:O9", "creates"),
                                          rel("Agent:alice", "performed-by")]
        assert {o["id"]: o["relationships"] for o in full["objects"] if ":" in o["id"] and "Agent" not in o["id"]} == {
            "Order:O9": [rel(a, "part-of")], "Quote:Q7": [rel(a, "part-of")], "Request:R1": [rel(a, "part-of")],
            "Request:R2": [rel(b, "part-of")]}
        # the window: [T0 + 10, T0 + 30): the failed and the completed quote; both instances' objects? only a's
        window = json.loads(await collect(ocel_chunks(s, [SPEC], since=T0 + 10, until=T0 + 30, page=2)))
        assert_valid(window)
        assert [e["id"] for e in window["events"]] == [full["events"][1]["id"], full["events"][2]["id"]]
        assert [o["id"] for o in window["objects"] if o["type"] == "WorkflowInstance"] == [a]
        # the instance's objects come along, linked before or after the window (Order:O9 at T0 + 40)
        assert {"Request:R1", "Quote:Q7", "Order:O9"} <= {o["id"] for o in window["objects"]}
        assert "Request:R2" not in {o["id"] for o in window["objects"]}
        # a workflow nothing is recorded for: an empty, valid log
        empty = json.loads(await collect(ocel_chunks(s, [SPEC], workflow="other")))
        assert_valid(empty)
        assert empty["events"] == empty["objects"] == []
        # CSV, read the same way
        text = await collect(csv_chunks(s, [SPEC], since=T0 + 10, until=T0 + 30, page=2))
        assert text == csv_text([e for e in events if T0 + 10 <= e.time < T0 + 30], [SPEC])
        assert await collect(csv_chunks(s, [SPEC], page=1)) == csv_text(events, [SPEC])

    run(make_store, body)


def test_a_closed_export_leaves_no_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that goes away midway: the generator is closed, its temporary file removed."""
    from proxy.store import open_store

    monkeypatch.setattr(ex.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(ex, "CHUNK_CHARS", 50)

    async def main() -> None:
        s = open_store(f"sqlite://{tmp_path / 'state.db'}")
        await s.open()
        try:
            i = new_instance_id()
            await s.record_workflow_event(StepEvent(**{**ev(0, "request", instance=i).__dict__, "seq": None}),
                                          required=["request"], links=[], create=True)
            gen = ocel_chunks(s, [SPEC])
            await gen.__anext__()
            assert list(tmp_path.glob("proctor-export-*"))
            await gen.aclose()
            assert not list(tmp_path.glob("proctor-export-*"))
        finally:
            await s.close()

    asyncio.run(main())
