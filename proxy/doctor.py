"""`proctor doctor`: checks, from the agent's own environment, that its traffic goes
through Proctor (docs/agents.md#checking-an-agents-environment-proctor-doctor).

Routing by environment variables is advisory: a missing lower-case `http_proxy` (curl
ignores `HTTP_PROXY`), a `NO_PROXY` entry covering a connector host, or a CA bundle
without Proctor's CA each let traffic bypass Proctor or fail, with no error at Proctor.
Each check yields findings with a fix; any `fail` finding makes the exit status 1.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .core.problem import DECISION_HEADER

OK, WARN, FAIL = "ok", "warn", "fail"

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
NO_PROXY_VARS = ("no_proxy", "NO_PROXY")
# Who reads which CA variable. SSL_CERT_FILE replaces the default store (OpenSSL, httpx,
# aiohttp); requests reads REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE); Node only adds to its own.
CA_VARS = {
    "CURL_CA_BUNDLE": "curl",
    "SSL_CERT_FILE": "Python ssl, httpx, aiohttp (OpenSSL)",
    "REQUESTS_CA_BUNDLE": "Python requests",
    "NODE_EXTRA_CA_CERTS": "Node",
}
EXPORT_FIX = "proctor ca export ca.pem, then export {var}=$PWD/ca.pem"


@dataclass(frozen=True)
class Finding:
    check: str  # proxy, no_proxy, ca, roundtrip
    status: str  # ok | warn | fail
    message: str
    fix: str = ""


# ------------------------------------------------------------------ proxy variables
def _redacted(url: str) -> str:
    """The proxy URL with its credentials shown only as present (the password is a JWT)."""
    try:
        p = urllib.parse.urlsplit(url)
        host = p.hostname or ""
        port = f":{p.port}" if p.port else ""
    except ValueError:
        return "<unparsable URL>"
    if p.username is None and p.password is None:
        return url
    who = urllib.parse.unquote(p.username or "")
    cred = f"{who}:<token hidden>@" if p.password else f"{who}@"
    return f"{p.scheme}://{cred}{host}{port}{p.path}"


def check_proxy_vars(env: Mapping[str, str]) -> list[Finding]:
    out: list[Finding] = []
    present = {v: env[v] for v in PROXY_VARS if env.get(v)}
    if not present:
        return [Finding("proxy", FAIL, "no proxy variable is set: every client connects directly, past Proctor",
                        "export HTTPS_PROXY=http://<agent-id>:<jwt>@127.0.0.1:8080 HTTP_PROXY=$HTTPS_PROXY "
                        "https_proxy=$HTTPS_PROXY http_proxy=$HTTPS_PROXY")]
    for var, value in present.items():
        p = urllib.parse.urlsplit(value)
        if p.scheme not in ("http", "https") or not p.hostname:
            out.append(Finding("proxy", FAIL, f"{var}={_redacted(value)} is not an http:// proxy URL",
                               f"export {var}=http://<agent-id>:<jwt>@<proctor-host>:8080"))
            continue
        creds = "credentials present" if p.password else (
            "a username but no token" if p.username else "no credentials")
        status = OK if p.password else WARN
        fix = "" if p.password else "put the agent id and its JWT in the URL: http://<agent-id>:<jwt>@host:port"
        out.append(Finding("proxy", status, f"{var}={_redacted(value)} ({creds})", fix))
    # curl reads only the lower-case http_proxy (HTTP_PROXY is CGI-poisonable), so an
    # upper-case-only setup sends curl's http:// requests straight to the upstream.
    if "HTTP_PROXY" in present and "http_proxy" not in present and "all_proxy" not in present \
            and "ALL_PROXY" not in present:
        out.append(Finding("proxy", FAIL,
                           "HTTP_PROXY is set but http_proxy is not: curl ignores upper-case HTTP_PROXY, "
                           "so curl's http:// requests bypass Proctor",
                           "export http_proxy=$HTTP_PROXY"))
    if not any(v in present for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        out.append(Finding("proxy", FAIL, "no https_proxy/HTTPS_PROXY: https:// requests bypass Proctor",
                           "export HTTPS_PROXY=$HTTP_PROXY https_proxy=$HTTP_PROXY"))
    for lower in ("http_proxy", "https_proxy", "all_proxy"):
        upper = lower.upper()
        if lower in present and upper in present and present[lower] != present[upper]:
            out.append(Finding("proxy", FAIL,
                               f"{lower} and {upper} differ: clients reading one and clients reading the other "
                               "go to different proxies", f"export {upper}=${lower}"))
    return out


def proxy_for(env: Mapping[str, str], scheme: str) -> tuple[str, str] | None:
    """(variable, URL) of the proxy a client uses for `scheme`: lower case first, as curl and
    Python do."""
    for var in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        if env.get(var):
            return var, env[var]
    return None


# ------------------------------------------------------------------ NO_PROXY
def _split_hostport(pattern: str) -> tuple[str, int | None]:
    """`host`, `host:port`, `[v6]:port`, `v6` -> (host, port or None)."""
    if pattern.startswith("["):
        host, _, rest = pattern[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if pattern.count(":") == 1:
        host, _, port = pattern.partition(":")
        return host, int(port) if port.isdigit() else None
    return pattern, None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def entry_covers(entry: str, connector_host: str) -> bool:
    """Whether NO_PROXY `entry` sends some traffic for the connector host pattern
    (`api.example.com`, `*.example.com`, `127.0.0.1:9101`) past the proxy, matching as curl,
    Python (urllib/requests/httpx) and Go do: `*`, exact host, domain suffix with or without
    a leading dot, IP, CIDR, and an optional `:port`."""
    entry = entry.strip().lower()
    if not entry:
        return False
    if entry == "*":
        return True
    e_host, e_port = _split_hostport(entry)
    c_host, c_port = _split_hostport(connector_host.lower())
    # An entry with a port bypasses that port only; a connector pattern without a port is
    # reached on the scheme's default port, which some entry port may name.
    if e_port is not None and c_port is not None and e_port != c_port:
        return False
    if e_port is not None and c_port is None and e_port not in (80, 443):
        return False
    if "/" in e_host:  # CIDR
        try:
            net = ipaddress.ip_network(e_host, strict=False)
        except ValueError:
            return False
        ip = _ip(c_host)
        return ip is not None and ip in net
    c_ip, e_ip = _ip(c_host), _ip(e_host)
    if c_ip is not None or e_ip is not None:
        return c_ip is not None and c_ip == e_ip
    domain = e_host.lstrip(".").lstrip("*").lstrip(".")  # `.d`, `*.d` and `d` all cover d's subdomains
    if not domain:
        return False
    if c_host.startswith("*."):
        base = c_host[2:]
        # *.base overlaps the entry when the entry is base, a parent of base, or a subdomain of it
        return base == domain or base.endswith("." + domain) or domain.endswith("." + base)
    return c_host == domain or c_host.endswith("." + domain)


def check_no_proxy(env: Mapping[str, str], connector_hosts: Mapping[str, list[str]]) -> list[Finding]:
    out: list[Finding] = []
    for var in NO_PROXY_VARS:
        value = env.get(var)
        if not value:
            continue
        entries = [e.strip() for e in value.split(",") if e.strip()]
        hits = {e: [f"{name}: {h}" for name, hosts in connector_hosts.items() for h in hosts if entry_covers(e, h)]
                for e in entries}
        bad = [e for e in entries if hits[e]]
        if not bad:
            out.append(Finding("no_proxy", OK, f"{var}={value}: no entry covers a connector host"))
            continue
        keep = [e for e in entries if e not in bad]
        fix = f"export {var}={','.join(keep)}" if keep else f"unset {var}"
        out += [Finding("no_proxy", FAIL, f"{var} entry {e!r} covers connector host(s) {', '.join(hits[e])}: "
                                          "requests to them bypass Proctor", fix) for e in bad]
    return out


# ------------------------------------------------------------------ CA trust
def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def check_ca_vars(env: Mapping[str, str], proctor_ca: x509.Certificate | None) -> list[Finding]:
    out: list[Finding] = []
    for var, who in CA_VARS.items():
        value = env.get(var)
        if not value:
            out.append(Finding("ca", WARN, f"{var} is not set: {who} will not trust Proctor's CA for https://",
                               EXPORT_FIX.format(var=var)))
            continue
        try:
            data = Path(value).read_bytes()
        except OSError as e:
            out.append(Finding("ca", FAIL, f"{var}={value} cannot be read ({e.strerror or e})",
                               EXPORT_FIX.format(var=var)))
            continue
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            out.append(Finding("ca", FAIL, f"{var}={value} holds no PEM certificate", EXPORT_FIX.format(var=var)))
            continue
        if proctor_ca is None:
            out.append(Finding("ca", WARN, f"{var}={value}: {len(certs)} certificate(s); Proctor's CA unknown here, "
                                           "not compared", "pass -c with the proxy's config to compare"))
        elif any(_fingerprint(c) == _fingerprint(proctor_ca) for c in certs):
            out.append(Finding("ca", OK, f"{var}={value} contains Proctor's CA ({who})"))
        else:
            out.append(Finding("ca", FAIL, f"{var}={value} does not contain Proctor's CA "
                                           f"({proctor_ca.subject.rfc4514_string()}): {who} will refuse "
                                           "Proctor's interception certificates", EXPORT_FIX.format(var=var)))
    return out


# ------------------------------------------------------------------ round trip
def pick_target(connector_hosts: Mapping[str, list[str]]) -> str | None:
    """A URL on the first concrete connector host: https:// unless the host names a port other
    than 443 (the bundled demo mocks are plain HTTP on 127.0.0.1)."""
    for hosts in connector_hosts.values():
        for h in hosts:
            if "*" in h:
                continue
            _, port = _split_hostport(h)
            scheme = "https" if port in (None, 443) else "http"
            return f"{scheme}://{h}/"
    return None


def round_trip(env: Mapping[str, str], url: str, ca_pem: bytes | None, timeout: float = 10.0) -> list[Finding]:
    import ssl

    import httpx

    scheme = urllib.parse.urlsplit(url).scheme
    chosen = proxy_for(env, scheme)
    if chosen is None:
        return [Finding("roundtrip", FAIL, f"no proxy variable for {scheme}:// URLs, so {url} would go direct",
                        f"export {scheme}_proxy=http://<agent-id>:<jwt>@127.0.0.1:8080")]
    var, proxy = chosen
    verify: ssl.SSLContext | bool = True
    if scheme == "https":
        ctx = ssl.create_default_context()
        if ca_pem:
            ctx.load_verify_locations(cadata=ca_pem.decode())
        verify = ctx
    try:
        with httpx.Client(proxy=proxy, verify=verify, trust_env=False, timeout=timeout) as client:
            resp = client.get(url)
    except httpx.HTTPError as e:
        return [Finding("roundtrip", FAIL, f"GET {url} through {var}={_redacted(proxy)} failed: {e}",
                        "check that Proctor runs and listens where the proxy variable points")]
    decision = resp.headers.get(DECISION_HEADER)
    if decision:
        return [Finding("roundtrip", OK, f"GET {url} through {var} answered {resp.status_code} with "
                                         f"{DECISION_HEADER}: {decision} (Proctor decided it)")]
    return [Finding("roundtrip", FAIL, f"GET {url} through {var}={_redacted(proxy)} answered {resp.status_code} "
                                       f"without {DECISION_HEADER}: the proxy there is not Proctor, or it was bypassed",
                    "point the proxy variables at Proctor's agent listener (default 127.0.0.1:8080)")]


# ------------------------------------------------------------------ all together
def proctor_ca_cert(config) -> x509.Certificate | None:
    """The CA the proxy serves, from its config, without creating one (`proctor ca export`
    would create it; here a missing one only means it cannot be compared)."""
    from .ca import ca_cert_path, load_configured_ca

    try:
        if config.ca is not None:
            return load_configured_ca(config.ca).cert
        path = ca_cert_path(config.ca_dir)
        return x509.load_pem_x509_certificate(path.read_bytes()) if path.exists() else None
    except (OSError, ValueError):
        return None


def connector_hosts_of(config) -> dict[str, list[str]]:
    from .connectors.manifest import load_manifests

    return {m.name: list(m.hosts) for m in load_manifests(config.connectors_dir)}


def diagnose(env: Mapping[str, str], connector_hosts: Mapping[str, list[str]], proctor_ca: x509.Certificate | None,
             url: str | None) -> list[Finding]:
    findings = check_proxy_vars(env) + check_no_proxy(env, connector_hosts) + check_ca_vars(env, proctor_ca)
    target = url or pick_target(connector_hosts)
    if target is None:
        findings.append(Finding("roundtrip", WARN, "no concrete connector host to try", "give one with --url"))
    else:
        ca_pem = proctor_ca.public_bytes(serialization.Encoding.PEM) if proctor_ca is not None else None
        findings += round_trip(env, target, ca_pem)
    return findings


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.status == FAIL for f in findings) else 0


def render_text(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"[{f.status.upper():4}] {f.check}: {f.message}")
        if f.fix and f.status != OK:
            lines.append(f"       fix: {f.fix}")
    fails = sum(f.status == FAIL for f in findings)
    lines.append("all good: traffic goes through Proctor" if not fails else f"{fails} problem(s) found")
    return "\n".join(lines)


def as_json(findings: list[Finding]) -> dict:
    return {"ok": exit_code(findings) == 0, "findings": [asdict(f) for f in findings]}


def environ() -> dict[str, str]:
    return dict(os.environ)
