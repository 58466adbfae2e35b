"""`proctor netsetup`: the rendered rules (both backends), input validation and the CLI's
errors, without touching any packet filter (the real thing: tests/test_netsetup_netns.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT
from proxy import netsetup as ns
from proxy.cli import main


# What a pod's resolv.conf names (the default --dns-server auto reads it): the tests do not depend
# on the machine's own /etc/resolv.conf.
POD_RESOLV = Path(tempfile.mkdtemp(prefix="proctor-resolv-")) / "resolv.conf"
POD_RESOLV.write_text("search svc.cluster.local\nnameserver 10.96.0.10\n")


def plan(**kw: object) -> ns.Plan:
    return ns.build_plan(**{"proxy_uid": 1337, "resolv_conf": POD_RESOLV, **kw})  # type: ignore[arg-type]


def restore_rules(text: str, table: str) -> list[str]:
    """The -A lines of one table in iptables-restore input."""
    out, current = [], ""
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current == table and line.startswith("-A "):
            out.append(line)
    return out


# ----------------------------------------------------------------- iptables rendering
def test_iptables_defaults_redirect_every_tcp_but_proctors():
    p = plan()
    v4 = ns.iptables_restore_input(p, 4)
    nat = restore_rules(v4, "nat")
    # the exemption is a positive owner match, first (socketless kernel packets never match it)
    assert nat[0].startswith("-A PROCTOR_OUTPUT -m owner --uid-owner 1337 ") and nat[0].endswith("-j RETURN")
    assert not any("! --uid-owner" in r for r in nat)
    assert any(r.startswith("-A PROCTOR_OUTPUT -o lo ") and r.endswith("-j RETURN") for r in nat)
    assert nat[-1].startswith("-A PROCTOR_OUTPUT -p tcp ") and nat[-1].endswith("-j REDIRECT --to-ports 15001")
    # by default DNS is pinned to the namespace's resolvers (resolv.conf): DNS over TCP and UDP to
    # them only (UDP or TCP to port 53 of any host would reach any service listening there)
    # (and the status address, the control port on a local address, goes to the transparent port)
    assert [r.split(" -m comment")[0] for r in nat if "--dport" in r] == [
        "-A PROCTOR_OUTPUT -o lo -p tcp --dport 8081", "-A PROCTOR_OUTPUT -d 10.96.0.10/32 -p tcp --dport 53"]
    flt = restore_rules(v4, "filter")
    assert [r.split(" -m comment")[0] for r in flt if "--dport 53" in r] == [
        "-A PROCTOR_OUTPUT -d 10.96.0.10/32 -p udp --dport 53", "-A PROCTOR_OUTPUT -d 10.96.0.10/32 -p tcp --dport 53"]
    assert p.warnings == ()
    assert flt[0].startswith("-A PROCTOR_OUTPUT -m owner --uid-owner 1337 ")
    assert flt[-1].endswith("-j DROP") and "-p" not in flt[-1]
    assert any("-p tcp -m conntrack --ctstate DNAT" in r for r in flt)
    assert any("--ctdir REPLY" in r for r in flt)
    assert any(r.startswith("-A PROCTOR_OUTPUT -p icmp ") for r in flt)
    # both chains declared (created, or flushed when present); without `jumps`, no OUTPUT line
    assert v4.count(":PROCTOR_OUTPUT - [0:0]") == 2 and "OUTPUT 1" not in v4
    assert v4.count("COMMIT") == 2


def test_iptables_ipv6_is_the_same_with_icmpv6():
    p = plan(exclude_cidrs=["10.0.0.0/8", "fd00::/8"])
    v4, v6 = ns.iptables_restore_input(p, 4), ns.iptables_restore_input(p, 6)
    assert "-p ipv6-icmp" in v6 and "-p icmp " not in v6
    assert "fd00::/8" in v6 and "10.0.0.0/8" not in v6
    assert "10.0.0.0/8" in v4 and "fd00::/8" not in v4
    assert restore_rules(v6, "nat")[-1].endswith("-j REDIRECT --to-ports 15001")


def test_iptables_exclusions_are_returns_before_the_redirect_and_the_drop():
    p = plan(exclude_uids=["2000", 1337], exclude_ports=["5432", "5432"], exclude_cidrs=["169.254.169.254/32"],
             dns_servers=["10.96.0.10"], dns_port="5353")
    v4 = ns.iptables_restore_input(p, 4)
    nat, flt = restore_rules(v4, "nat"), restore_rules(v4, "filter")
    for rules in (nat, flt):
        assert sum("--uid-owner" in r for r in rules) == 2  # the proxy uid once, 2000 once
        assert sum("--dport 5432" in r for r in rules) == 1
        assert sum("-d 169.254.169.254/32 -p tcp" in r for r in rules) == 1
    redirect = nat.index(nat[-1])
    assert all(nat.index(r) < redirect for r in nat if "EXCLUDED" in r)
    assert "-d 10.96.0.10/32 -p tcp --dport 5353" in nat[4]  # (after the uids, the status address, lo)
    assert [r.split(" -m comment")[0] for r in flt if "5353" in r] == [
        "-A PROCTOR_OUTPUT -d 10.96.0.10/32 -p udp --dport 5353",
        "-A PROCTOR_OUTPUT -d 10.96.0.10/32 -p tcp --dport 5353",
    ]
    # a pinned IPv4 resolver: no DNS at all over IPv6
    assert "5353" not in ns.iptables_restore_input(p, 6)
    # exclusions are TCP only: UDP still has DNS alone
    assert [r for r in flt if "-p udp" in r and "5353" not in r] == []


def test_iptables_apply_input_replaces_the_jumps_in_the_same_transaction():
    saved = "\n".join([
        "*nat", ":OUTPUT ACCEPT [0:0]", ":PROCTOR_OUTPUT - [0:0]", "-A OUTPUT -j PROCTOR_OUTPUT",
        "-A OUTPUT -p tcp -j PROCTOR_OUTPUT", "-A OUTPUT -j KUBE_SOMETHING", "COMMIT",
        "*filter", ":OUTPUT ACCEPT [0:0]", "-A OUTPUT -p tcp --dport 9 -j ACCEPT", "COMMIT",
    ])
    jumps = ns.jump_rules(saved)
    assert jumps == {"nat": ["-A OUTPUT -j PROCTOR_OUTPUT", "-A OUTPUT -p tcp -j PROCTOR_OUTPUT"]}
    text = ns.iptables_restore_input(plan(), 4, jumps=jumps)
    nat_part = text.split("*filter")[0]
    assert "-D OUTPUT -j PROCTOR_OUTPUT\n-D OUTPUT -p tcp -j PROCTOR_OUTPUT\n-I OUTPUT 1 -j PROCTOR_OUTPUT\nCOMMIT" in nat_part
    filter_part = text.split("*filter")[1]
    assert "-D OUTPUT" not in filter_part and filter_part.count("-I OUTPUT 1 -j PROCTOR_OUTPUT") == 1


def test_iptables_remove_input_deletes_only_proctors():
    saved = "\n".join([
        "*nat", ":OUTPUT ACCEPT [0:0]", ":PROCTOR_OUTPUT - [0:0]", ":OTHER - [0:0]", "-A OUTPUT -j PROCTOR_OUTPUT",
        "-A OUTPUT -j OTHER", "-A PROCTOR_OUTPUT -p tcp -j REDIRECT --to-ports 15001", "COMMIT",
        "*filter", ":OUTPUT ACCEPT [0:0]", "-A OUTPUT -j ACCEPT", "COMMIT",
    ])
    assert ns.iptables_remove_input(saved) == "*nat\n-D OUTPUT -j PROCTOR_OUTPUT\n-F PROCTOR_OUTPUT\n-X PROCTOR_OUTPUT\nCOMMIT\n"
    assert ns.iptables_remove_input("*filter\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n") is None


# ----------------------------------------------------------------- nftables rendering
def test_nft_one_inet_table_replaced_atomically():
    text = ns.nft_ruleset(plan(exclude_ports=[5432, 8125], exclude_cidrs=["10.0.0.0/8", "fd00::/8"]))
    lines = [line.strip() for line in text.splitlines()]
    # create-then-delete both families' tables, then the new one: one transaction, idempotent
    assert lines[:5] == ["table ip proctor", "delete table ip proctor", "table inet proctor",
                         "delete table inet proctor", "table inet proctor {"]
    nat = lines[lines.index("chain output_nat {") + 1: lines.index("chain output_filter {")]
    flt = lines[lines.index("chain output_filter {") + 1:]
    assert nat[0] == "type nat hook output priority -100; policy accept;"
    assert nat[1].startswith("meta skuid 1337 return")
    assert not any("skuid !=" in r for r in nat + flt)
    assert nat[-2].startswith("meta l4proto tcp redirect to :15001")
    assert 'tcp dport { 5432, 8125 } return comment "EXCLUDED port (a hole)"' in nat
    assert any(r.startswith("ip daddr 10.0.0.0/8 meta l4proto tcp return") for r in nat)
    assert any(r.startswith("ip6 daddr fd00::/8 meta l4proto tcp return") for r in nat)
    assert flt[0] == "type filter hook output priority 0; policy accept;"
    assert flt[1].startswith("meta skuid 1337 return")
    assert any(r.startswith("meta l4proto tcp ct status dnat return") for r in flt)
    # DNS pinned by default to the namespace's resolvers, UDP and TCP
    assert [r for r in flt if "dport 53" in r] == [
        'ip daddr 10.96.0.10/32 meta l4proto { tcp, udp } th dport 53 return comment "DNS"']
    assert [r for r in nat if "dport 53" in r] == ['ip daddr 10.96.0.10/32 tcp dport 53 return comment "DNS over TCP"']
    assert any(r.startswith("meta l4proto { icmp, ipv6-icmp } return") for r in flt)
    assert flt[-3].startswith("counter drop")


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_dns_to_any_host_is_an_explicit_warned_opt_out(backend: str):
    """`--dns-server any`: UDP to port 53 of every host (a tunnel to a server the agent picks) only
    when asked for, with a warning; TCP to port 53 is still redirected like any TCP."""
    p = plan(dns_servers=["any"])
    assert p.dns_servers is None
    assert any("--dns-server any: UDP to port 53 of ANY host leaves around Proctor" in w for w in p.warnings)
    text = ns.render(p, backend)  # type: ignore[arg-type]
    assert "--dns-server any" in text.splitlines()[1]  # the Generated-by line reproduces it
    if backend == "iptables":
        v4 = ns.iptables_restore_input(p, 4)
        assert [r.split(" -m comment")[0] for r in restore_rules(v4, "filter") if "--dport 53" in r] == [
            "-A PROCTOR_OUTPUT -p udp --dport 53"]
        assert not any("--dport 53" in r for r in restore_rules(v4, "nat"))
    else:
        lines = [line.strip() for line in ns.nft_ruleset(p).splitlines()]
        assert [r for r in lines if "dport 53" in r] == ['udp dport 53 return comment "DNS"']
    with pytest.raises(ns.InputError, match="cannot be combined"):
        plan(dns_servers=["any", "10.96.0.10"])


def test_a_loopback_resolver_is_pinned_with_a_warning(tmp_path: Path):
    """systemd-resolved's stub (127.0.0.53) or Docker's (127.0.0.11): loopback passes anyway, and the
    stub forwards queries anywhere, so the rules say what pinning it does not stop."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.53\n")
    p = plan(resolv_conf=conf)
    assert [str(n) for n in p.dns_servers or ()] == ["127.0.0.53/32"]
    (w,) = p.warnings
    assert "127.0.0.53 is on loopback" in w and "forwards every query to its own upstreams" in w
    assert "127.0.0.53 is on loopback" in ns.render(p, "iptables")
    assert plan(dns_servers=["10.96.0.10"]).warnings == ()


