"""Does a forward-proxied request agree with itself about where it is going?

The decision is made for `req.host:req.port` (the proxy target, from the
absolute-form URL or the CONNECT line). An upstream, however, may route by the
request line's authority (RFC 9112 §3.2.2: an absolute-form target wins over
Host), by the Host header, or by SNI. If any of them names somewhere else, the
upstream could act on a different host than the one Proctor decided for, so
the request is refused (421) instead of being forwarded.

Header values carrying CR, LF or NUL are refused too: a lenient upstream could
read them as extra header lines (request smuggling past the decision).
"""

from __future__ import annotations

from .model import AgentRequest, Refusal

DEFAULT_PORTS = {"http": 80, "https": 443}


def split_authority(value: str, scheme: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]:port' -> (lower-case host without trailing dot, port or None)."""
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
        try:
            port = int(rest[1:])
        except ValueError:
            port = -1
    return host.lower().rstrip("."), port


def _misdirected(what: str, value: str, req: AgentRequest) -> Refusal:
    return Refusal(
        421,
        "Misdirected request",
        f"the {what} ({value}) does not match the request target ({req.host}:{req.port})",
        kind="request",
    )


# Headers whose repetition makes the request ambiguous between Proctor and the
# upstream (which copy wins differs between servers).
SINGLE_VALUED = ("content-type", "content-encoding", "host")


def check_target(req: AgentRequest) -> Refusal | None:
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
    if req.mode != "forward":
        return None  # the gateway router re-targets every request itself
    target = req.host.lower().rstrip(".")
    default_port = DEFAULT_PORTS.get(req.scheme)

    def agrees(value: str) -> bool:
        host, port = split_authority(value, req.scheme)
        return host == target and (port if port is not None else default_port) == req.port

    if req.request_authority and not agrees(req.request_authority):
        return _misdirected("request-line authority", req.request_authority, req)
    if req.host_header is not None:
        if not req.host_header.strip():
            return Refusal(400, "Empty Host header", "the Host header is present but empty", kind="request")
        if not agrees(req.host_header):
            return _misdirected("Host header", req.host_header, req)
    if req.tls_sni and req.tls_sni.lower().rstrip(".") != target:
        return _misdirected("TLS SNI", req.tls_sni, req)
    return None
