"""Three replicas as one control plane (issue 15), end to end with real processes on one
PostgreSQL schema, each with its own policy directory and state directory: a policy push and a
rollback reach all three; an approval held on one replica is decided on another and released
on the third, exactly once; a suspension made on one is enforced by the others; one replica is
killed mid-run and the others carry on (its held approval survives in the store); one replica's
store connection is cut and restored: it refuses (503, not ready) while cut off, then enforces
what was decided meanwhile."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import Proctor, start_proctor, wait_for
from test_approvals import hold_policies  # noqa: F401  (the fixture)
from test_fleet_policies import FORBID_READS, operator, read, status
from test_store import PG_DSN, PG_SKIP, _pg_admin

sys.path.insert(0, str(Path(__file__).parent))
from support.blackhole import Blackhole  # noqa: E402
from test_store_partition import pg_target, via  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)]


def order_body(mark: str) -> dict:
    return {"order": {"total": 750, "items": [{"sku": "A-1"}], "marker": mark}}


def order(p: Proctor, upstream, agent: str, token: str, mark: str) -> httpx.Response:
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=30) as c:
        return c.post(f"http://127.0.0.1:{upstream.port}/tenants/7/orders", json=order_body(mark))


def test_three_replicas_behave_as_one(tmp_path, idp, pki, upstream, upstream_tls, hold_policies) -> None:  # noqa: F811
    schema = "proctor_e2e_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in (PG_DSN or "") else "?"
    host, port, _ = pg_target()
    bh = Blackhole(host, port)
    started: list[Proctor] = []

    def start(name: str, store_url: str) -> Proctor:
        seed = tmp_path / f"seed-{name}"
        shutil.copytree(hold_policies, seed)  # its own policy directory (only the seed)
        cfg = {"store": {"url_env": "PROCTOR_TEST_E2E_STORE", "staleness_seconds": 3},
               "replica_id": name,
               "policies": {"dir": "policies", "reload_interval_seconds": 0.5, "source": "store",
                            "heartbeat_seconds": 0.5},
               "approvals": {"mode": "async", "expire_after_seconds": 120}}
        p = start_proctor(tmp_path / name, idp, pki, upstream, upstream_tls, cfg, policies_src=seed,
                          env={"PROCTOR_TEST_E2E_STORE": store_url})
        started.append(p)
        return p

    try:
        a = start("replica-a", f"{PG_DSN}{sep}schema={schema}")
        b = start("replica-b", f"{PG_DSN}{sep}schema={schema}")
        c = start("replica-c", via(bh, schema))
        op = operator(idp)
        manager = idp.token("mia", aud="proctor-approvers", approval_groups=["managers"], ttl=600)
        reader = idp.token("e2e-reader")
        wait_for(lambda: len(status(a)["fleet"]["replicas"]) == 3 and not status(a)["fleet"]["disagreeing"],
                 timeout=15, what="three replicas agreeing")

        # -- a push on A reaches all three; a rollback on C brings all three back ---------------
        seed_revision = status(a)["active_revision"]
        files = {p.name: p.read_text() for p in hold_policies.iterdir() if p.is_file()}
        files["freeze.cedar"] = FORBID_READS
        r = httpx.post(f"{a.control_url}/v1/policies/push", json={"files": files, "reason": "freeze"},
                       headers={"Authorization": f"Bearer {op}"}, timeout=30)
        assert r.status_code == 200, r.text
        wait_for(lambda: all(read(p, reader) == 403 for p in (a, b, c)), timeout=10, what="the push everywhere")
        r = httpx.post(f"{c.control_url}/v1/policies/rollback", json={"revision": seed_revision, "reason": "undo"},
                       headers={"Authorization": f"Bearer {op}"}, timeout=30)
        assert r.status_code == 200, r.text
        wait_for(lambda: all(read(p, reader) == 200 for p in (a, b, c)), timeout=10, what="the rollback everywhere")

        # -- held on A, approved on B, released on C, exactly once ------------------------------
        buyer = idp.token("e2e-buyer", groups=["writers"], ttl=600)
        mark = "e2e-" + uuid.uuid4().hex
        held = order(a, upstream, "e2e-buyer", buyer, mark)
        assert held.status_code == 202, held.text
        aid = held.json()["approval_id"]
        r = httpx.post(f"{b.control_url}/v1/approvals/{aid}/approve", json={"reason": "fine"},
                       headers={"Authorization": f"Bearer {manager}"}, timeout=10)
        assert r.status_code == 200, r.text
        released = order(c, upstream, "e2e-buyer", buyer, mark)
        assert released.status_code == 201 or released.status_code == 200, released.text
        again = order(a, upstream, "e2e-buyer", buyer, mark)
        assert again.status_code == 409, again.text  # already forwarded: never a second upstream call
        assert len([e for e in upstream.received() if mark in e["body"]]) == 1

        # -- a suspension on B is enforced by A and C ----------------------------------------
        rogue = idp.token("e2e-rogue")
        assert read(a, rogue) == 200
        r = httpx.post(f"{b.control_url}/v1/agents/e2e-rogue/suspend", json={"reason": "loop"},
                       headers={"Authorization": f"Bearer {op}"}, timeout=10)
        assert r.status_code == 201, r.text
        wait_for(lambda: read(a, rogue) == 403 and read(c, rogue) == 403, timeout=3, what="suspended everywhere")

        # -- B is killed mid-run with an approval pending on it; A and C carry on --------------
        mark2 = "e2e-" + uuid.uuid4().hex
        pending = order(b, upstream, "e2e-buyer", buyer, mark2)
        assert pending.status_code == 202
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
        assert read(a, reader) == 200 and read(c, reader) == 200
        r = httpx.post(f"{a.control_url}/v1/approvals/{pending.json()['approval_id']}/approve",
                       json={"reason": "ok"}, headers={"Authorization": f"Bearer {manager}"}, timeout=10)
        assert r.status_code == 200, r.text
        assert order(c, upstream, "e2e-buyer", buyer, mark2).status_code in (200, 201)
        wait_for(lambda: "replica-b" not in {x["replica_id"] for x in status(a)["fleet"]["replicas"]},
                 timeout=10, what="the killed replica leaves the fleet view")

        # -- C is cut off from the store: refuses and is not ready; then catches up -------------
        late = idp.token("e2e-late")
        assert read(c, late) == 200
        bh.cut()
        cut_at = time.monotonic()
        wait_for(lambda: httpx.get(f"{c.control_url}/readyz", timeout=10).status_code == 503, timeout=15,
                 what="the cut-off replica not ready")
        assert read(c, late) == 503
        r = httpx.post(f"{a.control_url}/v1/agents/e2e-late/suspend", json={"reason": "meanwhile"},
                       headers={"Authorization": f"Bearer {op}"}, timeout=10)
        assert r.status_code == 201
        assert time.monotonic() - cut_at < 15
        bh.restore()
        wait_for(lambda: httpx.get(f"{c.control_url}/readyz", timeout=10).status_code == 200, timeout=30,
                 what="the replica ready again")
        assert read(c, late) == 403  # the suspension made while it was cut off
        assert read(c, reader) == 200
    finally:
        for p in started:
            p.stop()
        bh.close()
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        os.environ.pop("PROCTOR_TEST_E2E_STORE", None)
