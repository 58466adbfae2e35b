"""Generic egress never reaches Proctor's own listeners through this host's other addresses.

A listener bound to the unspecified address (`0.0.0.0`, `::`: the usual choice in a
container, so the control API and the gateway answer from outside the pod) answers on
every address of the host, not only on loopback. tests/test_proxy_loop.py proves the
loopback names are refused as a loop; here the agent names the host's own non-loopback
address (a pod IP) with such a listener's port: with an any-host egress permit, Proctor
dialled itself there. It is refused as a loop (508), recorded, and never reaches it.

The same holds for a connector's upstream on loopback (connectors/aliases.py): served on
every address, it is reached by the host's own address too, and generic egress there is
refused as that connector's alias (403), never judged as an `http.request` around the
connector's policies.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import requests

from conftest import SUPPORT, Upstream, _start_upstream, free_port, port_open, start_proctor, wait_for

pytestmark = pytest.mark.integration


def _local_non_loopback_ipv4() -> str | None:
    """This host's outbound IPv4 address (no packet is sent: a UDP connect only picks a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))
        except OSError:
            return None
        ip = s.getsockname()[0]
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


@pytest.fixture
def elsewhere(tmp_path):
    up = _start_upstream(tmp_path, None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


def test_a_listener_on_every_address_is_a_loop_by_the_hosts_own_address(proctor_factory, idp, elsewhere):
    local = _local_non_loopback_ipv4()
    if local is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    gateway_port = free_port()  # the gateway on every address (the fixture's routes kept)
    p = proctor_factory({"egress": {"default": "generic"},
                         "gateway": {"enabled": True, "listen": {"host": "0.0.0.0", "port": gateway_port}}})
    # the gateway answers on that address: the path the agent would take is real
    assert requests.get(f"http://{local}:{gateway_port}/svc/items/1", timeout=10).status_code == 401
    token = idp.token("egress-bot", groups=["egress"])
    proxies = {"http": p.proxy_url_with("egress-bot", token)}
    r = requests.get(f"http://{local}:{gateway_port}/svc/items/1", proxies=proxies, timeout=10)
    assert r.status_code == 508, (r.status_code, r.text[:300])
    body = r.json()
    assert body["reasons"] == ["proxy-loop"] and body["decision_id"], body
    assert p.decision(body["decision_id"])["status"] == 508
    # generic egress elsewhere still goes through
    r = requests.get(f"http://127.0.0.1:{elsewhere.port}/anything", proxies=proxies, timeout=10)
    assert r.status_code == 200, r.text
    assert [x["path"] for x in elsewhere.received()] == ["/anything"]


@pytest.fixture
def upstream_everywhere(tmp_path):
    """The test connector's upstream (127.0.0.1:<port> in its manifest), served on 0.0.0.0."""
    port = free_port()
    log = tmp_path / "received.jsonl"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "echo_server.py"), "--host", "0.0.0.0", "--port",
                             str(port), "--log", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), what=f"upstream on {port}")
    yield Upstream(port, log, proc, False)
    proc.terminate()
    proc.wait(5)


def test_a_connector_upstream_on_every_address_is_not_reached_by_the_hosts_own_address(
        tmp_path, idp, pki, upstream_everywhere, upstream_tls):
    local = _local_non_loopback_ipv4()
    if local is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    up = upstream_everywhere
    p = start_proctor(tmp_path / "p", idp, pki, up, upstream_tls, {"egress": {"default": "generic"}})
    try:
        # the upstream answers on that address: the path the agent would take is real
        assert requests.get(f"http://{local}:{up.port}/items/7", timeout=10).status_code == 200
        up.clear()
        # in the `egress` group (any host generically) but not allowed to delete items (no-item-deletes)
        token = idp.token("alias-bot", groups=["egress", "writers"])
        proxies = {"http": p.proxy_url_with("alias-bot", token)}
        r = requests.delete(f"http://{local}:{up.port}/items/7", proxies=proxies, timeout=10)
        assert r.status_code == 403, (r.status_code, r.text[:300])
        body = r.json()
        assert body["reasons"] == ["connector-alias"] and "testsvc" in body["detail"], body
        assert up.received() == []
        # by the connector's own name it is decided by the connector's policies
        r = requests.delete(f"http://127.0.0.1:{up.port}/items/7", proxies=proxies, timeout=10)
        assert r.status_code == 403 and "no-item-deletes" in r.json()["reasons"], r.text[:300]
        assert up.received() == []
    finally:
        p.stop()
