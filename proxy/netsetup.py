"""`proctor netsetup`: the packet-filter rules that send an agent's traffic through Proctor's
transparent listener whether or not the agent honours proxy variables (docs/deployment.md,
"netsetup reference"; the listener itself: docs/transparent.md).

The rules, per address family (IPv4 with iptables, IPv6 with ip6tables, or both in one
nftables `inet` table), the way service-mesh init containers build theirs:

* nat OUTPUT: every new TCP connection from any uid but Proctor's (and the excluded uids)
  is REDIRECTed to Proctor's transparent port on loopback, where Proctor recovers the
  original destination (SO_ORIGINAL_DST). Not redirected: destinations delivered inside
  the pod or namespace (out the loopback interface), DNS over TCP to the pinned
  resolvers (`--dns-server`, by default the nameservers of the namespace's resolv.conf;
  with the `--dns-server any` opt-out TCP to the DNS port is redirected like any TCP, or any
  service listening on port 53 of any host would be reachable around Proctor), and the
  excluded ports and CIDRs (exclusions are holes). One local destination is redirected:
  the status address, the control API's port (`--status-port`, default 8081) on a local
  address, so the status URL of a held request is one the agent can GET: the transparent
  listener answers exactly `GET /v1/approvals/{id}/status` there, for the workload
  identity's own approvals, and refuses anything else (docs/transparent.md).
* filter OUTPUT: for the same uids, nothing else leaves: a TCP connection that was not
  redirected (and is not local, DNS to a pinned resolver or excluded), and every UDP
  datagram but DNS to the pinned resolvers (to any host only with `--dns-server any`), are
  dropped (so HTTP/3 and QUIC fall back to TCP, which is redirected). ICMP is allowed
  (errors, path MTU discovery, IPv6 neighbour discovery; a ping's payload is a small
  channel out). Answers on connections that came *into* the pod pass (probes, a port the
  agent serves).
* Proctor's own uid is untouched, so it reaches the upstreams, its store and the IdP.

Rules are matched by socket owner. Kernel-generated packets have no owner: they are
treated like the agent's, so every exemption is a positive match (`--uid-owner UID` /
`meta skuid UID`), never a negated one.

Applying is atomic and idempotent: iptables-restore --noflush into Proctor's own chains
(PROCTOR_OUTPUT in the nat and filter tables; the jumps from OUTPUT replaced in the same
transaction), or one nftables table (`inet proctor`) replaced in one `nft -f`
transaction. Removing deletes exactly those.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Backend = Literal["iptables", "nftables"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CHAIN = "PROCTOR_OUTPUT"
NFT_TABLE = "proctor"
DEFAULT_PROXY_PORT = 15001
DEFAULT_DNS_PORT = 53
# Proctor's own listeners the agent must not reach inside the pod: forward proxy, control API and
# gateway at their defaults (loopback is not redirected, so without this the agent could use them).
DEFAULT_PROTECTED_PORTS = (8080, 8081, 8082)
# The control API's default port: the agent's connections to it on a local address are redirected to
# the transparent listener, which answers approval status requests there (the status address).
DEFAULT_STATUS_PORT = 8081
STATUS_COMMENT = "approval status, answered by the transparent listener"
# The highest uid Linux hands out: (uid_t)-1 means "no uid".
MAX_UID = 2**32 - 2
NETNS_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")
NETNS_DIR = Path("/run/netns")
RESOLV_CONF = Path("/etc/resolv.conf")
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NAME` bind-mounts NETNS_ETC/NAME/* over /etc/*
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


class InputError(ValueError):
    """An invalid option value (exit status 2)."""


class SetupError(RuntimeError):
    """The rules cannot be applied or removed here (exit status 1)."""


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """What to redirect and what to let through, validated."""

    proxy_uid: int
    proxy_port: int = DEFAULT_PROXY_PORT
    exclude_uids: tuple[int, ...] = ()
    exclude_ports: tuple[int, ...] = ()
    exclude_cidrs: tuple[Network, ...] = ()
    dns_port: int = DEFAULT_DNS_PORT
    # None: DNS to any server (--dns-server any, a hole); else only to these.
    dns_servers: tuple[Network, ...] | None = None
    ipv6: bool = True
    # Local TCP ports the redirected uids may not connect to (Proctor's other listeners).
    protect_ports: tuple[int, ...] = DEFAULT_PROTECTED_PORTS
    # The local TCP port redirected to the transparent port (the status address); None: none.
    status_port: int | None = DEFAULT_STATUS_PORT
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def exempt_uids(self) -> tuple[int, ...]:
        return (self.proxy_uid, *self.exclude_uids)

    def cidrs(self, family: int) -> list[Network]:
        return [n for n in self.exclude_cidrs if n.version == family]

    def dns(self, family: int) -> list[Network] | None:
        """None: any destination; []: no DNS in this family."""
        if self.dns_servers is None:
            return None
        return [n for n in self.dns_servers if n.version == family]

    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)


def _uid(value: str | int, what: str) -> int:
    try:
        uid = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what}: {value!r} is not a uid (a number 1..{MAX_UID})") from None
    if uid == 0:
        raise InputError(f"{what}: uid 0 would exempt every process running as root; run Proctor as a dedicated uid")
    if not 1 <= uid <= MAX_UID:
        raise InputError(f"{what}: uid {uid} is out of range 1..{MAX_UID}")
    return uid


def _port(value: str | int, what: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{what}: {value!r} is not a port number (1..65535)") from None
    if not 1 <= port <= 65535:
        raise InputError(f"{what}: port {port} is out of range 1..65535")
    return port


def _network(value: str, what: str) -> Network:
    text = value.strip()
    if "%" in text:  # a scoped IPv6 address (fe80::1%eth0): the scope is not part of a rule
        text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise InputError(f"{what}: {value!r} is not an IP address or CIDR ({e})") from None
        raise InputError(f"{what}: {value!r} has host bits set; did you mean {loose}?") from None


def resolv_conf_servers(path: Path = RESOLV_CONF) -> list[str]:
    """The `nameserver` addresses of a resolv.conf."""
    fix = ("name the resolvers with --dns-server IP (repeatable), or --dns-server any to let UDP to the DNS "
           "port of every host out (a hole)")
    try:
        text = path.read_text()
    except OSError as e:
        raise InputError(f"--dns-server auto (the default): cannot read {path}: {e.strerror}; {fix}") from None
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            out.append(words[1])
    if not out:
        raise InputError(f"--dns-server auto (the default): {path} names no nameserver; {fix}")
    return out


def resolv_conf_for(netns: str | None) -> Path:
    """The resolv.conf processes in the namespace see (`ip netns exec` bind-mounts /etc/netns/NAME/)."""
    if netns:
        own = NETNS_ETC / netns / "resolv.conf"
        if own.exists():
            return own
    return RESOLV_CONF


def build_plan(
    *,
    proxy_uid: str | int | None,
    proxy_port: str | int = DEFAULT_PROXY_PORT,
    exclude_uids: Iterable[str | int] = (),
    exclude_ports: Iterable[str | int] = (),
    exclude_cidrs: Iterable[str] = (),
    dns_port: str | int = DEFAULT_DNS_PORT,
    dns_servers: Iterable[str] = (),
    ipv6: bool = True,
    resolv_conf: Path = RESOLV_CONF,
    protect_ports: Iterable[str | int] | None = None,
    status_port: str | int | None = DEFAULT_STATUS_PORT,
) -> Plan:
    """Validate every option; InputError names the first bad one."""
    if proxy_uid is None:
        raise InputError("--proxy-uid is required: the uid Proctor runs as (its traffic is the only traffic not redirected)")
    uid = _uid(proxy_uid, "--proxy-uid")
    port = _port(proxy_port, "--proxy-port")
    warnings: list[str] = []
    uids: list[int] = []
    for u in exclude_uids:
        x = _uid(u, "--exclude-uid")
        if x != uid and x not in uids:
            uids.append(x)
    ports: list[int] = []
    for p in exclude_ports:
        x = _port(p, "--exclude-port")
        if x not in ports:
            ports.append(x)
    cidrs: list[Network] = []
    for c in exclude_cidrs:
        n = _network(c, "--exclude-cidr")
        if n.prefixlen == 0:
            raise InputError(f"--exclude-cidr: {c!r} excludes every destination: nothing would be governed")
        if n not in cidrs:
            cidrs.append(n)
    if not ipv6 and any(n.version == 6 for n in cidrs):
        raise InputError("--exclude-cidr: an IPv6 CIDR with --no-ipv6 (no IPv6 rules are written)")
    dport = _port(dns_port, "--dns-port")
    protected: list[int] = []
    for p in DEFAULT_PROTECTED_PORTS if protect_ports is None else protect_ports:
        if str(p) == "none":
            continue
        x = _port(p, "--protect-port")
        if x == port:
            raise InputError(f"--protect-port: {x} is the transparent port (--proxy-port): redirected traffic must reach it")
        if x not in protected:
            protected.append(x)
    status: int | None = None
    if status_port is not None and str(status_port) != "none":
        status = _port(status_port, "--status-port")
        if status == port:
            raise InputError(f"--status-port: {status} is the transparent port (--proxy-port); the status address "
                             "is Proctor's control API port")
    servers: list[Network] | None = None
    # Pinned resolvers by default (auto: the namespace's resolv.conf): "UDP to port 53 of any host"
    # is a tunnel to a server the agent chooses. `any` is the explicit, warned opt-out.
    names = [str(s).strip() for s in dns_servers] or ["auto"]
    if "any" in names:
        if len(names) > 1:
            raise InputError("--dns-server any (DNS to every host) cannot be combined with resolvers: choose one")
    else:
        servers = []
        for s in names:
            for one in resolv_conf_servers(resolv_conf) if s == "auto" else [s]:
                n = _network(one, "--dns-server")
                if n.prefixlen == 0:
                    raise InputError(f"--dns-server: {one!r} is every host, not a resolver: DNS (and whatever "
                                     "else listens on the DNS port) would go anywhere around Proctor; "
                                     "--dns-server any says so explicitly")
                if s == "auto" and n.num_addresses != 1:
                    raise InputError(f"--dns-server auto: {one!r} in {resolv_conf} is not one address")
                if n not in servers:
                    servers.append(n)
    loopback = [n for n in servers or () if n.is_loopback]
    if loopback:
        warnings.append(
            f"resolver {', '.join(str(n.network_address) for n in loopback)} is on loopback: a local stub "
            "(systemd-resolved's 127.0.0.53, Docker's 127.0.0.11) forwards every query to its own upstreams, so "
            "names, and whatever the agent encodes in them, still reach any DNS server through it (only a direct "
            "UDP tunnel is stopped); loopback is the namespace's own (with --netns, a resolver must listen there), "
            "and a stub running in this namespace under its own uid is dropped on its way out unless its "
            "upstreams are pinned too"
        )
    for x in uids:
        warnings.append(f"uid {x} is excluded: its traffic bypasses Proctor entirely")
    for x in ports:
        warnings.append(f"TCP to port {x} on any host is not redirected: it bypasses Proctor")
    for n in cidrs:
        warnings.append(f"TCP to {n} is not redirected: it bypasses Proctor")
    if servers is None:
        warnings.append(
            f"--dns-server any: UDP to port {dport} of ANY host leaves around Proctor, and not only DNS: any "
            f"protocol on that port (a tunnel to a server the agent chooses); DNS over TCP is redirected to "
            f"Proctor (refused); drop --dns-server any to pin the namespace's resolvers (auto, the default)"
        )
    if not ipv6:
        warnings.append("--no-ipv6: no IPv6 rules; if this namespace has IPv6 connectivity, IPv6 bypasses Proctor")
    return Plan(
        proxy_uid=uid, proxy_port=port, exclude_uids=tuple(uids), exclude_ports=tuple(ports),
        exclude_cidrs=tuple(cidrs), dns_port=dport, dns_servers=None if servers is None else tuple(servers),
        ipv6=ipv6, protect_ports=tuple(protected), status_port=status, warnings=tuple(warnings),
    )


def check_netns_name(name: str) -> str:
    if not NETNS_NAME.fullmatch(name) or name in (".", ".."):
        raise InputError(f"--netns: {name!r} is not a network namespace name (letters, digits, _ . -; at most 63)")
    return name


# ------------------------------------------------------------------ iptables rendering
def _cmt(text: str) -> str:
    return f'-m comment --comment "proctor: {text}"'


def _iptables_chain_rules(plan: Plan, family: int, table: str) -> list[str]:
    """The rules of PROCTOR_OUTPUT in one table (nat or filter) of one family."""
    c = CHAIN
    rules: list[str] = []
    for uid in plan.exempt_uids():
        what = "Proctor itself" if uid == plan.proxy_uid else "EXCLUDED uid (a hole)"
        rules.append(f"-A {c} -m owner --uid-owner {uid} {_cmt(what)} -j RETURN")
    dns = plan.dns(family)
    dns_dests = [""] if dns is None else [f"-d {n} " for n in dns]
    # DNS over TCP only to pinned resolvers: "TCP to port 53 of any host" is a way around Proctor
    tcp_dns_dests = [] if dns is None else dns_dests
    if table == "nat":
        if plan.status_port is not None:  # (before the local RETURN: this local port is Proctor's)
            rules.append(f"-A {c} -o lo -p tcp --dport {plan.status_port} {_cmt(STATUS_COMMENT)} "
                         f"-j REDIRECT --to-ports {plan.proxy_port}")
        rules.append(f"-A {c} -o lo {_cmt('local destinations, not governed')} -j RETURN")
        for d in tcp_dns_dests:
            rules.append(f"-A {c} {d}-p tcp --dport {plan.dns_port} {_cmt('DNS over TCP')} -j RETURN")
        for n in plan.cidrs(family):
            rules.append(f"-A {c} -d {n} -p tcp {_cmt('EXCLUDED destination (a hole)')} -j RETURN")
        for p in plan.exclude_ports:
            rules.append(f"-A {c} -p tcp --dport {p} {_cmt('EXCLUDED port (a hole)')} -j RETURN")
        rules.append(f"-A {c} -p tcp {_cmt('to the transparent listener')} -j REDIRECT --to-ports {plan.proxy_port}")
        return rules
    icmp = "icmp" if family == 4 else "ipv6-icmp"
    rules.append(f"-A {c} -m conntrack --ctdir REPLY {_cmt('answers on inbound connections')} -j RETURN")
    if plan.protect_ports:
        ports = ",".join(map(str, plan.protect_ports))
        rules.append(f"-A {c} -o lo -p tcp -m multiport --dports {ports} {_cmt('Proctor listeners, not for the agent')} "
                     "-j REJECT --reject-with tcp-reset")
    rules += [
        f"-A {c} -o lo {_cmt('local destinations, not governed')} -j RETURN",
        f"-A {c} -p tcp -m conntrack --ctstate DNAT {_cmt('redirected to Proctor')} -j RETURN",
    ]
    for d in dns_dests:
        for proto in ("udp", "tcp") if d in tcp_dns_dests else ("udp",):
            rules.append(f"-A {c} {d}-p {proto} --dport {plan.dns_port} {_cmt('DNS')} -j RETURN")
    for n in plan.cidrs(family):
        rules.append(f"-A {c} -d {n} -p tcp {_cmt('EXCLUDED destination (a hole)')} -j RETURN")
    for p in plan.exclude_ports:
        rules.append(f"-A {c} -p tcp --dport {p} {_cmt('EXCLUDED port (a hole)')} -j RETURN")
    rules += [
        f"-A {c} -p {icmp} {_cmt('ICMP')} -j RETURN",
        f"-A {c} {_cmt('nothing else leaves around Proctor')} -j DROP",
    ]
    return rules


def iptables_restore_input(plan: Plan, family: int, *, jumps: dict[str, list[str]] | None = None) -> str:
    """iptables-restore --noflush input for one family: both chains declared (which creates or
    flushes them) and refilled. With `jumps` (the OUTPUT rules that jump to the chain now, per
    table, as iptables-save prints them), those are deleted and one jump inserted first in
    OUTPUT, in the same transaction; without, the jumps are left to the caller."""
    out: list[str] = []
    for table in ("nat", "filter"):
        out.append(f"*{table}")
        out.append(f":{CHAIN} - [0:0]")
        out += _iptables_chain_rules(plan, family, table)
        if jumps is not None:
            out += [_as_delete(rule) for rule in jumps.get(table, [])]
            out.append(f"-I OUTPUT 1 -j {CHAIN}")
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def _as_delete(saved_rule: str) -> str:
    assert saved_rule.startswith("-A ")
    return "-D " + saved_rule[3:]


def jump_rules(saved: str) -> dict[str, list[str]]:
    """The OUTPUT rules jumping to PROCTOR_OUTPUT, per table, in iptables-save output."""
    out: dict[str, list[str]] = {}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A OUTPUT ") and re.search(rf"(^|\s)-[jg] {CHAIN}(\s|$)", line):
            out.setdefault(table, []).append(line)
    return out


def chains_present(saved: str) -> dict[str, bool]:
    out: dict[str, bool] = {}
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(f":{CHAIN} "):
            out[table] = True
    return out


def iptables_remove_input(saved: str) -> str | None:
    """iptables-restore --noflush input deleting the jumps and chains that exist (None: nothing)."""
    jumps = jump_rules(saved)
    present = chains_present(saved)
    out: list[str] = []
    for table in ("nat", "filter"):
        if not present.get(table) and not jumps.get(table):
            continue
        out.append(f"*{table}")
        out += [_as_delete(rule) for rule in jumps.get(table, [])]
        if present.get(table):
            out += [f"-F {CHAIN}", f"-X {CHAIN}"]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else None


# ------------------------------------------------------------------ nftables rendering
def _nft_set(items: Sequence[object]) -> str:
    return str(items[0]) if len(items) == 1 else "{ " + ", ".join(str(i) for i in items) + " }"


def _nft_family(n: Network) -> str:
    return "ip" if n.version == 4 else "ip6"


def nft_ruleset(plan: Plan) -> str:
    """An `nft -f` file: Proctor's table replaced in one transaction (created if missing)."""
    fam = "inet" if plan.ipv6 else "ip"
    t = "\t"
    nat: list[str] = []
    flt: list[str] = []
    for uid in plan.exempt_uids():
        what = "Proctor itself" if uid == plan.proxy_uid else "EXCLUDED uid (a hole)"
        nat.append(f'meta skuid {uid} return comment "{what}"')
        flt.append(f'meta skuid {uid} return comment "{what}"')
    flt.append('ct direction reply return comment "answers on inbound connections"')
    if plan.protect_ports:
        flt.append(f'oifname "lo" tcp dport {_nft_set(plan.protect_ports)} reject with tcp reset '
                   'comment "Proctor listeners, not for the agent"')
    if plan.status_port is not None:
        nat.append(f'oifname "lo" tcp dport {plan.status_port} redirect to :{plan.proxy_port} '
                   f'comment "{STATUS_COMMENT}"')
    nat.append('oifname "lo" return comment "local destinations, not governed"')
    flt.append('oifname "lo" return comment "local destinations, not governed"')
    flt.append('meta l4proto tcp ct status dnat return comment "redirected to Proctor"')
    dns: list[str] = []
    if plan.dns_servers is None:
        dns = [""]
    else:
        for f in plan.families():
            nets = plan.dns(f) or []
            if nets:
                dns.append(f"{'ip' if f == 4 else 'ip6'} daddr {_nft_set(nets)} ")
    for d in dns:
        if plan.dns_servers is None:  # DNS over TCP only to pinned resolvers (see _iptables_chain_rules)
            flt.append(f'udp dport {plan.dns_port} return comment "DNS"')
            continue
        nat.append(f'{d}tcp dport {plan.dns_port} return comment "DNS over TCP"')
        flt.append(f'{d}meta l4proto {{ tcp, udp }} th dport {plan.dns_port} return comment "DNS"')
    for f in plan.families():
        nets = plan.cidrs(f)
        if nets:
            rule = f"{_nft_family(nets[0])} daddr {_nft_set(nets)} meta l4proto tcp return comment \"EXCLUDED destination (a hole)\""
            nat.append(rule)
            flt.append(rule)
    if plan.exclude_ports:
        rule = f'tcp dport {_nft_set(plan.exclude_ports)} return comment "EXCLUDED port (a hole)"'
        nat.append(rule)
        flt.append(rule)
    nat.append(f'meta l4proto tcp redirect to :{plan.proxy_port} comment "to the transparent listener"')
    icmp = "{ icmp, ipv6-icmp }" if plan.ipv6 else "icmp"
    flt.append(f'meta l4proto {icmp} return comment "ICMP"')
    flt.append('counter drop comment "nothing else leaves around Proctor"')
    lines = [
        # Create-then-delete makes the replacement work whether or not the table exists; a table
        # of the other family (an earlier --no-ipv6 or --ipv6 run) goes too. One transaction.
        f"table {'ip' if fam == 'inet' else 'inet'} {NFT_TABLE}",
        f"delete table {'ip' if fam == 'inet' else 'inet'} {NFT_TABLE}",
        f"table {fam} {NFT_TABLE}",
        f"delete table {fam} {NFT_TABLE}",
        f"table {fam} {NFT_TABLE} {{",
        f"{t}chain output_nat {{",
        f"{t}{t}type nat hook output priority -100; policy accept;",
        *(f"{t}{t}{r}" for r in nat),
        f"{t}}}",
        f"{t}chain output_filter {{",
        f"{t}{t}type filter hook output priority 0; policy accept;",
        *(f"{t}{t}{r}" for r in flt),
        f"{t}}}",
        "}",
    ]
    return "\n".join(lines) + "\n"


