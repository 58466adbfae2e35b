"""The control API's OpenAPI document: valid OpenAPI 3.1, generated, and unable to drift from the code.

- the document is generated from the route table and the pydantic models
  (proxy/control/openapi.py), and every route `build_app` registers is in that
  table (a new route without one fails here);
- approval bodies as `approval_json` makes them match the documented schemas;
- live answers of the real app (in process, on loopback) validate against them;
- invalid inputs are 400 problem+json naming the field, with the titles clients match on.

tests/test_control_api_fuzz.py runs schemathesis against a real `proctor run`.
"""

from __future__ import annotations

import asyncio
import json
import re
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
from proxy.control.openapi import OPENAPI, ROUTES, add_openapi_route, build_document
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
    assert runtime.approvals is not None and runtime.governance is not None  # every optional route is mounted
    routes = _routes(_app(runtime))
    assert routes - _documented() == set(), "routes missing from the route table in proxy/control/openapi.py"
    assert _documented() - routes == set(), "documented endpoints the app does not serve"
    assert {(r.method, r.path) for r in ROUTES} == routes


def test_the_document_is_generated_from_the_route_table_and_models():
    assert build_document() == OPENAPI
    assert len({r.operation_id for r in ROUTES}) == len(ROUTES)
    schemas = OPENAPI["components"]["schemas"]
    for route in ROUTES:
        op = OPENAPI["paths"][route.path][route.method]
        # every templated path segment is a documented, required path parameter
        names = set(re.findall(r"{(\w+)}", route.path))
        path_params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        assert path_params == names, route.path
        # JSON answers are described by a model, bodies too
        for status, answer in op["responses"].items():
            for media in answer.get("content", {}):
                if media == "application/json" and route.operation_id != "openapi":
                    ref = answer["content"][media]["schema"]["$ref"]
                    assert ref.rsplit("/", 1)[1] in schemas, (route.path, status)
        if route.method in ("post", "put", "patch") and route.body is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{route.body.__name__}"
        if route.query is not None:
            assert {p["name"] for p in op["parameters"] if p["in"] == "query"} == set(route.query.model_fields)
    # a comma-separated list is an array serialised form/explode=false (state=pending,approved)
    state = next(p for p in OPENAPI["paths"]["/v1/approvals"]["get"]["parameters"] if p["name"] == "state")
    assert state["schema"]["type"] == "array" and (state["style"], state["explode"]) == ("form", False)
    assert schemas["DecisionRequest"]["required"] == ["reason"]
    assert set(OPENAPI["components"]["securitySchemes"]) == {"approverBearer", "operatorBearer", "agentBearer"}


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


