"""Hot reload: a good change is enforced, a bad one is rejected loudly and the last good set stays."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import requests

from conftest import DATA, wait_for

pytestmark = pytest.mark.integration

SECRET_PERMIT = '''
@id("readers-read-secrets")
permit (principal in AgentGroup::"readers", action == Action::"test.secret.read", resource is Item);
'''


def _revision(p) -> str:
    return httpx.get(f"{p.control_url}/v1/policies", timeout=5).json()["active_revision"]


def _get_secret(p, upstream, token):
    return requests.get(
        f"http://127.0.0.1:{upstream.port}/secret/1", proxies={"http": p.proxy_url_with("r", token)}, timeout=10
    )


def test_good_reload_takes_effect(proctor_factory, upstream, idp):
    p = proctor_factory()
    tok = idp.token("r", groups=["readers"])
    assert _get_secret(p, upstream, tok).status_code == 403
    rev = _revision(p)
    (p.policies_dir / "secrets.cedar").write_text(SECRET_PERMIT)
    wait_for(lambda: _revision(p) != rev, timeout=10, what="policy reload")
    r = _get_secret(p, upstream, tok)
    assert r.status_code == 200
    rec = p.decision(r.headers["x-proctor-decision-id"])
    assert rec["reasons"] == ["readers-read-secrets"]
    assert rec["policy_revision"] == _revision(p)
    assert p.health()["policy"]["ok"] is True


@pytest.mark.parametrize(
    "bad_text, expect",
    [
        ("permit (principal, action, resource", "syntax error"),
        ('@id("x") permit (principal, action == Action::"no.such.action", resource);', "schema validation"),
        ('@id("y") permit (principal, action, resource) when { principal.no_such_attr == 1 };', "schema validation"),
        ("permit (principal, action == Action::\"test.secret.read\", resource);", "@id"),
        ('@id("agents-read-items") permit (principal, action == Action::"test.secret.read", resource);', "duplicate @id"),
    ],
    ids=["syntax", "unknown-action", "unknown-attribute", "missing-id", "duplicate-id"],
)
def test_bad_reload_keeps_last_good_set(proctor_factory, upstream, idp, bad_text, expect):
    p = proctor_factory()
    tok = idp.token("r", groups=["readers"])
    rev = _revision(p)
    # a bad file that would also have permitted the secret read, had it loaded
    (p.policies_dir / "bad.cedar").write_text(SECRET_PERMIT + "\n" + bad_text)
    wait_for(lambda: p.health()["policy"]["failed_reloads"] >= 1, timeout=10, what="reload attempt")
    health = p.health()
    assert health["status"] == "degraded"
    assert health["policy"]["ok"] is False
    assert any(expect in e for e in health["policy"]["last_error"]), health["policy"]["last_error"]
    assert _revision(p) == rev
    assert _get_secret(p, upstream, tok).status_code == 403  # still the old set
    assert "POLICY RELOAD REJECTED" in p.log()
    # repair: the next good reload clears the error
    (p.policies_dir / "bad.cedar").write_text(SECRET_PERMIT)
    wait_for(lambda: p.health()["policy"]["ok"] is True, timeout=10, what="recovery")
    assert _get_secret(p, upstream, tok).status_code == 200


def test_reload_via_control_api(proctor_factory):
    p = proctor_factory()
    r = httpx.post(f"{p.control_url}/v1/policies/reload", timeout=5)
    assert r.status_code == 200 and r.json()["reloaded"] is True


def test_startup_with_bad_policies_refuses_to_start(tmp_path):
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "schema.cedarschema").write_text((DATA / "policies" / "schema.cedarschema").read_text())
    (pol / "p.cedar").write_text("permit (principal, action, resource);")
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\npolicies:\n  dir: {pol}\nlisten: {{port: 0}}\ncontrol: {{enabled: false}}\n")
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "refusing to start" in out.stderr and "@id" in out.stderr
    assert time.monotonic() - t < 30
