"""`proctor doctor`: checks, from the agent's own environment, that its traffic goes
through Proctor (docs/agents.md#checking-an-agents-environment-proctor-doctor).

Routing by environment variables is advisory: a missing lower-case `http_proxy` (curl
ignores `HTTP_PROXY`), a `NO_PROXY` entry covering a connector host, a client that ignores
the variables (Node's `fetch` without a preload), or a CA bundle without Proctor's CA each
let traffic bypass Proctor or fail, with no error at Proctor. In a transparent sidecar pod
(docs/transparent.md) no variable is needed: the network redirects every connection.

Doctor tells the two apart by evidence, never by a flag: besides the round trip through
the proxy variables, it makes a plain GET straight to the probe URL, without a proxy and
without any credential. An answer carrying `X-Proctor-Decision-Id` proves the network
delivered it to Proctor (transparent interception); any other answer reached the host
around Proctor. Each check yields findings with a fix; any `fail` makes the exit status 1.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .core.problem import DECISION_HEADER

if TYPE_CHECKING:
    from .config import ProctorConfig

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"

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
# `proctor ca export` elsewhere would create another CA (the embedded default's state is ./.proctor).
EXPORT_FIX = ("proctor ca export ca.pem (where `proctor run` runs, or with its -c), then "
              "export {var}=$PWD/ca.pem")
# Two commands: in one `export A=x B=$A`, $A is expanded before A is set.
SET_PROXY_FIX = ("export HTTPS_PROXY=http://<agent-id>:<jwt>@127.0.0.1:8080; "
                 "export HTTP_PROXY=$HTTPS_PROXY https_proxy=$HTTPS_PROXY http_proxy=$HTTPS_PROXY")
# A token the proxy accepts, in the proxy URL (the dev issuer's; in production the IdP's).
TOKEN_FIX = ("put the agent id and a valid token in the proxy variables: TOKEN=$(proctor token issue --agent "
             "<agent-id>) (the dev issuer; in production a token from your IdP), then "
             "export HTTPS_PROXY=http://<agent-id>:$TOKEN@127.0.0.1:8080; "
             "export HTTP_PROXY=$HTTPS_PROXY https_proxy=$HTTPS_PROXY http_proxy=$HTTPS_PROXY")
BYPASS_FIX = (f"set the proxy variables as docs/agents.md says ({SET_PROXY_FIX}), or deploy the transparent "
              "sidecar as docs/transparent.md says, so the network sends every connection to Proctor")
UNSET_PROXY_FIX = ("unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY: in a transparent "
                   "pod every connection reaches Proctor without them (docs/transparent.md)")
# The verified recipe (docs/agents.md#nodejs, tests/node/proctor-proxy.cjs).
NODE_RECIPE = ("mkdir -p /opt/proctor-node && cd /opt/proctor-node && npm install undici@7.30.3 "
               "global-agent@4.1.6, write proctor-proxy.cjs there as docs/agents.md#nodejs shows, then "
               "export NODE_OPTIONS=\"--require /opt/proctor-node/proctor-proxy.cjs\"")
# Bounds: the probes are one GET each, never retried, their bodies read up to BODY_LIMIT.
PROBE_TIMEOUT = 10.0
DIRECT_TIMEOUT = 5.0
NODE_STARTUP = 15.0
BODY_LIMIT = 64 * 1024
# The workload identity's refusals (proxy/identity/stage.py).
WORKLOAD_UNAVAILABLE = "workload-identity-unavailable"
TRANSPARENT_PROXY_CREDENTIALS = "transparent-proxy-credentials"


@dataclass(frozen=True)
class Finding:
    check: str  # proxy, no_proxy, ca, roundtrip, transparent, node
    status: str  # ok | warn | fail | skip
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


def _secrets(env: Mapping[str, str]) -> set[str]:
    """The credentials in the proxy variables, as written and percent-decoded."""
    out: set[str] = set()
    for var in PROXY_VARS:
        try:
            password = urllib.parse.urlsplit(env.get(var, "")).password
        except ValueError:
            continue
        if password:
            out |= {password, urllib.parse.unquote(password)}
    return {s for s in out if len(s) >= 4}


def _scrub(text: str, env: Mapping[str, str]) -> str:
    """Text from a client (an error, a child's stderr) with every proxy credential removed."""
    for secret in sorted(_secrets(env), key=len, reverse=True):
        text = text.replace(secret, "<token hidden>")
    return text


def has_proxy_vars(env: Mapping[str, str]) -> bool:
    return any(env.get(v) for v in PROXY_VARS)


def check_proxy_vars(env: Mapping[str, str]) -> list[Finding]:
    out: list[Finding] = []
    present = {v: env[v] for v in PROXY_VARS if env.get(v)}
    if not present:
        return [Finding("proxy", FAIL, "no proxy variable is set: every client connects directly, past Proctor",
                        SET_PROXY_FIX)]
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
    # ...and the Node recipe's global-agent (http/https modules) reads only the upper-case names.
    # A warning: curl, Python, Go and undici read the lower-case ones, so only a Node agent using
    # http/https is affected (the live Node check below fails for one that is).
    # (global-agent 4.x never reads ALL_PROXY, and for https:// falls back to HTTP_PROXY)
    for lower in ("http_proxy", "https_proxy"):
        upper = lower.upper()
        covered = upper in present or (upper == "HTTPS_PROXY" and "HTTP_PROXY" in present)
        if lower in present and not covered:
            out.append(Finding("proxy", WARN,
                               f"{lower} is set but {upper} is not: clients that read only the upper-case name "
                               "(Node's http/https modules through global-agent, as docs/agents.md#nodejs sets them "
                               f"up) send their {lower[:-6]}:// requests around Proctor",
                               f"export {upper}=${lower}"))
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


def _is_loopback(host: str) -> bool:
    """A loopback name or address: never redirected in transparent mode (docs/transparent.md)."""
    host = host.lower().rstrip(".")
    ip = _ip(host)
    return host == "localhost" or host.endswith(".localhost") or (ip is not None and ip.is_loopback)


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


def check_no_proxy(env: Mapping[str, str], connector_hosts: Mapping[str, list[str]],
                   intercepted: bool = False) -> list[Finding]:
    """NO_PROXY entries covering a connector host. With transparent interception observed, a
    request sent around the proxy is redirected to Proctor anyway (a warning: it is then the
    workload's, not the proxy credentials' agent's), except to loopback, which is never
    redirected."""
    if intercepted and not has_proxy_vars(env):
        set_vars = [v for v in NO_PROXY_VARS if env.get(v)]
        return [Finding("no_proxy", OK, f"{'/'.join(set_vars)} has no effect: no proxy variable is set and the "
                                        "network redirects every connection to Proctor")] if set_vars else []
    out: list[Finding] = []
    for var in NO_PROXY_VARS:
        value = env.get(var)
        if not value:
            continue
        entries = [e.strip() for e in value.split(",") if e.strip()]
        hits = {e: [(name, h) for name, hosts in connector_hosts.items() for h in hosts if entry_covers(e, h)]
                for e in entries}
        bad = [e for e in entries if hits[e]]
        if not bad:
            out.append(Finding("no_proxy", OK, f"{var}={value}: no entry covers a connector host"))
            continue
        keep = [e for e in entries if e not in bad]
        fix = f"export {var}={','.join(keep)}" if keep else f"unset {var}"
        for e in bad:
            named = ", ".join(f"{name}: {h}" for name, h in hits[e])
            if intercepted and not any(_is_loopback(_split_hostport(h)[0]) for _, h in hits[e]):
                out.append(Finding("no_proxy", WARN, f"{var} entry {e!r} covers connector host(s) {named}: requests "
                                                     "to them skip the proxy, and the transparent redirect sends them "
                                                     "to Proctor as the sidecar's workload identity", fix))
            else:
                out.append(Finding("no_proxy", FAIL, f"{var} entry {e!r} covers connector host(s) {named}: "
                                                     "requests to them bypass Proctor", fix))
    return out


# ------------------------------------------------------------------ CA trust
def _fingerprint(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# The CA variable of a client that is not installed here: unset, a warning only.
CA_CLIENT_EXE = {"CURL_CA_BUNDLE": "curl", "NODE_EXTRA_CA_CERTS": "node"}


CA_UNKNOWN_FIX = "pass -c with the proxy's config to compare"


def check_ca_vars(env: Mapping[str, str], proctor_ca: x509.Certificate | None,
                  absent: frozenset[str] = frozenset(), unknown_fix: str = CA_UNKNOWN_FIX) -> list[Finding]:
    """Each CA variable names a PEM with Proctor's CA. Unset is a failure (that client's https://
    calls through Proctor fail), a warning for a variable in `absent` (its client is not here)."""
    out: list[Finding] = []
    for var, who in CA_VARS.items():
        value = env.get(var)
        if not value:
            if var in absent:
                out.append(Finding("ca", WARN, f"{var} is not set ({CA_CLIENT_EXE.get(var, who)} is not on PATH here; "
                                               f"set it where the agent runs {who})", EXPORT_FIX.format(var=var)))
            else:
                out.append(Finding("ca", FAIL, f"{var} is not set: {who} will not trust Proctor's CA, so its https:// "
                                               "calls through Proctor fail (Proctor intercepts TLS with its own CA)",
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
                                           "not compared", unknown_fix))
        elif any(_fingerprint(c) == _fingerprint(proctor_ca) for c in certs):
            out.append(Finding("ca", OK, f"{var}={value} contains Proctor's CA ({who})"))
        else:
            out.append(Finding("ca", FAIL, f"{var}={value} does not contain Proctor's CA "
                                           f"({proctor_ca.subject.rfc4514_string()}): {who} will refuse "
                                           "Proctor's interception certificates", EXPORT_FIX.format(var=var)))
    return out


def trust_context(env: Mapping[str, str], proctor_ca: x509.Certificate | None) -> ssl.SSLContext:
    """What the probes verify https:// answers with: the default store (which honours
    SSL_CERT_FILE/SSL_CERT_DIR), Proctor's CA when known, and each CA variable's readable PEMs."""
    ctx = ssl.create_default_context()
    if proctor_ca is not None:
        ctx.load_verify_locations(cadata=proctor_ca.public_bytes(serialization.Encoding.PEM).decode())
    for var in CA_VARS:
        if env.get(var):
            try:
                ctx.load_verify_locations(cafile=env[var])
            except (OSError, ssl.SSLError):
                pass  # reported by check_ca_vars
    return ctx


# ------------------------------------------------------------------ probes
@dataclass(frozen=True)
class Probe:
    """What answered one GET of the probe URL (through a proxy, straight, or from Node)."""

    url: str
    status: int | None = None
    decision_id: str | None = None
    problem: dict[str, Any] = field(default_factory=dict)  # Proctor's refusal body, when it refused
    error: str | None = None
    # The TLS handshake failed verification: who issued what the host presented, and
    # whether that is Proctor's CA (None: cannot tell).
    issuer: str | None = None
    issued_by_proctor: bool | None = None
    # status, decision_id and problem are the proxy's answer to the CONNECT (the tunnel was refused)
    connect: bool = False

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    @property
    def addressed_proctor(self) -> bool:
        """Proctor's forward or gateway listener itself answered, asking for credentials: the
        URL is Proctor's own address. A redirected request never gets 401/407: the transparent
        listener attributes it to the workload identity."""
        kind = self.problem.get("type")
        return (self.decision_id is not None and self.status in (401, 407) and isinstance(kind, str)
                and kind.endswith("/authentication"))

    @property
    def intercepted(self) -> bool:
        """The network delivered the request to Proctor's transparent listener: Proctor answered
        (or, over TLS, presented a certificate its CA issued) without asking for credentials."""
        if self.addressed_proctor:
            return False
        return self.decision_id is not None or self.issued_by_proctor is True

    @property
    def agent(self) -> str | None:
        agent = self.problem.get("agent")
        return agent if isinstance(agent, str) else None

    @property
    def reasons(self) -> list[str]:
        reasons = self.problem.get("reasons")
        return [r for r in reasons if isinstance(r, str)] if isinstance(reasons, list) else []

    @property
    def auth_refused(self) -> bool:
        """Proctor refused the credentials (401/407, an authentication problem)."""
        kind = self.problem.get("type")
        return (self.decision_id is not None and self.status in (401, 407) and isinstance(kind, str)
                and kind.endswith("/authentication"))

    def answer(self) -> str:
        what = "answered the CONNECT" if self.connect else "answered"
        if self.decision_id is None:
            return f"{what} {self.status} without {DECISION_HEADER}"
        return f"{what} {self.status} with {DECISION_HEADER}: {self.decision_id}"


def _problem(content_type: str, body: bytes) -> dict[str, Any]:
    if "json" not in content_type.lower():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and isinstance(data["error"].get("data"), dict):
        data = data["error"]["data"]  # a JSON-RPC error: the problem fields are in error.data
    return data if isinstance(data, dict) and "decision_id" in data else {}


def _cert_verify_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def presented_certificate(host: str, port: int, timeout: float) -> x509.Certificate | None:
    """The certificate `host:port` presents for `host` (SNI), read by a handshake that verifies
    nothing and sends nothing after it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock, \
                ctx.wrap_socket(sock, server_hostname=None if _ip(host) else host) as tls:
            der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    try:
        return x509.load_der_x509_certificate(der) if der else None
    except ValueError:
        return None


def issued_by_proctor(cert: x509.Certificate, proctor_ca: x509.Certificate | None) -> bool | None:
    """Whether Proctor's CA issued `cert`: by signature when the CA is known, else by the name
    Proctor gives the CA it creates (None when neither tells)."""
    if proctor_ca is not None:
        try:
            cert.verify_directly_issued_by(proctor_ca)
            return True
        except Exception:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError: not issued by it
            return False
    from .ca import CA_CN

    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return True if names and names[0].value == CA_CN else None


def connect_answer(proxy: str, url: str, timeout: float) -> Probe | None:
    """The proxy's answer to the CONNECT of an https:// `url` it refused (httpx says only
    "407 Proxy Authentication Required"): status, decision id and refusal body, read by one bare
    CONNECT with the proxy URL's credentials, bounded; nothing is sent after it. None when
    there is no such answer (not an http:// proxy, no HTTP answer, or the tunnel was opened)."""
    try:
        p, t = urllib.parse.urlsplit(proxy), urllib.parse.urlsplit(url)
        if p.scheme != "http" or not p.hostname or not t.hostname:
            return None
        proxy_port, port = p.port or 80, t.port or 443
    except ValueError:
        return None
    authority = f"[{t.hostname}]:{port}" if ":" in t.hostname else f"{t.hostname}:{port}"
    head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if p.username is not None or p.password is not None:
        cred = f"{urllib.parse.unquote(p.username or '')}:{urllib.parse.unquote(p.password or '')}"
        head += f"Proxy-Authorization: Basic {base64.b64encode(cred.encode()).decode()}\r\n"
    deadline, data = time.monotonic() + timeout, b""
    try:
        with socket.create_connection((p.hostname, proxy_port), timeout=timeout) as sock:
            sock.sendall((head + "\r\n").encode())
            while b"\r\n\r\n" not in data and len(data) < BODY_LIMIT and time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            raw_head, sep, body = data.partition(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            status_words = lines[0].split(" ", 2)
            if not sep or len(status_words) < 2 or not status_words[0].startswith("HTTP/"):
                return None
            status = int(status_words[1])
            if 200 <= status < 300:
                return None
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
            length = min(int(headers.get("content-length") or 0), BODY_LIMIT)
            while len(body) < length and time.monotonic() < deadline:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                body += chunk
    except (OSError, ValueError):
        return None
    return Probe(url, status, headers.get(DECISION_HEADER.lower()),
                 _problem(headers.get("content-type", ""), body[:length]), connect=True)


def probe(url: str, ctx: ssl.SSLContext, *, proxy: str | None = None, timeout: float = PROBE_TIMEOUT,
          proctor_ca: x509.Certificate | None = None) -> Probe:
    """One GET of `url` (through `proxy`, else straight to the host): no credential but the
    proxy URL's, no redirect followed, no environment read, the body read up to BODY_LIMIT.
    A straight https:// GET whose certificate fails verification is looked at once more by
    a bare handshake: is it Proctor's certificate (interception without trust) or the host's?"""
    import httpx

    try:
        with httpx.Client(proxy=proxy, verify=ctx, trust_env=False, timeout=timeout,
                          follow_redirects=False) as client, client.stream("GET", url) as resp:
            body, deadline = b"", time.monotonic() + timeout
            for chunk in resp.iter_bytes():  # the headers decide; the body only names the agent
                body += chunk
                if len(body) >= BODY_LIMIT or time.monotonic() > deadline:
                    break
            return Probe(url, resp.status_code, resp.headers.get(DECISION_HEADER),
                         _problem(resp.headers.get("content-type", ""), body[:BODY_LIMIT]))
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:
        error = str(e) or type(e).__name__
        parts = urllib.parse.urlsplit(url)
        if proxy is not None and parts.scheme == "https" and isinstance(e, httpx.ProxyError):
            refused = connect_answer(proxy, url, timeout)  # the proxy refused the tunnel: what did it say?
            if refused is not None:
                return dataclasses.replace(refused, error=error)
        if proxy is None and parts.scheme == "https" and parts.hostname and _cert_verify_error(e):
            cert = presented_certificate(parts.hostname, parts.port or 443, timeout)
            if cert is not None:
                return Probe(url, error=error, issuer=cert.issuer.rfc4514_string(),
                             issued_by_proctor=issued_by_proctor(cert, proctor_ca))
        return Probe(url, error=error)


# ------------------------------------------------------------------ round trip through the proxy variables
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


def judge_proxy_trip(env: Mapping[str, str], var: str, proxy: str, via: Probe, direct: Probe | None) -> Finding:
    where = f"GET {via.url} through {var}={_redacted(proxy)}"
    if via.decision_id is not None and TRANSPARENT_PROXY_CREDENTIALS in via.reasons:
        return Finding("roundtrip", FAIL,
                       f"{where} {via.answer()}: the network redirects the connection to that proxy to Proctor's "
                       "transparent listener, which refuses proxy requests (transparent-proxy-credentials), so every "
                       f"client that reads {var} is refused", UNSET_PROXY_FIX)
    if via.auth_refused:
        detail = via.problem.get("detail")
        return Finding("roundtrip", FAIL,
                       f"{where} {via.answer()}: Proctor refused the proxy credentials"
                       + (f" ({_scrub(detail, env)})" if isinstance(detail, str) else "")
                       + f", so every request of a client that reads {var} is refused", TOKEN_FIX)
    if via.decision_id is not None:
        who = f", decided as agent {via.agent}" if via.agent else ""
        if via.connect:
            why = ", ".join(via.reasons) or str(via.problem.get("title") or "refused")
            kind = via.problem.get("type")
            hint = (f"; no connector covers {via.host}: give --url a URL a connector covers to see a request decided"
                    if isinstance(kind, str) and kind.endswith("/egress") else "")
            return Finding("roundtrip", OK, f"GET {via.url} through {var}: Proctor refused the tunnel ({via.answer()}, "
                                            f"{why}): the path goes through Proctor{who}{hint}")
        return Finding("roundtrip", OK, f"GET {via.url} through {var} {via.answer()} (Proctor decided it{who})")
    if via.error is not None and via.status is None:
        if direct is not None and direct.intercepted:
            return Finding("roundtrip", FAIL,
                           f"{where} failed: {_scrub(via.error, env)}; transparent interception is active here, and a "
                           "connection to a proxy other than Proctor's own listener is redirected to the transparent "
                           "listener, which is not a proxy", UNSET_PROXY_FIX)
        try:
            parts = urllib.parse.urlsplit(proxy)
            at = f"{parts.hostname}:{parts.port or 80}"
        except ValueError:
            at = "the proxy variable's address"
        if "refused" in via.error.lower():
            return Finding("roundtrip", FAIL, f"{where} failed: nothing listens at {at} ({_scrub(via.error, env)})",
                           "start Proctor there (proctor run -c <its config>; to try it, proctor demo --keep-running), "
                           "or point the proxy variables at where it listens (its agents' listen address)")
        return Finding("roundtrip", FAIL, f"{where} failed: {_scrub(via.error, env)}",
                       f"check that Proctor runs and listens at {at}, where the proxy variable points")
    return Finding("roundtrip", FAIL, f"{where} {via.answer()}: the proxy there is not Proctor, or it was bypassed",
                   "point the proxy variables at Proctor's agent listener (default 127.0.0.1:8080)")


# ------------------------------------------------------------------ transparent interception
def _identity(direct: Probe) -> str:
    if direct.agent:
        return f"the sidecar's workload identity (agent {direct.agent})"
    return f"the sidecar's workload identity (not named in this answer; see decision {direct.decision_id})"


def judge_direct(direct: Probe, *, has_vars: bool, expect_transparent: bool, via: Probe | None = None,
                 via_var: str | None = None, via_proxy: str | None = None) -> Finding:
    """What the GET straight to the probe URL (no proxy, no credential) proves."""
    where = f"GET {direct.url} without a proxy"
    host = direct.host
    loopback = _is_loopback(urllib.parse.urlsplit(direct.url).hostname or "")
    loop_note = (" (a loopback destination is never redirected in transparent mode: a connector on loopback is "
                 "not governed there)") if loopback else ""
    if direct.decision_id is not None and WORKLOAD_UNAVAILABLE in direct.reasons:
        detail = direct.problem.get("detail")
        return Finding("transparent", FAIL,
                       f"transparent interception: active ({where} {direct.answer()}), but the sidecar's workload "
                       f"identity is unavailable: every request is refused 503"
                       + (f" ({detail})" if isinstance(detail, str) else ""),
                       "fix the sidecar's token file (transparent.token_file): docs/transparent.md#the-workload-identity")
    if direct.intercepted:
        if direct.decision_id is not None:
            active = f"transparent interception: active ({where} {direct.answer()})"
        else:
            active = (f"transparent interception: active ({where}: {host} presented a certificate issued by "
                      f"{direct.issuer}, Proctor's CA)")
        untrusted = direct.decision_id is None
        if not has_vars:
            if untrusted:
                return Finding("transparent", FAIL,
                               f"{active}, but this environment does not trust Proctor's CA: every https:// call "
                               "fails", "trust Proctor's CA: " + EXPORT_FIX.format(var="SSL_CERT_FILE") +
                               " (and REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, NODE_EXTRA_CA_CERTS)")
            return Finding("transparent", OK,
                           f"{active}: the network sends this environment's connections to Proctor, and every request "
                           f"is attributed to {_identity(direct)}; no proxy variable or token is needed")
        # Proxy variables inside a transparent pod: two paths.
        ignore = (f"clients that ignore the proxy variables (Node's fetch without a preload, aiohttp without "
                  f"trust_env) are intercepted and attributed to "
                  f"{_identity(direct) if not untrusted else 'the workload identity'}")
        if via is None:
            reads = "clients that read the proxy variables have none for this URL's scheme and are intercepted too"
        elif via.decision_id is not None and TRANSPARENT_PROXY_CREDENTIALS in via.reasons:
            reads = (f"clients that read {via_var} send their requests to {_redacted(via_proxy or '')}, which the "
                     "network redirects to the transparent listener: refused 400 (transparent-proxy-credentials)")
        elif via.decision_id is not None:
            reads = (f"clients that read {via_var} go to Proctor's forward listener at {_redacted(via_proxy or '')} "
                     f"and are decided as {('agent ' + via.agent) if via.agent else 'the agent in the proxy URL'} "
                     "(the proxy credentials)")
        else:
            reads = f"clients that read {via_var} go to {_redacted(via_proxy or '')}, which is not Proctor"
        return Finding("transparent", WARN, f"{active}, and proxy variables are set: two paths: {reads}; {ignore}",
                       UNSET_PROXY_FIX)
    if direct.addressed_proctor:
        return Finding("transparent", WARN,
                       f"{where} {direct.answer()} from a Proctor listener asking for credentials: {host} is Proctor's "
                       "own address (forward proxy or gateway), not a host Proctor governs, so this shows nothing "
                       "about transparent interception", "give --url a connector host (an upstream), not Proctor's "
                       "address")
    direct_answer = direct.status is not None or direct.issuer is not None
    if direct.issuer is not None:
        reached = f"{where}: {host} presented a certificate issued by {direct.issuer}, not by Proctor"
    elif direct.status is not None:
        reached = f"{where} {direct.answer()}"
    else:
        reached = f"{where} failed ({direct.error})"
    if not has_vars:
        if direct_answer:
            return Finding("transparent", FAIL,
                           f"traffic reaches {host} around Proctor: no proxy variables and no transparent interception "
                           f"({reached}){loop_note}", BYPASS_FIX)
        return Finding("transparent", FAIL, f"no proxy variables and no transparent interception: {reached}{loop_note}",
                       BYPASS_FIX)
    if expect_transparent:
        return Finding("transparent", FAIL, f"no transparent interception (--transparent): {reached}{loop_note}",
                       "deploy the transparent sidecar as docs/transparent.md says (proctor netsetup in the pod's "
                       "network namespace, Proctor's transparent listener)")
    if direct_answer:
        return Finding("transparent", WARN,
                       f"no transparent interception: clients that ignore the proxy variables (Node's fetch without a "
                       f"preload, aiohttp without trust_env) reach {host} around Proctor ({reached})",
                       "configure each client as docs/agents.md (What clients need) says, or deploy the transparent "
                       "sidecar (docs/transparent.md) so that nothing can bypass Proctor")
    return Finding("transparent", OK, f"no transparent interception, and {reached}: clients that ignore the proxy "
                                      f"variables cannot reach {host} around Proctor from here")


# ------------------------------------------------------------------ Node.js
# Node's own fetch with the agent's environment (NODE_OPTIONS preload included): one GET, no
# credential, no redirect followed, bounded; one marked JSON line out.
NODE_FETCH = r"""
const mark = 'PROCTOR-DOCTOR-NODE ';
const say = (o) => console.log(mark + JSON.stringify(Object.assign({node: process.version}, o)));
if (typeof fetch !== 'function') { say({nofetch: true}); } else {
  fetch(process.argv[1], {method: 'GET', redirect: 'manual', signal: AbortSignal.timeout(+process.argv[2])})
    .then(async (r) => {
      const body = (await r.text()).slice(0, 65536);
      say({status: r.status, decision: r.headers.get('x-proctor-decision-id'),
           content_type: r.headers.get('content-type') || '', body});
    })
    .catch((e) => {
      const causes = [];  // fetch failed <- Request was cancelled <- Proxy response (403) !== 200 ...
      for (let c = e && e.cause, i = 0; c && i < 6; c = c.cause, i++) {
        causes.push([c.code, c.message].filter((x) => x).join(': ') || String(c));
      }
      say({error: String((e && e.message) || e), cause: causes.join('; ')});
    });
}
"""


def node_preloads(node_options: str) -> list[str]:
    """The modules NODE_OPTIONS loads before the program (`--require X`, `-r X`,
    `--require=X`, `--import X`); ValueError when it cannot be split."""
    words = shlex.split(node_options)
    out: list[str] = []
    for i, w in enumerate(words):
        if w in ("--require", "-r", "--import") and i + 1 < len(words):
            out.append(words[i + 1])
        elif w.startswith(("--require=", "--import=")):
            out.append(w.partition("=")[2])
    return out


def check_node_options(env: Mapping[str, str], cwd: Path, intercepted: bool = False) -> list[Finding]:
    """NODE_OPTIONS preloads a proxy setup: Node's fetch and http/https ignore HTTP(S)_PROXY."""
    value = env.get("NODE_OPTIONS", "")
    try:
        preloads = node_preloads(value)
    except ValueError:
        return [Finding("node", FAIL, f"NODE_OPTIONS={value} cannot be parsed: Node refuses to start", NODE_RECIPE)]
    if not preloads:
        what = f"NODE_OPTIONS={value} preloads nothing" if value else "NODE_OPTIONS is not set"
        if intercepted:
            return [Finding("node", WARN, f"{what}: Node's fetch ignores HTTP(S)_PROXY without it; here the "
                                          "transparent redirect catches its calls, as the workload identity",
                            UNSET_PROXY_FIX)]
        return [Finding("node", WARN, f"{what}: Node's fetch ignores HTTP(S)_PROXY without it, so a Node agent's "
                                      "calls go around Proctor", NODE_RECIPE)]
    out: list[Finding] = []
    for spec in preloads:
        if spec.startswith(("/", "./", "../", "file:")):
            path = Path(urllib.parse.urlsplit(spec).path if spec.startswith("file:") else spec)
            path = path if path.is_absolute() else cwd / path
            if not path.is_file():
                out.append(Finding("node", FAIL, f"NODE_OPTIONS preloads {spec}, which does not exist here: every "
                                                 "node process fails to start", NODE_RECIPE))
            else:
                out.append(Finding("node", OK, f"NODE_OPTIONS preloads {spec} (the live fetch below shows whether "
                                               "it routes through Proctor)"))
        else:
            out.append(Finding("node", OK, f"NODE_OPTIONS preloads the module {spec!r} (resolved by Node; the live "
                                           "fetch below shows whether it routes through Proctor)"))
    return out


def node_fetch(node: str, env: Mapping[str, str], url: str, cwd: Path, timeout: float = PROBE_TIMEOUT
               ) -> tuple[Probe, str | None, bool]:
    """(what Node's fetch got, Node's version, whether this Node has no fetch)."""
    try:
        done = subprocess.run([node, "-e", NODE_FETCH, url, str(int(timeout * 1000))], env=dict(env), cwd=str(cwd),
                              capture_output=True, text=True, timeout=timeout + NODE_STARTUP)
    except subprocess.TimeoutExpired:
        return Probe(url, error=f"node did not finish within {timeout + NODE_STARTUP:.0f}s"), None, False
    except OSError as e:
        return Probe(url, error=f"{node} cannot be run ({e.strerror or e})"), None, False
    line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("PROCTOR-DOCTOR-NODE ")), None)
    if line is None:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])[-600:]
        return Probe(url, error=f"node exited {done.returncode} before fetching: {_scrub(tail, env)}"), None, False
    try:
        out = json.loads(line.partition(" ")[2])
    except ValueError:
        return Probe(url, error="node printed an unreadable result"), None, False
    version = out.get("node") if isinstance(out.get("node"), str) else None
    if out.get("nofetch"):
        return Probe(url), version, True
    if "error" in out:
        error = f"{out['error']} ({out['cause']})" if out.get("cause") else str(out["error"])
        return Probe(url, error=_scrub(error, env)), version, False
    decision = out.get("decision") if isinstance(out.get("decision"), str) else None
    return Probe(url, int(out["status"]), decision,
                 _problem(str(out.get("content_type", "")), str(out.get("body", "")).encode())), version, False