# ----------------------------------------------------------------------------- input validation
def test_invalid_inputs_are_400_problems_naming_the_field(runtime):
    """Bodies and query strings go through the models: 400 problem+json with `errors` naming each field,
    titled as clients already match ("Reason required", "Bad filter", "Bad paging"...)."""
    cfg = runtime.config
    issuer = DevIssuer(cfg.dev_issuer_dir, cfg.dev_issuer)
    token = issuer.issue("olga", {cfg.approvals.approver_groups_claim: [cfg.control.admin_group, "grp"]}, "5m",
                         audience=cfg.approvals.approver_audience)
    olga = {"Authorization": f"Bearer {token}"}
    as_json = {**olga, "Content-Type": "application/json"}
    problem = _schema("Problem")

    async def run() -> None:
        await runtime.store.open()
        await runtime.governance.load()
        try:
            await runtime.store.create_approval(_approval(groups={"grp": 1}))
            async with TestClient(TestServer(_app(runtime))) as client:
                cases = [
                    # (method, path, request kwargs, title, fields at fault)
                    ("get", "/v1/approvals?limit=ten", {}, "Bad paging", ["limit"]),
                    ("get", "/v1/approvals?state=pending,bogus", {}, "Bad filter", ["state.1"]),
                    ("get", "/v1/approvals?agent=" + "a" * 300, {}, "Agent too long", ["agent"]),
                    ("get", "/v1/activity?record=decision,nope", {}, "Bad filter", ["record.1"]),
                    ("get", "/v1/activity?before_sequence=1.5", {}, "Bad paging", ["before_sequence"]),
                    ("post", "/v1/approvals/apr_test/approve", {"json": {"reason": "   "}}, "Reason required",
                     ["reason"]),
                    ("post", "/v1/approvals/apr_test/deny", {"json": {"reason": "x" * 2001}}, "Reason too long",
                     ["reason"]),
                    ("post", "/v1/suspensions", {"json": {"kind": "agent", "target": "bot"}}, "Reason required",
                     ["reason"]),
                    ("post", "/v1/suspensions", {"json": {"kind": "tenant", "target": "bot", "reason": "r"}},
                     "Bad suspension", ["kind"]),
                    # `$` in a Python regex matches before a final newline: the target check must not
                    ("post", "/v1/suspensions", {"json": {"kind": "agent", "target": "bot\n", "reason": "r"}},
                     "Bad target", ["target"]),
                    ("post", "/v1/agents", {"json": {"id": "bot", "owner": 7}}, "Bad field", ["owner"]),
                    ("post", "/v1/agents", {"json": {"owner": "x"}}, "Bad agent id", ["id"]),
                    ("post", "/v1/agents/bot/resume", {"json": {"reason": ["not", "text"]}}, "Bad reason", ["reason"]),
                    ("post", "/v1/policies/rollback", {"json": {"reason": "why"}}, "Revision required", ["revision"]),
                ]
                for method, path, kw, title, fields in cases:
                    r = await client.request(method, path, headers=olga, **kw)
                    body = await r.json()
                    assert r.status == 400 and r.content_type == "application/problem+json", (path, body)
                    assert body["title"] == title, (path, body)
                    assert [e["field"] for e in body["errors"]] == fields, (path, body)
                    assert all(e["in"] == ("query" if "?" in path else "body") for e in body["errors"])
                    assert fields[0].split(".")[0] in body["detail"]
                    problem.validate(body)
                    assert str(r.status) in _documented_responses(method, _template(path.split("?")[0]))

                # a body nested past the JSON parser's recursion limit was a 500
                r = await client.post("/v1/agents", data="[" * 50_000, headers=as_json)
                assert r.status == 400 and (await r.json())["title"] == "Bad JSON"
                r = await client.post("/v1/suspensions", data=json.dumps([1, 2]), headers=as_json)
                assert r.status == 400 and "JSON object" in (await r.json())["detail"]
                # over the control port's 64 KiB: aiohttp's own 413, as documented
                r = await client.post("/v1/suspensions", headers=as_json,
                                      data=json.dumps({"kind": "agent", "target": "bot", "reason": "x" * 70_000}))
                assert r.status == 413 and r.content_type == "text/plain"
                assert "413" in _documented_responses("post", "/v1/suspensions")
                # paging out of range is clamped, as always; an offset past SQL's integers was a 503
                r = await client.get("/v1/approvals?offset=" + "9" * 40 + "&limit=-3", headers=olga)
                page = await r.json()
                assert r.status == 200 and page["approvals"] == [] and page["limit"] == 1, page
                r = await client.get("/v1/approvals?state=&limit=&agent=", headers=olga)  # empty = absent
                assert r.status == 200 and (await r.json())["total"] == 1
                r = await client.get("/v1/approvals?state=pending,%20approved,,", headers=olga)
                assert r.status == 200 and (await r.json())["total"] == 1
                # the optional-body resume refuses another site's Origin even without a body
                r = await client.post("/v1/agents/bot/resume", headers={**olga, "Origin": "https://evil.example"})
                assert r.status == 403 and (await r.json())["title"] == "Cross-origin request refused"
                r = await client.post("/v1/agents/bot/resume", headers=olga)  # no body: no reason needed
                assert r.status == 404 and (await r.json())["title"] == "Not suspended"
                # valid input still works, and answers match the models
                r = await client.post("/v1/suspensions", headers=olga,
                                      json={"kind": "agent", "target": "bot", "reason": "  incident 7  ", "extra": 1})
                assert r.status == 201, await r.text()
                created = await r.json()
                assert created["reason"] == "incident 7"
                _schema("Suspension").validate(created)
                r = await client.delete("/v1/suspensions/agent/bot?reason=done", headers=olga)
                assert r.status == 200 and (await r.json()) == {"kind": "agent", "target": "bot", "resumed_by": "olga"}
        finally:
            await runtime.store.close()

    asyncio.run(run())


def _template(path: str) -> str:
    """The route table's path for a concrete one (/v1/agents/bot/resume -> /v1/agents/{id}/resume)."""
    for route in ROUTES:
        if re.fullmatch(re.sub(r"{\w+}", "[^/]+", route.path), path):
            return route.path
    raise AssertionError(f"no route for {path}")
