"""The workload identity of a transparent sidecar: ONE agent token, read from a file.

In transparent mode (docs/transparent.md) the agent presents no credential: the
network redirected its connection to Proctor, and every request on it is
attributed to the one agent the sidecar serves, whose token is in
`transparent.token_file` (a mounted secret, or a projected Kubernetes
service-account token the kubelet rotates).

- Read at start, and re-read when it changes: the file is opened (following
  symlinks, so a Kubernetes `..data` symlink swap is seen atomically) and its
  device, inode, size, mtime and ctime compared, at most every
  `token_check_seconds`: on a request, and by a background watcher so rotations
  and errors are logged (and counted) without traffic.
- Verified exactly like any agent token (the same `TokenVerifier`: trusted
  issuers, JWKS, audience, `exp`) on every request; the verifier caches it
  until it expires.
- Fail closed: a file that is missing, unreadable, not a regular file, empty,
  oversized or not a token, and a token that is invalid or expired (also after a
  rotation) make `identity()` raise `WorkloadUnavailable`, which the
  authenticator answers with 503 for every transparent request. The message
  names the file, never the token. A good token restores service without a
  restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from ..core.model import AgentIdentity
from .errors import AuthError, IdentityUnavailable
from .verifier import TokenVerifier

log = logging.getLogger("proctor.identity")


class WorkloadUnavailable(Exception):
    """No usable workload identity right now (the message names the file, never the token)."""


def _os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


class WorkloadIdentity:
    """The token in one file, re-read on rotation, verified on use."""

    def __init__(
        self,
        path: Path,
        verifier: TokenVerifier,
        *,
        check_seconds: float = 5.0,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.verifier = verifier
        self.check_seconds = check_seconds
        self.max_bytes = verifier.settings.max_token_bytes
        self._clock, self._wall = clock, wall
        self._token: str | None = None
        self._digest: bytes | None = None
        self._key: tuple[int, ...] | None = None  # (dev, ino, size, mtime_ns, ctime_ns) of what was read
        self._checked: float | None = None  # monotonic time of the last look at the file
        self.file_error: str | None = None  # why the file gives no token
        self.loaded_at: float | None = None  # wall time the current token was read
        self.checked_at: float | None = None  # wall time of the last look at the file
        self.rotations = 0  # token changes after the first load
        # the last verification of the current token
        self.identity: AgentIdentity | None = None
        self.verify_error: str | None = None
        self._uncounted = False  # a new token read, its reload not counted until it is verified
        self._reloads = (
            Counter("proctor_workload_identity_reloads",
                    "Workload identity reloads: ok (a new token, verified) or error (the file or its token "
                    "is unusable; every transparent request is refused).",
                    ["outcome"], registry=registry)
            if registry is not None else None
        )
        if registry is not None:
            registry.register(_WorkloadCollector(self))
        self.refresh(force=True)

    # -- the file ------------------------------------------------------------------
    def refresh(self, force: bool = False) -> bool:
        """Look at the file if a check is due (or `force`); re-read it if it changed.
        True when the token or the file's error changed."""
        now = self._clock()
        if not force and self._checked is not None and now - self._checked < self.check_seconds:
            return False
        self._checked = now
        self.checked_at = self._wall()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return self._fail("does not exist")
        except OSError as e:
            return self._fail(f"cannot be opened ({_os_reason(e)})")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return self._fail("is not a regular file")
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if key == self._key and self.file_error is None:
                return False  # unchanged
            chunks, size = [], 0
            while size <= self.max_bytes:
                chunk = os.read(fd, self.max_bytes + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        except OSError as e:
            return self._fail(f"cannot be read ({_os_reason(e)})")
        finally:
            os.close(fd)
        raw = b"".join(chunks)
        if len(raw) > self.max_bytes:
            return self._fail(f"is larger than {self.max_bytes} bytes (identity.max_token_bytes)")
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return self._fail("does not hold a token (not ASCII text)")
        if not token:
            return self._fail("is empty")
        if any(c.isspace() for c in token):
            return self._fail("does not hold one token (it contains whitespace)")
        digest = hashlib.sha256(token.encode()).digest()
        self._key = key
        if digest == self._digest and self.file_error is None:
            return False  # rewritten with the same token
        first = self._digest is None and self.loaded_at is None
        self._token, self._digest, self.file_error = token, digest, None
        self.loaded_at = self._wall()
        self.identity, self.verify_error = None, None
        if not first:
            self.rotations += 1
        log.info("workload identity: %s token file %s", "loaded the" if first else "reloaded the rotated", self.path)
        self._uncounted = True  # counted as ok or error once verified
        return True

    def _fail(self, reason: str) -> bool:
        error = f"the workload identity token file {self.path} {reason}"
        changed = error != self.file_error or self._token is not None
        self._token = self._digest = None
        self._key = None
        self.identity, self.verify_error = None, None
        self.file_error = error
        self._uncounted = False
        if changed:
            log.error("%s: every transparent request is refused until it holds a valid token", error)
            self._count("error")
        return changed

    def _count(self, outcome: str) -> None:
        if self._reloads is not None:
            self._reloads.labels(outcome).inc()

    # -- the identity --------------------------------------------------------------
    async def current(self) -> tuple[AgentIdentity, bytes]:
        """The verified workload identity and the SHA-256 of its token, or WorkloadUnavailable
        (IdentityUnavailable when the issuer's keys cannot be had: also fail closed)."""
        self.refresh()
        token, digest = self._token, self._digest
        if token is None or digest is None:
            raise WorkloadUnavailable(self.file_error or f"the workload identity token file {self.path} was not read")
        try:
            identity = await self.verifier.verify(token)
        except AuthError as e:
            error = f"the token in the workload identity file {self.path} is not accepted: {e}"
            self._verified(digest, None, error)
            raise WorkloadUnavailable(error) from None
        self._verified(digest, identity, None)
        return identity, digest

    def _verified(self, digest: bytes, identity: AgentIdentity | None, error: str | None) -> None:
        if digest != self._digest:
            return  # the file rotated meanwhile: that token's result is not this one's
        if self._uncounted:
            self._uncounted = False
            self._count("ok" if error is None else "error")
        if error is not None and error != self.verify_error:
            log.error("%s: every transparent request is refused until the file holds a valid token", error)
        elif identity is not None and (self.identity is None or self.identity.agent_id != identity.agent_id
                                       or self.verify_error is not None):
            exp = identity.expires_at
            log.info("workload identity: agent %s (issuer %s, expires %s) from %s", identity.agent_id,
                     identity.issuer, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp)) if exp else "never",
                     self.path)
        self.identity, self.verify_error = identity, error

    async def check(self) -> None:
        """Refresh and verify now (the watcher; errors end up in `status()`)."""
        try:
            await self.current()
        except WorkloadUnavailable:
            pass
        except IdentityUnavailable as e:
            self.verify_error = f"the workload identity cannot be verified now: {e}"

    async def run(self) -> None:
        """Watch the file: rotations and errors are logged and counted without traffic."""
        while True:
            await asyncio.sleep(self.check_seconds)
            try:
                changed = self.refresh()
                if changed or (self._token is not None and (self.identity is None or self.expired())):
                    await self.check()
            except Exception:  # noqa: BLE001 - the watcher must keep watching
                log.exception("workload identity watcher error")

    # -- reporting -----------------------------------------------------------------
    def expired(self) -> bool:
        exp = self.identity.expires_at if self.identity is not None else None
        return exp is not None and self._wall() > exp + self.verifier.settings.leeway_seconds

    def problem(self) -> str | None:
        """Why transparent requests are refused right now (None: they are attributed)."""
        if self.file_error is not None:
            return self.file_error
        if self.verify_error is not None:
            return self.verify_error
        if self.identity is None:
            return f"the token in the workload identity file {self.path} is not verified yet"
        if self.expired():
            return f"the token in the workload identity file {self.path} has expired"
        return None

    def usable_identity(self) -> AgentIdentity | None:
        """The identity requests are attributed to right now (None while they are refused)."""
        return self.identity if self.problem() is None else None

    def status(self) -> dict[str, Any]:
        """For /healthz: the state, never the token."""
        ident = self.identity
        return {
            "token_file": str(self.path),
            "agent_id": ident.agent_id if ident is not None else None,
            "issuer": ident.issuer if ident is not None else None,
            "expires_at": ident.expires_at if ident is not None else None,
            "loaded_at": self.loaded_at,
            "checked_at": self.checked_at,
            "rotations": self.rotations,
            "error": self.problem(),
        }


class _WorkloadCollector:
    """Scrape-time gauges: is the workload identity usable, and when does its token expire."""

    def __init__(self, workload: WorkloadIdentity) -> None:
        self.workload = workload

    def collect(self) -> Iterator[GaugeMetricFamily]:
        w = self.workload
        yield GaugeMetricFamily("proctor_workload_identity_valid",
                                "1 while transparent requests are attributed to the workload identity, else 0.",
                                value=0.0 if w.problem() is not None else 1.0)
        exp = w.identity.expires_at if w.identity is not None else None
        if exp is not None:
            yield GaugeMetricFamily("proctor_workload_identity_expires_at_seconds",
                                    "When the workload identity's token expires (Unix time).", value=exp)