def test_nft_without_ipv6_uses_the_ip_family():
    text = ns.nft_ruleset(plan(ipv6=False, dns_servers=["10.96.0.10"]))
    assert "table ip proctor {" in text and "table inet proctor {" not in text
    assert "ipv6-icmp" not in text and "ip6 " not in text
    assert "ip daddr 10.96.0.10/32 meta l4proto { tcp, udp } th dport 53 return" in text
    # the other family's table goes in the same transaction
    assert text.startswith("table inet proctor\ndelete table inet proctor\n")


def test_nft_remove_deletes_both_of_proctors_tables_and_nothing_else():
    assert ns.NFT_REMOVE == ("table inet proctor\ndelete table inet proctor\n"
                             "table ip proctor\ndelete table ip proctor\n")


# -------------------------------------------------------------------- printed form
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_the_printed_form_explains_and_warns_about_holes(backend: str):
    p = plan(exclude_uids=[2000], exclude_ports=[5432], exclude_cidrs=["10.0.0.0/8"], dns_servers=["any"])
    text = ns.render(p, backend, netns="agent1")  # type: ignore[arg-type]
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "WARNING: every exclusion is a hole around Proctor" in comments
    for hole in ("uid 2000", "port 5432", "10.0.0.0/8", "UDP to port 53 of ANY host leaves around Proctor",
                 "DNS over TCP is redirected to Proctor"):
        assert hole in comments
    assert "must not run as Proctor's uid nor hold NET_ADMIN" in comments
    assert "ip netns exec agent1" in comments
    assert f"--backend {backend} --proxy-uid 1337 --proxy-port 15001 --exclude-uid 2000" in comments
    if backend == "nftables":
        assert text.startswith("#!/usr/sbin/nft -f\n") and text.endswith(ns.nft_ruleset(p))
    else:
        assert text.startswith("#!/bin/sh\n") and "set -eu" in text
        body = text.split("<<'PROCTOR_IPV4'\n")[1].split("\nPROCTOR_IPV4\n")[0] + "\n"
        assert body == ns.iptables_restore_input(p, 4)
        assert "ip6tables-restore --wait --noflush <<'PROCTOR_IPV6'" in text
        assert "iptables -w -t nat -C OUTPUT -j PROCTOR_OUTPUT 2>/dev/null || iptables -w -t nat -I OUTPUT 1" in text


