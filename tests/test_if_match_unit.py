"""Optimistic concurrency without processes: the manifest option and its errors, the
ETag parser, and the if-match stage over a real (in-memory SQLite) store with
hand-made exchanges: what it remembers, what it sends, the 412 it explains, the
agent's own preconditions, and failing closed when the store is down."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import ConcurrencyConfig
from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import ConnectorManifest, ManifestError, load_manifest
from proxy.coordination.concurrency import (
    KIND,
    ConcurrencyObserver,
    IfMatch,
    if_match_paths,
    strong_etag,
)
from proxy.core.chain import Chain, Stage
from proxy.core.exchange import Exchange, ResponseSummary
from proxy.core.model import AgentIdentity, AgentRequest, Refusal
from proxy.core.problem import refusal_answer
from proxy.store import Store, StoreError, open_store
from proxy.store.refusal import store_unavailable

HOST = "svc.example.com"


def manifest(**route_extra: Any) -> dict:
    routes = [
        {"method": "GET", "path": "/tickets/{id}", "action": "svc.ticket.read", "resource": {"type": "Ticket", "id": "{id}"}},
        {"method": "PATCH", "path": "/tickets/{ticket}", "action": "svc.ticket.update",
         "resource": {"type": "Ticket", "id": "{ticket}"}, "concurrency": {"if_match": True}},
        {"method": "PUT", "path": "/tickets/{id}", "action": "svc.ticket.replace",
         "resource": {"type": "Ticket", "id": "{id}"}},  # no option: learns, never sends
        {"method": "DELETE", "path": "/tickets/{id}", "action": "svc.ticket.delete",
         "resource": {"type": "Ticket", "id": "{id}"}},
        {"method": "GET", "path": "/tickets/{id}/notes", "action": "svc.notes.read",
         "resource": {"type": "Ticket", "id": "{id}"}},  # another path naming the same record: not learnt from
        {"method": "GET", "path": "/plain/{id}", "action": "svc.plain.read", "resource": {"type": "Plain", "id": "{id}"}},
        {"method": "PATCH", "path": "/plain/{id}", "action": "svc.plain.update", "resource": {"type": "Plain", "id": "{id}"}},
    ]
    routes[1].update(route_extra)
    return {"name": "svc", "hosts": [HOST], "routes": routes}


# ------------------------------------------------------------------ the manifest option
def write(tmp_path: Path, route: dict) -> Path:
    m = {"name": "svc", "hosts": [HOST], "routes": [route]}
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


BASE = {"method": "PATCH", "path": "/tickets/{id}", "action": "svc.ticket.update", "resource": {"type": "Ticket", "id": "{id}"}}


@pytest.mark.parametrize("change, message", [
    ({"concurrency": {"if_match": "yes"}}, "route PATCH /tickets/{id}: invalid concurrency"),
    ({"concurrency": {}}, "route PATCH /tickets/{id}: invalid concurrency"),
    ({"concurrency": {"if_match": True, "etag": "x"}}, "route PATCH /tickets/{id}: invalid concurrency"),
    ({"method": "GET", "concurrency": {"if_match": True}}, "concurrency on GET /tickets/{id}: if_match applies to writes"),
    ({"resource": {"type": "Ticket", "id": "new"}, "concurrency": {"if_match": True}},
     "concurrency on PATCH /tickets/{id}: if_match needs a route whose resource is the record its path names"),
    ({"action": "", "resource": None, "concurrency": {"if_match": True},
      "jsonrpc": [{"method": "tools/call", "action": "svc.call", "resource": {"type": "Tool", "id": "x"}}]},
     "concurrency on PATCH /tickets/{id}: not supported on jsonrpc routes"),
])
def test_invalid_declaration_is_a_config_error_naming_manifest_and_route(tmp_path: Path, change: dict,
                                                                        message: str) -> None:
    route = {**BASE, **change}
    route = {k: v for k, v in route.items() if v is not None}
    path = write(tmp_path, route)
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    text = str(err.value)
    assert str(path) in text and message in text, text


def test_valid_declarations() -> None:
    m = ConnectorManifest.model_validate(manifest())
    assert m.routes[1].concurrency is not None and m.routes[1].concurrency.if_match is True
    assert m.routes[0].concurrency is None
    # the default resource id (the path itself) and a wildcard tail name a record too; if_match: false is off
    for route in ({**BASE, "resource": {"type": "Ticket"}, "concurrency": {"if_match": True}},
                  {**BASE, "method": "*", "path": "/files/{*}", "resource": {"type": "File", "id": "{*}"},
                   "concurrency": {"if_match": True}},
                  {**BASE, "method": "POST", "concurrency": {"if_match": True}},
                  {**BASE, "method": "GET", "concurrency": {"if_match": False}}):
        ConnectorManifest.model_validate({"name": "svc", "hosts": [HOST], "routes": [route]})


def test_if_match_paths_are_the_declaring_routes_paths_whatever_the_placeholder_names() -> None:
    m = ConnectorManifest.model_validate(manifest())
    assert if_match_paths([m]) == frozenset({("svc", "/tickets/{}")})
    assert if_match_paths([ConnectorManifest.model_validate({**manifest(), "routes": manifest()["routes"][:1]})]) == frozenset()


@pytest.mark.parametrize("header, expected", [
    ('"abc"', '"abc"'),
    (' "v1" ', '"v1"'),
    ('""', '""'),
    ('"a-b_c.d~!#$%&()*+,/:;<=>?@[]^`{|}"', '"a-b_c.d~!#$%&()*+,/:;<=>?@[]^`{|}"'),
    ('W/"abc"', None),  # weak: If-Match compares strongly
    ('w/"abc"', None),
    ("abc", None),  # unquoted
    ('"a", "b"', None),  # a list (two ETag fields joined)
    ('"a"b"', None),
    ('"caf\u00e9"', None),  # obs-text is not kept
    ('"a\r\nX-Evil: 1"', None),  # header injection
    ('"' + "x" * 1023 + '"', None),  # over MAX_ETAG_LENGTH
    ("", None),
    (None, None),
])
def test_strong_etag(header: str | None, expected: str | None) -> None:
    assert strong_etag(header) == expected


# ------------------------------------------------------------------------ the stage
class Counted(ConcurrencyObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def write(self, connector: str, outcome: str) -> None:
        self.seen.append((connector, outcome))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """The stage over a real in-memory SQLite store, and a way to push exchanges through it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        m = ConnectorManifest.model_validate(manifest())
        self.classifier = Classifier([m])
        self.clock = Clock()
        self.observer = Counted()
        self.stage = IfMatch(store, ConcurrencyConfig(etag_ttl_seconds=60), if_match_paths([m]), self.observer,
                             clock=self.clock)
        self.chain = Chain([self.stage], error_refusals=[store_unavailable])

    def exchange(self, agent: str, method: str, path: str, headers: dict[str, str] | None = None) -> Exchange:
        req = AgentRequest(method, "https", HOST, 443, path, "", dict(headers or {}), b"", "127.0.0.1", "forward")
        ex = Exchange(req, identity=AgentIdentity(agent, "iss", {}, None))
        ex.classification = self.classifier.classify(method, HOST, 443, path)
        return ex

    async def send(self, agent: str, method: str, path: str, status: int, etag: str | None = None,
                   headers: dict[str, str] | None = None, error: str | None = None) -> Exchange:
        ex = self.exchange(agent, method, path, headers)
        await self.chain.request(ex)
        if ex.refusal is None:
            resp_headers = {"etag": etag} if etag is not None else {}
            ex.response = ResponseSummary(status, upstream_status=status, headers=resp_headers, body=b"{}", error=error)
        else:
            ex.response = ResponseSummary(ex.refusal.status)
        await self.chain.response(ex)
        return ex

    async def etag(self, agent: str, ticket: str = "T1") -> str | None:
        seen = await self.store.etag_seen("svc", f'Ticket::"{ticket}"', agent, self.clock())
        return None if seen is None else seen.etag


