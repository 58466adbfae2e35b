"""Fleet views (issue 15 item 7; docs/governance.md, "Fleet views"), with three real proxies on
one PostgreSQL schema, each with its own state directory (its own decision record and audit
file): a decision made on one replica is seen in another's GET /v1/activity (merged by time,
paged with a cursor) and explained by `proctor policy explain --decision ID --url <another>`;
the agents view counts every replica's requests; another replica's approval changes reach a
replica's approval event stream; every record line and audit event names its replica; a
replica that does not answer (stopped, or gone) leaves the view partial and flagged, never
hanging."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Proctor, start_proctor, wait_for
from test_approvals import (  # noqa: F401 - hold_policies is a fixture
    MANAGERS,
    agent_client,
    agent_token,
    approver_token,
    hold_policies,
    marker,
    order,
    order_url,
    vote,
)
from test_store import PG_DSN, PG_SKIP, _pg_admin

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)]


@pytest.fixture
def fleet(tmp_path, idp, pki, upstream, upstream_tls, hold_policies):  # noqa: F811
    """Replicas on one fresh schema. Heartbeats every 5 s: a replica stays listed for 15 s
    after its last one, so a stopped replica is still asked (and found not answering)."""
    schema = "proctor_views_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"  # type: ignore[operator]
    env = {"PROCTOR_TEST_VIEWS_STORE": f"{PG_DSN}{sep}schema={schema}"}
    started: list[Proctor] = []

    def start(name: str) -> Proctor:
        cfg = {"store": {"url_env": "PROCTOR_TEST_VIEWS_STORE"}, "replica_id": name,
               "policies": {"source": "store", "heartbeat_seconds": 5},
               "approvals": {"mode": "async", "expire_after_seconds": 300}}
        p = start_proctor(tmp_path / name, idp, pki, upstream, upstream_tls, cfg, policies_src=hold_policies, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            os.kill(p.proc.pid, signal.SIGCONT)  # (a stopped one must get the SIGTERM)
        p.stop()
    asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def operator(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def read(p: Proctor, token: str) -> str:
    """A read through the gateway (allowed by the test policies): its decision id."""
    r = httpx.get(f"{p.gateway_url}/svc/items/1", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.headers["X-Proctor-Decision-Id"]


def activity(p: Proctor, token: str, **params: Any) -> dict:
    r = httpx.get(f"{p.control_url}/v1/activity", params=params, headers={"Authorization": f"Bearer {token}"},
                  timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def explain_cli(p: Proctor, decision_id: str, token: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "policy", "explain", "--decision", decision_id,
                           "--url", p.control_url, "--token", token, *extra],
                          capture_output=True, text=True, timeout=60)


def audit_events(p: Proctor) -> list[dict]:
    path = p.dir / "state" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Stream:
    """GET /v1/approvals/events on one replica, read in a thread: the `approval` events."""

    def __init__(self, p: Proctor, token: str) -> None:
        self.events: list[dict] = []
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(p, token), daemon=True)
        self._thread.start()
        assert self.connected.wait(10), "the event stream did not open"

    def _run(self, p: Proctor, token: str) -> None:
        try:
            self._read(p, token)
        except httpx.HTTPError:
            pass  # the replica stopped at the end of the test

    def _read(self, p: Proctor, token: str) -> None:
        with httpx.stream("GET", f"{p.control_url}/v1/approvals/events", headers={"Authorization": f"Bearer {token}"},
                          timeout=httpx.Timeout(10, read=60)) as r:
            event = None
            for line in r.iter_lines():
                if line.startswith(": connected"):
                    self.connected.set()
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "approval":
                    self.events.append(json.loads(line[6:]))
                if self._stop.is_set():
                    return

    def of(self, approval_id: str) -> list[str]:
        return [e["event"] for e in self.events if e["approval"]["id"] == approval_id]


def test_every_replica_sees_and_explains_every_replicas_decisions(fleet, idp, upstream) -> None:
    a, b, c = fleet("replica-a"), fleet("replica-b"), fleet("replica-c")
    reader, alice, olga = idp.token("fleet-reader", ttl=600), approver_token(idp, "alice", MANAGERS), operator(idp)
    on_a, on_b = read(a, reader), read(b, reader)
    refused = httpx.get(f"{c.gateway_url}/svc/items/1", timeout=10)  # no token: refused before any policy
    assert refused.status_code == 401
    on_c = refused.headers["X-Proctor-Decision-Id"]

    # B's activity view holds the decisions of all three, each naming its replica, newest first
    def fleet_rows() -> dict[str, dict]:
        doc = activity(b, alice, record="decision")
        assert doc["incomplete"] is False and doc["missing"] == [] and doc["replica"] == "replica-b"
        assert doc["replicas"] == ["replica-a", "replica-b", "replica-c"]
        return {e["decision_id"]: e for e in doc["events"]}

    wait_for(lambda: {on_a, on_b, on_c} <= set(fleet_rows()), timeout=10, what="every replica's decisions on B")
    rows = fleet_rows()
    assert [rows[d]["replica"] for d in (on_a, on_b, on_c)] == ["replica-a", "replica-b", "replica-c"]
    assert rows[on_a]["decision"] == "allow" and rows[on_c]["refusal"] == "authentication"
    times = [e["time"] for e in activity(b, alice)["events"]]
    assert times == sorted(times, reverse=True)
    # this replica only: B's own
    mine = activity(b, alice, scope="replica", record="decision")
    assert {e["replica"] for e in mine["events"]} == {"replica-b"} and "replicas" not in mine

    # paging through the fleet with the cursor, one event a page: every event once, newest first
    everything = activity(c, alice, limit=1000)
    seen: list[tuple[str, int]] = []
    page = activity(c, alice, limit=1)
    for _ in range(200):
        seen += [(e["replica"], e["sequence"]) for e in page["events"]]
        if page["next_cursor"] is None:
            break
        page = activity(c, alice, limit=1, cursor=page["next_cursor"])
    assert seen == [(e["replica"], e["sequence"]) for e in everything["events"]]
    assert len(set(seen)) == len(seen) and {r for r, _ in seen} == {"replica-a", "replica-b", "replica-c"}
    bad = httpx.get(f"{b.control_url}/v1/activity", params={"cursor": "not-a-cursor"},
                    headers={"Authorization": f"Bearer {alice}"}, timeout=10)
    assert bad.status_code == 400 and "cursor" in bad.json()["detail"]

    # explain A's decision through C's control API: A explains it under its policies
    out = explain_cli(c, on_a, olga, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["decision_id"] == on_a and doc["replica"] == "replica-a"
    assert doc["recorded"]["decision"] == "allow" and doc["now"]["decision"] == "allow"
    assert "agents-read-items" in doc["recorded"]["reasons"]
    text = explain_cli(b, on_a, olga)
    assert text.returncode == 0 and on_a in text.stdout and "replica    replica-a" in text.stdout, text.stdout
    unknown = explain_cli(b, "no-such-decision", olga)
    assert unknown.returncode == 1 and "No such decision" in unknown.stderr
    nothing = explain_cli(a, on_c, olga)
    assert nothing.returncode == 1 and "Nothing to explain" in nothing.stderr and "refused before" in nothing.stderr
    # approvers are not operators: explain shows the recorded inputs
    assert explain_cli(a, on_a, alice).returncode == 1

    # the agents view counts the reader's requests on every replica
    def reader_requests() -> int:
        r = httpx.get(f"{b.control_url}/v1/agents", headers={"Authorization": f"Bearer {olga}"}, timeout=10)
        return next((x["requests"] for x in r.json()["agents"] if x["id"] == "fleet-reader"), 0)

    read(c, reader)
    wait_for(lambda: reader_requests() == 3, timeout=10, what="three requests on three replicas counted")

    # a hold on A and its approval on C reach B's event stream
    stream = Stream(b, alice)
    with agent_client(a, agent_token(idp)) as client:
        held = client.post(order_url(upstream), json=order(marker()))
    assert held.status_code == 202, held.text
    aid = held.json()["approval_id"]
    wait_for(lambda: stream.of(aid) == ["requested"], timeout=10, what="B streams A's hold")
    assert vote(c, aid, alice).status_code == 200
    wait_for(lambda: stream.of(aid) == ["requested", "approved"], timeout=10, what="B streams C's approval")
    assert [e["approval"]["state"] for e in stream.events if e["approval"]["id"] == aid] == ["pending", "approved"]

    # every record line and every audit event names the replica that wrote it
    for p in (a, b, c):
        name = p.dir.name
        lines = p.decisions()
        assert lines and {r.get("replica") for r in lines} == {name}
        events = audit_events(p)
        assert events and {e["unmapped"]["proctor"].get("replica") for e in events} == {name}
        assert {e["metadata"]["loggers"][0]["device"]["name"] for e in events} == {name}
    assert any(r.get("type") == "approval" for r in a.decisions())  # (event lines too)


def test_a_replica_that_does_not_answer_leaves_the_view_partial_never_hanging(fleet, idp) -> None:
    a, b, c = fleet("replica-a"), fleet("replica-b"), fleet("replica-c")
    reader, alice, olga = idp.token("fleet-reader", ttl=600), approver_token(idp, "alice", MANAGERS), operator(idp)
    on_a, on_c = read(a, reader), read(c, reader)
    wait_for(lambda: on_c in {e.get("decision_id") for e in activity(b, alice)["events"]}, timeout=10,
             what="C's decision on B")

    # C stops answering (SIGSTOP: its port still accepts, nothing answers): B answers within its timeout
    os.kill(c.proc.pid, signal.SIGSTOP)
    started = time.monotonic()
    doc = activity(b, alice)
    assert time.monotonic() - started < 8
    assert doc["incomplete"] is True and doc["replicas"] == ["replica-a", "replica-b"]
    assert [m["replica"] for m in doc["missing"]] == ["replica-c"] and "no answer within" in doc["missing"][0]["error"]
    ids = {e.get("decision_id") for e in doc["events"]}
    assert on_a in ids and on_c not in ids
    # the cursor keeps C's place: once C answers again, paging goes on from where it was
    assert doc["next_cursor"] is not None
    # explain still finds A's decision; an unknown one is 404 naming the replica not asked
    out = explain_cli(b, on_a, olga, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["replica"] == "replica-a", out.stderr
    r = httpx.get(f"{b.control_url}/v1/decisions/nope/explain", headers={"Authorization": f"Bearer {olga}"},
                  timeout=30)
    assert r.status_code == 404 and r.json()["incomplete"] is True
    assert [m["replica"] for m in r.json()["missing"]] == ["replica-c"] and "replica-c" in r.json()["detail"]

    # C gone (its port closed) while the store still lists it: refused at once, flagged
    os.kill(c.proc.pid, signal.SIGCONT)
    c.stop()
    started = time.monotonic()
    doc = activity(b, alice)
    assert time.monotonic() - started < 5
    assert doc["incomplete"] is True and [m["replica"] for m in doc["missing"]] == ["replica-c"]
    assert "unreachable" in doc["missing"][0]["error"]
    # once the store stops listing it (three heartbeats), the view is complete again without it
    wait_for(lambda: activity(b, alice)["incomplete"] is False, timeout=25, what="C no longer listed")
    assert activity(b, alice)["replicas"] == ["replica-a", "replica-b"]
    assert Path(c.dir / "state" / "decisions.jsonl").exists()
