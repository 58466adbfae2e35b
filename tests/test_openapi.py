"""The control API's OpenAPI document: valid OpenAPI 3.1, and unable to drift from the code.

- every route `build_app` registers is described (and nothing else is);
- approval bodies as `approval_json` makes them match the documented schemas;
- live answers of the real app (in process, on loopback) validate against them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from proxy.config import load_config
from proxy.control.api import build_app
from proxy.control.approvals_api import approval_json
from proxy.control.openapi import OPENAPI, add_openapi_route
from proxy.identity.dev_issuer import DevIssuer
from proxy.server import build_runtime
from proxy.store import Approval, Vote

# The console serves HTML pages for people, not API endpoints.
NOT_API_PREFIXES = ("/console",)


def test_document_is_valid_openapi_3_1():
    assert OPENAPI["openapi"].startswith("3.1.")
    validate(OPENAPI)


@pytest.fixture
def runtime(tmp_path: Path):
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": "state", "control": {"listen": {"host": "127.0.0.1", "port": 0}}}))
    return build_runtime(load_config(cfg))


def _routes(app) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method == "HEAD" or path.startswith(NOT_API_PREFIXES):
            continue
        out.add((route.method.lower(), path))
    return out


def _documented() -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    return {(m, path) for path, item in OPENAPI["paths"].items() for m in item if m in methods}


def _app(runtime):
    app = build_app(runtime)
    if ("get", "/v1/openapi.json") not in _routes(app):  # until build_app mounts it itself
        add_openapi_route(app)
    return app


def test_every_registered_route_is_documented_and_nothing_else(runtime):
    assert runtime.approvals is not None  # the approvals routes are mounted
    routes = _routes(_app(runtime))
    assert routes - _documented() == set(), "routes missing from proxy/control/openapi.py"
    assert _documented() - routes == set(), "documented endpoints the app does not serve"


def _schema(name: str) -> jsonschema.Draft202012Validator:
    root = {**OPENAPI, "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())


def _props(name: str) -> set[str]:
    schema = OPENAPI["components"]["schemas"][name]
    props = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        if "$ref" in part:
            props |= _props(part["$ref"].rsplit("/", 1)[1])
        props |= set(part.get("properties", {}))
    return props


def _approval(**kw) -> Approval:
    now = time.time()
    base = dict(
        id="apr_test",
        state="pending",
        created_at=now,
        expires_at=now + 3600,
        agent_id="writer-bot",
        action="test.order.create",
        resource_type="Order",
        resource_id="new",
        connector="testsvc",
        groups={"grp": 1, "finance": 2},
        fingerprint="ab" * 32,
        idempotency_key=None,
        mode="async",
        decision_id="dec_1",
        request={"method": "POST", "url": "http://svc/tenants/7/orders", "headers": {"content-type": "application/json"},
                 "body": '{\n  "order": {}\n}', "body_bytes": 12, "body_truncated": False},
        derived={
            "action": "test.order.create",
            "resource": 'Order::"new"',
            "resource_attributes": {"total": {"__extn": {"fn": "decimal", "arg": "1250.5"}}},
            "connector": "testsvc",
            "risk": "high",
            "route": "POST /tenants/{tenant}/orders",
            "context": {"params": {"tenant": 7}},
            "policies": ["needs-approval"],
        },
    )
    base.update(kw)
    return Approval(**base)


def test_approval_json_field_names_match_the_schemas():
    decided = _approval(
        state="approved", decided_at=time.time(), decided_by="alice", reason="ok", forwarded_at=None,
        votes=[Vote("alice", "finance,grp", "approve", "ok", time.time())],
    )
    for a in (_approval(), decided):
        summary, full = approval_json(a, full=False), approval_json(a)
        assert set(summary) == _props("ApprovalSummary")
        assert set(full) | {"you_may_decide"} == _props("Approval")
        _schema("ApprovalSummary").validate(summary)
        _schema("Approval").validate(full)
        for v in full["votes"]:
            assert set(v) == _props("Vote")
    assert approval_json(decided)["votes"][0]["groups"] == ["finance", "grp"]


def test_live_answers_match_the_document(runtime):
    cfg = runtime.config
    issuer = DevIssuer(cfg.dev_issuer_dir, cfg.dev_issuer)

    def approver(user: str, *groups: str) -> dict:
        token = issuer.issue(user, {cfg.approvals.approver_groups_claim: list(groups)}, "5m",
                             audience=cfg.approvals.approver_audience)
        return {"Authorization": f"Bearer {token}"}

    alice = approver("alice", "grp")

    async def run() -> None:
        await runtime.store.open()
        try:
            await runtime.store.create_approval(_approval(groups={"grp": 1}))
            async with TestClient(TestServer(_app(runtime))) as client:
                r = await client.get("/v1/openapi.json")
                assert r.status == 200 and await r.json() == OPENAPI

                r = await client.get("/v1/approvals?state=pending", headers=alice)
                assert r.status == 200
                _schema("ApprovalList").validate(await r.json())

                r = await client.get("/v1/approvals/apr_test", headers=alice)
                body = await r.json()
                assert r.status == 200 and body["you_may_decide"] is True
                _schema("Approval").validate(body)

                r = await client.get("/v1/approvals/apr_test/status", headers=alice)
                assert r.status == 200 and r.headers["Retry-After"]
                status = await r.json()
                assert set(status) == _props("ApprovalStatus")
                _schema("ApprovalStatus").validate(status)

                r = await client.get("/v1/whoami", headers=alice)
                _schema("WhoAmI").validate(await r.json())

                for path in ("/healthz", "/v1/stats", "/v1/policies"):
                    r = await client.get(path)
                    name = {"/healthz": "Health", "/v1/stats": "Stats", "/v1/policies": "PolicyStatus"}[path]
                    assert r.status == 200, path
                    _schema(name).validate(await r.json())

                # The documented errors are problem+json as the Problem schema says.
                errors = [
                    (client.get("/v1/approvals"), 401),
                    (client.get("/v1/approvals/apr_nope", headers=alice), 404),
                    (client.post("/v1/approvals/apr_test/approve", headers=alice, data="reason=x"), 415),
                    (client.post("/v1/approvals/apr_test/approve", headers=approver("bob", "other"),
                                 json={"reason": "x"}), 403),
                    (client.post("/v1/approvals/apr_test/approve", headers=approver("writer-bot", "grp"),
                                 json={"reason": "x"}), 403),
                ]
                for call, code in errors:
                    r = await call
                    assert r.status == code, (code, await r.text())
                    assert r.content_type == "application/problem+json"
                    _schema("Problem").validate(await r.json())
                    assert str(code) in _documented_responses(r.method.lower(), r.url.path)

                r = await client.post("/v1/approvals/apr_test/approve", headers=alice, json={"reason": "fine"})
                body = await r.json()
                assert r.status == 200 and body["state"] == "approved", body
                _schema("Approval").validate(body)
                r = await client.post("/v1/approvals/apr_test/deny", headers=alice, json={"reason": "late"})
                assert r.status == 409 and "409" in _documented_responses("post", "/v1/approvals/{id}/deny")
        finally:
            await runtime.store.close()

    asyncio.run(run())


def _documented_responses(method: str, path: str) -> set[str]:
    if path.startswith("/v1/approvals/") and path.count("/") >= 3:
        parts = path.split("/")
        parts[3] = "{id}"
        path = "/".join(parts)
    return set(OPENAPI["paths"][path][method]["responses"])