NFT_REMOVE = "".join(f"table {f} {NFT_TABLE}\ndelete table {f} {NFT_TABLE}\n" for f in ("inet", "ip"))


# --------------------------------------------------------------------- the printed script
def _describe(plan: Plan) -> list[str]:
    fams = "IPv4 and IPv6" if plan.ipv6 else "IPv4 only"
    out = [
        f"Every new TCP connection from any uid but {plan.proxy_uid} (Proctor) is redirected to",
        f"Proctor's transparent listener on port {plan.proxy_port} ({fams}). For those uids nothing",
        f"else leaves: UDP only as DNS (port {plan.dns_port}"
        + ("" if plan.dns_servers is None else " to " + ", ".join(map(str, plan.dns_servers)))
        + "), so HTTP/3 falls back to TCP; ICMP is allowed.",
        "Not redirected: destinations inside this namespace (loopback, the pod's own",
        "addresses): local services are not governed. Answers on inbound connections pass.",
        ("Refused locally: Proctor's own listeners on TCP " + ", ".join(map(str, plan.protect_ports))
         + " (forward proxy, control API, gateway): the agent's way in is the redirect"
         + (" (but see the status port below)." if plan.status_port in plan.protect_ports else "."))
        if plan.protect_ports else
        "WARNING: Proctor's own listeners are reachable from the agent (--protect-port none).",
        *([f"Redirected locally: TCP {plan.status_port} (the control API's port) on a local address goes to",
           "the transparent listener, which answers only GET /v1/approvals/{id}/status there",
           "(the status URL of the agent's held requests; --status-port)."]
          if plan.status_port is not None else
          ["No status address (--status-port none): the agent cannot read a held request's status URL."]),
        f"DNS over TCP (port {plan.dns_port}) passes only to pinned resolvers (--dns-server);"
        if plan.dns_servers is not None else
        f"DNS over TCP (port {plan.dns_port}) is redirected like any TCP: no resolver is pinned (--dns-server any).",
        "The agent must not run as Proctor's uid nor hold NET_ADMIN/NET_RAW (it could undo this).",
    ]
    if plan.warnings:
        out += ["", "WARNING: every exclusion is a hole around Proctor:"]
        out += [f"  - {w}" for w in plan.warnings]
    return out


