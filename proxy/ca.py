"""Proctor's interception CA, kept in `<state_dir>/ca` in mitmproxy's certstore layout.

Created on first run with a Proctor name; `proctor ca export` prints or writes
the public certificate that agents trust (SSL_CERT_FILE, REQUESTS_CA_BUNDLE,
NODE_EXTRA_CA_CERTS). The private key never leaves the state directory.

Replicas of one deployment instead share a CA configured in `ca:` (files or
secrets): it is checked at startup (a CA, the key matches, in its validity
period) and copied into `<state_dir>/ca-configured` in the same layout, which
mitmproxy and the aiohttp gateway's listener read as they read a generated one.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mitmproxy import certs

from .config import CaConfig, ProctorConfig
from .keymaterial import KeyMaterialError, PemSource, load_private_key, write_private

log = logging.getLogger("proctor.ca")

BASENAME = "mitmproxy"  # mitmproxy's TlsConfig looks for <confdir>/mitmproxy-ca.pem
CA_CN = "Proctor Interception CA"
KEY_SIZE = 2048
# A configured CA this close to its end is still used, with a warning at every start.
EXPIRY_WARNING = datetime.timedelta(days=30)


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


@dataclass(frozen=True)
class ConfiguredCa:
    """A checked CA from `ca:`: the signing certificate first, then any chain certificates."""

    certs: tuple[x509.Certificate, ...]
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)

    @property
    def cert(self) -> x509.Certificate:
        return self.certs[0]

    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.certs)

    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate, as `openssl x509 -fingerprint -sha256` prints it."""
        digest = hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
        return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _ca_sources(cfg: CaConfig) -> tuple[PemSource, PemSource]:
    cert = PemSource.of("ca", "cert", cfg.cert_file, cfg.cert_env)
    key = PemSource.of("ca", "key", cfg.key_file, cfg.key_env)
    assert cert is not None and key is not None  # CaConfig requires both
    return cert, key


def load_configured_ca(cfg: CaConfig, now: datetime.datetime | None = None) -> ConfiguredCa:
    """Read and check the configured CA; KeyMaterialError names what is wrong (never the key)."""
    cert_src, key_src = _ca_sources(cfg)
    raw = cert_src.read(secret=False)  # outside the try: its KeyMaterialError is a ValueError too
    try:
        chain = tuple(x509.load_pem_x509_certificates(raw))
    except ValueError:
        raise KeyMaterialError(f"{cert_src}: no readable PEM certificate in it") from None
    ca = chain[0]
    try:
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise KeyMaterialError(
            f"{cert_src}: {ca.subject.rfc4514_string()} is not a CA certificate (it needs basicConstraints CA:TRUE); "
            "interception certificates can only be issued by a CA agents trust"
        )
    try:
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise KeyMaterialError(f"{cert_src}: the CA certificate's keyUsage lacks keyCertSign")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if ca.not_valid_after_utc <= now:
        raise KeyMaterialError(f"{cert_src}: the CA certificate expired on {ca.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if ca.not_valid_before_utc > now:
        raise KeyMaterialError(
            f"{cert_src}: the CA certificate is not valid before {ca.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    key = load_private_key(key_src)
    # mitmproxy signs leaf certificates with SHA-256 and gives them the CA's public key
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise KeyMaterialError(f"{key_src}: the CA key must be RSA or EC (got {type(key).__name__})")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise KeyMaterialError(f"{key_src}: an RSA CA key needs at least 2048 bits (this one has {key.key_size})")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != ca.public_key().public_bytes(*spki):
        raise KeyMaterialError(f"{key_src}: the key does not match the CA certificate in {cert_src}")
    if ca.not_valid_after_utc - now < EXPIRY_WARNING:
        log.warning("the interception CA in %s expires on %s UTC; agents will refuse it after that",
                    cert_src, f"{ca.not_valid_after_utc:%Y-%m-%d %H:%M}")
    return ConfiguredCa(chain, key)


def write_confdir(material: ConfiguredCa, ca_dir: Path) -> Path:
    """Lay `material` out as mitmproxy's confdir (key + certificates 0600, public certificate);
    return the public certificate's path."""
    ca_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(ca_dir, 0o700)
    key_pem = material.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(ca_dir / f"{BASENAME}-ca.pem", key_pem + material.cert_pem(), 0o600)
    write_private(ca_dir / f"{BASENAME}-ca-cert.pem", material.cert_pem(), 0o644)
    dhparam = ca_dir / f"{BASENAME}-dhparam.pem"
    if not dhparam.exists():  # mitmproxy would write it itself, but not atomically
        write_private(dhparam, certs.DEFAULT_DHPARAM, 0o644)
    return ca_cert_path(ca_dir)


def prepare_ca(config: ProctorConfig) -> Path:
    """Make `config.ca_dir` ready for the engines (at startup); return the public certificate's path."""
    if config.ca is None:
        return ensure_ca(config.ca_dir)
    material = load_configured_ca(config.ca)
    path = write_confdir(material, config.ca_dir)
    cert_src, _ = _ca_sources(config.ca)
    log.info("interception CA from %s: %s, SHA-256 %s, valid until %s UTC", cert_src,
             material.cert.subject.rfc4514_string(), material.fingerprint(),
             f"{material.cert.not_valid_after_utc:%Y-%m-%d %H:%M}")
    return path


def export_ca_pem(config: ProctorConfig) -> bytes:
    """The certificate agents must trust: the configured CA (checked, and nothing written), or
    the generated one (created if missing)."""
    if config.ca is not None:
        return load_configured_ca(config.ca).cert_pem()
    return ensure_ca(config.ca_dir).read_bytes()
