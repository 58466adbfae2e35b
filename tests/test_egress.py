"""Egress: generic classification for allow-listed hosts, and upstream failures."""

from __future__ import annotations

import pytest
import requests

from conftest import free_port

pytestmark = pytest.mark.integration


def test_unclassified_host_allowlisted_goes_through_cedar_and_502s_when_down(proctor_factory, idp):
    dead = free_port()  # nothing listens here
    p = proctor_factory({"egress": {"default": "deny", "unclassified_hosts": [f"127.0.0.1:{dead}"]}})
    # the host is classified generically, but Cedar still decides: no permit for this agent
    outsider = idp.token("outsider", groups=["readers"])
    r = requests.get(f"http://127.0.0.1:{dead}/x", proxies={"http": p.proxy_url_with("outsider", outsider)}, timeout=10)
    assert r.status_code == 403
    assert r.json()["action"] == "http.request"
    assert r.json()["resource"] == 'HttpHost::"127.0.0.1"'
    # permitted agent: allowed, upstream is down -> 502 problem+json with the decision id
    tok = idp.token("egress-bot", groups=["egress"])
    r = requests.get(f"http://127.0.0.1:{dead}/x", proxies={"http": p.proxy_url_with("egress-bot", tok)}, timeout=10)
    assert r.status_code == 502
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["decision_id"] == r.headers["x-proctor-decision-id"]
    rec = p.decision(body["decision_id"])
    assert rec["decision"] == "allow" and rec["status"] == 502 and "error" in rec
    # other hosts stay default-deny
    r = requests.get(f"http://127.0.0.1:{free_port()}/x", proxies={"http": p.proxy_url_with("egress-bot", tok)}, timeout=10)
    assert r.status_code == 403 and r.json()["reasons"] == ["egress-default-deny"]