def _invocation(plan: Plan, backend: Backend) -> str:
    argv = ["proctor", "netsetup", "--backend", backend, "--proxy-uid", str(plan.proxy_uid),
            "--proxy-port", str(plan.proxy_port)]
    for u in plan.exclude_uids:
        argv += ["--exclude-uid", str(u)]
    for p in plan.exclude_ports:
        argv += ["--exclude-port", str(p)]
    for n in plan.exclude_cidrs:
        argv += ["--exclude-cidr", str(n)]
    if plan.dns_port != DEFAULT_DNS_PORT:
        argv += ["--dns-port", str(plan.dns_port)]
    for server in [str(n) for n in plan.dns_servers] if plan.dns_servers is not None else ["any"]:
        argv += ["--dns-server", server]
    if not plan.ipv6:
        argv.append("--no-ipv6")
    if plan.protect_ports != DEFAULT_PROTECTED_PORTS:
        for port in [str(p) for p in plan.protect_ports] or ["none"]:
            argv += ["--protect-port", port]
    if plan.status_port != DEFAULT_STATUS_PORT:
        argv += ["--status-port", "none" if plan.status_port is None else str(plan.status_port)]
    return shlex.join(argv)


def render(plan: Plan, backend: Backend, netns: str | None = None) -> str:
    """The reviewable form: a POSIX sh script around the iptables-restore inputs, or an nft -f file."""
    where = f"ip netns exec {netns} " if netns else ""
    head = [f"Generated by: {_invocation(plan, backend)}", "", *_describe(plan), ""]
    if backend == "nftables":
        head += [
            "Apply (as root in the agent's network namespace; atomic, and running it again",
            f"replaces the table): {where}nft -f THIS_FILE, or `proctor netsetup --apply`.",
            f"Remove: {where}nft delete table {'inet' if plan.ipv6 else 'ip'} {NFT_TABLE}, or `proctor netsetup --remove`.",
        ]
        return "#!/usr/sbin/nft -f\n" + "".join(f"# {h}".rstrip() + "\n" for h in head) + "\n" + nft_ruleset(plan)
    head += [
        "Apply (as root in the agent's network namespace; safe to run again):",
        f"  {where}sh THIS_FILE      or `proctor netsetup --apply` (one atomic transaction per family)",
        "Remove: `proctor netsetup --remove`.",
    ]
    out = ["#!/bin/sh", *(f"# {h}".rstrip() for h in head), "set -eu", ""]
    for family in plan.families():
        cmd = "iptables" if family == 4 else "ip6tables"
        tag = f"PROCTOR_IPV{family}"
        out.append(f"# IPv{family}: Proctor's chains (declaring a chain creates or flushes it)")
        out.append(f"{cmd}-restore --wait --noflush <<'{tag}'")
        out.append(iptables_restore_input(plan, family).rstrip("\n"))
        out.append(tag)
        out.append("# one jump from OUTPUT into each, first (left as it is when present)")
        for table in ("nat", "filter"):
            out.append(f"{cmd} -w -t {table} -C OUTPUT -j {CHAIN} 2>/dev/null || {cmd} -w -t {table} -I OUTPUT 1 -j {CHAIN}")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------- applying and removing
