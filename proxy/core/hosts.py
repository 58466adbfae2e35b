"""One spelling per host: the canonical form connectors match and Proctor dials.

An upstream host can be written many ways that all reach the same machine:
`127.0.0.1`, `127.1`, `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`, `127.000.000.001`,
`::ffff:127.0.0.1`, `ERP.example.com.`, `ｅｒｐ.example.com`. If connector
matching compared spellings, an alias would fall through to generic egress (and
its broad `http.request` permit) and reach the connector's upstream around the
connector's policies. So every host is canonicalised first, the connector is
matched on the canonical form, and the canonical form is what Proctor dials and
names in the Host header: what policy judged is what is reached.

- IPv4 in any form a resolver or URL parser accepts (WHATWG URL / inet_aton:
  1 to 4 parts, decimal, octal with a leading 0, hex with 0x) -> dotted quad;
  a name whose last label is numeric but not a valid address is refused.
- IPv6 -> compressed form; IPv4-mapped (`::ffff:a.b.c.d`) -> the IPv4 address;
  zone ids (`%eth0`) are refused.
- Names: IDNA (UTS #46 mapping, so full-width and upper-case letters fold) to
  lower-case ASCII, one trailing dot removed; anything that is not a valid DNS
  name (spaces, `%`, `@`, empty labels, over-long labels) is refused.
"""

from __future__ import annotations

import functools
import ipaddress
import re

import idna


class HostRejected(ValueError):
    """A host that is not a valid name or address (the message says why)."""


_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL_RE = re.compile(r"(0[xX][0-9a-fA-F]*|[0-9]+)")


def _ipv4_number(part: str) -> int:
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
        if digits == "":
            return 0
    elif len(part) > 1 and part.startswith("0"):
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    try:
        return int(digits, base)
    except ValueError:
        raise HostRejected(f"{part!r} is not a valid IPv4 address component") from None


def _parse_ipv4(host: str) -> str:
    """WHATWG URL IPv4 parsing (the forms browsers, curl and inet_aton accept)."""
    parts = host.split(".")
    if len(parts) > 4 or any(p == "" for p in parts):
        raise HostRejected(f"{host!r} looks like an IPv4 address but is not one")
    numbers = [_ipv4_number(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise HostRejected(f"{host!r} is out of range for an IPv4 address")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n * 256 ** (3 - i)
    return str(ipaddress.IPv4Address(value))


def _canonical_ipv6(text: str) -> str:
    if "%" in text:
        raise HostRejected("IPv6 zone identifiers are not accepted in a host")
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        raise HostRejected(f"{text!r} is not a valid IPv6 address") from None
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


# A DNS name is at most 253 characters (255 leaves room for a trailing dot and
# brackets); longer input is refused before the cache, so an unauthenticated
# client cannot fill the cache with 64 KiB Host headers.
MAX_HOST_LENGTH = 255


def canonical_host(host: str) -> str:
    """The canonical spelling of `host` (no brackets, no port); raises HostRejected."""
    if len(host) > MAX_HOST_LENGTH:
        raise HostRejected("the host is longer than 255 characters")
    return _canonical_host(host)


@functools.lru_cache(maxsize=8192)
def _canonical_host(host: str) -> str:
    if not host:
        raise HostRejected("the host is empty")
    if host.startswith("[") and host.endswith("]"):
        return _canonical_ipv6(host[1:-1])
    if ":" in host:
        return _canonical_ipv6(host)
    name = host[:-1] if host.endswith(".") else host
    if not name:
        raise HostRejected("the host is empty")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise HostRejected(f"{host!r} is not a valid internationalised domain name") from None
    name = name.lower()
    last = name.rsplit(".", 1)[-1]
    if _NUMERIC_LABEL_RE.fullmatch(last):
        return _parse_ipv4(name)
    if len(name) > 253:
        raise HostRejected("the host name is longer than 253 characters")
    for label in name.split("."):
        if not _LABEL_RE.fullmatch(label):
            raise HostRejected(f"{host!r} is not a valid host name")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError):
                raise HostRejected(f"{host!r} has an invalid IDNA label") from None
    return name


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def authority(host: str, port: int, scheme: str) -> str:
    """host[:port] for a Host header (brackets for IPv6, default port omitted)."""
    h = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}.get(scheme)
    return h if port == default else f"{h}:{port}"


# Addresses that all reach this machine: a server bound to 0.0.0.0 answers on
# any of them, so for alias detection they are one address.
_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")


def address_key(ip: str) -> str:
    """The key two addresses share when they reach the same listener (loopback folds)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified or addr.is_loopback or (isinstance(addr, ipaddress.IPv4Address) and addr in _LOOPBACK_V4):
        return "loopback"
    return str(addr)
