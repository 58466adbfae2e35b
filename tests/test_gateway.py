"""Reverse (gateway) mode: routes from a prefix to an upstream base URL."""

from __future__ import annotations

import json

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
