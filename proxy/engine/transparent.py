"""Transparent mode, the engine's part (docs/transparent.md).

The network redirects the agent's connections to the transparent listener;
mitmproxy recovers where each was going (SO_ORIGINAL_DST, mitmproxy's
proxy/mode_servers.py) and the adapter (engine/mitm.py) turns its requests into
`AgentRequest(mode="transparent")` whose target is what the request names
(core/target.py). What this module adds is the connection-level rules that
come before any request:

- a connection whose original destination is one of Proctor's own listeners
  (the transparent port addressed directly, or a redirect pointing back at
  Proctor) is refused, never looped; with one exception, the status address:
  the control API's port on a local address, which `proctor netsetup` redirects
  here for the agent, so that the status URL of its held request (approvals)
  is one it can GET. On that address exactly `GET /v1/approvals/{id}/status`
  (no body) is answered, for the workload identity's own approvals
  (approvals/agent_status.py); every other request there is refused 508;
- plain bytes redirected from a port that must carry TLS (`tls_ports`) are
  refused, never forwarded in the clear.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

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


# The one request answered at the status address: the control API's agent status route.
_STATUS_PATH = re.compile(r"/v1/approvals/([^/?#]+)/status")
# An approval id as the service makes them (approvals/service.py new_approval_id), with room to spare.
_APPROVAL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

# approval id -> (status, headers, body) for the workload identity (approvals/agent_status.py)
StatusAnswer = Callable[[str], Awaitable[tuple[int, dict[str, str], bytes]]]


def status_request(method: str, path: str) -> str | None:
    """The approval id of a `GET /v1/approvals/{id}/status` (query ignored, like the control
    API), else None. `path` is the request target as sent (origin form)."""
    if method != "GET":
        return None
    m = _STATUS_PATH.fullmatch(path.partition("?")[0])
    if m is None:
        return None
    approval_id = unquote(m.group(1))
    return approval_id if _APPROVAL_ID.fullmatch(approval_id) else None


@dataclass
class TransparentGuard:
    """What the adapter checks on a redirected connection before reading a request from it."""

    own_ports: frozenset[int]  # every port a Proctor listener is bound to
    tls_ports: frozenset[int]
    # the workload identity while it is usable (connection refusals are attributed to it)
    workload_identity: Callable[[], AgentIdentity | None] = lambda: None
    # The status address's port (the control API's: `proctor netsetup --status-port` redirects the
    # agent's connections to it on a local address here); None: no status address.
    status_port: int | None = None
    # The base of the status URLs a transparent hold names (the status address on loopback).
    status_base_url: str = ""
    # Answers a status request for the workload identity (None: approvals are off; refused 508).
    approval_status: StatusAnswer | None = None
    _local: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: ProctorConfig,
                    workload_identity: Callable[[], AgentIdentity | None] | None = None) -> "TransparentGuard":
        ports = {config.listen.port, config.transparent.port}
        if config.gateway.enabled:
            ports.add(config.gateway.listen.port)
        if config.control.enabled:
            ports.add(config.control.listen.port)
        status_port = config.control.listen.port
        # IPv4 loopback unless the transparent listener is on IPv6 only (where the redirect lands)
        v4 = any(ipaddress.ip_address(h).version == 4 for h in config.transparent.hosts)
        base = f"http://{'127.0.0.1' if v4 else '[::1]'}:{status_port}"
        guard = cls(frozenset(ports), frozenset(config.transparent.tls_ports), status_port=status_port,
                    status_base_url=base)
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

    def is_status_address(self, destination: tuple[str, int] | None) -> bool:
        """Was this connection addressed to the status address (the control port on a local address)?"""
        return (destination is not None and self.status_port is not None and destination[1] == self.status_port
                and self.is_local(destination[0]))

    def needs_tls(self, destination: tuple[str, int] | None) -> bool:
        return destination is not None and destination[1] in self.tls_ports
