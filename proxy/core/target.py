"""Does a forward-proxied request agree with itself about where it is going?

The decision is made for `req.host:req.port` (the proxy target, from the
absolute-form URL or the CONNECT line). An upstream, however, may route by the
request line's authority (RFC 9112 §3.2.2: an absolute-form target wins over
Host), by the Host header, or by SNI. If any of them names somewhere else, the
upstream could act on a different host than the one Proctor decided for, so
the request is refused (421) instead of being forwarded.

Header values carrying CR, LF or NUL are refused too: a lenient upstream could
read them as extra header lines (request smuggling past the decision).

In transparent mode (a connection redirected by the network) the target is what
the request names (`transparent_target`: Host, else the absolute-form authority,
else SNI), never the address the connection was redirected from; the same checks
then apply, and the named port must be the one the agent connected to.
"""

from __future__ import annotations

import re

from .hosts import HostRejected, canonical_host
from .model import AgentRequest, Refusal
from .overrides import OVERRIDE_HEADERS, ROUTING_HEADERS, override_in, query_names

DEFAULT_PORTS = {"http": 80, "https": 443}


def canonicalise_target(req: AgentRequest) -> Refusal | None:
    """Rewrite `req.host` to its canonical spelling (core/hosts.py), or refuse an invalid host.

    Everything after this (connector matching, policy, the dial, the Host header
    Proctor forwards) uses the canonical host, so no alias reaches a connector's
    upstream around the connector's policies."""
    try:
        req.host = canonical_host(req.host)
    except HostRejected as e:
        return Refusal(400, "Invalid host", f"{e}; the request was not forwarded", kind="request")
    return None


