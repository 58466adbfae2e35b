"""Proctor's interception CA, kept in `<state_dir>/ca` in mitmproxy's certstore layout.

Created on first run with a Proctor name; `proctor ca export` prints or writes
the public certificate that agents trust (SSL_CERT_FILE, REQUESTS_CA_BUNDLE,
NODE_EXTRA_CA_CERTS). The private key never leaves the state directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from mitmproxy import certs

BASENAME = "mitmproxy"  # mitmproxy's TlsConfig looks for <confdir>/mitmproxy-ca.pem
CA_CN = "Proctor Interception CA"
KEY_SIZE = 2048


def ensure_ca(ca_dir: Path) -> Path:
    """Create the CA if missing; return the path of its public certificate (PEM)."""
    ca_dir = Path(ca_dir)
    if not (ca_dir / f"{BASENAME}-ca.pem").exists():
        ca_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)
        certs.CertStore.create_store(ca_dir, BASENAME, KEY_SIZE, organization="Proctor", cn=CA_CN)
    return ca_cert_path(ca_dir)


def ca_cert_path(ca_dir: Path) -> Path:
    return Path(ca_dir) / f"{BASENAME}-ca-cert.pem"
