"""Reverse (gateway) mode routing: listen host + path prefix -> upstream base URL."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import Route
from ..core.hosts import HostRejected, canonical_host


@dataclass(frozen=True, slots=True)
class RouteTarget:
    scheme: str
    host: str
    port: int
    path: str  # the upstream path (base path + remainder), raw
    route_prefix: str


@dataclass(frozen=True)
class _Compiled:
    host: str | None
    prefix: str
    scheme: str
    up_host: str
    up_port: int
    base_path: str


class GatewayRouter:
    def __init__(self, routes: list[Route]) -> None:
        compiled = []
        for r in routes:
            u = urlsplit(r.upstream)
            if not u.hostname:
                raise ValueError(f"route {r.prefix}: upstream {r.upstream!r} has no host")
            port = u.port or (443 if u.scheme == "https" else 80)
            compiled.append(
                _Compiled(
                    host=canonical_host(r.host) if r.host else None,
                    prefix=r.prefix.rstrip("/") or "",
                    scheme=u.scheme,
                    up_host=u.hostname,
                    up_port=port,
                    base_path=u.path.rstrip("/"),
                )
            )
        # Longest prefix first; host-specific routes before host-agnostic ones.
        compiled.sort(key=lambda c: (c.host is not None, len(c.prefix)), reverse=True)
        self._routes = compiled

    def route(self, host_header: str | None, path: str) -> RouteTarget | None:
        host = (host_header or "").strip()
        if host.startswith("["):
            host = host[1 : host.find("]")]
        else:
            host = host.split(":")[0]
        try:  # SVC.internal. is svc.internal (core/hosts.py); an invalid host matches no host route
            host = canonical_host(host) if host else ""
        except HostRejected:
            host = ""
        for c in self._routes:
            if c.host is not None and c.host != host:
                continue
            if c.prefix and not (path == c.prefix or path.startswith(c.prefix + "/")):
                continue
            remainder = path[len(c.prefix) :] or "/"
            return RouteTarget(c.scheme, c.up_host, c.up_port, c.base_path + remainder, c.prefix or "/")
        return None
