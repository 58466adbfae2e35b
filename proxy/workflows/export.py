"""Process-mining export of the workflow history: an OCEL 2.0 JSON log and a flat CSV event log
(docs/workflows.md, "Process-mining export").

OCEL 2.0 (object-centric event log, https://www.ocel-standard.org) is what object-centric
process-mining tools read (pm4py, Ocelescope, OCPA, Celonis' OCPM). The log is modelled so:

- **events**: one per step event in the store (a forwarded call that completed or failed its
  step, or a call refused as out of order), id `ev-<store sequence>`, at the call's decision
  time. The event type (activity) is the step for a completed call, `<step> failed` and
  `<step> refused` otherwise, so a miner sees rework and refusals as their own activities.
  Every event type declares the same attributes (EVENT_ATTRIBUTES); an attribute with no
  value (no upstream status, no approval wait) is left out of that event.
- **objects**: every business object the exported events name or their instances link
  (`<Type>:<id>`, e.g. `PurchaseOrder:4500000123`, attribute `key` = the id), each workflow
  instance (`wfi_...`, type `WorkflowInstance`: workflow, state over time, cost, currency) and
  each agent (`Agent:<id>`, type `Agent`, attribute `key`): in OCEL the resource is an object.
- **event -> object** (qualified): `instance` (the instance the call belongs to), `performed-by`
  (the agent), `creates` (a business object the call's answer returned and this call linked to
  its instance: a response-side object of the step's definition) and `names` (every other
  business object the call named).
- **object -> object**: a business object `part-of` each exported instance it is linked to.

Attribute values are written as JSON strings (the published OCEL 2.0 JSON schema types them
as strings) and declared with their OCEL type (string, integer, float, boolean, time), which
says how to read them. Times are ISO 8601 in UTC with milliseconds and `Z`. Object attributes
that never change carry the OCEL convention's time 1970-01-01T00:00:00Z.

The CSV log has one row per step event: `case_id` (the instance), `activity` (as the OCEL
event type), `timestamp`, `resource` (the agent), then the other columns of CSV_COLUMNS. A
text cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is prefixed with
`'` so a spreadsheet opening the file never runs it as a formula (agent and object ids come
from outside).

Pure: `OcelBuilder` takes events and instances in and gives the document out in pieces;
`ocel_document` / `csv_text` run it over lists (the unit tests). `ocel_chunks` / `csv_chunks`
feed it from the store, which is read in pages (events by store sequence, EVENT_PAGE at a
time; instances one by one), and spool what the document needs to a temporary SQLite file, so
memory stays bounded whatever the size of the history.

Window: events with `since <= time < until` (epoch seconds, either bound optional). Objects
are exported as they are now (an instance's state and cost are its current ones).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from ..record.model import iso
from ..store.workflows import Instance, StepEvent, WorkflowObject
from .spec import WorkflowSpec

FORMATS = ("ocel2", "csv")
INSTANCE_TYPE = "WorkflowInstance"
AGENT_TYPE = "Agent"
STATIC_TIME = "1970-01-01T00:00:00Z"  # OCEL: the time of a value that was always there
EVENT_PAGE = 1000
INSTANCE_BATCH = 500
CHUNK_CHARS = 64 * 1024

# (name, OCEL attribute type) of every event type, in the order written
EVENT_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("workflow", "string"), ("step", "string"), ("action", "string"), ("outcome", "string"),
    ("agent", "string"), ("decision_id", "string"), ("status", "integer"), ("duration_ms", "float"),
    ("approval_wait_ms", "float"), ("human", "boolean"), ("cost", "float"), ("currency", "string"),
)
INSTANCE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("workflow", "string"), ("state", "string"), ("cost", "float"), ("currency", "string"))
KEY_ATTRIBUTES: tuple[tuple[str, str], ...] = (("key", "string"),)

CSV_COLUMNS: tuple[str, ...] = (
    "case_id", "activity", "timestamp", "resource", "workflow", "step", "action", "outcome", "status",
    "duration_ms", "approval_wait_ms", "human", "cost", "currency", "decision_id", "objects", "event_id",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_RELATIVE = re.compile(r"(\d{1,9})([smhd])")
_EPOCH = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
_LATEST = 253402300799.0  # 9999-12-31T23:59:59Z
_BAD_TIME = "must be an ISO 8601 time (e.g. 2026-11-21T10:00:00Z), epoch seconds, or a span back from now (30m, 24h, 7d)"


# ----------------------------------------------------------------------------- names and values
def event_type(step: str, outcome: str) -> str:
    """The OCEL event type (the CSV activity): `quote`, `quote failed`, `quote refused`."""
    return step if outcome == "completed" else f"{step} {outcome}"


def event_id(e: StepEvent) -> str:
    return f"ev-{e.seq}"


def object_id(object_type: str, key: str) -> str:
    """A business object's OCEL id. Types are identifiers (no `:`), so the id is unambiguous."""
    return f"{object_type}:{key}"


