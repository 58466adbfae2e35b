"""The status address of transparent mode, unit by unit (end to end: tests/test_transparent_holds_netns.py).

- which requests are status requests (exactly GET /v1/approvals/{id}/status);
- which connections were addressed to the status address (the control port on a local address),
  and the status URL base a transparent hold names;
- the held answer names that URL for a transparent request, the control API's for the others;
- the answer itself: the workload identity's own approval (a real SQLite store, a real token
  file verified by the real verifier), 404 for another agent's or an unknown id, 503 without a
  usable workload identity.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.approvals.agent_status import AgentStatus
from proxy.approvals.service import ApprovalService
from proxy.approvals.stage import _held
from proxy.config import ApprovalsConfig, IdentityConfig, IssuerConfig, ProctorConfig
from proxy.core.model import AgentIdentity, AgentRequest, Classification
from proxy.engine.transparent import TransparentGuard, status_request
from proxy.identity.verifier import TokenVerifier
from proxy.identity.workload import WorkloadIdentity
from proxy.store.sqlite import SQLiteStore

WORKLOAD = "support-agent"


@pytest.mark.parametrize("method,path,want", [
    ("GET", "/v1/approvals/apr_abc-DEF_123/status", "apr_abc-DEF_123"),
    ("GET", "/v1/approvals/apr_x/status?wait=1", "apr_x"),  # the query is ignored, as by the control API
    ("GET", "/v1/approvals/apr%5Fx/status", "apr_x"),  # percent-decoded like the control API's route
    ("HEAD", "/v1/approvals/apr_x/status", None),
    ("POST", "/v1/approvals/apr_x/status", None),
    ("get", "/v1/approvals/apr_x/status", None),
    ("GET", "/v1/approvals/apr_x/approve", None),
    ("GET", "/v1/approvals/apr_x", None),
    ("GET", "/v1/approvals/apr_x/status/", None),
    ("GET", "/v1/approvals/apr_x/status/more", None),
    ("GET", "/v1/approvals//status", None),
    ("GET", "/v1/approvals/a%2Fb/status", None),  # an encoded slash is no id
    ("GET", "/v1/approvals/..%2F..%2Fhealthz/status", None),
    ("GET", "//v1/approvals/apr_x/status", None),
    ("GET", "http://127.0.0.1:8081/v1/approvals/apr_x/status", None),  # (mitmproxy passes an absolute-form
    # request's path alone, so that request IS answered as a status read; this string is never given)
    ("GET", "/healthz", None),
])
def test_only_get_of_a_status_path_is_a_status_request(method, path, want):
    assert status_request(method, path) == want


def _config(**transparent) -> ProctorConfig:
    return ProctorConfig.model_validate({"transparent": {"enabled": True, "token_file": "/run/token", **transparent},
                                         "control": {"listen": {"host": "0.0.0.0", "port": 9091},
                                                     "public_url": "https://proctor.example.com"}})


def test_the_status_address_is_the_control_port_on_a_local_address():
    guard = TransparentGuard.from_config(_config())
    assert guard.status_port == 9091
    # the agent's own pod, not control.public_url (a place the agent may not reach)
    assert guard.status_base_url == "http://127.0.0.1:9091"
    for local in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "127.0.0.9"):
        assert guard.is_status_address((local, 9091)), local
    assert not guard.is_status_address(("127.0.0.1", 8080))
    assert not guard.is_status_address(("192.0.2.10", 9091))  # not this namespace's: an ordinary destination
    assert not guard.is_status_address(None)
    assert TransparentGuard.from_config(_config(hosts=["::1"])).status_base_url == "http://[::1]:9091"
    assert not TransparentGuard(frozenset({15001}), frozenset()).is_status_address(("127.0.0.1", 9091))


REQ = AgentRequest(method="POST", scheme="https", host="erp.example", port=443, path="/items", query="",
                   headers={"content-type": "application/json"}, body=b'{"amount": 700}', client_ip="127.0.0.1",
                   mode="transparent")
CLS = Classification(connector="erp", action="test.item.create", resource_type="Item", resource_id="new")


def _service(tmp_path: Path) -> tuple[ApprovalService, SQLiteStore]:
    store = SQLiteStore(str(tmp_path / "state.db"))
    svc = ApprovalService(store, ApprovalsConfig(retry_after_seconds=3), record=lambda rec: None,
                          status_base_url="https://proctor.example.com")
    svc.transparent_status_base_url = "http://127.0.0.1:8081"
    return svc, store


async def _hold(svc: ApprovalService, agent: str):
    ident = AgentIdentity(agent_id=agent, issuer="i", claims={}, expires_at=None)
    return await svc.hold(decision_id=f"d-{agent}", identity=ident, req=REQ, cls=CLS, groups={"managers": 1},
                          policy_ids=["big-items-need-a-manager"], mode="async", derived={})


def test_a_transparent_hold_names_the_status_address_the_others_the_control_api(tmp_path):
    async def run() -> None:
        svc, store = _service(tmp_path)
        await store.open()
        try:
            a = await _hold(svc, WORKLOAD)
            mine = _held(svc, svc.config, a, 202, "Held for approval", transparent=True)
            url = f"http://127.0.0.1:8081/v1/approvals/{a.id}/status"
            assert mine.headers["Location"] == url and mine.extra["status_url"] == url
            forward = _held(svc, svc.config, a, 202, "Held for approval")
            assert forward.extra["status_url"] == f"https://proctor.example.com/v1/approvals/{a.id}/status"
            svc.transparent_status_base_url = None  # no transparent listener: the control API's
            assert svc.status_url(a.id, transparent=True) == forward.extra["status_url"]
        finally:
            await store.close()

    asyncio.run(run())


@pytest.fixture
def verifier(idp) -> TokenVerifier:
    settings = IdentityConfig(issuers=[IssuerConfig(issuer=idp.issuer, audience=idp.audience,
                                                    jwks_file=idp.jwks_path, algorithms=["RS256", "ES256"])])
    return TokenVerifier(settings.issuers, settings)


def test_the_answer_is_the_workloads_own_approval_and_nothing_else(tmp_path, verifier, idp):
    token_file = tmp_path / "token"
    token_file.write_text(idp.token(WORKLOAD) + "\n")

    async def run() -> None:
        svc, store = _service(tmp_path)
        await store.open()
        try:
            status = AgentStatus(svc, WorkloadIdentity(token_file, verifier, check_seconds=0))
            mine, theirs = await _hold(svc, WORKLOAD), await _hold(svc, "other-agent")
            code, headers, body = await status.answer(mine.id)
            assert code == 200 and headers["Content-Type"] == "application/json" and headers["Retry-After"] == "3"
            doc = json.loads(body)
            assert doc == {"id": mine.id, "state": "pending", "action": "test.item.create", "resource": 'Item::"new"',
                           "expires_at": doc["expires_at"], "decided_by": None, "reason": None}
            for other in (theirs.id, "apr_unknown"):
                code, headers, body = await status.answer(other)
                assert code == 404 and headers["Content-Type"] == "application/problem+json"
                assert json.loads(body)["title"] == "No such approval" and "other-agent" not in body.decode()
            # without a usable workload identity nothing is attributed: 503, naming the file, not the token
            token_file.write_text("not-a-token\n")
            code, headers, body = await status.answer(mine.id)
            assert code == 503 and headers["Retry-After"] == "5"
            problem = json.loads(body)
            assert problem["title"] == "Workload identity unavailable" and str(token_file) in problem["detail"]
            assert problem["reasons"] == ["workload-identity-unavailable"]
        finally:
            await store.close()

    asyncio.run(run())
