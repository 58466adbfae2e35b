"""The embedded dev issuer: an ES256 key pair made on first run, for the default config.

Production deployments trust the enterprise IdP's JWKS instead; the dev issuer
can be disabled with `dev_issuer.enabled: false`.

With `dev_issuer.key_file` / `key_env` the key is configured instead (replicas
share it): each process publishes its JWKS from that key, under a key id derived
from the key (RFC 7638 thumbprint), so a token `proctor token issue` signs with
one replica's config verifies on every replica.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from ..config import DevIssuerConfig
from ..keymaterial import KeyMaterialError, PemSource, load_private_key, write_private

_TTL_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """'90s', '15m', '1h', '2d' or plain seconds -> seconds."""
    m = _TTL_RE.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 15m, 1h, 2d")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return seconds


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """`dev-` and the start of the key's RFC 7638 JWK thumbprint: the same on every replica."""
    jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    return f"dev-{thumbprint[:16]}"


def load_configured_key(source: PemSource) -> ec.EllipticCurvePrivateKey:
    key = load_private_key(source)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = f"EC {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey) else type(key).__name__
        raise KeyMaterialError(f"{source}: the dev issuer signs ES256 and needs an EC P-256 key (got {kind})")
    return key


class DevIssuer:
    def __init__(self, directory: Path, config: DevIssuerConfig) -> None:
        self.dir = Path(directory)
        self.config = config
        self.key_path = self.dir / "key.pem"
        self.jwks_path = self.dir / "jwks.json"
        self.source = PemSource.of("dev_issuer", "key", config.key_file, config.key_env)

    def _publish_configured(self, source: PemSource) -> tuple[ec.EllipticCurvePrivateKey, str]:
        """The configured key and its id; its JWKS written for the verifier (only when it changed)."""
        key = load_configured_key(source)
        kid = key_id(key.public_key())
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
        doc = json.dumps({"keys": [jwk]}, indent=2)
        try:
            current = self.jwks_path.read_text()
        except OSError:
            current = None
        if current != doc:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_private(self.jwks_path, doc.encode(), 0o644)
        return key, kid

    def ensure(self) -> None:
        """Create the key pair and JWKS on first run; later runs reuse them. With a configured
        key: check it and publish its JWKS (KeyMaterialError says what is wrong)."""
        if self.source is not None:
            self._publish_configured(self.source)
            return
        if self.key_path.exists() and self.jwks_path.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": f"dev-{uuid.uuid4().hex[:12]}", "use": "sig", "alg": "ES256"})
        tmp = self.jwks_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": [jwk]}, indent=2))
        tmp.replace(self.jwks_path)

    def _kid(self) -> str:
        return str(json.loads(self.jwks_path.read_text())["keys"][0]["kid"])

    def issue(
        self, agent_id: str, claims: dict[str, Any] | None = None, ttl: str | None = None, audience: str | None = None
    ) -> str:
        seconds = parse_ttl(ttl or self.config.default_ttl)
        if seconds > parse_ttl(self.config.max_ttl):
            raise ValueError(f"ttl exceeds the dev issuer's max_ttl ({self.config.max_ttl})")
        now = int(time.time())
        payload: dict[str, Any] = dict(claims or {})
        payload.update(
            {
                "iss": self.config.issuer,
                "aud": audience or self.config.audience,
                "sub": agent_id,
                "iat": now,
                "nbf": now,
                "exp": now + seconds,
                "jti": uuid.uuid4().hex,
            }
        )
        if self.source is not None:
            key, kid = self._publish_configured(self.source)
            return jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid})
        self.ensure()
        generated = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        assert isinstance(generated, ec.EllipticCurvePrivateKey)  # ensure() makes only P-256 keys
        return jwt.encode(payload, generated, algorithm="ES256", headers={"kid": self._kid()})
