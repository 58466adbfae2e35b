"""Config validation: typos and dangerous settings are errors, paths resolve relative to the file."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, IssuerConfig, load_config


def test_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("listen: {host: 127.0.0.1, prot: 1}\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(f)


def test_paths_resolve_relative_to_config(tmp_path):
    f = tmp_path / "sub" / "p.yaml"
    f.parent.mkdir()
    f.write_text("state_dir: st\npolicies: {dir: pol}\nconnectors_dir: con\n")
    cfg = load_config(f)
    assert cfg.state_dir == tmp_path / "sub" / "st"
    assert cfg.policies.dir == tmp_path / "sub" / "pol"
    assert cfg.schema_path == tmp_path / "sub" / "pol" / "schema.cedarschema"


@pytest.mark.parametrize("alg", ["none", "HS256"])
def test_insecure_algorithms_rejected(alg):
    with pytest.raises(ValueError):
        IssuerConfig(issuer="i", audience="a", jwks_file="x.json", algorithms=[alg])


def test_jwks_url_must_be_https():
    with pytest.raises(ValueError, match="https"):
        IssuerConfig(issuer="i", audience="a", jwks_url="http://idp/jwks")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_deploy_example_config_is_valid():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "deploy" / "proctor.yaml")
    assert cfg.dev_issuer.enabled is False
    assert [i.issuer for i in cfg.effective_issuers()] == ["https://idp.example.com/"]


def test_dev_issuer_off_when_a_real_issuer_is_configured(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("identity:\n  issuers:\n    - {issuer: https://idp, audience: a, jwks_file: j.json}\n")
    cfg = load_config(f)
    assert cfg.dev_issuer_enabled is False
    assert [i.issuer for i in cfg.effective_issuers()] == ["https://idp"]
    (tmp_path / "q.yaml").write_text("{}\n")
    assert load_config(tmp_path / "q.yaml").dev_issuer_enabled is True


def test_state_dir_defaults_next_to_config(tmp_path):
    (tmp_path / "p.yaml").write_text("{}\n")
    assert load_config(tmp_path / "p.yaml").state_dir == tmp_path / ".proctor"


def test_secret_headers_cannot_enter_policy_context(tmp_path):
    (tmp_path / "p.yaml").write_text("limits: {context_headers: [X-Team, Authorization]}\n")
    with pytest.raises(ConfigError, match="authorization"):
        load_config(tmp_path / "p.yaml")


def test_engine_ceiling_must_hold_one_inspected_body():
    from proxy.config import RequestLimits

    with pytest.raises(ValueError, match="engine_max_message_bytes"):
        RequestLimits(max_body_bytes=8 * 1024 * 1024, engine_max_message_bytes=4 * 1024 * 1024)