def test_no_warning_when_nothing_is_excluded_and_dns_pinned():
    p = plan(dns_servers=["10.96.0.10", "fd00::a"])
    assert p.warnings == ()
    assert "WARNING" not in ns.render(p, "iptables")


def test_printed_script_is_valid_shell():
    text = ns.render(plan(exclude_cidrs=["10.0.0.0/8"]), "iptables")
    done = subprocess.run(["sh", "-n"], input=text, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"proxy_uid": None}, "--proxy-uid is required"),
        ({"proxy_uid": "root"}, "'root' is not a uid"),
        ({"proxy_uid": 0}, "uid 0 would exempt every process running as root"),
        ({"proxy_uid": -5}, "out of range"),
        ({"proxy_uid": 2**32 - 1}, "out of range"),
        ({"proxy_port": "0"}, "--proxy-port: port 0 is out of range"),
        ({"proxy_port": "15001x"}, "not a port number"),
        ({"exclude_uids": ["0"]}, "--exclude-uid: uid 0"),
        ({"exclude_ports": ["65536"]}, "--exclude-port: port 65536"),
        ({"exclude_cidrs": ["10.0.0.1/8"]}, "has host bits set; did you mean 10.0.0.0/8?"),
        ({"exclude_cidrs": ["example.com"]}, "not an IP address or CIDR"),
        ({"exclude_cidrs": ["0.0.0.0/0"]}, "excludes every destination"),
        ({"exclude_cidrs": ["::/0"]}, "excludes every destination"),
        ({"exclude_cidrs": ["fd00::/8"], "ipv6": False}, "IPv6 CIDR with --no-ipv6"),
        ({"dns_port": "-1"}, "--dns-port"),
        ({"dns_servers": ["10.0.0.300"]}, "--dns-server"),
        ({"dns_servers": ["0.0.0.0/0"]}, "--dns-server: '0.0.0.0/0' is every host"),
        ({"dns_servers": ["::/0"]}, "--dns-server: '::/0' is every host"),
    ],
)
def test_bad_input_is_refused_with_the_option_named(kw: dict, message: str):
    with pytest.raises(ns.InputError, match=re.escape(message)):
        ns.build_plan(**{"proxy_uid": 1337, **kw})


