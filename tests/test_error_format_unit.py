"""Refusals in a connector's declared error shape (manifest `error_format`), without processes:
the OpenAI error object core/problem.py renders, what the official OpenAI SDK makes of it,
the error-format stage that picks the shape, and the bundled LLM manifest's routes.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from proxy.config import RequestLimits
from proxy.connectors.classifier import Classifier
from proxy.connectors.derive import derive_request
from proxy.connectors.manifest import ConnectorManifest, ManifestError, load_manifest
from proxy.connectors.stages import ErrorFormat
from proxy.core.exchange import HOLD_KIND, Exchange
from proxy.core.model import AgentIdentity, AgentRequest, Classification, Refusal
from proxy.core.problem import DECISION_HEADER, problem_body, refusal_answer

ROOT = Path(__file__).resolve().parent.parent
LLM = load_manifest(ROOT / "connectors" / "llm.yaml")
PLAIN = ConnectorManifest.model_validate({
    "name": "plain", "hosts": ["erp.internal", "127.0.0.1:9200"],
    "routes": [{"method": "GET", "path": "/x", "action": "plain.read", "resource": {"type": "Thing", "id": "x"}}],
})


def _req(**kw) -> AgentRequest:
    base = dict(method="POST", scheme="https", host="api.openai.com", port=443, path="/v1/chat/completions", query="",
                headers={"content-type": "application/json"}, body=b"", client_ip="127.0.0.1", mode="forward")
    base.update(kw)
    return AgentRequest(**base)


def refused(refusal: Refusal, error_format: str = "openai", **kw) -> Exchange:
    ex = Exchange(_req(), identity=AgentIdentity("assistant-bot", "dev", {}, None), error_format=error_format, **kw)
    ex.classification = Classification(connector="llm", action="llm.chat.create", resource_type="LlmProvider",
                                       resource_id="openai")
    ex.refuse(refusal)
    return ex


DENY = Refusal(403, "Denied by policy",
               'assistant-bot may not llm.chat.create on LlmProvider::"openai": forbidden by policy llm-pro',
               reasons=["llm-pro"], kind="policy")


# ----------------------------------------------------------------- the body


def test_a_deny_is_an_openai_error_object_with_proctors_problem_inside():
    ex = refused(DENY)
    status, headers, raw = refusal_answer(ex)
    assert status == 403
    assert headers["Content-Type"] == "application/json" and headers["Cache-Control"] == "no-store"
    assert headers[DECISION_HEADER] == ex.decision_id
    body = json.loads(raw)
    assert list(body) == ["error"]
    error = body["error"]
    assert error == {
        "message": f"Denied by policy: {DENY.detail} (decision_id {ex.decision_id})",
        "type": "permission_error",
        "param": None,
        "code": "policy",
        "proctor": problem_body(ex),
    }
    assert error["proctor"]["decision_id"] == ex.decision_id
    assert (error["proctor"]["action"], error["proctor"]["resource"]) == ("llm.chat.create", 'LlmProvider::"openai"')
    assert error["proctor"]["reasons"] == ["llm-pro"] and error["proctor"]["agent"] == "assistant-bot"


def test_problem_is_the_default_and_json_rpc_routes_keep_json_rpc():
    status, headers, raw = refusal_answer(refused(DENY, error_format="problem"))
    assert headers["Content-Type"] == "application/problem+json" and json.loads(raw)["title"] == "Denied by policy"
    ex = refused(DENY, is_jsonrpc=True, jsonrpc_id=7)
    status, headers, raw = refusal_answer(ex)
    assert status == 200 and json.loads(raw)["error"]["code"] == -32001 and json.loads(raw)["id"] == 7


def test_a_hold_is_a_429_keeping_retry_after_and_the_approval():
    hold = Refusal(202, "Held for approval", "this request needs approval by llm-approvers; retry after 5 s",
                   reasons=["needs-approval"], headers={"Retry-After": "5", "Location": "http://c/v1/approvals/a1"},
                   kind=HOLD_KIND, extra={"approval_id": "a1"})
    ex = refused(hold)
    status, headers, raw = refusal_answer(ex)
    assert status == 429  # an SDK takes any 2xx for a result
    assert headers["Retry-After"] == "5" and headers["Location"].endswith("/a1")
    error = json.loads(raw)["error"]
    assert (error["type"], error["code"]) == ("approval_required", "approval-pending")
    assert error["proctor"]["status"] == 202 and error["proctor"]["approval_id"] == "a1"
    assert ex.decision.value == "hold"
    # a sync wait that ran out keeps its 403
    pending = Refusal(403, "Approval pending", "still waiting", kind=HOLD_KIND)
    status, _, raw = refusal_answer(refused(pending))
    assert status == 403 and json.loads(raw)["error"]["type"] == "approval_required"


@pytest.mark.parametrize("status, type_", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (407, "authentication_error"), (409, "conflict_error"), (413, "invalid_request_error"),
    (415, "invalid_request_error"), (422, "invalid_request_error"), (429, "rate_limit_error"),
    (431, "invalid_request_error"), (500, "server_error"), (502, "server_error"), (503, "server_error"),
    (504, "server_error"),
])
def test_the_type_follows_the_status(status, type_):
    _, _, raw = refusal_answer(refused(Refusal(status, "T", "d", kind="k")))
    assert json.loads(raw)["error"]["type"] == type_


def test_headers_of_the_refusal_and_the_plan_are_kept():
    ex = refused(Refusal(409, "Conflict", "held by another agent", headers={"Retry-After": "30"}, kind="claim"))
    ex.plan.response_headers["RateLimit"] = '"agent";r=0;t=30'
    _, headers, _ = refusal_answer(ex)
    assert headers["Retry-After"] == "30" and headers["RateLimit"] == '"agent";r=0;t=30'


def test_the_message_is_redacted_like_the_problem_detail():
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl"
    ex = refused(Refusal(400, "Request refused", f"GET /v1/x?api_key=sk-secret refused; token {token}", kind="request"))
    _, _, raw = refusal_answer(ex)
    assert b"sk-secret" not in raw and token.encode() not in raw
    error = json.loads(raw)["error"]
    assert error["proctor"]["detail"] in error["message"]


# ------------------------------------------------------ the official SDK reads it


@pytest.mark.parametrize("status, exc, type_", [
    (400, openai.BadRequestError, "invalid_request_error"), (401, openai.AuthenticationError, "authentication_error"),
    (403, openai.PermissionDeniedError, "permission_error"), (404, openai.NotFoundError, "not_found_error"),
    (409, openai.ConflictError, "conflict_error"), (422, openai.UnprocessableEntityError, "invalid_request_error"),
    (429, openai.RateLimitError, "rate_limit_error"), (503, openai.InternalServerError, "server_error"),
])
def test_the_openai_sdk_raises_its_exception_with_the_reason(status, exc, type_):
    refusal = Refusal(status, "Refused", "because policy p-1 says so", reasons=["p-1"], kind="policy")
    ex = refused(refusal)

    def answer(request: httpx.Request) -> httpx.Response:
        code, headers, raw = refusal_answer(ex)
        return httpx.Response(code, headers=headers, content=raw)

    client = openai.OpenAI(base_url="http://proctor.test/v1", api_key="x", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(answer)))
    with pytest.raises(exc) as err:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    e = err.value
    assert (e.status_code, e.code, e.type, e.param) == (status, "policy", type_, None)
    assert e.body["message"] == f"Refused: because policy p-1 says so (decision_id {ex.decision_id})"
    assert "p-1" in str(e) and ex.decision_id in str(e)
    assert e.body["proctor"]["reasons"] == ["p-1"]


# ------------------------------------------------------------- the stage


def test_the_stage_takes_the_format_of_the_connector_owning_the_target():
    stage = ErrorFormat(Classifier([PLAIN, LLM]))
    for host, port, want in [("api.openai.com", 443, "openai"), ("API.OpenAI.com.", 443, "openai"),
                             ("127.1", 9104, "openai"), ("localhost", 9104, "openai"), ("127.0.0.1", 9105, "problem"),
                             ("erp.internal", 443, "problem"), ("elsewhere.example", 443, "problem"),
                             ("bad host!", 443, "problem")]:
        ex = Exchange(_req(host=host, port=port))
        stage.on_head(ex)
        assert ex.error_format == want, (host, port)
        ex.error_format = "?"
        stage.on_request(ex)
        assert ex.error_format == want, (host, port)


def test_the_stage_routes_a_gateway_head_to_its_upstream():
    routes = {"/openai": ("api.openai.com", 443), "/erp": ("erp.internal", 80)}

    def target(req: AgentRequest):
        return next((t for prefix, t in routes.items() if req.path.startswith(prefix + "/")), None)

    stage = ErrorFormat(Classifier([PLAIN, LLM]), target)
    for path, want in [("/openai/v1/chat/completions", "openai"), ("/erp/x", "problem"), ("/nowhere", "problem")]:
        ex = Exchange(_req(host="127.0.0.1", port=8082, path=path, mode="reverse", unrouted=True))
        stage.on_head(ex)
        assert ex.error_format == want, path
    # without gateway routes an unrouted request has no connector
    ex = Exchange(_req(host="api.openai.com", port=443, mode="reverse", unrouted=True))
    ErrorFormat(Classifier([LLM])).on_head(ex)
    assert ex.error_format == "problem"


def test_the_stage_does_nothing_when_no_connector_declares_a_format():
    stage = ErrorFormat(Classifier([PLAIN]))
    assert not stage.needed
    ex = Exchange(_req())
    stage.on_head(ex)
    assert ex.error_format == "problem"


# --------------------------------------------------------- the declaration


def test_error_format_is_validated(tmp_path):
    assert PLAIN.error_format == "problem" and LLM.error_format == "openai"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nhosts: [x.example]\nerror_format: soap\nroutes:\n"
                   "  - {method: GET, path: /x, action: x.read, resource: {type: X, id: x}}\n")
    with pytest.raises(ManifestError, match="error_format"):
        load_manifest(bad)


def _derive(body: object, path: str = "/v1/chat/completions", method: str = "POST"):
    raw = json.dumps(body).encode() if body is not None else b""
    return derive_request(Classifier([LLM]), RequestLimits(), _req(method=method, path=path, body=raw))


def test_the_bundled_llm_routes():
    d = _derive({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
                 "n": 2, "stream": True, "temperature": 0.7, "stream_options": {"include_usage": True}})
    assert d.refusal is None
    cls = d.classification
    assert (cls.connector, cls.action, cls.resource_uid, cls.risk) == (
        "llm", "llm.chat.create", 'LlmProvider::"openai"', "medium")
    assert cls.fields == {"model": "gpt-4o-mini", "max_tokens": 50, "n": 2, "stream": True,
                          "temperature": {"__extn": {"fn": "decimal", "arg": "0.7"}}}
    d = _derive({"model": "o1-pro", "input": "hi", "max_output_tokens": 9}, "/v1/responses")
    assert (d.classification.action, d.classification.fields) == (
        "llm.response.create", {"model": "o1-pro", "max_output_tokens": 9})
    d = _derive({"model": "text-embedding-3-small", "input": ["a"], "dimensions": 256}, "/v1/embeddings")
    assert (d.classification.action, d.classification.risk) == ("llm.embedding.create", "low")
    assert _derive(None, "/v1/models", "GET").classification.action == "llm.model.list"
    d = _derive(None, "/v1/models/ft:gpt-4o-mini:acme:x:1", "GET")
    assert d.classification.action == "llm.model.read"
    assert d.classification.params == {"model": "ft:gpt-4o-mini:acme:x:1"}


@pytest.mark.parametrize("body, what", [
    ({"messages": []}, "'model'"),  # no model: no policy could judge it
    ({"model": "gpt 4o\n", "messages": []}, "pattern"),
    ({"model": "gpt-4o", "temperature": 2.5}, "temperature"),
    ({"model": "gpt-4o", "n": 0}, "'n'"),
    ({"model": "gpt-4o", "max_tokens": "lots"}, "max_tokens"),
    ({"model": "gpt-4o", "stream": "yes"}, "stream"),
])
def test_a_call_policies_cannot_judge_is_refused(body, what):
    d = _derive(body)
    assert d.refusal is not None and d.refusal.status == 400 and what in d.refusal.detail


def test_unmapped_llm_endpoints_are_refused():
    d = _derive({"purpose": "fine-tune"}, "/v1/files")
    assert d.refusal is not None and d.refusal.reasons == ["egress-default-deny"]


@pytest.mark.parametrize("raw, query", [
    # the provider would run another model than the one policy judged
    (b'{"model": "gpt-4o-mini", "model": "o1-pro", "messages": []}', ""),  # a duplicate key
    (b'{"model": "gpt-4o-mini", "Model": "o1-pro", "messages": []}', ""),  # another spelling of it
    (b'{"model": "gpt-4o-mini", "messages": []}', "model=o1-pro"),  # the field again in the query
])
def test_a_second_model_the_policy_would_not_see_is_refused(raw, query):
    d = derive_request(Classifier([LLM]), RequestLimits(), _req(body=raw, query=query))
    assert d.refusal is not None and d.refusal.status == 400, d.refusal
