"""The control API's public base URL: what status URLs, `Location` headers and console links name.

A listen address is where the process binds, not where anyone can reach it: behind a
Kubernetes Service or an ingress the two differ, and a wildcard bind (`0.0.0.0`, `::`)
is no address at all. `control.public_url` says where agents, approvers and webhook
receivers reach the control API; without it a concrete listen host is used as is, and a
wildcard one falls back to loopback (a guess the server warns about at startup).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit, urlunsplit


def check_public_url(value: str) -> str:
    """Validate `control.public_url`; return it without a trailing slash.

    Only http(s) with a host; no userinfo (credentials would be handed to every agent in a
    `Location`), no query or fragment (the paths Proctor appends would land inside them).
    """
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("control.public_url must not contain whitespace or control characters")
    if "?" in value or "#" in value:
        raise ValueError("control.public_url must not have a query or fragment")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError as e:
        raise ValueError(f"control.public_url is not a valid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("control.public_url must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("control.public_url must not carry a user name or password")
    if not parts.hostname:
        raise ValueError("control.public_url must name a host")
    if _is_wildcard(parts.hostname):
        raise ValueError(f"control.public_url names the wildcard address {parts.hostname}, which no client can reach")
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def control_base_url(listen_host: str, listen_port: int, public_url: str | None) -> tuple[str, bool]:
    """The control API's base URL and whether it is a loopback guess for a wildcard listen host."""
    if public_url:
        return public_url, False
    host = listen_host.strip("[]")
    guessed = _is_wildcard(host)
    if guessed:
        # asyncio binds "::" IPv6-only, so an IPv4 loopback would not reach it
        host = "::1" if ":" in host else "127.0.0.1"
    return f"http://{_bracketed(host)}:{listen_port}", guessed


def _is_wildcard(host: str) -> bool:
    if host == "":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