def test_dns_server_auto_reads_the_resolvers(tmp_path: Path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\noptions ndots:5\n")
    p = ns.build_plan(proxy_uid=1337, dns_servers=["auto"], resolv_conf=conf)
    assert [str(n) for n in p.dns_servers or ()] == ["10.96.0.10/32", "fe80::1/128"]
    conf.write_text("search x\n")
    with pytest.raises(ns.InputError, match="names no nameserver"):
        ns.build_plan(proxy_uid=1337, dns_servers=["auto"], resolv_conf=conf)
    with pytest.raises(ns.InputError, match="cannot read"):
        ns.build_plan(proxy_uid=1337, dns_servers=["auto"], resolv_conf=tmp_path / "missing")
    # resolv.conf names resolvers, never networks: a CIDR there would open the DNS port to all of it
    conf.write_text("nameserver 10.0.0.0/8\n")
    with pytest.raises(ns.InputError, match="not one address"):
        ns.build_plan(proxy_uid=1337, dns_servers=["auto"], resolv_conf=conf)


@pytest.mark.parametrize("name", ["../etc", "a/b", "-x", ".", "..", "x" * 64, "", "a b", "a;b"])
def test_bad_netns_names_are_refused(name: str):
    with pytest.raises(ns.InputError):
        ns.check_netns_name(name)


@pytest.mark.parametrize("name", ["agent", "pod-1", "a.b_c", "x" * 63])
def test_netns_names_accepted(name: str):
    assert ns.check_netns_name(name) == name


# ----------------------------------------------------------------------- preflight
def test_preflight_needs_the_binaries_the_capability_and_the_namespace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(ns.shutil, "which", lambda b: None if b == "ip6tables-restore" else f"/usr/sbin/{b}")
    with pytest.raises(ns.SetupError, match="ip6tables-restore not found on PATH: install iptables"):
        ns.preflight("iptables", None, True, caps=-1)
    ns.preflight("iptables", None, False, caps=1 << ns.CAP_NET_ADMIN)  # IPv4 only: no ip6tables needed
    monkeypatch.setattr(ns.shutil, "which", lambda b: f"/usr/sbin/{b}")
    with pytest.raises(ns.SetupError, match=r"CAP_NET_ADMIN.*capabilities add: \[NET_ADMIN, NET_RAW\]"):
        ns.preflight("iptables", None, True, caps=0)
    monkeypatch.setattr(ns, "NETNS_DIR", tmp_path)
    with pytest.raises(ns.SetupError, match="--netns needs CAP_SYS_ADMIN"):
        ns.preflight("nftables", "agent", True, caps=1 << ns.CAP_NET_ADMIN)
    with pytest.raises(ns.SetupError, match="no network namespace 'agent'"):
        ns.preflight("nftables", "agent", True, caps=-1)
    (tmp_path / "agent").touch()
    ns.preflight("nftables", "agent", True, caps=-1)


def test_effective_capabilities_are_read_from_proc(tmp_path: Path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000003000\n")
    assert ns.effective_capabilities(status) == 0x3000
    assert ns.effective_capabilities(tmp_path / "nope") is None


# ------------------------------------------------------------------------------ CLI
def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "netsetup", *args], capture_output=True, text=True,
                          cwd=str(ROOT), env={**os.environ, **(env or {})}, timeout=60)


