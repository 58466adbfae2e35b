"""The `proctor` CLI verbs that exist so far."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jwt
import pytest
from cryptography import x509

from conftest import DATA


def proctor(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_ca_export_to_file_and_stdout(tmp_path):
    out = proctor("ca", "export", str(tmp_path / "ca.pem"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    pem = (tmp_path / "ca.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    assert "Proctor" in cert.subject.rfc4514_string()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert b"PRIVATE KEY" not in pem
    again = proctor("ca", "export", cwd=tmp_path)
    assert again.stdout.encode() == pem  # same CA on every run: created once in ./.proctor/ca


@pytest.mark.integration
def test_exported_ca_works_for_curl(proctor, upstream_tls, idp, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "ca", "export", str(tmp_path / "exported.pem"), "-c", str(proctor.config_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    tok = idp.token("curl-bot", groups=["readers"])
    url = proctor.proxy_url_with("curl-bot", tok)
    env = dict(os.environ, https_proxy=url, HTTPS_PROXY=url, CURL_CA_BUNDLE=str(tmp_path / "exported.pem"))
    r = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", f"https://localhost:{upstream_tls.port}/items/3"],
        env=env, capture_output=True, text=True,
    )
    assert r.stdout == "200", r.stderr


def test_token_issue(tmp_path):
    out = proctor("token", "issue", "--agent", "bot-7", "--claim", 'groups=["a","b"]', "--claim", "team=ops", "--ttl", "10m", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "bot-7" and claims["groups"] == ["a", "b"] and claims["team"] == "ops"
    assert claims["iss"] == "proctor-dev" and claims["aud"] == "proctor"
    assert 590 <= claims["exp"] - int(time.time()) <= 600
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    jwks = json.loads((tmp_path / ".proctor" / "dev-issuer" / "jwks.json").read_text())
    key = jwt.PyJWK.from_dict(jwks["keys"][0])
    jwt.decode(token, key=key, algorithms=["ES256"], audience="proctor")  # verifies
    assert oct((tmp_path / ".proctor" / "dev-issuer" / "key.pem").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--claim", "sub=admin"], "reserved"),
        (["--ttl", "forever"], "invalid duration"),
        (["--ttl", "48h"], "max_ttl"),
        (["--claim", "novalue"], "K=V"),
    ],
)
def test_token_issue_rejects_bad_input(tmp_path, args, message):
    out = proctor("token", "issue", "--agent", "x", *args, cwd=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr


def test_policy_validate_ok_and_bad(tmp_path):
    ok = proctor("policy", "validate", "--dir", str(DATA / "policies"))
    assert ok.returncode == 0 and "ok:" in ok.stdout
    bad = tmp_path / "pol"
    bad.mkdir()
    (bad / "schema.cedarschema").write_text((DATA / "policies" / "schema.cedarschema").read_text())
    (bad / "a.cedar").write_text('permit (principal, action == Action::"nope", resource);')
    out = proctor("policy", "validate", "--dir", str(bad))
    assert out.returncode == 1
    assert "@id" in out.stderr


def test_bundled_policies_validate():
    out = proctor("policy", "validate")
    assert out.returncode == 0, out.stderr


def test_bad_config_is_a_clear_error(tmp_path):
    (tmp_path / "p.yaml").write_text("listen: {port: notaport}\n")
    out = proctor("run", "-c", str(tmp_path / "p.yaml"))
    assert out.returncode != 0
    assert "invalid configuration" in out.stderr and "port" in out.stderr