def _node_path(fetched: Probe, has_vars: bool, direct: Probe | None, via: Probe | None) -> str:
    """Which way Node's request reached Proctor, from who it was decided as when the answers say."""
    if not has_vars:
        return "intercepted by the transparent redirect"
    if direct is None or not direct.intercepted:
        return "through the proxy variables"
    workload, proxied = direct.agent, via.agent if via is not None else None
    if fetched.agent is not None and fetched.agent == workload and proxied != workload:
        return f"intercepted by the transparent redirect, as the workload identity {workload}: it ignored the proxy " \
               "variables"
    if fetched.agent is not None and fetched.agent == proxied and proxied != workload:
        return f"through the proxy variables, as agent {proxied}"
    return "through the proxy variables or the transparent redirect (the answer does not say which)"


# undici's error when the proxy refuses the tunnel: the status only, not the answer.
UNDICI_TUNNEL_REFUSED = re.compile(r"Proxy response \((\d{3})\) !== 200")


def judge_node(fetched: Probe, version: str | None, no_fetch: bool, *, has_vars: bool, direct: Probe | None = None,
               via: Probe | None = None, preloaded: bool = True) -> Finding:
    node = f"Node {version}" if version else "Node"
    where = f"{node}'s fetch GET {fetched.url}"
    if no_fetch:
        return Finding("node", SKIP, f"{node} has no built-in fetch: the live Node check is skipped")
    if fetched.addressed_proctor:
        return Finding("node", WARN, f"{where} {fetched.answer()} from a Proctor listener asking for credentials: "
                                     "the URL is Proctor's own address", "give --url a connector host, not Proctor's")
    if fetched.decision_id is not None and TRANSPARENT_PROXY_CREDENTIALS in fetched.reasons:
        return Finding("node", FAIL, f"{where} {fetched.answer()}: its proxy connection is redirected to Proctor's "
                                     "transparent listener, which refuses proxy requests "
                                     "(transparent-proxy-credentials)", UNSET_PROXY_FIX)
    if fetched.decision_id is not None:
        path = _node_path(fetched, has_vars, direct, via)
        return Finding("node", OK, f"{where} {fetched.answer()} ({path}; Proctor decided it)")
    tunnel = UNDICI_TUNNEL_REFUSED.search(fetched.error or "")
    if tunnel is not None:
        status = int(tunnel.group(1))
        if via is not None and via.connect and via.decision_id is not None and via.status == status:
            if via.auth_refused:
                return Finding("node", FAIL, f"{where}: the proxy refused its tunnel with {status}: Proctor refused the "
                                             "proxy credentials, as in the round trip above", TOKEN_FIX)
            return Finding("node", OK, f"{where}: through the proxy variables; Proctor refused the tunnel with {status}, "
                                       "as in the round trip above (it decided it)")
        return Finding("node", FAIL, f"{where}: the proxy refused its tunnel with {status} ({fetched.error})",
                       "point the proxy variables at Proctor's agent listener (default 127.0.0.1:8080) with a valid "
                       "token: " + TOKEN_FIX)
    if fetched.error is not None:
        fix = NODE_RECIPE if has_vars else BYPASS_FIX
        if has_vars and not preloaded:
            fix = EXPORT_FIX.format(var="NODE_EXTRA_CA_CERTS") if any(
                w in fetched.error for w in ("certificate", "CERT", "UNABLE_TO_VERIFY")) else NODE_RECIPE
            return Finding("node", FAIL, f"{where} failed: {fetched.error}: without a preload in NODE_OPTIONS, Node's "
                                         f"fetch ignores the proxy variables and went straight to {fetched.host}", fix)
        if any(w in fetched.error for w in ("certificate", "CERT", "UNABLE_TO_VERIFY")):
            fix = EXPORT_FIX.format(var="NODE_EXTRA_CA_CERTS")
        return Finding("node", FAIL, f"{where} failed: {fetched.error}", fix)
    if has_vars:
        return Finding("node", FAIL, f"{where} {fetched.answer()}: Node's fetch reached {fetched.host} around "
                                     "Proctor (it ignores HTTP(S)_PROXY without a preload)", NODE_RECIPE)
    return Finding("node", FAIL, f"{where} {fetched.answer()}: Node's fetch reached {fetched.host} around Proctor",
                   BYPASS_FIX)