def rig_run(body: Callable[[Rig], Awaitable[None]]) -> None:
    async def main() -> None:
        store = open_store("sqlite:///:memory:")
        await store.open()
        try:
            await body(Rig(store))
        finally:
            await store.close()

    asyncio.run(main())


def test_read_then_write_sends_if_match_and_learns_the_new_etag() -> None:
    async def body(r: Rig) -> None:
        read = await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')
        assert read.allowed and read.plan.set_headers == {}
        assert await r.etag("alice") == '"v1"'
        write = await r.send("alice", "PATCH", "/tickets/T1", 200, '"v2"')
        assert write.plan.set_headers == {"if-match": '"v1"'} and write.plan.replaceable_statuses == {412}
        assert write.allowed and write.response is not None and write.response.status == 200
        assert await r.etag("alice") == '"v2"'  # its own write's answer is what it saw last
        again = await r.send("alice", "PATCH", "/tickets/T1", 200, '"v3"')
        assert again.plan.set_headers == {"if-match": '"v2"'}
        assert r.observer.seen == [("svc", "matched"), ("svc", "matched")]

    rig_run(body)


def test_412_becomes_409_resource_changed_and_the_stale_etag_stays() -> None:
    async def body(r: Rig) -> None:
        read = await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')
        r.clock.now += 5
        ex = await r.send("alice", "PATCH", "/tickets/T1", 412)
        assert ex.replaced and ex.refusal is not None and ex.refusal.kind == KIND and ex.refusal.status == 409
        assert ex.decision.value == "deny" and ex.response is not None
        assert (ex.response.status, ex.response.upstream_status) == (409, 412)
        status, headers, raw = refusal_answer(ex)
        problem = json.loads(raw)
        assert status == 409 and headers["Content-Type"] == "application/problem+json"
        for key in ("title", "detail", "decision_id", "action", "resource", "reasons"):
            assert key in problem
        assert problem["resource"] == 'Ticket::"T1"' and problem["action"] == "svc.ticket.update"
        assert problem["reasons"] == ["upstream-precondition-failed"]
        assert "GET it" in problem["detail"] and read.decision_id in problem["detail"]
        assert problem["changed"] == {"connector": "svc", "resource": 'Ticket::"T1"', "if_match": '"v1"',
                                      "read_decision_id": read.decision_id, "read_at": "1970-01-01T00:16:40Z",
                                      "upstream_status": 412}
        # a blind retry carries the same stale ETag (and gets the same answer); a read replaces it
        assert await r.etag("alice") == '"v1"'
        retry = await r.send("alice", "PATCH", "/tickets/T1", 412)
        assert retry.plan.set_headers == {"if-match": '"v1"'} and retry.replaced
        await r.send("alice", "GET", "/tickets/T1", 200, '"v7"')
        ok = await r.send("alice", "PATCH", "/tickets/T1", 200, '"v8"')
        assert ok.plan.set_headers == {"if-match": '"v7"'} and ok.allowed
        assert [o for _, o in r.observer.seen] == ["changed", "changed", "matched"]

    rig_run(body)


