"""Transparent mode on a real `proctor run`, without namespaces: the listener is reported
like the others (and a bind failure ends the process), and the workload identity is
what /healthz and /readyz say. Traffic through real redirects: tests/test_transparent_netns.py.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from conftest import free_port, wait_for

pytestmark = pytest.mark.integration


def _transparent(token_file, port: int | None = None) -> dict:
    return {"transparent": {"enabled": True, "hosts": ["127.0.0.1"], "port": port or free_port(),
                            "token_file": str(token_file), "token_check_seconds": 0.1}}


def test_the_listener_and_the_workload_identity_in_health_and_readiness(proctor_factory, idp, tmp_path):
    token_file = tmp_path / "token"
    token = idp.token("support-agent", ttl=600)
    token_file.write_text(token)
    overrides = _transparent(token_file)
    port = overrides["transparent"]["port"]
    p = proctor_factory(overrides)
    health = p.health()
    assert {"name": "transparent", "address": f"127.0.0.1:{port}", "up": True, "error": None} in \
        health["components"]["listeners"]["listeners"]
    wl = health["components"]["workload_identity"]
    assert (wl["status"], wl["agent_id"], wl["issuer"], wl["error"]) == ("ok", "support-agent", idp.issuer, None)
    assert wl["token_file"] == str(token_file) and wl["expires_at"] > time.time() and wl["loaded_at"]
    assert token not in httpx.get(f"{p.control_url}/healthz").text
    # a bad token: not ready, the reason names the file; a good one: ready again, no restart
    token_file.write_text("garbage")
    wait_for(lambda: httpx.get(f"{p.control_url}/readyz").status_code == 503, what="not ready")
    reasons = httpx.get(f"{p.control_url}/readyz").json()["reasons"]
    assert any(str(token_file) in r and "not a well-formed JWT" in r for r in reasons), reasons
    assert p.health()["components"]["workload_identity"]["status"] == "down"
    token_file.write_text(idp.token("support-agent-2", ttl=600))
    wait_for(lambda: httpx.get(f"{p.control_url}/readyz").status_code == 200, what="ready again")
    wl = p.health()["components"]["workload_identity"]
    assert wl["agent_id"] == "support-agent-2" and wl["rotations"] == 2  # garbage, then the good one
    metrics = httpx.get(f"{p.control_url}/metrics").text
    assert 'proctor_workload_identity_reloads_total{outcome="error"} 1.0' in metrics
    assert "proctor_workload_identity_valid 1.0" in metrics
    log = p.log()
    assert "reloaded the rotated token file" in log and token not in log


def test_without_transparent_mode_the_component_is_disabled(proctor):
    assert proctor.health()["components"]["workload_identity"] == {"status": "disabled"}
    assert all(lst["name"] != "transparent" for lst in proctor.health()["components"]["listeners"]["listeners"])


def _run(tmp_path, idp, extra: dict) -> subprocess.Popen:
    cfg = {
        "state_dir": "state",
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "control": {"listen": {"host": "127.0.0.1", "port": free_port()}},
        "identity": {"issuers": [{"issuer": idp.issuer, "audience": idp.audience, "jwks_file": str(idp.jwks_path),
                                  "algorithms": ["RS256", "ES256"]}]},
        **extra,
    }
    (tmp_path / "proctor.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c", str(tmp_path / "proctor.yaml")],
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), cfg


def test_a_transparent_port_that_cannot_be_bound_ends_the_process(tmp_path, idp):
    (tmp_path / "token").write_text(idp.token("support-agent"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = _run(tmp_path, idp, _transparent(tmp_path / "token", port))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port} (transparent listener)" in out


def test_started_without_its_token_file_it_runs_not_ready_until_the_file_appears(tmp_path, idp):
    token_file = tmp_path / "secret" / "token"
    proc, cfg = _run(tmp_path, idp, _transparent(token_file))
    control = f"http://127.0.0.1:{cfg['control']['listen']['port']}"
    try:
        def answers() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                return httpx.get(f"{control}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout=30, what="the control API")
        ready = httpx.get(f"{control}/readyz")
        assert ready.status_code == 503
        assert any(f"{token_file} does not exist" in r for r in ready.json()["reasons"])
        token_file.parent.mkdir()
        token_file.write_text(idp.token("support-agent"))
        wait_for(lambda: httpx.get(f"{control}/readyz").status_code == 200, what="ready once the token exists")
    finally:
        proc.terminate()
        proc.wait(15)