def check_node(env: Mapping[str, str], node: str | None, url: str | None, *, has_vars: bool, cwd: Path,
               timeout: float = PROBE_TIMEOUT, direct: Probe | None = None, via: Probe | None = None) -> list[Finding]:
    """The Node.js checks, when the agent can run node (`node`: an explicit executable)."""
    exe = node if node is not None else shutil.which("node", path=env.get("PATH", os.defpath))
    if exe is None:
        return [Finding("node", SKIP, "node is not on PATH: the Node.js checks are skipped",
                        "pass --node /path/to/node if the agent runs Node from elsewhere")]
    if node is not None and not (os.path.isfile(node) and os.access(node, os.X_OK)):
        return [Finding("node", FAIL, f"--node {node} is not an executable file", "pass the path of the agent's node")]
    out = check_node_options(env, cwd, direct is not None and direct.intercepted) if has_vars else []
    try:
        preloaded = bool(node_preloads(env.get("NODE_OPTIONS", "")))
    except ValueError:
        preloaded = True  # reported above; node itself fails to start
    if url is not None:
        found = judge_node(*node_fetch(exe, env, url, cwd, timeout), has_vars=has_vars, direct=direct, via=via,
                           preloaded=preloaded)
        if found.status == FAIL and has_vars and not preloaded and node is None:
            # node merely on PATH, and nothing says the agent runs Node (no preload, no --node):
            # a Python or curl agent configured as documented must not fail on Node's account
            found = replace(found, status=WARN, message=found.message + " - if this agent runs Node, that is a "
                            "bypass (pass --node to make it a failure, --no-node to skip the Node checks)")
        out.append(found)
    return out