def test_agents_own_precondition_is_left_alone_and_its_412_passes() -> None:
    async def body(r: Rig) -> None:
        await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')
        for header in ("If-Match", "If-None-Match", "If-Unmodified-Since"):
            ex = await r.send("alice", "PATCH", "/tickets/T1", 412, headers={header.lower(): '"mine"'})
            assert ex.plan.set_headers == {} and ex.plan.replaceable_statuses == set()
            assert not ex.replaced and ex.refusal is None and ex.response is not None and ex.response.status == 412
        # its own successful conditional write is learnt like any other answer
        await r.send("alice", "PATCH", "/tickets/T1", 200, '"v2"', headers={"if-match": '"v1"'})
        assert await r.etag("alice") == '"v2"'
        assert [o for _, o in r.observer.seen] == ["agent"] * 4

    rig_run(body)


def test_etags_belong_to_one_agent() -> None:
    async def body(r: Rig) -> None:
        await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')
        bob = await r.send("bob", "PATCH", "/tickets/T1", 200, '"v2"')  # bob never read it
        assert bob.plan.set_headers == {}
        assert await r.etag("alice") == '"v1"' and await r.etag("bob") == '"v2"'
        # another record of alice's: nothing
        other = await r.send("alice", "PATCH", "/tickets/T2", 200)
        assert other.plan.set_headers == {}
        assert [o for _, o in r.observer.seen] == ["unknown", "unknown"]

    rig_run(body)


