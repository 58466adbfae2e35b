"""Duplicate-work suppression through real processes (docs/coordination.md, "Duplicate work").

A recording upstream (tests/support/work_upstream.py) counts how often the work
was really done. Idempotency-Key: replay, in progress (409), reuse (422), a
malformed key (400), an upstream failure releasing the key, a response too large
to replay, expiry. Route dedupe windows across agents, answered 409 or replayed.
Forward mode and the gateway listener on both engines.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import SUPPORT, Proctor, free_port, port_open, start_proctor, wait_for

pytestmark = pytest.mark.integration

AGENT, OTHER = "idem-bot", "idem-bot-2"


@dataclass
class Work:
    port: int
    log: Path
    proc: subprocess.Popen

    def received(self, mark: str) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [e for e in map(json.loads, filter(None, lines)) if mark in e["body"]]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Work]:
    port = free_port()
    log = tmp_path_factory.mktemp("work") / "received.jsonl"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "work_upstream.py"), "--port", str(port), "--log", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), what="work upstream")
    yield Work(port, log, proc)
    proc.terminate()
    proc.wait(5)


def work_manifest(port: int, window: float = 3) -> dict:
    order = {
        "params": {"tenant": {"type": "long", "min": 1}},
        "body": {
            "total": {"path": "order.total", "type": "decimal", "required": True},
            "skus": {"path": "order.items[*].sku", "type": "string"},
        },
    }
    return {
        "name": "worksvc",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [
            {"method": "POST", "path": "/items", "action": "test.item.create", "resource": {"type": "Item", "id": "new"}},
            {"method": "POST", "path": "/tenants/{tenant}/orders", "action": "test.order.create",
             "resource": {"type": "Order", "id": "new"}, **order,
             "dedupe": {"key": ["tenant", "skus"], "window_seconds": window, "answer": "conflict"}},
            {"method": "PUT", "path": "/tenants/{tenant}/orders", "action": "test.order.create",
             "resource": {"type": "Order", "id": "new"}, **order,
             "dedupe": {"key": ["tenant", "skus"], "window_seconds": window, "answer": "replay"}},
        ],
    }


def start(tmp: Path, idp, pki, upstream, upstream_tls, work: Work, engine: str = "mitmproxy", **idem) -> Proctor:
    overrides = {
        "gateway": {"engine": engine, "routes": [{"prefix": "/work", "upstream": f"http://127.0.0.1:{work.port}"}]},
        "idempotency": {"in_progress_seconds": 30, **idem},
    }
    return start_proctor(tmp, idp, pki, upstream, upstream_tls, overrides, extra_connectors=[work_manifest(work.port)])


@pytest.fixture(scope="module")
def proctors(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[dict[str, Proctor]]:
    mitm = start(tmp_path_factory.mktemp("idem-mitm"), idp, pki, upstream, upstream_tls, work)
    aio = start(tmp_path_factory.mktemp("idem-aio"), idp, pki, upstream, upstream_tls, work, engine="aiohttp")
    yield {"mitmproxy": mitm, "aiohttp": aio}
    mitm.stop()
    aio.stop()


class Agent:
    """Sends writes the way an agent would: through the forward proxy or the gateway."""

    def __init__(self, p: Proctor, work: Work, via: str, token: str, agent: str) -> None:
        self.via = via
        if via == "forward":
            self.client = httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=30)
            self.base = f"http://127.0.0.1:{work.port}"
        else:
            self.client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30)
            self.base = f"{p.gateway_url}/work"

    def send(self, method: str, path: str, body: dict, key: str | None = None, **headers: str) -> httpx.Response:
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.client.request(method, self.base + path, json=body, headers=headers)


VIAS = ["forward", "gateway-mitmproxy", "gateway-aiohttp"]


@pytest.fixture(params=VIAS)
def via(request) -> str:
    return request.param


def agent_for(proctors, work, idp, via: str, agent: str = AGENT) -> Agent:
    p = proctors["aiohttp" if via == "gateway-aiohttp" else "mitmproxy"]
    return Agent(p, work, "forward" if via == "forward" else "gateway", idp.token(agent, groups=["writers"], ttl=600), agent)


def mark() -> str:
    return "m-" + uuid.uuid4().hex


def item(m: str) -> dict:
    return {"note": m}


# ------------------------------------------------------------------------ Idempotency-Key
def test_completed_request_is_replayed_not_repeated(proctors, work, idp, via):
    a = agent_for(proctors, work, idp, via)
    m, key = mark(), uuid.uuid4().hex
    first = a.send("POST", "/items", item(m), key)
    assert first.status_code == 201, first.text
    again = a.send("POST", "/items", item(m), f'"{key}"')  # the draft's sf-string form is the same key
    assert len(work.received(m)) == 1  # the upstream did the work once
    assert again.status_code == 201, again.text
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["X-Proctor-Original-Decision-Id"] == first.headers["X-Proctor-Decision-Id"]
    assert again.headers["X-Proctor-Decision-Id"] != first.headers["X-Proctor-Decision-Id"]
    assert again.headers["Location"] == first.headers["Location"]
    assert "set-cookie" not in again.headers  # never replayed: a session belongs to one answer
    assert "Idempotent-Replayed" not in first.headers


def test_retry_while_in_progress_gets_409_then_the_response(proctors, work, idp, via):
    a = agent_for(proctors, work, idp, via)
    b = agent_for(proctors, work, idp, via)  # another connection of the same agent
    m, key = mark(), uuid.uuid4().hex
    import threading

    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", a.send("POST", "/items", item(m), key, **{"X-Test-Delay": "2"})))
    t.start()
    wait_for(lambda: len(work.received(m)) == 1, timeout=10, what="the slow request upstream")
    busy = b.send("POST", "/items", item(m), key)
    assert busy.status_code == 409, busy.text
    problem = busy.json()
    assert problem["type"].endswith("/idempotency-in-progress")
    assert busy.headers["Retry-After"] == "2"
    t.join(10)
    first = box["r"]
    assert first.status_code == 201
    done = b.send("POST", "/items", item(m), key)
    assert done.status_code == 201 and done.headers["Idempotent-Replayed"] == "true"
    assert problem["first_decision_id"] == first.headers["X-Proctor-Decision-Id"]
    assert len(work.received(m)) == 1


def test_same_key_for_another_request_is_422(proctors, work, idp, via):
    a = agent_for(proctors, work, idp, via)
    m1, m2, key = mark(), mark(), uuid.uuid4().hex
    assert a.send("POST", "/items", item(m1), key).status_code == 201
    r = a.send("POST", "/items", item(m2), key)
    assert r.status_code == 422, r.text
    assert r.json()["type"].endswith("/idempotency-mismatch")
    assert work.received(m2) == []


@pytest.mark.parametrize("bad", ["has space", "x" * 256, "a,b", '"', "é-key"])
def test_malformed_key_is_400(proctors, work, idp, bad):
    a = agent_for(proctors, work, idp, "forward")
    m = mark()
    r = a.client.post(a.base + "/items", json=item(m), headers={"Idempotency-Key": bad.encode()})
    assert r.status_code == 400, r.text
    assert r.json()["type"].endswith("/idempotency-key-invalid")
    assert work.received(m) == []


def test_two_keys_are_400(proctors, work, idp, via):
    a = agent_for(proctors, work, idp, via)
    m = mark()
    r = a.client.post(a.base + "/items", json=item(m), headers=[("Idempotency-Key", "k1"), ("Idempotency-Key", "k1")])
    assert r.status_code == 400, r.text
    assert r.json()["type"].endswith("/idempotency-key-invalid")
    assert work.received(m) == []


def test_keys_are_per_agent(proctors, work, idp):
    a = agent_for(proctors, work, idp, "forward")
    b = agent_for(proctors, work, idp, "forward", OTHER)
    m, key = mark(), uuid.uuid4().hex
    assert a.send("POST", "/items", item(m), key).status_code == 201
    r = b.send("POST", "/items", item(m), key)  # another agent's key space: its own request
    assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
    assert len(work.received(m)) == 2


def test_upstream_failure_releases_the_key(proctors, work, idp, via):
    a = agent_for(proctors, work, idp, via)
    m, key = mark(), uuid.uuid4().hex
    assert a.send("POST", "/items", item(m), key, **{"X-Test-Status": "503"}).status_code == 503
    r = a.send("POST", "/items", item(m), key)
    assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
    assert len(work.received(m)) == 2


def test_response_too_large_to_replay_is_409(proctors, work, idp, via):
    a = agent_for(proctors, work, idp, via)
    m, key = mark(), uuid.uuid4().hex
    first = a.send("POST", "/items", item(m), key, **{"X-Test-Size": str(64 * 1024 + 10)})
    assert first.status_code == 201 and len(first.content) == 64 * 1024 + 10
    r = a.send("POST", "/items", item(m), key)
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["type"].endswith("/idempotency-not-replayable")
    assert problem["first_decision_id"] == first.headers["X-Proctor-Decision-Id"]
    assert r.headers["Location"] == first.headers["Location"]
    assert len(work.received(m)) == 1


def test_stored_responses_expire(tmp_path, idp, pki, upstream, upstream_tls, work):
    p = start(tmp_path / "p", idp, pki, upstream, upstream_tls, work, replay_seconds=1)
    try:
        a = agent_for({"mitmproxy": p}, work, idp, "forward")
        m, key = mark(), uuid.uuid4().hex
        assert a.send("POST", "/items", item(m), key).status_code == 201
        assert a.send("POST", "/items", item(m), key).headers.get("Idempotent-Replayed") == "true"
        time.sleep(1.3)
        r = a.send("POST", "/items", item(m), key)
        assert r.status_code == 201 and "Idempotent-Replayed" not in r.headers
        assert len(work.received(m)) == 2
    finally:
        p.stop()


# ------------------------------------------------------------------------ dedupe windows
def order(m: str, sku: str) -> dict:
    return {"order": {"total": 10, "items": [{"sku": sku}], "marker": m}}


def test_dedupe_window_across_agents_conflict(proctors, work, idp, via):
    a = agent_for(proctors, work, idp, via)
    b = agent_for(proctors, work, idp, via, OTHER)
    sku, m1, m2 = mark(), mark(), mark()
    first = a.send("POST", "/tenants/7/orders", order(m1, sku))
    assert first.status_code == 201, first.text
    dup = b.send("POST", "/tenants/7/orders", order(m2, sku))  # another agent, the same order (marker aside)
    assert dup.status_code == 409, dup.text
    problem = dup.json()
    assert problem["type"].endswith("/duplicate")
    assert problem["first_decision_id"] == first.headers["X-Proctor-Decision-Id"]
    assert problem["first_result"] == first.headers["Location"] == dup.headers["Location"]
    assert work.received(m2) == []
    # another tenant is other work
    assert b.send("POST", "/tenants/8/orders", order(m2, sku)).status_code == 201
    time.sleep(3.2)  # the window (3 s) is over
    assert b.send("POST", "/tenants/7/orders", order(m2, sku)).status_code == 201
    assert len(work.received(m2)) == 2


def test_dedupe_window_replay(proctors, work, idp, via):
    a = agent_for(proctors, work, idp, via)
    b = agent_for(proctors, work, idp, via, OTHER)
    sku, m1, m2 = mark(), mark(), mark()
    first = a.send("PUT", "/tenants/7/orders", order(m1, sku))
    assert first.status_code == 201, first.text
    dup = b.send("PUT", "/tenants/7/orders", order(m2, sku))
    assert dup.status_code == 201 and dup.json() == first.json()
    assert dup.headers["Idempotent-Replayed"] == "true"
    assert dup.headers["X-Proctor-Original-Decision-Id"] == first.headers["X-Proctor-Decision-Id"]
    assert work.received(m2) == []


def test_replay_is_recorded_as_allowed(proctors, work, idp):
    a = agent_for(proctors, work, idp, "forward")
    m, key = mark(), uuid.uuid4().hex
    a.send("POST", "/items", item(m), key)
    again = a.send("POST", "/items", item(m), key)
    p = proctors["mitmproxy"]
    did = again.headers["X-Proctor-Decision-Id"]
    wait_for(lambda: any(r.get("decision_id") == did for r in p.decisions()), timeout=10, what="the replay's record")
    rec = p.decision(did)
    # allowed, answered by Proctor: the status the agent got, no upstream status
    assert rec["decision"] == "allow" and rec["status"] == 201 and rec["upstream_status"] is None


def _duplicate_lines(p: Proctor, did: str) -> list[dict]:
    return [r for r in p.decisions() if r.get("type") == "duplicate" and r["decision_id"] == did]


def _ocsf(p: Proctor, did: str) -> list[dict]:
    path = p.dir / "state" / "audit.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [e for e in lines if e.get("api", {}).get("operation", "").startswith("proctor.duplicate.")
            and e["metadata"].get("correlation_uid") == did]


def test_suppressed_duplicates_are_evented_and_counted_by_connector(proctors, work, idp):
    """Every write not forwarded because it repeated earlier work is a `duplicate` event line
    (decisions.jsonl) and an OCSF event, next to its decision, and counted by connector."""
    p = proctors["mitmproxy"]
    a = agent_for(proctors, work, idp, "forward")
    b = agent_for(proctors, work, idp, "forward", OTHER)
    sku, m1, m2, m3, key = mark(), mark(), mark(), mark(), uuid.uuid4().hex
    first = a.send("POST", "/tenants/9/orders", order(m1, sku))
    assert first.status_code == 201, first.text
    dup = b.send("POST", "/tenants/9/orders", order(m2, sku))  # dedupe window, another agent: 409
    assert dup.status_code == 409
    replay_first = a.send("POST", "/items", item(m3), key)
    replay = a.send("POST", "/items", item(m3), key)  # Idempotency-Key: replayed
    assert replay.headers["Idempotent-Replayed"] == "true"
    mismatch = a.send("POST", "/items", item(mark()), key)  # the same key, another body: 422
    assert mismatch.status_code == 422

    did = dup.headers["X-Proctor-Decision-Id"]
    wait_for(lambda: _duplicate_lines(p, did) and _ocsf(p, did), timeout=10, what="the duplicate's events")
    line = _duplicate_lines(p, did)[0]
    assert line["event"] == "refused" and line["mechanism"] == "dedupe" and line["kind"] == "duplicate"
    assert line["agent"] == OTHER and line["first_agent"] == AGENT and line["connector"] == "worksvc"
    assert line["first_decision_id"] == first.headers["X-Proctor-Decision-Id"]
    assert line["first_result"] == first.headers["Location"] and line["action"] == "test.order.create"
    ev = _ocsf(p, did)[0]
    assert ev["api"]["operation"] == "proctor.duplicate.refused"
    assert ev["api"]["service"]["name"] == "proctor.coordination" and ev["actor"]["user"]["uid"] == OTHER
    assert first.headers["X-Proctor-Decision-Id"] in ev["message"]
    # its own decision record stays as it was: a deny of kind `duplicate`
    assert p.decision(did)["refusal"]["kind"] == "duplicate"

    rid = replay.headers["X-Proctor-Decision-Id"]
    wait_for(lambda: _duplicate_lines(p, rid), timeout=10, what="the replay's event")
    r = _duplicate_lines(p, rid)[0]
    assert r["event"] == "replayed" and r["mechanism"] == "idempotency" and "kind" not in r
    assert r["first_decision_id"] == replay_first.headers["X-Proctor-Decision-Id"] and "first_agent" not in r
    mid = mismatch.headers["X-Proctor-Decision-Id"]
    wait_for(lambda: _duplicate_lines(p, mid), timeout=10, what="the mismatch's event")
    assert _duplicate_lines(p, mid)[0]["event"] == "mismatch"

    metrics = httpx.get(f"{p.control_url}/metrics", timeout=5).text
    for labels in ('connector="worksvc",mechanism="dedupe",outcome="refused"',
                   'connector="worksvc",mechanism="idempotency",outcome="replayed"',
                   'connector="worksvc",mechanism="idempotency",outcome="mismatch"'):
        assert f"proctor_duplicates_total{{{labels}}}" in metrics, labels


# ------------------------------------------------------------------------ two replicas on PostgreSQL
PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")


@pytest.mark.skipif(not PG_DSN, reason="PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)")
def test_two_replicas_on_postgres_race_for_one_key_and_one_dedupe_key(tmp_path, idp, pki, upstream, upstream_tls, work):
    """Two proxy processes sharing one PostgreSQL store: concurrent requests with the same
    key (one agent) and the same dedupe key (two agents) reach the upstream once."""
    import asyncpg

    schema = "proctor_idem_" + uuid.uuid4().hex[:12]
    url = f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={schema}"
    replicas = [
        start_proctor(tmp_path / f"r{i}", idp, pki, upstream, upstream_tls, {"store": {"url": url}},
                      extra_connectors=[work_manifest(work.port, window=30)])
        for i in range(2)
    ]
    try:
        tok = {who: idp.token(who, groups=["writers"], ttl=600) for who in (AGENT, OTHER)}
        key, m = uuid.uuid4().hex, mark()
        sku = mark()

        def fire(i: int, what: str) -> httpx.Response:
            who = (AGENT, OTHER)[i % 2] if what == "dedupe" else AGENT
            a = Agent(replicas[i % 2], work, "forward", tok[who], who)
            try:
                if what == "key":
                    return a.send("POST", "/items", item(m), key, **{"X-Test-Delay": "0.3"})
                return a.send("POST", "/tenants/9/orders", order(f"{m}-{i}", sku), **{"X-Test-Delay": "0.3"})
            finally:
                a.client.close()

        for what in ("key", "dedupe"):
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(fire, range(16), [what] * 16))
            statuses = sorted(r.status_code for r in answers)
            assert statuses.count(201) >= 1 and set(statuses) <= {201, 409}, statuses
            if what == "key":
                assert len(work.received(m)) == 1
                # the retries that lost while it was in progress now get the replay
                late = fire(1, "key")
                assert late.status_code == 201 and late.headers["Idempotent-Replayed"] == "true"
                assert len(work.received(m)) == 1
            else:
                assert statuses.count(201) == 1, statuses
                forwarded = [e for e in work.log.read_text().splitlines() if sku in e]
                assert len(forwarded) == 1
    finally:
        for p in replicas:
            p.stop()

        async def drop() -> None:
            conn = await asyncpg.connect(PG_DSN, timeout=10)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())
