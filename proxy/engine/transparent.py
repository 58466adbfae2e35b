"""Transparent mode, the engine's part (docs/transparent.md).

The network redirects the agent's connections to the transparent listener;
mitmproxy recovers where each was going (SO_ORIGINAL_DST, mitmproxy's
proxy/mode_servers.py) and the adapter (engine/mitm.py) turns its requests into
`AgentRequest(mode="transparent")` whose target is what the request names
(core/target.py). What this module adds is the connection-level rules that
come before any request:

- a connection whose original destination is one of Proctor's own listeners
  (the transparent port addressed directly, or a redirect pointing back at
  Proctor) is refused, never looped;
- plain bytes redirected from a port that must carry TLS (`tls_ports`) are
  refused, never forwarded in the clear.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import ProctorConfig
from ..core.model import AgentIdentity
from ..core.net import normalise_ip


def _is_local_address(ip: str) -> bool:
    """Is `ip` an address of this network namespace? (loopback, any, or one we can bind)"""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback or addr.is_unspecified:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))  # only a local address can be bound (no IP_FREEBIND)
    except OSError:
        return False
    return True


@dataclass
class TransparentGuard:
    """What the adapter checks on a redirected connection before reading a request from it."""

    own_ports: frozenset[int]  # every port a Proctor listener is bound to
    tls_ports: frozenset[int]
    # the workload identity while it is usable (connection refusals are attributed to it)
    workload_identity: Callable[[], AgentIdentity | None] = lambda: None
    _local: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: ProctorConfig,
                    workload_identity: Callable[[], AgentIdentity | None] | None = None) -> "TransparentGuard":
        ports = {config.listen.port, config.transparent.port}
        if config.gateway.enabled:
            ports.add(config.gateway.listen.port)
        if config.control.enabled:
            ports.add(config.control.listen.port)
        guard = cls(frozenset(ports), frozenset(config.transparent.tls_ports))
        if workload_identity is not None:
            guard.workload_identity = workload_identity
        return guard

    def is_local(self, ip: str) -> bool:
        ip = normalise_ip(ip)
        known = self._local.get(ip)
        if known is None:
            if len(self._local) > 1024:
                self._local.clear()
            known = self._local[ip] = _is_local_address(ip)
        return known

    def loops(self, destination: tuple[str, int] | None) -> bool:
        """Was this connection addressed to Proctor itself (one of its ports on a local address)?"""
        if destination is None:
            return True  # no original destination: nothing to send it to
        ip, port = destination[0], destination[1]
        return port in self.own_ports and self.is_local(ip)

    def needs_tls(self, destination: tuple[str, int] | None) -> bool:
        return destination is not None and destination[1] in self.tls_ports
