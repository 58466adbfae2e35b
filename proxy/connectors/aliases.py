"""Is a generic-egress host really a connector's upstream under another name?

Canonical spelling (core/hosts.py) folds every *syntactic* alias of a host.
A *semantic* alias is another name or address that reaches the same listener:
`localhost` or `127.0.0.2` for a connector on `127.0.0.1`, a DNS name that
resolves to the connector's address. With `egress.default: generic` (or a
matching `unclassified_hosts` pattern) such a request would be judged as a
generic `http.request` and reach the connector's upstream around its policies.

So before a request is decided as generic egress, its host is resolved and its
addresses compared with the connectors' addresses (loopback addresses, and the
unspecified address, count as one: a server bound to 0.0.0.0 answers on all of
them; so does this host's own address, a pod IP, which reaches a server bound to
0.0.0.0 as well). A match is refused, naming the host the agent should use instead.

Proctor's own listeners (forward, control, gateway, transparent) are checked the same way:
generic egress to one of them (`http://localhost:<control port>/...`, a name resolving to
it) would reach Proctor from Proctor's own loopback address (where the control API trusts
its caller) around every policy. It is refused as a loop.

Resolution happens at decision time; a DNS answer that changes between the
decision and the dial (rebinding) is not covered (see docs/security.md).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..core.hosts import address_key, canonical_host, is_ip
from .classifier import split_host_pattern
from .manifest import ConnectorManifest

PROCTOR = ""  # the connector name Proctor's own listeners are recorded under (no manifest has it)
RESOLVE_TTL_SECONDS = 30.0
RESOLVE_TIMEOUT_SECONDS = 5.0


LOOPBACK = "loopback"  # address_key of loopback and unspecified addresses


def _this_hosts(ip: str) -> bool:
    """Is `ip` one of this host's (network namespace's) own addresses? A UDP connect sends
    nothing: it makes the kernel pick a source address, which for a local destination is the
    destination itself (unlike a bind test, not fooled by ip_nonlocal_bind)."""
    try:
        addr = ipaddress.ip_address(ip)
        with socket.socket(socket.AF_INET6 if addr.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            return ipaddress.ip_address(str(s.getsockname()[0]).split("%")[0]) == addr
    except (OSError, ValueError):
        return False


class AliasUnresolvable(Exception):
    """The host could not be resolved (refused: its addresses cannot be checked)."""


@dataclass(frozen=True, slots=True)
class _ConnectorAddress:
    connector: str
    host: str  # canonical host of the pattern
    port: int | None


@dataclass(frozen=True, slots=True)
class Alias:
    connector: str
    host: str  # the connector host the agent should address instead
    port: int | None


def own_listeners(config: Any) -> list[tuple[str, int]]:
    """(host, port) of every listener of Proctor's (from its config)."""
    out = [(config.listen.host, config.listen.port)]
    if config.control.enabled:
        out.append((config.control.listen.host, config.control.listen.port))
    if config.gateway.enabled:
        out.append((config.gateway.listen.host, config.gateway.listen.port))
    if config.transparent.enabled:
        out += [(h, config.transparent.port) for h in config.transparent.hosts]
    return out


class ConnectorAliases:
    def __init__(self, manifests: list[ConnectorManifest], own: Iterable[tuple[str, int]] = ()) -> None:
        # Proctor's own listeners first: an alias of one of them is a loop, whatever else it is
        self._targets: list[_ConnectorAddress] = [_ConnectorAddress(PROCTOR, canonical_host(h), p) for h, p in own]
        for m in manifests:
            for pattern in m.hosts:
                host, port = split_host_pattern(pattern)
                if "*" in host:
                    continue  # a glob names no address
                self._targets.append(_ConnectorAddress(m.name, canonical_host(host), port))
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    async def _addresses(self, host: str) -> frozenset[str]:
        if is_ip(host):
            return frozenset({address_key(host)})
        now = time.monotonic()
        hit = self._cache.get(host)
        if hit is not None and hit[0] > now:
            if not hit[1]:
                raise AliasUnresolvable(f"{host} could not be resolved")
            return hit[1]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS
            )
        except (OSError, asyncio.TimeoutError) as e:
            self._remember(host, now, frozenset())  # negative answers are cached too (no retry storm)
            raise AliasUnresolvable(f"{host} could not be resolved ({type(e).__name__})") from None
        keys = frozenset(address_key(str(info[4][0]).split("%")[0]) for info in infos)
        self._remember(host, now, keys)
        return keys

    def _remember(self, host: str, now: float, keys: frozenset[str]) -> None:
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[host] = (now + RESOLVE_TTL_SECONDS, keys)

    async def alias_of(self, host: str, port: int) -> Alias | None:
        """The connector whose upstream `host:port` reaches, if any."""
        candidates = [t for t in self._targets if t.port is None or t.port == port]
        if not candidates:
            return None
        mine = await self._addresses(host)
        local: bool | None = None  # does `host` name this host by one of its other addresses?
        for target in candidates:
            try:
                theirs = await self._addresses(target.host)
            except AliasUnresolvable:
                continue  # a connector host that does not resolve cannot be reached through it either
            if mine & theirs:
                return Alias(target.connector, target.host, target.port)
            if LOOPBACK in theirs:
                # a listener on loopback or on every address (0.0.0.0: a container's usual choice)
                # may answer on this host's own address too (a pod IP): the same listener
                if local is None:
                    local = any(_this_hosts(k) for k in mine if k != LOOPBACK)
                if local:
                    return Alias(target.connector, target.host, target.port)
        return None
