"""Transparent mode, attacked with hand-made bytes (a second attacker round, issue 16).

The agent (its own uid, no proxy variable, in the agent namespace of
tests/support/transparent_netns.py) writes raw HTTP on connections the network
redirects to Proctor's transparent listener. Each attack must end in a refusal
that is recorded, with no byte reaching any upstream (the ERP's and the
attacker's recording servers), or in exactly the request Proctor judged:

- HTTP/1.0 without Host (and without an absolute-form target): names nothing;
- an absolute-form target naming another host than Host (both ways round);
- Content-Length with Transfer-Encoding (request smuggling), obs-fold header lines;
- a WebSocket upgrade to a path policy refuses;
- an IPv6 literal Host, a very long Host;
- plain HTTP redirected from a TLS port naming an https connector endpoint.

Needs root (namespaces): skipped with the reason otherwise; CI runs as root.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from conftest import DATA
from support.transparent_netns import (
    AGENT_UID, ATTACKER_IP, ERP6, ERP_IP, HTTP_PORT, HTTPS_PORT, Netns, python_for, why_no_netns,
)

pytestmark = pytest.mark.integration

NO_NETNS = why_no_netns()
if NO_NETNS is not None:
    pytest.skip(NO_NETNS, allow_module_level=True)

WORKLOAD = "support-agent"
ERP = f"erp.test:{HTTP_PORT}"

# Send bytes on one TCP connection (redirected by the rules), print what came back as JSON.
RAW_CLIENT = r"""
import json, socket, sys
host, port, data = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
out = b""
try:
    s = socket.socket(fam, socket.SOCK_STREAM); s.settimeout(8); s.connect((host, port))
    s.sendall(data)
    while True:
        chunk = s.recv(65536)
        if not chunk: break
        out += chunk
except OSError as e:
    print(json.dumps({"error": type(e).__name__, "got": out.decode("latin-1")})); sys.exit()
