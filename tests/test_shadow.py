"""Shadow mode: a candidate policy set is evaluated beside the active one; only the active one is enforced."""

from __future__ import annotations

import shutil

import httpx
import pytest
import requests

from conftest import DATA, wait_for
from test_metrics import scrape, value

pytestmark = pytest.mark.integration

CANDIDATE_EXTRA = """
@id("candidate-readers-read-secrets")
permit (
  principal in AgentGroup::"readers",
  action == Action::"test.secret.read",
  resource is Item
);
"""


@pytest.fixture
def candidate(tmp_path):
    d = tmp_path / "candidate"
    shutil.copytree(DATA / "policies", d)
    (d / "zz-candidate.cedar").write_text(CANDIDATE_EXTRA)
    return d


def test_disagreement_recorded_and_counted_active_enforced(proctor_factory, upstream, idp, candidate):
    p = proctor_factory({"policies": {"dir": "policies", "reload_interval_seconds": 0.2, "shadow_dir": str(candidate)}})
    tok = idp.token("s-bot", groups=["readers"])
    proxies = {"http": p.proxy_url_with("s-bot", tok)}
    upstream.clear()

    secret = requests.get(f"http://127.0.0.1:{upstream.port}/secret/1", proxies=proxies, timeout=10)
    assert secret.status_code == 403  # the active set is enforced
    assert upstream.received() == []
    rec = p.decision(secret.headers["x-proctor-decision-id"])
    assert rec["decision"] == "deny"
    assert rec["shadow"]["decision"] == "allow"
    assert rec["shadow"]["reasons"] == ["candidate-readers-read-secrets"]

    agree = requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies=proxies, timeout=10)
    assert agree.status_code == 200
    assert "shadow" not in p.decision(agree.headers["x-proctor-decision-id"])

    m = scrape(p)
    assert value(m, "proctor_shadow_disagreements_total", action="test.secret.read", active="deny", shadow="allow") == 1
    assert value(m, "proctor_shadow_evaluations_total") == 2
    status = httpx.get(f"{p.control_url}/v1/policies", timeout=5).json()["shadow"]
    assert status["loaded"] and status["disagreements"] == 1


def test_broken_candidate_never_stops_the_proxy(proctor_factory, upstream, idp, candidate):
    good = (candidate / "zz-candidate.cedar").read_text()
    (candidate / "zz-candidate.cedar").write_text("permit (")
    p = proctor_factory({"policies": {"dir": "policies", "reload_interval_seconds": 0.2, "shadow_dir": str(candidate)}})
    status = httpx.get(f"{p.control_url}/v1/policies", timeout=5).json()["shadow"]
    assert status["loaded"] is False and any("syntax error" in e for e in status["load_error"])
    tok = idp.token("s-bot", groups=["readers"])
    r = requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies={"http": p.proxy_url_with("s-bot", tok)}, timeout=10)
    assert r.status_code == 200
    # fixing the candidate turns shadow evaluation on, without a restart
    (candidate / "zz-candidate.cedar").write_text(good)
    wait_for(lambda: httpx.get(f"{p.control_url}/v1/policies", timeout=5).json()["shadow"]["loaded"], timeout=10, what="shadow load")
    r = requests.get(f"http://127.0.0.1:{upstream.port}/secret/1", proxies={"http": p.proxy_url_with("s-bot", tok)}, timeout=10)
    assert r.status_code == 403
    assert p.decision(r.headers["x-proctor-decision-id"])["shadow"]["decision"] == "allow"