# ------------------------------------------------------------------ all together
def proctor_ca_cert(config: ProctorConfig) -> x509.Certificate | None:
    """The CA the proxy serves, from its config, without creating one (`proctor ca export`
    would create it; here a missing one only means it cannot be compared)."""
    return proctor_ca_lookup(config)[0]


COMPARE_BY_HAND = ("compare the file with `proctor ca export` run where Proctor runs (as Proctor's user, "
                   "with its config)")


def proctor_ca_lookup(config: ProctorConfig, config_given: bool = True) -> tuple[x509.Certificate | None, str]:
    """(the CA the proxy serves, or None and the fix for a CA variable that cannot be compared)."""
    from .ca import ca_cert_path, load_configured_ca

    if config.ca is not None:
        try:
            return load_configured_ca(config.ca).cert, ""
        except (OSError, ValueError) as e:
            return None, f"the config's ca: cannot be read here ({e}): {COMPARE_BY_HAND}"
    path = ca_cert_path(config.ca_dir)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes()), ""
    except FileNotFoundError:
        if not config_given:
            return None, (f"no Proctor CA in {config.ca_dir} (the embedded default's state directory, here): pass -c "
                          "with the proxy's config, in the directory it runs from, to compare")
        return None, (f"no Proctor CA in {config.ca_dir} yet (Proctor creates it when it first starts there): run "
                      "doctor where that state directory is, or " + COMPARE_BY_HAND)
    except OSError as e:
        # the agent must not read Proctor's state (a transparent sidecar keeps it from the agent's uid)
        return None, f"Proctor's CA {path} cannot be read here ({e.strerror or e}): {COMPARE_BY_HAND}"
    except ValueError:
        return None, f"{path} holds no PEM certificate: {COMPARE_BY_HAND}"


