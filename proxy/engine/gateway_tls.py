"""Server certificates for the aiohttp gateway listener, minted from Proctor's CA.

The gateway listener speaks TLS to a client that opens with a TLS handshake, as
the mitmproxy engine's does: the certificate names the SNI the client sent, or,
without SNI (a client connecting by IP address), the local address it connected
to, and is signed by the interception CA agents already trust (`proctor ca
export`). Certificates come from mitmproxy's certificate store over the same CA
directory (proxy/ca.py), so both engines present the same kind of certificate.

The leaf key is the CA's key, read from the CA file the store already keeps; only
the (public) leaf certificate passes through a temporary file, because Python's
`ssl` loads certificates from paths only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import tempfile
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from mitmproxy import certs

from ..ca import BASENAME, KEY_SIZE

log = logging.getLogger("proctor.engine.aiohttp")

# Distinct names (SNI values are the client's choice) with a ready context.
CACHE_SIZE = 256


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name.encode("idna").decode("ascii"))


class ListenerCertificates:
    def __init__(self, ca_dir: Path) -> None:
        self._store = certs.CertStore.from_store(ca_dir, BASENAME, KEY_SIZE)
        self._key_file = Path(ca_dir) / f"{BASENAME}-ca.pem"  # the CA key (and certificate), 0600
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def for_address(self, local_ip: str) -> ssl.SSLContext:
        """The context a connection to `local_ip` starts with (switched by SNI when the client sends one)."""
        return self._context(local_ip)

    def _context(self, name: str) -> ssl.SSLContext:
        name = name.lower().rstrip(".")
        ctx = self._contexts.get(name)
        if ctx is not None:
            self._contexts.move_to_end(name)
            return ctx
        entry = self._store.get_cert(name, [_general_name(name)], None)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])  # HTTP/1.1 only, like every Proctor listener
        chain = entry.cert.to_pem() + b"".join(c.to_pem() for c in entry.chain_certs if c != entry.cert)
        fd, path = tempfile.mkstemp(suffix=".pem")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(chain)
            ctx.load_cert_chain(path, self._key_file)
        finally:
            os.unlink(path)
        ctx.sni_callback = self._on_sni
        self._contexts[name] = ctx
        while len(self._contexts) > CACHE_SIZE:
            self._contexts.popitem(last=False)
        return ctx

    def _on_sni(self, sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if not server_name:
            return None  # keep the local address's certificate
        try:
            sslobj.context = self._context(server_name)
        except Exception as e:  # a name no certificate can carry: end the handshake
            log.debug("no certificate for SNI %r: %s", server_name[:100], e)
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None
