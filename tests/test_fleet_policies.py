"""One policy set for the fleet (docs/policies.md, "One policy set for the fleet"), with real
proxies sharing one PostgreSQL schema, each with its own policy directory and state directory:
the first replica seeds the store and the others follow it whatever their own directories hold;
`proctor policy push` reaches every replica; a rollback on one replica rolls every replica back;
a broken push changes nothing; `/v1/policies` lists each replica's revision and flags one that
disagrees; directory mode (the default) publishes what it loads, so a follower follows it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import DATA, Proctor, start_proctor, wait_for
from test_store import PG_DSN, PG_SKIP, _pg_admin

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)]

FORBID_READS = """
@id("fleet-no-reads")
forbid (principal, action == Action::"test.item.read", resource);
"""


@pytest.fixture
def fleet(tmp_path, idp, pki, upstream, upstream_tls):
    schema = "proctor_fleet_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    env = {"PROCTOR_TEST_FLEET_STORE": f"{PG_DSN}{sep}schema={schema}"}
    started: list[Proctor] = []

    def start(name: str, policies: Path = DATA / "policies", source: str = "store", connectors: list | None = None,
              poll: float = 0.2, **overrides) -> Proctor:
        cfg = {"store": {"url_env": "PROCTOR_TEST_FLEET_STORE"}, "replica_id": name,
               "policies": {"dir": "policies", "reload_interval_seconds": poll, "source": source,
                            "heartbeat_seconds": 0.5}, **overrides}
        p = start_proctor(tmp_path / name, idp, pki, upstream, upstream_tls, cfg, policies_src=policies, env=env,
                          extra_connectors=connectors)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()
    asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def operator(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def read(p: Proctor, token: str) -> int:
    return httpx.get(f"{p.gateway_url}/svc/items/1", headers={"Authorization": f"Bearer {token}"},
                     timeout=10).status_code


def status(p: Proctor) -> dict:
    return httpx.get(f"{p.control_url}/v1/policies", timeout=10).json()


def variant(tmp_path: Path, name: str, extra: str) -> Path:
    d = tmp_path / name
    shutil.copytree(DATA / "policies", d)
    (d / "extra.cedar").write_text(extra)
    return d


def test_replicas_follow_pushes_and_rollbacks_as_one(fleet, idp, tmp_path) -> None:
    a = fleet("replica-a")
    seed = status(a)["active_revision"]
    # b's and c's own directories forbid reads; they follow the store's revision (a's) anyway
    other = variant(tmp_path, "other-seed", FORBID_READS)
    b, c = fleet("replica-b", other), fleet("replica-c", other)
    token = idp.token("fleet-reader")
    assert [read(p, token) for p in (a, b, c)] == [200, 200, 200]
    for p in (a, b, c):
        doc = status(p)
        assert doc["active_revision"] == seed and doc["fleet"]["active_revision"] == seed
    wait_for(lambda: {r["replica_id"] for r in status(c)["fleet"]["replicas"]} == {"replica-a", "replica-b",
                                                                                    "replica-c"},
             timeout=10, what="three replicas listed")
    assert status(c)["fleet"]["disagreeing"] == []

    # push a set that forbids reads, through the CLI against replica b
    pushed = variant(tmp_path, "pushed", FORBID_READS)
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "policy", "push", str(pushed), "--reason",
                          "freeze reads", "--url", b.control_url, "--token", operator(idp)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "the fleet's active revision is now" in out.stdout
    new = status(b)["active_revision"]
    assert new != seed
    wait_for(lambda: all(read(p, token) == 403 for p in (a, b, c)), timeout=10, what="every replica refuses reads")
    assert {status(p)["active_revision"] for p in (a, b, c)} == {new}
    refused = httpx.get(f"{a.gateway_url}/svc/items/1", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert refused.json()["reasons"] == ["fleet-no-reads"]

    # roll back on replica c: every replica enforces the seed again
    r = httpx.post(f"{c.control_url}/v1/policies/rollback", json={"revision": seed, "reason": "too strict"},
                   headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["active_revision"] == seed and r.json()["previous_revision"] == new
    wait_for(lambda: all(read(p, token) == 200 for p in (a, b, c)), timeout=10, what="every replica reads again")
    assert {status(p)["active_revision"] for p in (a, b, c)} == {seed}
    wait_for(lambda: status(a)["fleet"]["disagreeing"] == [], timeout=10, what="the heartbeats")

    # the push and the rollback are in the audit trail of the replicas that did them
    events = [d for d in b.decisions() if d.get("type") == "policy"]
    assert [(e["event"], e["to_revision"], e["reason"]) for e in events] == [("push", new, "freeze reads")]
    assert "extra.cedar" in events[0]["files_changed"]


def test_a_broken_push_changes_nothing_and_a_disagreeing_replica_is_flagged(fleet, idp, tmp_path) -> None:
    a = fleet("replica-a")
    seed = status(a)["active_revision"]
    broken = variant(tmp_path, "broken", '@id("bad")\npermit (principal, action == Action::"no.such.action", resource);')
    r = httpx.post(f"{a.control_url}/v1/policies/push",
                   json={"files": {p.name: p.read_text() for p in broken.iterdir()}, "reason": "oops"},
                   headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=30)
    assert r.status_code == 422 and "no.such.action" in r.text, r.text
    assert status(a)["active_revision"] == seed and status(a)["fleet"]["active_revision"] == seed
    bad_names = httpx.post(f"{a.control_url}/v1/policies/push",
                           json={"files": {"../evil.cedar": "x", "schema.cedarschema": ""}, "reason": "x"},
                           headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=30)
    assert bad_names.status_code == 422 and "plain file name" in bad_names.text
    # not an operator: refused
    agent = httpx.post(f"{a.control_url}/v1/policies/push", json={"files": {}, "reason": "x"},
                       headers={"Authorization": f"Bearer {idp.token('sneaky-bot')}"}, timeout=30)
    assert agent.status_code in (401, 403)

    # a replica whose connectors differ loads the fleet revision as another revision: flagged
    extra = {"name": "extra", "hosts": ["extra.internal"], "routes": [
        {"method": "GET", "path": "/x", "action": "extra.thing.read", "resource": {"type": "Item", "id": "x"}}]}
    b = fleet("replica-b", connectors=[extra])
    # (its extra connector adds an action to the generated schema: the same files hash to another revision)
    wait_for(lambda: "replica-b" in status(a)["fleet"]["disagreeing"], timeout=10, what="replica-b flagged")
    doc = status(b)
    assert doc["fleet"]["following"] == seed and doc["active_revision"] != seed
    assert doc["fleet"]["error"] is None  # it enforces the same files; its schema differs


def test_a_directory_mode_replica_publishes_what_it_loads(fleet, idp, tmp_path) -> None:
    writer_dir = variant(tmp_path, "writer", '@id("writer-extra")\npermit (principal, action == Action::"test.item.read", resource);\n')
    writer = fleet("writer", writer_dir, source="directory")
    follower = fleet("follower", variant(tmp_path, "follower-seed", FORBID_READS))
    token = idp.token("fleet-reader")
    assert read(follower, token) == 200  # it follows the writer's set, not its own seed
    (writer.policies_dir / "extra.cedar").write_text(FORBID_READS)  # the writer's watcher reloads and publishes
    wait_for(lambda: read(follower, token) == 403, timeout=10, what="the follower enforces the writer's edit")
    assert status(follower)["active_revision"] == status(writer)["active_revision"]
