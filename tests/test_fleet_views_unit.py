"""Fleet views, the parts without processes: merging replicas' activity pages and the cursor
(proxy/control/fleet_views.py), which URLs a fan-out calls, naming approval changes read from
the store (proxy/control/approval_watch.py), and the replica on every record line and OCSF
event (proxy/record, proxy/audit)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from proxy.audit.ocsf import read_event, to_ocsf
from proxy.audit.chain import Chain
from proxy.audit.trail import AuditTrail, Redactor
from proxy.control.approval_watch import ApprovalWatch, _seen, change_of
from proxy.control.fleet_views import decode_cursor, encode_cursor, merge_pages, usable_url
from proxy.record.decisions import DecisionRecorder
from proxy.record.model import DecisionRecord, SuspensionEvent, parse_line
from proxy.store import Approval
from proxy.store.models import Vote
from test_store import approval


def row(replica: str, seq: int, t: int) -> dict[str, Any]:
    return {"replica": replica, "sequence": seq, "time": f"2026-12-07T10:00:{t:02d}.000Z"}


def test_pages_merge_newest_first_and_each_replica_goes_on_from_its_oldest_row_taken() -> None:
    pages = {
        "a": ([row("a", 9, 50), row("a", 8, 30), row("a", 7, 10)], 7),  # a has older events still
        "b": ([row("b", 4, 40), row("b", 3, 20)], None),  # b's whole trail
        "c": ([], None),
    }
    taken, following = merge_pages(pages, {"a": None, "b": None, "c": None}, limit=3)
    assert [(r["replica"], r["sequence"]) for r in taken] == [("a", 9), ("b", 4), ("a", 8)]
    # a: rows left over, from before its oldest taken; b: from before 4; c: done (not in the cursor)
    assert following == {"a": 8, "b": 4}
    # all of a replica's rows taken: it goes on from its own next page (none: done)
    taken, following = merge_pages({"a": ([row("a", 2, 1)], None), "b": ([row("b", 5, 2)], 5)},
                                   {"a": 3, "b": None}, limit=10)
    assert [r["sequence"] for r in taken] == [5, 2] and following == {"b": 5}


def test_a_replica_that_did_not_answer_keeps_its_place_and_unnamed_rows_get_the_answering_replica() -> None:
    taken, following = merge_pages({"a": ([{"sequence": 3, "time": "2026-12-07T10:00:00.000Z"}], None)},
                                   {"a": None, "b": 17}, limit=5)
    assert taken[0]["replica"] == "a" and following == {"b": 17}
    # none of a replica's rows taken: it starts where it started
    taken, following = merge_pages({"a": ([row("a", 3, 1)], None), "b": ([row("b", 9, 59)], 2)},
                                   {"a": 5, "b": None}, limit=1)
    assert [r["replica"] for r in taken] == ["b"] and following == {"a": 5, "b": 2}


def test_the_cursor_round_trips_and_anything_else_is_refused() -> None:
    positions = {"replica-a": 812, "replica-b": None}
    cursor = encode_cursor(positions)
    assert cursor is not None and decode_cursor(cursor) == positions
    assert encode_cursor({}) is None
    for bad in ("", "not-a-cursor", encode_cursor({"a": 1})[:-2] + "!!",  # type: ignore[index]
                "eyJ2IjoyLCJyIjp7fX0",  # {"v":2,"r":{}}
                "eyJ2IjoxLCJyIjp7ImEiOi0xfX0"):  # {"v":1,"r":{"a":-1}}
        assert decode_cursor(bad) is None, bad


@pytest.mark.parametrize("url, usable", [
    ("http://10.0.0.7:8081", "http://10.0.0.7:8081"),
    ("https://proctor-0.proctor.svc:8081/", "https://proctor-0.proctor.svc:8081"),
    ("file:///etc/passwd", None), ("gopher://x", None), ("http://user:pw@host:1", None),
    ("http://host:1/?q=1", None), ("http://host:1/#f", None), ("http://", None), (None, None), ("", None),
])
def test_only_plain_http_urls_are_called(url: str | None, usable: str | None) -> None:
    assert usable_url(url) == usable


def _approval(**kw: Any) -> Approval:
    return approval(1, **kw)


def test_store_changes_are_named_as_the_change_they_are() -> None:
    a = _approval(state="pending")
    assert change_of(None, a) == "requested"
    assert change_of(None, _approval(state="approved")) == "approved"
    before = _seen(a)
    assert change_of(before, _approval(state="denied", version=2)) == "denied"
    assert change_of(before, _approval(escalated=True, version=2)) == "escalated"
    assert change_of(before, _approval(votes=[Vote("bob", "managers", "approve", "ok", 1.0)], version=2)) == "voted"
    assert change_of(before, _approval(version=2)) == "updated"


class _Store:
    def __init__(self) -> None:
        self.approvals: dict[str, Approval] = {}

    async def list_approvals(self, *, states: list[str] | None = None, limit: int = 100, **_: Any) -> list[Approval]:
        return [a for a in self.approvals.values() if states is None or a.state in states][:limit]


def test_the_watch_announces_other_replicas_changes_once_and_not_its_own() -> None:
    store = _Store()
    store.approvals["apr_old"] = approval(1, id="apr_old")
    watch = ApprovalWatch(store, 1.0)  # type: ignore[arg-type]
    got: list[tuple[str, str]] = []
    watch.subscribers.append(lambda event, a: got.append((event, a.id)))

    async def run() -> None:
        await watch.poll()  # primes: what was there before the stream opened is not announced
        store.approvals["apr_new"] = approval(2, id="apr_new")
        await watch.poll()
        await watch.poll()  # (nothing new)
        decided = replace(store.approvals["apr_old"], state="approved", version=2)
        store.approvals["apr_old"] = decided
        await watch.poll()
        mine = replace(store.approvals["apr_new"], state="denied", version=2)
        watch.local("denied", mine)  # decided here: the service announced it already
        store.approvals["apr_new"] = mine
        await watch.poll()

    asyncio.run(run())
    assert got == [("requested", "apr_new"), ("approved", "apr_old")]


def test_every_line_and_every_audit_event_names_its_replica(tmp_path) -> None:
    recorder = DecisionRecorder(tmp_path / "decisions.jsonl", replica="replica-7")
    trail = AuditTrail([], Redactor([], []), Chain(), frozenset(), 1.0, replica="replica-7")
    events: list[dict[str, Any]] = []
    recorder.listeners.append(lambda rec: events.append(trail._build(rec)))
    recorder.write(DecisionRecord(decision_id="d1", time="2026-12-07T10:00:00.000Z", decision="allow"))
    recorder.write(SuspensionEvent.of("suspended", "agent", "bot", "olga", "why", 0))
    lines = [parse_line(line) for line in (tmp_path / "decisions.jsonl").read_bytes().splitlines()]
    assert [rec.replica for rec in lines] == ["replica-7", "replica-7"]
    raw = (tmp_path / "decisions.jsonl").read_text().splitlines()
    assert all(line.endswith('"replica":"replica-7"}') for line in raw)  # last on the line
    for ev in events:
        assert ev["unmapped"]["proctor"]["replica"] == "replica-7"
        assert ev["metadata"]["loggers"][0]["device"] == {"type_id": 1, "type": "Server",
                                                          "hostname": ev["metadata"]["loggers"][0]["device"]["hostname"],
                                                          "name": "replica-7"}
        assert read_event(ev)[1].replica == "replica-7"  # type: ignore[union-attr]
    # the trail's own events (a gap in the file) name it too
    gap = trail._build({"type": "audit", "event": "gap", "time": "2026-12-07T10:00:00.000Z", "count": 1})
    assert gap["unmapped"]["proctor"]["replica"] == "replica-7"
    # a record without a replica (older lines) has none in its event
    assert "replica" not in to_ocsf({"decision_id": "d0", "time": "2026-12-07T10:00:00.000Z",
                                     "decision": "deny"})["unmapped"]["proctor"]
