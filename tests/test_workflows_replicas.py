"""Two Proctor processes on one PostgreSQL store work steps of the same workflow instances
(docs/workflows.md): no update is lost, both see one instance, and the order is enforced
from either replica."""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import start_proctor
from test_workflows import ORDERS, call, flow_connector, header, operator, setup_dirs, work  # noqa: F401

pytestmark = pytest.mark.integration
PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")


@pytest.mark.skipif(not PG_DSN, reason="PROCTOR_TEST_POSTGRES_DSN not set (CI sets it)")
def test_two_replicas_on_postgres_share_instances_and_lose_no_step(tmp_path, idp, pki, upstream, upstream_tls,
                                                                   work) -> None:  # noqa: F811
    import asyncpg

    schema = "proctor_wf_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    env = {"PROCTOR_TEST_WF_STORE": f"{PG_DSN}{sep}schema={schema}"}
    procs = []
    try:
        for i in range(2):
            base = tmp_path / f"r{i}"
            base.mkdir()
            pol, wdir = setup_dirs(base, [ORDERS])
            procs.append(start_proctor(base / "p", idp, pki, upstream, upstream_tls,
                                       {"workflows_dir": str(wdir), "store": {"url_env": "PROCTOR_TEST_WF_STORE"}},
                                       policies_src=pol, extra_connectors=[flow_connector(work.port)], env=env))
        a, b = procs
        # started on replica A; the quote is refused on B before it exists anywhere, then passes on B
        r = call(a, work, idp, "alice", "/requests")
        inst, req_no = header(r)["instance"], r.json()["n"]
        assert call(b, work, idp, "bob", "/requests/not-a-request/quotes").status_code == 409
        # twelve quotes (rework) on the same instance from both replicas at once: every one counted
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda n: call(procs[n % 2], work, idp, f"agent-{n}", f"/requests/{req_no}/quotes"),
                                    range(12)))
        assert [x.status_code for x in results] == [201] * 12
        assert {header(x)["instance"] for x in results} == {inst}
        for p in procs:
            got = httpx.get(f"{p.control_url}/v1/workflows/instances/{inst}",
                            headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=10).json()
            assert got["tally"]["quote"]["completions"] == 12 and got["tally"]["request"]["completions"] == 1
            assert len(got["events"]) == 13 and got["completed"] == ["request", "quote"]
        # an order from either replica finds the instance through any of the twelve quotes
        quote_no = results[7].headers["Location"].rsplit("/", 1)[1]
        o = call(b, work, idp, "carol", f"/quotes/{quote_no}/orders")
        assert o.status_code == 201 and header(o)["instance"] == inst
    finally:
        for p in procs:
            p.stop()

        async def drop() -> None:
            conn = await asyncpg.connect(PG_DSN, timeout=10)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())