def agent_id(agent: str) -> str:
    return f"{AGENT_TYPE}:{agent}"


def _num(x: float) -> str:
    return repr(round(float(x), 3))


def _dec(d: Decimal) -> str:
    return format(d, "f")


def parse_when(text: str, now: float | None = None) -> float:
    """Epoch seconds from an ISO 8601 time (`2026-11-21T10:00:00Z`, an offset, or none: UTC),
    epoch seconds (`1765000000`), or a span back from now (`30m`, `24h`, `7d`). ValueError otherwise
    (as the KPIs' window reads times, plus the spans)."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if m:
        now = time.time() if now is None else now
        t = now - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    elif _EPOCH.fullmatch(text):
        t = float(text)
    else:
        if not 10 <= len(text) <= 40:
            raise ValueError(_BAD_TIME)
        try:
            dt = datetime.fromisoformat(text)
            t = (dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ValueError(_BAD_TIME) from None
    if not 0 <= t <= _LATEST:
        raise ValueError("is out of range (1970 to 9999)")
    return t


def _creates(specs: Iterable[WorkflowSpec]) -> dict[tuple[str, str], frozenset[str]]:
    """(workflow, step) -> object types only the step's answer names (a call of the step creates them)."""
    out: dict[tuple[str, str], frozenset[str]] = {}
    for w in specs:
        for s in w.steps:
            request = {o.type for o in s.request_objects}
            out[(w.name, s.name)] = frozenset(o.type for o in s.response_objects if o.type not in request)
    return out


# ----------------------------------------------------------------------------- OCEL 2.0
def _event_doc(e: StepEvent, currency: str, relationships: list[dict[str, str]]) -> dict[str, Any]:
    values: dict[str, str | None] = {
        "workflow": e.workflow, "step": e.step, "action": e.action, "outcome": e.outcome, "agent": e.agent,
        "decision_id": e.decision_id, "status": None if e.status is None else str(int(e.status)),
        "duration_ms": _num(e.duration_ms),
        "approval_wait_ms": None if e.approval_wait_ms is None else _num(e.approval_wait_ms),
        "human": "true" if e.human else "false", "cost": _dec(e.cost), "currency": currency,
    }
    return {
        "id": event_id(e), "type": event_type(e.step, e.outcome), "time": iso(e.time),
        "attributes": [{"name": n, "value": values[n]} for n, _ in EVENT_ATTRIBUTES if values[n] is not None],
        "relationships": relationships,
    }


def _instance_doc(instance_id: str, workflow: str, inst: Instance | None, currency: str) -> dict[str, Any]:
    attrs: list[dict[str, str]] = [{"name": "workflow", "value": workflow, "time": STATIC_TIME}]
    if currency:
        attrs.append({"name": "currency", "value": currency, "time": STATIC_TIME})
    if inst is not None:
        attrs.append({"name": "state", "value": "running", "time": iso(inst.started_at)})
        if inst.completed_at is not None:
            attrs.append({"name": "state", "value": "completed", "time": iso(inst.completed_at)})
        attrs.append({"name": "cost", "value": _dec(inst.cost), "time": iso(inst.updated_at)})
    return {"id": instance_id, "type": INSTANCE_TYPE, "attributes": attrs, "relationships": []}


def _types_doc(declared: Sequence[tuple[str, Sequence[tuple[str, str]]]]) -> list[dict[str, Any]]:
    return [{"name": name, "attributes": [{"name": n, "type": t} for n, t in attrs]} for name, attrs in declared]


_SPOOL_SCHEMA = (
    "CREATE TABLE ev (seq INTEGER PRIMARY KEY, doc TEXT NOT NULL)",
    "CREATE TABLE etype (name TEXT PRIMARY KEY)",
    # kind: 1 a business object, 2 an agent
    "CREATE TABLE obj (oid TEXT PRIMARY KEY, kind INTEGER NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL)",
    "CREATE TABLE inst (id TEXT PRIMARY KEY, workflow TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0, doc TEXT)",
    "CREATE TABLE link (workflow TEXT NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL, instance TEXT NOT NULL, "
    "step TEXT NOT NULL, linked_at REAL NOT NULL, PRIMARY KEY (workflow, type, key))",
    "CREATE INDEX link_object ON link (type, key)",
)