def connector_hosts_of(config: ProctorConfig) -> dict[str, list[str]]:
    from .connectors.manifest import load_manifests

    return {m.name: list(m.hosts) for m in load_manifests(config.connectors_dir)}


def diagnose(env: Mapping[str, str], connector_hosts: Mapping[str, list[str]], proctor_ca: x509.Certificate | None,
             url: str | None, *, transparent: bool = False, node: str | None = None, check_node_js: bool = True,
             cwd: Path | None = None, timeout: float = PROBE_TIMEOUT,
             direct_timeout: float = DIRECT_TIMEOUT, ca_unknown_fix: str = CA_UNKNOWN_FIX) -> list[Finding]:
    """Every check. `transparent`: transparent interception is expected (its absence is a
    failure even with proxy variables set); it is never assumed, only observed."""
    has_vars = has_proxy_vars(env)
    if url is not None:
        try:
            parts = urllib.parse.urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:
            valid = False
        if not valid:
            return [Finding("roundtrip", FAIL, f"--url {url!r} is not an http:// or https:// URL with a host",
                            "give --url a connector URL, e.g. https://erp.example.com/ping")]
    target = url or pick_target(connector_hosts)
    ctx = trust_context(env, proctor_ca)
    direct = probe(target, ctx, timeout=direct_timeout, proctor_ca=proctor_ca) if target else None
    intercepted = direct is not None and direct.intercepted
    if has_vars:
        findings = check_proxy_vars(env)
    elif intercepted:
        findings = [Finding("proxy", OK, "no proxy variable is set: none is needed, the network redirects this "
                                         "environment's connections to Proctor (transparent mode)")]
    else:
        findings = [Finding("proxy", FAIL, "no proxy variable is set and no transparent interception: every client "
                                           "connects directly, past Proctor", BYPASS_FIX)]
    path = env.get("PATH", os.defpath)
    absent = {var for var, exe in CA_CLIENT_EXE.items() if shutil.which(exe, path=path) is None}
    if node is not None and check_node_js:
        absent.discard("NODE_EXTRA_CA_CERTS")
    elif not check_node_js:
        absent.add("NODE_EXTRA_CA_CERTS")
    findings += check_no_proxy(env, connector_hosts, intercepted) + check_ca_vars(env, proctor_ca, frozenset(absent),
                                                                        ca_unknown_fix or CA_UNKNOWN_FIX)
    via: Probe | None = None
    if target is None or direct is None:
        findings.append(Finding("roundtrip", WARN, "no concrete connector host to try", "give one with --url"))
    else:
        chosen = proxy_for(env, urllib.parse.urlsplit(target).scheme) if has_vars else None
        if chosen is not None:
            via = probe(target, ctx, proxy=chosen[1], timeout=timeout)
            findings.append(judge_proxy_trip(env, chosen[0], chosen[1], via, direct))
        elif has_vars:
            scheme = urllib.parse.urlsplit(target).scheme
            findings.append(Finding("roundtrip", WARN if intercepted else FAIL,
                                    f"no proxy variable for {scheme}:// URLs, so {target} goes direct"
                                    + (" (and the transparent redirect sends it to Proctor)" if intercepted else ""),
                                    f"export {scheme}_proxy=http://<agent-id>:<jwt>@127.0.0.1:8080"))
        findings.append(judge_direct(direct, has_vars=has_vars, expect_transparent=transparent, via=via,
                                     via_var=chosen[0] if chosen else None, via_proxy=chosen[1] if chosen else None))
    if check_node_js:
        findings += check_node(env, node, target, has_vars=has_vars, cwd=cwd or Path.cwd(), timeout=timeout,
                               direct=direct, via=via)
    return findings


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.status == FAIL for f in findings) else 0


def render_text(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"[{f.status.upper():4}] {f.check}: {f.message}")
        if f.fix and f.status not in (OK, SKIP):
            lines.append(f"       fix: {f.fix}")
    fails = sum(f.status == FAIL for f in findings)
    lines.append("all good: traffic goes through Proctor" if not fails else f"{fails} problem(s) found")
    return "\n".join(lines)


def as_json(findings: list[Finding]) -> dict[str, Any]:
    return {"ok": exit_code(findings) == 0, "findings": [asdict(f) for f in findings]}


def environ() -> dict[str, str]:
    return dict(os.environ)