def test_cli_prints_the_rules_by_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(ns, "RESOLV_CONF", POD_RESOLV)
    result = CliRunner().invoke(main, ["netsetup", "--proxy-uid", "1337"])
    assert result.exit_code == 0, result.output
    assert result.output == ns.render(plan(), "iptables")
    result = CliRunner().invoke(main, ["netsetup", "--backend", "nftables", "--proxy-uid", "1337", "--no-ipv6"])
    assert result.exit_code == 0 and result.output == ns.render(plan(ipv6=False), "nftables")


def test_cli_without_resolvers_to_pin_exits_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The default pins the namespace's resolvers; with none to read, it stops (never falls back to
    'DNS to any host') and says how to go on."""
    empty = tmp_path / "resolv.conf"
    empty.write_text("search example\n")
    for conf in (empty, tmp_path / "missing"):
        monkeypatch.setattr(ns, "RESOLV_CONF", conf)
        result = CliRunner().invoke(main, ["netsetup", "--proxy-uid", "1337"])
        assert result.exit_code == 2, result.output
        assert "--dns-server auto (the default)" in result.output and "--dns-server IP" in result.output
        assert "--dns-server any" in result.output and "PROCTOR_OUTPUT" not in result.output
    result = CliRunner().invoke(main, ["netsetup", "--proxy-uid", "1337", "--dns-server", "any"])
    assert result.exit_code == 0 and "-p udp --dport 53 -m comment" in result.output


def test_cli_reads_the_named_namespaces_resolv_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """--netns X pins what processes in X resolve with: /etc/netns/X/resolv.conf (which `ip netns exec`
    mounts over /etc/resolv.conf) when present, else /etc/resolv.conf."""
    monkeypatch.setattr(ns, "RESOLV_CONF", POD_RESOLV)
    monkeypatch.setattr(ns, "NETNS_ETC", tmp_path)
    (tmp_path / "agent1").mkdir()
    (tmp_path / "agent1" / "resolv.conf").write_text("nameserver 10.1.2.3\n")
    own = CliRunner().invoke(main, ["netsetup", "--proxy-uid", "1337", "--netns", "agent1"])
    assert own.exit_code == 0 and "-d 10.1.2.3/32 -p udp --dport 53" in own.output and "10.96.0.10" not in own.output
    other = CliRunner().invoke(main, ["netsetup", "--proxy-uid", "1337", "--netns", "agent2"])
    assert other.exit_code == 0 and "-d 10.96.0.10/32 -p udp --dport 53" in other.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--proxy-uid is required"),
        (["--proxy-uid", "1337", "--exclude-cidr", "10.1.1.1/16"], "did you mean 10.1.0.0/16"),
        (["--proxy-uid", "1337", "--apply", "--remove"], "--apply and --remove exclude each other"),
        (["--proxy-uid", "1337", "--netns", "../../proc/1/ns/net", "--apply"], "not a network namespace name"),
        (["--proxy-uid", "1337", "--backend", "ebpf"], "Invalid value for '--backend'"),
    ],
)
def test_cli_bad_input_exits_2_without_a_traceback(args: list[str], message: str):
    done = run_cli(*args)
    assert done.returncode == 2, done
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_cli_missing_backend_binary_exits_1(tmp_path: Path):
    done = run_cli("--backend", "nftables", "--proxy-uid", "1337", "--apply", env={"PATH": str(tmp_path)})
    assert done.returncode == 1
    assert "nft not found on PATH: install nftables" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("--remove", env={"PATH": str(tmp_path)})
    assert done.returncode == 1 and "iptables-save not found on PATH: install iptables" in done.stderr


def test_cli_unknown_namespace_exits_1():
    done = run_cli("--proxy-uid", "1337", "--apply", "--netns", "proctor-no-such-namespace")
    assert done.returncode == 1, done
    assert "no network namespace 'proctor-no-such-namespace'" in done.stderr or "CAP_" in done.stderr


def test_runner_failures_become_clear_errors():
    runner = ns.Runner()
    with pytest.raises(ns.SetupError, match=r"failed \(exit 4\): iptables-restore: Permission denied.*needs CAP_NET_ADMIN"):
        runner.run(["sh", "-c", "echo 'iptables-restore: Permission denied (you must be root)' >&2; exit 4"])
    with pytest.raises(ns.SetupError, match="not found on PATH"):
        runner.run(["proctor-no-such-binary"])
    assert runner.run(["sh", "-c", "cat"], stdin="rules\n") == "rules\n"


class FakeRunner(ns.Runner):
    """Records the commands; iptables-save answers from a dict (what the rules would be)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[str], str | None]] = []
        self.saved = {"iptables-save": "", "ip6tables-save": ""}

    def run(self, argv: list[str], stdin: str | None = None) -> str:
        self.calls.append((argv, stdin))
        if argv[0].endswith("-save"):  # one table (-t T) of what the last restore left
            table = argv[argv.index("-t") + 1]
            return "".join(part for part in re.split(r"(?m)^(?=\*)", self.saved[argv[0]]) if part.startswith(f"*{table}"))
        if argv[0].endswith("-restore"):
            self.saved[argv[0].replace("restore", "save")] = (
                "*nat\n-A OUTPUT -j PROCTOR_OUTPUT\n-A PROCTOR_OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
                "*filter\n-A OUTPUT -j PROCTOR_OUTPUT\nCOMMIT\n"
            )
        return ""