@pytest.mark.parametrize("answer", [
    (200, 'W/"v2"'),  # weak: unusable with If-Match
    (200, None),  # none
    (200, '"a", "b"'),  # malformed
    (404, None),
    (410, None),
])
def test_answers_without_a_usable_etag_forget(answer: tuple[int, str | None]) -> None:
    async def body(r: Rig) -> None:
        await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')
        await r.send("alice", "GET", "/tickets/T1", *answer)
        assert await r.etag("alice") is None
        ex = await r.send("alice", "PATCH", "/tickets/T1", 200)
        assert ex.plan.set_headers == {}

    rig_run(body)


def test_what_is_learnt_from_where() -> None:
    async def body(r: Rig) -> None:
        await r.send("alice", "GET", "/tickets/T1", 304, '"v1"')  # a 304 confirms the agent's copy
        assert await r.etag("alice") == '"v1"'
        await r.send("alice", "GET", "/tickets/T1", 500, '"v9"')  # an error teaches nothing
        await r.send("alice", "GET", "/tickets/T1/notes", 200, '"notes-1"')  # another path: not the record's ETag
        assert await r.etag("alice") == '"v1"'
        await r.send("alice", "PUT", "/tickets/T1", 200, '"v2"')  # a write on the same path without the option
        assert await r.etag("alice") == '"v2"'
        await r.send("alice", "PATCH", "/tickets/T1", 409, '"v5"')  # a non-2xx write leaves it
        assert await r.etag("alice") == '"v2"'
        await r.send("alice", "DELETE", "/tickets/T1", 204)  # gone
        assert await r.etag("alice") is None
        # a cut answer (upstream failed mid-body) teaches nothing
        await r.send("alice", "GET", "/tickets/T1", 200, '"v3"', error="the upstream closed the connection")
        assert await r.etag("alice") is None
        # a route of another path without the option: no stage work at all
        plain = await r.send("alice", "GET", "/plain/P1", 200, '"p1"')
        assert "if-match" not in plain.stage_data
        assert await r.store.etag_seen("svc", 'Plain::"P1"', "alice", r.clock()) is None
        assert (await r.send("alice", "PATCH", "/plain/P1", 200)).plan.set_headers == {}

    rig_run(body)


def test_remembered_etags_age_out_and_are_swept() -> None:
    async def body(r: Rig) -> None:
        await r.send("bob", "GET", "/tickets/T9", 200, '"b1"')
        await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')
        r.clock.now += 59
        assert (await r.send("alice", "PATCH", "/tickets/T1", 200, '"v2"')).plan.set_headers == {"if-match": '"v1"'}
        r.clock.now += 60  # etag_ttl_seconds after alice's last answer
        assert (await r.send("alice", "PATCH", "/tickets/T1", 200, '"v3"')).plan.set_headers == {}
        # every sweep_interval_seconds a response starts a sweep in its own task: bob's expired row goes
        assert r.stage._sweeping is not None
        await r.stage._sweeping
        rows = await r.store._fetchall("t", "SELECT agent_id, etag FROM proctor_etags")  # type: ignore[attr-defined]
        assert [tuple(row) for row in rows] == [("alice", '"v3"')]

    rig_run(body)


