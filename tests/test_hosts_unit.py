"""Canonical hosts (core/hosts.py) and connector matching on them (no processes)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.connectors.aliases import ConnectorAliases
from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import ConnectorManifest
from proxy.core.hosts import HostRejected, address_key, canonical_host

LOOPBACK_SPELLINGS = [
    "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0x7F.0x0.0x0.0x1", "0177.0.0.1",
    "0177.0.0.01", "127.000.000.001", "::ffff:127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:7f00:1", "127.0.0.1.",
]


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_every_ipv4_spelling_is_one_address(spelling):
    assert canonical_host(spelling) == "127.0.0.1"


@pytest.mark.parametrize(
    "spelling,canonical",
    [
        ("ERP.Example.COM", "erp.example.com"),
        ("erp.example.com.", "erp.example.com"),
        ("ｅｒｐ．example．com", "erp.example.com"),  # full-width letters and dots (UTS #46)
        ("Bücher.de", "xn--bcher-kva.de"),
        ("XN--BCHER-KVA.de", "xn--bcher-kva.de"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("2001:DB8::1", "2001:db8::1"),
    ],
)
def test_names_and_ipv6_fold(spelling, canonical):
    assert canonical_host(spelling) == canonical


@pytest.mark.parametrize(
    "bad",
    ["", ".", "a..b", "256.0.0.1", "1.2.3.4.5", "08.0.0.1", "foo.08", "fe80::1%eth0", "a b.com", "evil.com%2f",
     "x@y.com", "-a.com", "xn--zz.com", "a" * 64 + ".com", "1.2.3.4..", "[::1"],
)
def test_invalid_hosts_are_refused(bad):
    with pytest.raises(HostRejected):
        canonical_host(bad)


def manifest(hosts: list[str]) -> ConnectorManifest:
    return ConnectorManifest.model_validate(
        {"name": "erp", "hosts": hosts, "routes": [
            {"method": "GET", "path": "/po/{id}", "action": "erp.po.read", "resource": {"type": "Po", "id": "{id}"}}]}
    )


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_an_alias_of_a_connector_host_is_classified_as_that_connector(spelling):
    c = Classifier([manifest(["127.0.0.1:9103"])], generic_default=True)
    cls = c.classify("GET", spelling, 9103, "/po/1")
    assert cls is not None and cls.connector == "erp" and cls.action == "erp.po.read"


def test_patterns_are_canonical_too():
    c = Classifier([manifest(["[::ffff:7f00:1]:9103", "ERP.example.com."])], generic_default=True)
    assert c.classify("GET", "127.1", 9103, "/po/1").connector == "erp"
    assert c.classify("GET", "erp.EXAMPLE.com", 80, "/po/1").connector == "erp"


def test_manifest_with_an_invalid_host_pattern_is_refused():
    with pytest.raises(Exception, match="host pattern"):
        manifest(["erp example.com"])
    with pytest.raises(Exception, match="invalid port"):
        manifest(["erp.example.com:99999"])


def test_loopback_addresses_are_one_listener():
    assert {address_key(a) for a in ("127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", "::", "::ffff:127.0.0.5")} == {"loopback"}
    assert address_key("10.0.0.1") == "10.0.0.1"


def test_semantic_aliases_are_found():
    aliases = ConnectorAliases([manifest(["127.0.0.1:9103", "erp.invalid:8443"])])

    async def check(host, port):
        return await aliases.alias_of(host, port)

    found = asyncio.run(check("localhost", 9103))
    assert found is not None and found.connector == "erp" and (found.host, found.port) == ("127.0.0.1", 9103)
    assert asyncio.run(check("127.0.0.2", 9103)) is not None
    assert asyncio.run(check("::1", 9103)) is not None
    assert asyncio.run(check("127.0.0.1", 9104)) is None  # another port is another service
    assert asyncio.run(check("10.1.2.3", 9103)) is None


def test_overlong_hosts_are_refused_before_the_cache():
    from proxy.core.hosts import _canonical_host

    before = _canonical_host.cache_info().currsize
    for i in range(50):
        with pytest.raises(HostRejected, match="longer than 255"):
            canonical_host(f"{i}" + "a" * 60_000 + ".com")
    assert _canonical_host.cache_info().currsize == before
