"""Reverse (gateway) mode: routes from a prefix to an upstream base URL."""

from __future__ import annotations

import base64
import json
import signal
import socket
import ssl
import subprocess
import sys

import httpx
import pytest
import requests

pytestmark = pytest.mark.integration


def test_gateway_allowed_strips_bearer(gateway_proctor, upstream, idp):
    upstream.clear()
    tok = idp.token("gw-bot", groups=["readers"])
    r = requests.get(f"{gateway_proctor.gateway_url}/svc/items/5?x=1", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 200, r.text
    got = upstream.last()
    assert got["path"] == "/items/5?x=1"
    h = upstream.headers_of(got)
    assert "authorization" not in h and "proxy-authorization" not in h
    assert h["host"] == f"127.0.0.1:{upstream.port}"
    assert tok not in json.dumps(got)
    rec = gateway_proctor.decision(r.headers["x-proctor-decision-id"])
    assert rec["mode"] == "reverse" and rec["action"] == "test.item.read" and rec["decision"] == "allow"


def test_gateway_to_tls_upstream(gateway_proctor, upstream_tls, idp):
    upstream_tls.clear()
    tok = idp.token("gw-bot", groups=["readers"])
    r = httpx.get(f"{gateway_proctor.gateway_url}/secure/items/8", headers={"Proxy-Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert upstream_tls.last()["scheme"] == "https"
    assert upstream_tls.last()["path"] == "/items/8"


def test_gateway_denied(gateway_proctor, upstream, idp):
    upstream.clear()
    tok = idp.token("gw-bot", groups=["readers"])
    r = requests.delete(f"{gateway_proctor.gateway_url}/svc/items/5", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 403
    assert r.json()["reasons"] == ["no-item-deletes"]
    assert upstream.received() == []


def test_gateway_no_token_is_401(gateway_proctor, upstream):
    r = requests.get(f"{gateway_proctor.gateway_url}/svc/items/5", timeout=10)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["decision_id"] == r.headers["x-proctor-decision-id"]


def test_gateway_unknown_route_needs_authentication_first(gateway_proctor):
    """Anonymous callers cannot probe which routes exist."""
    r = requests.get(f"{gateway_proctor.gateway_url}/nothing/here", timeout=10)
    assert r.status_code == 401


def test_gateway_unknown_route_404(gateway_proctor, idp):
    tok = idp.token("gw-bot", groups=["readers"])
    r = requests.get(f"{gateway_proctor.gateway_url}/nothing/here", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 404
    assert r.json()["reasons"] == ["no-route"]


def test_gateway_prefix_is_segment_bounded(gateway_proctor, idp, upstream):
    """/svcx must not match the /svc route."""
    upstream.clear()
    tok = idp.token("gw-bot", groups=["readers"])
    r = requests.get(f"{gateway_proctor.gateway_url}/svcx/items/5", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 404
    assert upstream.received() == []


def test_gateway_dot_segments_refused(gateway_proctor, idp, upstream):
    upstream.clear()
    tok = idp.token("gw-bot", groups=["readers"])
    # send the raw path without client-side normalisation
    with httpx.Client(timeout=10) as c:
        req = c.build_request("GET", f"{gateway_proctor.gateway_url}/svc/items/x", headers={"Authorization": f"Bearer {tok}"})
        req.url = req.url.copy_with(raw_path=b"/svc/items/..%2F..%2Fadmin")
        r = c.send(req)
    assert r.status_code == 400
    assert upstream.received() == []


def test_gateway_host_specific_route(gateway_proctor, upstream, idp):
    upstream.clear()
    tok = idp.token("gw-bot", groups=["readers"])
    r = requests.get(
        f"{gateway_proctor.gateway_url}/items/3", headers={"Host": "svc.internal", "Authorization": f"Bearer {tok}"}, timeout=10
    )
    assert r.status_code == 200, r.text
    assert upstream.last()["path"] == "/items/3"
    assert upstream.headers_of(upstream.last())["host"] == f"127.0.0.1:{upstream.port}"
    # the same path without that Host matches no route
    r = requests.get(f"{gateway_proctor.gateway_url}/items/3", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 404


# ----------------------------------------------------- the agent's credential
def test_gateway_refuses_basic_authorization(gateway_proctor, upstream, idp):
    """In gateway mode `Authorization` carries only a Bearer JWT; Basic there is not an agent credential."""
    upstream.clear()
    r = requests.get(f"{gateway_proctor.gateway_url}/svc/items/1", auth=("gw-bot", idp.token("gw-bot")), timeout=10)
    assert r.status_code == 401 and "unsupported scheme" in r.json()["detail"]
    assert upstream.received() == []


@pytest.mark.parametrize("bad", ["not-a-jwt", "expired"])
def test_gateway_bad_token_is_a_recorded_401(gateway_proctor, upstream, idp, bad):
    upstream.clear()
    token = idp.token("gw-bot", ttl=-600) if bad == "expired" else bad
    r = requests.get(f"{gateway_proctor.gateway_url}/svc/items/1", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    rec = gateway_proctor.decision(r.json()["decision_id"])
    assert rec["mode"] == "reverse" and rec["status"] == 401 and rec["agent"] is None
    assert token not in r.text and token not in gateway_proctor.log()
    assert upstream.received() == []


def test_gateway_proxy_username_must_match_the_subject(gateway_proctor, upstream, idp):
    upstream.clear()
    header = "Basic " + base64.b64encode(f"impostor:{idp.token('gw-bot')}".encode()).decode()
    r = requests.get(f"{gateway_proctor.gateway_url}/svc/items/1", headers={"Proxy-Authorization": header}, timeout=10)
    assert r.status_code == 401 and "username must equal" in r.json()["detail"]
    assert upstream.received() == []


@pytest.mark.parametrize("headers", [("authorization",), ("proxy-authorization",), ("authorization", "proxy-authorization")],
                         ids=["authorization", "proxy-authorization", "both"])
def test_gateway_strips_agent_credentials(gateway_proctor, upstream, idp, headers):
    token = idp.token("gw-bot", groups=["readers"])
    upstream.clear()
    r = httpx.get(f"{gateway_proctor.gateway_url}/svc/items/3", headers={n: f"Bearer {token}" for n in headers}, timeout=10)
    assert r.status_code == 200, r.text
    got = upstream.last()
    assert not {"authorization", "proxy-authorization"} & set(upstream.headers_of(got))
    assert token not in json.dumps(got)


def test_gateway_forwards_a_body_request_without_the_bearer(gateway_proctor, upstream, idp):
    """Authenticated from the head (before the body), decided with the body, forwarded without the token."""
    upstream.clear()
    token = idp.token("writer-bot", groups=["writers"])
    r = httpx.post(f"{gateway_proctor.gateway_url}/svc/items", json={"amount": 3},
                   headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 200, r.text
    got = upstream.last()
    assert json.loads(got["body"]) == {"amount": 3} and "authorization" not in upstream.headers_of(got)
    rec = gateway_proctor.decision(r.headers["x-proctor-decision-id"])
    assert rec["agent"] == "writer-bot" and rec["action"] == "test.item.create" and rec["decision"] == "allow"


# ------------------------------------------------------ listener and lifecycle
def test_gateway_listener_is_reported_ready(gateway_proctor):
    listeners = gateway_proctor.health()["components"]["listeners"]
    assert listeners["status"] == "ok"
    assert {(x["name"], x["address"], x["up"]) for x in listeners["listeners"]} == {
        ("agents", f"127.0.0.1:{gateway_proctor.port}", True),
        ("gateway", f"127.0.0.1:{gateway_proctor.gateway_port}", True),
    }


def test_proctor_run_exits_when_the_gateway_port_is_taken(proctor_factory, gateway_engine):
    p = proctor_factory({"gateway": {"engine": gateway_engine}})
    p.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", p.gateway_port))
        squatter.listen()
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path)],
                             cwd=str(p.dir), capture_output=True, text=True, timeout=60)
        for other in (p.port, p.control_port):  # nothing left listening
            with socket.socket() as probe:
                probe.settimeout(0.5)
                assert probe.connect_ex(("127.0.0.1", other)) != 0
    assert out.returncode != 0
    assert f"proctor: cannot listen on 127.0.0.1:{p.gateway_port} (gateway listener)" in out.stderr, out.stderr
    assert "address already in use" in out.stderr.lower()


def test_sigterm_closes_the_gateway_and_exits_cleanly(proctor_factory, gateway_engine, idp, upstream):
    p = proctor_factory({"gateway": {"engine": gateway_engine}})
    token = idp.token("gw-bot", groups=["readers"])
    assert httpx.get(f"{p.gateway_url}/svc/items/1", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0
    assert "Traceback" not in p.log()
    with socket.socket() as probe:
        probe.settimeout(0.5)
        assert probe.connect_ex(("127.0.0.1", p.gateway_port)) != 0


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_gateway_listener_accepts_tls_with_a_certificate_from_proctors_ca(gateway_proctor, upstream, idp, host):
    """The same port speaks TLS when the client starts with a TLS handshake."""
    upstream.clear()
    token = idp.token("gw-bot", groups=["readers"])
    r = httpx.get(f"https://{host}:{gateway_proctor.gateway_port}/svc/items/6", headers={"Authorization": f"Bearer {token}"},
                  verify=ssl.create_default_context(cafile=str(gateway_proctor.ca_pem)), timeout=10)
    assert r.status_code == 200, r.text
    assert upstream.last()["path"] == "/items/6" and upstream.last()["scheme"] == "http"
    assert gateway_proctor.decision(r.headers["x-proctor-decision-id"])["decision"] == "allow"
