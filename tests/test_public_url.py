"""control.public_url: held requests' status URL, `Location` and console links name where the
control API is reached, never a wildcard listen address (issue 15 item 8).

Unit tests of the validation and the fallback, then real proxies: an async hold answered
through a proxy with a public URL (Location, status_url and the webhook's console link use
it), and a proxy whose control API listens on 0.0.0.0 without one (loopback in every link,
a startup warning, and the status URL answers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from conftest import Proctor, wait_for
from proxy.config import ConfigError, load_config
from proxy.public_url import check_public_url, control_base_url

# The hold policies and helpers of the approval tests (an order over 500 is held for `managers`).
from test_approvals import (  # noqa: F401 - hold_policies and make are fixtures
    agent_client,
    agent_token,
    hold_policies,
    make,
    marker,
    order,
    order_url,
)


# ------------------------------------------------------------------------- unit
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://proctor.example.com", "https://proctor.example.com"),
        ("https://proctor.example.com/", "https://proctor.example.com"),
        ("HTTPS://proctor.example.com:8443/ctl/", "https://proctor.example.com:8443/ctl"),
        ("http://proctor.agents.svc.cluster.local:8081", "http://proctor.agents.svc.cluster.local:8081"),
        ("http://[2001:db8::1]:8081", "http://[2001:db8::1]:8081"),
    ],
)
def test_public_url_accepted_and_normalised(given, expected):
    assert check_public_url(given) == expected


@pytest.mark.parametrize(
    ("given", "complaint"),
    [
        ("ftp://proctor.example.com", "http:// or https://"),
        ("proctor.example.com", "http:// or https://"),
        ("https://user:secret@proctor.example.com", "user name or password"),
        ("https://user@proctor.example.com", "user name or password"),
        ("https://proctor.example.com/?x=1", "query or fragment"),
        ("https://proctor.example.com/#top", "query or fragment"),
        ("https:///console", "must name a host"),
        ("http://0.0.0.0:8081", "wildcard"),
        ("http://[::]:8081", "wildcard"),
        ("https://proctor.example.com:99999", "not a valid URL"),
        ("https://proctor example.com", "whitespace"),
        ("https://proctor.example.com/\nX-Injected: 1", "whitespace"),
    ],
)
def test_public_url_refused(given, complaint):
    with pytest.raises(ValueError, match=complaint):
        check_public_url(given)


def test_base_url_without_public_url():
    assert control_base_url("0.0.0.0", 8081, None) == ("http://127.0.0.1:8081", True)
    assert control_base_url("::", 8081, None) == ("http://[::1]:8081", True)
    assert control_base_url("[::]", 8081, None) == ("http://[::1]:8081", True)
    assert control_base_url("", 8081, None) == ("http://127.0.0.1:8081", True)
    assert control_base_url("127.0.0.1", 9000, None) == ("http://127.0.0.1:9000", False)
    assert control_base_url("::1", 9000, None) == ("http://[::1]:9000", False)
    assert control_base_url("proctor.internal", 9000, None) == ("http://proctor.internal:9000", False)
    assert control_base_url("0.0.0.0", 8081, "https://p.example.com") == ("https://p.example.com", False)


def test_config_loader_validates_public_url(tmp_path: Path):
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"control": {"listen": {"host": "0.0.0.0", "port": 8081},
                                               "public_url": "https://proctor.example.com/"}}))
    assert load_config(cfg).control.base_url == "https://proctor.example.com"
    cfg.write_text(yaml.safe_dump({"control": {"listen": {"host": "0.0.0.0", "port": 8081}}}))
    assert load_config(cfg).control.base_url == "http://127.0.0.1:8081"
    cfg.write_text(yaml.safe_dump({"control": {"public_url": "https://admin:hunter2@proctor.example.com"}}))
    with pytest.raises(ConfigError, match="control.public_url") as e:
        load_config(cfg)
    assert "hunter2" not in str(e.value)  # the loader never echoes values


# ------------------------------------------------------------------ real proxies
class Hooks:
    """A webhook receiver on loopback that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks():
    h = Hooks()
    yield h
    h.close()


