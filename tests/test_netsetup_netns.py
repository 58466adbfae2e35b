"""`proctor netsetup` in real network namespaces (both backends).

Two throwaway namespaces joined by a veth pair: "agent" (where the rules go, the pod) and
"upstream" (the rest of the world, no rules). In the agent namespace, processes run under
distinct uids (setpriv): Proctor's, the agent's, an excluded one. The checks are behavioural:
the agent's TCP connect lands on a listener on the proxy port owned by Proctor's uid, which
reads the original destination with SO_ORIGINAL_DST; Proctor's own connect reaches the
upstream; the agent's UDP does not leave except as DNS; IPv6 the same. And on the rule
sets: --apply twice equals once, the printed script equals --apply, --remove leaves nothing
of Proctor's (and everything of anyone else's).

Needs root (to create namespaces) and iptables/nftables: skipped with the reason otherwise.
CI runs as root, so there they run. The addresses and ports below are private to the two
namespaces each test creates, so fixed values cannot collide with other tests.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

PROXY_UID, AGENT_UID, EXCLUDED_UID = 1337, 10001, 20002
PROXY_PORT = 15001
UP4, UP4_OTHER, UP4_THIRD, AGENT4 = "10.77.0.1", "10.77.0.3", "10.77.0.4", "10.77.0.2"
UP6, AGENT6 = "fd77::1", "fd77::2"
TCP_PORT, EXCLUDED_PORT, LOCAL_PORT, UDP_PORT = 8443, 5432, 9000, 4433


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "setpriv", "iptables-restore", "ip6tables-restore", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux iptables nftables)"
    name = f"ptprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


NO_NETNS = _why_no_netns()
needs_netns = pytest.mark.skipif(NO_NETNS is not None, reason=NO_NETNS or "")
BACKENDS = ["iptables", "nftables"]


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def _python_for_other_uids() -> str:
    """An interpreter a non-root uid can execute (the probes below use the standard library only)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        ok = subprocess.run(["setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}", "--clear-groups",
                             candidate, "-c", "pass"], capture_output=True)
        if ok.returncode == 0:
            return candidate
    pytest.skip("no Python interpreter a non-root uid can run")


def cli(*args: str, netns: str | None = None, uid: int | None = None) -> subprocess.CompletedProcess[str]:
    """`proctor netsetup ARGS`, optionally inside a namespace (as an init container would) and as a uid."""
    argv = [sys.executable, "-m", "proxy.cli", "netsetup", *args]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


# -------------------------------------------------------------------- probe programs
LISTENER = r"""
import os, socket, struct, sys, threading
port = int(sys.argv[1])
SO_ORIGINAL_DST = 80  # (IP6T_SO_ORIGINAL_DST has the same value)
def original(conn, fam):
    if fam == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntop(fam, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    return socket.inet_ntop(fam, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
def serve(fam, host):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port)); s.listen(64)
    def loop():
        while True:
            conn, _ = s.accept()
            with conn:
                h, p = original(conn, fam)
                conn.sendall(f"PROXY {h} {p} uid={os.getuid()}\n".encode())
    threading.Thread(target=loop, daemon=True).start()
serve(socket.AF_INET, "0.0.0.0"); serve(socket.AF_INET6, "::")
print("ready", flush=True)
sys.stdin.read()
"""

# TCP listeners answer with a fixed word; UDP sockets print what reaches them.
SERVERS = r"""
import socket, sys, threading
word = sys.argv[1]; tcp = [int(p) for p in sys.argv[2].split(",") if p]; udp = sys.argv[3].split(",") if sys.argv[3] else []
def tcp_serve(fam, host, port):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port)); s.listen(64)
    def loop():
        while True:
            conn, _ = s.accept()
            with conn:
                conn.sendall(f"{word}\n".encode())
    threading.Thread(target=loop, daemon=True).start()
def udp_serve(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((host, port))
    def loop():
        while True:
            data, _ = s.recvfrom(2048)
            print(f"UDP {host} {port} {data.decode()}", flush=True)
    threading.Thread(target=loop, daemon=True).start()
for p in tcp:
    tcp_serve(socket.AF_INET, "0.0.0.0", p); tcp_serve(socket.AF_INET6, "::", p)
for hp in udp:
    host, _, port = hp.rpartition(":")
    udp_serve(host.strip("[]"), int(port))
print("ready", flush=True)
sys.stdin.read()
"""