def test_a_kernel_without_ipv6_needs_no_ipv6_rules(tmp_path: Path):
    assert ns.kernel_has_ipv6(tmp_path / "if_inet6") is False
    runner = FakeRunner()
    out = ns.apply(plan(), "iptables", runner, has_ipv6=False)
    assert "no IPv6 rules needed" in out and "(IPv4)" in out
    assert not any(argv[0].startswith("ip6tables") for argv, _ in runner.calls)
    runner = FakeRunner()
    assert "(IPv4+IPv6)" in ns.apply(plan(), "iptables", runner, has_ipv6=True)
    assert any(argv[0] == "ip6tables-restore" for argv, _ in runner.calls)
    # the read-back must find exactly one jump per table, or apply fails
    bad = FakeRunner()
    bad.run = lambda argv, stdin=None: ""  # type: ignore[method-assign]
    with pytest.raises(ns.SetupError, match="do not read back"):
        ns.apply(plan(), "iptables", bad, has_ipv6=False)


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_proctors_own_listeners_are_refused_to_the_agent_by_default(backend):
    plan = ns.build_plan(proxy_uid=1337)
    assert plan.protect_ports == (8080, 8081, 8082)
    text = ns.render(plan, backend)
    if backend == "iptables":
        assert ("-o lo -p tcp -m multiport --dports 8080,8081,8082 -m comment --comment \"proctor: Proctor listeners, "
                "not for the agent\" -j REJECT --reject-with tcp-reset") in text
        # before the rule that lets local destinations through
        assert text.index("--dports 8080,8081,8082") < text.index("local destinations, not governed\" -j RETURN\n-A "
                                                                   "PROCTOR_OUTPUT -p tcp -m conntrack")
    else:
        assert 'oifname "lo" tcp dport { 8080, 8081, 8082 } reject with tcp reset' in text
    assert "Refused locally: Proctor's own listeners on TCP 8080, 8081, 8082" in text
    custom = ns.build_plan(proxy_uid=1337, protect_ports=["9090", "9091"])
    assert custom.protect_ports == (9090, 9091)
    assert "--protect-port 9090 --protect-port 9091" in ns.render(custom, backend)
    none = ns.build_plan(proxy_uid=1337, protect_ports=["none"])
    assert none.protect_ports == ()
    assert "Proctor listeners" not in ns.render(none, backend).replace("Proctor's own listeners are reachable", "")
    assert "--protect-port none" in ns.render(none, backend)


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_the_status_address_is_redirected_to_the_transparent_port(backend):
    """The control port on a local address (the status URL of a held request) goes to the transparent
    listener for the redirected uids: before the rule that leaves local destinations alone, after
    Proctor's own uid (which reaches the real control API)."""
    plan = ns.build_plan(proxy_uid=1337, dns_servers=["10.96.0.10"])
    assert plan.status_port == 8081
    text = ns.render(plan, backend)
    if backend == "iptables":
        nat = restore_rules(ns.iptables_restore_input(plan, 4), "nat")
        rule = ('-A PROCTOR_OUTPUT -o lo -p tcp --dport 8081 -m comment --comment "proctor: approval status, '
                'answered by the transparent listener" -j REDIRECT --to-ports 15001')
        assert nat[0].startswith("-A PROCTOR_OUTPUT -m owner --uid-owner 1337 ") and nat[1] == rule
        assert nat[2].startswith("-A PROCTOR_OUTPUT -o lo ") and nat[2].endswith("-j RETURN")
        assert rule in restore_rules(ns.iptables_restore_input(plan, 6), "nat")
        assert "--status-port" not in text.splitlines()[1]  # the default: not in the invocation
    else:
        lines = [line.strip() for line in ns.nft_ruleset(plan).splitlines()]
        rule = 'oifname "lo" tcp dport 8081 redirect to :15001 comment "approval status, answered by the transparent listener"'
        assert lines.index(rule) == lines.index('meta skuid 1337 return comment "Proctor itself"') + 1
        assert lines.index(rule) + 1 == lines.index('oifname "lo" return comment "local destinations, not governed"')
    assert "Redirected locally: TCP 8081" in text
    other = ns.build_plan(proxy_uid=1337, dns_servers=["10.96.0.10"], status_port="9091")
    assert other.status_port == 9091 and "--status-port 9091" in ns.render(other, backend)
    assert "dport 9091" in ns.render(other, backend) or "--dport 9091" in ns.render(other, backend)
    off = ns.build_plan(proxy_uid=1337, dns_servers=["10.96.0.10"], status_port="none")
    assert off.status_port is None
    assert "approval status" not in ns.render(off, backend) and "--status-port none" in ns.render(off, backend)
    with pytest.raises(ns.InputError, match="--status-port: 15001 is the transparent port"):
        ns.build_plan(proxy_uid=1337, dns_servers=["10.96.0.10"], status_port="15001")
    with pytest.raises(ns.InputError, match="--status-port"):
        ns.build_plan(proxy_uid=1337, dns_servers=["10.96.0.10"], status_port="0")
    r = CliRunner().invoke(main, ["netsetup", "--proxy-uid", "1337", "--dns-server", "10.96.0.10",
                                  "--status-port", "none"])
    assert r.exit_code == 0 and "approval status" not in r.output and "--status-port none" in r.output


def test_the_transparent_port_cannot_be_protected():
    with pytest.raises(ns.InputError, match="is the transparent port"):
        ns.build_plan(proxy_uid=1337, proxy_port=15001, protect_ports=["15001"])
    r = CliRunner().invoke(main, ["netsetup", "--proxy-uid", "1337", "--protect-port", "99999"])
    assert r.exit_code == 2 and "--protect-port" in r.output