def effective_capabilities(status: Path = Path("/proc/self/status")) -> int | None:
    try:
        for line in status.read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _binaries(backend: Backend, ipv6: bool) -> list[str]:
    if backend == "nftables":
        return ["nft"]
    return ["iptables-save", "iptables-restore", *(["ip6tables-save", "ip6tables-restore"] if ipv6 else [])]


def preflight(backend: Backend, netns: str | None, ipv6: bool, *, caps: int | None = None) -> None:
    """Refuse early, with the fix, what would fail half-way: missing binaries, privileges, namespace."""
    package = "nftables" if backend == "nftables" else "iptables"
    for b in _binaries(backend, ipv6) + (["ip"] if netns else []):
        if shutil.which(b) is None:
            pkg = "iproute2" if b == "ip" else package
            raise SetupError(f"{b} not found on PATH: install {pkg} (apt-get install {pkg}) or use --backend "
                             + ("iptables" if backend == "nftables" else "nftables"))
    caps = effective_capabilities() if caps is None else caps
    if caps is not None and not caps >> CAP_NET_ADMIN & 1:
        raise SetupError(
            "changing the packet filter needs CAP_NET_ADMIN: run as root, or in a Kubernetes init "
            "container with capabilities add: [NET_ADMIN, NET_RAW]"
        )
    if netns:
        if caps is not None and not caps >> CAP_SYS_ADMIN & 1:
            raise SetupError("--netns needs CAP_SYS_ADMIN to enter the namespace (run as root)")
        if not (NETNS_DIR / netns).exists():
            raise SetupError(f"no network namespace {netns!r} (see `ip netns list`)")