class OcelBuilder:
    """Collects events and instances, then writes the OCEL 2.0 JSON document in pieces.

    What it needs to keep is spooled to a temporary SQLite file (removed by `close`), so the
    memory it takes does not grow with the log. Use: `add_event` for every event, then
    `add_instance` for every id `pending_instances` gives, then `chunks()`."""

    def __init__(self, specs: Iterable[WorkflowSpec] = ()) -> None:
        specs = list(specs)
        self._currency = {w.name: w.currency for w in specs}
        self._creates = _creates(specs)
        fd, self._path = tempfile.mkstemp(prefix="proctor-export-", suffix=".db")
        os.close(fd)
        # used by one thread at a time (ocel_chunks hands each step to a worker thread in turn)
        self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("BEGIN")
        for statement in _SPOOL_SCHEMA:
            self._db.execute(statement)

    # -- lifecycle
    def close(self) -> None:
        try:
            self._db.close()
        finally:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "OcelBuilder":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- in
    def add_event(self, e: StepEvent) -> None:
        if e.seq is None:
            raise ValueError("an exported event needs its store sequence")
        doc = {"instance_id": e.instance_id, "workflow": e.workflow, "step": e.step, "action": e.action,
               "agent": e.agent, "decision_id": e.decision_id, "outcome": e.outcome, "status": e.status,
               "time": e.time, "duration_ms": e.duration_ms, "approval_wait_ms": e.approval_wait_ms,
               "human": e.human, "cost": str(e.cost), "objects": [list(o) for o in e.objects]}
        db = self._db
        db.execute("INSERT OR REPLACE INTO ev (seq, doc) VALUES (?, ?)", (int(e.seq), json.dumps(doc)))
        db.execute("INSERT OR IGNORE INTO etype (name) VALUES (?)", (event_type(e.step, e.outcome),))
        db.execute("INSERT OR IGNORE INTO inst (id, workflow) VALUES (?, ?)", (e.instance_id, e.workflow))
        db.executemany("INSERT OR IGNORE INTO obj (oid, kind, type, key) VALUES (?, 1, ?, ?)",
                       [(object_id(t, k), t, k) for t, k in e.objects])
        if e.agent:
            db.execute("INSERT OR IGNORE INTO obj (oid, kind, type, key) VALUES (?, 2, ?, ?)",
                       (agent_id(e.agent), AGENT_TYPE, e.agent))

    def add_events(self, events: Iterable[StepEvent]) -> None:
        for e in events:
            self.add_event(e)

    def pending_instances(self, limit: int = INSTANCE_BATCH) -> list[str]:
        """Instance ids the events name whose instance was not added yet (call until empty)."""
        rows = self._db.execute("SELECT id FROM inst WHERE done = 0 ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in rows]

    def add_instance(self, instance_id: str, inst: Instance | None, objects: Iterable[WorkflowObject]) -> None:
        """The instance as stored (None: not in the store) and the objects linked to it."""
        doc = None
        if inst is not None:
            doc = json.dumps({"started_at": inst.started_at, "completed_at": inst.completed_at,
                              "updated_at": inst.updated_at, "cost": str(inst.cost)})
        db = self._db
        db.execute("INSERT OR IGNORE INTO inst (id, workflow) VALUES (?, ?)",
                   (instance_id, inst.workflow if inst is not None else ""))
        db.execute("UPDATE inst SET done = 1, doc = ? WHERE id = ?", (doc, instance_id))
        for o in objects:
            if o.instance_id != instance_id:
                continue
            db.execute("INSERT OR IGNORE INTO obj (oid, kind, type, key) VALUES (?, 1, ?, ?)",
                       (object_id(o.object_type, o.object_id), o.object_type, o.object_id))
            db.execute("INSERT OR IGNORE INTO link (workflow, type, key, instance, step, linked_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (o.workflow, o.object_type, o.object_id, o.instance_id, o.step, float(o.linked_at)))

    def add_instances(self, found: Iterable[tuple[str, Instance | None, Iterable[WorkflowObject]]]) -> None:
        for instance_id, inst, objects in found:
            self.add_instance(instance_id, inst, objects)

    # -- out
    def _object_types(self) -> list[dict[str, Any]]:
        declared: dict[str, list[tuple[str, str]]] = {INSTANCE_TYPE: list(INSTANCE_ATTRIBUTES)}
        names = [r[0] for r in self._db.execute("SELECT DISTINCT type FROM obj WHERE kind = 1 ORDER BY type")]
        for name in [*names, AGENT_TYPE]:
            attrs = declared.setdefault(name, [])
            attrs += [a for a in KEY_ATTRIBUTES if a not in attrs]  # a business type named Agent: one declaration
        return _types_doc(list(declared.items()))

    def _event_types(self) -> list[dict[str, Any]]:
        return _types_doc([(r[0], EVENT_ATTRIBUTES) for r in self._db.execute("SELECT name FROM etype ORDER BY name")])

    def _objects(self) -> Iterator[dict[str, Any]]:
        last = ""
        while True:  # read in pages, each fetched whole, so no cursor stays open across a yield
            rows = self._db.execute("SELECT id, workflow, doc FROM inst WHERE id > ? ORDER BY id LIMIT 1000",
                                    (last,)).fetchall()
            for iid, workflow, doc in rows:
                inst = None
                if doc is not None:
                    d = json.loads(doc)
                    inst = Instance(id=iid, workflow=workflow, state="", started_at=d["started_at"],
                                    updated_at=d["updated_at"], completed_at=d["completed_at"], cost=Decimal(d["cost"]))
                yield _instance_doc(iid, workflow, inst, self._currency.get(workflow, ""))
            if len(rows) < 1000:
                break
            last = rows[-1][0]
        last = ""
        while True:
            page = self._db.execute("SELECT oid, kind, type, key FROM obj WHERE oid > ? ORDER BY oid LIMIT 1000",
                                    (last,)).fetchall()
            for oid, kind, otype, key in page:
                rels: list[dict[str, str]] = []
                if kind == 1:
                    rels = [{"objectId": r[0], "qualifier": "part-of"} for r in self._db.execute(
                        "SELECT DISTINCT instance FROM link WHERE type = ? AND key = ? ORDER BY instance", (otype, key))]
                yield {"id": oid, "type": otype, "attributes": [{"name": "key", "value": key, "time": STATIC_TIME}],
                       "relationships": rels}
            if len(page) < 1000:
                return
            last = page[-1][0]

    def _relationships(self, d: dict[str, Any]) -> list[dict[str, str]]:
        rels = [{"objectId": d["instance_id"], "qualifier": "instance"}]
        seen = set()
        creates = self._creates.get((d["workflow"], d["step"]), frozenset())
        for otype, key in d["objects"]:
            oid = object_id(otype, key)
            if oid in seen:
                continue
            seen.add(oid)
            qualifier = "names"
            if d["outcome"] == "completed" and otype in creates:
                link = self._db.execute("SELECT instance, step, linked_at FROM link WHERE workflow = ? AND type = ? "
                                        "AND key = ?", (d["workflow"], otype, key)).fetchone()
                if link is not None and tuple(link) == (d["instance_id"], d["step"], float(d["time"])):
                    qualifier = "creates"
            rels.append({"objectId": oid, "qualifier": qualifier})
        if d["agent"]:
            rels.append({"objectId": agent_id(d["agent"]), "qualifier": "performed-by"})
        return rels

    def _events(self) -> Iterator[dict[str, Any]]:
        last = -1
        while True:
            page = self._db.execute("SELECT seq, doc FROM ev WHERE seq > ? ORDER BY seq LIMIT 1000", (last,)).fetchall()
            for seq, doc in page:
                d = json.loads(doc)
                e = StepEvent(seq=seq, instance_id=d["instance_id"], workflow=d["workflow"], step=d["step"],
                              action=d["action"], agent=d["agent"], decision_id=d["decision_id"], outcome=d["outcome"],
                              status=d["status"], time=d["time"], duration_ms=d["duration_ms"],
                              approval_wait_ms=d["approval_wait_ms"], human=d["human"], cost=Decimal(d["cost"]))
                yield _event_doc(e, self._currency.get(e.workflow, ""), self._relationships(d))
            if len(page) < 1000:
                return
            last = page[-1][0]

    def chunks(self) -> Iterator[str]:
        """The document, in pieces of about CHUNK_CHARS (one element a line)."""
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        buf: list[str] = []
        size = 0
        sections: tuple[tuple[str, Iterable[dict[str, Any]]], ...] = (
            ("objectTypes", self._object_types()), ("eventTypes", self._event_types()),
            ("objects", self._objects()), ("events", self._events()))
        for n, (name, items) in enumerate(sections):
            buf.append(("{" if n == 0 else ",\n") + json.dumps(name) + ": [")
            first = True
            for item in items:
                text = ("\n" if first else ",\n") + json.dumps(item, separators=(",", ":"))
                first = False
                buf.append(text)
                size += len(text)
                if size >= CHUNK_CHARS:
                    yield "".join(buf)
                    buf, size = [], 0
            buf.append("]" if first else "\n]")
        buf.append("}\n")
        yield "".join(buf)


def ocel_document(events: Iterable[StepEvent], instances: Iterable[Instance] = (),
                  objects: Iterable[WorkflowObject] = (), specs: Iterable[WorkflowSpec] = ()) -> dict[str, Any]:
    """The OCEL 2.0 log of `events` (with store sequences), their instances and linked objects."""
    by_id = {i.id: i for i in instances}
    objects = list(objects)
    with OcelBuilder(specs) as b:
        for e in events:
            b.add_event(e)
        while pending := b.pending_instances():
            for iid in pending:
                b.add_instance(iid, by_id.get(iid), [o for o in objects if o.instance_id == iid])
        doc: dict[str, Any] = json.loads("".join(b.chunks()))
        return doc


# ----------------------------------------------------------------------------- CSV
def _cell(text: str) -> str:
    """A text cell a spreadsheet shows as text: never the start of a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_row(e: StepEvent, currency: str = "") -> list[str]:
    """One event as a row of CSV_COLUMNS."""
    objects = json.dumps([object_id(t, k) for t, k in e.objects], ensure_ascii=False)
    return [
        _cell(e.instance_id), _cell(event_type(e.step, e.outcome)), iso(e.time), _cell(e.agent), _cell(e.workflow),
        _cell(e.step), _cell(e.action), e.outcome, "" if e.status is None else str(int(e.status)), _num(e.duration_ms),
        "" if e.approval_wait_ms is None else _num(e.approval_wait_ms), "true" if e.human else "false",
        _dec(e.cost), _cell(currency), _cell(e.decision_id), _cell(objects), event_id(e),
    ]


def _csv_line(row: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(row)  # RFC 4180
    return buf.getvalue()


def csv_text(events: Iterable[StepEvent], specs: Iterable[WorkflowSpec] = ()) -> str:
    currency = {w.name: w.currency for w in specs}
    return _csv_line(CSV_COLUMNS) + "".join(_csv_line(csv_row(e, currency.get(e.workflow, ""))) for e in events)


# ----------------------------------------------------------------------------- from the store
async def read_pages(store: Any, *, workflow: str | None = None, since: float | None = None,
                     until: float | None = None, page: int | None = None) -> AsyncIterator[list[StepEvent]]:
    """The step events with since <= time < until, in store order, a page at a time (EVENT_PAGE)."""
    page = page or EVENT_PAGE
    after = 0
    while True:
        batch: list[StepEvent] = await store.workflow_events(workflow=workflow, since=since, after_seq=after,
                                                             limit=page)
        yield [e for e in batch if until is None or e.time < until]
        if len(batch) < page:
            return
        after = int(batch[-1].seq or after)


async def ocel_chunks(store: Any, specs: Iterable[WorkflowSpec] = (), *, workflow: str | None = None,
                      since: float | None = None, until: float | None = None,
                      page: int | None = None) -> AsyncGenerator[str, None]:
    """The OCEL 2.0 JSON log, in pieces. Raises the store's StoreError before the first piece.

    The spool's work runs in a worker thread (one step at a time), so a large export does not hold
    up the event loop it shares with the proxy."""
    with OcelBuilder(specs) as b:
        async for events in read_pages(store, workflow=workflow, since=since, until=until, page=page):
            await asyncio.to_thread(b.add_events, events)
        while pending := await asyncio.to_thread(b.pending_instances):
            found = [(iid, await store.workflow_instance(iid), await store.workflow_objects(instance_id=iid))
                     for iid in pending]
            await asyncio.to_thread(b.add_instances, found)
        pieces = b.chunks()
        while (chunk := await asyncio.to_thread(next, pieces, None)) is not None:
            yield chunk


async def csv_chunks(store: Any, specs: Iterable[WorkflowSpec] = (), *, workflow: str | None = None,
                     since: float | None = None, until: float | None = None,
                     page: int | None = None) -> AsyncGenerator[str, None]:
    """The CSV event log, in pieces (the header first). A StoreError may come after the header."""
    currency: Mapping[str, str] = {w.name: w.currency for w in specs}
    buf = [_csv_line(CSV_COLUMNS)]
    size = 0
    async for events in read_pages(store, workflow=workflow, since=since, until=until, page=page):
        for e in events:
            line = _csv_line(csv_row(e, currency.get(e.workflow, "")))
            buf.append(line)
            size += len(line)
            if size >= CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
    yield "".join(buf)