def hold(p: Proctor, idp, upstream) -> httpx.Response:
    """An order over 500 from order-bot, held (async: answered 202 at once)."""
    with agent_client(p, agent_token(idp)) as c:
        resp = c.post(order_url(upstream), json=order(marker()))
    assert resp.status_code == 202, resp.text
    return resp


def restart_with_control(p: Proctor, started: list[Proctor], control: dict) -> Proctor:
    """Stop `p` and start it again on the same config, ports and state with `control` merged in."""
    p.stop()
    cfg = yaml.safe_load(p.config_path.read_text())
    cfg["control"] = {**cfg["control"], **control}
    p.config_path.write_text(yaml.safe_dump(cfg))
    log_path = p.dir / "proctor-restarted.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path), "--log-level", "info"],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=str(p.dir), env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    new = Proctor(p.dir, p.config_path, p.port, p.control_port, p.gateway_port, proc, log_path, p.ca_pem, p.policies_dir)
    started.append(new)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"proctor exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            return httpx.get(f"{new.control_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, what="restarted proctor readiness")
    return new


@pytest.mark.integration
def test_held_request_links_use_the_public_url(make, idp, upstream, hooks):
    public = "https://proctor.example.test/ctl"
    p = make({"mode": "async", "webhooks": [{"url": hooks.url, "events": ["requested"]}]},
             control={"public_url": public + "/"})
    resp = hold(p, idp, upstream)
    body = resp.json()
    aid = body["approval_id"]
    assert resp.headers["Location"] == body["status_url"] == f"{public}/v1/approvals/{aid}/status"
    # the path under the public URL is the control API's own (an ingress strips the /ctl prefix)
    path = urlsplit(resp.headers["Location"]).path.removeprefix("/ctl")
    st = httpx.get(f"{p.control_url}{path}", headers={"Authorization": f"Bearer {agent_token(idp)}"}, timeout=5)
    assert st.status_code == 200 and st.json()["state"] == "pending"
    # the approvers' webhook links into the console under the same public URL
    wait_for(lambda: len(hooks.bodies) >= 1, timeout=10, what="the requested webhook")
    (sent,) = hooks.bodies
    assert sent["type"] == "proctor.approval.requested" and sent["approval"]["id"] == aid
    assert sent["console_url"] == f"{public}/console/approvals/{aid}"


@pytest.mark.integration
def test_wildcard_listen_without_public_url_never_names_0_0_0_0(make, idp, upstream, hooks):
    p = make({"mode": "async", "webhooks": [{"url": hooks.url, "events": ["requested"]}]})
    p = restart_with_control(p, make.started, {"listen": {"host": "0.0.0.0", "port": p.control_port}})
    assert "0.0.0.0" in p.config_path.read_text()
    resp = hold(p, idp, upstream)
    body = resp.json()
    aid = body["approval_id"]
    loopback = f"http://127.0.0.1:{p.control_port}"
    assert resp.headers["Location"] == body["status_url"] == f"{loopback}/v1/approvals/{aid}/status"
    assert "0.0.0.0" not in resp.text and "0.0.0.0" not in json.dumps(dict(resp.headers))
    # the guess is a working address on this host
    st = httpx.get(resp.headers["Location"], headers={"Authorization": f"Bearer {agent_token(idp)}"}, timeout=5)
    assert st.status_code == 200 and st.json()["state"] == "pending"
    wait_for(lambda: len(hooks.bodies) >= 1, timeout=10, what="the requested webhook")
    assert hooks.bodies[0]["console_url"] == f"{loopback}/console/approvals/{aid}"
    assert "0.0.0.0" not in json.dumps(hooks.bodies)
    # and the operator is told to set control.public_url
    log = p.log()
    assert "control.public_url is not set" in log and f"name {loopback}" in log