class Runner:
    """Runs the backend's commands, in a named network namespace or the current one."""

    def __init__(self, netns: str | None = None, timeout: float = 30.0):
        self.netns = netns
        self.timeout = timeout

    def run(self, argv: list[str], stdin: str | None = None) -> str:
        full = (["ip", "netns", "exec", self.netns] if self.netns else []) + argv
        try:
            done = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=self.timeout)
        except FileNotFoundError:
            raise SetupError(f"{full[0]} not found on PATH") from None
        except subprocess.TimeoutExpired:
            raise SetupError(f"{shlex.join(full)} did not finish within {self.timeout:.0f}s") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()
            hint = ""
            if re.search(r"permission denied|operation not permitted|you must be root", detail, re.I):
                hint = " (needs CAP_NET_ADMIN, and CAP_NET_RAW for iptables-legacy: run as root or add them to the init container)"
            elif re.search(r"(table|chain).*does not exist|protocol not supported|address family not supported", detail, re.I):
                hint = " (is the kernel's netfilter/IPv6 support available here? --no-ipv6 skips IPv6)"
            raise SetupError(f"{shlex.join(full)} failed (exit {done.returncode}): {detail}{hint}")
        return done.stdout


def _tools(family: int) -> tuple[str, str]:
    return ("iptables-save", "iptables-restore") if family == 4 else ("ip6tables-save", "ip6tables-restore")