def split_authority(value: str, scheme: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port' -> (canonical host, port or None); raises HostRejected."""
    host, port = _split_raw(value)
    if host.startswith("["):  # an unterminated IPv6 literal: names no target (as written)
        return host, port
    return canonical_host(host), port


def _split_raw(value: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port' -> (host as written, port or None; -1 for an invalid port)."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value.lower(), None
        host, rest = value[1:end], value[end + 1 :]
    elif value.count(":") == 1:
        host, _, rest = value.partition(":")
        rest = ":" + rest
    else:
        host, rest = value, ""
    port: int | None = None
    if rest.startswith(":"):
        digits = rest[1:]
        port = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 5 else -1
    elif rest:
        port = -1
    return host, port


def transparent_target(host_header: str | None, request_authority: str, sni: str | None, scheme: str,
                       original: tuple[str, int]) -> tuple[str, int]:
    """Transparent mode: where a redirected request goes is what it names, never the address its
    connection was redirected from (docs/transparent.md, "Where a request goes").

    The Host header, else the absolute-form authority, else the TLS SNI (on the connection's
    port); the port defaults to the scheme's. A request that names nothing keeps the original
    destination, and `check_target` refuses it. The host is returned as written:
    `canonicalise_target` canonicalises it (or refuses it), and `check_target` refuses a
    request whose names disagree with each other or with the connection's port."""
    for value in (host_header, request_authority):
        if value is not None and value.strip():
            host, port = _split_raw(value)
            return host, DEFAULT_PORTS.get(scheme, original[1]) if port is None else port
    if sni:
        return sni, original[1]
    return original


def _check_transparent(req: AgentRequest) -> Refusal | None:
    """What a redirected request names must be a destination, on the port its connection was made to."""
    if req.host_header is None and req.http_version == "HTTP/1.1":
        return Refusal(400, "Host header required",
                       "an HTTP/1.1 request must carry a Host header; in transparent mode Proctor sends a request "
                       "to the host it names, never to the address its connection was redirected from",
                       kind="request")
    if req.host_header is None and not req.request_authority and not req.tls_sni:
        return Refusal(400, "Destination not named",
                       "the request names no host (no Host header, no absolute-form target, no TLS SNI); in "
                       "transparent mode Proctor sends a request to the host it names, never to the address its "
                       "connection was redirected from", kind="request")
    if not 0 < req.port <= 65535:
        return Refusal(400, "Invalid host", "the Host header names an invalid port; the request was not forwarded",
                       kind="request")
    original = req.original_destination
    if original is not None and original[1] != req.port:
        return Refusal(
            421, "Misdirected request",
            f"the request names {req.host}:{req.port} but its connection was made to port {original[1]}; "
            "Proctor sends the request where it names, so the port must be the one connected to "
            "(an HTTP proxy configured in the agent? in transparent mode none is needed)",
            kind="request")
    return None


def _misdirected(what: str, value: str, req: AgentRequest) -> Refusal:
    return Refusal(
        421,
        "Misdirected request",
        f"the {what} ({value}) does not match the request target ({req.host}:{req.port})",
        kind="request",
    )


# Headers whose repetition makes the request ambiguous between Proctor and the
# upstream (which copy wins differs between servers).
SINGLE_VALUED = ("content-type", "content-encoding", "transfer-encoding", "host")
METHOD_OVERRIDE_HEADERS = OVERRIDE_HEADERS
# Headers Proctor reads or that decide what the upstream does: a variant spelled
# with "_" (X_HTTP_METHOD_OVERRIDE, Content_Type) is the same header to CGI-style
# servers (Rack, Puma, PHP), so it is refused rather than passed unseen.
_UNDERSCORE_SENSITIVE = frozenset(
    {*OVERRIDE_HEADERS, *ROUTING_HEADERS, *SINGLE_VALUED, "x-forwarded-for", "content-length", "authorization",
     "proxy-authorization", "cookie", "idempotency-key"}
)


# A method as policies and connectors match it: `get` is not `GET` to every server, so
# only the upper-case spelling policy judged is forwarded (RFC 9110 methods are case-sensitive).
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}")
# The request target as it goes upstream: printable ASCII only (anything else must be
# percent-encoded; raw bytes are read differently by different servers), and no "#":
# a fragment is never sent to a server, and servers that drop it would act on
# another resource than the one policy judged (/items/42#x is Item "42#x" to policy).
_TARGET_CHARS = re.compile(r"[\x21-\x22\x24-\x7e]*")
# Connection options that name no end-to-end header (RFC 9110 §7.6.1). Any other
# name in Connection asks the next hop to drop that header, which policy read.
_CONNECTION_OPTIONS = frozenset({"close", "keep-alive", "upgrade", "te", "trailer", "proxy-connection",
                                 "proxy-authorization"})


def check_request_line(req: AgentRequest) -> Refusal | None:
    """The request line: an HTTP/1.x version, an upper-case method, a printable-ASCII target;
    in gateway mode origin-form only, and Host present in HTTP/1.1 (RFC 9112 §3.2)."""
    if req.http_version not in ("HTTP/1.0", "HTTP/1.1"):
        if req.http_version.startswith("HTTP/0."):
            return Refusal(400, "Bad request", "the request line has no HTTP/1.x version", kind="request")
        return Refusal(505, "HTTP version not supported",
                       "only HTTP/1.0 and HTTP/1.1 request lines are accepted here", kind="request")
    if not _METHOD.fullmatch(req.method):
        return Refusal(400, "Method not accepted",
                       "the method must be an upper-case token (GET, POST, ...): policy judges methods by their "
                       "upper-case name, and servers may read another spelling differently", kind="request")
    if not _TARGET_CHARS.fullmatch(req.path) or not _TARGET_CHARS.fullmatch(req.query):
        return Refusal(400, "Request target refused",
                       "the request target contains a '#' or bytes other than printable ASCII; percent-encode them "
                       "(a fragment is never sent to a server)", kind="request")
    if req.mode == "reverse":
        if req.request_authority:
            return Refusal(400, "Absolute-form request refused",
                           "the gateway routes by Host and path; send the request line in origin form (GET /path)",
                           kind="request")
        if req.http_version == "HTTP/1.1" and "host" not in req.headers:
            return Refusal(400, "Host header required", "an HTTP/1.1 request must carry a Host header",
                           kind="request")
    return None


# Ports that carry TLS (HTTPS): plain HTTP is never sent to them (transparent.tls_ports adds more).
TLS_PORTS = frozenset({443})


def plain_http_to_tls_port(req: AgentRequest, tls_ports: frozenset[int] = TLS_PORTS) -> Refusal | None:
    """`http://host:443/...` (forward-proxied, or plain HTTP inside a CONNECT tunnel to :443): the
    request, and the credential Proctor would inject into it, would cross the network in the
    clear to a server that expects TLS. Refused; the agent means https://."""
    if req.mode == "reverse" or req.scheme != "http" or req.port not in (tls_ports | TLS_PORTS):
        return None
    return Refusal(400, "Plain HTTP to a TLS port refused",
                   f"the request is plain HTTP to port {req.port}, which carries TLS; Proctor never sends a request "
                   f"(or an upstream credential) there in the clear: use https://{req.host}:{req.port}/ "
                   "(or https:// with the default port)", reasons=["plain-http-to-tls-port"], kind="request")


def check_target(req: AgentRequest, policy_headers: frozenset[str] = frozenset(),
                 tls_ports: frozenset[int] = TLS_PORTS) -> Refusal | None:
    """Refusals for a request whose framing, headers or target could be read two ways.
    `policy_headers`: headers policies read (limits.context_headers), guarded like the built-in ones.
    `tls_ports`: ports plain HTTP is never sent to (443 always)."""
    line = check_request_line(req)
    if line is not None:
        return line
    connection = req.headers.get("connection")
    if connection:
        named = {t.strip().lower() for t in connection.split(",")} - _CONNECTION_OPTIONS
        dropped = sorted(n for n in named if n in req.headers)
        if dropped:
            return Refusal(400, "Ambiguous request",
                           f"the Connection header asks the next hop to drop {', '.join(dropped)[:200]}, which policy read; "
                           "the upstream would not receive what was judged: send Connection: keep-alive or close",
                           kind="request")
    if req.header_problem:
        return Refusal(400, "Malformed header", req.header_problem, kind="request")
    for name in SINGLE_VALUED:
        if name in req.repeated_headers:
            return Refusal(400, "Ambiguous request", f"the {name} header appears more than once", kind="request")
    encoding = req.headers.get("content-encoding", "identity").strip().lower()
    if req.body and encoding not in ("", "identity"):
        return Refusal(
            415,
            "Encoded request body refused",
            # (the header's value is not quoted: refusals never echo request header values)
            "request bodies with a Content-Encoding other than identity cannot be inspected by policy; "
            "send them unencoded",
            kind="request",
        )
    transfer = req.headers.get("transfer-encoding")
    if transfer is not None and transfer.strip().lower() != "chunked":
        return Refusal(
            415,
            "Transfer-Encoding refused",
            "a Transfer-Encoding other than 'chunked' is not accepted: an upstream could decode the body into "
            "something policy did not see; send the body unencoded",
            kind="request",
        )
    for name in METHOD_OVERRIDE_HEADERS:
        if name in req.headers:
            return Refusal(
                400,
                "Method override refused",
                f"the {name} header asks the server to use another method than {req.method}, which policy judged; "
                "send the request with its real method",
                kind="request",
            )
    for name in req.headers:
        if "_" in name:
            dashed = name.replace("_", "-")
            if dashed in _UNDERSCORE_SENSITIVE or dashed in policy_headers or dashed in req.headers:
                return Refusal(
                    400,
                    "Ambiguous header",
                    f"the header {name} is {dashed} to servers that read '_' as '-' (Rack, Puma, PHP); "
                    f"send {dashed} itself",
                    kind="request",
                )
    if req.query:
        override = override_in(query_names(req.query))
        if override is not None:
            return Refusal(
                400,
                "Method override refused",
                f"a query parameter ({override[:40]!r}) asks the server to use another method than {req.method}, "
                "which policy judged; send the request with its real method",
                kind="request",
            )
    if req.mode == "reverse":
        return None  # the gateway router re-targets every request itself
    if req.mode == "transparent":
        redirected = _check_transparent(req)
        if redirected is not None:
            return redirected
    cleartext = plain_http_to_tls_port(req, tls_ports)
    if cleartext is not None:
        return cleartext
    target = req.host
    default_port = DEFAULT_PORTS.get(req.scheme)

    def agrees(value: str) -> bool:
        host, port = split_authority(value, req.scheme)
        return host == target and (port if port is not None else default_port) == req.port

    try:
        if req.request_authority and not agrees(req.request_authority):
            return _misdirected("request-line authority", req.request_authority, req)
        if req.host_header is not None:
            if not req.host_header.strip():
                return Refusal(400, "Empty Host header", "the Host header is present but empty", kind="request")
            if not agrees(req.host_header):
                return _misdirected("Host header", req.host_header, req)
        if req.tls_sni and canonical_host(req.tls_sni) != target:
            return _misdirected("TLS SNI", req.tls_sni, req)
    except HostRejected:
        return Refusal(400, "Invalid host", "the Host header, request-line authority or TLS SNI names an invalid host; "
                       "the request was not forwarded", kind="request")
    return None