print(json.dumps({"got": out.decode("latin-1")}))
"""


@pytest.fixture(scope="module")
def env(idp) -> Iterator[Netns]:
    ns = Netns("iptables")
    try:
        ns.build(idp, idp.token(WORKLOAD, groups=["readers", "writers"], ttl=3600), policies=DATA / "policies")
        (ns.agent_dir / "raw.py").write_text(RAW_CLIENT)
        yield ns
    finally:
        ns.close()


@pytest.fixture
def fresh(env: Netns) -> Netns:
    env.clear_logs()
    return env


def raw(env: Netns, host: str, port: int, data: bytes) -> str:
    done = env.as_agent([*python_for(AGENT_UID), str(env.agent_dir / "raw.py"), host, str(port), data.hex()])
    line = [x for x in done.stdout.splitlines() if x.startswith("{")]
    assert line, done
    return json.loads(line[-1])["got"]


def status(reply: str) -> int:
    assert reply.startswith("HTTP/1."), reply[:300]
    return int(reply.split(" ", 2)[1])


def body_of(reply: str) -> dict:
    return json.loads(reply.split("\r\n\r\n", 1)[1])


def nothing_reached(env: Netns) -> None:
    for name in ("erp-http", "erp-https", "attacker-http", "attacker-https", "erp6-http"):
        assert env.received(name) == [], name


def test_http10_without_host_names_nothing_and_is_refused(fresh: Netns):
    reply = raw(fresh, ERP_IP, HTTP_PORT, b"GET /items/1 HTTP/1.0\r\n\r\n")
    assert status(reply) == 400, reply
    body = body_of(reply)
    assert body["title"] == "Destination not named" and body["decision_id"]
    assert fresh.decision(body["decision_id"])["agent"] == WORKLOAD
    nothing_reached(fresh)
    # HTTP/1.1 without Host: refused too
    assert status(raw(fresh, ERP_IP, HTTP_PORT, b"GET /items/1 HTTP/1.1\r\n\r\n")) == 400
    nothing_reached(fresh)


@pytest.mark.parametrize(("target", "host"), [
    (f"http://attacker.test:{HTTP_PORT}/items/1", ERP),  # judged as the ERP, an upstream reading the line: attacker
    (f"http://{ERP}/items/1", f"attacker.test:{HTTP_PORT}"),  # the reverse
    (f"http://{ERP_IP}:{HTTP_PORT}/items/1", ERP),  # the same server by another name: still two names
])
def test_absolute_form_naming_another_host_than_host_is_misdirected(fresh: Netns, target: str, host: str):
    reply = raw(fresh, ATTACKER_IP, HTTP_PORT, f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert status(reply) == 421, reply
    nothing_reached(fresh)


def test_content_length_with_transfer_encoding_smuggles_nothing(fresh: Netns):
    """CL and TE together: a front end and a back end may frame the body differently, and the
    'rest' becomes a second request no policy saw (here a DELETE, which policy refuses)."""
    smuggled = f"DELETE /items/9 HTTP/1.1\r\nHost: {ERP}\r\n\r\n"
    body = f"0\r\n\r\n{smuggled}"
    req = (f"POST /items HTTP/1.1\r\nHost: {ERP}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n{body}").encode()
    reply = raw(fresh, ERP_IP, HTTP_PORT, req)
    assert status(reply) in (400, 415), reply
    got = fresh.received("erp-http")
    assert all(r["method"] != "DELETE" for r in got), got
    assert got == [], got
    # TE then CL, TE spelled differently: the same
    for te in ("chunked", " chunked", "Chunked", "chunked, identity", "identity"):
        req = (f"POST /items HTTP/1.1\r\nHost: {ERP}\r\nContent-Type: application/json\r\n"
               f"Transfer-Encoding: {te}\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
        reply = raw(fresh, ERP_IP, HTTP_PORT, req)
        assert status(reply) in (400, 415, 501), (te, reply)
    assert [r for r in fresh.received("erp-http") if r["method"] == "DELETE"] == []


def test_obs_fold_header_lines_are_refused(fresh: Netns):
    """A header line starting with whitespace continues the previous one (obs-fold, RFC 9112
    §5.2): servers disagree whether it does, so a folded Host or Transfer-Encoding could name
    something else to the upstream."""
    for req in (f"GET /items/1 HTTP/1.1\r\nHost: {ERP}\r\nX-Note: a\r\n b\r\n\r\n",
                f"GET /items/1 HTTP/1.1\r\nX-Note: a\r\n Host: attacker.test\r\nHost: {ERP}\r\n\r\n"):
        reply = raw(fresh, ERP_IP, HTTP_PORT, req.encode())
        assert status(reply) == 400, reply
    nothing_reached(fresh)


def test_a_websocket_upgrade_to_a_refused_request_is_refused(fresh: Netns):
    ws = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" \
         "Sec-WebSocket-Version: 13\r\n"
    reply = raw(fresh, ERP_IP, HTTP_PORT, f"GET /admin/ws HTTP/1.1\r\nHost: {ERP}\r\n{ws}\r\n".encode())
    assert status(reply) in (403, 404), reply
    assert "101" not in reply.split("\r\n", 1)[0]
    nothing_reached(fresh)


def test_ipv6_literal_and_very_long_hosts(fresh: Netns):
    # an IPv6 literal no connector covers: egress default deny, the ERP's IPv6 server sees nothing
    reply = raw(fresh, ERP6, HTTP_PORT, f"GET /items/1 HTTP/1.1\r\nHost: [{ERP6}]:{HTTP_PORT}\r\n\r\n".encode())
    assert status(reply) == 403 and body_of(reply)["reasons"] == ["egress-default-deny"], reply
    # an IPv6 literal without its brackets names no host:port
    reply = raw(fresh, ERP6, HTTP_PORT, f"GET /items/1 HTTP/1.1\r\nHost: {ERP6}\r\n\r\n".encode())
    assert status(reply) in (400, 421), reply
    # a very long Host (a label over 63, a name over 253 characters, a huge header)
    for host in ("a" * 64 + ".erp.test", ".".join(["a" * 60] * 5), "erp.test" + "x" * 20000):
        reply = raw(fresh, ERP_IP, HTTP_PORT, f"GET /items/1 HTTP/1.1\r\nHost: {host}:{HTTP_PORT}\r\n\r\n".encode())
        assert reply == "" or status(reply) in (400, 403, 421, 431), (host[:80], reply[:300])
    nothing_reached(fresh)


def test_plain_http_from_a_tls_port_never_carries_the_credential(fresh: Netns):
    """The connector names erp.test:8443 (its HTTPS endpoint) and injects X-Erp-Key: plain HTTP
    redirected from 8443 is refused at the connection, the key never goes out in the clear."""
    reply = raw(fresh, ERP_IP, HTTPS_PORT, f"GET /items/1 HTTP/1.1\r\nHost: erp.test:{HTTPS_PORT}\r\n\r\n".encode())
    assert reply == "" or status(reply) == 403, reply
    nothing_reached(fresh)


def test_pipelined_requests_on_one_redirected_connection_are_each_decided(fresh: Netns):
    """One connection, three requests written at once: an allowed read, a DELETE policy refuses
    and a read naming the attacker. Each is decided on its own; only the first reaches anyone."""
    req = (f"GET /items/1 HTTP/1.1\r\nHost: {ERP}\r\n\r\n"
           f"DELETE /items/2 HTTP/1.1\r\nHost: {ERP}\r\n\r\n"
           f"GET /items/3 HTTP/1.1\r\nHost: attacker.test:{HTTP_PORT}\r\nConnection: close\r\n\r\n").encode()
    reply = raw(fresh, ERP_IP, HTTP_PORT, req)
    statuses = [int(code) for code in re.findall(r"HTTP/1\.1 (\d{3}) ", reply)]
    assert statuses == [200, 403, 403], reply[:2000]
    assert [(r["method"], r["path"]) for r in fresh.received("erp-http")] == [("GET", "/items/1")]
    assert fresh.received("attacker-http") == []
