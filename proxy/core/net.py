"""Client address normalisation (one spelling per address in records and policies)."""

from __future__ import annotations

import functools
import ipaddress


@functools.lru_cache(maxsize=4096)
def normalise_ip(ip: str) -> str:
    """An IPv4-mapped IPv6 address as IPv4, a zone id dropped; unparsable input as 0.0.0.0."""
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return "0.0.0.0"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    return str(addr)
