"""The process-mining export through a real proxy (docs/workflows.md, "Process-mining export").

A real `proctor run` with the `orders` workflow of tests/test_workflows.py (request -> quote ->
order -> receipt over a real recording upstream) and its own state; agents drive two instances
through the proxy, then the history is exported as a user does it: `GET /v1/workflows/export`
with an operator token, and `proctor workflows export` (through the control API, and --direct
from the store). The OCEL 2.0 log is validated against the schema in tests/data/ocel2/ and the
specification's prose rules; the qualified links and the CSV rows are checked one by one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Proctor
from test_workflow_export_unit import assert_valid, rel
from test_workflows import Work, call, header, operator, start, work  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.integration

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "proctor_token", "proctor_control_url")}


@pytest.fixture(scope="module")
def xp(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[Proctor]:  # noqa: F811
    p = start(tmp_path_factory.mktemp("wf-export"), idp, pki, upstream, upstream_tls, work)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def story(xp: Proctor, work: Work, idp) -> dict[str, str]:  # noqa: F811
    """Instance A: alice requests, bob quotes, alice's order fails (500) then passes, carol receives (complete).
    Instance B: bob requests, alice quotes (running)."""
    r = call(xp, work, idp, "alice", "/requests")
    a, req_a = header(r)["instance"], str(r.json()["n"])
    q = call(xp, work, idp, "bob", f"/requests/{req_a}/quotes")
    quote_a = q.headers["Location"].rsplit("/", 1)[1]
    assert call(xp, work, idp, "alice", f"/quotes/{quote_a}/orders", status=500).status_code == 500
    o = call(xp, work, idp, "alice", f"/quotes/{quote_a}/orders")
    assert o.status_code == 201, o.text
    order_a = str(o.json()["n"])
    done = call(xp, work, idp, "carol", f"/orders/{order_a}/receipts")
    assert done.status_code == 201 and header(done)["instance"] == a
    r = call(xp, work, idp, "bob", "/requests")
    b, req_b = header(r)["instance"], str(r.json()["n"])
    q = call(xp, work, idp, "alice", f"/requests/{req_b}/quotes")
    assert q.status_code == 201 and header(q)["instance"] == b
    return {"a": a, "b": b, "req_a": req_a, "quote_a": quote_a, "order_a": order_a, "req_b": req_b,
            "quote_b": q.headers["Location"].rsplit("/", 1)[1]}


def export(p: Proctor, idp, **query: str) -> httpx.Response:
    return httpx.get(f"{p.control_url}/v1/workflows/export", params=query,
                     headers={"Authorization": f"Bearer {operator(idp)}"}, timeout=30)


def cli(p: Proctor, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "workflows", "export", *args, "-c", str(p.config_path)],
                          capture_output=True, text=True, timeout=120, cwd=str(p.dir), env=CLEAN_ENV)


def events_of(doc: dict[str, Any], instance: str) -> list[dict[str, Any]]:
    return [e for e in doc["events"] if rel(instance, "instance") in e["relationships"]]


def attr(e: dict[str, Any], name: str) -> str | None:
    return next((a["value"] for a in e["attributes"] if a["name"] == name), None)


def test_ocel_export_through_the_api(xp: Proctor, idp, story: dict[str, str]) -> None:
    r = export(xp, idp, format="ocel2", workflow="orders")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["content-disposition"] == 'attachment; filename="proctor-workflows-orders.ocel.json"'
    doc = r.json()
    assert_valid(doc)
    a, b = story["a"], story["b"]
    ev_a = events_of(doc, a)
    assert [e["type"] for e in ev_a] == ["request", "quote", "order failed", "order", "receipt"]
    assert [attr(e, "agent") for e in ev_a] == ["alice", "bob", "alice", "alice", "carol"]
    assert [attr(e, "status") for e in ev_a] == ["201", "201", "500", "201", "201"]
    assert attr(ev_a[3], "cost") == "2.50" and attr(ev_a[2], "cost") == "0.50"  # per call 0.50, per completion 2
    assert all(attr(e, "currency") == "EUR" for e in ev_a)
    req, quote, order = f"Request:{story['req_a']}", f"Quote:{story['quote_a']}", f"Order:{story['order_a']}"
    assert ev_a[0]["relationships"] == [rel(a, "instance"), rel(req, "creates"), rel("Agent:alice", "performed-by")]
    assert ev_a[1]["relationships"] == [rel(a, "instance"), rel(req, "names"), rel(quote, "creates"),
                                        rel("Agent:bob", "performed-by")]
    assert ev_a[2]["relationships"] == [rel(a, "instance"), rel(quote, "names"), rel("Agent:alice", "performed-by")]
    assert ev_a[3]["relationships"] == [rel(a, "instance"), rel(quote, "names"), rel(order, "creates"),
                                        rel("Agent:alice", "performed-by")]
    assert ev_a[4]["relationships"] == [rel(a, "instance"), rel(order, "names"), rel("Agent:carol", "performed-by")]
    assert [e["type"] for e in events_of(doc, b)] == ["request", "quote"]
    objects = {o["id"]: o for o in doc["objects"]}
    for oid in (req, quote, order):
        assert objects[oid]["relationships"] == [rel(a, "part-of")]
    assert objects[f"Request:{story['req_b']}"]["relationships"] == [rel(b, "part-of")]
    states = [(x["value"], x["time"]) for x in objects[a]["attributes"] if x["name"] == "state"]
    assert [s for s, _ in states] == ["running", "completed"] and states[1][1] == ev_a[4]["time"]
    assert [x["value"] for x in objects[b]["attributes"] if x["name"] == "state"] == ["running"]
    assert {"Agent:alice", "Agent:bob", "Agent:carol"} <= set(objects)
    # the window: from the failed order on (an ISO time), until before the receipt (epoch seconds)
    since = ev_a[2]["time"]
    until = ev_a[4]["time"]
    from proxy.workflows.export import parse_when

    w = export(xp, idp, since=since, until=str(parse_when(until)))
    assert w.status_code == 200, w.text
    window = w.json()
    assert_valid(window)
    assert [e["type"] for e in events_of(window, a)] == ["order failed", "order"]
    assert {e["id"] for e in window["events"]} == {e["id"] for e in doc["events"]
                                                   if parse_when(since) <= parse_when(e["time"]) < parse_when(until)}


def test_csv_export_through_the_api(xp: Proctor, idp, story: dict[str, str]) -> None:
    r = export(xp, idp, format="csv")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == 'attachment; filename="proctor-workflows.csv"'
    rows = list(csv.DictReader(io.StringIO(r.text, newline=""), strict=True))
    mine = [r for r in rows if r["case_id"] in (story["a"], story["b"])]
    assert [(r["case_id"], r["activity"], r["resource"], r["outcome"], r["status"]) for r in mine] == [
        (story["a"], "request", "alice", "completed", "201"), (story["a"], "quote", "bob", "completed", "201"),
        (story["a"], "order failed", "alice", "failed", "500"), (story["a"], "order", "alice", "completed", "201"),
        (story["a"], "receipt", "carol", "completed", "201"), (story["b"], "request", "bob", "completed", "201"),
        (story["b"], "quote", "alice", "completed", "201")]
    assert all(r["timestamp"].endswith("Z") and r["decision_id"] and r["workflow"] == "orders" for r in mine)
    assert json.loads(mine[3]["objects"]) == [f"Quote:{story['quote_a']}", f"Order:{story['order_a']}"]
    assert [r["timestamp"] for r in mine[:5]] == sorted(r["timestamp"] for r in mine[:5])
    # each row's decision is the one the audit trail has
    assert xp.decision(mine[2]["decision_id"])["workflow"] == {"name": "orders", "instance": story["a"],
                                                                "step": "order"}


def test_cli_export_through_the_api_and_direct(xp: Proctor, idp, story: dict[str, str], tmp_path: Path) -> None:
    api_doc = export(xp, idp, format="ocel2").json()
    out = tmp_path / "log.ocel.json"
    r = cli(xp, "--format", "ocel2", "-o", str(out), "--as", "olga", "--group", "proctor-admins")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"wrote {out} (ocel2, ")
    doc = json.loads(out.read_text())
    assert_valid(doc)
    assert doc == api_doc
    assert not list(tmp_path.glob(".log.ocel.json.*.part"))
    # CSV to standard output
    r = cli(xp, "--format", "csv", "--workflow", "orders", "--as", "olga", "--group", "proctor-admins")
    assert r.returncode == 0, r.stderr
    assert r.stdout == export(xp, idp, format="csv", workflow="orders").text.replace("\r\n", "\n")  # text mode
    # straight from the store (the proxy's SQLite file, the proxy still running): the same log, no token
    direct = tmp_path / "direct.json"
    r = cli(xp, "--direct", "-o", str(direct))
    assert r.returncode == 0, r.stderr
    assert json.loads(direct.read_text()) == api_doc
    r = cli(xp, "--direct", "--format", "csv", "--since", "1h")
    assert r.returncode == 0, r.stderr
    assert {row["case_id"] for row in csv.DictReader(io.StringIO(r.stdout))} >= {story["a"], story["b"]}


def test_refusals(xp: Proctor, idp, tmp_path: Path) -> None:
    url = f"{xp.control_url}/v1/workflows/export"
    r = httpx.get(url, timeout=10)
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    r = httpx.get(url, params={"format": "ocel2"}, headers={"Authorization": "Bearer not-a-token"}, timeout=10)
    assert r.status_code == 401
    r = export(xp, idp, workflow="nope")
    assert r.status_code == 404 and r.json()["title"] == "No such workflow"
    for query, field in (({"since": "yesterday"}, "since"), ({"until": "2026-13-01T00:00:00Z"}, "until"),
                         ({"format": "xes"}, "format"), ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01"},
                                                         "until")):
        r = export(xp, idp, **query)
        assert r.status_code == 400, (query, r.text)
        assert [e["field"] for e in r.json()["errors"]] == [field], r.json()
    # the CLI says what the API said, writes nothing, and checks its own arguments
    out = tmp_path / "x.json"
    r = cli(xp, "--workflow", "nope", "-o", str(out), "--as", "olga", "--group", "proctor-admins")
    assert r.returncode == 1 and "404 No such workflow" in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    r = cli(xp, "--since", "soon", "--as", "olga", "--group", "proctor-admins")
    assert r.returncode == 2 and "--since must be" in r.stderr
    r = cli(xp, "--store-url", "sqlite:///tmp/x.db")
    assert r.returncode == 2 and "--store-url goes with --direct" in r.stderr
    r = cli(xp, "--direct", "--store-url", f"sqlite://{tmp_path / 'none.db'}")
    assert r.returncode == 2 and "no state store at" in r.stderr
    r = cli(xp, "--direct", "--workflow", "nope")
    assert r.returncode == 2 and "no loaded workflow definition" in r.stderr
    r = cli(xp)  # no token: nothing is sent
    assert r.returncode == 2 and "no approver token" in r.stderr


def test_store_failures_are_503_or_an_incomplete_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control app in process on a real SQLite store that fails: before the first byte a 503 problem;
    after the CSV's first rows the transfer ends without its final chunk (never a short file that looks whole)."""
    import asyncio

    import aiohttp
    import yaml
    from aiohttp.test_utils import TestClient, TestServer

    from proxy.config import load_config
    from proxy.control.api import build_app
    from proxy.identity.dev_issuer import DevIssuer
    from proxy.server import build_runtime
    from proxy.store import StoreError
    from proxy.store.workflows import StepEvent, new_instance_id
    from proxy.workflows import export as ex

    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": "state", "control": {"listen": {"host": "127.0.0.1", "port": 0}}}))
    runtime = build_runtime(load_config(cfg))
    c = runtime.config
    token = DevIssuer(c.dev_issuer_dir, c.dev_issuer).issue(
        "olga", {c.approvals.approver_groups_claim: [c.control.admin_group]}, "5m", audience=c.approvals.approver_audience)
    auth = {"Authorization": f"Bearer {token}"}
    monkeypatch.setattr(ex, "EVENT_PAGE", 2)
    monkeypatch.setattr(ex, "CHUNK_CHARS", 10)

    async def main() -> None:
        store = runtime.store
        await store.open()
        try:
            inst = new_instance_id()
            for n in range(5):
                e = StepEvent(inst, "orders", "request", "flow.request.create", f"agent-{n}", f"d{n}", "completed", 201,
                              1_767_225_600.0 + n, 1.0)
                await store.record_workflow_event(e, required=["request"], links=[], create=n == 0)
            real_events, real_instance = store.workflow_events, store.workflow_instance
            calls = {"events": 0}

            async def events_failing_at(n: int, **kw: Any) -> Any:
                calls["events"] += 1
                if calls["events"] >= n:
                    raise StoreError("connection lost")
                return await real_events(**kw)

            async with TestClient(TestServer(build_app(runtime))) as client:
                ok = await client.get("/v1/workflows/export?format=csv", headers=auth)
                assert ok.status == 200 and len((await ok.text()).splitlines()) == 6
                for fmt, fail_at in (("ocel2", 1), ("ocel2", 3), ("csv", 1)):
                    calls["events"] = 0
                    monkeypatch.setattr(store, "workflow_events", lambda fail_at=fail_at, **kw: events_failing_at(
                        fail_at, **kw))
                    r = await client.get(f"/v1/workflows/export?format={fmt}", headers=auth)
                    assert r.status == 503 and r.content_type == "application/problem+json", (fmt, fail_at)
                    assert (await r.json())["title"] == "Store unavailable"

                async def no_instance(_: str) -> Any:
                    raise StoreError("connection lost")

                monkeypatch.setattr(store, "workflow_events", real_events)
                monkeypatch.setattr(store, "workflow_instance", no_instance)
                r = await client.get("/v1/workflows/export?format=ocel2", headers=auth)
                assert r.status == 503
                monkeypatch.setattr(store, "workflow_instance", real_instance)
                # CSV: the header and the first page are sent, then the store fails
                calls["events"] = 0
                monkeypatch.setattr(store, "workflow_events", lambda **kw: events_failing_at(3, **kw))
                r = await client.get("/v1/workflows/export?format=csv", headers=auth)
                assert r.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
        finally:
            await store.close()

    asyncio.run(main())
