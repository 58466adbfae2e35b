"""Ready means ready: `/readyz`, `/healthz`, and `proctor run` exiting when it cannot listen.

- `proctor run` exits non-zero, naming the address, when the agent port, the
  gateway port or the control port is taken (mitmproxy alone would log the
  bind error and run on without the agent port while /readyz said ready).
- `/readyz` is 200 with `{"ready": true, "reasons": []}` only while every
  required part is up, else 503 with the reasons: here an audit sink with
  `overflow: fail_closed` that cannot deliver (and back to 200 once it can), and
  a runtime whose engine and store are not up yet (a lost store is in
  tests/test_store_loss.py).
- `/healthz` reports each component.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from conftest import Proctor, free_port, wait_for

from proxy.config import load_config
from proxy.control.api import build_app
from proxy.server import build_runtime
from proxy.store.guard import MARKER_NAME


def run_expecting_exit(p: Proctor) -> tuple[subprocess.CompletedProcess, float]:
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path)],
                         cwd=str(p.dir), capture_output=True, text=True, timeout=60)
    return out, time.monotonic() - t


@pytest.mark.parametrize("listener", ["agents listener", "gateway listener", "control API"])
def test_proctor_run_exits_non_zero_when_a_port_is_taken(proctor_factory, listener: str):
    p = proctor_factory()
    p.stop()
    port = {"agents listener": p.port, "gateway listener": p.gateway_port, "control API": p.control_port}[listener]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        out, took = run_expecting_exit(p)
        # the other ports were free: nothing may be left listening on them
        others = {p.port, p.gateway_port, p.control_port} - {port}
        for other in others:
            with socket.socket() as probe:
                probe.settimeout(0.5)
                assert probe.connect_ex(("127.0.0.1", other)) != 0, f"port {other} still open"
    assert out.returncode != 0, out.stderr
    assert f"proctor: cannot listen on 127.0.0.1:{port} ({listener})" in out.stderr, out.stderr
    assert "address already in use" in out.stderr.lower(), out.stderr
    assert took < 30


def test_ready_and_health_report_every_component(proctor_factory):
    p = proctor_factory()
    r = httpx.get(f"{p.control_url}/readyz", timeout=5)
    assert r.status_code == 200 and r.json() == {"ready": True, "reasons": []}
    h = p.health()
    assert h["status"] == "ok" and h["ready"] is True and h["engine_running"] is True
    c = h["components"]
    assert c["listeners"]["status"] == "ok"
    assert {(x["name"], x["address"], x["up"]) for x in c["listeners"]["listeners"]} == {
        ("agents", f"127.0.0.1:{p.port}", True),
        ("gateway", f"127.0.0.1:{p.gateway_port}", True),
    }
    store = c["store"]
    marker = json.loads((p.dir / "state" / MARKER_NAME).read_text())
    assert store["status"] == "ok" and store["backend"] == "sqlite" and store["store_id"] == marker["store_id"]
    assert store["location"].endswith("state/proctor.db")
    wait_for(lambda: p.health()["components"]["store"]["last_check"] is not None, timeout=5, what="a store check")
    assert c["policies"]["status"] == "ok" and c["policies"]["policy_count"] > 0
    assert c["audit"]["status"] == "ok"
    assert c["audit"]["sinks"] == [{"name": "file", "overflow": "fail_closed", "healthy": True, "queue_depth": 0}]
    assert c["identity"]["issuers"][0]["issuer"] == "https://idp.test" and c["identity"]["issuers"][0]["keys"] == 2


class LateReceiver:
    """A TCP port that refuses connections until start(), then reads whatever arrives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received = bytearray()
        self._sock: socket.socket | None = None

    def start(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                self.received += data

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def test_readyz_is_503_while_a_fail_closed_audit_sink_cannot_deliver(proctor_factory, idp, upstream):
    siem = LateReceiver()
    sink = {"type": "syslog", "name": "siem", "host": "127.0.0.1", "port": siem.port, "transport": "tcp",
            "overflow": "fail_closed", "min_backoff": 0.05, "max_backoff": 0.2}
    p = proctor_factory({"audit": {"sinks": [sink]}})  # ready at start: nothing to deliver yet
    try:
        tok = idp.token("ready-bot", groups=["readers"])
        with httpx.Client(proxy=p.proxy_url_with("ready-bot", tok), timeout=10) as c:
            assert c.get(f"http://127.0.0.1:{upstream.port}/items/1").status_code == 200  # an event to deliver

        def readyz() -> httpx.Response:
            return httpx.get(f"{p.control_url}/readyz", timeout=5)

        wait_for(lambda: readyz().status_code == 503, timeout=10, what="/readyz to report the failing sink")
        body = readyz().json()
        assert body["ready"] is False
        assert any("audit sink 'siem'" in r and "fail_closed" in r for r in body["reasons"]), body
        audit = p.health()["components"]["audit"]
        assert audit["status"] == "down"
        assert {s["name"]: s["healthy"] for s in audit["sinks"]} == {"file": True, "siem": False}
        # and the gate it reports on does refuse writes meanwhile
        with httpx.Client(proxy=p.proxy_url_with("ready-bot", idp.token("ready-bot", groups=["writers"])),
                          timeout=10) as c:
            assert c.post(f"http://127.0.0.1:{upstream.port}/items", json={}).status_code == 503

        siem.start()
        wait_for(lambda: readyz().status_code == 200, timeout=10, what="/readyz once the sink delivers")
        assert readyz().json() == {"ready": True, "reasons": []}
        assert b"ready-bot" in siem.received
    finally:
        siem.close()


def test_not_ready_before_the_engine_and_the_store_are_up(tmp_path: Path):
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"state_dir": "state", "control": {"listen": {"host": "127.0.0.1", "port": 0}}}))
    runtime = build_runtime(load_config(cfg))

    async def main():
        async with TestClient(TestServer(build_app(runtime))) as client:
            r = await client.get("/readyz")
            assert r.status == 503
            body = await r.json()
            assert body["ready"] is False
            assert "the proxy engine is not running" in body["reasons"]
            assert "the state store is not open" in body["reasons"]
            r = await client.get("/healthz")
            assert r.status == 200  # liveness: the process answers
            h = await r.json()
            assert h["status"] == "degraded" and h["ready"] is False
            assert h["components"]["store"]["status"] == "down"
            assert h["components"]["listeners"]["status"] == "down"

    asyncio.run(main())