CLIENT = r"""
import socket, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if kind == "tcp":
        with socket.create_connection((host, port), timeout=3) as s:
            print(s.makefile().readline().strip() or "EMPTY")
    else:
        s = socket.socket(fam, socket.SOCK_DGRAM); s.sendto(sys.argv[4].encode(), (host, port)); print("SENT")
except OSError as e:
    print(f"ERR {type(e).__name__} {e.errno}")
"""


@dataclass
class Topology:
    agent: str
    upstream: str
    python: str
    procs: list[subprocess.Popen[str]]

    def run_as(self, uid: int, code: str, *args: str, netns: str | None = None) -> subprocess.Popen[str]:
        argv = ["ip", "netns", "exec", netns or self.agent]
        if uid != 0:
            argv += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        proc = subprocess.Popen([*argv, self.python, "-c", code, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            raise AssertionError(f"probe did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
        return proc

    def client(self, uid: int, kind: str, host: str, port: int, payload: str = "") -> str:
        argv = ["ip", "netns", "exec", self.agent, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                self.python, "-c", CLIENT, kind, host, str(port), payload]
        return sh(*argv).stdout.strip()


@pytest.fixture
def topo() -> Iterator[Topology]:
    if NO_NETNS is not None:
        pytest.skip(NO_NETNS)
    tag = secrets.token_hex(3)
    agent, upstream = f"ptagent{tag}", f"ptup{tag}"
    python = _python_for_other_uids()
    t = Topology(agent, upstream, python, [])
    sh("ip", "netns", "add", agent)
    # the agent namespace's resolver (`ip netns exec` mounts /etc/netns/<name>/resolv.conf over
    # /etc/resolv.conf; `netsetup --netns` pins what it names by default)
    etc = Path("/etc/netns") / agent
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {UP4}\nnameserver {UP6}\n")
    try:
        sh("ip", "netns", "add", upstream)
        va, vu = f"pva{tag}", f"pvu{tag}"
        sh("ip", "link", "add", va, "type", "veth", "peer", "name", vu)
        sh("ip", "link", "set", va, "netns", agent)
        sh("ip", "link", "set", vu, "netns", upstream)
        for ns, dev, v4s, v6 in ((agent, va, [AGENT4], AGENT6), (upstream, vu, [UP4, UP4_OTHER, UP4_THIRD], UP6)):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            for a in v4s:
                sh("ip", "-n", ns, "addr", "add", f"{a}/29", "dev", dev)
            sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield t
    finally:
        for p in t.procs:
            p.kill()
            p.wait(5)
        for ns in (agent, upstream):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)


def ruleset(ns: str, backend: str) -> str:
    """The namespace's rules, without the timestamps and counters that differ between reads."""
    if backend == "nftables":
        text = sh("ip", "netns", "exec", ns, "nft", "list", "ruleset").stdout
    else:
        text = "".join(sh("ip", "netns", "exec", ns, tool).stdout for tool in ("iptables-save", "ip6tables-save"))
    text = re.sub(r"(?m)^#.*\n", "", text)
    text = re.sub(r"\[\d+:\d+\]", "[0:0]", text)
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)


def rules_only(text: str, backend: str) -> list[str]:
    """The rules and user chains, per table (iptables-nft creates empty built-in tables on first use)."""
    if backend == "nftables":
        return text.splitlines()
    out, table = [], ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line
        elif line.startswith("-A ") or re.match(r":\S+ - ", line):
            out.append(f"{table} {line}")
    return out


def applied(topo: Topology, backend: str, *extra: str) -> None:
    done = cli("--backend", backend, "--proxy-uid", str(PROXY_UID), "--proxy-port", str(PROXY_PORT), *extra,
               "--netns", topo.agent, "--apply")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("applied:"), done.stdout


# ------------------------------------------------------------------ rule sets
@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_twice_is_once_and_remove_leaves_nothing(topo: Topology, backend: str):
    before = ruleset(topo.agent, backend)
    applied(topo, backend)
    once = ruleset(topo.agent, backend)
    if backend == "iptables":
        assert once.count("-A OUTPUT -j PROCTOR_OUTPUT") == 4  # nat and filter, IPv4 and IPv6
        assert once.count("REDIRECT --to-ports 15001") == 4  # every TCP and the status address, IPv4 and IPv6
        assert "--uid-owner 1337" in once and "--ctstate DNAT" in once and "-p ipv6-icmp" in once
    else:
        assert once.count("table inet proctor") == 1
        assert "redirect to :15001" in once and "meta skuid 1337 return" in once
    applied(topo, backend)
    assert ruleset(topo.agent, backend) == once, "a second --apply must leave exactly one copy"
    # a re-run with other options replaces, never adds
    applied(topo, backend, "--exclude-port", "5432")
    changed = ruleset(topo.agent, backend)
    assert "5432" in changed
    if backend == "iptables":
        assert changed.count("-A OUTPUT -j PROCTOR_OUTPUT") == 4
    else:
        assert changed.count("table inet proctor") == 1
    applied(topo, backend)
    assert ruleset(topo.agent, backend) == once
    done = cli("--backend", backend, "--netns", topo.agent, "--remove")
    assert done.returncode == 0 and done.stdout.startswith("removed:"), done.stderr
    after = ruleset(topo.agent, backend)
    assert "PROCTOR" not in after and "proctor" not in after
    # what iptables-nft creates on first use (empty built-in chains) may stay; no rule does
    assert not re.search(r"(?m)^-A ", after)
    assert before == "" or not re.search(r"(?m)^-A ", before)
    again = cli("--backend", backend, "--netns", topo.agent, "--remove")
    assert again.returncode == 0, again.stderr
    assert ("nothing to remove" if backend == "iptables" else "removed:") in again.stdout
    assert ruleset(topo.agent, backend) == after


@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_remove_deletes_only_what_apply_added(topo: Topology, backend: str):
    ns = topo.agent
    if backend == "iptables":
        sh("ip", "netns", "exec", ns, "iptables", "-t", "filter", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT")
        sh("ip", "netns", "exec", ns, "iptables", "-t", "nat", "-N", "SOMEONE_ELSE")
    else:
        sh("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "someone_else")
        sh("ip", "netns", "exec", ns, "nft", "add", "chain", "inet", "someone_else", "out",
           "{ type filter hook output priority 10; }")
    theirs = rules_only(ruleset(ns, backend), backend)
    assert any("SOMEONE_ELSE" in line or "someone_else" in line for line in theirs)
    applied(topo, backend)
    assert cli("--backend", backend, "--netns", ns, "--remove").returncode == 0
    assert rules_only(ruleset(ns, backend), backend) == theirs


@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_printed_rules_are_what_apply_installs(topo: Topology, backend: str, tmp_path: Path):
    """The reviewable output, run by hand (twice), leaves the same rules as --apply."""
    args = ["--backend", backend, "--proxy-uid", str(PROXY_UID), "--exclude-cidr", "10.9.0.0/16", "--dns-server", UP4]
    printed = cli(*args)
    assert printed.returncode == 0, printed.stderr
    script = tmp_path / "rules"
    script.write_text(printed.stdout)
    runner = ["nft", "-f"] if backend == "nftables" else ["sh"]
    for _ in range(2):
        sh("ip", "netns", "exec", topo.agent, *runner, str(script))
    by_hand = ruleset(topo.agent, backend)
    assert cli("--backend", backend, "--netns", topo.agent, "--remove").returncode == 0
    done = cli(*args, "--netns", topo.agent, "--apply")
    assert done.returncode == 0, done.stderr
    assert ruleset(topo.agent, backend) == by_hand


@needs_netns
def test_applies_in_the_current_namespace_like_an_init_container(topo: Topology):
    """No --netns: the rules land in the namespace the command runs in, not the caller's."""
    host_before = sh("iptables-save").stdout.count("PROCTOR_OUTPUT")
    done = cli("--proxy-uid", str(PROXY_UID), "--apply", netns=topo.agent)
    assert done.returncode == 0, done.stderr
    assert ruleset(topo.agent, "iptables").count("-A OUTPUT -j PROCTOR_OUTPUT") == 4
    assert sh("iptables-save").stdout.count("PROCTOR_OUTPUT") == host_before


@needs_netns
def test_an_unprivileged_caller_is_refused_clearly(topo: Topology):
    done = cli("--proxy-uid", str(PROXY_UID), "--apply", netns=topo.agent, uid=AGENT_UID)
    assert done.returncode == 1
    assert "CAP_NET_ADMIN" in done.stderr and "Traceback" not in done.stderr
    assert "PROCTOR" not in ruleset(topo.agent, "iptables")


# ---------------------------------------------------------------------- behaviour
@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_agent_traffic_goes_to_proctor_and_nowhere_else(topo: Topology, backend: str):
    applied(topo, backend, "--exclude-uid", str(EXCLUDED_UID), "--exclude-port", str(EXCLUDED_PORT),
            "--exclude-cidr", f"{UP4_OTHER}/32", "--dns-server", UP4, "--dns-server", UP6)
    topo.run_as(PROXY_UID, LISTENER, str(PROXY_PORT))
    udp_targets = ",".join(f"{h}:{p}" for h in (UP4, UP4_OTHER, UP4_THIRD, f"[{UP6}]") for p in (UDP_PORT, 53))
    upstream = topo.run_as(0, SERVERS, "UPSTREAM", f"{TCP_PORT},{EXCLUDED_PORT},53", udp_targets, netns=topo.upstream)
    topo.run_as(0, SERVERS, "LOCAL", str(LOCAL_PORT), "", netns=topo.agent)
    datagrams: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [datagrams.put(line.strip()) for line in upstream.stdout or []], daemon=True).start()

    # the agent's TCP lands on Proctor's listener, which recovers where it was going (IPv4 and IPv6)
    assert topo.client(AGENT_UID, "tcp", UP4, TCP_PORT) == f"PROXY {UP4} {TCP_PORT} uid={PROXY_UID}"
    assert topo.client(AGENT_UID, "tcp", UP6, TCP_PORT) == f"PROXY {UP6} {TCP_PORT} uid={PROXY_UID}"
    assert topo.client(AGENT_UID, "tcp", UP4, 80) == f"PROXY {UP4} 80 uid={PROXY_UID}"  # (nothing listens there)
    # Proctor's own connections reach the upstream
    assert topo.client(PROXY_UID, "tcp", UP4, TCP_PORT) == "UPSTREAM"
    assert topo.client(PROXY_UID, "tcp", UP6, TCP_PORT) == "UPSTREAM"
    # holes, as configured: an excluded uid, port and CIDR
    assert topo.client(EXCLUDED_UID, "tcp", UP4, TCP_PORT) == "UPSTREAM"
    assert topo.client(AGENT_UID, "tcp", UP4, EXCLUDED_PORT) == "UPSTREAM"
    assert topo.client(AGENT_UID, "tcp", UP4_OTHER, TCP_PORT) == "UPSTREAM"
    # DNS over TCP to the pinned resolver is not redirected; to another host it is
    assert topo.client(AGENT_UID, "tcp", UP4, 53) == "UPSTREAM"
    assert topo.client(AGENT_UID, "tcp", UP4_THIRD, 53) == f"PROXY {UP4_THIRD} 53 uid={PROXY_UID}"
    # local destinations (loopback, the namespace's own address) are not redirected
    assert topo.client(AGENT_UID, "tcp", "127.0.0.1", LOCAL_PORT) == "LOCAL"
    assert topo.client(AGENT_UID, "tcp", AGENT4, LOCAL_PORT) == "LOCAL"
    assert topo.client(AGENT_UID, "tcp", "::1", LOCAL_PORT) == "LOCAL"

    # UDP: only DNS to the pinned resolvers leaves for the agent; Proctor's and the excluded uid's pass
    sent = {
        "agent-quic4": topo.client(AGENT_UID, "udp", UP4, UDP_PORT, "agent-quic4"),
        "agent-quic6": topo.client(AGENT_UID, "udp", UP6, UDP_PORT, "agent-quic6"),
        "agent-dns-other": topo.client(AGENT_UID, "udp", UP4_THIRD, 53, "agent-dns-other"),
        "agent-excluded-cidr": topo.client(AGENT_UID, "udp", UP4_OTHER, UDP_PORT, "agent-excluded-cidr"),
        "agent-dns4": topo.client(AGENT_UID, "udp", UP4, 53, "agent-dns4"),
        "agent-dns6": topo.client(AGENT_UID, "udp", UP6, 53, "agent-dns6"),
        "excluded-uid": topo.client(EXCLUDED_UID, "udp", UP4, UDP_PORT, "excluded-uid"),
        "proctor4": topo.client(PROXY_UID, "udp", UP4, UDP_PORT, "proctor4"),
        "proctor6": topo.client(PROXY_UID, "udp", UP6, UDP_PORT, "proctor6"),
    }
    expected = {"agent-dns4", "agent-dns6", "excluded-uid", "proctor4", "proctor6"}
    for name in expected:
        assert sent[name] == "SENT", (name, sent[name])
    # a datagram dropped on the way out fails the send at once (EPERM) or vanishes
    for name in set(sent) - expected:
        assert sent[name] in ("SENT", "ERR PermissionError 1"), (name, sent[name])
    got: set[str] = set()
    deadline = time.monotonic() + 5
    while not expected <= got and time.monotonic() < deadline:
        try:
            got.add(datagrams.get(timeout=0.2).rsplit(" ", 1)[-1])
        except queue.Empty:
            pass
    time.sleep(0.3)  # anything the agent sent earlier would have arrived by now
    while not datagrams.empty():
        got.add(datagrams.get().rsplit(" ", 1)[-1])
    assert got == expected


def _collect(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout or []], daemon=True).start()
    return lines


@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_defaults_pin_dns_to_the_namespaces_resolvers(topo: Topology, backend: str):
    """No --dns-server: the resolvers the namespace's resolv.conf names (UP4, UP6) are the only
    DNS destinations. UDP to port 53 of another host (a tunnel to a server the agent runs there) is
    dropped; DNS over TCP to the resolver goes straight out, to another host it is redirected."""
    applied(topo, backend)
    topo.run_as(PROXY_UID, LISTENER, str(PROXY_PORT))
    upstream = topo.run_as(0, SERVERS, "UPSTREAM", f"{TCP_PORT},{EXCLUDED_PORT},53",
                           f"{UP4_OTHER}:53,{UP4_THIRD}:53,{UP4}:53,[{UP6}]:53,{UP4}:{UDP_PORT}", netns=topo.upstream)
    lines = _collect(upstream)
    for port in (TCP_PORT, EXCLUDED_PORT):
        assert topo.client(AGENT_UID, "tcp", UP4_OTHER, port) == f"PROXY {UP4_OTHER} {port} uid={PROXY_UID}"
    assert topo.client(AGENT_UID, "tcp", UP4, 53) == "UPSTREAM"
    assert topo.client(AGENT_UID, "tcp", UP4_OTHER, 53) == f"PROXY {UP4_OTHER} 53 uid={PROXY_UID}"
    tunnel = [topo.client(AGENT_UID, "udp", UP4_OTHER, 53, "tunnel-other"),
              topo.client(AGENT_UID, "udp", UP4_THIRD, 53, "tunnel-third"),
              topo.client(AGENT_UID, "udp", UP4, UDP_PORT, "agent-quic")]
    assert all(r in ("SENT", "ERR PermissionError 1") for r in tunnel), tunnel
    assert topo.client(AGENT_UID, "udp", UP4, 53, "dns-pinned4") == "SENT"
    assert topo.client(AGENT_UID, "udp", UP6, 53, "dns-pinned6") == "SENT"
    # Proctor's own uid is not limited
    assert topo.client(PROXY_UID, "udp", UP4_OTHER, 53, "proctor-other") == "SENT"
    got: set[str] = set()
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        try:
            got.add(lines.get(timeout=0.2).rsplit(" ", 1)[-1])
        except queue.Empty:
            pass
    time.sleep(0.3)
    while not lines.empty():
        got.add(lines.get().rsplit(" ", 1)[-1])
    assert got == {"dns-pinned4", "dns-pinned6", "proctor-other"}


@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_dns_any_opt_out_lets_udp_53_anywhere_with_a_warning(topo: Topology, backend: str):
    done = cli("--backend", backend, "--proxy-uid", str(PROXY_UID), "--dns-server", "any",
               "--netns", topo.agent, "--apply")
    assert done.returncode == 0, done.stderr
    assert "WARNING: --dns-server any: UDP to port 53 of ANY host leaves around Proctor" in done.stderr
    topo.run_as(PROXY_UID, LISTENER, str(PROXY_PORT))
    upstream = topo.run_as(0, SERVERS, "UPSTREAM", "53", f"{UP4_OTHER}:53,{UP4}:{UDP_PORT}", netns=topo.upstream)
    lines = _collect(upstream)
    # TCP to port 53 is still redirected like any TCP (IPv4 and IPv6)
    assert topo.client(AGENT_UID, "tcp", UP4_OTHER, 53) == f"PROXY {UP4_OTHER} 53 uid={PROXY_UID}"
    assert topo.client(AGENT_UID, "tcp", UP6, 53) == f"PROXY {UP6} 53 uid={PROXY_UID}"
    topo.client(AGENT_UID, "udp", UP4, UDP_PORT, "agent-quic")
    assert topo.client(AGENT_UID, "udp", UP4_OTHER, 53, "agent-dns") == "SENT"
    assert lines.get(timeout=5).endswith("agent-dns")
    time.sleep(0.3)
    assert lines.empty()


@needs_netns
def test_no_resolver_to_pin_refuses_to_apply(topo: Topology):
    (Path("/etc/netns") / topo.agent / "resolv.conf").write_text("search example\n")
    done = cli("--proxy-uid", str(PROXY_UID), "--netns", topo.agent, "--apply")
    assert done.returncode == 2 and "names no nameserver" in done.stderr and "--dns-server any" in done.stderr
    assert "PROCTOR" not in ruleset(topo.agent, "iptables")


@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_the_rules_the_agent_goes_straight_out(topo: Topology, backend: str):
    """The control for the tests above: the same client, no rules, reaches the upstream."""
    topo.run_as(PROXY_UID, LISTENER, str(PROXY_PORT))
    topo.run_as(0, SERVERS, "UPSTREAM", str(TCP_PORT), "", netns=topo.upstream)
    assert topo.client(AGENT_UID, "tcp", UP4, TCP_PORT) == "UPSTREAM"
    applied(topo, backend)
    assert topo.client(AGENT_UID, "tcp", UP4, TCP_PORT).startswith("PROXY ")
    assert cli("--backend", backend, "--netns", topo.agent, "--remove").returncode == 0
    assert topo.client(AGENT_UID, "tcp", UP4, TCP_PORT) == "UPSTREAM"


@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_agent_cannot_reach_proctors_other_listeners_inside_the_pod(topo: Topology, backend: str):
    """Loopback is not redirected, so without a rule the agent could talk to Proctor's forward proxy,
    control API or gateway directly (the reload endpoint trusts loopback). By default those ports
    (8080, 8081, 8082) are refused to every uid but Proctor's, on loopback and the pod's own address;
    other local services stay reachable, and `--protect-port none` drops the rule. The control port
    (8081, --status-port) is the status address: the agent's connections to it land on the
    transparent listener (which answers only approval status requests there), never on the control API."""
    applied(topo, backend)
    topo.run_as(PROXY_UID, LISTENER, str(PROXY_PORT))
    topo.run_as(0, SERVERS, "PROCTOR-LISTENER", "8080,8081,8082", "", netns=topo.agent)
    topo.run_as(0, SERVERS, "LOCAL", str(LOCAL_PORT), "", netns=topo.agent)
    for host in ("127.0.0.1", AGENT4, "::1"):
        for port in (8080, 8082):
            assert topo.client(AGENT_UID, "tcp", host, port).startswith("ERR ConnectionRefusedError"), (host, port)
        assert topo.client(AGENT_UID, "tcp", host, 8081) == f"PROXY {host} 8081 uid={PROXY_UID}", host
        for port in (8080, 8081, 8082):
            assert topo.client(PROXY_UID, "tcp", host, port) == "PROCTOR-LISTENER", (host, port)
        assert topo.client(AGENT_UID, "tcp", host, LOCAL_PORT) == "LOCAL"
    applied(topo, backend, "--protect-port", "none", "--status-port", "none")
    assert topo.client(AGENT_UID, "tcp", "127.0.0.1", 8081) == "PROCTOR-LISTENER"
    applied(topo, backend, "--status-port", "none")  # the control port refused like the others
    assert topo.client(AGENT_UID, "tcp", "127.0.0.1", 8081).startswith("ERR ConnectionRefusedError")