def test_a_write_refused_after_the_stage_learns_nothing() -> None:
    async def body(r: Rig) -> None:
        await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')

        class Gate(Stage):  # after if-match, refusing (the audit gate closed, say)
            name = "gate"

            def on_request(self, ex: Exchange) -> None:
                ex.refuse(Refusal(503, "closed", "audit gate closed", kind="fail-closed"))

        r.chain = Chain([r.stage, Gate()], error_refusals=[store_unavailable])
        ex = await r.send("alice", "PATCH", "/tickets/T1", 0)
        assert ex.refusal is not None and ex.refusal.kind == "fail-closed" and not ex.replaced
        assert await r.etag("alice") == '"v1"' and r.observer.seen == []

    rig_run(body)


def test_store_down_on_an_if_match_write_fails_closed_reads_still_pass() -> None:
    async def body(r: Rig) -> None:
        await r.store.close()
        ex = await r.send("alice", "PATCH", "/tickets/T1", 200)
        assert ex.refusal is not None and ex.refusal.status == 503 and ex.refusal.title == "State store unavailable"
        assert ex.plan.set_headers == {}
        # a read is forwarded (nothing to look up on the way in); learning it fails after the answer
        read = await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')
        assert read.allowed and read.response is not None and read.response.status == 200
        assert r.chain.response_failures == 1
        with pytest.raises(StoreError):
            await r.store.etag_seen("svc", 'Ticket::"T1"', "alice", 0)

    rig_run(body)


def test_replace_response_only_for_an_announced_buffered_status() -> None:
    ex = Exchange(AgentRequest("PATCH", "https", HOST, 443, "/x", "", {}, b"", "127.0.0.1", "forward"))
    ex.decided = True
    ex.response = ResponseSummary(412, upstream_status=412)
    refusal = Refusal(409, "changed", "changed", kind=KIND)
    with pytest.raises(RuntimeError):
        ex.replace_response(refusal)  # 412 was not announced: the engine may have streamed it
    ex.plan.replaceable_statuses.add(412)
    ex.response = ResponseSummary(412, upstream_status=412, error="cut")
    with pytest.raises(RuntimeError):
        ex.replace_response(refusal)  # an incomplete answer
    ex.response = ResponseSummary(412, upstream_status=412)
    ex.replace_response(refusal)
    assert ex.replaced and ex.refusal is refusal and ex.response.status == 409 and ex.response.upstream_status == 412


def test_the_if_match_proctor_adds_is_not_bound_into_fingerprints() -> None:
    """Approval and Idempotency-Key fingerprints are over the agent's request: the header the stage
    adds (like the injected credential) leaves them as they were, so a retry after a re-read
    (another ETag) is the same request. An If-Match the agent sends itself is its own request."""
    from proxy.approvals.service import fingerprint_header_names, request_fingerprint
    from proxy.request_path import _fingerprinter

    async def body(r: Rig) -> None:
        fingerprint = _fingerprinter(None)
        await r.send("alice", "GET", "/tickets/T1", 200, '"v1"')
        ex = r.exchange("alice", "PATCH", "/tickets/T1", {"content-type": "application/json"})
        before = fingerprint(ex)
        await r.chain.request(ex)
        assert ex.plan.set_headers == {"if-match": '"v1"'}
        assert fingerprint(ex) == before
        # with if-match among the headers approvals bind, the agent's request is still what counts
        names = fingerprint_header_names(["if-match"])
        assert request_fingerprint("alice", ex.request, names) == request_fingerprint(
            "alice", r.exchange("alice", "PATCH", "/tickets/T1", {"content-type": "application/json"}).request, names)
        own = r.exchange("alice", "PATCH", "/tickets/T1", {"content-type": "application/json", "if-match": '"v1"'})
        assert request_fingerprint("alice", own.request, names) != request_fingerprint("alice", ex.request, names)

    rig_run(body)
