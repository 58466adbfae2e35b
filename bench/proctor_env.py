"""Build a self-contained Proctor deployment for the benchmark in a directory.

- an ES256 signing key and a JWKS file (a stand-in for the enterprise IdP),
  configured as a trusted issuer; a one-hour agent token signed with it;
- a connector manifest mapping the upstream's 127.0.0.1:PORT with
  `GET /items/{id}` -> `bench.item.read` and `DELETE /items/{id}` ->
  `bench.item.delete` on `Item::"{id}"`;
- the generated schema and policy set (bench/policygen.py);
- proctor.yaml (forward proxy on loopback, control API for readiness, gateway
  off, decision record on, as in a real deployment);
- on request (`gateway_config`), more configs sharing that key, connector and
  policy set but with their own ports and state directory, with the gateway
  (reverse) listener on and one route `/` -> the upstream, served by the
  engine named (mitmproxy or aiohttp).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import policygen

ISSUER = "https://idp.bench.invalid"
AUDIENCE = "proctor"
AGENT = "bench-agent"
KID = "bench-ec-1"
CLAIMS = {"team": "bench-team", "level": 1, "groups": ["bench-readers", "group-8"]}


@dataclass
class ProctorEnv:
    dir: Path
    config_path: Path
    policies_dir: Path
    port: int
    control_port: int
    upstream_port: int
    token: str
    policy_stats: dict

    @property
    def proxy_authorization(self) -> str:
        return f"Bearer {self.token}"


def make_token(key, sub: str = AGENT, ttl: int = 3600, **claims) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "nbf": now, "exp": now + ttl,
               "jti": uuid.uuid4().hex, **CLAIMS, **claims}
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": KID})


def connector_manifest(upstream_port: int) -> dict:
    return {
        "name": "bench",
        "description": "benchmark upstream (bench/upstream.py)",
        "hosts": [f"127.0.0.1:{upstream_port}"],
        "routes": [
            {"method": "GET", "path": "/items/{id}", "action": "bench.item.read",
             "resource": {"type": "Item", "id": "{id}"}, "attributes": {"kind": "widget"}},
            {"method": "DELETE", "path": "/items/{id}", "action": "bench.item.delete",
             "resource": {"type": "Item", "id": "{id}"}, "attributes": {"kind": "widget"}, "risk": "high"},
        ],
    }


def _config(state_dir: str, port: int, control_port: int) -> dict:
    """A proctor.yaml (paths relative to the deployment directory, where the process runs)."""
    return {
        "state_dir": state_dir,
        "listen": {"host": "127.0.0.1", "port": port},
        "control": {"listen": {"host": "127.0.0.1", "port": control_port}},
        "identity": {
            "issuers": [
                {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": "jwks.json", "algorithms": ["ES256"]}
            ],
            "principal": {"attributes": {"team": "team", "level": "level"}, "groups_claim": "groups"},
        },
        "dev_issuer": {"enabled": False},
        "connectors_dir": "connectors",
        "policies": {"dir": "policies", "reload_interval_seconds": 1.0},
    }


def gateway_config(env: ProctorEnv, name: str, port: int, control_port: int, gateway_port: int,
                   engine: str) -> Path:
    """Another config of the same deployment (key, connector, policies) with the gateway listener
    on `gateway_port` served by `engine`, routing `/` to the upstream. Its forward listener and
    control API get their own ports and its state (store, decision record, audit trail) its own
    directory, so it runs beside the forward-proxy config without sharing a file."""
    cfg = _config(f"state-{name}", port, control_port)
    cfg["gateway"] = {
        "enabled": True,
        "engine": engine,
        "listen": {"host": "127.0.0.1", "port": gateway_port},
        "routes": [{"prefix": "/", "upstream": f"http://127.0.0.1:{env.upstream_port}"}],
    }
    path = env.dir / f"proctor-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def build(base: Path, upstream_port: int, port: int, control_port: int, policy_count: int = 500) -> ProctorEnv:
    base.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "use": "sig", "alg": "ES256"})
    (base / "jwks.json").write_text(json.dumps({"keys": [jwk]}))

    policies_dir = base / "policies"
    stats = policygen.generate(policies_dir, policy_count)
    connectors = base / "connectors"
    connectors.mkdir(exist_ok=True)
    (connectors / "bench.yaml").write_text(yaml.safe_dump(connector_manifest(upstream_port), sort_keys=False))

    cfg = _config("state", port, control_port)
    config_path = base / "proctor.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return ProctorEnv(
        dir=base,
        config_path=config_path,
        policies_dir=policies_dir,
        port=port,
        control_port=control_port,
        upstream_port=upstream_port,
        token=make_token(key),
        policy_stats=stats,
    )
