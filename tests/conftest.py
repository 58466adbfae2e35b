"""Shared fixtures: real processes on loopback.

- `pki`: a test CA (trustme) with a server cert for localhost/127.0.0.1;
- `idp`: a test identity provider (RSA + EC keys in a JWKS file) that signs tokens;
- `upstream` / `upstream_tls`: recording echo servers (tests/support/echo_server.py);
- `proctor`: a running `proctor run` process configured for all of the above;
- `proctor_factory`: start extra, independently configured proxies.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
SUPPORT = Path(__file__).resolve().parent / "support"
IDP_ISSUER = "https://idp.test"
AUDIENCE = "proctor"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port never handed out before in this test run: the kernel may give the
    same ephemeral port twice in a row once it is closed, and a proxy started with its
    control and gateway listeners on one port fails to bind (seen in CI)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh loopback port after 100 tries")


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------- PKI and IdP
@dataclass
class Pki:
    ca: trustme.CA
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    return Pki(ca, d / "ca.pem", d / "server.pem", d / "server.key")


@dataclass
class Idp:
    """A test IdP: signs tokens with RS256 (kid rsa-1) or ES256 (kid ec-1)."""

    jwks_path: Path
    rsa_key: Any
    ec_key: Any
    issuer: str = IDP_ISSUER
    audience: str = AUDIENCE

    def token(
        self,
        sub: str = "agent-1",
        *,
        alg: str = "RS256",
        kid: str | None = "__default__",
        ttl: int = 300,
        key: Any = None,
        omit: tuple[str, ...] = (),
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
        }
        payload.update(claims)
        for name in omit:
            payload.pop(name, None)
        if kid == "__default__":
            kid = "ec-1" if alg.startswith("ES") else "rsa-1"
        headers = {"kid": kid} if kid is not None else {}
        signing_key = key if key is not None else (self.ec_key if alg.startswith("ES") else self.rsa_key)
        return jwt.encode(payload, signing_key, algorithm=alg, headers=headers)

    def public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="session")
def idp(tmp_path_factory) -> Idp:
    d = tmp_path_factory.mktemp("idp")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    rsa_jwk.update({"kid": "rsa-1", "use": "sig", "alg": "RS256"})
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    ec_jwk.update({"kid": "ec-1", "use": "sig", "alg": "ES256"})
    jwks = d / "jwks.json"
    jwks.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    return Idp(jwks, rsa_key, ec_key)


@pytest.fixture
def reader_token(idp) -> str:
    return idp.token("reader-bot", groups=["readers"], team="ops")


@pytest.fixture
def writer_token(idp) -> str:
    return idp.token("writer-bot", groups=["writers"])


# ------------------------------------------------------------------ upstreams
@dataclass
class Upstream:
    port: int
    log: Path
    proc: subprocess.Popen
    tls: bool

    def received(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def clear(self) -> None:
        self.log.write_text("")

    def last(self) -> dict:
        items = self.received()
        assert items, "the upstream received nothing"
        return items[-1]

    def headers_of(self, entry: dict) -> dict[str, str]:
        return {k.lower(): v for k, v in entry["headers"]}


def _start_upstream(tmp: Path, pki: Pki | None) -> Upstream:
    port = free_port()
    log = tmp / f"received-{port}.jsonl"
    log.write_text("")
    cmd = [sys.executable, str(SUPPORT / "echo_server.py"), "--port", str(port), "--log", str(log)]
    if pki is not None:
        cmd += ["--cert", str(pki.cert_pem), "--key", str(pki.key_pem)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), what=f"upstream on {port}")
    return Upstream(port, log, proc, pki is not None)


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Upstream:
    up = _start_upstream(tmp_path_factory.mktemp("upstream"), None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


@pytest.fixture(scope="session")
def upstream_tls(tmp_path_factory, pki) -> Upstream:
    up = _start_upstream(tmp_path_factory.mktemp("upstream-tls"), pki)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


# --------------------------------------------------------------------- proctor
def connector_manifest(http_port: int, https_port: int) -> dict:
    routes = [
        ("GET", "/items/{id}", "test.item.read", "{id}"),
        ("POST", "/items", "test.item.create", "new"),
        ("DELETE", "/items/{id}", "test.item.delete", "{id}"),
        ("GET", "/boom", "test.boom", "boom"),
        ("GET", "/secret/{id}", "test.secret.read", "{id}"),
        ("GET", "/ctx/{id}", "test.ctx.read", "{id}"),
    ]
    order_route = {
        "method": "POST",
        "path": "/tenants/{tenant}/orders",
        "action": "test.order.create",
        "resource": {"type": "Order", "id": "new"},
        "params": {"tenant": {"type": "long", "min": 1}},
        "query": {"dry_run": {"type": "bool"}},
        "body": {
            "total": {"path": "order.total", "type": "decimal", "required": True},
            "skus": {"path": "order.items[*].sku", "type": "string"},
        },
        "resource_attributes": ["total"],
    }
    mcp_route = {
        "method": "POST",
        "path": "/mcp",
        "jsonrpc": [
            {"method": "tools/list", "action": "test.mcp.list", "resource": {"type": "McpTool", "id": "*"}},
            {
                "method": "tools/call",
                "tool": "create_ticket",
                "action": "test.mcp.create_ticket",
                "resource": {"type": "McpTool", "id": "{tool}"},
                "body": {"priority": {"path": "params.arguments.priority", "type": "long"}},
            },
        ],
    }
    return {
        "name": "testsvc",
        "description": "test upstream",
        "hosts": [f"127.0.0.1:{http_port}", f"localhost:{http_port}", f"localhost:{https_port}", f"127.0.0.1:{https_port}"],
        "routes": [
            {"method": m, "path": p, "action": a, "resource": {"type": "Item", "id": rid}, "attributes": {"kind": "widget"}}
            for m, p, a, rid in routes
        ]
        + [order_route, mcp_route],
    }


@dataclass
class Proctor:
    dir: Path
    config_path: Path
    port: int
    control_port: int
    gateway_port: int
    proc: subprocess.Popen
    log_path: Path
    ca_pem: Path
    policies_dir: Path
    extra: dict = field(default_factory=dict)

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def proxy_url_with(self, agent: str, token: str) -> str:
        return f"http://{agent}:{token}@127.0.0.1:{self.port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def decisions(self) -> list[dict]:
        p = self.dir / "state" / "decisions.jsonl"
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    def decision(self, decision_id: str) -> dict:
        for rec in self.decisions():
            if rec.get("decision_id") == decision_id and "type" not in rec:  # a decision, not an event line
                return rec
        raise AssertionError(f"decision {decision_id} not recorded")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def health(self) -> dict:
        return httpx.get(f"{self.control_url}/healthz", timeout=5).json()

    def dev_token(self, agent: str, **claims: Any) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "token", "issue", "-c", str(self.config_path), "--agent", agent]
            + [f"--claim={k}={json.dumps(v)}" for k, v in claims.items()],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_proctor(
    base: Path,
    idp: Idp,
    pki: Pki,
    upstream: Upstream,
    upstream_tls: Upstream,
    overrides: dict | None = None,
    policies_src: Path = DATA / "policies",
    log_level: str = "info",
    extra_connectors: list[dict] | None = None,
    env: dict[str, str] | None = None,
) -> Proctor:
    base.mkdir(parents=True, exist_ok=True)
    policies_dir = base / "policies"
    shutil.copytree(policies_src, policies_dir)
    connectors = base / "connectors"
    connectors.mkdir()
    (connectors / "testsvc.yaml").write_text(yaml.safe_dump(connector_manifest(upstream.port, upstream_tls.port)))
    for extra in extra_connectors or []:
        (connectors / f"{extra['name']}.yaml").write_text(yaml.safe_dump(extra))
    port, control_port, gateway_port = free_port(), free_port(), free_port()
    cfg: dict[str, Any] = {
        "state_dir": "state",
        "listen": {"host": "127.0.0.1", "port": port},
        "control": {"listen": {"host": "127.0.0.1", "port": control_port}},
        "gateway": {
            "enabled": True,
            "listen": {"host": "127.0.0.1", "port": gateway_port},
            "routes": [
                {"prefix": "/svc", "upstream": f"http://127.0.0.1:{upstream.port}"},
                {"prefix": "/secure", "upstream": f"https://localhost:{upstream_tls.port}"},
                # host-specific: everything addressed to svc.internal goes to the plain upstream
                {"host": "svc.internal", "prefix": "/", "upstream": f"http://127.0.0.1:{upstream.port}"},
            ],
        },
        "identity": {
            "issuers": [
                {
                    "issuer": idp.issuer,
                    "audience": idp.audience,
                    "jwks_file": str(idp.jwks_path),
                    "algorithms": ["RS256", "ES256"],
                }
            ],
            "principal": {"attributes": {"team": "team"}, "groups_claim": "groups"},
        },
        # on beside the test IdP so tests can also use `proctor token issue`
        "dev_issuer": {"enabled": True},
        "connectors_dir": "connectors",
        "policies": {"dir": "policies", "reload_interval_seconds": 0.2},
        "upstream": {"ca_file": str(pki.ca_pem)},
    }
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    config_path = base / "proctor.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    log_path = base / "proctor.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(config_path), "--log-level", log_level],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        cwd=str(base),
        env=env,
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"proctor exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{control_port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, what="proctor readiness")
    return Proctor(
        dir=base,
        config_path=config_path,
        port=port,
        control_port=control_port,
        gateway_port=gateway_port,
        proc=proc,
        log_path=log_path,
        ca_pem=base / "state" / "ca" / "mitmproxy-ca-cert.pem",
        policies_dir=policies_dir,
    )


@pytest.fixture(scope="session")
def proctor(tmp_path_factory, idp, pki, upstream, upstream_tls) -> Proctor:
    p = start_proctor(tmp_path_factory.mktemp("proctor"), idp, pki, upstream, upstream_tls)
    yield p
    p.stop()


# The engines that can serve the gateway listener (config `gateway.engine`). Gateway-mode
# tests take `gateway_proctor` (or `gateway_engine` with `proctor_factory`) and run once per engine.
GATEWAY_ENGINES = ("mitmproxy", "aiohttp")


@pytest.fixture(scope="session", params=GATEWAY_ENGINES)
def gateway_engine(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def gateway_proctor(request, gateway_engine, tmp_path_factory, idp, pki, upstream, upstream_tls) -> Proctor:
    """A running proctor whose gateway listener is served by `gateway_engine`."""
    if gateway_engine == "mitmproxy":  # the default engine: the shared proxy
        yield request.getfixturevalue("proctor")
        return
    p = start_proctor(tmp_path_factory.mktemp(f"proctor-{gateway_engine}"), idp, pki, upstream, upstream_tls,
                      {"gateway": {"engine": gateway_engine}})
    yield p
    p.stop()


@pytest.fixture
def proctor_factory(tmp_path, idp, pki, upstream, upstream_tls):
    started: list[Proctor] = []

    def make(overrides: dict | None = None, name: str = "p", **kw) -> Proctor:
        p = start_proctor(tmp_path / f"{name}{len(started)}", idp, pki, upstream, upstream_tls, overrides, **kw)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def basic_proxy_auth(agent: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{agent}:{token}".encode()).decode()


# In CI (.ci/run sets PROCTOR_TEST_NO_SKIP) the tests that prove Proctor cannot be bypassed must
# run: a skip there (no root for network namespaces, no iptables/nft, no Node.js) is a failure.
NO_SKIP_MODULES = frozenset(os.environ.get("PROCTOR_TEST_NO_SKIP", "").replace(",", " ").split())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in NO_SKIP_MODULES:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped, but PROCTOR_TEST_NO_SKIP requires {item.module.__name__} to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    name = Path(str(getattr(collector, "path", ""))).stem
    if report.skipped and isinstance(collector, pytest.Module) and name in NO_SKIP_MODULES:
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.longrepr = f"skipped, but PROCTOR_TEST_NO_SKIP requires {name} to run: {reason}"
