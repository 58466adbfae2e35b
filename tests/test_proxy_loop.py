"""Generic egress never reaches Proctor's own listeners (a second attacker round, issue 16).

With a generic egress permit ("the egress group may call any host", the usual shape), an
agent asking Proctor for `http://localhost:<control port>/v1/policies/reload` had Proctor
dial its own control API from loopback, where the reload endpoint trusts its caller, around
every policy. Every listener of Proctor's, by any name that reaches it, is refused as a loop
(508), recorded; other generic egress still passes.
"""

from __future__ import annotations

import pytest
import requests

from conftest import _start_upstream

pytestmark = pytest.mark.integration


@pytest.fixture
def elsewhere(tmp_path):
    up = _start_upstream(tmp_path, None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


def test_generic_egress_to_proctors_own_listeners_is_a_loop(proctor_factory, idp, elsewhere):
    p = proctor_factory({"egress": {"default": "generic"}})
    token = idp.token("egress-bot", groups=["egress"])
    proxies = {"http": p.proxy_url_with("egress-bot", token)}
    reloads = p.health()["policy"]["reloads"]
    for method, url in (
        ("POST", f"http://localhost:{p.control_port}/v1/policies/reload"),
        ("GET", f"http://127.0.0.1:{p.control_port}/healthz"),
        ("GET", f"http://127.0.0.2:{p.control_port}/healthz"),  # another loopback address: the same listener
        ("GET", f"http://[::ffff:127.0.0.1]:{p.control_port}/healthz"),
        ("GET", f"http://127.0.0.1:{p.port}/"),  # the forward listener itself
        ("GET", f"http://localhost:{p.gateway_port}/svc/items/1"),  # the gateway
    ):
        r = requests.request(method, url, proxies=proxies, timeout=10)
        assert r.status_code == 508, (url, r.status_code, r.text[:300])
        body = r.json()
        assert body["reasons"] == ["proxy-loop"] and body["decision_id"], body
        assert p.decision(body["decision_id"])["status"] == 508
    assert p.health()["policy"]["reloads"] == reloads  # the reload never ran
    # generic egress elsewhere still goes through
    r = requests.get(f"http://127.0.0.1:{elsewhere.port}/anything", proxies=proxies, timeout=10)
    assert r.status_code == 200, r.text
    assert [x["path"] for x in elsewhere.received()] == ["/anything"]
