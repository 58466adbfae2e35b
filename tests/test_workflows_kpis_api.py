"""GET /v1/workflows/kpis in process (aiohttp test server, a real SQLite store, an injected clock):
the document is exactly the one computed by hand in tests/test_workflows_kpis_unit.py and
matches the OpenAPI schema; the default window follows the clock; answers are shared for a
few seconds; a store failure is 503 and is not kept.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import jsonschema
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.config import load_config
from proxy.control.openapi import OPENAPI
from proxy.control.workflows_api import add_workflow_routes
from proxy.identity.dev_issuer import DevIssuer
from proxy.server import build_runtime
from proxy.store import StoreError
from proxy.workflows.spec import Workflows
from test_workflows_kpis_store import record_timeline
from test_workflows_kpis_unit import HOUR, NOW, ORDERS, QUIET, T0, kpis


@pytest.fixture
def runtime(tmp_path: Path):
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": "state", "control": {"listen": {"host": "127.0.0.1", "port": 0}}}))
    rt = build_runtime(load_config(cfg))
    rt.workflows = Workflows((ORDERS, QUIET))
    return rt


def person(runtime, user: str = "ann", *groups: str) -> dict[str, str]:
    cfg = runtime.config
    token = DevIssuer(cfg.dev_issuer_dir, cfg.dev_issuer).issue(
        user, {cfg.approvals.approver_groups_claim: list(groups or ("managers",))}, "5m",
        audience=cfg.approvals.approver_audience)
    return {"Authorization": f"Bearer {token}"}


def validate(doc: dict) -> None:
    root = {**OPENAPI, "$ref": "#/components/schemas/KpiDocument"}
    jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker()).validate(doc)


def test_the_document_over_http(runtime) -> None:
    clock = iter([NOW, NOW + 1, NOW + 2, NOW + 3, NOW + 4, NOW + 5, NOW + 6])
    who = person(runtime)

    async def run() -> None:
        await runtime.store.open()
        try:
            await record_timeline(runtime.store)
            app = web.Application()
            add_workflow_routes(app, runtime, clock=lambda: next(clock))
            async with TestClient(TestServer(app)) as client:
                q = {"workflow": "orders", "since": "2027-01-15T08:00:00Z", "until": str(int(T0 + 4 * HOUR)),
                     "bucket_seconds": "3600"}
                r = await client.get("/v1/workflows/kpis", params=q, headers=who)
                assert r.status == 200, await r.text()
                doc = await r.json()
                validate(doc)
                assert doc == kpis()  # the clock said NOW: generated_at too
                # every workflow, the default window: the 7 days before the clock's now, on the hour
                r = await client.get("/v1/workflows/kpis", headers=who)
                doc = await r.json()
                validate(doc)
                assert [w["name"] for w in doc["workflows"]] == ["orders", "quiet"]
                assert (doc["since"], doc["until"]) == ("2027-01-08T12:00:00.000Z", "2027-01-15T12:00:01.000Z")
                assert doc["workflows"][0]["instances"]["completed"] == 4  # G, C, A, B
                # asked again at once: the same answer (computed once)
                again = await (await client.get("/v1/workflows/kpis", headers=who)).json()
                assert again == doc
                # another question is computed anew
                other = await (await client.get("/v1/workflows/kpis", params={"bucket_seconds": "86400"},
                                                headers=who)).json()
                assert other["bucket_seconds"] == 86400 and other["generated_at"] != doc["generated_at"]
        finally:
            await runtime.store.close()

    asyncio.run(run())


def test_a_store_failure_is_503_and_not_kept(runtime, monkeypatch) -> None:
    who = person(runtime)

    async def run() -> None:
        await runtime.store.open()
        try:
            app = web.Application()
            add_workflow_routes(app, runtime, clock=lambda: NOW)
            real = runtime.store.list_workflow_instances

            async def down(**kw):
                raise StoreError("state store: connection refused")

            async with TestClient(TestServer(app)) as client:
                monkeypatch.setattr(runtime.store, "list_workflow_instances", down)
                r = await client.get("/v1/workflows/kpis", headers=who)
                assert r.status == 503 and r.content_type == "application/problem+json"
                assert "connection refused" not in await r.text()  # the store's words stay in the log
                monkeypatch.setattr(runtime.store, "list_workflow_instances", real)
                r = await client.get("/v1/workflows/kpis", headers=who)
                assert r.status == 200
                validate(await r.json())
        finally:
            await runtime.store.close()

    asyncio.run(run())