def _save(runner: Runner, family: int) -> str:
    save, _ = _tools(family)
    return "".join(runner.run([save, "-t", t]) for t in ("nat", "filter"))


def kernel_has_ipv6(marker: Path = Path("/proc/net/if_inet6")) -> bool:
    """False only when the kernel has no IPv6 at all (booted with ipv6.disable=1): then no IPv6
    packet can leave and ip6tables cannot load, so there is nothing to redirect."""
    return marker.exists()


def apply(plan: Plan, backend: Backend, runner: Runner, *, has_ipv6: bool | None = None) -> str:
    """Apply the rules (idempotent), check they landed; a one-line summary."""
    if backend == "nftables":
        runner.run(["nft", "-f", "-"], stdin=nft_ruleset(plan))
        listed = runner.run(["nft", "list", "table", "inet" if plan.ipv6 else "ip", NFT_TABLE])
        if f"redirect to :{plan.proxy_port}" not in listed:
            raise SetupError(f"the table was applied but does not read back:\n{listed}")
        return f"applied: nftables table {'inet' if plan.ipv6 else 'ip'} {NFT_TABLE}"
    has_ipv6 = kernel_has_ipv6() if has_ipv6 is None else has_ipv6
    families = [f for f in plan.families() if f == 4 or has_ipv6]
    for family in families:
        _, restore = _tools(family)
        for attempt in range(2):
            jumps = jump_rules(_save(runner, family))
            try:
                runner.run([restore, "--wait", "--noflush"], stdin=iptables_restore_input(plan, family, jumps=jumps))
                break
            except SetupError:
                if attempt:  # a concurrent change between the save and the restore: once more
                    raise
        after = _save(runner, family)
        counts = {t: len(v) for t, v in jump_rules(after).items()}
        if counts != {"nat": 1, "filter": 1} or f"--to-ports {plan.proxy_port}" not in after:
            raise SetupError(f"IPv{family}: the rules were applied but do not read back as expected:\n{after}")
    fams = "IPv4+IPv6" if 6 in families else "IPv4"
    note = "" if families == list(plan.families()) else " (this kernel has no IPv6: no IPv6 rules needed)"
    return f"applied: iptables {CHAIN} in nat and filter ({fams}){note}"


def remove(backend: Backend, runner: Runner, ipv6: bool = True, *, has_ipv6: bool | None = None) -> str:
    """Delete what apply added (nothing else); a one-line summary."""
    if backend == "nftables":
        runner.run(["nft", "-f", "-"], stdin=NFT_REMOVE)
        return f"removed: nftables tables inet/ip {NFT_TABLE}"
    removed = []
    has_ipv6 = kernel_has_ipv6() if has_ipv6 is None else has_ipv6
    for family in (4, 6) if ipv6 and has_ipv6 else (4,):
        _, restore = _tools(family)
        text = iptables_remove_input(_save(runner, family))
        if text is not None:
            runner.run([restore, "--wait", "--noflush"], stdin=text)
            removed.append(f"IPv{family}")
    return f"removed: iptables {CHAIN} ({', '.join(removed)})" if removed else "nothing to remove"

