"""PEM key material from a configured file or environment variable.

Replicas of one deployment must present the same interception CA and, where the
dev issuer is used, sign with the same key, so that material comes from files or
secrets the platform mounts or injects rather than being generated in each
replica's state directory (proxy/ca.py, proxy/identity/dev_issuer.py).

Every message names the setting and the path or variable it read, never the
content: nothing read here is logged, echoed or put into an exception's text
(a parser's own error text is dropped too, as it may quote the input).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

log = logging.getLogger("proctor.keys")

PEM_MARKER = b"-----BEGIN "
# Secrets are small; a larger "key file" is a wrong path (a log, a bundle), not a key.
MAX_PEM_BYTES = 1 << 20


class KeyMaterialError(ValueError):
    """Configured key material that cannot be used. The message names the setting and
    the file or variable, never its content. A ValueError, so `proctor run` reports it
    as `cannot start: ...` and exits."""


@dataclass(frozen=True)
class PemSource:
    """Where one piece of PEM comes from: a file (`<section>.<what>_file`) or an
    environment variable (`<section>.<what>_env`)."""

    setting: str  # e.g. "ca.key_file": what the operator wrote in the config
    path: Path | None = None
    env: str | None = None

    @classmethod
    def of(cls, section: str, what: str, path: Path | None, env: str | None) -> PemSource | None:
        if path is not None:
            return cls(f"{section}.{what}_file", path=path)
        if env is not None:
            return cls(f"{section}.{what}_env", env=env)
        return None

    def __str__(self) -> str:
        return f"{self.setting} ({self.path if self.path is not None else self.env})"

    def read(self, *, secret: bool) -> bytes:
        """The PEM bytes. With `secret`, a file readable by group or others is warned about."""
        if self.path is not None:
            return self._read_file(self.path, secret)
        assert self.env is not None
        return self._read_env(self.env)

    def _read_file(self, path: Path, secret: bool) -> bytes:
        try:
            st = path.stat()  # follows symlinks: a Kubernetes secret mount is ..data/<name> behind one
            if not stat.S_ISREG(st.st_mode):
                raise KeyMaterialError(f"{self}: not a regular file")
            if st.st_size > MAX_PEM_BYTES:
                raise KeyMaterialError(f"{self}: {st.st_size} bytes, too large for a PEM key or certificate")
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyMaterialError(f"{self}: the file does not exist") from None
        except PermissionError:
            raise KeyMaterialError(f"{self}: the file is not readable by this process (uid {os.getuid()})") from None
        except OSError as e:
            raise KeyMaterialError(f"{self}: the file cannot be read ({e.strerror})") from None
        if secret and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            # Warn, don't refuse: Kubernetes mounts secrets 0644 unless defaultMode says otherwise,
            # and in a single-user container nobody else can read it anyway (docs/security.md).
            log.warning(
                "%s is readable by group or others (mode %04o); restrict it to the proxy's user "
                "(chmod 0600, or defaultMode: 0400 on a Kubernetes secret volume)",
                self, stat.S_IMODE(st.st_mode),
            )
        return data

    def _read_env(self, name: str) -> bytes:
        value = os.environ.get(name, "").strip()
        if not value:
            raise KeyMaterialError(f"{self}: the environment variable is not set or empty")
        data = value.encode("utf-8", "replace")
        if PEM_MARKER in data:
            return data
        # Secrets injected as variables are often the PEM base64-encoded on one line.
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        if PEM_MARKER not in decoded:
            raise KeyMaterialError(f"{self}: the value is neither PEM nor base64-encoded PEM")
        return decoded


def load_private_key(source: PemSource) -> PrivateKeyTypes:
    """The unencrypted private key in `source` (a file may also hold certificates)."""
    data = source.read(secret=True)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # password-protected
        raise KeyMaterialError(
            f"{source}: the private key is encrypted; give Proctor the unencrypted key "
            "and protect the file or secret instead"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (it holds a certificate: is this the certificate file?)" if b"CERTIFICATE-----" in data else ""
        raise KeyMaterialError(f"{source}: no readable PEM private key in it{hint}") from None


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `path` whole with `mode`, atomically: a process starting beside this one (two
    commands on one state directory) reads the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # O_CREAT's mode is masked by the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
